"""3D parallelism on one DeviceMesh: layout validation, TP/SP, pipelining, FSDP2 or DeepSpeed, AC."""

from exatrain.parallel.dims import ParallelDims
from exatrain.parallel.engine import StepStats, build_engine

__all__ = ["ParallelDims", "StepStats", "build_engine"]
