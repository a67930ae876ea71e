"""Shared pieces of the FP8 / simulated-precision layout tests: the engine built from a config whose `precision:`
section adds the converters (the trainer's path: meta model -> converter -> parallelize), a few training steps on
the synthetic batches of tests/parallel_common, and logit sharpness through the engine afterwards."""

from __future__ import annotations

import torch.distributed as dist
from parallel_common import global_batches, n_labels, rank_micro_batches, tiny_cfg
from torch.distributed.tensor import DTensor

from exatrain.engine import build_engine
from exatrain.engine.base import clean_fqn
from exatrain.model.llama import build_model
from exatrain.parallel import ParallelDims
from exatrain.train.simulated import SimulatedLinear
from exatrain.train.stability import engine_logit_sharpness

STEPS = 3
MX = ["model.n_kv_heads=4"]  # every projection a multiple of the MX block (32)
SIMULATED = ["precision.gemm=simulated", "precision.simulated.format=e8m3", "precision.simulated.rounding=truncate"]
# e5m2 gradients: most of them sit near its underflow (2^-16), where Adam turns a rounding flip into a full step
SIMULATED_E5M2_GRADS = [*SIMULATED, "precision.simulated.grad_output=e5m2", "precision.simulated.overflow=inf"]
EPSILON = 1e-3


def fp8(recipe: str, *extra: str) -> list[str]:
    return ["precision.gemm=fp8", f"precision.fp8.recipe={recipe}", *extra]


def converted_linears(engine) -> int:
    names = {"Float8Linear", "MXFP8Linear", SimulatedLinear.__name__}
    return sum(type(m).__name__ in names for part in engine.model_parts for m in part.modules())


def make_engine(spec: dict, world_size: int):
    """spec["layout"] + spec["overrides"] (precision, model; shared with the single-process counterpart) -> the
    engine. spec["unchecked"]: {dotted key: value} set after validation, to reproduce a combination the validator
    refuses."""
    cfg = tiny_cfg([*spec.get("layout", []), *spec.get("overrides", [])])
    for key, value in spec.get("unchecked", {}).items():
        section, _, name = key.rpartition(".")
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        setattr(obj, name, value)
    dims = ParallelDims.from_config(cfg, world_size)
    mesh = dims.build_mesh("cpu")
    return cfg, dims, mesh, build_engine(build_model(cfg.model), cfg, dims, mesh, "cpu")


def full_weights(engine) -> dict:
    """Every parameter in full (DTensors gathered; pipeline stages merged over ranks), as fp32 on CPU."""
    mine = {}
    for part in engine.model_parts:
        for name, p in part.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p
            mine[clean_fqn(name)] = t.detach().float().clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for rank in gathered for k, v in rank.items()}


def run(spec: dict, world_size: int, checkpoint_dir: str | None = None) -> dict:
    """Train STEPS steps; returns per-step loss and grad norm, the final full weights, the number of converted
    Linears on this rank, and φ_ε of the trained model on one more batch. With spec["resume_after"] = k the engine
    is saved with DCP after k steps and a freshly built engine loads it and trains the rest."""
    import torch.distributed.checkpoint as dcp

    cfg, dims, mesh, engine = make_engine(spec, world_size)
    record: dict = {"loss": [], "grad_norm": [], "converted": converted_linears(engine)}
    dp_rank = dims.dp_rank(mesh)
    batches = global_batches(cfg, STEPS + 1)
    for step, b in enumerate(batches[:STEPS]):
        if step == spec.get("resume_after"):
            dcp.save(engine.state_dict(), checkpoint_id=checkpoint_dir)
            engine = make_engine(spec, world_size)[3]
            state = engine.state_dict()
            dcp.load(state, checkpoint_id=checkpoint_dir)
            engine.load_state_dict(state)
        micro = rank_micro_batches(b, dp_rank, dims.dp_size, cfg.train.micro_batch)
        stats = engine.train_step(micro, n_labels(b), cfg.optim.lr)
        record["loss"].append(stats.loss)
        record["grad_norm"].append(stats.grad_norm)
    record["weights"] = full_weights(engine)
    probe = rank_micro_batches(batches[STEPS], dp_rank, dims.dp_size, cfg.train.micro_batch)
    record["sharpness"] = engine_logit_sharpness(engine, probe, EPSILON).phi
    return record


def rel_err(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def weight_err(a: dict, b: dict) -> float:
    """Largest relative L2 difference over the weight tensors."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)) for k in a)
