"""Device and interconnect facts for the time model: GEMM throughput and collective α/β per scope.

Each fact is either a built-in *default* (datasheet figures with an assumed achievable fraction,
sources below) or *measured* on the cluster by `exatrain bench gemm|comm` (exatrain.bench.micro)
and cached as JSON in `cache_dir()/<cluster>.json`; measured entries replace defaults.

Sources for the defaults:
- MI250X GCD: 64 GB HBM2E, 191.5 TFLOP/s dense BF16 (exatrain.bench.peak), 1.6 TB/s HBM (half of the
  package's 3.2 TB/s); the two GCDs of one MI250X are joined by Infinity Fabric at 200 GB/s, GCDs
  of different MI250X by 50-100 GB/s; 4 HPE Slingshot-11 NICs of 200 Gb/s (25 GB/s) per 8-GCD node
  (OLCF Frontier User Guide, docs.olcf.ornl.gov/systems/frontier_user_guide.html; LUMI-G docs,
  identical node: "up to 400 GB/s bidirectional" in-package, 4x200 Gbps NICs).
- H100 SXM 80 GB: 989 TFLOP/s BF16, 3.35 TB/s, NVLink 4 900 GB/s bidirectional; DGX H100: 8x400 Gb/s
  NDR per node. H200: 141 GB, 4.8 TB/s, same compute and links. A100 SXM 80 GB: 312 TFLOP/s,
  2.0 TB/s, NVLink 3 600 GB/s bidirectional; DGX A100: 8x200 Gb/s HDR (NVIDIA datasheets).
Calibrated: the MI250X GEMM efficiency (0.444) is the value at which this time model reproduces the
Frontier paper's 22B throughput (Dash et al. 2024: 38.38% of 191.5 TFLOP/s, TP1 PP8 ZeRO-1 DP2, 1F1B,
full recompute, GBS 640, modelled as exatrain's native ZeRO-1 with bf16 parameters and fp32 masters,
train.dtype=bf16_params, as the paper's DeepSpeed bf16 mode ran, with its gradient accumulation
traffic); with it the model predicts 35.0% for their 175B and 28.7% for their 1T runs (measured 36.14%
and 31.96%). Assumptions (not measured anywhere here; replace them with
`bench gemm|comm`): large GEMMs reach 0.75 of peak on H100/H200 and 0.80 on A100, collectives 80% of
a link's one-direction peak, α = 10 µs in a node and 20 µs across nodes, 5 µs per kernel launch, and
FSDP/ZeRO-3 collectives hide behind at most 70% of the compute they overlap (kernels share the GPU;
`bench comm` measures this fraction too, and the pointwise bandwidth with `bench gemm`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


from exatrain.config import ConfigError
from exatrain.launch.slurm import PROFILE_DIR, load_profile

LINK_EFF = 0.8  # assumed achievable fraction of a link's peak for ring collectives
OVERLAP = 0.7  # assumed: collectives hide behind at most this fraction of the compute they overlap
COLLECTIVE_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}


@dataclass(frozen=True)
class Link:
    """Cost of a collective in one scope: α + c·(n−1)/n·S/β (c = 2 for all-reduce), p2p α + S/β. `ops` holds
    per-operation (α, β) where measured (libraries use a different algorithm per collective: gloo's ring
    all-reduce is several times faster per byte than its all-gather and reduce-scatter); β of an operation
    scales with the bandwidth share a caller passes in."""

    alpha_s: float
    bw_gbs: float  # bus bandwidth per rank (intra) or per node (inter), GB/s
    source: str
    ops: tuple[tuple[str, float, float], ...] = ()  # (op, α s, β GB/s) measured per operation

    def time(self, op: str, nbytes: float, n: int, bw_gbs: float | None = None, calls: int = 1) -> float:
        """Seconds for `nbytes` moved by `calls` separate collectives of `op` over `n` ranks: every call pays α
        (FSDP2 gathers one unit at a time, DTensor issues one collective per redistribution)."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        alpha, beta = self.alpha_s, self.bw_gbs
        for name, a, b in self.ops:
            if name == op:
                alpha, beta = a, b
        bw = beta * (bw_gbs / self.bw_gbs if bw_gbs else 1.0) * 1e9
        if op == "p2p":
            return calls * alpha + nbytes / bw
        return calls * alpha + COLLECTIVE_FACTOR[op] * (n - 1) / n * nbytes / bw


