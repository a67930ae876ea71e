"""Micro-benchmarks that calibrate the time model: GEMM throughput and collective α/β per scope.

    exatrain bench gemm [CONFIG [overrides]] [--cluster NAME]        # one process
    exatrain bench comm --nproc N [--cluster NAME]                   # starts torchrun itself (local)
    srun ... python -m exatrain bench comm --cluster NAME            # or under torchrun / srun

`gemm` times torch.matmul over a sweep of shapes (squares plus, given a job config, exactly the
GEMMs of its blocks under TP 1..8) and reports TFLOP/s and efficiency vs the device's peak. `comm`
runs all-reduce, all-gather, reduce-scatter and p2p over message sizes in two scopes: inside a node
(groups of `ranks_per_node` consecutive ranks) and across nodes (one rank per node, all such groups at
once, as in a 3D layout), and fits t = α + c·(n−1)/n·S/β per scope by least squares. Both write into
the cluster's JSON cache (exatrain.bench.hardware.cache_path), which `load_cluster` overlays on the
built-in defaults. Each returns its rows and prints a table.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from exatrain.bench.hardware import COLLECTIVE_FACTOR, cache_path
from exatrain.bench.peak import peak_tflops
from exatrain.bench.timing import block_linears
from exatrain.config import JobConfig
from exatrain.model.llama import ffn_hidden_dim

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_gemm_shapes(cfg: JobConfig, tps: tuple[int, ...] = (1, 2, 4, 8),
                      micro_batches: tuple[int, ...] = (1,)) -> list[tuple[int, int, int]]:
    """The (m, n, k) forward GEMMs of one block (and the head) for each TP degree and micro-batch size:
    what the time model looks up (backward shapes are the same products transposed)."""
    m = cfg.model
    h, f = m.dim, ffn_hidden_dim(m)
    kv = (m.n_kv_heads or m.n_heads) * (h // m.n_heads)
    vocab = m.vocab_size or cfg.data.tokenizer.vocab_size
    shapes = set()
    for tp in tps:
        if m.n_heads % tp or (m.n_kv_heads or m.n_heads) % tp or f % tp:
            continue
        for mb in micro_batches:
            t = mb * cfg.data.seq_len
            shapes.update((t, n, k) for n, k in [*block_linears(h, kv, f, tp), (vocab // tp, h)])
    s, hd = cfg.data.seq_len, h // m.n_heads
    shapes.update({(s, s, hd), (s, hd, s)})  # attention per head: QKᵀ and PV
    return sorted(shapes)


def _matmul_seconds(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed repeat: what the device does on its own


def gemm(shapes: list[tuple[int, int, int]] | None = None, dtype: str = "bf16", device: str = "cpu",
         cluster: str = "local", repeats: int = 5, directory: Path | None = None, save: bool = True) -> list[dict]:
    """Time each (m, n, k) GEMM; rows carry seconds, TFLOP/s and efficiency vs the device's peak."""
    dev = torch.device(device)
    peak = peak_tflops(dev, dtype)
    shapes = shapes or [(s, s, s) for s in ((256, 512, 1024) if dev.type == "cpu" else (1024, 2048, 4096, 8192))]
    rows = []
    for m, n, k in shapes:
        sec = _matmul_seconds(m, n, k, _DTYPES[dtype], dev, repeats)
        tflops = 2.0 * m * n * k / sec / 1e12
        rows.append({"m": m, "n": n, "k": k, "seconds": sec, "tflops": tflops,
                     "eff": tflops / peak.tflops if peak.tflops else float("nan")})
    print(format_table(["m", "n", "k", "ms", "TFLOP/s", "eff"],
                       [[r["m"], r["n"], r["k"], f"{r['seconds'] * 1e3:.3f}", f"{r['tflops']:.2f}",
                         f"{r['eff']:.2f}"] for r in rows]))
    print(f"peak {peak.tflops:.2f} TFLOP/s ({peak.source})")
    bw = memory_bandwidth(dev)
    print(f"memory bandwidth {bw:.1f} GB/s (elementwise multiply of 64 MiB tensors, bytes read + written)")
    host = host_overhead(dev)
    print(f"host overhead: {host['op_s'] * 1e6:.1f} µs per aten op, {host['dtensor_op_s'] * 1e6:.1f} µs more per "
          "DTensor op")
    if save:
        _update_cache(cluster, directory, ["gemm", dtype], {"device": _device_name(dev), "when": _now(),
                                                             "peak_tflops": peak.tflops, "rows": rows})
        _update_cache(cluster, directory, ["memory_gib"], _memory_gib(dev))
        _update_cache(cluster, directory, ["hbm_gbs"], bw)
        _update_cache(cluster, directory, ["host"], host)
    return rows


