"""Atomic, reshardable checkpoints of a `dict[str, Stateful]` with torch.distributed.checkpoint (DCP).

The trainer checkpoints `{"engine": model + optimizer, "trainer": step and tokens, "data": loader
position, "callbacks.<name>": each callback}`; every entry has `state_dict()`/`load_state_dict()`.
Layout of one checkpoint, `<run_dir>/checkpoints/step_00000100/`:
  - DCP shards + `.metadata`   every entry's state; the engine's tensors are keyed by layout-independent
                                FQNs, so a checkpoint written under tp2·pp2·dp2 loads under dp8
  - `rank_<r>.pt`               per-rank RNG state (weights_only-loadable tensors)
  - `meta.json`                 step, tokens seen, config, layout, world size, manifest of file sizes
                                and blake2b checksums (verified on every load)
Everything is written into `step_X.tmp` (files fsynced) and renamed to `step_X` only after every rank has
finished and the manifest is on disk, so a crash mid-write never touches the latest good checkpoint; stale
`.tmp` directories are ignored and cleaned up. Re-saving an existing step swaps atomically: the old
directory is renamed to `step_X.old`, the new one renamed in, the directory fsynced, and only then is the
old one deleted; a kill in between leaves `step_X.old`, which the next run renames back. Weights that are
not finite are never saved, so retention never rotates out the newest finite checkpoint. Checkpoints are
untrusted input: they are read without unpickling code (exatrain.train.safe_load).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
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
from torch.distributed.checkpoint.api import CheckpointException

from exatrain.config import JobConfig, to_dict
from exatrain.errors import CheckpointError
from exatrain.files import write_private
from exatrain.train.guard import weights_finite
from exatrain.train.safe_load import SafePlanner, SafeReader

log = logging.getLogger("exatrain")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 3  # 3 adds blake2b checksums to the manifest; format 2 (sizes only) is still read
READABLE_FORMATS = (2, 3)
ENGINE = "engine"  # the key of the model + optimizer state; its model weights are under ENGINE.model.<fqn>
ASIDE = ".old"  # suffix of a step directory moved aside while a re-save of the same step swaps in
PROGRESS_FILES = ("metrics.jsonl",)  # a run dir holding these has trained, with or without a checkpoint

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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a directory's entries are fsynced like a file)."""
    _fsync_file(path)


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _manifest(path: Path, files: list[Path] | None = None) -> dict[str, dict[str, Any]]:
    """Size and checksum of `files` (default: every file under `path`), keyed by path relative to it."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if files is None else files
    return {str(f.relative_to(path)): {"bytes": f.stat().st_size, "blake2b": file_digest(f)} for f in files}


def _gathered_manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    """The whole checkpoint's manifest on rank 0 (None elsewhere): each rank checksums the files it wrote (DCP
    names them `__<rank>_<n>.distcp`), so the cost is the checkpoint size / world size; rank 0 adds the rest."""
    rank = _rank()
    mine = _manifest(path, sorted(path.glob(f"__{rank}_*.distcp")) + [path / f"rank_{rank}.pt"])
    parts = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    if rank != 0:
        return None
    merged = {name: entry for part in parts for name, entry in part.items()}
    rest = [f for f in sorted(path.rglob("*")) if f.is_file() and str(f.relative_to(path)) not in merged]
    return {**merged, **_manifest(path, rest)}


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check that a checkpoint directory is complete and its files intact (sizes and checksums); return its
    metadata. `share` = (index, count) checksums only every count-th file from index, so ranks split the
    reading (sizes are always all checked)."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {path} has format {version}, this exatrain reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    missing = [k for k in ("step", "world_size", "config", "manifest") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json lacks {', '.join(missing)}")
    for i, (name, entry) in enumerate(sorted(meta["manifest"].items())):
        f = path / name
        size, digest = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry["blake2b"])
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"expected {size} (truncated or overwritten)")
        if digest is not None and i % share[1] == share[0] and file_digest(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its blake2b checksum "
                                  "(bytes changed on disk)")
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


def _root_cause(exc: BaseException) -> BaseException:
    """The exception behind DCP's wrapping (CheckpointException holds each rank's failure)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = next(iter(exc.failures.values()))[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def read_state(state: dict[str, Any], path: Path, what: str, **kwargs: Any) -> None:
    """dcp.load through the restricted reader and planner; any failure is a CheckpointError naming `path`."""
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), **kwargs)
    except (Exception, CheckpointException) as exc:
        cause = _root_cause(exc)
        if isinstance(cause, CheckpointError):
            raise CheckpointError(f"cannot load {what} from {path}: {cause}") from None
        raise CheckpointError(f"cannot load {what} from {path}: {type(cause).__name__}: {cause}") from exc


