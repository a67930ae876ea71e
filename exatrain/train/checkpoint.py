"""Atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `<run_dir>/checkpoints/step_00000100/`:
  - DCP shards + `.metadata`   model and optimizer, keyed by layout-independent FQNs, so a
                                checkpoint written under tp2·pp2·dp2 loads under dp8
  - `rank_<r>.pt`               per-rank RNG state (weights_only-loadable tensors)
  - `meta.json`                 step, tokens seen, data-loader state, config, layout, manifest
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from exatrain.config import CheckpointConfig, JobConfig, to_dict

log = logging.getLogger("exatrain")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with this run."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


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
    """The model architecture must match; everything else (layout, batch, LR) may change on resume."""
    saved = meta["config"]["model"]
    current = to_dict(cfg)["model"]
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs run {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different model:\n  " + "\n  ".join(diffs))


class Checkpointer:
    """Saves and restores engine, data-loader, RNG and progress state under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    def save(self, step: int, engine, loader, state: TrainState, job: JobConfig, layout: dict[str, int]) -> Path:
        start = time.perf_counter()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(engine.state_dict(), checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rank_{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            meta = {
                "format_version": FORMAT_VERSION,
                "step": state.step,
                "tokens_seen": state.tokens_seen,
                "loader": loader.state_dict(),
                "layout": layout,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "torch": torch.__version__,
                "config": to_dict(job),
                "manifest": _manifest(tmp),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
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

    def load(self, path: Path, engine, loader, job: JobConfig) -> TrainState:
        meta = verify(path)
        check_compatible(meta, job, path)
        sd = engine.state_dict()
        try:
            dcp.load(sd, checkpoint_id=str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot load model/optimizer state from {path}: {exc}") from exc
        engine.load_state_dict(sd)
        rng_file = path / f"rank_{_rank()}.pt"
        if rng_file.is_file() and meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
            set_rng_state(torch.load(rng_file, weights_only=True))
        loader.load_state_dict(meta["loader"])
        log.info("resumed from %s (step %d, %d tokens)", path, meta["step"], meta["tokens_seen"])
        return TrainState(step=meta["step"], tokens_seen=meta["tokens_seen"])
