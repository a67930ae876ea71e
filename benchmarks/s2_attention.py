"""S2-Attention forward+backward time vs dense attention, against the pattern's FLOP reduction.

For each sequence length: the fast S2 path the model would pick on this device (block-sparse on
CPU, Triton on GPU) vs dense causal attention (SDPA on CPU; flash-attn on GPU when installed,
else SDPA), one forward + backward each. The theoretical speed-up is 1 / attended fraction of the
causal block pairs; efficiency = measured / theoretical. Also the decode-time KV cache of an S2
layer vs a dense one.

CPU timing is process CPU time with one thread by default: on a shared machine wall time mostly
measures the neighbours, while one thread's CPU time is what the work costs. Runs of the two
implementations are interleaved and the best of `--reps` kept (one rep from 32K on, where a
dense fwd+bwd takes minutes on one core).

    python benchmarks/s2_attention.py                       # CPU: 2K..32K
    python benchmarks/s2_attention.py --lengths 2048,4096   # quick
Writes benchmarks/out/s2_attention.json and .png, and prints a Markdown section for RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from exatrain.model.s2 import S2Attention, select_impl
from exatrain.model.s2.kv_cache import cache_tokens
from exatrain.model.s2.pattern import S2Pattern

OUT = Path(__file__).resolve().parent / "out"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({torch.backends.cpu.get_cpu_capability()})"
    return platform.processor() or "cpu"


def dense_attention(device: torch.device):
    """flash-attn 2 on GPU when installed, else SDPA (its fused flash kernel on CPU and GPU)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func

        return "flash-attn", lambda q, k, v, s: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), softmax_scale=s,
                                                               causal=True).transpose(1, 2)
    return "sdpa", lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)


