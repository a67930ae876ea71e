"""Predicted step time of a job under a layout on a cluster (DESIGN.md §12).

step = m · t_mb(slowest pipeline rank) + bubble + PP p2p + exposed DP collectives + optimizer, where one
micro-batch on a rank costs its GEMMs (forward, input- and weight-gradient shapes, each timed by the
cluster's GEMM model), flash/SDPA attention (causal half of 4·T·s·h/t forward FLOPs, 2.5x in backward
as in FlashAttention-2), memory-bound pointwise work (norms, RoPE, SwiGLU, residual adds) at HBM
bandwidth, the recomputation its activation checkpointing implies, and its TP collectives, which
exatrain's DTensor plans do not overlap (2 all-gathers + 2 reduce-scatters of b·s·h per block forward
with sequence parallelism, 2 all-reduces without; as many in backward and in a full recompute), priced as
`bench comm` measures DTensor's redistribute where it did (`Cluster.tp_link`).
Bubble: (pp−1)/(v·m) of the m micro-batches, scaled for the zero-bubble schedules by the ZB paper's
(T_F + T_B − T_W) (ZB-H1, InterleavedZeroBubble) and (T_F + T_B − 2·T_W) (ZBV) over (T_F + T_B + T_W).
DP: FSDP2 gathers parameters (bf16 under bf16_params, else fp32) and reduce-scatters fp32 gradients every
micro-batch, one collective per FSDP unit (each paying the link's α) plus its copy-in/copy-out traffic;
on a GPU the collectives hide behind up to `cluster.overlap` of the micro-batch's compute but never better
than one unit exposed, on a CPU rank only that fraction of themselves hides (`_hidden`; under PP only
once per step, and the reduction is exposed); DeepSpeed ZeRO-1/2 reduce once per step after
backward and all-gather the updated parameters (exposed); native ZeRO-1 likewise, in fp32 both ways
(fp32 gradients reduce-scattered, fp32 master slices all-gathered) plus its buffer copies. bf16 under
autocast (every layout) adds the weight casts (once per step) and fp32 gradient accumulation (every
micro-batch) at HBM bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from exatrain.bench.flops import flops_per_token, megatron_flops_per_iteration
from exatrain.bench.hardware import Cluster
from exatrain.bench.layout import Layout
from exatrain.bench.memory import (
    Kernels,
    Shape,
    autocast,
    native_zero1,
    residual_bytes,
    stage_plan,
    uses_fsdp,
)
from exatrain.config import JobConfig


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step by component (`compute` includes recomputation and pointwise work)."""

    compute: float
    recompute: float
    tp_comm: float
    bubble: float
    pp_p2p: float
    dp_comm: float
    optimizer: float
    tokens: int  # per step, global
    devices: int
    model_flops: float  # per step, 6N + attention in metrics.flops_convention (exatrain.bench.flops)
    megatron_flops: float  # per step, Narayanan et al.'s formula as the Frontier paper reports
    peak_tflops: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.bubble + self.pp_p2p + self.dp_comm + self.optimizer

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def mfu(self) -> float:
        return self.model_flops / self.total / self.devices / (self.peak_tflops * 1e12)

    @property
    def megatron_tflops(self) -> float:
        """Per device, as Megatron-DeepSpeed's throughput line (and the Frontier paper) computes it."""
        return self.megatron_flops / self.total / self.devices / 1e12

    def breakdown(self) -> dict[str, float]:
        """Fractions of the step."""
        t = self.total
        return {k: getattr(self, k) / t for k in ("compute", "tp_comm", "bubble", "pp_p2p", "dp_comm", "optimizer")}


@dataclass(frozen=True)
class _MicroBatch:
    fwd: float
    bwd_input: float
    bwd_weight: float
    recompute: float
    tp_comm: float
    host: float = 0.0  # framework time per micro-batch not hidden behind device work (exatrain.bench.timing.host_time)

    @property
    def device(self) -> float:
        return self.fwd + self.bwd_input + self.bwd_weight + self.recompute

    @property
    def total(self) -> float:
        return self.device + self.host + self.tp_comm


def _linear(cl: Cluster, tokens: int, n: int, k: int, e: int) -> tuple[float, float, float]:
    """(forward, input-gradient, weight-gradient) seconds of a (tokens x k) @ (k x n) GEMM."""
    g = cl.gemm
    return g.time(tokens, n, k, e), g.time(tokens, k, n, e), g.time(k, n, tokens, e)


