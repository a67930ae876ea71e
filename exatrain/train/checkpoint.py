"""Atomic, reshardable checkpoints of a `dict[str, Stateful]` with torch.distributed.checkpoint (DCP).

The trainer checkpoints `{"engine": model + optimizer, "trainer": step and tokens, "data": loader
position, "callbacks.<name>": each callback}`; every entry has `state_dict()`/`load_state_dict()`.
Layout of one checkpoint, `<run_dir>/checkpoints/step_00000100/`:
  - DCP shards + `.metadata`   every entry's state; the engine's tensors are keyed by layout-independent
                                FQNs, so a checkpoint written under tp2·pp2·dp2 loads under dp8
  - `rank_<r>.pt`               per-rank RNG state (weights_only-loadable tensors)
  - `meta.json`                 step, tokens seen, config, layout, world size, manifest of file sizes
Everything is written into `step_X.tmp` and renamed to `step_X` only after every rank has
finished and the manifest is on disk, so a crash mid-write never touches the latest good
checkpoint; stale `.tmp` directories are ignored and cleaned up.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torch import nn

from exatrain.config import JobConfig, to_dict
from exatrain.files import write_private

log = logging.getLogger("exatrain")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 2
ENGINE = "engine"  # the key of the model + optimizer state; its model weights are under ENGINE.model.<fqn>


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with this run."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where the run stands: optimizer steps done and tokens trained on."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    """Every RNG a step may touch, as plain types so `torch.load(weights_only=True)` reads it back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` directory is never complete)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _manifest(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def verify(path: Path) -> dict[str, Any]:
    """Check that a checkpoint directory is complete and its files intact; return its metadata."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json is not valid JSON ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format_version')}, "
                              f"this exatrain reads format {FORMAT_VERSION}")
    for name, size in meta["manifest"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"expected {size} (truncated or overwritten)")
    return meta


def check_compatible(meta: dict[str, Any], cfg: JobConfig, path: Path) -> None:
    """The model architecture must match; everything else (layout, batch, LR) may change on resume, and so
    may model.init_from, where the weights came from before the checkpoint (drop it once its files are gone)."""
    saved = meta["config"]["model"]
    current = to_dict(cfg)["model"]
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs run {current[k]!r}"
             for k in current if k != "init_from" and saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different model:\n  " + "\n  ".join(diffs))


class Checkpointer:
    """Saves and restores `dict[str, Stateful]` plus per-rank RNG state under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, job: JobConfig):
        self.dir = Path(run_dir) / "checkpoints"
        self.job = job
        self.cfg = job.checkpoint

    def save(self, step: int, states: Mapping[str, Stateful], meta: dict[str, Any]) -> Path:
        """Write step `step` (collective: every rank calls it); `meta` goes into meta.json."""
        start = time.perf_counter()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({key: s.state_dict() for key, s in states.items()}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rank_{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            record = {
                "format_version": FORMAT_VERSION,
                "step": step,
                **meta,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "torch": torch.__version__,
                "config": to_dict(self.job),
                "manifest": _manifest(tmp),
            }
            write_private(tmp / "meta.json", json.dumps(record, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._apply_retention()
            log.info("checkpoint step %d -> %s (%.1fs)", step, final, time.perf_counter() - start)
        _barrier()
        return final

    def _apply_retention(self) -> None:
        complete = list_checkpoints(self.dir)
        for old in complete[: max(0, len(complete) - self.cfg.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def resume_path(self) -> Path | None:
        """`checkpoint.resume`: "auto" = latest complete checkpoint in the run dir, "never", or a path."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            return Path(self.cfg.resume)
        complete = list_checkpoints(self.dir)
        return complete[-1] if complete else None

    def load(self, path: Path, states: Mapping[str, Stateful]) -> dict[str, Any]:
        """Restore every entry of `states` (collective) and this rank's RNG; returns the checkpoint's meta.json."""
        meta = verify(path)
        check_compatible(meta, self.job, path)
        sd = {key: s.state_dict() for key, s in states.items()}
        try:
            dcp.load(sd, checkpoint_id=str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot load {', '.join(states)} state from {path}: {exc}") from exc
        for key, s in states.items():
            s.load_state_dict(sd[key])
        rng_file = path / f"rank_{_rank()}.pt"
        if rng_file.is_file() and meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
            set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Read only the model weights of a checkpoint into a plain (unsharded) model, in this process."""
    state = {ENGINE: {"model": model.state_dict()}}
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load model weights from {path}: {exc}") from exc
    model.load_state_dict(state[ENGINE]["model"])
