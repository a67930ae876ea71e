"""Per-rank memory of one training step for a job and a layout (DESIGN.md §12).

Bytes are derived for exatrain's own Llama block (exatrain/model/llama.py) and engines, not for
GPT's: what autograd saves was read off the code and checked tensor by tensor (tests/test_planner_memory.py,
benchmarks/planner_memory.py). Per token of a micro-batch, per layer, with e bytes per activation
(bf16 2, fp32 4), t = TP degree, t_sp = t under sequence parallelism else 1:

  no recompute   norms 2·(4h [fp32 input copy] + 4h [normalised, CPU only: on GPU rms_norm is one fused op]
                 + 4 [rstd]) / t_sp, inputs of wq/wk/wv and of w1/w3 2·e·h (all-gathered under SP, whole),
                 attention q, k, v, out, wo input e·(h + 2·kv' + h + h)/t + 4·heads/t (logsumexp) where
                 kv' = h for SDPA (GQA heads are expanded before it) and the KV width for flash-attn, and
                 the wo input shares the attention output's storage except on CPU; SwiGLU 4·e·ffn/t.
                 Under autocast (train.dtype=bf16, every layout) the residual stream is fp32 and each of
                 wq/wk/wv, w1/w3 saves its own bf16 cast of the shared input (3·e·h more).
                 Korthikanti et al. (2022, Table 2) write sbh(34 + 5as/h) for GPT (fp16, 4h GELU MLP,
                 materialised scores); ours has no score matrix (flash/SDPA) but keeps fp32 norm inputs.
  selective      torch's op-level SAC keeps the block input, every mm/SDPA/collective output: wq/wk/wv
                 e·(h + 2·kv)/t, SDPA out + logsumexp, w1/w3 2·e·ffn/t, and, under TP, the two all-gathered
                 inputs and the two row-parallel partial sums whole (4·e·h), plus the reduce-scatter
                 outputs. Megatron's selective recompute re-gathers instead (34·sbh/t, Korthikanti Table 2).
  full           the block input e·h/t_sp (Korthikanti: 2sbh/t).

Schedules: micro-batches in flight on pipeline rank r are read off torch.distributed.pipelining's
own action lists (checked in the tests): GPipe m, 1F1B min(pp − r, m), Interleaved1F1B
min(v·m, (v−1)·pp + 2(pp−1−r) + 1) chunk-micro-batches (Megatron's 1 + (pp−1)/(pp·v) factor),
InterleavedZeroBubble min(v·m, v·pp) and ZBVZeroBubble min(2m, 2pp) (weight-gradient inputs live
until W), each chunk holding 1/v of the rank's layers.

Precision (exatrain.engine.native): train.dtype=bf16 is autocast over fp32 parameters on every layout
and engine, and autocast caches a bf16 cast of every matmul weight for the whole step (2 bytes per
unsharded parameter, under FSDP too: the cast outlives the resharded fp32 copy); bf16_params keeps bf16
parameters and gradients (2 + 2 bytes) with fp32 masters: FSDP2's MixedPrecisionPolicy (fp32 shards,
bf16 all-gathers) or, without FSDP, the ZeRO-1 optimizer's fp32 master slices (its slice is the whole
tensor without data parallelism); DeepSpeed's bf16 mode.

Model states per local parameter (after TP, before DP): native FSDP2 shards fp32 params, fp32
gradients and AdamW's two fp32 moments (16/dp_shard; the sharded fp32 params are the master copy) and
all-gathers parameter-dtype copies (ZeRO-3: the root unit of embedding/norm/head plus the current and
prefetched block, and one unit's unsharded gradients; zero_stage=2: every unit from forward to
backward); under PP torch's pipelining disables FSDP's reshard-after-backward and gradient sync
until the last micro-batch, so a stage also holds all its unsharded params and fp32 unsharded
gradient accumulators. Under TP, DTensor's embedding backward builds the whole-vocabulary gradient
on every TP rank, and AdamW's step on the vocab-sharded embedding a whole-vocabulary fp32 temporary
(both measured). Without accumulation, backward trades activations for gradients: the peak holds the
larger of the two. The ZeRO-1 optimizer (`zero_stage=1`, or bf16_params without FSDP;
exatrain.engine.optimizer, the Frontier paper's layout) keeps params and gradients whole in the
parameter dtype and 12/dp of optimizer state (fp32 master slice + two moments, in fp32 runs too); its
in-place reduce-scatter and its all-gather add fp32 buffers after backward (see `_optimizer_phase`).
DeepSpeed ZeRO-1/2/3 as in benchmarks/parallel_memory.py (fp32 master + moments = 12/dp,
params/grads in the parameter dtype by stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from exatrain.bench.layout import Layout
from exatrain.config import JobConfig
from exatrain.model.llama import ffn_hidden_dim
from exatrain.parallel.dims import ParallelDims
from exatrain.parallel.pipeline import local_stage_ids, stage_layer_counts

GIB = 2**30
DS_REDUCE_BUCKET = 5e8  # DeepSpeed reduce_bucket_size default (elements)


@dataclass(frozen=True)
class Kernels:
    """Device-dependent kernel facts that change what autograd saves."""

    fused_rms_norm: bool  # torch's rms_norm is one fused op on CUDA/ROCm (saves input + rstd), decomposed on CPU
    attention_out_copy: bool  # CPU SDPA returns a layout whose reshape for wo copies; GPU kernels share storage
    foreach_adam: bool  # AdamW defaults to foreach on GPU (one param-group-sized temporary), per tensor on CPU
    # gloo's reduce_scatter_tensor copies its whole input (measured on CPU); NCCL/RCCL reduce in place
    reduce_scatter_input_copy: bool = False

    @classmethod
    def for_device(cls, device: str, fake_collectives: bool = False) -> Kernels:
        """`fake_collectives`: torch's fake process group (FakeTensorMode measurements), which allocates nothing."""
        gpu = device != "cpu"
        if fake_collectives:
            return cls(fused_rms_norm=gpu, attention_out_copy=not gpu, foreach_adam=gpu)
        return cls(fused_rms_norm=gpu, attention_out_copy=not gpu, foreach_adam=gpu, reduce_scatter_input_copy=not gpu)


