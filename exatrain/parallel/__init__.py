"""3D parallelism on one DeviceMesh: layout validation, TP/SP, pipelining, FSDP2, AC, and the build
sequence that applies them (exatrain.parallel.parallelize)."""

from exatrain.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
