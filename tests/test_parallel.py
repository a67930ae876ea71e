"""Every layout trains like one process: losses, gradient norms and a final eval over several optimizer steps
match a plain single-process fp32 reference (tests/parallel_common.py) within 1e-5 relative.

One torchrun launch per world size checks many layouts (tests/parallel_worker.py); launches run in their
own session under a timeout, so a hang fails the test with the workers' output instead of hanging CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import torchrun_worker  # noqa: E402
from parallel_common import (  # noqa: E402
    STEPS,
    global_batches,
    max_rel_err,
    n_labels,
    rank_micro_batches,
    reference_run,
    tiny_cfg,
)

from exatrain.engine import build_engine  # noqa: E402
from exatrain.model.llama import build_model  # noqa: E402
from exatrain.parallel import ParallelDims  # noqa: E402

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
EXACT = 1e-5
BF16 = 5e-2

PP = ["parallel.pp=2", "parallel.dp_shard=1"]
V2 = ["parallel.pp_virtual_stages=2"]
TP = ["parallel.tp=2", "parallel.dp_shard=1"]
DS = ["parallel.dp_shard=2", "parallel.engine=deepspeed"]
THREE_D = ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2"]

# name -> (case spec for the worker, expectation: "exact" | "bf16" | "runs")
CASES_2 = {
    "tp2_sp_lossparallel": ({"overrides": TP}, "exact"),
    "tp2_tied_no_sp": ({"overrides": TP + ["model.tie_embeddings=true", "parallel.sequence_parallel=false",
                                           "parallel.loss_parallel=false"]}, "exact"),
    "pp2_gpipe": ({"overrides": PP + ["parallel.pp_schedule=GPipe"]}, "exact"),
    "pp2_1f1b": ({"overrides": PP + ["parallel.pp_schedule=1F1B"]}, "exact"),
    "pp2_interleaved1f1b": ({"overrides": PP + V2 + ["parallel.pp_schedule=Interleaved1F1B"]}, "exact"),
    "pp2_interleaved_zero_bubble": ({"overrides": PP + V2 + ["parallel.pp_schedule=InterleavedZeroBubble"]}, "exact"),
    "pp2_zbv_zero_bubble": ({"overrides": PP + V2 + ["parallel.pp_schedule=ZBVZeroBubble"]}, "exact"),
    "pp2_explicit_stage_layers": ({"overrides": PP + ["parallel.pp_stage_layers=[1,3]"]}, "exact"),
    "dp_shard2_zero3": ({"overrides": ["parallel.dp_shard=2"]}, "exact"),
    "dp_shard2_zero2": ({"overrides": ["parallel.dp_shard=2", "parallel.zero_stage=2"]}, "exact"),
    "dp_shard2_tied": ({"overrides": ["parallel.dp_shard=2", "model.tie_embeddings=true"]}, "exact"),
    "dp_replicate2": ({"overrides": ["parallel.dp_shard=1", "parallel.dp_replicate=2"]}, "exact"),
    "deepspeed_zero1": ({"overrides": DS + ["parallel.zero_stage=1"]}, "exact"),
    "deepspeed_zero2": ({"overrides": DS + ["parallel.zero_stage=2"]}, "exact"),
    "deepspeed_zero3": ({"overrides": DS + ["parallel.zero_stage=3"]}, "exact"),
    "tp2_ac_selective": ({"overrides": TP + ["train.activation_checkpointing=selective"]}, "exact"),
    "dp2_ac_full": ({"overrides": ["parallel.dp_shard=2", "train.activation_checkpointing=full"]}, "exact"),
    "pp2_1f1b_ac_selective": ({"overrides": PP + ["train.activation_checkpointing=selective"]}, "exact"),
    "pp2_zbv_ac_selective": ({"overrides": PP + V2 + ["parallel.pp_schedule=ZBVZeroBubble",
                                                      "train.activation_checkpointing=selective"]}, "exact"),
    "deepspeed_zero3_ac_full": ({"overrides": DS + ["parallel.zero_stage=3", "train.activation_checkpointing=full"]},
                                "exact"),
    "reshard_dp2_to_deepspeed_to_tp2": ({"reshard": [["parallel.dp_shard=2"], DS + ["parallel.zero_stage=1"], TP],
                                         "steps": [2, 1, 1]}, "exact"),
    "reshard_zbv_to_deepspeed3_to_1f1b": ({"reshard": [PP + V2 + ["parallel.pp_schedule=ZBVZeroBubble"],
                                                       DS + ["parallel.zero_stage=3"], PP],
                                           "steps": [2, 1, 1]}, "exact"),
    # train.dtype: bf16 = autocast (fp32 parameters) on every layout; bf16_params = bf16 parameters with fp32
    # masters (FSDP2 MixedPrecisionPolicy; ZeRO-1 master slices without FSDP; DeepSpeed's bf16 mode)
    "dp2_bf16_autocast": ({"overrides": ["parallel.dp_shard=2", "train.dtype=bf16"]}, "bf16"),
    "dp2_bf16_params_fsdp_mixed_precision": ({"overrides": ["parallel.dp_shard=2", "train.dtype=bf16_params"]},
                                             "bf16"),
    "tp2_bf16_autocast": ({"overrides": TP + ["train.dtype=bf16"]}, "bf16"),
    "tp2_bf16_params_master_slices": ({"overrides": TP + ["train.dtype=bf16_params"]}, "bf16"),
    "deepspeed_zero2_bf16_autocast": ({"overrides": DS + ["parallel.zero_stage=2", "train.dtype=bf16"]}, "bf16"),
    "deepspeed_zero2_bf16_params": ({"overrides": DS + ["parallel.zero_stage=2", "train.dtype=bf16_params"]}, "bf16"),
    "dp_replicate2_sharded_init": ({"overrides": ["parallel.dp_shard=1", "parallel.dp_replicate=2",
                                                  "parallel.init=sharded"]}, "runs"),
    "zero1_dp2": ({"overrides": ["parallel.dp_shard=2", "parallel.zero_stage=1"]}, "exact"),
    "zero1_dp2_ac_full_tied": ({"overrides": ["parallel.dp_shard=2", "parallel.zero_stage=1", "model.tie_embeddings=true",
                                              "train.activation_checkpointing=full"]}, "exact"),
    "zero1_dp2_bf16": ({"overrides": ["parallel.dp_shard=2", "parallel.zero_stage=1", "train.dtype=bf16"]}, "bf16"),
    "zero1_dp2_bf16_params": ({"overrides": ["parallel.dp_shard=2", "parallel.zero_stage=1",
                                             "train.dtype=bf16_params"]}, "bf16"),
    # a fresh DeepSpeed engine saving after its own steps (its optimizer-state views are linked lazily)
    "reshard_deepspeed2_fresh_to_fsdp": ({"reshard": [DS + ["parallel.zero_stage=2"], ["parallel.dp_shard=2"]],
                                          "steps": [2, 1]}, "exact"),
    "reshard_zero1_to_fsdp_to_deepspeed": ({"reshard": [["parallel.dp_shard=2", "parallel.zero_stage=1"],
                                                        ["parallel.dp_shard=2"], DS + ["parallel.zero_stage=1"]],
                                            "steps": [2, 1, 1]}, "exact"),
}

CASES_4 = {
    "dp_shard4": ({"overrides": ["parallel.dp_shard=4"]}, "exact"),
    "hsdp_2x2": ({"overrides": ["parallel.dp_replicate=2", "parallel.dp_shard=2"]}, "exact"),
    "tp2_dp2": ({"overrides": ["parallel.tp=2", "parallel.dp_shard=2"]}, "exact"),
    "tp2_dp2_tied_no_sp": ({"overrides": ["parallel.tp=2", "parallel.dp_shard=-1", "model.tie_embeddings=true",
                                          "parallel.sequence_parallel=false", "parallel.loss_parallel=false"]},
                           "exact"),
    "pp2_dp2_interleaved1f1b": ({"overrides": ["parallel.pp=2", "parallel.dp_shard=2"] + V2 +
                                 ["parallel.pp_schedule=Interleaved1F1B"]}, "exact"),
    "pp2_dp2_zbv": ({"overrides": ["parallel.pp=2", "parallel.dp_shard=2"] + V2 +
                     ["parallel.pp_schedule=ZBVZeroBubble"]}, "exact"),
    "pp2_tp2_ac_full": ({"overrides": ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1",
                                       "train.activation_checkpointing=full"]}, "exact"),
    "deepspeed_zero1_dp4": ({"overrides": ["parallel.dp_shard=4", "parallel.engine=deepspeed",
                                           "parallel.zero_stage=1"]}, "exact"),
    "tp2_dp2_sharded_init": ({"overrides": ["parallel.tp=2", "parallel.dp_shard=2", "parallel.init=sharded"]},
                             "runs"),
    "tp4": ({"overrides": ["parallel.tp=4", "parallel.dp_shard=1", "model.n_kv_heads=4"]}, "exact"),
    "tp2_hsdp_replicate2": ({"overrides": ["parallel.tp=2", "parallel.dp_shard=1", "parallel.dp_replicate=2"]},
                            "exact"),
    "zero1_tp2_dp2": ({"overrides": ["parallel.tp=2", "parallel.dp_shard=2", "parallel.zero_stage=1"]}, "exact"),
    "zero1_pp2_dp2_1f1b": ({"overrides": ["parallel.pp=2", "parallel.dp_shard=2", "parallel.zero_stage=1"]}, "exact"),
    "reshard_fsdp_tp2_to_zero1_pp2": ({"reshard": [["parallel.tp=2", "parallel.dp_shard=2"],
                                                   ["parallel.pp=2", "parallel.dp_shard=2", "parallel.zero_stage=1"]],
                                       "steps": [2, 2]}, "exact"),
}

CASES_8 = {
    "3d_pp2_dp2_tp2_1f1b": ({"overrides": THREE_D}, "exact"),
    "3d_pp2_dp2_tp2_interleaved1f1b_ac_selective": ({"overrides": THREE_D + V2 + [
        "parallel.pp_schedule=Interleaved1F1B", "train.activation_checkpointing=selective"]}, "exact"),
    "3d_zbv_hsdp": ({"overrides": ["parallel.pp=2", "parallel.tp=2", "parallel.dp_replicate=2",
                                   "parallel.dp_shard=1", "parallel.pp_schedule=ZBVZeroBubble"] + V2}, "exact"),
    "reshard_3d_to_dp8_to_3d": ({"reshard": [THREE_D, ["parallel.dp_shard=8", "train.micro_batch=1"],
                                             THREE_D + ["parallel.pp_schedule=GPipe"]],
                                 "steps": [2, 1, 1]}, "exact"),
    "3d_zero1_pp2_dp2_tp2": ({"overrides": THREE_D + ["parallel.zero_stage=1"]}, "exact"),
    "3d_zero1_interleaved_ac_selective": ({"overrides": THREE_D + V2 + [
        "parallel.zero_stage=1", "parallel.pp_schedule=Interleaved1F1B", "train.activation_checkpointing=selective"]},
        "exact"),
}

CASES_COMPILE = {
    "tp2_compile": ({"overrides": TP + ["train.compile=true"]}, "exact"),
}


def launch(nproc: int, cases: dict, tmp: Path, timeout: int, extra_env: dict | None = None) -> dict:
    """Run the worker under torchrun; return {case: record}."""
    spec = [{"name": name, **case} for name, (case, _) in cases.items()]
    out = torchrun_worker(WORKER, nproc, spec, tmp, timeout, {"EXATRAIN_TEST_CKPT": str(tmp), **(extra_env or {})})
    return json.loads(out.read_text())


_REFERENCES: dict[tuple, dict] = {}


def reference_for(case: dict) -> dict:
    """The single-process reference for the case's model (its model.* overrides) and step count."""
    overrides = case.get("reshard", [case.get("overrides", [])])[0]
    model = tuple(o for o in overrides if o.startswith("model."))
    steps = sum(case.get("steps", [STEPS]))
    if (model, steps) not in _REFERENCES:
        cfg = tiny_cfg(list(model))
        batches = global_batches(cfg, steps + 1)
        _REFERENCES[(model, steps)] = reference_run(cfg, batches[:steps], batches[steps])
    return _REFERENCES[(model, steps)]