@dataclass(frozen=True)
class Shape:
    """The model facts the formulas need, from the job config."""

    h: int
    layers: int
    heads: int
    kv: int  # n_kv_heads x head_dim
    head_dim: int
    ffn: int
    vocab: int
    seq: int
    tied: bool
    e: int  # bytes per activation / compute-dtype element
    attention: str
    pb: int = 4  # bytes per parameter and gradient element: 2 under bf16_params, else fp32
    autocast: bool = False  # train.dtype=bf16: torch.autocast over fp32 parameters

    @classmethod
    def of(cls, cfg: JobConfig) -> Shape:
        m = cfg.model
        if m.attention not in ("sdpa", "flash"):
            raise ValueError(f"the memory model covers model.attention=sdpa|flash, not {m.attention!r}")
        vocab = m.vocab_size if m.vocab_size > 0 else cfg.data.tokenizer.vocab_size
        hd = m.dim // m.n_heads
        dtype = cfg.train.dtype
        return cls(m.dim, m.n_layers, m.n_heads, (m.n_kv_heads or m.n_heads) * hd, hd, ffn_hidden_dim(m), vocab,
                   cfg.data.seq_len, m.tie_embeddings, 4 if dtype == "fp32" else 2, m.attention,
                   2 if dtype == "bf16_params" else 4, dtype == "bf16")

    def layer_params(self, tp: int) -> float:
        """One block's parameters on one TP rank (norm weights are replicated)."""
        return (2 * self.h * self.h + 2 * self.h * self.kv + 3 * self.h * self.ffn) / tp + 2 * self.h

    def vocab_params(self, tp: int) -> float:
        return self.vocab * self.h / tp


def uses_fsdp(lay: Layout) -> bool:
    """The native engine wraps the model in FSDP2 (exatrain.parallel.parallelize.uses_fsdp)."""
    return lay.engine == "native" and lay.dp > 1 and lay.zero_stage != 1


def native_zero1(s: Shape, lay: Layout) -> bool:
    """The native engine steps exatrain's ZeRO-1 optimizer (exatrain.engine.optimizer.ZeroOneOptimizer):
    zero_stage=1 with data parallelism, and bf16_params without FSDP (its fp32 masters; one slice when dp=1)."""
    if lay.engine != "native":
        return False
    return lay.dp > 1 and lay.zero_stage == 1 or s.pb == 2 and not uses_fsdp(lay)


def autocast(s: Shape, lay: Layout) -> bool:
    """train.dtype=bf16 runs under torch.autocast on every layout and engine: fp32 weights and residual
    stream, bf16 matmuls."""
    return s.autocast


