"""Typed job configuration: nested dataclasses, loaded from YAML plus dotlist overrides.

OmegaConf structured configs give us type checking and unknown-key rejection for free;
`validate` adds the cross-field checks (divisibility, ranges) with messages that say
what to change. Every section lives here so there is one place to read a job's knobs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


@dataclass
class S2Config:
    """S2-Attention pattern (DESIGN.md §4); used when model.attention == "s2"."""

    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    homo_head: bool = False
    num_dense_heads: int = 0
    dense_layers: list[int] = field(default_factory=list)
    dense_period: int = 0


@dataclass
class MupConfig:
    """CerebrasGPT-style muP (DESIGN.md §8)."""

    enabled: bool = False
    base_dim: int = 256
    emb_mult: float = 10.0
    res_mult: float = 1.0


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    multiple_of: int = 64
    vocab_size: int = 0
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention: str = "sdpa"
    s2: S2Config = field(default_factory=S2Config)
    mup: MupConfig = field(default_factory=MupConfig)


@dataclass
class TokenizerConfig:
    """kind bpe: byte-level BPE trained on the job's documents (cached; shipped for the default corpus);
    kind byte: 256 bytes + specials. path: load this tokenizer.json instead (needs <bos>, <eos>, <pad>)."""

    kind: str = "bpe"
    vocab_size: int = 4096
    path: str = ""


@dataclass
class MecoConfig:
    """Metadata conditioning then cooldown (DESIGN.md §5). field url: the URL's host without www.;
    any other field is used verbatim. missing: what to do with documents without it (fallback/skip/error)."""

    enabled: bool = False
    field: str = "url"
    template: str = "URL: {value}\n\n"
    cooldown_fraction: float = 0.1
    missing: str = "fallback"
    fallback: str = "unknown"


@dataclass
class DataConfig:
    """paths: JSONL ({"text", "url", ...}) or plain-text files (one document each), .gz too, or directories
    of them; empty = the embedded default corpus (exatrain.data.documents)."""

    paths: list[str] = field(default_factory=list)
    seq_len: int = 256
    val_fraction: float = 0.05
    shuffle_seed: int = 1234
    document_masking: bool = True
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    meco: MecoConfig = field(default_factory=MecoConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """LR schedule as a function of tokens seen (DESIGN.md §8; exatrain/train/schedules.py).

    warmup_steps counts steps at the configured batch and becomes a token count
    (warmup_steps * global_batch * seq_len), so a batch-size change does not move it.
    decay_fraction/decay_kind shape the final decay of wsd and power (cosine decays after
    warmup, constant never). power ignores optim.lr: lr = min(power_lr_max, batch_seqs * power_a * tokens^power_b).
    """

    name: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    decay_kind: str = "linear"
    min_lr_ratio: float = 0.1
    power_a: float = 4.0
    power_b: float = -0.51
    power_lr_max: float = 0.02


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16
    micro_batch: int = 8
    seed: int = 0
    dtype: str = "fp32"
    activation_checkpointing: str = "none"
    compile: bool = False
    device: str = "auto"
    eval_every: int = 50
    eval_batches: int = 4
    nan_policy: str = "skip"


@dataclass
class ParallelConfig:
    """Layout (exatrain.parallel, DESIGN.md §2): degrees tp·pp·dp_replicate·dp_shard = world size, one may be
    -1 (inferred). zero_stage: native FSDP2 3 = reshard after forward, 2 = keep gathered until backward;
    deepspeed 1/2/3. pp_microbatches: pipeline micro-batches per train.micro_batch (0 = one sequence each).
    pp_stage_layers: layers per stage (empty = balanced). init: full = single-process init then shard
    (identical across layouts), sharded = init the local shards only (O(params/ranks) memory)."""

    tp: int = 1
    pp: int = 1
    dp_shard: int = -1
    dp_replicate: int = 1
    engine: str = "native"
    zero_stage: int = 3
    sequence_parallel: bool = True
    loss_parallel: bool = True
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0
    pp_virtual_stages: int = 1
    pp_stage_layers: list[int] = field(default_factory=list)
    init: str = "full"
    timeout_s: int = 600


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    resume: str = "auto"
    save_final: bool = True


@dataclass
class MetricsConfig:
    """Per-step logging (exatrain.train.metrics). peak_tflops > 0 replaces the device's peak (dense TFLOP/s
    per torch device, e.g. per MI250X GCD) as the MFU denominator; needed for GPUs not in exatrain.bench.peak."""

    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float = 0.0


@dataclass
class LaunchConfig:
    """Slurm submission (exatrain.launch). cluster names a profile in configs/clusters/ (or a YAML path);
    0 / "" take the profile's value. sbatch_extra and srun_extra are long options ("--mem=0")."""

    cluster: str = "local"
    nodes: int = 1
    tasks_per_node: int = 0
    cpus_per_task: int = 0
    time_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    sbatch_extra: list[str] = field(default_factory=list)
    srun_extra: list[str] = field(default_factory=list)
    signal_s: int = 90
    max_requeues: int = 5


