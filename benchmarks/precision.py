"""Step time and memory of the precision variants on one model: fp32, bf16 (autocast), bf16_params (bf16 weights,
fp32 masters), FP8 recipes (torchao), MXFP8 emulation and simulated ExMy formats.

Each variant is the native engine built from the same config plus its precision overrides (the trainer's build
path: converters on the meta model, then parallelise), training on the same synthetic batches.

- CPU (default): every variant's engine is built first, then the variants take turns, one optimizer step each,
  for `--repeats` rounds (interleaved, so a neighbour job slowing the machine hits all variants alike). A step is
  timed as *process CPU time* on one thread; each round gives a ratio to the baseline (fp32), reported as the
  median with its range. Memory: the bytes of parameters + optimizer state (+ fp32 masters) the engine holds,
  and each variant's peak RSS measured in a fresh subprocess (`--rss`).
  **CPU numbers are not GPU numbers**: this CPU has no bf16 or fp8 GEMM units, so bf16 and fp8 emulate in fp32
  and run *slower* than fp32; the CPU table shows that every path trains and what it costs here, nothing more.
- GPU (`train.device` cuda): variants run one after another (a 1B model per variant does not fit many times),
  with warm-up steps, timed by CUDA-synchronised wall time; memory is torch's peak allocation per step. The
  baseline is bf16_params; the bar for FP8 at 1B is >= 1.3x its step rate (torch.compile on, as torchao's FP8
  needs fused casts):

    OMP_NUM_THREADS=1 python benchmarks/precision.py                       # CPU, small model, ~2 min
    python benchmarks/precision.py --model 1b --compile --steps 20         # one GPU (H100/H200), ~10 min

Writes benchmarks/out/precision.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exatrain.bench.flops import flops_per_token
from exatrain.bench.peak import peak_tflops
from exatrain.config import load_config
from exatrain.data.batch import Batch, split_micro
from exatrain.engine import build_engine
from exatrain.engine.base import local
from exatrain.model.llama import build_model
from exatrain.parallel import ParallelDims

OUT = Path(__file__).resolve().parent / "out"

MODELS = {  # name -> overrides
    "small": ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_hidden=768",
              "model.vocab_size=4096", "model.max_seq_len=256", "data.seq_len=256", "train.global_batch=4",
              "train.micro_batch=4"],
    # Llama-3.2-1B shape (vocab 32K instead of 128K): 1.0B parameters with the untied head
    "1b": ["model.dim=2048", "model.n_layers=16", "model.n_heads=32", "model.n_kv_heads=8", "model.ffn_hidden=8192",
           "model.vocab_size=32768", "model.max_seq_len=2048", "data.seq_len=2048", "train.global_batch=4",
           "train.micro_batch=2", "model.tie_embeddings=false"],
}
FP8 = "precision.gemm=fp8"
SIM = ["precision.gemm=simulated", "precision.simulated.rounding=truncate"]
VARIANTS = {  # name -> (overrides, runs on: cpu / gpu defaults)
    "fp32": ([], "cpu gpu"),
    "bf16": (["train.dtype=bf16"], "cpu gpu"),
    "bf16_params": (["train.dtype=bf16_params"], "cpu gpu"),
    "fp8_tensorwise": ([FP8], "cpu"),
    "fp8_rowwise": ([FP8, "precision.fp8.recipe=rowwise"], "cpu"),
    "fp8_rowwise_gw_hp": ([FP8, "precision.fp8.recipe=rowwise_with_gw_hp"], "cpu"),
    "fp8_tensorwise_bf16": ([FP8, "train.dtype=bf16_params"], "cpu gpu"),
    "fp8_rowwise_bf16": ([FP8, "precision.fp8.recipe=rowwise", "train.dtype=bf16_params"], "gpu"),
    "mxfp8_emulated": (["precision.gemm=mxfp8"], "cpu"),
    "simulated_e8m3": ([*SIM, "precision.simulated.format=e8m3"], "cpu"),
    "simulated_e4m3": ([*SIM, "precision.simulated.format=e4m3"], "cpu"),
}


def make(model: str, variant: str, extra: list[str], device: str):
    cfg = load_config("tiny.yaml", [*MODELS[model], *VARIANTS[variant][0], *extra, f"train.device={device}",
                                    "metrics.tensorboard=false"])
    dims = ParallelDims.from_config(cfg, 1)
    mesh = dims.build_mesh(device)
    return cfg, build_engine(build_model(cfg.model), cfg, dims, mesh, device)


def batches(cfg, n: int, seed: int = 0) -> list[list[Batch]]:
    """`n` global batches of random tokens, each split into the config's micro-batches."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        tokens = torch.randint(0, V, (B, T + 1), generator=g)
        out.append(split_micro(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), None, None),
                               cfg.train.micro_batch))
    return out