def residual_bytes(s: Shape, lay: Layout) -> int:
    """Bytes per element of the residual stream between blocks (fp32 under autocast)."""
    return 4 if autocast(s, lay) else s.e


def layer_activation_bytes(s: Shape, lay: Layout, k: Kernels, mode: str | None = None) -> float:
    """Bytes one block keeps from forward to backward, per token of the micro-batch, on one rank.
    Under autocast each of wq/wk/wv and w1/w3 saves its own bf16 cast of the shared input (3·e·h more)."""
    mode = mode or lay.activation_checkpointing
    e, h, t = s.e, s.h, lay.tp
    tsp = t if lay.sp else 1
    block_input = residual_bytes(s, lay) * h / tsp
    if mode == "full":
        return block_input
    if mode == "selective":
        if t == 1:
            whole = 2 * e * h  # wo and w2 outputs
        elif lay.sp:  # 2 all-gathered norm outputs (residual dtype) + 2 partial sums, + 2 reduce-scatter outputs
            whole = 2 * residual_bytes(s, lay) * h + 2 * e * h + 2 * e * h / t
        else:
            whole = 4 * e * h  # 2 partial sums + 2 all-reduce outputs
        attn = (e * h + 4 * s.heads) / t if s.attention == "sdpa" else 0.0  # flash-attn is not an aten SAC op
        return block_input + whole + e * (h + 2 * s.kv) / t + attn + 2 * e * s.ffn / t
    norms = 2 * (4 * h + (0 if k.fused_rms_norm else 4 * h) + 4) / tsp
    kvx = h if s.attention == "sdpa" else s.kv
    attn = e * (2 * h + 2 * kvx + (h if k.attention_out_copy else 0)) / t + 4 * s.heads / t
    inputs = (5 if autocast(s, lay) else 2) * e * h
    return norms + inputs + attn + 4 * e * s.ffn / t


def stage_io_bytes(s: Shape, lay: Layout, first: bool) -> float:
    """Per token per micro-batch in flight on a stage, outside the blocks: RoPE cos/sin (fp32, shared by
    all layers), the pipeline's retained stage input/output, token ids and positions on the first stage."""
    tsp = lay.tp if lay.sp else 1
    out = 4.0 * s.head_dim
    if lay.pp > 1:
        out += 2 * residual_bytes(s, lay) * s.h / tsp
    if first:
        out += 24.0  # int64 tokens, positions, document ids
    return out


def head_bytes(s: Shape, lay: Layout, k: Kernels) -> tuple[float, float]:
    """(kept, transient) per token of one micro-batch on the last stage: final norm, head input, and the
    logits: fp32 log-softmax kept for backward; bf16 logits, their fp32 copy and gradients at the peak."""
    tsp = lay.tp if lay.sp else 1
    vl = s.vocab / lay.tp if lay.tp > 1 else s.vocab  # loss parallel keeps logits vocab-sharded
    norm = (4 * s.h + (0 if k.fused_rms_norm else 4 * s.h) + 4) / tsp
    kept = norm + s.e * s.h + 4 * vl
    transient = (s.e + 4 + 4) * vl if s.e == 2 else 8 * vl
    return kept, transient


