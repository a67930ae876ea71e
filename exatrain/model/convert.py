"""Model converters: functions that swap or add modules before parallelisation (`model.converters`).

A converter rewrites the freshly built model in place while it is still on the meta device, before
pipeline splitting, tensor parallelism, activation checkpointing, compile and FSDP (the sequence is
exatrain.parallel.parallelize). So tensor-parallel plans, FSDP units and checkpoints all see the
converted modules: a converted Linear must stay an `nn.Linear` subclass under its old name (its
parameters keep their FQNs), and modules a converter adds are new, checkpointed FQNs.

Register one with a name; `after_optimizer_step` (optional) runs on each model part after every
optimizer step (e.g. FP8's scale precompute for FSDP all-gathers):

    @register_converter("my_quant")
    def convert(model: nn.Module, cfg: JobConfig) -> None: ...

A module a converter adds whose parameters or buffers need initial values (e.g. a mask of ones) defines
`init_state()`; initialisation calls it after the weights (exatrain.model.llama.Transformer.init_weights),
under the same seeded RNG, so every layout starts from the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from exatrain.config import JobConfig
from exatrain.registry import CONVERTERS

ConvertFn = Callable[[nn.Module, JobConfig], None]
PartHook = Callable[[nn.Module, JobConfig], None]


@dataclass(frozen=True)
class ModelConverter:
    convert: ConvertFn
    after_optimizer_step: PartHook | None = None


def register_converter(name: str, after_optimizer_step: PartHook | None = None) -> Callable[[ConvertFn], ConvertFn]:
    def decorator(fn: ConvertFn) -> ConvertFn:
        CONVERTERS.register(name, ModelConverter(fn, after_optimizer_step))
        return fn

    return decorator


def converters_of(cfg: JobConfig) -> list[ModelConverter]:
    return [CONVERTERS.get(name) for name in cfg.model.converters]


def convert_model(model: nn.Module, cfg: JobConfig) -> None:
    """Apply `model.converters` in order, in place."""
    for converter in converters_of(cfg):
        converter.convert(model, cfg)