def state_bytes(engine) -> int:
    """Parameters + optimizer state (+ ZeRO-1 fp32 masters) this rank holds."""
    total = sum(local(p).numel() * local(p).element_size() for part in engine.model_parts for p in part.parameters())
    for opt in engine.optimizers:
        torch_opt = opt.optimizer
        for st in torch_opt.state.values():
            total += sum(local(v).numel() * local(v).element_size() for v in st.values() if isinstance(v, torch.Tensor))
        total += sum(m.numel() * m.element_size() for m in getattr(opt, "masters", {}).values())
    return total


def step(engine, cfg, micro: list[Batch], device: torch.device) -> float:
    """One optimizer step; seconds of process CPU time (CPU) or synchronised wall time (GPU)."""
    n = sum(int((b.labels != -100).sum()) for b in micro)
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.train_step(micro, n, cfg.optim.lr)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    t0 = time.process_time()
    engine.train_step(micro, n, cfg.optim.lr)
    return time.process_time() - t0


def high_water_mib() -> float:
    """This process's peak RSS (VmHWM): unlike ru_maxrss it starts afresh at exec, not at the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_of(model: str, variant: str, extra: list[str]) -> float:
    """Peak RSS (MiB) of a fresh process that builds the variant and trains 2 steps."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(REPO)!r}); import benchmarks.precision as b;"
            f"cfg, e = b.make({model!r}, {variant!r}, {extra!r}, 'cpu'); import torch;"
            "[b.step(e, cfg, m, torch.device('cpu')) for m in b.batches(cfg, 2)];"
            "print('RSS', b.high_water_mib())")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                         timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RSS")]
    return float(lines[-1].split()[1]) if lines else float("nan")


def run_cpu(args, variants: list[str]) -> dict:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    built = {v: make(args.model, v, args.overrides, "cpu") for v in variants}
    cfg0 = built[variants[0]][0]
    data = batches(cfg0, args.warmup + args.repeats)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i, b in enumerate(data):
        for v in variants:
            cfg, engine = built[v]
            t = step(engine, cfg, b, device)
            if i >= args.warmup:
                times[v].append(t)
        print(f"round {i + 1}/{len(data)}: " + ", ".join(f"{v} {times[v][-1] * 1e3:.0f} ms" for v in variants
                                                          if times[v]), flush=True)
    out = {v: {"step_s": times[v], "state_bytes": state_bytes(built[v][1])} for v in variants}
    del built
    gc.collect()
    if args.rss:
        for v in variants:
            out[v]["peak_rss_mib"] = rss_of(args.model, v, args.overrides)
    return out