def in_flight(lay: Layout, m: int, rank: int) -> int:
    """Chunk-micro-batches whose activations pipeline rank `rank` holds at its peak."""
    pp, v = lay.pp, lay.virtual_stages
    if pp == 1:
        return 1
    sched = lay.schedule
    if sched == "GPipe":
        return m
    if sched == "1F1B":
        return min(pp - rank, m)
    if sched == "Interleaved1F1B":
        return min(v * m, (v - 1) * pp + 2 * (pp - 1 - rank) + 1)
    if sched == "InterleavedZeroBubble":
        return min(v * m, v * pp)
    if sched == "ZBVZeroBubble":
        return min(2 * m, 2 * pp)
    raise ValueError(f"unknown pipeline schedule {sched!r}")


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank at its peak; `transient` is the largest short-lived allocation on top."""

    pp_rank: int
    params: float
    grads: float
    optimizer: float
    buffers: float  # unsharded FSDP/ZeRO-3 copies, autocast weight casts, DeepSpeed buckets
    activations: float
    transient: float
    optimizer_step: float  # the peak during the optimizer step (activations freed)
    grads_in_backward: bool  # gradients of earlier micro-batches (or persistent buffers) coexist with activations
    backward: float = 0.0  # the forward/backward peak from a phase-by-phase model, where there is one (FSDP2 ZeRO-3)
    step_grads: float = -1.0  # gradient bytes the optimizer steps on (ZeRO-1/DeepSpeed: fp32 partitions); -1: grads

    @property
    def optimizer_grads(self) -> float:
        return self.grads if self.step_grads < 0 else self.step_grads

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def backward_peak(self) -> float:
        """Held gradients add to the activations; otherwise backward trades activations for gradients."""
        if self.backward:
            return self.backward
        held = self.grads + self.activations if self.grads_in_backward else max(self.grads, self.activations)
        return self.params + held + self.optimizer + self.buffers + self.transient

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.optimizer_step)


@dataclass(frozen=True)
class MemoryEstimate:
    ranks: list[RankMemory]
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def peak(self) -> float:
        return self.worst.peak


def stage_plan(s: Shape, lay: Layout, all_ranks: bool = True) -> dict[int, tuple[int, bool, bool, int]]:
    """pp rank -> (layers, has embedding, has head, local chunks). Without `all_ranks` only the first and
    last ranks, which bound every other (most layers, most micro-batches in flight, embedding; head)."""
    dims = ParallelDims(lay.pp, lay.dp_replicate, lay.dp_shard, lay.tp, lay.world, lay.virtual_stages, 1)
    counts = stage_layer_counts(s.layers, dims.n_stages, [])
    out = {}
    for r in range(lay.pp) if all_ranks else sorted({0, lay.pp - 1}):
        ids = local_stage_ids(r, dims, lay.schedule) if lay.pp > 1 else [0]
        out[r] = (sum(counts[i] for i in ids), 0 in ids, dims.n_stages - 1 in ids, len(ids))
    return out


def _states(s: Shape, lay: Layout, p: float, unit: float, root: float, embed: float,
            head: float) -> tuple[float, ...]:
    """(params, grads, optimizer, held buffers, gathered, reduce) bytes for `p` local parameters; `unit` is one
    block, `root` the root FSDP unit (embedding, final norm, head), `embed` and `head` the embedding's and the
    output head's shares of `p`. `gathered`: unsharded parameters alive while any block computes (forward,
    recompute, the head's backward); `reduce`: the largest moment of a gradient reduction in backward."""
    g, dp, ds = s.pb, lay.dp, lay.dp_shard  # g: parameter (and all-gathered) element bytes
    shard = lay.sharding
    casts = 2 * (p - embed) if autocast(s, lay) else 0.0  # bf16 cast of every matmul weight, cached for the step
    if lay.engine == "deepspeed":
        master = 12 * p / dp
        if shard == "zero3":
            return g * p / dp, g * p / dp, master, casts, 2 * g * unit, 0.0
        grads = g * p if shard in ("none", "zero1") else g * p / dp + g * min(p, DS_REDUCE_BUCKET)
        return g * p, grads, master, casts, 0.0, 0.0
    if native_zero1(s, lay):  # params and gradients whole; fp32 master slices + moments: 12 bytes / dp
        return g * p, g * p, 12 * p / dp, casts, 0.0, 0.0
    if lay.dp == 1:
        return 4 * p, 4 * p, 8 * p, casts, 0.0, 0.0
    sharded = 4 * p / ds
    if lay.pp > 1:  # pipelining keeps every unit unsharded and accumulates fp32 unsharded grads until the last
        return sharded, sharded, 2 * sharded, g * p + 4 * p + casts, 0.0, 0.0
    # A unit's reduce-scatter holds its unsharded gradients (+ their fp32 copy under bf16_params: reduce_dtype
    # fp32) while the output head's unsharded gradient waits for the root unit's reduction at the end of backward.
    rs = g + (4 if g == 2 else 0)
    if lay.zero_stage == 2:  # gathered from forward until each unit's backward
        return sharded, sharded, 2 * sharded, g * p + casts, 0.0, max(g * head + rs * unit, rs * root)
    # zero_stage 3: the root stays gathered through forward and backward, plus the current and prefetched block;
    # during a block's reduction the next block is gathered, at the end only the root
    gathered = g * (root + 2 * unit)
    return (sharded, sharded, 2 * sharded, casts, gathered,
            max(g * (root + unit + head) + rs * unit, g * root + rs * root))


def _largest(s: Shape, lay: Layout, layers: int, first: bool, last: bool) -> float:
    """Elements of the largest local parameter tensor."""
    vocab = s.vocab_params(lay.tp) if first or last else 0.0
    return max(vocab, s.h * s.ffn / lay.tp if layers else 0.0, s.h * max(s.h, s.kv) / lay.tp if layers else 0.0)


