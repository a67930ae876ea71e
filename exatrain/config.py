"""Typed job configuration: nested dataclasses, loaded from YAML plus dotlist overrides.

Every section lives here so there is one place to read a job's knobs. A config goes through
three stages, each once (`load_config` does all three):

1. parse (`parse_config`): defaults <- YAML file <- dotlist overrides; OmegaConf structured configs
   reject unknown keys and wrong types;
2. resolve (`resolve_config`): derived values are filled in place (vocabulary size from the
   tokenizer, FFN width, KV heads, a method's callbacks), by resolvers the owning modules register;
3. validate (`validate`): ranges and cross-field checks with messages that say what to change;
   allowed choices come from the registries (exatrain.registry), and each method validates its
   own section through a registered validator (S2 in exatrain.model.s2, MeCo in exatrain.train.meco).

Layout checks that need the world size live in exatrain.parallel.dims and run when it is known.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from exatrain.errors import ConfigError
from exatrain.registry import ATTENTION, CALLBACKS, CONVERTERS, ENGINES, RESOLVERS, SCHEDULES, VALIDATORS, load_plugins

__all__ = ["ConfigError", "JobConfig", "finalize_config", "load_config", "parse_config", "resolve_config", "validate"]


@dataclass
class S2Config:
    """S2-Attention pattern (DESIGN.md §4); used when model.attention == "s2"."""

    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    homo_head: bool = False
    num_dense_heads: int = 0  # query heads, the last KV groups; a multiple of the GQA group size
    head_sliding_offset: int = 0  # stride phase of head 0: 0 as in DKernel (reads block 0), 1 as in Phi-3-small
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
    vocab_multiple_of: int = 1  # pad the vocabulary (Megatron's make-vocab-size-divisible-by)
    attention: str = "sdpa"
    converters: list[str] = field(default_factory=list)  # exatrain.registry.CONVERTERS, applied in order
    init_from: str = ""  # hf:PATH starts from a Hugging Face Llama directory's weights (exatrain.interop.hf)
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
    """Metadata conditioning then cooldown (DESIGN.md §5). field url: the value MeCo's code writes
    (url_value meco) or the normalised host (url_value host); any other field is used verbatim.
    missing: what to do with documents without it (fallback/skip/error)."""

    enabled: bool = False
    field: str = "url"
    url_value: str = "meco"  # meco: re.sub(r'https?://', '', url).split('/')[0]; host: lower-case, no www./port
    template: str = "URL: {value}\n\n"
    cooldown_fraction: float = 0.1
    missing: str = "fallback"
    fallback: str = "unknown"


@dataclass
class DataConfig:
    """paths: JSONL ({"text", "url", ...}) or plain-text files (one document each), .gz too, or directories
    of them; empty = the embedded default corpus (exatrain.data.documents). cache_dir: trained
    tokenizers and tokenized arrays ("" = $EXATRAIN_CACHE, else ~/.cache/exatrain)."""

    paths: list[str] = field(default_factory=list)
    format: str = "text"  # text: data.paths, tokenized and cached here; megatron: data.megatron_prefixes
    megatron_prefixes: list[str] = field(default_factory=list)  # "PREFIX" or "WEIGHT PREFIX" (.bin/.idx pairs)
    prepare_timeout_s: float = 86400.0  # how long other ranks wait for rank 0 to tokenize (not parallel.timeout_s)
    cache_dir: str = ""
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
    dtype: str = "fp32"  # fp32 | bf16 (autocast: bf16 compute, fp32 params) | bf16_params (bf16 params, fp32 master)
    activation_checkpointing: str = "none"
    compile: bool = False
    device: str = "auto"
    eval_every: int = 50
    eval_batches: int = 4
    nan_policy: str = "skip"
    spike_policy: str = "none"  # none | skip | rollback (exatrain.train.guard)
    spike_threshold: float = 3.0  # a spike: loss > threshold x median of the previous spike_window losses
    spike_window: int = 50
    spike_warmup: int = 20  # steps before the spike rule applies
    callbacks: list[str] = field(default_factory=list)  # exatrain.registry.CALLBACKS, after the methods' own
    stop_signal: str = "SIGUSR2"  # checkpoint and stop at the next step on this signal ("" = none)


@dataclass
class ParallelConfig:
    """Layout (exatrain.parallel, DESIGN.md §2): degrees tp·pp·dp_replicate·dp_shard = world size, one may be
    -1 (inferred). zero_stage: native 3 = FSDP2 resharding after forward, 2 = FSDP2 keeping parameters
    gathered until backward, 1 = ZeRO-1 (replicated parameters and gradients, sharded optimizer states,
    composes with tp and pp: the Frontier paper's layout); deepspeed 1/2/3. pp_microbatches: pipeline
    micro-batches per train.micro_batch (0 = one sequence each). pp_stage_layers: layers per stage (empty = balanced). init: full = single-process init then shard
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
    watchdog_s: float = -1  # report a rank with no progress for this long (stack dump); -1: timeout_s / 2, 0: off


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    resume: str = "auto"
    save_final: bool = True


@dataclass
class MetricsConfig:
    """Per-step logging (exatrain.train.metrics). peak_tflops > 0 replaces the device's peak (dense TFLOP/s
    per torch device, e.g. per MI250X GCD) as the MFU denominator; needed for GPUs not in exatrain.bench.peak.
    flops_convention: the attention term of model FLOPs, palm (full T x T, PaLM/torchtitan) or megatron
    (causal half, Megatron-LM); exatrain.bench.flops."""

    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float = 0.0
    flops_convention: str = "palm"


@dataclass
class SendConfig:
    """SeND, sensitive neuron dropout (DESIGN.md §6; exatrain.train.send, exatrain.train.send_tracking).
    Every interval/window steps the `prompts` (JSONL with "prompt" or "text", or one prompt per line)
    are run through the model and block `layer`'s units at each prompt's last token are recorded; every
    `interval` steps the last `window` records rank the units, and the top `fraction` are dropped for the
    next interval. site: residual (the block's output) | mlp (its SwiGLU hidden units). layer: block
    index, negative from the end (-2 = penultimate, as the paper). variant: mask (a {0,1} buffer, exact
    for the interval) | zero_weights (the authors': zero the units' MLP weights every interval/window
    steps, `zero_repeats` times, and let the optimizer regrow them; site mlp only). reset_at_end: lift
    the mask after the last step, so the final model uses every unit."""

    enabled: bool = False
    interval: int = 60
    window: int = 3
    fraction: float = 0.2
    site: str = "residual"
    layer: int = -2
    prompts: str = ""
    max_prompts: int = 64
    variant: str = "mask"
    zero_repeats: int = 3
    reset_at_end: bool = True


@dataclass
class EigenScoreConfig:
    """EigenScore / EES of sampled answers (DESIGN.md §6; exatrain.eval.eigenscore, exatrain.eval.eigenscore_run).
    k samples per prompt (temperature, top_p, top_k, max_new_tokens), block `layer`'s state at each
    one's last token (null = the middle block, INSIDE's; negative from the end); methods: exact,
    chebyshev (the paper's EES), slq; alpha, moments (Chebyshev degree = Lanczos steps), probes.
    prompts: as send.prompts (empty: send.prompts, else the held-out documents' first tokens).
    every > 0: during training, rank 0 scores every checkpoint whose step is a multiple of it (and the
    final one) and logs es_<method> in the eval records; `exatrain eval RUN --eigenscore` scores a run.
    sample_seed seeds the sampling and the estimators' probes (its own generators: training is unchanged)."""

    every: int = 0
    k: int = 10
    temperature: float = 0.5
    top_p: float = 0.99
    top_k: int = 10
    max_new_tokens: int = 16
    layer: int | None = None
    methods: list[str] = field(default_factory=lambda: ["exact", "chebyshev", "slq"])
    alpha: float = 1e-3
    moments: int = 20
    probes: int = 20
    prompts: str = ""
    max_prompts: int = 32
    sample_seed: int = 0


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
    # Stop with a checkpoint once the time left < stop_margin x (iteration + checkpoint write), both measured
    # (exatrain.train.deadline); save_s is the write time assumed until one is measured. stop_margin 0: off.
    stop_margin: float = 1.5
    save_s: int = 120


@dataclass
class Fp8Config:
    """Real FP8 GEMMs through torchao (precision.gemm=fp8; exatrain.train.precision). recipe: tensorwise (e4m3
    forward, e5m2 gradients, one dynamic scale per tensor), rowwise, rowwise_with_gw_hp. fsdp_float8_all_gather:
    FSDP2 all-gathers the weights in float8 (tensorwise only). power_of_two_scales: round every scale down to a
    power of two (null: the recipe's default, on for the rowwise recipes). float8_tp_styles: torchao's float8
    DTensor styles for the block projections under TP (tensorwise only; not with sequence parallelism on gloo).
    divisible_by: a Linear with a dimension not divisible by it stays high precision (GPU fp8 GEMMs need 16)."""

    recipe: str = "tensorwise"
    fsdp_float8_all_gather: bool = False
    power_of_two_scales: bool | None = None
    float8_tp_styles: bool = False
    divisible_by: int = 16


@dataclass
class Mxfp8Config:
    """MX block-scaled FP8 through torchao's prototype MXFP8Linear (precision.gemm=mxfp8): e4m3 elements in blocks
    of 32 with E8M0 scales. The mxfp8_emulated_* recipes run anywhere (CPU too); the others need SM100 kernels."""

    recipe: str = "mxfp8_emulated_rceil"


@dataclass
class SimulatedRuleConfig:
    """Formats of the Linears whose FQN matches `pattern` (fnmatch, `*` crosses dots); '' inherits the section's."""

    pattern: str = "*"
    format: str = ""
    input: str = ""
    weight: str = ""
    grad_output: str = ""
    rounding: str = ""


@dataclass
class SimulatedConfig:
    """Simulated ExMy GEMM operands inside fp32 (precision.gemm=simulated; exatrain.train.simulated). `format`
    applies to every operand a role does not set itself: input and weight (forward), grad_output (the output
    gradient both backward GEMMs use). Names: eXmY[fn|fnuz] (e8m3, e4m3fn) or fp32, tf32, bf16, fp16; 'fp32' keeps
    an operand exact. rounding: nearest (ties to even) | truncate (the paper's mantissa masking) | stochastic.
    overflow: saturate (clamp to the format's range) | inf. subnormals: false flushes them to zero. layers: rules
    per layer type, the first whose pattern matches a Linear's FQN wins; other Linears use the section's formats."""

    format: str = "e8m7"
    input: str = ""
    weight: str = ""
    grad_output: str = ""
    rounding: str = "nearest"
    overflow: str = "saturate"
    subnormals: bool = True
    layers: list[SimulatedRuleConfig] = field(default_factory=list)


@dataclass
class SharpnessConfig:
    """Sharpness over training (exatrain.train.stability), every `every` steps (0 = off) and at the last step, on
    the first `batches` validation batches (the same rows each time). epsilon: the box radius of Keskar's
    last-token logit sharpness phi_eps. weight_directions > 0 also measures the loss increase along that many
    filter-normalised weight directions (seeded by direction_seed) scaled by weight_radius (single-process runs
    only)."""

    every: int = 0
    epsilon: float = 1e-3
    batches: int = 1
    weight_directions: int = 0
    weight_radius: float = 0.05
    direction_seed: int = 0


@dataclass
class DivergenceConfig:
    """Divergence detection (exatrain.train.stability): a non-finite loss, or after `warmup` steps a loss above
    `threshold` x the median of the previous `median_window` losses. action: record (log it, train on) | stop
    (checkpoint and end the run with status stopped, never requeued; a resumed run stays stopped). The first
    event goes to run_dir/divergence.json."""

    enabled: bool = False
    threshold: float = 2.0
    median_window: int = 50
    warmup: int = 100
    action: str = "record"


@dataclass
class PrecisionConfig:
    """GEMM formats and stability instruments (DESIGN.md §7; README "Precision"). gemm: none | fp8 | mxfp8 |
    simulated adds that model converter. exclude: Linears kept high precision (fnmatch on the FQN; a plain name
    covers everything under it); by default the LM head and the embedding."""

    gemm: str = "none"
    exclude: list[str] = field(default_factory=lambda: ["output", "tok_embeddings"])
    fp8: Fp8Config = field(default_factory=Fp8Config)
    mxfp8: Mxfp8Config = field(default_factory=Mxfp8Config)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)