def run_gpu(args, variants: list[str]) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for v in variants:
        cfg, engine = make(args.model, v, args.overrides, "cuda")
        data = batches(cfg, args.warmup + args.repeats)
        times, peaks = [], []
        for i, b in enumerate(data):
            torch.cuda.reset_peak_memory_stats(device)
            t = step(engine, cfg, b, device)
            if i >= args.warmup:
                times.append(t)
                peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        out[v] = {"step_s": times, "state_bytes": state_bytes(engine), "peak_alloc_mib": max(peaks)}
        print(f"{v}: median {statistics.median(times) * 1e3:.1f} ms, peak {max(peaks):.0f} MiB", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def summarize(args, raw: dict, baseline: str, device: torch.device) -> dict:
    cfg = load_config("tiny.yaml", [*MODELS[args.model], *args.overrides])
    tokens = cfg.train.global_batch * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    base = raw[baseline]["step_s"]
    rows = {}
    for v, r in raw.items():
        ts = r["step_s"]
        ratios = [b / t for b, t in zip(base, ts)] if device.type == "cpu" else [statistics.median(base) / t for t in ts]
        med = statistics.median(ts)
        rows[v] = {**r, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                   "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                   "tokens_per_s": tokens / med, "tflops": tokens * fpt / med / 1e12}
    params = sum(p.numel() for p in build_model(cfg.model).parameters())
    peaks = {}
    if device.type == "cuda":
        peaks = {k: peak_tflops(device, k).tflops for k in ("bf16", "fp8")}
        for r in rows.values():
            r["mfu_bf16_peak"] = r["tflops"] / peaks["bf16"] if peaks["bf16"] else None
    return {"model": args.model, "params": params, "tokens_per_step": tokens, "baseline": baseline,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__, "repeats": args.repeats, "warmup": args.warmup, "overrides": args.overrides,
            "peaks_tflops": peaks, "rows": rows}


def markdown(s: dict) -> str:
    gpu = bool(s["peaks_tflops"])
    head = (f"Model `{s['model']}` ({s['params'] / 1e6:.1f}M parameters), {s['tokens_per_step']} tokens per step, "
            f"{s['device']}, torch {s['torch']}; {s['repeats']} timed steps per variant after {s['warmup']} warm-up "
            f"({'CUDA-synchronised wall time, variants one after another' if gpu else 'process CPU time, 1 thread, variants interleaved step by step'}). "
            f"Speed-up = {s['baseline']} step time / variant step time, median (range) over "
            f"{'steps' if gpu else 'rounds'}.")
    mem = "peak alloc (MiB)" if gpu else "peak RSS (MiB)"
    lines = [head, "", (f"| variant | step (ms), median [min–max] | speed-up vs {s['baseline']} | tokens/s | "
             f"params + optimizer state (MiB) | {mem} |"), "|---|---:|---:|---:|---:|---:|"]
    for v, r in s["rows"].items():
        peak = r.get("peak_alloc_mib", r.get("peak_rss_mib"))
        lines.append(f"| {v} | {r['median_ms']:.1f} [{r['min_ms']:.1f}–{r['max_ms']:.1f}] | "
                     f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) | {r['tokens_per_s']:,.0f} | "
                     f"{r['state_bytes'] / 2**20:,.1f} | {'–' if peak is None else f'{peak:,.0f}'} |")
    if not gpu:
        lines += ["", ("CPU numbers are not GPU numbers: this CPU has no bf16/fp8 GEMM units, so those paths emulate and "
                  "run slower than fp32 here. On a GPU node `python benchmarks/precision.py --model 1b --compile` "
                  "gives the real comparison (bar: FP8 >= 1.3x bf16_params at 1B).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--variants", nargs="+", default=None, help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="train.compile=true (GPU FP8 needs it for speed)")
    ap.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                    help="CPU: peak RSS of each variant in a fresh subprocess")
    ap.add_argument("--out", default="precision", help="file stem under benchmarks/out/")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = ap.parse_args(argv)
    if args.compile:
        args.overrides = [*args.overrides, "train.compile=true"]
    gpu = torch.cuda.is_available()
    kind = "gpu" if gpu else "cpu"
    variants = args.variants or [v for v, (_, where) in VARIANTS.items() if kind in where.split()]
    baseline = "bf16_params" if gpu and "bf16_params" in variants else variants[0]
    raw = run_gpu(args, variants) if gpu else run_cpu(args, variants)
    summary = summarize(args, raw, baseline, torch.device("cuda" if gpu else "cpu"))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    (OUT / f"{args.out}.md").write_text(md)
    print(md)
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