def _adam_temporary(s: Shape, lay: Layout, k: Kernels, layers: int, largest: float) -> float:
    """AdamW's step temporaries: foreach (GPU) allocates one fp32 tensor per parameter of the largest
    group (the hidden matrices) at once; per-tensor (CPU) about two of the largest tensor."""
    if lay.sharding == "none":
        opt_div = 1
    else:
        opt_div = lay.dp_shard if uses_fsdp(lay) else lay.dp
    if k.foreach_adam:
        hidden = layers * (s.layer_params(lay.tp) - 2 * s.h)
        return 4 * hidden / opt_div
    return 8 * largest / opt_div


def _optimizer_phase(s: Shape, lay: Layout, k: Kernels, states: tuple[float, float, float], p: float, layers: int,
                     first: bool, last: bool) -> float:
    """Peak bytes after backward (activations freed): the data-parallel reduction and the optimizer step.

    The ZeRO-1 optimizer (exatrain.engine.optimizer.ZeroOneOptimizer.reduce_grads) allocates one fp32
    (dp x Σ chunks) send buffer while every gradient is still alive (4 bytes per parameter on top of them),
    copies each gradient into it and frees it; the reduce-scatter then adds the received fp32 slice (4/dp,
    kept as the master gradients) and, on gloo, the collective's own copy of its input. After AdamW on the
    slices, the slices are concatenated and all-gathered into a whole fp32 buffer (4 bytes per parameter)
    that each parameter copies from through one strided column (one copy of the largest tensor)."""
    params, grads, opt = states
    largest = _largest(s, lay, layers, first, last)
    adam = _adam_temporary(s, lay, k, layers, largest)
    if native_zero1(s, lay):
        slices = 4 * p / lay.dp
        send = params + opt + 4 * p  # the send buffer; the gradients are freed as they are copied into it
        reduce = max(send + grads, send + slices + (4 * p if k.reduce_scatter_input_copy else 0.0))
        step = params + opt + slices + adam
        gather = params + opt + 2 * slices + 4 * p + 4 * largest
        return max(reduce, step, gather)
    step = params + grads + opt + adam
    if first and lay.tp > 1:  # AdamW on the vocab-sharded embedding materialises a whole-vocabulary fp32 tensor
        step += 4 * s.vocab * s.h * (1 - 1 / lay.tp)
    return step


def estimate_memory(cfg: JobConfig, lay: Layout, kernels: Kernels | None = None,
                    all_ranks: bool = True) -> MemoryEstimate:
    """Peak bytes of every pipeline rank (ranks of one stage are alike up to a few norm weights); without
    `all_ranks` only the first and last pipeline ranks, one of which is the most loaded."""
    s = Shape.of(cfg)
    k = kernels or Kernels.for_device("cpu")
    m = lay.microbatches(cfg.train.global_batch) if lay.pp > 1 else 1
    tokens = lay.micro_batch * s.seq
    per_layer = layer_activation_bytes(s, lay, k)
    if lay.activation_checkpointing == "selective" and lay.pp > 1 and lay.schedule in (
            "InterleavedZeroBubble", "ZBVZeroBubble"):
        # split backward forbids op-level SAC: every other block is fully checkpointed instead
        per_layer = (layer_activation_bytes(s, lay, k, "full") + layer_activation_bytes(s, lay, k, "none")) / 2
    recompute = layer_activation_bytes(s, lay, k, "none") - per_layer  # one block re-run in backward
    ranks = []
    for r, (layers, first, last, chunks) in stage_plan(s, lay, all_ranks).items():
        held = in_flight(lay, m, r)
        p = layers * s.layer_params(lay.tp)
        root = (s.vocab_params(lay.tp) if first else 0) + (s.vocab_params(lay.tp) + s.h if last else 0)
        if s.tied and first and last:
            root -= s.vocab_params(lay.tp)
        p += root
        embed = s.vocab_params(lay.tp) if first else 0.0
        head = s.vocab_params(lay.tp) if last else 0.0
        params, grads, opt, buffers, gathered, reduce = _states(s, lay, p, s.layer_params(lay.tp), root, embed, head)
        acts = held * tokens * (per_layer * layers / chunks + stage_io_bytes(s, lay, first))
        transient = max(gathered + recompute * tokens, reduce)
        if last:
            kept, peak = head_bytes(s, lay, k)
            logits_held = m if lay.schedule == "GPipe" and lay.pp > 1 else 1
            acts += logits_held * kept * tokens
            transient = max(transient, gathered + peak * tokens)
        embed_grad = 0.0
        if first and lay.tp > 1:  # DTensor's embedding backward builds the whole-vocabulary gradient on every TP rank
            embed_grad = s.pb * s.vocab * s.h * (1 - 1 / lay.tp)
            transient = max(transient, embed_grad)
        # one micro-batch: gradients are created while backward frees the activations (native engine: the
        # previous step's gradients are gone, set to None by the optimizer or by ZeRO-1's reduce-scatter)
        held_grads = not (lay.microbatches(cfg.train.global_batch) == 1 and lay.engine == "native")
        step = _optimizer_phase(s, lay, k, (params, grads, opt), p, layers, first, last)
        backward = 0.0
        if uses_fsdp(lay) and lay.pp == 1 and lay.zero_stage == 3:
            head_kept = head_bytes(s, lay, k)[0] * tokens if last else 0.0
            backward = _fsdp3_backward(s, lay, (params + opt + buffers, grads, acts, acts - head_kept), layers, root,
                                       head, gathered, (recompute * tokens, head_bytes(s, lay, k)[1] * tokens
                                                        if last else 0.0, embed_grad), held_grads)
        step_grads = 4 * p / lay.dp if native_zero1(s, lay) or lay.engine == "deepspeed" else -1.0
        ranks.append(RankMemory(r, params, grads, opt, buffers, acts, transient, step, held_grads, backward,
                                step_grads))
    return MemoryEstimate(ranks)