def block_linears(h: int, kv: int, ffn: int, tp: int) -> list[tuple[int, int]]:
    """(n, k) of the seven projections of one Llama block on one TP rank, each a (tokens x k) @ (k x n) GEMM:
    wq, wk, wv, wo, w1, w3, w2 (what `exatrain bench gemm` measures and the time model looks up)."""
    return [(h // tp, h), (kv // tp, h), (kv // tp, h), (h, h // tp), (ffn // tp, h), (ffn // tp, h), (h, ffn // tp)]


def _block(s: Shape, lay: Layout, cl: Cluster, tokens: int, k: Kernels) -> tuple[float, float, float, float, float]:
    """One block on one rank: (gemm fwd, bwd input, bwd weight, attention fwd, pointwise fwd) seconds."""
    t, e = lay.tp, s.e
    f = b = w = 0.0
    for n, kk in block_linears(s.h, s.kv, s.ffn, t):
        a, c, d = _linear(cl, tokens, n, kk, e)
        f, b, w = f + a, b + c, w + d
    heads = max(1, s.heads // t)
    seqs = tokens // s.seq
    g = cl.gemm
    attn = seqs * heads * (g.time(s.seq, s.seq, s.head_dim, e) + g.time(s.seq, s.head_dim, s.seq, e)) / 2  # causal half
    return f, b, w, attn, tokens * pointwise_bytes(s, lay, k) / (g.hbm_gbs * 1e9)


def pointwise_bytes(s: Shape, lay: Layout, k: Kernels) -> float:
    """Bytes read + written per token by one block's forward outside the GEMMs and attention, op by op as
    exatrain's Llama block runs them unfused: two RMSNorms (one fused op on GPU: read + write; decomposed on
    CPU: pow, mean, rsqrt, two muls ~ 7 passes; under bf16 the fp32 upcast and the cast back, 4 more), RoPE on
    q and k (four half-width muls, a sub, an add, the stack: ~9 passes; 4 more under bf16), the attention
    output's copy for wo (CPU), SwiGLU (silu + mul: 5 passes over the FFN width) and two residual adds."""
    t, h, e = lay.tp, s.h, s.e
    tsp = t if lay.sp else 1
    bf16 = 4 if e == 2 else 0
    norm = (2 if k.fused_rms_norm else 7) + bf16
    elems = (2 * norm * h / tsp + (9 + bf16) * (h + s.kv) / t + (2 * h / t if k.attention_out_copy else 0.0)
             + 5 * s.ffn / t + 6 * h / tsp)
    return e * elems


def _tp_link(lay: Layout, cl: Cluster):
    link, bw = cl.link(lay.tp, 1)
    if cl.tp_link is not None and lay.tp <= cl.devices_per_node:
        return cl.tp_link, None
    return link, bw


def _tp_comm(s: Shape, lay: Layout, cl: Cluster, tokens: int, layers: int, first: bool, last: bool) -> float:
    """Exposed TP collective seconds for one micro-batch on a rank, the calls as exatrain's DTensor plans issue
    them (counted with a dispatch mode on a TP2 step): with SP, per block 2 all-gathers + 2 reduce-scatters of
    the b·s·h activation along the sequence in forward and as many in backward; without SP 2 all-reduces in
    forward and 5 in backward (each of the q, k, v, w1, w3 projections all-reduces its own input gradient:
    only SP gathers the shared input once, so its gradient is reduced once). A full recompute repeats the
    forward's. The embedding and the head add one of each kind (one all-reduce without SP), loss_parallel 3
    small all-reduces. Priced with `cl.tp_link` where `bench comm` measured it (collectives issued through
    DTensor.redistribute: each call pays DTensor's planning on the host, the functional collective's copy
    and, along dim 1, the copies around gloo's dim-0 collective), else the raw link."""
    if lay.tp == 1:
        return 0.0
    link, bw = _tp_link(lay, cl)
    size = tokens * s.h * s.e
    ag, rs, ar = (link.time(op, size, lay.tp, bw) for op in ("all_gather", "reduce_scatter", "all_reduce"))
    fwd, bwd = (2 * (ag + rs), 2 * (ag + rs)) if lay.sp else (2 * ar, 5 * ar)
    per_block = fwd * (2 if lay.activation_checkpointing == "full" else 1) + bwd
    edge = ((ag + rs if lay.sp else ar) if first else 0.0) + \
           ((ag + rs if lay.sp else ar) + 3 * link.time("all_reduce", tokens * 4, lay.tp, bw) if last else 0.0)
    return layers * per_block + edge


def _tp_step_comm(s: Shape, lay: Layout, cl: Cluster, layers: int, last: bool) -> float:
    """TP collectives once per step: with SP the replicated norm weights' gradients (Partial over the
    sequence shards) are all-reduced, 2 per block and the final norm's."""
    if lay.tp == 1 or not lay.sp:
        return 0.0
    link, bw = _tp_link(lay, cl)
    return (2 * layers + (1 if last else 0)) * link.time("all_reduce", s.h * 4, lay.tp, bw)


def _micro_batch(s: Shape, lay: Layout, cl: Cluster, layers: int, first: bool, last: bool,
                 k: Kernels) -> _MicroBatch:
    tokens = lay.micro_batch * s.seq
    f, b, w, attn, pw = _block(s, lay, cl, tokens, k)
    fwd = layers * (f + attn + pw)
    bwd_in = layers * (b + 1.5 * attn + 2 * pw)  # FlashAttention-2: backward = 2.5x forward, counted with input grads
    bwd_w = layers * (w + attn)
    ac = lay.activation_checkpointing
    if ac == "full":
        recompute = fwd
    elif ac == "selective":
        recompute = layers * (pw + (attn if s.attention == "flash" else 0.0))  # flash-attn is not an aten SAC op
    else:
        recompute = 0.0
    if last:
        a, c, d = _linear(cl, tokens, s.vocab // lay.tp, s.h, s.e)
        ce = tokens * (s.vocab / lay.tp) * (s.e + 4 + 4 + 4) / (cl.gemm.hbm_gbs * 1e9)
        fwd, bwd_in, bwd_w = fwd + a + ce, bwd_in + c + ce, bwd_w + d
    mb = _MicroBatch(fwd, bwd_in, bwd_w, recompute, _tp_comm(s, lay, cl, tokens, layers, first, last))
    host = host_time(lay, cl, layers, first or last)
    # a CPU runs the framework and the kernels on one core; a GPU hides the host behind queued kernels
    return replace(mb, host=host if cl.host_serial else max(0.0, host - mb.device))


# aten ops per block forward + backward as exatrain's Llama block dispatches them (counted with a dispatch
# mode, one micro-batch minus two, tiny.yaml at dim 256, 4 vs 2 layers): 240 plain; under TP with SP 145 DTensor
# ops and 78 more local ones (redistributions), without SP 76 DTensor and 59 local; full recompute adds a
# forward (~80), selective its pointwise ops (~40); the embedding, final norm, head and loss ~60 (50 DTensor
# with SP, 89 without). Once per step the optimizer (per-parameter AdamW on CPU, clipping) dispatches 117 per
# block and 81 for the edge parameters, of which under TP 78 and 29 are DTensor ops.
BLOCK_OPS, EDGE_OPS = 240, 60
TP_OPS = {True: (78, 145, 50), False: (59, 76, 89)}  # sequence_parallel -> (local per block, DTensor per block,
#                                                      DTensor at the edges)
RECOMPUTE_OPS = {"none": 0, "selective": 40, "full": 80}
OPT_OPS, OPT_EDGE_OPS, TP_OPT_DTENSOR_OPS, TP_OPT_EDGE_DTENSOR_OPS = 117, 81, 78, 29


def host_time(lay: Layout, cl: Cluster, layers: int, edge: bool) -> float:
    """Seconds of framework overhead per micro-batch: dispatched ops x the measured per-op cost (plain aten
    op, and a DTensor op's extra sharding propagation under TP; `bench gemm` measures both)."""
    plain = layers * (BLOCK_OPS + RECOMPUTE_OPS[lay.activation_checkpointing]) + (EDGE_OPS if edge else 0)
    dtensor = 0
    if lay.tp > 1:
        local, per_block, at_edge = TP_OPS[lay.sp]
        plain += layers * local
        dtensor = layers * per_block + (at_edge if edge else 0)
    return plain * cl.op_s + dtensor * cl.dtensor_op_s


def optimizer_host_time(lay: Layout, cl: Cluster, layers: int, edge: bool) -> float:
    """Seconds of framework overhead once per step: the optimizer's per-parameter ops (counted as above;
    DTensor ops under TP, whose parameters are DTensors)."""
    plain = layers * OPT_OPS + (OPT_EDGE_OPS if edge else 0)
    dtensor = layers * TP_OPT_DTENSOR_OPS + (TP_OPT_EDGE_DTENSOR_OPS if edge else 0) if lay.tp > 1 else 0
    return plain * cl.op_s + dtensor * cl.dtensor_op_s


def _bubble_fraction(lay: Layout, m: int, mb: _MicroBatch) -> float:
    if lay.pp == 1:
        return 0.0
    base = (lay.pp - 1) / (lay.virtual_stages * m)
    tf, tb, tw = mb.fwd + mb.recompute, mb.bwd_input, mb.bwd_weight
    if lay.schedule == "InterleavedZeroBubble":
        return base * max(0.0, tf + tb - tw) / (tf + tb + tw)
    if lay.schedule == "ZBVZeroBubble":
        return base * max(0.0, tf + tb - 2 * tw) / (tf + tb + tw)
    return base


def _dp_comm(s: Shape, lay: Layout, cl: Cluster, p: float, m: int, mb_compute: float, unit: float,
             layers: int = 1) -> float:
    """Exposed data-parallel seconds per step for `p` local parameters in `layers` blocks."""
    if lay.dp == 1:
        return 0.0
    e = s.pb  # parameters and gradients: bf16 under bf16_params (FSDP2 all-gathers, DeepSpeed's bf16 mode)
    inner = lay.tp  # dp ranks sit tp apart (mesh order pp, dp_replicate, dp_shard, tp)
    shard = lay.sharding
    if native_zero1(s, lay):  # fp32 gradients reduce-scattered, fp32 master slices all-gathered after the last mb
        link, bw = cl.link(lay.dp, inner)
        # read + write: zero the send buffer and copy every gradient into it before (8 + e B/param); pad and
        # concatenate the slices (16/dp) and copy every parameter out of the gathered buffer (8) after
        copies = (16 + e + 16 / lay.dp) * p / (cl.gemm.hbm_gbs * 1e9)
        return link.time("reduce_scatter", 4 * p, lay.dp, bw) + link.time("all_gather", 4 * p, lay.dp, bw) + copies
    if shard in ("zero1", "zero2") or lay.engine == "deepspeed" and shard != "zero3":
        n, link, bw = lay.dp, *cl.link(lay.dp, inner)
        return link.time("reduce_scatter", e * p, n, bw) + link.time("all_gather", e * p, n, bw)
    if shard == "zero3":  # DeepSpeed ZeRO-3: gather in forward and backward, reduce-scatter, every micro-batch
        link, bw = cl.link(lay.dp, inner)
        per_mb = 2 * link.time("all_gather", e * p, lay.dp, bw) + link.time("reduce_scatter", e * p, lay.dp, bw)
        return m * _hidden(cl, per_mb, mb_compute, per_mb * unit / p)
    # native FSDP2 (dp_shard may be 1: replication over dp_replicate)
    return _fsdp2(s, lay, cl, p, m, mb_compute, unit, layers)


def fsdp2_units(lay: Layout, layers: int, p: float, unit: float) -> tuple[int, int, float]:
    """(all-gather calls, unit count, gathered parameters) per micro-batch of FSDP2 on one rank holding
    `layers` blocks of `unit` parameters and `p` in all: exatrain shards every block and then the part's root (embedding, final
    norm, head) as one more unit, and FSDP2 issues one collective per unit. ZeRO-3 without PP gathers every
    block in forward and again in backward; the root stays gathered between them (FSDP2 never reshards
    the root after forward). ZeRO-2, and FSDP2 under PP (its reduction deferred), gather once."""
    units = layers + 1
    if lay.zero_stage == 3 and lay.pp == 1:
        return units + layers, units, p + layers * unit
    return units, units, p


def _fsdp2(s: Shape, lay: Layout, cl: Cluster, p: float, m: int, mb_compute: float, unit: float,
           layers: int) -> float:
    """Exposed FSDP2 seconds per step: per unit and micro-batch an all-gather of its parameters (bf16 under
    bf16_params, else fp32) over dp_shard, a reduce-scatter of its fp32 gradients and, under HSDP, an
    all-reduce of the shard over dp_replicate, each call paying the link's α; plus FSDP2's copies, memory
    traffic on the rank's own device: before each all-gather the local shards are copied into one flat
    input (`_foreach_copy_`, read + write e·P/dp_shard), after it the flat output is copied out into the
    unsharded parameters (`split_with_sizes_copy`, read + write e·P), before each reduce-scatter the
    gradients are packed into one flat input (`chunk_cat`, read + write 4·P). Replicated (dp_shard = 1), FSDP2
    skips the all-gather but still copies the parameters into their unsharded tensors and packs the gradients
    (counted: 5 `chunk_cat` per step on HSDP 2x1). The copy-out runs on the compute stream and is never
    hidden; on a GPU the copy-in and the packing run on FSDP2's all-gather and reduce-scatter streams and hide
    with the collectives, on a CPU rank everything shares the one core. Collectives hide behind compute as
    `_hidden` says."""
    e = s.pb
    inner = lay.tp
    shard_link, shard_bw = cl.link(lay.dp_shard, inner)
    rep_link, rep_bw = cl.link(lay.dp_replicate, inner * lay.dp_shard)
    calls, units, gathered = fsdp2_units(lay, layers, p, unit)
    ag = shard_link.time("all_gather", e * gathered, lay.dp_shard, shard_bw, calls)
    rs = shard_link.time("reduce_scatter", 4 * p, lay.dp_shard, shard_bw, units)
    ar = rep_link.time("all_reduce", 4 * p / lay.dp_shard, lay.dp_replicate, rep_bw, units)
    hbm = cl.gemm.hbm_gbs * 1e9
    copy_in = 2 * e * gathered / lay.dp_shard if lay.dp_shard > 1 else 0.0  # no all-gather input over one rank
    copy_out, pack = 2 * e * gathered / hbm, 2 * 4 * p / hbm
    side = (copy_in / hbm + pack)  # on GPUs FSDP2 runs these on its all-gather / reduce-scatter streams
    exposed = copy_out + (side if cl.host_serial else 0.0)
    side = 0.0 if cl.host_serial else side
    if lay.pp > 1:  # pipelining defers the reduction to after the last micro-batch: exposed
        return ag * unit / p + rs + ar + exposed + side
    per_mb = ag + rs + ar + side
    return m * (_hidden(cl, per_mb, mb_compute, per_mb * unit / p) + exposed)


def _hidden(cl: Cluster, comm: float, compute: float, floor: float) -> float:
    """Exposed seconds of `comm` seconds of collectives issued alongside `compute` seconds of work. `cl.overlap`
    is what `bench comm` measures: the fraction of the shorter of an all-reduce and matmuls of equal length
    that hides when both run. On a GPU, NCCL runs on its own stream, so a collective hides behind at most
    that fraction of the compute around it (never better than `floor`, the first unit, exposed). On a CPU
    rank (`host_serial`) the collective's bytes are moved by the same core that computes (gloo's thread),
    so more compute cannot hide more of it: only the measured fraction of the collective itself hides."""
    if cl.host_serial:
        return comm - cl.overlap * min(comm, compute)
    return max(comm - cl.overlap * compute, floor)


def _grad_accumulation(s: Shape, lay: Layout, p: float, m: int) -> tuple[float, float]:
    """(per step, per micro-batch) HBM bytes that gradient accumulation and autocast add outside the GEMMs.
    Every micro-batch after the first adds its weight gradients into fp32 accumulators (read both, write
    one: 12 bytes per element; FSDP2 without PP accumulates its reduce-scattered shards, under PP the
    whole unsharded gradients; bf16 gradients under bf16_params without FSDP: 6 bytes), spread here over all
    m micro-batches; under autocast the bf16 weight gradient is first cast to fp32 (read 2, write 4) every
    micro-batch, and every weight is cast to bf16 once per step (read 4, write 2; the cast is cached across
    the step's micro-batches)."""
    whole = p / lay.dp_shard if uses_fsdp(lay) and lay.pp == 1 else p
    grad = 4 if uses_fsdp(lay) else s.pb
    per_mb = 3 * grad * whole * max(0, m - 1) / m
    if autocast(s, lay):
        return 6 * p, per_mb + 6 * p
    return 0.0, per_mb


def default_kernels(cl: Cluster) -> Kernels:
    """The local cluster runs on CPU; every other profile on GPUs."""
    return Kernels.for_device("cpu" if cl.name == "local" else "gpu")


def _local_params(s: Shape, lay: Layout, layers: int, first: bool, last: bool) -> float:
    unit = s.layer_params(lay.tp)
    return max(layers * unit + (s.vocab_params(lay.tp) if first else 0) + (s.vocab_params(lay.tp) if last else 0),
               unit)


def estimate_step_time(cfg: JobConfig, lay: Layout, cl: Cluster, kernels: Kernels | None = None) -> StepTime:
    """Seconds per optimizer step; `kernels` default: CPU for the local cluster, GPU otherwise."""
    s = Shape.of(cfg)
    k = kernels or default_kernels(cl)
    if cl.shared_hbm_gbs and lay.world > 1:  # the node's devices stream at once and share its memory bandwidth
        cl = replace(cl, gemm=replace(cl.gemm, hbm_gbs=min(cl.gemm.hbm_gbs, cl.shared_hbm_gbs)))
    gbs = cfg.train.global_batch
    m = lay.microbatches(gbs)
    plan = stage_plan(s, lay, all_ranks=False)  # the first or the last pipeline rank is the slowest
    hbm = cl.gemm.hbm_gbs * 1e9
    mbs, per_step = {}, {}
    for r, (layers, first, last, _) in plan.items():
        mb = _micro_batch(s, lay, cl, layers, first, last, k)
        once, every = _grad_accumulation(s, lay, _local_params(s, lay, layers, first, last), m)
        mbs[r], per_step[r] = replace(mb, bwd_weight=mb.bwd_weight + every / hbm), once / hbm
    slow = max(mbs, key=lambda r: mbs[r].total)
    mb = mbs[slow]
    layers, first, last, _ = plan[slow]
    compute = m * (mb.device + mb.host) + per_step[slow]
    tp_comm = m * mb.tp_comm + _tp_step_comm(s, lay, cl, layers, last)
    bubble = _bubble_fraction(lay, m, mb) * m * mb.total
    tokens = lay.micro_batch * s.seq
    p2p = 0.0
    if lay.pp > 1:  # a stage boundary that crosses nodes sets the pace when the pipeline spans nodes
        link, bw = cl.link(2, max(lay.tp * lay.dp, cl.devices_per_node if lay.world > cl.devices_per_node else 1))
        size = tokens * s.h * residual_bytes(s, lay) / (lay.tp if lay.sp else 1)
        p2p = (m * lay.virtual_stages + lay.pp - 1) * 2 * link.time("p2p", size, 2, bw)
    unit = s.layer_params(lay.tp)
    p = _local_params(s, lay, layers, first, last)
    dp = _dp_comm(s, lay, cl, p, m, mb.fwd + mb.bwd_input + mb.bwd_weight, unit, layers)
    opt_params = p / (lay.dp_shard if lay.sharding.startswith("fsdp") else
                      lay.dp if lay.sharding in ("zero1", "zero2", "zero3") else 1)
    optimizer = 40 * opt_params / (cl.gemm.hbm_gbs * 1e9)  # AdamW + norm/clip: ~40 B moved per local parameter
    if cl.host_serial:  # a GPU hides these launches behind the optimizer's kernels
        optimizer += optimizer_host_time(lay, cl, layers, first or last)
    mcfg = cfg.model
    if mcfg.vocab_size <= 0:
        mcfg = replace(mcfg, vocab_size=s.vocab)
    model_flops = flops_per_token(mcfg, s.seq, cfg.metrics.flops_convention) * gbs * s.seq
    mega = megatron_flops_per_iteration(mcfg, gbs, s.seq, recompute=lay.activation_checkpointing == "full")
    return StepTime(compute, m * mb.recompute, tp_comm, bubble, p2p, dp, optimizer, gbs * s.seq, lay.world,
                    model_flops, mega, cl.gemm.peak_tflops)
