"""Launch configurations of the S2 Triton kernels, per GPU backend, kernel and dtype.

The kernel tile (rows of queries or keys one program holds) is independent of the pattern's block size: a
program walks a block in tiles, so a large pattern block does not force a large register tile. The tiles
and warp counts below are the ones that compile without register spills (benchmarks/s2_triton_spills.py
compiles every candidate ahead of time for gfx90a, gfx942 and sm_90 and reports spills, registers and
shared memory; its table is in benchmarks/RESULTS.md). On gfx90a the bf16 head-dim-128 dK/dV kernel with
tiles as large as the pattern block spills 5 VGPRs at block 64 and 904 at block 128; 64 x 32 tiles hold it
in 325 of the 512 registers. `waves_per_eu` is an AMD occupancy hint (0: the compiler's choice); asking for
2 waves caps a wave at 256 registers, which is where most spills in the sweep come from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    tile_m: int  # query rows per tile
    tile_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    waves_per_eu: int = 0  # HIP only

    def kernel_args(self, block_size: int) -> dict[str, int]:
        """The tile constexprs; a tile never exceeds the pattern block (both are powers of two, so it divides it)."""
        return dict(TILE_M=min(self.tile_m, block_size), TILE_N=min(self.tile_n, block_size))

    def compile_options(self, backend: str) -> dict[str, int]:
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if backend == "hip" and self.waves_per_eu:
            options["waves_per_eu"] = self.waves_per_eu
        return options


# (backend, kernel, bytes per element) -> ((head dim bound, config), ...): the first row whose bound is >= the head
# dim applies. "bwd" covers both backward kernels (dK/dV and dQ), which hold the same tiles. All rows compile
# without spills on their targets (gfx90a and gfx942 for hip, sm_90 for cuda; benchmarks/RESULTS.md).
_CONFIGS: dict[tuple[str, str, int], tuple[tuple[int, LaunchConfig], ...]] = {
    ("hip", "fwd", 2): ((128, LaunchConfig(64, 32, 4, 1, 2)),),
    ("hip", "bwd", 2): ((64, LaunchConfig(64, 32, 4, 1, 2)), (128, LaunchConfig(64, 32, 4, 1, 1))),
    ("cuda", "fwd", 2): ((128, LaunchConfig(64, 64, 4, 2)),),
    ("cuda", "bwd", 2): ((64, LaunchConfig(64, 64, 4, 1)), (128, LaunchConfig(64, 32, 8, 1))),
}
# Outside the table: fp32 (GPU configs reject it for s2; tests run it in the interpreter) and head dims
# above 128, not in the sweep: tiles small enough that the 128-wide ones use under a third of the registers.
_FALLBACK = LaunchConfig(16, 16, 4, 1)
_forced: LaunchConfig | None = None


def backend_of(x: torch.Tensor) -> str:
    """"hip" on ROCm, else "cuda" (also for CPU tensors under the Triton interpreter)."""
    return "hip" if torch.version.hip is not None and x.is_cuda else "cuda"


def launch_config(backend: str, kernel: str, dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    """The spill-free configuration of `kernel` ("fwd" or "bwd") for this backend, dtype and head dim."""
    if _forced is not None:
        return _forced
    for bound, cfg in _CONFIGS.get((backend, kernel, dtype.itemsize), ()):
        if head_dim <= bound:
            return cfg
    return _FALLBACK


@contextmanager
def force_config(cfg: LaunchConfig | None) -> Iterator[None]:
    """Launch every S2 kernel with `cfg` inside the block (tests: tiles smaller than the pattern block)."""
    global _forced
    previous, _forced = _forced, cfg
    try:
        yield
    finally:
        _forced = previous
