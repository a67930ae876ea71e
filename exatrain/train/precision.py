"""GEMM precision as model converters (DESIGN.md §7): real FP8 through torchao, MXFP8 emulation, simulated ExMy.

`precision.gemm` = fp8 | mxfp8 | simulated adds the converter of that name to `model.converters` (a config
resolver here), so it runs on the meta model before pipeline split, TP, activation checkpointing, compile, FSDP
and init (exatrain.parallel.parallelize). Converters only swap modules and share the existing (meta)
Parameters, so they run before any weight exists and every layout initialises identically. The Linears in
`precision.exclude` stay high precision: by default the LM head and the embeddings (the paper's FP8 runs
excluded the head; an embedding is a lookup, not a GEMM).

- fp8: torchao `convert_to_float8_training` (`precision.fp8`); with FSDP float8 all-gather its
  `after_optimizer_step` hook runs `precompute_float8_dynamic_scale_for_fsdp` on each model part; with
  `float8_tp_styles` every converted Linear carries torchao's float8 DTensor styles as `tp_styles`, which
  exatrain.parallel.tensor_parallel uses instead of the plain ones.
- mxfp8: torchao's prototype MXFP8Linear (`precision.mxfp8.recipe`).
- simulated: exatrain.train.simulated.SimulatedLinear with the formats of `precision.simulated` per operand
  role and per layer type (fnmatch rules on the FQN).

Recipes (torchao `Float8LinearConfig.from_recipe_name`):
  tensorwise          e4m3 input/weight, e5m2 grad_output, one dynamic scale per tensor. The only
                      recipe with FSDP2 float8 all-gather and float8 TP collectives.
  rowwise             e4m3 everywhere, one power-of-two scale per row.
  rowwise_with_gw_hp  rowwise, but the weight-gradient GEMM runs in high precision.
MXFP8 (`convert_to_mxfp8`): torchao's prototype MXFP8Linear, e4m3 elements in blocks of 32 with
E8M0 scales; the emulated kernels run anywhere, the native ones need Blackwell (SM100).

Measured on CPU (torch 2.13.0+cpu, torchao 0.18.0, gloo; tests/test_precision.py):
- every recipe trains with real `torch._scaled_mm` calls (rowwise GEMMs write bf16, then torchao casts
  to fp32); 3 steps of the tiny model stay within 1e-3 of fp32's loss.
- FSDP2 (with or without float8 all-gather), TP with plain or float8 styles (no sequence parallelism) and
  PP train like one process given the same micro-batches. With tensorwise's exact amax scales, fp32 noise
  from another reduction order flips some fp8 roundings, so weights drift apart after a step or two
  (losses still equal to 1e-7); `power_of_two_scales` makes DP and TP equal to one process to 1e-7.
- gloo cannot all-gather float8 tensors ("Invalid scalar type"): float8 TP styles with sequence
  parallelism fail on CPU (they move fp8 activations); FSDP's float8 all-gather works (it sends bytes).
- rowwise under TP quantises the row-parallel GEMM inputs (wo, w2) with per-row scales of the local
  K-half: a valid but different quantisation from one process (loss 4e-4 off after 3 steps).
- FSDP float8 all-gather ignores power-of-two scale rounding for weights: the combination is refused.
- DCP save/load of FSDP float8 all-gather weights resumes exactly; bf16 autocast + fp8 trains; compiled
  blocks (train.compile) train too (cold compile 45-77 s for 4 blocks; tensorwise compiled vs eager
  differs by 1e-4 in loss, rowwise matches); MXFP8 emulation trains under FSDP2 and TP (TP ~10x slower).
torchao is imported lazily, so exatrain runs without it until FP8 is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType

import torch
from torch import nn

from exatrain.config import ConfigError, JobConfig, PrecisionConfig, require
from exatrain.model.attention import runs_on_gpu
from exatrain.model.convert import register_converter
from exatrain.registry import config_resolver, config_validator
from exatrain.train.divergence import DivergenceDetector
from exatrain.train.exmy import OVERFLOWS, ROUNDINGS, ExMy
from exatrain.train.simulated import DEFAULT_EXCLUDE, GemmFormats, matches, simulated_maker, swap_linears

log = logging.getLogger("exatrain")

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
MXFP8_RECIPES = ("mxfp8_emulated_rceil", "mxfp8_emulated_rceil_wgrad_with_hp", "mxfp8_rceil",
                 "mxfp8_rceil_wgrad_with_hp")


def _torchao(submodule: str) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(f"torchao.{submodule}")
    except ImportError as exc:
        raise ImportError("FP8 training needs torchao (tested with 0.18.0): pip install torchao==0.18.0 "
                          "(it depends on nothing else; keep your torch build)") from exc


def fp8_filter(exclude: Sequence[str] = DEFAULT_EXCLUDE, multiple_of: int = 16) -> Callable[[nn.Module, str], bool]:
    """torchao `module_filter_fn`: convert a Linear unless its FQN matches `exclude` or a dimension is not
    a multiple of `multiple_of` (GPU fp8 GEMMs need 16; the CPU kernels accept any size, set 1)."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or matches(fqn, exclude):
            return False
        return module.in_features % multiple_of == 0 and module.out_features % multiple_of == 0

    return keep