@dataclass(frozen=True)
class GemmModel:
    """GEMM time: a roofline (compute at `eff_max`·peak or HBM traffic, whichever is slower, plus a launch
    overhead), locally rescaled by the nearest measured shape when a measured table exists."""

    peak_tflops: float
    eff_max: float
    hbm_gbs: float
    overhead_s: float
    table: tuple[tuple[int, int, int, float], ...] = ()  # measured (m, n, k, TFLOP/s)
    source: str = "default"

    def roofline(self, m: int, n: int, k: int, elem: int = 2) -> float:
        compute = 2.0 * m * n * k / (self.peak_tflops * 1e12 * self.eff_max)
        traffic = (m * k + k * n + m * n) * elem / (self.hbm_gbs * 1e9)
        return max(compute, traffic) + self.overhead_s

    def time(self, m: int, n: int, k: int, elem: int = 2) -> float:
        base = self.roofline(m, n, k, elem)
        if not self.table:
            return base
        key = (math.log(m), math.log(n), math.log(k))
        nm, nn, nk, tflops = min(self.table, key=lambda r: sum((math.log(a) - b) ** 2
                                                                  for a, b in zip(r[:3], key)))
        measured = 2.0 * nm * nn * nk / (tflops * 1e12)
        return base * measured / self.roofline(nm, nn, nk, elem)

    def efficiency(self, m: int, n: int, k: int, elem: int = 2) -> float:
        return 2.0 * m * n * k / self.time(m, n, k, elem) / (self.peak_tflops * 1e12)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbs: float
    gemm_eff: float


DEVICES = {
    "mi250x": Device("AMD MI250X GCD", 64.0, 191.5, 47.9, 1638.0, 0.444),
    "h100": Device("NVIDIA H100 SXM", 80.0, 989.0, 67.0, 3350.0, 0.75),
    "h200": Device("NVIDIA H200 SXM", 141.0, 989.0, 67.0, 4800.0, 0.75),
    "a100": Device("NVIDIA A100 SXM 80GB", 80.0, 312.0, 19.5, 2039.0, 0.80),
}

# cluster -> (device key, pair link GB/s or 0, intra GB/s per rank, inter GB/s per node, source)
_CLUSTERS = {
    "frontier": ("mi250x", 200.0, 50.0, 100.0,
                 "Frontier User Guide: GCD pair 200 GB/s, other GCDs 50-100 GB/s, 4x25 GB/s Slingshot NICs per node"),
    "nvidia": ("h100", 0.0, 450.0, 400.0, "DGX H100: NVLink 4 450 GB/s per direction, 8x400 Gb/s NDR per node"),
    "a100": ("a100", 0.0, 300.0, 200.0, "DGX A100: NVLink 3 300 GB/s per direction, 8x200 Gb/s HDR per node"),
}