def _fsdp3_backward(s: Shape, lay: Layout, held: tuple[float, float, float, float], layers: int, root: float,
                    head: float, gathered: float, transients: tuple[float, float, float], accumulating: bool) -> float:
    """FSDP2 ZeRO-3 forward/backward peak, phase by phase (checked against MemTracker at the Frontier shapes):
    the head's backward (logits gradients; the root and two blocks gathered), a recomputed block, a block's
    reduce-scatter (the root and, but for the last block reduced, the next block gathered; the block's unsharded
    gradients and their fp32 copy; the output head's unsharded gradient waiting for the root's reduction;
    sharded gradients of the blocks done so far and activations of the blocks still to go, which one
    micro-batch trades: the first and the last block reduced bound the others), and the root's own
    reduction at the end (after the embedding's backward). `held` = (params + optimizer + buffers, sharded
    gradients, activations, block activations); `transients` = (recompute, head backward, embedding gradient)."""
    base, grads, acts, block_acts = held
    recompute, head_peak, embed_grad = transients
    e, unit, ds = s.pb, s.layer_params(lay.tp), lay.dp_shard  # e: the all-gathered parameter dtype
    # FSDP2's foreach_reduce copies a unit's unsharded gradients into a flat fp32 input (reduce_dtype fp32), frees
    # them, then allocates the sharded output: 4 bytes + the larger of the two per element
    rs = 4 + max(e, 4 / ds)
    block_grads = 4 * layers * unit / ds
    earlier = grads if accumulating else 0.0
    phases = [base + acts + earlier + gathered + max(head_peak, recompute)]
    if layers:  # the first block reduced has the next one gathered and the others' activations; the last, all grads
        first = e * unit * (layers > 1) + 4 * unit / ds + block_acts * (layers - 1) / layers
        so_far = grads + block_acts + e * unit if accumulating else max(first, block_grads)
        phases.append(base + e * (root + head) + rs * unit + so_far)
    # the root's reduction; under TP the embedding's whole-vocabulary gradient adds about twice its size (DTensor's
    # replicated result and the copies made to shard it; measured at the 175B shape)
    phases.append(base + (grads if accumulating else block_grads) + e * root + 4 * root
                  + max(e * root + 2 * embed_grad, 4 * root / ds))
    return max(phases)


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, layers: int, t: int, sp: bool,
                                 recompute: str) -> float:
    """All layers' activation bytes of a GPT model per Korthikanti et al. 2022, Table 2 (16-bit, with
    dropout masks and materialised attention scores); recompute none | selective | full."""
    sbh = s * b * h
    if recompute == "full":
        per = 2 * sbh / (t if sp else 1)
    elif recompute == "selective":
        per = 34 * sbh / t if sp else sbh * (10 + 24 / t)
    elif sp:
        per = sbh / t * (34 + 5 * a * s / h)
    else:
        per = sbh * (10 + 24 / t + 5 * a * s / (h * t))
    return per * layers

