"""Real FP8 training through torchao (DESIGN.md §7): model converters, the FSDP2 scale hook and TP styles.

Order (the engine's build order): meta model -> `convert_to_fp8` / `convert_to_mxfp8` -> tensor
parallel (with `fp8_block_tp_plan` styles) -> activation checkpointing -> compile -> FSDP2 ->
materialise. The converters only swap modules and share the existing (meta) Parameters, so they run
before any weight exists. The LM head and the embeddings stay high precision by default (the
paper's FP8 runs excluded the head; an embedding is a lookup, not a GEMM).

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
- FSDP2 (with or without float8 all-gather) and TP with plain or float8 styles (no sequence parallelism)
  train like one process given the same micro-batches. With tensorwise's exact amax scales, fp32 noise
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
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType

import torch
from torch import nn

from exatrain.config import ConfigError
from exatrain.train.simulated import DEFAULT_EXCLUDE, matches, swap_linears

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


def fp8_config(recipe: str, fsdp_float8_all_gather: bool = False, power_of_two_scales: bool | None = None,
               key: str = "precision.fp8"):
    """The torchao Float8LinearConfig of a recipe; errors name the config key.

    `power_of_two_scales` (None: the recipe's default, on for the rowwise recipes) rounds every scale down
    to a power of two. Measured here: with tensorwise's exact amax scales, fp32-level noise in the weights
    (e.g. another reduction order under FSDP or TP) moves every scale and flips fp8 roundings, so runs on
    different layouts drift apart after a few steps; power-of-two scales keep them equal.
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"{key}.recipe: got {recipe!r}, expected one of {', '.join(FP8_RECIPES)}")
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise ConfigError(f"{key}.fsdp_float8_all_gather: only the tensorwise recipe can all-gather in float8 "
                          f"(got recipe {recipe!r})")
    if fsdp_float8_all_gather and power_of_two_scales:
        raise ConfigError(f"{key}.power_of_two_scales: torchao 0.18's FSDP float8 all-gather computes weight scales "
                          f"without the power-of-two rounding; turn one of them off")
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


def fp8_block_tp_plan(recipe: str, sequence_parallel: bool) -> dict[str, object]:
    """The TP plan of one TransformerBlock (same layout as exatrain.parallel.tensor_parallel) for an FP8 model.

    tensorwise: torchao's Float8ColwiseParallel/Float8RowwiseParallel/PrepareFloat8ModuleInput, so the
    sequence-parallel all-gathers move fp8 and the input is cast once per sub-layer. The rowwise recipes
    have no float8 TP styles: plain styles, and Float8Linear casts the gathered DTensor inputs itself.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    if recipe == "tensorwise":
        tp = _torchao("float8.float8_tensor_parallel")
        colwise, rowwise, prepare = tp.Float8ColwiseParallel, tp.Float8RowwiseParallel, tp.PrepareFloat8ModuleInput
    else:
        colwise, rowwise, prepare = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {
        "attention.wq": colwise(), "attention.wk": colwise(), "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=seq),
        "feed_forward.w1": colwise(), "feed_forward.w2": rowwise(output_layouts=seq), "feed_forward.w3": colwise(),
    }
    if sequence_parallel:
        plan.update({
            "attention_norm": SequenceParallel(),
            "attention": prepare(input_layouts=(seq, None, None, None), desired_input_layouts=(Replicate(), None, None, None)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": prepare(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
        })
    return plan


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