def check_fp8_options(recipe: str, fsdp_float8_all_gather: bool, power_of_two_scales: bool | None,
                      key: str = "precision.fp8") -> None:
    """The FP8 option combinations torchao 0.18 supports (no torchao import: the config validator calls it too)."""
    require(recipe in FP8_RECIPES, f"{key}.recipe", f"got {recipe!r}, expected one of {', '.join(FP8_RECIPES)}")
    require(not fsdp_float8_all_gather or recipe == "tensorwise", f"{key}.fsdp_float8_all_gather",
            f"only the tensorwise recipe can all-gather in float8 (got recipe {recipe!r})")
    require(not (fsdp_float8_all_gather and power_of_two_scales), f"{key}.power_of_two_scales",
            "torchao 0.18's FSDP float8 all-gather computes weight scales without power-of-two rounding; "
            "turn off one of power_of_two_scales and fsdp_float8_all_gather")


def fp8_config(recipe: str, fsdp_float8_all_gather: bool = False, power_of_two_scales: bool | None = None,
               key: str = "precision.fp8"):
    """The torchao Float8LinearConfig of a recipe; errors name the config key.

    `power_of_two_scales` (None: the recipe's default, on for the rowwise recipes) rounds every scale down
    to a power of two. Measured here: with tensorwise's exact amax scales, fp32-level noise in the weights
    (e.g. another reduction order under FSDP or TP) moves every scale and flips fp8 roundings, so runs on
    different layouts drift apart after a few steps; power-of-two scales keep them equal.
    """
    check_fp8_options(recipe, fsdp_float8_all_gather, power_of_two_scales, key)
    config = _torchao("float8").Float8LinearConfig.from_recipe_name(recipe)
    pow2 = config.round_scales_to_power_of_2 if power_of_two_scales is None else power_of_two_scales
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=fsdp_float8_all_gather,
                               round_scales_to_power_of_2=pow2)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", exclude: Sequence[str] = DEFAULT_EXCLUDE,
                   fsdp_float8_all_gather: bool = False, power_of_two_scales: bool | None = None,
                   multiple_of: int = 16) -> list[str]:
    """Swap Linears for torchao Float8Linear in place (before TP/FSDP; meta models are fine).

    Returns the converted FQNs. With `fsdp_float8_all_gather`, call `precompute_fp8_scales` after
    every optimizer step.
    """
    f8 = _torchao("float8")
    config = fp8_config(recipe, fsdp_float8_all_gather, power_of_two_scales)
    keep = fp8_filter(exclude, multiple_of)
    converted = [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear and keep(m, fqn)]
    f8.convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return converted


def precompute_fp8_scales(parts: Iterable[nn.Module]) -> None:
    """After the optimizer step, with FSDP2 float8 all-gather: one all-reduce of every weight's amax gives the
    scales the next all-gather casts with (without it each shard would need its own pass). A no-op for
    models without float8 all-gather weights."""
    f8 = _torchao("float8")
    for part in parts:
        f8.precompute_float8_dynamic_scale_for_fsdp(part)


def float8_tp_styles() -> dict[str, type]:
    """torchao's float8 DTensor styles, as a converted Linear's `tp_styles` (exatrain.parallel.tensor_parallel):
    the sequence-parallel all-gathers then move float8 and each sub-layer's input is cast once. Tensorwise only
    (the rowwise recipes have no float8 styles: plain styles, and Float8Linear casts the gathered inputs itself)."""
    tp = _torchao("float8.float8_tensor_parallel")
    return {"colwise": tp.Float8ColwiseParallel, "rowwise": tp.Float8RowwiseParallel,
            "prepare_input": tp.PrepareFloat8ModuleInput}


