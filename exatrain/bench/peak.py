"""Peak TFLOP/s per device: the MFU denominator (DESIGN.md §3).

The denominator is always one *torch device*: on an MI250X that is one GCD (one of the package's
two dies, 191.5 of its 383 BF16 TFLOP/s), which is what the Frontier paper's per-GPU numbers are
relative to. Values are dense (no 2:4 sparsity) datasheet peaks. The "fp32" column is what a plain
fp32 GEMM can reach: CUDA cores on NVIDIA, FP32 matrix cores on AMD; on NVIDIA, when torch allows
TF32 for matmuls, the TF32 tensor-core peak is used instead. On CPU there is no datasheet to trust
(shared cores, turbo, thread count), so the peak is measured with a short GEMM probe.

Precision names: "bf16_params" (bf16 parameters with fp32 masters) computes in bf16 and uses the bf16 peak.
"fp8" is the dense FP8 tensor-core peak (H100/H200 1979, MI300X 2615; none on A100/MI250X, which then report
their bf16 peak). The trainer's MFU uses train.dtype's peak, so FP8 GEMM runs (precision.gemm=fp8) are
measured against the bf16 peak, as torchtitan reports them; benchmarks/precision.py shows both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache

import torch

log = logging.getLogger("exatrain")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"bf16_params": "bf16"}  # train.dtype names -> compute dtype
_FP8 = "fp8"


@dataclass(frozen=True)
class PeakInfo:
    tflops: float  # per torch device; 0.0 when unknown (MFU is then not reported)
    source: str  # where the number came from, for logs and reports


@dataclass(frozen=True)
class _Spec:
    match: str  # lower-case substring of torch.cuda.get_device_name
    label: str
    bf16: float
    fp32: float
    tf32: float | None  # None: no TF32 path, fp32 GEMMs run at the fp32 peak
    fp8: float | None = None  # dense FP8 tensor-core peak; None: no FP8 GEMMs


# Most specific names first: "NVIDIA H100 PCIe" must not match the SXM row.
_TABLE = (
    _Spec("h100 pcie", "NVIDIA H100 PCIe", 756.0, 51.0, 378.0, 1513.0),
    _Spec("h100 nvl", "NVIDIA H100 NVL", 835.0, 60.0, 417.5, 1670.5),
    _Spec("h100", "NVIDIA H100 SXM", 989.0, 67.0, 494.7, 1978.9),
    _Spec("h200 nvl", "NVIDIA H200 NVL", 835.0, 60.0, 417.5, 1670.5),
    _Spec("h200", "NVIDIA H200 SXM", 989.0, 67.0, 494.7, 1978.9),
    _Spec("gh200", "NVIDIA GH200", 989.0, 67.0, 494.7, 1978.9),
    _Spec("a100", "NVIDIA A100", 312.0, 19.5, 156.0),
    _Spec("mi250x", "AMD MI250X, per GCD (half a package)", 191.5, 47.9, None),
    _Spec("mi250", "AMD MI250, per GCD (half a package; MI210 has the same die and peak)", 181.0, 45.3, None),
    _Spec("mi300x", "AMD MI300X", 1307.4, 163.4, None, 2614.9),
    _Spec("mi300a", "AMD MI300A", 980.6, 122.6, None, 1961.2),
    _Spec("mi325x", "AMD MI325X", 1307.4, 163.4, None, 2614.9),
)


# ROCm names are not always specific: "AMD Instinct MI250X / MI250" for both parts, or an empty string. The GCN
# arch and the compute units per torch device (one GCD on MI250/MI250X) tell them apart.
_AMD_PARTS = {
    ("gfx90a", 110): "AMD MI250X",
    ("gfx90a", 104): "AMD MI250",
    ("gfx942", 304): "AMD MI300X",
    ("gfx942", 228): "AMD MI300A",
}


def _check_dtype(dtype: str) -> str:
    """The compute dtype a precision name runs its GEMMs in."""
    dtype = _ALIASES.get(dtype, dtype)
    if dtype not in _DTYPES and dtype != _FP8:
        raise ValueError(f"unknown compute dtype {dtype!r}, expected one of "
                         f"{', '.join([*_DTYPES, *_ALIASES, _FP8])}")
    return dtype


def lookup(device_name: str, dtype: str, tf32: bool = False) -> PeakInfo | None:
    """Table entry for a GPU name as torch reports it, or None if the GPU is not in the table.

    `tf32`: fp32 matmuls may use TF32 tensor cores (torch's fp32 matmul precision is "tf32").
    """
    dtype = _check_dtype(dtype)
    spec = _spec(device_name)
    if spec is None:
        return None
    if dtype == _FP8:
        if spec.fp8 is None:
            return PeakInfo(spec.bf16, f"table: {spec.label} has no FP8 GEMMs; dense BF16")
        return PeakInfo(spec.fp8, f"table: {spec.label} dense FP8")
    if dtype == "fp32":
        if tf32 and spec.tf32 is not None:
            return PeakInfo(spec.tf32, f"table: {spec.label} dense TF32 (fp32 matmuls with TF32 allowed)")
        return PeakInfo(spec.fp32, f"table: {spec.label} dense FP32")
    return PeakInfo(spec.bf16, f"table: {spec.label} dense {dtype.upper()}")


def _spec(device_name: str) -> _Spec | None:
    name = device_name.lower()
    return next((s for s in _TABLE if s.match in name), None)


def device_name(device: torch.device) -> str:
    """torch's name of a GPU; on ROCm, when that name is empty, unknown or names two parts ("MI250X / MI250"),
    the part its GCN arch and compute-unit count identify (the name unchanged if they identify none)."""
    name = torch.cuda.get_device_name(device)
    if torch.version.hip is None or ("/" not in name and _spec(name) is not None):
        return name
    props = torch.cuda.get_device_properties(device)
    arch = props.gcnArchName.split(":")[0]
    return _AMD_PARTS.get((arch, props.multi_processor_count), name)


@cache
def _cpu_probe(dtype: str, threads: int) -> float:
    """Best single-GEMM TFLOP/s over ~0.4 s; the best, not the mean, because peak is the question."""
    n = 512
    a = torch.randn(n, n, dtype=_DTYPES[dtype])
    b = torch.randn(n, n, dtype=_DTYPES[dtype])
    a @ b  # warm-up: thread pool start, kernel selection
    best = float("inf")
    deadline = time.perf_counter() + 0.4
    while True:
        t0 = time.perf_counter()
        a @ b
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 >= deadline:
            break
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: str, override: float = 0.0) -> PeakInfo:
    """Peak dense TFLOP/s of one device for `dtype` ("fp32", "bf16", "fp16", "fp8"; "bf16_params" = bf16).

    `override` (metrics.peak_tflops / --peak-tflops) wins when positive. An unknown GPU logs a
    loud warning and returns tflops=0.0 rather than a guess, so MFU is shown as n/a instead of
    silently wrong. The CPU probe runs once per process, dtype and thread count.
    """
    dtype = _check_dtype(dtype)
    if override > 0:
        return PeakInfo(float(override), "override (metrics.peak_tflops)")
    device = torch.device(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        probe = "fp32" if dtype == _FP8 else dtype  # no FP8 GEMM units on these CPUs: report the fp32 probe
        tflops = _cpu_probe(probe, threads)
        return PeakInfo(tflops, f"measured: {probe} 512x512 GEMM probe on CPU, {threads} threads")
    if device.type != "cuda":
        raise ValueError(f"no peak FLOP/s for device type {device.type!r}; pass metrics.peak_tflops")
    name = device_name(device)
    # fp32_precision reflects both the legacy allow_tf32 flag and set_float32_matmul_precision.
    info = lookup(name, dtype, tf32=torch.backends.cuda.matmul.fp32_precision == "tf32")
    if info is None:
        msg = (f"unknown GPU {name!r}: no peak FLOP/s in exatrain.bench.peak, so MFU will not be reported; "
               "pass metrics.peak_tflops=<dense TFLOP/s per device> (--peak-tflops) to enable it")
        log.warning(msg)
        return PeakInfo(0.0, f"unknown GPU {name!r}")
    return info
