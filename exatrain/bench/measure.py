"""Measure what one training step really holds, to check the memory model (exatrain.bench.memory).

Two ways, same code path as the trainer (`build_engine`):
  real  tensors on CPU, in whatever process group exists (one process, or a rank under torchrun);
  fake  `FakeTensorMode` with torch's fake process group: rank 0 of a `world`-rank layout in this one
        process, every tensor shape-only, so 22B/175B/1T layers cost no memory (DESIGN.md §12).
torch's `MemTracker` counts live tensor storages (at exact sizes, not the CUDA allocator's 512-byte
blocks). Parameter, gradient and optimizer bytes are read off the tensors the optimizer owns,
as benchmarks/parallel_memory.py does.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._tools import mem_tracker
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from exatrain.bench.layout import Layout, to_config
from exatrain.config import JobConfig
from exatrain.engine import build_engine
from exatrain.engine.base import ce_sum
from exatrain.engine.native import finalize_grads
from exatrain.model.llama import Transformer, build_model
from exatrain.parallel.dims import ParallelDims

mem_tracker._PYTORCH_MIN_ALLOCATE = 1  # count bytes, not 512-byte allocator blocks


@dataclass(frozen=True)
class Measured:
    params: int
    grads: int
    optimizer: int
    activations: int  # live bytes after the first micro-batch's forward minus before it
    peak: int  # largest live total during the last step (steady state: optimizer states exist)
    phases: dict[str, dict[str, int]] | None = None  # last step: peak snapshot by category per phase


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = _local(t).untyped_storage()
        seen[id(st) if st.data_ptr() == 0 else st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """Be rank 0 of a `world`-rank process group whose collectives do nothing (torch's fake backend)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _fake_tensors() -> Iterator[None]:
    """FakeTensorMode; sub-meshes that FSDP/TP derive still compute their coordinates for real (DeviceMesh
    uses `nonzero`, which has no fake kernel)."""
    from torch._subclasses.fake_tensor import (
        FakeTensor,
        FakeTensorMode,
        unset_fake_temporarily,
    )

    original, to_empty = DeviceMesh.__init__, torch.nn.Module.to_empty

    def init(self, *args, **kwargs):
        with unset_fake_temporarily():
            original(self, *args, **kwargs)

    def fake_to_empty(self, *, device, recurse=True):
        """Modules built on fake CPU tensors are already "allocated" (FakeTensors cannot be swapped)."""
        tensors = [_local(t) for t in (*self.parameters(), *self.buffers())]
        if all(isinstance(t, FakeTensor) for t in tensors):
            return self
        return to_empty(self, device=device, recurse=recurse)

    DeviceMesh.__init__, torch.nn.Module.to_empty = init, fake_to_empty
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        DeviceMesh.__init__, torch.nn.Module.to_empty = original, to_empty


class _Tracker(mem_tracker.MemTracker):
    """MemTracker that accepts a root module running forward several times in one step (micro-batches,
    pipeline schedules): its per-module stats restart, the live and peak totals carry on."""

    def _pre_fw_hook(self, module, inputs) -> None:
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
            if parents == {"Global"}:
                del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)


def _phase_peak(tracker: mem_tracker.MemTracker) -> dict[str, int]:
    """The peak snapshot since the last call (by category), then restart the peak."""
    snap = {str(k.value) if hasattr(k, "value") else str(k): int(v)
            for dev in tracker.get_tracker_snapshot("peak").values() for k, v in dev.items()}
    tracker._peak_mem, tracker._peak_mem_snap = {}, {}
    tracker._update_peak_stats(mem_tracker._ModState.PEAK_FW)
    return snap


def _total(tracker: mem_tracker.MemTracker, which: str) -> int:
    return int(sum(d["Total"] for d in tracker.get_tracker_snapshot(which).values()))


def measure_step(cfg: JobConfig, layout: Layout, fake: bool = False, steps: int = 2) -> Measured:
    """Build the engine for `layout` in the current process group and run `steps` optimizer steps of this
    rank's share of the global batch; `fake`: shapes only (run inside `fake_world`). No pipeline
    parallelism here (its schedule runs forward and backward together: see `measure_schedule_peak`);
    gradient clipping is skipped (it needs values)."""
    if layout.pp > 1:
        raise ValueError("measure_step runs one stage without a schedule; use pp=1 layouts")
    cfg = to_config(cfg, layout)
    if fake:
        cfg.parallel.init = "sharded"  # the full single-process init swaps real tensors in
    dims = ParallelDims.from_config(cfg, layout.world)
    mesh = dims.build_mesh("cpu")
    with _fake_tensors() if fake else contextlib.nullcontext():
        # fake: build on fake CPU tensors, not meta (meta params that FakeTensorMode has seen cannot be swapped)
        model = Transformer(cfg.model) if fake else build_model(cfg.model)
        return _measure(cfg, layout, build_engine(model, cfg, dims, mesh, "cpu"), steps)