@dataclass
class BenchConfig:
    """Per-run measurement for `exatrain bench scaling` / `exatrain plan --measure` (exatrain.bench.probe,
    enabled by train.callbacks=[bench_probe]): train.steps = warmup + timed + profile_steps (+1 with
    memory_step). profile_steps run under torch.profiler for the compute/communication/bubble breakdown;
    memory_step tracks live tensor bytes through one extra step (CPU; on GPU the allocator's peak)."""

    warmup_steps: int = 2
    profile_steps: int = 1
    memory_step: bool = False


@dataclass
class JobConfig:
    """plugins: extra modules imported before resolution (on every rank) to register components."""

    name: str = "tiny"
    run_dir: str = "runs/${name}"
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    send: SendConfig = field(default_factory=SendConfig)
    eigenscore: EigenScoreConfig = field(default_factory=EigenScoreConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


MAX_LR = 10.0  # optim.lr above this is a typo (1e400, inf), not an experiment: reject it up front

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package
DEFAULT_CONFIG = "tiny.yaml"

# Fixed enumerations; keys whose values name registered components are checked against the registries.
_CHOICES = {
    "data.format": ("text", "megatron"),
    "data.tokenizer.kind": ("bpe", "byte"),
    "train.dtype": ("fp32", "bf16", "bf16_params"),
    "train.activation_checkpointing": ("none", "selective", "full"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nan_policy": ("skip", "raise"),
    "parallel.init": ("full", "sharded"),
    "metrics.flops_convention": ("palm", "megatron"),
    "parallel.pp_schedule": ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"),
}
_REGISTRY_CHOICES = {
    "model.attention": ATTENTION,
    "schedule.name": SCHEDULES,
    "parallel.engine": ENGINES,
}
_REGISTRY_LISTS = {
    "model.converters": CONVERTERS,
    "train.callbacks": CALLBACKS,
}


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    builtin = CONFIG_DIR / p
    if builtin.exists():
        return builtin
    raise ConfigError(f"config file not found: {path} (also looked in {CONFIG_DIR})")


def split_config_args(args: list[str]) -> tuple[str, list[str]]:
    """`[CONFIG] key=value ...` -> (config, overrides); without a config the default one (tiny.yaml)."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return DEFAULT_CONFIG, list(args)


def load_yaml_mapping(path: str | Path) -> Any:
    """A YAML file whose top level is a mapping of keys, as an OmegaConf node."""
    top = yaml.safe_load(Path(path).read_text())  # OmegaConf.load turns a bare word into a key
    if top is not None and not isinstance(top, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (key: value), got a {type(top).__name__}")
    return OmegaConf.load(path)


def _env_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys whose unresolved value reads the environment (${oc.env:...})."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for key, value in items:
        if isinstance(value, (dict, list)):
            out += _env_keys(value, f"{prefix}{key}.")
        elif isinstance(value, str) and "oc.env:" in value:
            out.append(f"{prefix}{key}")
    return out


def _to_object(merged: Any, source: str) -> JobConfig:
    # ${oc.env:...} would copy environment values (tokens, passwords) into the run directory's
    # config.yaml and every checkpoint's meta.json; a value meant for the config goes in as an override.
    env = _env_keys(OmegaConf.to_container(merged, resolve=False))
    if env:
        raise ConfigError(f"{', '.join(env)}{source}: ${{oc.env:...}} is not supported, since config values are "
                          "saved in the run directory; pass the value as an override (key=$VAR) instead")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" key {key!r}" if key else ""
        raise ConfigError(f"invalid config{where}{source}: {str(exc).splitlines()[0]}") from None


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- YAML file <- dotlist overrides, type-checked but neither resolved nor validated."""
    merged = OmegaConf.structured(JobConfig)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, load_yaml_mapping(_resolve_path(path)))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" key {key!r}" if key else ""
        raise ConfigError(f"invalid config{where}: {str(exc).splitlines()[0]}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return _to_object(merged, "")


def with_overrides(cfg: JobConfig, overrides: list[str] | tuple[str, ...]) -> JobConfig:
    """A copy of a parsed (unresolved) config with dotlist overrides applied; resolve it afterwards, so
    derived values follow the overrides (a sweep over model.dim gets its own FFN width)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid override in {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    return _to_object(merged, f" (overrides {' '.join(overrides)})")


def resolve_config(cfg: JobConfig) -> JobConfig:
    """A copy of `cfg` with interpolations (`${name}`, `${oc.env:...}`) and derived values filled in, after
    importing the job's plugins; resolving a resolved config changes nothing."""
    cfg = _to_object(OmegaConf.structured(cfg), "")
    load_plugins(cfg.plugins)
    cache = cfg.data.cache_dir or os.environ.get("EXATRAIN_CACHE") or "~/.cache/exatrain"
    cfg.data.cache_dir = str(Path(cache).expanduser())
    for resolve in RESOLVERS:
        resolve(cfg)
    return cfg


def finalize_config(cfg: JobConfig) -> JobConfig:
    """Resolve and validate a parsed (or hand-built) config: the config a job runs with."""
    cfg = resolve_config(cfg)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Parse, resolve and validate the config file `path` (a path or a name under exatrain/configs/)."""
    return finalize_config(parse_config(path, overrides))


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> JobConfig:
    """A config from `to_dict` (already resolved and validated, e.g. a checkpoint's or a submitted job's);
    its plugins are imported so the components it names are registered in this process."""
    cfg: JobConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), d))  # type: ignore[assignment]
    load_plugins(cfg.plugins)
    return cfg


def _get(cfg: JobConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError("key: msg") unless `cond`: the one form every validator reports in."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: JobConfig) -> None:
    """Checks of a resolved config that need no world size (layouts: exatrain.parallel.dims)."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        require(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")
    for key, reg in _REGISTRY_CHOICES.items():
        reg.get(_get(cfg, key))
    for key, reg in _REGISTRY_LISTS.items():
        names = _get(cfg, key)
        require(len(set(names)) == len(names), key, f"lists a name twice: {names}")
        for name in names:
            reg.get(name)
    d = cfg.data
    require(d.seq_len > 0, "data.seq_len", "must be positive")
    require(d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
            f"{d.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    require(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    require(d.prepare_timeout_s > 0, "data.prepare_timeout_s", "must be positive")
    require(d.tokenizer.vocab_size >= 259 or d.tokenizer.kind == "byte", "data.tokenizer.vocab_size",
            "a BPE vocabulary needs at least 259 entries (256 bytes + special tokens)")
    o = cfg.optim
    require(math.isfinite(o.lr) and 0 < o.lr <= MAX_LR, "optim.lr",
            f"must be a finite number in (0, {MAX_LR:g}], got {o.lr} (a larger rate only makes the weights non-finite)")
    for key in ("eps", "weight_decay", "grad_clip"):
        require(math.isfinite(getattr(o, key)), f"optim.{key}", f"must be finite, got {getattr(o, key)}")
    require(o.eps > 0, "optim.eps", "must be positive")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
    require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    t = cfg.train
    require(t.steps > 0, "train.steps", "must be positive")
    require(t.micro_batch > 0 and t.global_batch > 0, "train.micro_batch", "batch sizes must be positive")
    require(t.global_batch % t.micro_batch == 0, "train.global_batch",
            f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    require(t.eval_batches >= 1, "train.eval_batches",
            f"must be >= 1 (the final evaluation uses it), got {t.eval_batches}")
    require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = evaluate at the end only), got {t.eval_every}")
    require(cfg.metrics.log_every >= 1, "metrics.log_every", "must be >= 1")
    require(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops", "must be >= 0 (0 = look up or measure)")
    c = cfg.checkpoint
    require(c.every >= 0 and c.keep >= 1, "checkpoint.keep", "keep must be >= 1 and every >= 0")
    b = cfg.bench
    require(b.warmup_steps >= 0 and b.profile_steps >= 0, "bench.warmup_steps", "step counts must be >= 0")
    p = cfg.parallel
    for key in ("tp", "pp", "dp_shard", "dp_replicate"):
        require(getattr(p, key) == -1 or getattr(p, key) >= 1, f"parallel.{key}", "must be >= 1 or -1 (infer)")
    require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", "must be 1, 2 or 3")
    require(p.timeout_s > 0, "parallel.timeout_s", f"must be > 0 seconds, got {p.timeout_s}")
    require(p.watchdog_s == -1 or 0 <= p.watchdog_s < p.timeout_s, "parallel.watchdog_s",
            f"must be below parallel.timeout_s={p.timeout_s} (so a stall is reported before the collective "
            f"times out), 0 (off) or -1 (half of it); got {p.watchdog_s}")
    la = cfg.launch
    require(la.stop_margin == 0 or la.stop_margin >= 1, "launch.stop_margin",
            f"must be 0 (off) or >= 1, got {la.stop_margin}")
    require(la.save_s >= 0, "launch.save_s", f"must be >= 0, got {la.save_s}")
    if t.stop_signal:
        require(t.stop_signal in signal.Signals.__members__, "train.stop_signal",
            f"{t.stop_signal!r} is not a signal name (e.g. SIGUSR2), or '' for none")
    for check in VALIDATORS:
        check(cfg)