def convert_to_mxfp8(model: nn.Module, recipe: str = "mxfp8_emulated_rceil",
                     exclude: Sequence[str] = DEFAULT_EXCLUDE, multiple_of: int = 32) -> list[str]:
    """Swap Linears for torchao's MXFP8Linear (meta-safe; shares the Parameters). `emulated` recipes run the
    MX casts and GEMMs in plain torch (CPU works); the others need SM100 kernels. Dimensions must be multiples
    of the block size 32, other Linears stay high precision."""
    if recipe not in MXFP8_RECIPES:
        raise ConfigError(f"precision.mxfp8.recipe: got {recipe!r}, expected one of {', '.join(MXFP8_RECIPES)}")
    mx_linear = _torchao("prototype.moe_training.mxfp8_linear").MXFP8Linear
    preference = _torchao("quantization.quantize_.common.kernel_preference").KernelPreference
    scale_mode = _torchao("prototype.mx_formats.config").ScaleCalculationMode.RCEIL
    kernel = preference.EMULATED if "emulated" in recipe else preference.AUTO
    keep = fp8_filter(exclude, multiple_of)

    def make(fqn: str, linear: nn.Linear) -> nn.Module | None:
        if not keep(linear, fqn):
            return None
        with torch.device("meta"):
            new = mx_linear(linear.in_features, linear.out_features, bias=False, kernel_preference=kernel,
                            scale_calculation_mode=scale_mode, wgrad_with_hp=recipe.endswith("wgrad_with_hp"))
        new.weight, new.bias = linear.weight, linear.bias
        return new

    return swap_linears(model, make, exclude)


# ---------------------------------------------------------------- the config: converters, resolver, validator

GEMMS = ("fp8", "mxfp8", "simulated")  # precision.gemm values other than none = converter names
ROLES = ("input", "weight", "grad_output")
EXACT = ("fp32", "none")  # simulated format names that keep an operand fp32
CALLBACK_SECTIONS = {"sharpness": "precision.sharpness.every > 0", "divergence": "precision.divergence.enabled=true"}


def simulated_rules(pc: PrecisionConfig) -> list[tuple[str, GemmFormats]]:
    """(pattern, formats) per `precision.simulated.layers` rule, then ("*", the section's formats); each operand's
    format is the first set of: the rule's role, the rule's `format`, the section's role, the section's `format`.
    Errors name the key (e.g. precision.simulated.layers.0.weight.mantissa_bits)."""
    s = pc.simulated

    require(bool(s.format), "precision.simulated.format", "must name a format (e.g. e8m3, or fp32 for exact)")
    for key, value, allowed in [("precision.simulated.rounding", s.rounding, ROUNDINGS),
                                ("precision.simulated.overflow", s.overflow, OVERFLOWS),
                                *((f"precision.simulated.layers.{i}.rounding", r.rounding, ("", *ROUNDINGS))
                                  for i, r in enumerate(s.layers))]:
        require(value in allowed, key, f"got {value!r}, expected one of {', '.join(a for a in allowed if a)}")

    def formats(rule, key: str) -> GemmFormats:
        rounding = (rule.rounding if rule is not None else "") or s.rounding
        out = {}
        for role in ROLES:
            candidates = [(getattr(rule, role), f"{key}.{role}"), (rule.format, f"{key}.format")] if rule else []
            candidates += [(getattr(s, role), f"precision.simulated.{role}"), (s.format, "precision.simulated.format")]
            name, where = next((v, k) for v, k in candidates if v)
            out[role] = None if name.lower() in EXACT else ExMy.parse(
                name, where, rounding=rounding, overflow=s.overflow, subnormals=s.subnormals)
        return GemmFormats(**out)

    rules = []
    for i, rule in enumerate(s.layers):
        key = f"precision.simulated.layers.{i}"
        require(bool(rule.pattern), f"{key}.pattern", "must be a non-empty fnmatch pattern on the Linear's FQN")
        rules.append((rule.pattern, formats(rule, key)))
    return rules + [("*", formats(None, "precision.simulated"))]


@register_converter("simulated")
def convert_simulated(model: nn.Module, cfg: JobConfig) -> None:
    """Swap the block Linears for SimulatedLinear with the formats of their first matching rule."""
    rules = simulated_rules(cfg.precision)
    swapped = swap_linears(model, simulated_maker(rules), cfg.precision.exclude)
    log.info("precision: %d Linears simulate %s", len(swapped),
             "; ".join(f"{pat}: {f.describe()}" for pat, f in rules))


def _precompute_scales(part: nn.Module, cfg: JobConfig) -> None:
    if cfg.precision.fp8.fsdp_float8_all_gather:
        precompute_fp8_scales([part])


@register_converter("fp8", after_optimizer_step=_precompute_scales)
def convert_fp8(model: nn.Module, cfg: JobConfig) -> None:
    f = cfg.precision.fp8
    converted = convert_to_fp8(model, f.recipe, cfg.precision.exclude, f.fsdp_float8_all_gather,
                               f.power_of_two_scales, f.divisible_by)
    if f.float8_tp_styles:
        styles = float8_tp_styles()
        for fqn in converted:
            model.get_submodule(fqn).tp_styles = styles
    log.info("precision: %d Linears -> torchao Float8Linear (%s%s%s)", len(converted), f.recipe,
             ", float8 all-gather" if f.fsdp_float8_all_gather else "", ", float8 TP styles" if f.float8_tp_styles else "")


