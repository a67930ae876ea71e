"""Everything GPU-only, checked and timed in one go on a single GPU, in under 10 minutes (benchmarks/gpu_check.sh).

    bash benchmarks/gpu_check.sh            # on a GPU node: prints one table for benchmarks/RESULTS.md
    bash benchmarks/gpu_check.sh --dry      # on CPU: tiny sizes, every step's code path (tests/test_gpu_check.py)

Checks, each a row of the table (ok / FAIL / skip, with its numbers):
  s2_triton       the Triton S2 kernels' forward and backward vs the fp32 reference, bf16, packed documents
  s2_speed        S2 (the path the model picks) vs dense (flash-attn, else SDPA) fwd+bwd at 8K, 16K, 32K
  flash_numerics  flash-attn (varlen, document masking) and SDPA vs the fp32 reference, bf16
  train_bf16      a small model trains in bf16: finite, falling loss
  train_fp8       the same with FP8 GEMMs (torchao; MXFP8 emulated, fp32, in --dry); skipped where the GPU has no FP8
  mfu_1b          tokens/s and MFU of a ~1B Llama (dim 2048, 20 layers, seq 2048, bf16 autocast) over a few steps
Writes the results as JSON (--out) too. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s2_attention import dense_attention, timed  # noqa: E402

from exatrain.config import load_config  # noqa: E402
from exatrain.model.attention import flash_attention, reference_attention, sdpa_attention  # noqa: E402
from exatrain.model.s2 import S2Attention, select_impl  # noqa: E402
from exatrain.model.s2.pattern import S2Pattern  # noqa: E402
from exatrain.model.s2.reference import reference_s2_attention  # noqa: E402
from exatrain.train.trainer import train  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "gpu_check.json"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / (1 + ref.float().abs().max())).item()


def qkv(B, H, Hkv, T, D, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, grad = (torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, T, D, generator=g, device=device, dtype=dtype) for _ in range(2))
    docs = torch.cumsum(torch.rand(B, T, generator=g, device=device) < 4 / T, 1)
    return q, k, v, grad, docs


def fwd_bwd(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def check_s2_triton(a) -> tuple[str, str, dict]:
    from exatrain.model.s2.triton_kernel import triton_attention

    T = 256 if a.dry else 4096
    pattern = S2Pattern(block_size=16 if a.dry else 64, local_blocks=4, vert_stride=4, n_heads=8, n_kv_heads=4)
    q, k, v, grad, docs = qkv(1, 8, 4, T, 64, a.device, a.dtype)
    kw = {"doc_ids": docs, "scale": 0.125, "head_offset": 0}
    ref = fwd_bwd(lambda q, k, v: reference_s2_attention(q.float(), k.float(), v.float(), pattern, **kw), q, k, v,
                  grad.float())
    got = fwd_bwd(lambda q, k, v: triton_attention(q, k, v, pattern, **kw), q, k, v, grad)
    errs = dict(zip(("out", "dq", "dk", "dv"), (rel_err(g, r) for g, r in zip(got, ref))))
    tol = 3e-2 if a.dtype == torch.bfloat16 else 1e-3
    ok = all(e < tol for e in errs.values())
    return ("ok" if ok else "FAIL", f"T={T}, max rel. err " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
            + f" (tol {tol:g})", errs)


def check_s2_speed(a) -> tuple[str, str, dict]:
    lengths = [256, 512] if a.dry else [8192, 16384, 32768]
    pattern = S2Pattern(block_size=16 if a.dry else 64, local_blocks=4 if a.dry else 16, vert_stride=8, n_heads=16)
    s2, (dense_name, dense) = S2Attention(pattern), dense_attention(a.device)
    scale = 128 ** -0.5
    fns = {"s2": lambda q, k, v: s2(q, k, v, doc_ids=None, scale=scale, head_offset=0),
           "dense": lambda q, k, v: dense(q, k, v, scale)}
    rows = {}
    for T in lengths:
        q, k, v, grad, _ = qkv(1, 16, 16, T, 128, a.device, a.dtype, seed=T)
        best = {}
        for name, fn in fns.items():
            timed(fn, q, k, v, grad, a.device)  # compile / autotune outside the timing
            best[name] = min(sum(timed(fn, q, k, v, grad, a.device)) for _ in range(a.reps))
        rows[T] = {"s2_ms": 1e3 * best["s2"], "dense_ms": 1e3 * best["dense"], "speedup": best["dense"] / best["s2"],
                   "theoretical": 1 / pattern.attended_fraction(T)}
    text = f"S2 `{select_impl(a.device)}` vs `{dense_name}`: " + ", ".join(
        f"{T // 1024 or T}{'K' if T >= 1024 else ''} {r['speedup']:.2f}x (ideal {r['theoretical']:.1f}x)"
        for T, r in rows.items())
    return "ok", text, rows


def check_flash_numerics(a) -> tuple[str, str, dict]:
    T = 256 if a.dry else 4096
    q, k, v, grad, docs = qkv(2, 8, 4, T, 64, a.device, a.dtype)
    kw = {"doc_ids": docs, "scale": 0.125, "head_offset": 0}
    ref = fwd_bwd(lambda q, k, v: reference_attention(q.float(), k.float(), v.float(), **kw), q, k, v, grad.float())
    errs = {"sdpa": max(rel_err(g, r) for g, r in zip(fwd_bwd(lambda q, k, v: sdpa_attention(q, k, v, **kw),
                                                              q, k, v, grad), ref))}
    has_flash = a.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if has_flash:
        errs["flash"] = max(rel_err(g, r) for g, r in zip(fwd_bwd(lambda q, k, v: flash_attention(q, k, v, **kw),
                                                                  q, k, v, grad), ref))
    tol = 3e-2 if a.dtype == torch.bfloat16 else 1e-3
    status = "ok" if all(e < tol for e in errs.values()) else "FAIL"
    note = "" if has_flash else " (flash-attn not installed or no GPU: SDPA only)"
    return status, f"{int(docs.max()) + 1} docs/row, max rel. err " + ", ".join(
        f"{n} {e:.1e}" for n, e in errs.items()) + f" (tol {tol:g}){note}", errs


def run_training(a, name: str, overrides: list[str]) -> list[dict]:
    run_dir = Path(a.workdir) / name
    cfg = load_config("tiny.yaml", [f"run_dir={run_dir}", "checkpoint.every=0", "checkpoint.save_final=false",
                                    "train.eval_every=0", "train.eval_batches=1", "metrics.tensorboard=false",
                                    "metrics.progress_bar=false", "metrics.log_every=1", "launch.stop_margin=0",
                                    *(["metrics.peak_tflops=1"] if a.dry else []), *overrides])
    train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind", "train") == "train" and "loss" in r]


def small_model(a) -> list[str]:
    dims = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "data.seq_len=64", "model.max_seq_len=64"] \
        if a.dry else ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "data.seq_len=1024",
                       "model.max_seq_len=1024"]
    return [*dims, "model.n_kv_heads=0", "train.steps=20", "train.global_batch=8", "train.micro_batch=8",
            "optim.lr=3e-3", "schedule.warmup_steps=2", f"train.device={a.device.type}"]


def check_training(a, name: str, extra: list[str], dtype: str = "bf16") -> tuple[str, str, dict]:
    recs = run_training(a, name, [*small_model(a), f"train.dtype={dtype}", *extra])
    first, last = recs[0]["loss"], recs[-1]["loss"]
    ok = all(math.isfinite(r["loss"]) for r in recs) and last < first
    return ("ok" if ok else "FAIL", f"loss {first:.3f} -> {last:.3f} in {len(recs)} steps",
            {"first": first, "last": last})


def fp8_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return any(arch in torch.cuda.get_device_properties(device).gcnArchName for arch in ("gfx94", "gfx95"))
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8(a) -> tuple[str, str, dict]:
    if a.dry:
        return check_training(a, "fp8", ["precision.gemm=mxfp8"], "fp32")  # the emulated recipe runs in fp32 on CPU
    if not fp8_supported(a.device):
        return "skip", "this GPU has no FP8 GEMMs (needs sm_89+ or MI300)", {}
    return check_training(a, "fp8", ["precision.gemm=fp8"])


def check_mfu(a) -> tuple[str, str, dict]:
    size = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "data.seq_len=64", "model.max_seq_len=64",
            "train.global_batch=4", "train.micro_batch=2"] if a.dry else \
        ["model.dim=2048", "model.n_layers=20", "model.n_heads=16", "data.seq_len=2048", "model.max_seq_len=2048",
         "train.global_batch=8", "train.micro_batch=4", "model.attention=" + (
             "flash" if importlib.util.find_spec("flash_attn") else "sdpa")]
    recs = run_training(a, "mfu", [*size, "model.n_kv_heads=0", "train.steps=8", "train.dtype=bf16",
                                   "schedule.warmup_steps=2", f"train.device={a.device.type}"])
    timed_recs = recs[3:]  # steps 1-3: allocator, autotuning
    tps = statistics.median(r["tokens_per_s"] for r in timed_recs)
    mfu = statistics.median(r["mfu"] for r in timed_recs)
    mem = max(r.get("peak_mem_gb", 0.0) for r in recs)
    return "ok", f"{tps:,.0f} tokens/s, MFU {mfu:.1%}, peak memory {mem:.1f} GB (median of steps 4-8)", \
        {"tokens_per_s": tps, "mfu": mfu, "peak_mem_gb": mem}


CHECKS = {"s2_triton": check_s2_triton, "s2_speed": check_s2_speed, "flash_numerics": check_flash_numerics,
          "train_bf16": lambda a: check_training(a, "bf16", []), "train_fp8": check_fp8, "mfu_1b": check_mfu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny sizes on CPU: every step's code path, no real numbers")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        p.error("no GPU visible; use --dry for the CPU walk-through")
    a.device = torch.device("cpu" if a.dry else "cuda")
    a.dtype = torch.float32 if a.dry else torch.bfloat16
    device_name = "cpu (dry run)" if a.dry else torch.cuda.get_device_name(a.device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="exatrain-gpu-check-") as workdir:
        a.workdir = workdir
        for name, check in CHECKS.items():
            if a.only and name not in a.only.split(","):
                continue
            start = time.perf_counter()
            try:
                status, text, data = check(a)
            except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others' results
                traceback.print_exc()
                status, text, data = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", {}
            results[name] = {"status": status, "result": text, "seconds": round(time.perf_counter() - start, 1),
                             "data": data}
            print(f"{name}: {status} ({results[name]['seconds']} s) {text}", file=sys.stderr, flush=True)
    version = f"torch {torch.__version__}" + (f", HIP {torch.version.hip}" if torch.version.hip else
                                              f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
    print(f"\n### GPU check: {device_name} ({version})\n\n| check | status | result | s |\n|---|---|---|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['status']} | {r['result']} | {r['seconds']:.0f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": device_name, "versions": version, "dry": a.dry, "checks": results},
                                indent=1, default=str))
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