def check(results: dict, cases: dict, name: str) -> float:
    case, expect = cases[name]
    got = results[name]
    assert "error" not in got, got.get("error")
    assert got["consistent"], f"{name}: ranks reported different loss/grad-norm/eval: {got}"
    assert got["replicas_equal"], f"{name}: ranks holding the same shard have different weights"
    err = max_rel_err(got, reference_for(case))
    if expect == "exact":
        assert err <= EXACT, f"{name}: max relative error {err:.2e} > {EXACT:.0e}\n{got}"
    elif expect == "bf16":
        assert 1e-5 < err <= BF16, f"{name}: bf16 run off the fp32 reference by {err:.2e} (want (1e-5, {BF16}])"
    else:
        assert all(x == x and abs(x) < 1e3 for x in got["loss"] + got["grad_norm"]), got
    return err


@pytest.fixture(scope="module")
def results_2(tmp_path_factory):
    return launch(2, CASES_2, tmp_path_factory.mktemp("launch2"), timeout=420)


@pytest.fixture(scope="module")
def results_4(tmp_path_factory):
    return launch(4, CASES_4, tmp_path_factory.mktemp("launch4"), timeout=420)


@pytest.fixture(scope="module")
def launch_8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch8")
    return launch(8, CASES_8, tmp, timeout=560), tmp


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_2))
def test_two_processes(results_2, name):
    check(results_2, CASES_2, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_4))