class Checkpointer:
    """Saves and restores `dict[str, Stateful]` plus per-rank RNG state under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, job: JobConfig):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.job = job
        self.cfg = job.checkpoint

    def save(self, step: int, states: Mapping[str, Stateful], meta: dict[str, Any]) -> Path:
        """Write step `step` (collective: every rank calls it); `meta` goes into meta.json. Refuses non-finite
        weights; on a full disk removes the partial write and says so, keeping every earlier checkpoint."""
        start = time.perf_counter()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if ENGINE in states and not weights_finite(states[ENGINE]):
            latest = list_checkpoints(self.dir)
            raise FloatingPointError(
                f"step {step}: the weights are non-finite; not writing a checkpoint of them (the newest finite "
                f"checkpoint, {latest[-1] if latest else 'none'}, is kept). Lower optim.lr or raise "
                "optim.grad_clip and resume from it")
        try:
            self._write(step, states, meta, tmp, final)
        except (Exception, CheckpointException) as exc:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # never resumed from; every earlier checkpoint stays
            cause = _root_cause(exc)
            if not (isinstance(cause, OSError) and cause.errno == errno.ENOSPC):
                raise
            latest = list_checkpoints(self.dir)
            raise CheckpointError(
                f"disk full (ENOSPC) writing checkpoint step {step}: {cause.filename or tmp}; the partial "
                f"{tmp.name} was removed and the previous checkpoint ({latest[-1] if latest else 'none'}) is "
                f"intact. Free space on the file system of {self.dir} (or lower checkpoint.keep) and resume"
            ) from exc
        if _rank() == 0:
            log.info("checkpoint step %d -> %s (%.1fs)", step, final, time.perf_counter() - start)
        return final

    def _write(self, step: int, states: Mapping[str, Stateful], meta: dict[str, Any], tmp: Path,
               final: Path) -> None:
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({key: s.state_dict() for key, s in states.items()}, checkpoint_id=str(tmp))
        error = None
        try:
            rng_file = tmp / f"rank_{_rank()}.pt"
            torch.save(rng_state(), rng_file)
            _fsync_file(rng_file)
        except OSError as exc:
            error = exc
        raise_on_any_rank(error, f"writing {tmp}")
        manifest = _gathered_manifest(tmp)
        if _rank() == 0:
            record = {
                "format_version": FORMAT_VERSION,
                "step": step,
                **meta,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "torch": torch.__version__,
                "config": to_dict(self.job),
                "manifest": manifest,
            }
            try:
                write_private(tmp / "meta.json", json.dumps(record, indent=1), sync=True)
                _sync_dir(tmp)
                swap_in(tmp, final)
                self._apply_retention()
            except OSError as exc:
                error = exc
        raise_on_any_rank(error, f"publishing {final}")

    def _apply_retention(self) -> None:
        complete = list_checkpoints(self.dir)
        for old in complete[: max(0, len(complete) - self.cfg.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def resume_path(self) -> Path | None:
        """`checkpoint.resume`: "auto" = latest complete checkpoint in the run dir, "never", or a path.

        Collective. First restores a step directory a killed re-save left aside. "auto" on a run dir that
        has trained (metrics, a partial checkpoint) but holds no checkpoint refuses rather than silently
        starting from step 0; "never" moves existing checkpoints aside so no later run resumes them."""
        if _rank() == 0:
            recover_swaps(self.dir)
            if self.cfg.resume == "never":
                self._set_aside()
        _barrier()
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            return Path(self.cfg.resume)
        complete = list_checkpoints(self.dir)
        if complete:
            return complete[-1]
        progress = self._progress()
        if progress and (self.cfg.every or self.cfg.save_final):
            raise CheckpointError(
                f"run dir {self.run_dir} has progress ({', '.join(progress)}) but no loadable checkpoint; "
                "refusing to start again from step 0 in it. Set checkpoint.resume=never to start over "
                "(existing checkpoints are moved aside), or checkpoint.resume=PATH to load a checkpoint")
        return None

    def _progress(self) -> list[str]:
        found = [name for name in PROGRESS_FILES
                 if (self.run_dir / name).is_file() and (self.run_dir / name).stat().st_size > 0]
        if self.dir.is_dir():
            found += [f"checkpoints/{p.name}" for p in sorted(self.dir.glob("step_*.tmp"))]
        return found

    def _set_aside(self) -> None:
        if not self.dir.is_dir() or not any(self.dir.iterdir()):
            return
        aside = self.dir.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        self.dir.rename(aside)
        log.warning("checkpoint.resume=never: moved the existing checkpoints to %s (a later run with "
                    "resume=auto starts from this run's checkpoints, not those)", aside)

    def load(self, path: Path, states: Mapping[str, Stateful]) -> dict[str, Any]:
        """Restore every entry of `states` (collective) and this rank's RNG; returns the checkpoint's meta.json."""
        try:
            meta = verify_shared(path)
        except CheckpointError as exc:
            earlier = [p for p in list_checkpoints(path.parent) if p != path]
            if not earlier:
                raise
            raise CheckpointError(f"{exc}\nAn earlier checkpoint is {earlier[-1]}: set "
                                  f"checkpoint.resume={earlier[-1]} to resume from it") from None
        check_compatible(meta, self.job, path)
        states = _present_callbacks(states, path)
        sd = {key: s.state_dict() for key, s in states.items()}
        read_state(sd, path, f"{', '.join(states)} state")
        for key, s in states.items():
            s.load_state_dict(sd[key])
        rng_file = path / f"rank_{_rank()}.pt"
        if rng_file.is_file() and meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
            set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta


def stored_keys(path: Path) -> set[str]:
    """The flattened keys a checkpoint holds (e.g. engine.model.output.weight), from its metadata only."""
    return set(SafeReader(str(path)).read_metadata().state_dict_metadata)


def _present_callbacks(states: Mapping[str, Stateful], path: Path) -> dict[str, Stateful]:
    """`states` less the callbacks the checkpoint holds nothing of: a callback enabled on resume (a spike guard,
    a new method) starts fresh instead of failing the resume with a missing key."""
    stored = stored_keys(path)
    out = {}
    for key, state in states.items():
        if key.startswith("callbacks.") and not any(k == key or k.startswith(key + ".") for k in stored):
            log.warning("%s holds no state for %s (not enabled when it was written): it starts fresh", path, key)
            continue
        out[key] = state
    return out


def raise_on_any_rank(error: BaseException | None, what: str) -> None:
    """Collective: when `what` failed on any rank, every rank raises (the failing one its own error, naming the
    file), so no rank waits in a barrier until the collective timeout for one that gave up."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = torch.zeros(world)
    flags[_rank()] = float(error is not None)
    if world > 1:
        dist.all_reduce(flags)
    if error is not None:
        raise error
    if flags.any():
        raise CheckpointError(f"{what} failed on rank {int(flags.nonzero()[0])} (its log names the file)")


