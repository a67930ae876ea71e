"""Register spills of the S2 Triton kernels per GPU target, compiled ahead of time (no GPU needed).

Triton compiles for a target it is not running on: `triton.compile(ASTSource(...), target=GPUTarget(...))`
gives the AMDGCN assembly (whose metadata has `.vgpr_spill_count`, `.vgpr_count` and the occupancy) or the
PTX, which the bundled ptxas assembles with `-v` to report registers and spill bytes. Shared memory (LDS) is
Triton's own `shared` metadata. For each (target, kernel, dtype, head dim, tile config) this prints one row;
"launch" marks the config exatrain.model.s2.launch picks, which must not spill or overflow shared memory.
Rows with tile = pattern block are what the kernels ran before the tile was separated from the block.

    python benchmarks/s2_triton_spills.py               # all targets, about 15 minutes on one core
    python benchmarks/s2_triton_spills.py --targets gfx90a --head-dims 128
Writes benchmarks/out/s2_triton_spills.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from exatrain.model.s2 import triton_kernel as tk
from exatrain.model.s2.launch import LaunchConfig, launch_config

OUT = Path(__file__).resolve().parent / "out"
TARGETS = {  # name: (target, shared memory per program in bytes)
    "gfx90a": (GPUTarget("hip", "gfx90a", 64), 65536),  # MI250X / MI250
    "gfx942": (GPUTarget("hip", "gfx942", 64), 65536),  # MI300X / MI300A
    "sm90": (GPUTarget("cuda", 90, 32), 232448),  # H100 / H200
}
KERNELS = {"fwd": tk._s2_fwd, "dkdv": tk._s2_dkdv, "dq": tk._s2_dq}
POINTERS_FP32 = {"Lse", "Delta"}
POINTERS_I64 = {"Docs"}
POINTERS_I32 = {"Phase"}
SCALARS = {"scale": "fp32", "T": "i32", "H": "i32", "G": "i32", "n_q_tiles": "i32"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def signature(kernel, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        elif name in POINTERS_FP32:
            sig[name] = "*fp32"
        elif name in POINTERS_I64:
            sig[name] = "*i64"
        elif name in POINTERS_I32:
            sig[name] = "*i32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def _ptxas(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas -v."""
    ptxas = get_ptxas(arch).path  # the ptxas Triton itself assembles this arch with
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def compile_one(target_name: str, kernel: str, dtype: str, head_dim: int, block: int, cfg: LaunchConfig) -> dict:
    target, shared_limit = TARGETS[target_name]
    constexprs = dict(D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK=block, LOCAL=16, STRIDE=8,
                      HAS_DOCS=True, **cfg.kernel_args(block))
    src = ASTSource(fn=KERNELS[kernel], signature=signature(KERNELS[kernel], dtype, constexprs), constexprs=constexprs)
    options = cfg.compile_options(target.backend)
    row = dict(target=target_name, kernel=kernel, dtype=dtype, head_dim=head_dim, block=block,
               tile_m=constexprs["TILE_M"], tile_n=constexprs["TILE_N"], **options)
    compiled = triton.compile(src, target=target, options=options)
    if target.backend == "hip":
        asm = compiled.asm["amdgcn"]
        field = {key: int(re.search(rf"\.{key}:\s+(\d+)", asm).group(1)) for key in ("vgpr_count", "vgpr_spill_count")}
        row.update(regs=field["vgpr_count"], spills=field["vgpr_spill_count"],
                   occupancy=int(re.search(r"; Occupancy: (\d+)", asm).group(1)))
    else:
        row["regs"], row["spills"] = _ptxas(compiled.asm["ptx"], target.arch)
    row["shared"] = compiled.metadata.shared
    row["fits"] = row["spills"] == 0 and row["shared"] <= shared_limit
    return row


def candidates(target: str, block: int) -> list[LaunchConfig]:
    """The tile = pattern block configs the kernels used before, and smaller tiles."""
    warps = (4,) if target.startswith("gfx") else (4, 8)
    waves = (0, 1, 2) if target.startswith("gfx") else (0,)
    tiles = [(block, block), (64, 64), (64, 32), (32, 32), (16, 16)]
    configs = []
    for tm, tn in dict.fromkeys((min(tm, block), min(tn, block)) for tm, tn in tiles):
        for w in warps:
            for wpe in waves:
                configs.append(LaunchConfig(tm, tn, w, 1, wpe))
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--block", type=int, default=64, help="pattern block size")
    ap.add_argument("--dtypes", default="bf16", help="bf16 and/or fp32 (fp32 shows why GPU S2 rejects it)")
    ap.add_argument("--out", default=str(OUT / "s2_triton_spills.json"))
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    for target in args.targets.split(","):
        for dtype in args.dtypes.split(","):
            for head_dim in map(int, args.head_dims.split(",")):
                for kernel in KERNELS:
                    chosen = launch_config(TARGETS[target][0].backend, "fwd" if kernel == "fwd" else "bwd",
                                           DTYPES[dtype], head_dim)
                    for cfg in dict.fromkeys([*candidates(target, args.block), chosen]):
                        try:
                            row = compile_one(target, kernel, dtype, head_dim, args.block, cfg)
                        except Exception as exc:  # out of resources etc.: reported, not fatal
                            row = dict(target=target, kernel=kernel, dtype=dtype, head_dim=head_dim,
                                       block=args.block, tile_m=cfg.tile_m, tile_n=cfg.tile_n,
                                       num_warps=cfg.num_warps, error=f"{type(exc).__name__}: {exc}"[:200])
                        row["launch"] = cfg == chosen
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| target | kernel | dtype | head dim | tile (q x k) | warps | waves/EU | regs | spills | shared (B) "
          "| occupancy | launch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['target']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['tile_m']}x{r['tile_n']} "
                  f"| {r['num_warps']} | | error: {r['error'][:60]} | | | | |")
            continue
        print(f"| {r['target']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['tile_m']}x{r['tile_n']} "
              f"| {r['num_warps']} | {r.get('waves_per_eu', '')} | {r['regs']} | {r['spills']} | {r['shared']} "
              f"| {r.get('occupancy', '')} | {'**yes**' if r['launch'] else ''} |")


if __name__ == "__main__":
    main()