def test_four_processes(results_4, name):
    check(results_4, CASES_4, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_8))
def test_eight_processes(launch_8, name):
    check(launch_8[0], CASES_8, name)


@pytest.mark.slow
def test_compile_with_tensor_parallel_gradients(tmp_path):
    """TP + SP + torch.compile trains exactly, from a cold and then a warm compile cache: torch 2.13 crashes or
    gives wrong gradients without the engine's workarounds (DESIGN.md §11; warm AOTAutograd cache hits)."""
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for attempt in ("cold", "warm"):
        results = launch(2, CASES_COMPILE, tmp_path / attempt, timeout=280, extra_env=cache)
        check(results, CASES_COMPILE, "tp2_compile")


def _engine(overrides: list[str] = ()):
    cfg = tiny_cfg(list(overrides))
    dims = ParallelDims.from_config(cfg, 1)
    mesh = dims.build_mesh("cpu")
    return cfg, dims, mesh, build_engine(build_model(cfg.model), cfg, dims, mesh, "cpu")


def _train(engine, cfg, batches) -> dict:
    rec = {"loss": [], "grad_norm": []}
    for b in batches:
        stats = engine.train_step(rank_micro_batches(b, 0, 1, cfg.train.micro_batch), n_labels(b), cfg.optim.lr)
        rec["loss"].append(stats.loss)
        rec["grad_norm"].append(stats.grad_norm)
    return rec


