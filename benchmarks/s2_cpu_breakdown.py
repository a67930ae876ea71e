"""Where the CPU S2 forward+backward time goes, against the ideal of dense time x attended fraction.

benchmarks/s2_attention.py measures S2 (block-sparse path) against dense SDPA; this splits the S2 time into
ATen's fused flash kernel calls per piece kind (local band, strided prefix, masked strided tail) and the
rest (layout copies, masks, log-sum-exp merges, gradient scatter: "glue"), and counts the query-key pairs
each kind computes. With the kernel's cost per computed pair (ns/pair) equal to dense SDPA's, the
efficiency bound is attended pairs / computed pairs, less the glue share. Same method as s2_attention.py:
process CPU time, one thread, S2 and dense interleaved, best of `--reps`.

    OMP_NUM_THREADS=1 python benchmarks/s2_cpu_breakdown.py --lengths 4096,16384
Writes benchmarks/out/s2_cpu_breakdown.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from exatrain.model.s2 import S2Attention, blocksparse
from exatrain.model.s2.pattern import S2Pattern
from s2_attention import add_pattern_arguments  # benchmarks/ is on sys.path when run as a script

OUT = Path(__file__).resolve().parent / "out"


class KernelClock:
    """Wraps the two kernel ops blocksparse calls; adds process time and computed pairs per piece kind."""

    def __init__(self, pattern: S2Pattern, k: torch.Tensor):
        # Local windows are views of the front-padded K/V (N, (local_blocks - 1 + n_blocks) * block, D); strided
        # pieces view the compact strided copy, which is shorter: the storage size tells the kinds apart.
        B, U, T, D = k.shape
        bs = pattern.block_size
        self.padded_bytes = B * U * (pattern.local_blocks - 1 + -(-T // bs)) * bs * D * k.element_size()
        self.seconds: dict[str, float] = defaultdict(float)
        self.pairs: dict[str, float] = defaultdict(float)
        self.fwd, self.bwd = blocksparse._flash_fwd, blocksparse._flash_bwd

    def kind(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> str:
        if k.untyped_storage().nbytes() == self.padded_bytes:
            return "local band"
        return "strided tail (masked)" if mask is not None else "strided prefix"

    def _timed(self, step: str, op, q, k, mask, *args, **kwargs):
        t0 = time.process_time()
        out = op(*args, **kwargs)
        key = f"{step} {self.kind(q, k, mask)}"
        self.seconds[key] += time.process_time() - t0
        self.pairs[key] += q.numel() // q.shape[-1] * k.shape[-2]
        return out

    def __enter__(self):
        blocksparse._flash_fwd = lambda q, k, v, attn_mask=None, scale=None: self._timed(
            "fwd", self.fwd, q, k, attn_mask, q, k, v, attn_mask=attn_mask, scale=scale)
        blocksparse._flash_bwd = lambda do, q, k, v, o, lse, p, causal, attn_mask=None, scale=None: self._timed(
            "bwd", self.bwd, q, k, attn_mask, do, q, k, v, o, lse, p, causal, attn_mask=attn_mask, scale=scale)
        return self

    def __exit__(self, *exc):
        blocksparse._flash_fwd, blocksparse._flash_bwd = self.fwd, self.bwd


def fwd_bwd(fn, q, k, v, grad) -> float:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.process_time()
    fn(q, k, v).backward(grad)
    return time.process_time() - t0


def measure(T: int, args: argparse.Namespace) -> dict:
    pattern = S2Pattern(args.block_size, args.local_blocks, args.vert_stride, args.heads)
    s2 = S2Attention(pattern)
    scale = args.head_dim ** -0.5
    g = torch.Generator().manual_seed(T)
    q, k, v, grad = (torch.randn(1, args.heads, T, args.head_dim, generator=g) for _ in range(4))
    fns = {"s2": lambda a, b, c: s2(a, b, c, doc_ids=None, scale=scale, head_offset=0),
           "dense": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale)}
    for fn in fns.values():
        fwd_bwd(fn, q, k, v, grad)
    best: dict[str, tuple[float, KernelClock | None]] = {}
    for _ in range(args.reps):
        for name, fn in fns.items():
            clock = KernelClock(pattern, k) if name == "s2" else None
            if clock is None:
                t = fwd_bwd(fn, q, k, v, grad)
            else:
                with clock:
                    t = fwd_bwd(fn, q, k, v, grad)
            if name not in best or t < best[name][0]:
                best[name] = (t, clock)
    (s2_s, clock), dense_s = best["s2"], best["dense"][0]
    frac = pattern.attended_fraction(T)
    causal_pairs = args.heads * T * (T + 1) / 2
    kernels = {key: {"ms": 1e3 * sec, "pairs_m": clock.pairs[key] / 1e6, "ns_per_pair": 1e9 * sec / clock.pairs[key]}
               for key, sec in sorted(clock.seconds.items())}
    computed = sum(clock.pairs[key] for key in clock.pairs if key.startswith("fwd"))
    glue = s2_s - sum(clock.seconds.values())
    return {"seq_len": T, "dense_ms": 1e3 * dense_s, "dense_ns_per_causal_pair": 1e9 * dense_s / causal_pairs,
            "s2_ms": 1e3 * s2_s, "ideal_ms": 1e3 * dense_s * frac, "efficiency": dense_s * frac / s2_s,
            "attended_pairs_m": frac * causal_pairs / 1e6, "computed_pairs_m": computed / 1e6,
            "glue_ms": 1e3 * glue, "glue_share": glue / s2_s, "kernels": kernels,
            "bound_without_glue": frac * causal_pairs / computed}


def markdown(rows: list[dict]) -> str:
    lines = ["| length | dense (ms, ns/causal pair) | S2 (ms) | ideal (ms) | efficiency | computed / attended pairs "
             "| kernel ns/pair fwd+bwd: local, strided | glue (ms, share) | bound without glue |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = r["kernels"]

        def per_pair(kind: str) -> str:
            keys = [f"fwd {kind}", f"bwd {kind}"]
            return f"{sum(k[x]['ns_per_pair'] for x in keys if x in k):.1f}"

        lines.append(f"| {r['seq_len'] // 1024}K | {r['dense_ms']:,.0f} ({r['dense_ns_per_causal_pair']:.1f}) "
                     f"| {r['s2_ms']:,.0f} | {r['ideal_ms']:,.0f} | {r['efficiency']:.0%} "
                     f"| {r['computed_pairs_m']:.0f}M / {r['attended_pairs_m']:.0f}M "
                     f"| {per_pair('local band')}, {per_pair('strided prefix')} "
                     f"| {r['glue_ms']:,.0f} ({r['glue_share']:.0%}) | {r['bound_without_glue']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pattern_arguments(parser, "4096,16384")
    parser.add_argument("--out", type=Path, default=OUT / "s2_cpu_breakdown.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for T in args.lengths:
        rows.append(measure(T, args))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": 1, "rows": rows}, indent=2) + "\n")
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