@dataclass(frozen=True)
class Cluster:
    name: str
    devices_per_node: int
    device: Device
    gemm: GemmModel
    intra: Link
    inter: Link  # bw_gbs: injection bandwidth of one node, shared by the groups crossing it
    pair: Link | None = None  # a faster link between rank pairs (2i, 2i+1), e.g. the two GCDs of an MI250X
    measured: list[str] = field(default_factory=list)
    overlap: float = OVERLAP  # fraction of compute time that can hide data-parallel collectives
    shared_hbm_gbs: float = 0.0  # memory bandwidth per device while every device of a node streams (CPU cores
    #                              share the socket's); 0 = each device has its own (GPU HBM)
    op_s: float = 0.0  # host time per dispatched aten op (measured by `bench gemm`; 0 = hidden behind the GPU)
    dtensor_op_s: float = 0.0  # extra host time per DTensor op (sharding propagation)
    host_serial: bool = False  # host and device work add up (CPU) instead of overlapping (GPU)
    tp_link: Link | None = None  # in-node collectives as DTensor issues them for TP (`bench comm` measures it:
    #                              redistribute along the sequence dim, Python planning and dim-1 copies included)

    def link(self, n: int, stride: int) -> tuple[Link, float]:
        """The link a group of `n` ranks `stride` apart uses, and its effective bandwidth (GB/s).

        Ranks fill nodes in order (the mesh's innermost dim is tp). A group inside one node uses the
        intra link (the pair link for two adjacent ranks). A group across nodes is limited by the slower
        of the intra hops and its share of the node's NICs: every rank of a node runs a collective of
        the same kind at once in a 3D layout, so devices_per_node / (ranks of the group per node) groups
        share them."""
        d = self.devices_per_node
        if n * stride <= d:
            if self.pair is not None and n == 2 and stride == 1:
                return self.pair, self.pair.bw_gbs
            return self.intra, self.intra.bw_gbs
        per_node = max(1, min(n, d // stride)) if stride < d else 1
        share = self.inter.bw_gbs / (d / per_node)
        bw = min(share, self.intra.bw_gbs) if per_node > 1 else share
        return self.inter, bw


def cache_dir() -> Path:
    """Where measured micro-benchmarks live: $EXATRAIN_BENCH_DIR or ~/.cache/exatrain/bench."""
    return Path(os.environ.get("EXATRAIN_BENCH_DIR", Path.home() / ".cache" / "exatrain" / "bench"))


def cache_path(cluster: str, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"{cluster}.json"


def devices_per_node(cluster: str) -> int:
    """gpus_per_node (else tasks_per_node) of the cluster's launch profile (exatrain.launch.slurm)."""
    try:
        profile = load_profile(cluster)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return profile.gpus_per_node or profile.tasks_per_node or 1


def default_cluster(name: str, dtype: str = "bf16") -> Cluster:
    """Built-in defaults for a known cluster (see the module docstring for sources and assumptions)."""
    if name not in _CLUSTERS:
        raise ValueError(f"no built-in hardware facts for cluster {name!r} (known: {sorted(_CLUSTERS)}); "
                         f"measure them with `exatrain bench gemm` and `exatrain bench comm` on it")
    key, pair, intra, inter, src = _CLUSTERS[name]
    dev = DEVICES[key]
    peak = dev.bf16_tflops if dtype == "bf16" else dev.fp32_tflops
    gemm = GemmModel(peak, dev.gemm_eff, dev.hbm_gbs, 5e-6, source=f"default: {dev.name} roofline, eff {dev.gemm_eff}")
    d = devices_per_node(name) if (PROFILE_DIR / f"{name}.yaml").exists() else 8
    return Cluster(name, d, dev, gemm,
                   intra=Link(10e-6, intra * LINK_EFF, f"default: {src}"),
                   inter=Link(20e-6, inter * LINK_EFF, f"default: {src}"),
                   pair=Link(10e-6, pair * LINK_EFF, f"default: {src}") if pair else None)


def load_cluster(name: str, dtype: str = "bf16", directory: Path | None = None) -> Cluster:
    """Defaults overlaid with whatever `exatrain bench gemm|comm` measured for this cluster."""
    path = cache_path(name, directory)
    data = json.loads(path.read_text()) if path.exists() else {}
    if name in _CLUSTERS:
        cl = default_cluster(name, dtype)
    elif data:
        dev = Device(name, float(data.get("memory_gib", 0.0)), 0.0, 0.0, float(data.get("hbm_gbs", 100.0)), 0.5)
        cl = Cluster(name, devices_per_node(name), dev, GemmModel(0.0, 0.5, dev.hbm_gbs, 5e-6),
                     Link(10e-6, 10.0, "unset"), Link(20e-6, 10.0, "unset"))
    else:
        cl = default_cluster(name, dtype)
    measured = []
    host = data.get("host")
    if host:
        cl = replace(cl, op_s=float(host["op_s"]), dtensor_op_s=float(host["dtensor_op_s"]),
                     host_serial=bool(host["serial"]))
        measured.append("host overhead")
    if data.get("hbm_gbs"):
        cl = replace(cl, gemm=replace(cl.gemm, hbm_gbs=float(data["hbm_gbs"])))
        measured.append("memory bandwidth")
    gemm = data.get("gemm", {}).get(dtype)
    if gemm:
        rows = tuple((r["m"], r["n"], r["k"], r["tflops"]) for r in gemm["rows"])
        cl = replace(cl, gemm=replace(cl.gemm, table=rows, peak_tflops=gemm.get("peak_tflops") or cl.gemm.peak_tflops,
                                      source=f"measured {gemm.get('when', '')}: {gemm.get('device', '')}"))
        measured.append("gemm")
    if data.get("comm", {}).get("shared_hbm_gbs"):
        cl = replace(cl, shared_hbm_gbs=float(data["comm"]["shared_hbm_gbs"]["gbs"]))
        measured.append("shared memory bandwidth")
    if data.get("comm", {}).get("overlap") is not None:
        cl = replace(cl, overlap=float(data["comm"]["overlap"]["fraction"]))
        measured.append("overlap")
    tp = data.get("comm", {}).get("tp", {}).get("ops")
    if tp:
        base = tp.get("all_gather") or next(iter(tp.values()))
        cl = replace(cl, tp_link=Link(base["alpha_s"], base["bw_gbs"], f"measured {data['comm']['tp'].get('when', '')}"
                                      " (DTensor redistribute)", tuple((op, f["alpha_s"], f["bw_gbs"])
                                                                       for op, f in tp.items())))
        measured.append("comm.tp")
    for scope in ("intra", "inter", "pair"):
        fit = data.get("comm", {}).get(scope)
        if fit:
            ops = tuple((op, f["alpha_s"], f["bw_gbs"]) for op, f in fit.get("ops", {}).items())
            cl = replace(cl, **{scope: Link(fit["alpha_s"], fit["bw_gbs"], f"measured {fit.get('when', '')}", ops)})
            measured.append(f"comm.{scope}")
    return replace(cl, measured=measured)