def timed(fn, q, k, v, grad, device) -> tuple[float, float]:
    """(forward, backward) seconds: CUDA events on GPU, process CPU time on CPU."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if device.type == "cuda":
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        out = fn(q, k, v)
        mid.record()
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3
    t0 = time.process_time()
    out = fn(q, k, v)
    t1 = time.process_time()
    out.backward(grad)
    return t1 - t0, time.process_time() - t1


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pattern = S2Pattern(args.block_size, args.local_blocks, args.vert_stride, args.heads)
    s2 = S2Attention(pattern)
    dense_name, dense = dense_attention(device)
    scale = args.head_dim ** -0.5
    fns = {"s2": lambda q, k, v: s2(q, k, v, doc_ids=None, scale=scale, head_offset=0),
           "dense": lambda q, k, v: dense(q, k, v, scale)}
    rows = []
    warm = torch.randn(1, args.heads, min(args.lengths), args.head_dim, device=device, dtype=dtype)
    for fn in fns.values():
        timed(fn, warm, warm, warm, warm, device)  # one-time setup (allocator, kernel selection) outside timings
    for T in args.lengths:
        g = torch.Generator(device=device).manual_seed(T)
        q, k, v, grad = (torch.randn(1, args.heads, T, args.head_dim, generator=g, device=device, dtype=dtype)
                         for _ in range(4))
        if device.type == "cuda":
            for fn in fns.values():
                timed(fn, q, k, v, grad, device)  # compile / autotune outside the timing
        best: dict[str, tuple[float, float]] = {}
        for _ in range(1 if T >= 32768 and device.type == "cpu" else args.reps):
            for name, fn in fns.items():
                t = timed(fn, q, k, v, grad, device)
                if name not in best or sum(t) < sum(best[name]):
                    best[name] = t
        frac = pattern.attended_fraction(T)
        speedup = sum(best["dense"]) / sum(best["s2"])
        rows.append({"seq_len": T, "attended_fraction": frac, "theoretical_speedup": 1 / frac,
                     "s2_fwd_s": best["s2"][0], "s2_bwd_s": best["s2"][1],
                     "dense_fwd_s": best["dense"][0], "dense_bwd_s": best["dense"][1],
                     "speedup": speedup, "fwd_speedup": best["dense"][0] / best["s2"][0],
                     "efficiency": speedup * frac, "kv_cache_fraction": cache_tokens(pattern, T) / T})
        print(_row(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "s2_impl": select_impl(device),
            "dense_impl": dense_name, "dtype": str(dtype).removeprefix("torch."),
            "timing": "CUDA events" if device.type == "cuda" else "process CPU time",
            "shape": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim},
            "pattern": {"block_size": args.block_size, "local_blocks": args.local_blocks,
                        "vert_stride": args.vert_stride}, "rows": rows}


HEADER = ("| length | dense fwd+bwd (ms) | S2 fwd+bwd (ms) | measured speed-up (fwd only) | theoretical | efficiency "
          "| KV cache S2 / dense |\n|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    dense, s2 = 1e3 * (r["dense_fwd_s"] + r["dense_bwd_s"]), 1e3 * (r["s2_fwd_s"] + r["s2_bwd_s"])
    return (f"| {r['seq_len'] // 1024}K | {dense:,.0f} | {s2:,.0f} | {r['speedup']:.2f}x ({r['fwd_speedup']:.2f}x) "
            f"| {r['theoretical_speedup']:.2f}x | {r['efficiency']:.0%} | {r['kv_cache_fraction']:.1%} |")


def markdown(res: dict) -> str:
    p, s = res["pattern"], res["shape"]
    kv_mib = 2 * s["heads"] * s["head_dim"] * 2 / 2**20  # K and V, all heads, bf16: MiB per token and layer
    lines = [f"### S2-Attention vs dense ({res['device']}, {res['threads']} thread(s), torch {res['torch']})", "",
             f"S2 `{res['s2_impl']}` vs dense `{res['dense_impl']}`, {res['dtype']}, batch 1, {s['heads']} heads, "
             f"head dim {s['head_dim']}; pattern block {p['block_size']}, local {p['local_blocks']} blocks, "
             f"stride {p['vert_stride']}. One forward + backward, best of the reps, {res['timing']}. "
             "Theoretical speed-up = 1 / attended fraction of the causal block pairs; efficiency = measured / "
             "theoretical. KV cache = what a decoding S2 layer keeps / a dense layer's cache.", "", HEADER]
    lines += [_row(r) for r in res["rows"]]
    lines += ["", f"Decode-time KV cache of one layer ({s['heads']} KV heads, head dim {s['head_dim']}, bf16):", "",
              "| length | dense (MiB) | S2 (MiB) | S2 / dense |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seq_len'] // 1024}K | {r['seq_len'] * kv_mib:.1f} | {r['seq_len'] * r['kv_cache_fraction'] * kv_mib:.1f} "
              f"| {r['kv_cache_fraction']:.1%} |" for r in res["rows"]]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    x = [r["seq_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["theoretical_speedup"] for r in rows], "k--", marker="o", label="theoretical (FLOP ratio)")
    ax.plot(x, [r["speedup"] for r in rows], marker="s", label=f"measured fwd+bwd vs {res['dense_impl']}")
    ax.plot(x, [r["fwd_speedup"] for r in rows], marker="^", alpha=0.6, label="measured fwd only")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speed-up over dense")
    ax.set_title(f"S2-Attention ({res['s2_impl']}) on {res['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_pattern_arguments(parser: argparse.ArgumentParser, lengths: str) -> None:
    """The attention shape, S2 pattern and repeats of the S2 benchmarks (this one and s2_cpu_breakdown.py)."""
    parser.add_argument("--lengths", default=lengths, type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pattern_arguments(parser, "2048,4096,8192,16384,32768")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is exact only for 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=OUT / "s2_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(HEADER, flush=True)
    res = bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    plot(res, args.out.with_suffix(".png"))
    print("\n" + markdown(res))


if __name__ == "__main__":
    main()