@register_converter("mxfp8")
def convert_mxfp8(model: nn.Module, cfg: JobConfig) -> None:
    converted = convert_to_mxfp8(model, cfg.precision.mxfp8.recipe, cfg.precision.exclude)
    log.info("precision: %d Linears -> torchao MXFP8Linear (%s)", len(converted), cfg.precision.mxfp8.recipe)


@config_resolver
def add_precision_components(cfg: JobConfig) -> None:
    """precision.gemm adds its converter (last, so other converters see plain Linears); enabled instruments add
    their callbacks first, like every method's own callbacks."""
    pc = cfg.precision
    if pc.gemm in GEMMS and pc.gemm not in cfg.model.converters:
        cfg.model.converters.append(pc.gemm)
    if pc.sharpness.every > 0 and "sharpness" not in cfg.train.callbacks:
        cfg.train.callbacks.insert(0, "sharpness")
    if pc.divergence.enabled and "divergence" not in cfg.train.callbacks:
        cfg.train.callbacks.insert(0, "divergence")


@config_validator
def validate_precision(cfg: JobConfig) -> None:
    pc = cfg.precision
    require(pc.gemm in ("none", *GEMMS), "precision.gemm", f"got {pc.gemm!r}, expected one of none, {', '.join(GEMMS)}")
    require(all(isinstance(x, str) and x for x in pc.exclude), "precision.exclude",
            "must be a list of non-empty fnmatch patterns on Linear FQNs (e.g. output, 'layers.0.*')")
    for name in GEMMS:
        require(name not in cfg.model.converters or pc.gemm == name, "model.converters",
                f"{name!r} is the converter of precision.gemm={name}; set that instead (one GEMM format per run)")
    if pc.gemm in ("fp8", "mxfp8"):
        require(importlib.util.find_spec("torchao") is not None, "precision.gemm",
                f"{pc.gemm} needs torchao: pip install 'exatrain[fp8]' (torchao==0.18.0)")
        require(cfg.parallel.engine == "native", "precision.gemm",
                f"{pc.gemm} runs on parallel.engine=native (torchao's FSDP2/DTensor integration); "
                "DeepSpeed is not supported with it, use precision.gemm=simulated or the native engine")
    f = pc.fp8
    check_fp8_options(f.recipe, f.fsdp_float8_all_gather, f.power_of_two_scales)
    require(not f.float8_tp_styles or f.recipe == "tensorwise", "precision.fp8.float8_tp_styles",
            f"torchao has float8 TP styles for the tensorwise recipe only (got {f.recipe!r}); the rowwise recipes "
            "run under the plain TP styles")
    require(not (f.float8_tp_styles and cfg.parallel.tp != 1 and cfg.parallel.sequence_parallel
                 and not runs_on_gpu(cfg.train.device)),
            "precision.fp8.float8_tp_styles",
            "with sequence parallelism the float8 styles all-gather float8 activations, which gloo cannot "
            "('Invalid scalar type'); on CPU set parallel.sequence_parallel=false or float8_tp_styles=false")
    require(f.divisible_by >= 1, "precision.fp8.divisible_by", "must be >= 1")
    require(pc.mxfp8.recipe in MXFP8_RECIPES, "precision.mxfp8.recipe",
            f"got {pc.mxfp8.recipe!r}, expected one of {', '.join(MXFP8_RECIPES)}")
    simulated_rules(pc)  # every format parses; errors name the key
    require(pc.gemm != "simulated" or cfg.train.dtype == "fp32", "precision.gemm",
            f"simulated formats need train.dtype=fp32 (got {cfg.train.dtype}): the simulation rounds fp32 operands "
            "and accumulates in fp32; bf16 compute would add its own rounding to every GEMM")
    sh = pc.sharpness
    require(sh.every >= 0, "precision.sharpness.every", "must be >= 0 (0 = off)")
    require(math.isfinite(sh.epsilon) and sh.epsilon > 0, "precision.sharpness.epsilon", "must be a positive number")
    require(sh.batches >= 1, "precision.sharpness.batches", "must be >= 1")
    require(sh.weight_directions >= 0, "precision.sharpness.weight_directions", "must be >= 0 (0 = off)")
    require(sh.weight_radius > 0, "precision.sharpness.weight_radius", "must be positive")
    d = pc.divergence
    DivergenceDetector(d.threshold, d.median_window, d.warmup)  # raises ConfigError naming the key
    require(d.action in ("record", "stop"), "precision.divergence.action", f"got {d.action!r}, expected record or stop")
    enabled = {"sharpness": sh.every > 0, "divergence": d.enabled}
    for name, what in CALLBACK_SECTIONS.items():
        require(name not in cfg.train.callbacks or enabled[name], "train.callbacks",
                f"the {name} callback is configured by its section: set {what}")