def verify_shared(path: Path) -> dict[str, Any]:
    """`verify` with the checksumming split over the ranks (collective); if any rank finds a fault, every rank
    raises, the finder with the file named."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    error, meta = None, {}
    try:
        meta = verify(path, (_rank(), world))
    except CheckpointError as exc:
        error = exc
    raise_on_any_rank(error, f"checkpoint {path}: verification")
    return meta


def swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is renamed aside first and deleted only after the new one
    is in, so at every instant one complete copy of the step is on disk under a name recover_swaps knows."""
    aside = final.with_name(final.name + ASIDE)
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        final.rename(aside)
        _sync_dir(final.parent)
    tmp.rename(final)
    _sync_dir(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def recover_swaps(ckpt_dir: Path) -> None:
    """Finish the swaps a kill interrupted: a step directory still aside goes back where no new one came in."""
    if not ckpt_dir.is_dir():
        return
    for aside in ckpt_dir.glob(f"step_*{ASIDE}"):
        final = aside.with_name(aside.name[: -len(ASIDE)])
        if final.exists():
            shutil.rmtree(aside)
        else:
            aside.rename(final)
            _sync_dir(ckpt_dir)
            log.warning("checkpoint: restored %s, set aside by a re-save that did not finish", final)


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Read only the model weights of a checkpoint into a plain (unsharded) model, in this process. A tied
    weight is read under its first name only: DeepSpeed checkpoints hold it once, native ones under both."""
    full = model.state_dict()
    first: dict[int, str] = {}
    for name, tensor in full.items():
        first.setdefault(tensor.data_ptr(), name)
    state = {ENGINE: {"model": {name: full[name] for name in first.values()}}}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        read_state(state, path, "model weights", no_dist=True)
    loaded = state[ENGINE]["model"]
    model.load_state_dict({name: loaded[first[tensor.data_ptr()]] for name, tensor in full.items()})
