"""torchrun worker for the multi-process parallelism tests: one launch checks several layouts.

    torchrun --nproc-per-node N tests/parallel_worker.py SPEC.json OUT.json

SPEC is a list of cases. {"name", "overrides"} trains STEPS steps on the tiny model and
records loss/grad-norm per step plus an eval after training. {"name", "reshard": [[overrides
per phase], ...], "steps": [n per phase]} trains phase by phase, saving engine.state_dict()
with DCP at the end of each phase and loading it into the next phase's engine (another
layout). Rank 0 writes {name: {"loss", "grad_norm", "eval", "consistent"}} to OUT; a case
that raises records its error instead of aborting the other cases. Records also say whether every
rank reported the same numbers ("consistent") and whether replicas hold equal weights.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_worker_cases  # noqa: E402
from parallel_common import STEPS, global_batches, n_labels, rank_micro_batches, tiny_cfg  # noqa: E402

from exatrain.engine import build_engine  # noqa: E402
from exatrain.model.llama import build_model  # noqa: E402
from exatrain.parallel import ParallelDims  # noqa: E402


def make_engine(overrides: list[str]):
    cfg = tiny_cfg(overrides)
    dims = ParallelDims.from_config(cfg, dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    return cfg, dims, mesh, build_engine(build_model(cfg.model), cfg, dims, mesh, "cpu")


def train(engine, cfg, dims, mesh, batches, record: dict) -> None:
    for b in batches:
        micro = rank_micro_batches(b, dims.dp_rank(mesh), dims.dp_size, cfg.train.micro_batch)
        stats = engine.train_step(micro, n_labels(b), cfg.optim.lr)
        record["loss"].append(stats.loss)
        record["grad_norm"].append(stats.grad_norm)


def run_case(case: dict, ckpt_root: Path) -> dict:
    record: dict = {"loss": [], "grad_norm": []}
    phases = case.get("reshard", [case.get("overrides", [])])
    steps = case.get("steps", [STEPS])
    all_batches = global_batches(tiny_cfg(phases[0]), sum(steps) + 1)
    done = 0
    for i, (overrides, n) in enumerate(zip(phases, steps)):
        cfg, dims, mesh, engine = make_engine(overrides)
        if i > 0:
            sd = engine.state_dict()
            dcp.load(sd, checkpoint_id=str(ckpt_root / f"{case['name']}_{i - 1}"))
            engine.load_state_dict(sd)
        train(engine, cfg, dims, mesh, all_batches[done:done + n], record)
        done += n
        if i < len(phases) - 1:
            dcp.save(engine.state_dict(), checkpoint_id=str(ckpt_root / f"{case['name']}_{i}"))
    micro = rank_micro_batches(all_batches[done], dims.dp_rank(mesh), dims.dp_size, cfg.train.micro_batch)
    record["eval"] = list(engine.eval_loss(micro))
    record["replicas_equal"] = replicas_equal(engine, mesh)
    return record


def replicas_equal(engine, mesh) -> bool:
    """Ranks that hold the same shard (same pp, dp_shard, tp coordinates) must hold the same values."""
    local = sum(float((p.to_local() if isinstance(p, DTensor) else p).double().sum())
                for part in engine.model_parts for p in part.parameters())
    key = tuple(mesh.get_local_rank(d) for d in ("pp", "dp_shard", "tp"))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (key, local))
    return all(v == local for k, v in gathered if k == key)


def run_consistent(case: dict, ckpt_root: Path) -> dict:
    """run_case, plus whether every rank recorded the same numbers."""
    record = run_case(case, ckpt_root)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    record["consistent"] = all(g == record for g in gathered)
    return record


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    ckpt_root = Path(os.environ.get("EXATRAIN_TEST_CKPT") or Path(tempfile.gettempdir()) / f"ckpt_{os.getppid()}")
    run_worker_cases(spec, lambda case: run_consistent(case, ckpt_root),
                     lambda results: out.write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
