"""Training engines behind one contract (exatrain.engine.base.Engine), chosen by `parallel.engine`:
`native` (FSDP2 + DTensor TP + torch pipelining, exatrain.engine.native) and `deepspeed` (ZeRO 1/2/3,
exatrain.engine.deepspeed)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from exatrain.config import JobConfig
from exatrain.engine.base import Engine, StepStats
from exatrain.parallel.dims import ParallelDims
from exatrain.registry import ENGINES

log = logging.getLogger("exatrain")

__all__ = ["Engine", "StepStats", "build_engine"]


def build_engine(model: nn.Module, cfg: JobConfig, dims: ParallelDims, mesh: DeviceMesh,
                 device: torch.device | str) -> Engine:
    """Parallelise `model` (built on the meta device) for `dims` with the configured engine."""
    log.info("parallel layout: %s, engine %s", dims.describe(), cfg.parallel.engine)
    return ENGINES.get(cfg.parallel.engine)(model, cfg, dims, mesh, torch.device(device))