def memory_bandwidth(dev: torch.device, nbytes: int = 64 * 2**20, repeats: int = 20) -> float:
    """GB/s of an out-of-place elementwise multiply (bytes read + written): what the time model's pointwise work
    (norms, RoPE, SwiGLU, residual adds, all unfused) runs at."""
    a = torch.ones(nbytes // 4, device=dev)
    b = torch.ones_like(a)
    a * b
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a * b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 3 * nbytes / best / 1e9


def host_overhead(dev: torch.device, n: int = 100) -> dict:
    """Host seconds per dispatched op, on a training-like op mix: forward and backward of `(x @ w).sum()` on
    small tensors, divided by the aten ops it dispatches (counted); and the extra per DTensor op for the same
    pattern on DTensors (Shard(0) activations, Shard(1) weights on a one-rank mesh: sharding propagation,
    no communication). On CPU host and kernels share the core ("serial"); a GPU runs queued kernels while the
    host goes ahead."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.plain = self.dtensor = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t is DTensor for t in types):
                self.dtensor += 1
                return NotImplemented
            self.plain += 1
            return func(*args, **(kwargs or {}))

    def step(x, w) -> None:
        (x @ w).sum().backward()

    def per_step(x, w) -> tuple[float, Count]:
        step(x, w)
        counter = Count()
        with counter:
            step(x, w)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                step(x, w)
            _sync(dev)
            best = min(best, (time.perf_counter() - t0) / n)
        return best, counter

    a = torch.ones(8, 8, device=dev, requires_grad=True)
    b = torch.ones(8, 8, device=dev, requires_grad=True)
    t_plain, c_plain = per_step(a, b)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if own:
            mesh = init_device_mesh(dev.type, (1,))
        else:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(dist.new_group([dist.get_rank()]), dev.type)
        x = distribute_tensor(a.detach(), mesh, [Shard(0)]).requires_grad_()
        w = distribute_tensor(b.detach(), mesh, [Shard(1)]).requires_grad_()
        t_dt, c_dt = per_step(x, w)
    finally:
        if own:
            dist.destroy_process_group()
    op_s = t_plain / max(c_plain.plain, 1)
    return {"op_s": op_s, "dtensor_op_s": max(0.0, t_dt - t_plain) / max(c_dt.dtensor, 1),
            "serial": dev.type == "cpu", "when": _now()}


def _memory_gib(dev: torch.device) -> float:
    """The device's memory (host RAM for CPU), for the planner's default cap on clusters without defaults."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def fit_alpha_beta(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = α + x/β over (x bytes, t seconds), x already scaled by the collective's factor;
    returns (α s, β GB/s). α is clamped at 0 (a negative intercept is noise).

    The fit minimises the *relative* residual ((t − α − x/β)/t, weight 1/t²): message sizes span three
    decades, and an unweighted fit lets the millisecond noise of the largest messages set α, the cost of
    every small call (gloo's measured 64 KiB calls took 2-20x the unweighted α). Weighted, α follows the
    small messages and β the large ones."""
    if len(samples) < 2:
        raise ValueError("need at least two message sizes to fit α and β")
    ws = [1.0 / max(t, 1e-12) ** 2 for _, t in samples]
    sw = sum(ws)
    mx = sum(w * x for w, (x, _) in zip(ws, samples)) / sw
    mt = sum(w * t for w, (_, t) in zip(ws, samples)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, (x, _) in zip(ws, samples))
    slope = sum(w * (x - mx) * (t - mt) for w, (x, t) in zip(ws, samples)) / sxx if sxx else 0.0
    if slope <= 0:
        raise ValueError(f"time does not grow with message size (slope {slope:.3g} s/B): measure larger messages")
    alpha = max(0.0, mt - slope * mx)
    return alpha, 1.0 / slope / 1e9


def effective_bytes(op: str, nbytes: float, n: int) -> float:
    """The x of t = α + x/β: c·(n−1)/n·S for collectives, S for p2p."""
    return nbytes if op == "p2p" else COLLECTIVE_FACTOR[op] * (n - 1) / n * nbytes


def _time_op(op: str, nbytes: int, group, peer: int | None, device: torch.device, repeats: int) -> float:
    n = dist.get_world_size(group)
    elems = max(n, nbytes // 4 // n * n)
    buf = torch.ones(elems, device=device)
    out = torch.empty(elems * n if op == "all_gather" else elems // n, device=device)

    def run() -> None:
        if op == "all_reduce":
            dist.all_reduce(buf, group=group)
        elif op == "all_gather":
            dist.all_gather_into_tensor(out, buf, group=group)
        elif op == "reduce_scatter":
            dist.reduce_scatter_tensor(out, buf, group=group)
        elif dist.get_rank() < peer:
            dist.send(buf, peer)
            dist.recv(buf, peer)
        else:
            dist.recv(buf, peer)
            dist.send(buf, peer)

    run()
    _sync(device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # the median repeat, not the best: a training step issues dozens of collectives and pays each one's typical
    # cost; gloo's calls on shared CPU cores spread widely (the best of 5 was 2-3x below the median at 1-4 MiB)
    sec = torch.tensor([statistics.median(times) / (2 if op == "p2p" else 1)])
    dist.all_reduce(sec, op=dist.ReduceOp.MAX)
    return float(sec)


def comm(ranks_per_node: int, sizes: tuple[int, ...] = (2**18, 2**20, 2**22, 2**24), ops: tuple[str, ...] = OPS,
         cluster: str = "local", repeats: int = 5, directory: Path | None = None, device: str | None = None) -> dict:
    """Benchmark collectives in both scopes on the current process group; returns {scope: fit}, rows included.

    Ranks r and r + ranks_per_node are on different nodes; inter-node groups run concurrently, so the
    fitted β is one group's share and the cached node bandwidth is β x ranks_per_node."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ranks_per_node:
        raise ValueError(f"world size {world} is not a multiple of ranks_per_node={ranks_per_node}")
    nodes = world // ranks_per_node
    if device is None:
        device = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    intra = [dist.new_group(list(range(i * ranks_per_node, (i + 1) * ranks_per_node))) for i in range(nodes)]
    inter = [dist.new_group(list(range(i, world, ranks_per_node))) for i in range(ranks_per_node)]
    # (group, its size, p2p peer or None when the ranks cannot all pair up, groups sharing a node's links)
    scopes = {}
    if ranks_per_node > 1:
        peer = rank ^ 1 if ranks_per_node % 2 == 0 else None
        scopes["intra"] = (intra[rank // ranks_per_node], ranks_per_node, peer, 1)
    if nodes > 1:
        node = rank // ranks_per_node
        peer = (rank + ranks_per_node if node % 2 == 0 else rank - ranks_per_node) if nodes % 2 == 0 else None
        scopes["inter"] = (inter[rank % ranks_per_node], nodes, peer, ranks_per_node)
    result, table = {}, []
    for scope, (group, n, peer, share) in scopes.items():
        samples, rows = [], []
        for op in ops:
            if op == "p2p" and peer is None:
                continue
            for size in sizes:
                sec = _time_op(op, size, None if op == "p2p" else group, peer, device, repeats)
                # all-gather's S is its output: n x the `size` bytes each rank contributes
                x = effective_bytes(op, size * n if op == "all_gather" else size, 2 if op == "p2p" else n)
                samples.append((x, sec))
                rows.append({"op": op, "bytes": size, "n": n, "seconds": sec, "busbw_gbs": x / sec / 1e9})
                table.append([scope, op, n, size, f"{sec * 1e6:.1f}", f"{x / sec / 1e9:.3f}"])
        alpha, beta = fit_alpha_beta(samples)
        per_op = {}
        for op in {r["op"] for r in rows}:
            pts = [(effective_bytes(op, r["bytes"] * (r["n"] if op == "all_gather" else 1), r["n"] if op != "p2p"
                                    else 2), r["seconds"]) for r in rows if r["op"] == op]
            try:
                a, b = fit_alpha_beta(pts)
            except ValueError:
                continue
            per_op[op] = {"alpha_s": a, "bw_gbs": b * share}
        result[scope] = {"alpha_s": alpha, "bw_gbs": beta * share, "group_bw_gbs": beta, "ranks_per_node":
                         ranks_per_node, "when": _now(), "rows": rows, "ops": per_op}
    if ranks_per_node > 1:
        result["tp"] = measure_redistribute(intra[rank // ranks_per_node], device, sizes, repeats)
    result["overlap"] = measure_overlap(device, repeats)
    dist.barrier()
    shared = torch.tensor([memory_bandwidth(device)])  # every rank streams at once, as in a training step
    dist.all_reduce(shared, op=dist.ReduceOp.MIN)
    result["shared_hbm_gbs"] = {"gbs": float(shared), "when": _now()}
    if rank == 0:
        print(format_table(["scope", "op", "ranks", "bytes", "µs", "busbw GB/s"], table))
        print(f"overlap: {result['overlap']['fraction']:.2f} of an all-reduce hides behind concurrent matmuls "
              f"(compute {result['overlap']['compute_s'] * 1e3:.1f} ms, all-reduce {result['overlap']['comm_s'] * 1e3:.1f}"
              f" ms, both {result['overlap']['both_s'] * 1e3:.1f} ms)")
        print(f"memory bandwidth with every rank streaming: {result['shared_hbm_gbs']['gbs']:.1f} GB/s per rank")
        print("tensor parallelism (DTensor redistribute along the sequence dim, in-node group): "
              + ", ".join(f"{op} {f['alpha_s'] * 1e6:.0f} µs {f['bw_gbs']:.3f} GB/s" for op, f in result["tp"]["ops"].items())
              if "tp" in result else "")
        for scope, fit in result.items():
            if scope in ("overlap", "shared_hbm_gbs", "tp"):
                continue
            print(f"{scope}: α = {fit['alpha_s'] * 1e6:.1f} µs, β = {fit['group_bw_gbs']:.3f} GB/s per group"
                  + (f" ({fit['bw_gbs']:.3f} GB/s per node)" if scope == "inter" else "") + "; per op: "
                  + ", ".join(f"{op} {f['alpha_s'] * 1e6:.0f} µs {f['bw_gbs']:.3f} GB/s" for op, f in fit["ops"].items()))
        _update_cache(cluster, directory, ["comm"], result, merge=True)
    dist.barrier()
    return result


TP_OPS = {"all_gather": ("shard", "replicate"), "reduce_scatter": ("partial", "shard"),
          "all_reduce": ("partial", "replicate")}


def measure_redistribute(group, device: torch.device, sizes: tuple[int, ...], repeats: int = 5) -> dict:
    """Collectives as tensor parallelism issues them: `DTensor.redistribute` of a (1, tokens, 256) fp32
    activation on the in-node group's mesh, Shard(1) -> Replicate (all-gather along the sequence, sequence
    parallelism's gather before attention and the FFN), Partial -> Shard(1) (reduce-scatter after them) and
    Partial -> Replicate (all-reduce, TP without SP), `sizes` bytes of the full activation. Each call costs
    the raw collective plus DTensor's Python redistribution planning and, along dim 1, the copies that
    gather and scatter a non-leading dim (gloo collectives move dim 0 chunks). Fits t = α + c·(n−1)/n·S/β
    per op as `comm` does; the time model prices TP collectives with it."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = DeviceMesh.from_group(group, device.type)
    n = mesh.size()
    place = {"shard": Shard(1), "replicate": Replicate(), "partial": Partial()}
    rows, fits = [], {}
    for op, (src, dst) in TP_OPS.items():
        samples = []
        for size in sizes:
            tokens = max(n, size // 1024 // n * n)
            full = torch.ones(1, tokens, 256, device=device)
            local = full.chunk(n, dim=1)[0].contiguous() if src == "shard" else full
            x = DTensor.from_local(local, mesh, [place[src]], run_check=False)
            x.redistribute(mesh, [place[dst]]).to_local()
            _sync(device)
            times = []
            for _ in range(repeats):
                dist.barrier(group)
                t0 = time.perf_counter()
                x.redistribute(mesh, [place[dst]]).to_local()
                _sync(device)
                times.append(time.perf_counter() - t0)
            sec = torch.tensor([statistics.median(times)])  # typical call, as `_time_op`
            dist.all_reduce(sec, op=dist.ReduceOp.MAX, group=group)
            nbytes = full.numel() * full.element_size()
            samples.append((effective_bytes(op, nbytes, n), float(sec)))
            rows.append({"op": op, "bytes": nbytes, "n": n, "seconds": float(sec)})
        try:
            a, b = fit_alpha_beta(samples)
        except ValueError:
            continue
        fits[op] = {"alpha_s": a, "bw_gbs": b}
    return {"rows": rows, "ops": fits, "when": _now()}


def measure_overlap(device: torch.device, repeats: int = 3, nbytes: int = 2**24) -> dict:
    """How much of a collective hides behind compute on this hardware: an all-reduce of `nbytes` over the world
    alone, matmuls of about the same duration alone, then both at once (the all-reduce issued asynchronously
    first). fraction = (t_compute + t_comm - t_both) / min(t_compute, t_comm), clamped to [0, 1], the worst
    rank's. GPUs overlap NCCL kernels with compute; CPU ranks with one core each share it with gloo's thread."""
    buf = torch.ones(nbytes // 4, device=device)
    a = torch.randn(512, 512, device=device)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    t_comm = timed(lambda: dist.all_reduce(buf))
    t_mm = timed(lambda: a @ a)
    n = max(1, round(t_comm / max(t_mm, 1e-9)))

    def compute() -> None:
        for _ in range(n):
            a @ a

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    t_compute, t_both = timed(compute), timed(both)
    fraction = (t_compute + t_comm - t_both) / max(min(t_compute, t_comm), 1e-9)
    worst = torch.tensor([min(1.0, max(0.0, fraction))])
    dist.all_reduce(worst, op=dist.ReduceOp.MIN)
    return {"fraction": float(worst), "compute_s": t_compute, "comm_s": t_comm, "both_s": t_both, "when": _now()}


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def _update_cache(cluster: str, directory: Path | None, keys: list[str], value, merge: bool = False) -> Path:
    path = cache_path(cluster, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if merge and isinstance(node.get(keys[-1]), dict):
        node[keys[-1]].update(value)
    else:
        node[keys[-1]] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