@pytest.mark.parametrize("overrides", [["train.activation_checkpointing=none"],
                                       ["train.activation_checkpointing=selective"],
                                       ["train.activation_checkpointing=full"],
                                       ["model.tie_embeddings=true"]], ids=["ac_none", "ac_selective", "ac_full", "tied"])
def test_single_process_engine_matches_reference(single_process, overrides):
    cfg, _, _, engine = _engine(overrides)
    batches = global_batches(cfg, STEPS + 1)
    got = _train(engine, cfg, batches[:STEPS])
    got["eval"] = list(engine.eval_loss(rank_micro_batches(batches[STEPS], 0, 1, cfg.train.micro_batch)))
    assert max_rel_err(got, reference_run(cfg, batches[:STEPS], batches[STEPS])) <= EXACT
    assert len(engine.model_parts) == 1


def test_single_process_state_dict_round_trip(single_process, tmp_path):
    cfg, _, _, engine = _engine()
    batches = global_batches(cfg, 4)
    first = _train(engine, cfg, batches[:2])
    dcp.save(engine.state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    sd = engine.state_dict()
    assert "layers.3.attention.wq.weight" in sd["model"]
    assert "state.layers.3.attention.wq.weight.exp_avg" in sd["optim"]
    _, _, _, resumed = _engine()
    sd = resumed.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path / "ckpt"))
    resumed.load_state_dict(sd)
    rest = _train(resumed, cfg, batches[2:])
    ref = reference_run(cfg, batches)
    assert max_rel_err({"loss": first["loss"] + rest["loss"], "grad_norm": first["grad_norm"] + rest["grad_norm"]},
                       ref) <= EXACT


@pytest.mark.slow
def test_3d_checkpoint_loads_in_one_process(launch_8, single_process):
    """The tp2·pp2·dp2 checkpoint written by the 8-process launch (after 2 steps) resumes in a plain process."""
    _, tmp = launch_8
    cfg, _, _, engine = _engine()
    sd = engine.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp / "reshard_3d_to_dp8_to_3d_0"))
    engine.load_state_dict(sd)
    batches = global_batches(cfg, 4)
    got = _train(engine, cfg, batches[2:3])
    ref = reference_for(CASES_8["reshard_3d_to_dp8_to_3d"][0])
    assert abs(got["loss"][0] - ref["loss"][2]) / ref["loss"][2] <= EXACT
    assert abs(got["grad_norm"][0] - ref["grad_norm"][2]) / ref["grad_norm"][2] <= EXACT


def test_non_finite_gradients_skip_the_step(single_process):
    """A step whose gradients are non-finite leaves weights and optimizer state untouched; training goes on."""
    cfg, _, _, engine = _engine()
    batches = global_batches(cfg, 2)
    part = engine.model_parts[0]
    before = {k: v.clone() for k, v in part.state_dict().items()}
    hook = part.layers["0"].attention.wq.weight.register_hook(lambda g: g * float("nan"))
    stats = engine.train_step(rank_micro_batches(batches[0], 0, 1, cfg.train.micro_batch), n_labels(batches[0]),
                              cfg.optim.lr)
    hook.remove()
    assert stats.skipped and stats.grad_norm != stats.grad_norm
    assert all(torch.equal(v, part.state_dict()[k]) for k, v in before.items())
    assert not engine.optimizers[0].optimizer.state
    got = _train(engine, cfg, batches[1:])
    assert all(x == x for x in got["loss"] + got["grad_norm"]) and engine.optimizers[0].optimizer.state
