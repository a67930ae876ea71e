"""Shared pieces of the FP8 / simulated-precision layout tests: converters by spec, a TP plan with torchao's float8
styles, and a training loop over the unchanged engine that applies the converter to the meta model first (the
build order the trainer will use) and calls the FP8 scale hook after each optimizer step."""

from __future__ import annotations

from parallel_common import global_batches, n_labels, rank_micro_batches, tiny_cfg
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from exatrain.model.llama import build_model
from exatrain.parallel import ParallelDims, build_engine
from exatrain.parallel.engine import clean_fqn
from exatrain.train.exmy import ExMy
from exatrain.train.precision import (
    convert_to_fp8,
    convert_to_mxfp8,
    fp8_block_tp_plan,
    precompute_fp8_scales,
)
from exatrain.train.simulated import GemmFormats, simulated_maker, swap_linears

STEPS = 3
MX = ["model.n_kv_heads=4"]  # every projection a multiple of the MX block (32)
E8M3_TRUNC = ExMy(8, 3, rounding="truncate")


def convert(model: nn.Module, spec: dict) -> list[str]:
    kind = spec["kind"]
    if kind == "none":
        return []
    if kind == "fp8":
        return convert_to_fp8(model, spec["recipe"], fsdp_float8_all_gather=spec.get("all_gather", False),
                              power_of_two_scales=spec.get("pow2"))
    if kind == "mxfp8":
        return convert_to_mxfp8(model, spec["recipe"])
    if kind == "simulated":
        return swap_linears(model, simulated_maker([("*", GemmFormats(E8M3_TRUNC, E8M3_TRUNC, ExMy(5, 2)))]))
    raise ValueError(kind)


def fp8_tensor_parallel(recipe: str):
    """A stand-in for exatrain.parallel.tensor_parallel.apply_tensor_parallel whose blocks use torchao's float8
    TP styles (the root plan is the same as exatrain's, without loss parallelism)."""

    def apply(part: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool,
              compile_workaround: bool) -> None:
        assert not loss_parallel and not compile_workaround
        seq = Shard(1) if sequence_parallel else Replicate()
        root = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
                "output": ColwiseParallel(input_layouts=seq, output_layouts=Replicate())}
        if sequence_parallel:
            root["norm"] = SequenceParallel()
        parallelize_module(part, tp_mesh, root)
        for block in part.layers.values():
            parallelize_module(block, tp_mesh, fp8_block_tp_plan(recipe, sequence_parallel))

    return apply


def make_engine(spec: dict, world_size: int):
    """Meta model -> converter -> the unchanged engine (TP, AC, compile, FSDP, materialise)."""
    import exatrain.parallel.engine as engine_module

    cfg = tiny_cfg(spec.get("overrides", []))
    dims = ParallelDims.from_config(cfg, world_size)
    mesh = dims.build_mesh("cpu")
    model = build_model(cfg.model)
    converted = convert(model, spec["convert"])
    original_tp = engine_module.apply_tensor_parallel
    if spec.get("float8_tp_styles"):
        engine_module.apply_tensor_parallel = fp8_tensor_parallel(spec["convert"]["recipe"])
    try:
        return cfg, dims, mesh, build_engine(model, cfg, dims, mesh, "cpu"), converted
    finally:
        engine_module.apply_tensor_parallel = original_tp


def run(spec: dict, world_size: int, checkpoint_dir: str | None = None) -> dict:
    """Train STEPS steps on the layout of spec["overrides"]; returns per-step loss and grad norm and the final full
    weights. With spec["resume_after"] = k, the engine is saved with DCP to `checkpoint_dir` after k steps and a
    fresh engine loads it and trains the rest."""
    import torch.distributed.checkpoint as dcp

    cfg, dims, mesh, engine, converted = make_engine(spec, world_size)
    record: dict = {"loss": [], "grad_norm": [], "converted": len(converted)}
    dp_rank = dims.dp_rank(mesh)
    for step, b in enumerate(global_batches(cfg, STEPS)):
        if step == spec.get("resume_after"):
            dcp.save(engine.state_dict(), checkpoint_id=checkpoint_dir)
            engine = make_engine(spec, world_size)[3]
            state = engine.state_dict()
            dcp.load(state, checkpoint_id=checkpoint_dir)
            engine.load_state_dict(state)
            if spec.get("precompute", False):
                precompute_fp8_scales(engine.model_parts)
        micro = rank_micro_batches(b, dp_rank, dims.dp_size, cfg.train.micro_batch)
        stats = engine.train_step(micro, n_labels(b), cfg.optim.lr)
        if spec.get("precompute", False):
            precompute_fp8_scales(engine.model_parts)
        record["loss"].append(stats.loss)
        record["grad_norm"].append(stats.grad_norm)
    weights = {}
    for part in engine.model_parts:
        for name, p in part.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights[clean_fqn(name)] = t.detach().float().clone()
    record["weights"] = weights
    return record


def rel_err(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def weight_err(a: dict, b: dict) -> float:
    """Largest relative L2 difference over the weight tensors."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)) for k in a)