def _torch_optimizers(engine) -> list[torch.optim.Optimizer]:
    return [opt.optimizer for opt in engine.optimizers]


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """Optimizer state plus ZeRO-1's fp32 master slices (what benchmarks/parallel_memory.py counts)."""
    states = [v for opt in _torch_optimizers(engine) for st in opt.state.values() for v in st.values()
              if torch.is_tensor(v) and v.numel() > 1]
    return states + [m for opt in engine.optimizers for m in getattr(opt, "masters", {}).values()]


def live_tensors(engine) -> list[torch.Tensor]:
    """What an engine holds between steps (parameters, buffers, gradients, optimizer state): the tensors a
    LiveBytes tracker starts from. DeepSpeed keeps its own state, counted from the first op that touches it."""
    tensors = [t for part in engine.model_parts for t in (*part.parameters(), *part.buffers())]
    tensors += [p.grad for p in tensors if p.grad is not None]
    if hasattr(engine, "optimizers"):
        tensors += _optimizer_tensors(engine)
    return tensors


def _measure(cfg: JobConfig, layout: Layout, engine, steps: int) -> Measured:
    """The engine's own step, phase by phase: forward/backward per micro-batch, then its optimizer
    strategy's reduce (ZeRO-1's reduce-scatter), step and zero."""
    part = engine.model_parts[0]
    n_micro = layout.microbatches(cfg.train.global_batch)
    tokens = torch.randint(0, cfg.model.vocab_size, (layout.micro_batch, cfg.data.seq_len))
    positions = torch.arange(cfg.data.seq_len).expand_as(tokens)
    tracker = _Tracker()
    tracker.track_external(part, *_torch_optimizers(engine))
    activations, peak, phases = 0, 0, {}
    with tracker:
        for step in range(steps):
            last = step == steps - 1
            if last:
                _phase_peak(tracker)  # the first step's lazy optimizer-state creation is not steady state
            with engine._context():
                for i in range(n_micro):
                    before = _total(tracker, "current")
                    loss = ce_sum(part(tokens, positions=positions), tokens) / tokens.numel()
                    if step == 0 and i == 0:
                        activations = _total(tracker, "current") - before
                    loss.backward()
                    del loss
            finalize_grads([part])
            if last:
                phases["forward/backward"] = _phase_peak(tracker)
                peak = phases["forward/backward"]["Total"]
                grads = [p.grad for p in part.parameters() if p.grad is not None]
                grad_bytes = _nbytes(grads)
                del grads
            for opt in engine.optimizers:
                opt.reduce_grads()
            if last:
                phases["reduce"] = _phase_peak(tracker)
                peak = max(peak, phases["reduce"]["Total"])
                masters = [m.grad for opt in engine.optimizers for m in getattr(opt, "masters", {}).values()
                           if m.grad is not None]
                grad_bytes = max(grad_bytes, _nbytes(masters))
                del masters
            for opt in engine.optimizers:
                opt.step(cfg.optim.lr)
                if not last:
                    opt.zero_grad()
            if last:
                phases["optimizer"] = _phase_peak(tracker)
                peak = max(peak, phases["optimizer"]["Total"])
    params = [p for p in part.parameters()]
    return Measured(_nbytes(params), grad_bytes, _nbytes(_optimizer_tensors(engine)), activations, peak, phases)


class LiveBytes(TorchDispatchMode):
    """Current and peak bytes of live tensor storages, from every op output plus the tensors it starts
    with. No module hooks, so unlike MemTracker it runs under pipelining's `torch.autograd.grad`
    backward; storages resized in place (how FSDP2 frees and refills its buffers) are followed."""

    def __init__(self, tensors) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0
        self._resize = torch.UntypedStorage.resize_
        for t in tensors:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        for st in get_untyped_storages(t):
            key = st._cdata
            if key not in self.sizes:
                self.sizes[key] = st.nbytes()
                self.current += st.nbytes()
                weakref.finalize(st, self._free, key)
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)

    def __enter__(self):
        orig = self._resize

        def resize_(st, size):
            orig(st, size)
            key = st._cdata
            if key not in self.sizes:  # e.g. FSDP2's unsharded parameters, created empty before we started
                self.sizes[key] = 0
                weakref.finalize(st, self._free, key)
            self.current += st.nbytes() - self.sizes[key]
            self.sizes[key] = st.nbytes()
            self.peak = max(self.peak, self.current)

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into local ops first
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def measure_schedule_peak(engine, micro_batches, n_labels: int) -> tuple[Measured, int]:
    """Peak live bytes of one real `engine.train_step` (any layout, pipeline schedules included) on this
    rank, with the state sizes after it; returns (measurement, peak)."""
    tracker = LiveBytes(live_tensors(engine))
    with tracker:
        engine.train_step(micro_batches, n_labels, engine.cfg.optim.lr)
    params = [p for part in engine.model_parts for p in part.parameters()]
    return Measured(_nbytes(params), 0, _nbytes(_optimizer_tensors(engine)), 0, tracker.peak), tracker.peak