@dataclass
class JobConfig:
    name: str = "tiny"
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_CHOICES = {
    "model.attention": ("sdpa", "flash", "s2", "reference"),
    "data.tokenizer.kind": ("bpe", "byte"),
    "data.meco.missing": ("fallback", "skip", "error"),
    "schedule.name": ("constant", "cosine", "wsd", "power"),
    "schedule.decay_kind": ("linear", "exponential", "cosine"),
    "train.dtype": ("fp32", "bf16"),
    "train.activation_checkpointing": ("none", "selective", "full"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nan_policy": ("skip", "raise"),
    "parallel.engine": ("native", "deepspeed"),
    "parallel.init": ("full", "sharded"),
    "parallel.pp_schedule": ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"),
}


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    builtin = CONFIG_DIR / p
    if builtin.exists():
        return builtin
    raise ConfigError(f"config file not found: {path} (also looked in {CONFIG_DIR})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load defaults <- YAML file <- dotlist overrides, then validate."""
    schema = OmegaConf.structured(JobConfig)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(_resolve_path(path)))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: JobConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" key {key!r}" if key else ""
        raise ConfigError(f"invalid config{where}: {str(exc).splitlines()[0]}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> JobConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), d))  # type: ignore[return-value]


def _get(cfg: JobConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: JobConfig) -> None:
    """Single-process checks; layout checks against the world size live in parallel.dims."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        _require(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "max_seq_len"):
        _require(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _require(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    kv = m.n_kv_heads or m.n_heads
    _require(m.n_heads % kv == 0, "model.n_kv_heads", f"{kv} must divide model.n_heads={m.n_heads}")
    _require((m.dim // m.n_heads) % 2 == 0, "model.dim", "head dim (dim / n_heads) must be even for RoPE")
    if m.attention == "s2":
        s2, group = m.s2, m.n_heads // kv
        _require(s2.block_size >= 16 and s2.block_size & (s2.block_size - 1) == 0, "model.s2.block_size",
                 f"must be a power of two >= 16 (kernel tiles), got {s2.block_size}")
        _require(s2.local_blocks >= 1, "model.s2.local_blocks", f"must be >= 1 (the diagonal block), got {s2.local_blocks}")
        _require(s2.vert_stride >= 1, "model.s2.vert_stride", f"must be >= 1, got {s2.vert_stride}")
        _require(0 <= s2.num_dense_heads <= m.n_heads and s2.num_dense_heads % group == 0, "model.s2.num_dense_heads",
                 f"must be in [0, {m.n_heads}] and a multiple of the GQA group size {group}, got {s2.num_dense_heads}")
        _require(s2.dense_period >= 0, "model.s2.dense_period", f"must be >= 0 (0: none), got {s2.dense_period}")
        _require(all(0 <= i < m.n_layers for i in s2.dense_layers), "model.s2.dense_layers",
                 f"layer indices must be in [0, {m.n_layers}), got {s2.dense_layers}")
    d = cfg.data
    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _require(d.tokenizer.vocab_size >= 259 or d.tokenizer.kind == "byte", "data.tokenizer.vocab_size",
             "a BPE vocabulary needs at least 259 entries (256 bytes + special tokens)")
    _require(0.0 <= d.meco.cooldown_fraction < 1.0, "data.meco.cooldown_fraction", "must be in [0, 1)")
    _require("{value}" in d.meco.template, "data.meco.template", "must contain the '{value}' placeholder")
    try:
        d.meco.template.format(value="example.org")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"data.meco.template: {d.meco.template!r} is not a valid format string with only "
                          f"{{value}} ({exc!r}); write literal braces as '{{{{' and '}}}}'") from None
    _require(bool(d.meco.field.strip()), "data.meco.field", "must name a document field, e.g. url or topic")
    _require(d.meco.missing != "fallback" or bool(d.meco.fallback.strip()), "data.meco.fallback",
             "must be non-empty when data.meco.missing=fallback")
    o = cfg.optim
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    s = cfg.schedule
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    _require(0.0 <= s.decay_fraction < 1.0, "schedule.decay_fraction", "must be in [0, 1)")
    _require(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
    _require(s.power_b < 0, "schedule.power_b", f"must be negative (the LR decays as tokens^b), got {s.power_b}")
    _require(s.power_a > 0, "schedule.power_a", "must be positive")
    _require(s.power_lr_max > 0, "schedule.power_lr_max", "must be positive")
    mp = m.mup
    _require(mp.base_dim > 0, "model.mup.base_dim", "must be positive")
    _require(mp.emb_mult > 0, "model.mup.emb_mult", "must be positive")
    _require(mp.res_mult > 0, "model.mup.res_mult", "must be positive")
    t = cfg.train
    _require(t.steps > 0, "train.steps", "must be positive")
    _require(t.micro_batch > 0 and t.global_batch > 0, "train.micro_batch", "batch sizes must be positive")
    _require(t.global_batch % t.micro_batch == 0, "train.global_batch",
             f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    _require(cfg.metrics.log_every >= 1, "metrics.log_every", "must be >= 1")
    _require(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops", "must be >= 0 (0 = look up or measure)")
    c = cfg.checkpoint
    _require(c.every >= 0 and c.keep >= 1, "checkpoint.keep", "keep must be >= 1 and every >= 0")
    p = cfg.parallel
    for key in ("tp", "pp", "dp_shard", "dp_replicate"):
        _require(getattr(p, key) == -1 or getattr(p, key) >= 1, f"parallel.{key}", "must be >= 1 or -1 (infer)")
    _require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", "must be 1, 2 or 3")
