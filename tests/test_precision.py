"""Real FP8 (torchao), MXFP8 emulation and simulated formats through the engine on CPU: the `precision:` section adds
the converter, which runs on the meta model before the engine parallelises it; single-process accuracy against fp32,
and 2-process FSDP2 / TP / PP layouts against one process (one torchrun launch for every case).

What one process is compared with: the same config and the same micro-batches at world size 1. Dynamic tensorwise
scales are per micro-batch, so data-parallel ranks must see the single process's micro-batches (they do:
tests/parallel_common.rank_micro_batches), and the pipeline's tensorwise case is compared with one-row
micro-batches (a pipeline splits each micro-batch into one-row pipeline micro-batches).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

pytest.importorskip("torchao")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import torchrun_worker  # noqa: E402
from parallel_common import global_batches, n_labels, rank_micro_batches, reference_run, tiny_cfg
from precision_common import MX, SIMULATED, SIMULATED_E5M2_GRADS, fp8, make_engine, rel_err, run, weight_err

from exatrain.config import ConfigError, ModelConfig
from exatrain.model.llama import build_model
from exatrain.train.precision import convert_to_fp8, convert_to_mxfp8, fp8_config

WORKER = Path(__file__).resolve().parent / "precision_worker.py"
DP = ["parallel.dp_shard=2"]
TP = ["parallel.tp=2", "parallel.dp_shard=1"]
PP = ["parallel.pp=2", "parallel.dp_shard=1"]


def world_one(spec: dict) -> dict:
    """The single-process run of a case: its overrides without the layout (spec["single"]: overrides of the
    single-process run only)."""
    rec = run({**spec, "layout": spec.get("single", []), "resume_after": None}, 1)
    dist.destroy_process_group()
    return rec


@pytest.mark.parametrize("recipe,gemms", [("tensorwise", 3), ("rowwise", 3), ("rowwise_with_gw_hp", 2)])
def test_recipes_train_close_to_fp32_with_real_fp8_gemms(single_process, monkeypatch, recipe, gemms):
    calls = []
    scaled_mm = torch._scaled_mm

    def counting(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        return scaled_mm(a, b, *args, **kwargs)

    ref = fp32_reference()
    monkeypatch.setattr(torch, "_scaled_mm", counting)
    got = world_one({"overrides": fp8(recipe)})
    assert got["converted"] == 4 * 7  # every block projection; not the head, not the embedding
    assert rel_err(got["loss"], ref["loss"]) < 2e-3  # measured: 3.7e-4 tensorwise, 9e-4 rowwise, 1.2e-4 gw_hp
    assert weight_err(got["weights"], ref["weights"]) > 0  # Adam at lr 1e-2 turns any gradient change into O(lr)
    # 3 steps x 4 micro-batches x 28 Linears x (fwd, dgrad[, wgrad]) real torch._scaled_mm calls, then the
    # forward of the sharpness probe (4 micro-batches)
    assert len(calls) == 3 * 4 * 28 * gemms + 4 * 28
    assert {a for a, _ in calls} <= {torch.float8_e4m3fn, torch.float8_e5m2}


_FP32: dict = {}


def fp32_reference() -> dict:
    if not _FP32:
        _FP32.update(world_one({}))
    return _FP32


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_linear_error_magnitudes(recipe):
    """What fp8 costs per GEMM on Gaussian data (measured: output 3.5-3.7% relative error; gradients 5.9%
    tensorwise (e5m2), 3.6% rowwise (e4m3); rowwise_with_gw_hp's weight gradient is exact)."""
    from torchao.float8 import convert_to_float8_training

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(256, 512, bias=False))
    low = nn.Sequential(nn.Linear(256, 512, bias=False))
    low.load_state_dict(ref.state_dict())
    convert_to_float8_training(low, config=fp8_config(recipe))
    x = torch.randn(64, 256)
    go = torch.randn(64, 512)
    errs = []
    for mod in (ref, low):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(go)
        errs.append((y.detach(), xi.grad, mod[0].weight.grad))
    rel = [float((b - a).norm() / a.norm()) for a, b in zip(errs[0], errs[1])]
    assert all(0.005 < r < 0.1 for r in rel[:2]), rel
    if recipe == "rowwise_with_gw_hp":
        assert rel[2] == 0.0  # the weight-gradient GEMM stays in high precision
    else:
        assert 0.005 < rel[2] < 0.1, rel


def test_converter_validation_and_meta_conversion():
    with pytest.raises(ConfigError, match="precision.fp8.recipe: got 'blockwise'"):
        fp8_config("blockwise")
    with pytest.raises(ConfigError, match="fsdp_float8_all_gather: only the tensorwise recipe"):
        fp8_config("rowwise", fsdp_float8_all_gather=True)
    with pytest.raises(ConfigError, match="precision.fp8.power_of_two_scales"):
        fp8_config("tensorwise", fsdp_float8_all_gather=True, power_of_two_scales=True)
    with pytest.raises(ConfigError, match="precision.mxfp8.recipe"):
        convert_to_mxfp8(build_model(_cfg()), "mxfp4")
    model = build_model(_cfg(n_kv_heads=1, ffn_hidden=48))  # wk/wv: 16 outputs; w1/w3: 48 (not 32-divisible)
    mx = convert_to_mxfp8(model)
    assert "layers.0.attention.wq" in mx and "layers.0.attention.wk" not in mx and "layers.0.feed_forward.w1" not in mx
    model = build_model(_cfg(ffn_hidden=40))
    converted = convert_to_fp8(model, exclude=("output", "tok_embeddings", "layers.1"))
    assert "layers.0.feed_forward.w1" not in converted and not any(f.startswith("layers.1.") for f in converted)
    assert all(model.get_submodule(f).weight.is_meta for f in converted)


def test_missing_torchao_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ImportError, match="pip install torchao==0.18.0"):
        fp8_config("tensorwise")


def _cfg(**kw):
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 128, "vocab_size": 64,
            "max_seq_len": 16, "tie_embeddings": False}
    return ModelConfig(**{**base, **kw})


def test_bf16_params_without_fsdp_keeps_fp32_masters_and_resumes_bitwise(single_process, tmp_path):
    """train.dtype=bf16_params on one process: bf16 weights, fp32 master slices in the optimizer (the ZeRO-1
    strategy over a data-parallel group of one), checkpointed as optimizer state `master`."""
    cfg, _, _, engine = make_engine({"overrides": ["train.dtype=bf16_params"]}, 1)
    batches = global_batches(cfg, 5)

    def train(engine, bs):
        return [engine.train_step(rank_micro_batches(b, 0, 1, cfg.train.micro_batch), n_labels(b),
                                  cfg.optim.lr).loss for b in bs]

    opt = engine.optimizers[0]
    assert {p.dtype for p in engine.model_parts[0].parameters()} == {torch.bfloat16}
    assert {m.dtype for m in opt.masters.values()} == {torch.float32}
    first = train(engine, batches[:2])
    assert all(torch.equal(opt.masters[p].to(torch.bfloat16), p.detach().reshape(-1)) for p in opt.params)
    assert any(not torch.equal(opt.masters[p], p.detach().reshape(-1).float()) for p in opt.params)
    dcp.save(engine.state_dict(), checkpoint_id=str(tmp_path))
    assert any(k.endswith(".master") for k in engine.state_dict()["optim"])
    rest = train(engine, batches[2:])
    _, _, _, resumed = make_engine({"overrides": ["train.dtype=bf16_params"]}, 1)
    state = resumed.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    resumed.load_state_dict(state)
    assert train(resumed, batches[2:]) == rest
    ref = reference_run(tiny_cfg(), batches)["loss"]
    assert 1e-4 < rel_err(first + rest, ref) < 2e-2  # measured 5e-3: bf16 compute, not fp32


# ---------------------------------------------------------------- two processes
# name -> (spec, expectation):
#   "exact"  loss and grad norm per step, the final weights and the trained model's φ_ε equal one process up to
#            fp32 reduction order;
#   "steps"  losses and grad norms equal; the final weights differ in a few elements (tensorwise's exact amax
#            scales turn fp32 reduction-order noise into fp8 rounding flips, which Adam enlarges);
#   ("close", tol) a different but valid quantisation: losses within tol;
#   ("error", text) a known failure on gloo.
ONE_ROW = ["train.micro_batch=1"]  # a pipeline splits each 2-row micro-batch into 1-row pipeline micro-batches
CASES = {
    "dp2_fp8_tensorwise_float8_all_gather": ({"layout": DP, "overrides": fp8("tensorwise",
                                              "precision.fp8.fsdp_float8_all_gather=true")}, "steps"),
    "dp2_fp8_float8_all_gather_dcp_resume": ({"layout": DP, "overrides": fp8("tensorwise",
                                              "precision.fp8.fsdp_float8_all_gather=true"), "resume_after": 2},
                                             "steps"),
    "dp2_fp8_tensorwise_pow2_scales": ({"layout": DP, "overrides": fp8("tensorwise",
                                        "precision.fp8.power_of_two_scales=true")}, "exact"),
    "dp2_fp8_rowwise": ({"layout": DP, "overrides": fp8("rowwise")}, "exact"),
    "dp2_fp8_rowwise_with_gw_hp": ({"layout": DP, "overrides": fp8("rowwise_with_gw_hp")}, "exact"),
    "dp2_mxfp8_emulated": ({"layout": DP, "overrides": ["precision.gemm=mxfp8", *MX]}, "exact"),
    "dp2_simulated_e5m2_grads": ({"layout": DP, "overrides": SIMULATED_E5M2_GRADS}, "exact"),
    "tp2_sp_fp8_tensorwise_pow2_plain_styles": ({"layout": TP, "overrides": fp8("tensorwise",
                                                 "precision.fp8.power_of_two_scales=true")}, "exact"),
    "tp2_fp8_tensorwise_float8_styles_no_sp": ({"layout": TP + ["parallel.sequence_parallel=false"],
                                                "overrides": fp8("tensorwise", "precision.fp8.float8_tp_styles=true")},
                                               "steps"),
    # refused by the validator on CPU; pinned here so the refusal can go when gloo learns float8
    "tp2_fp8_tensorwise_float8_styles_sp": ({"layout": TP, "overrides": fp8("tensorwise"),
                                             "unchecked": {"precision.fp8.float8_tp_styles": True}},
                                            ("error", "Invalid scalar type")),
    # per-row scales of the row-parallel GEMMs (wo, w2) see only this rank's half of K
    "tp2_fp8_rowwise_plain_styles": ({"layout": TP, "overrides": fp8("rowwise")}, ("close", 2e-3)),
    "tp2_sp_simulated": ({"layout": TP, "overrides": SIMULATED}, "exact"),
    "tp2_no_loss_parallel_simulated": ({"layout": TP + ["parallel.loss_parallel=false"], "overrides": SIMULATED},
                                       "exact"),
    # TP sums partial products in another order; near e5m2's underflow a rounding flip becomes a full Adam step
    # (measured: loss 1e-4 off, weights 12%), so only the losses are compared
    "tp2_simulated_e5m2_grads": ({"layout": TP, "overrides": SIMULATED_E5M2_GRADS}, ("close", 5e-4)),
    "pp2_fp8_tensorwise_pow2": ({"layout": PP, "single": ONE_ROW, "overrides": fp8("tensorwise",
                                 "precision.fp8.power_of_two_scales=true")}, "exact"),
    # rowwise scales the weight-gradient GEMM along the token dimension: one-row pieces on both sides too
    "pp2_fp8_rowwise": ({"layout": PP, "single": ONE_ROW, "overrides": fp8("rowwise")}, "exact"),
    "pp2_simulated_e5m2_grads": ({"layout": PP, "overrides": SIMULATED_E5M2_GRADS}, "exact"),
    # the converter runs in DeepSpeed's build sequence too (FP8 is refused there by the validator)
    "deepspeed_zero2_simulated": ({"layout": ["parallel.dp_shard=2", "parallel.engine=deepspeed",
                                              "parallel.zero_stage=2"], "overrides": SIMULATED}, "exact"),
}
EXACT, STEPS_WEIGHTS = 1e-5, 5e-3


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    spec = [{"name": n, **case} for n, (case, _) in CASES.items()]
    out = torchrun_worker(WORKER, 2, spec, tmp_path_factory.mktemp("precision"), 400, out_name="out.pt")
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes(launched, single_process, name):
    case, expect = CASES[name]
    got = launched[name]
    if isinstance(expect, tuple) and expect[0] == "error":
        assert expect[1] in got.get("error", ""), f"{name}: expected the known gloo failure, got {got}"
        return
    assert "error" not in got, got.get("error")
    ref = world_one(case)
    loss, norm = rel_err(got["loss"], ref["loss"]), rel_err(got["grad_norm"], ref["grad_norm"])
    weights = weight_err(got["weights"], ref["weights"])
    phi = abs(got["sharpness"] - ref["sharpness"]) / ref["sharpness"]
    msg = f"{name}: loss {loss:.1e}, grad norm {norm:.1e}, weights {weights:.1e}, sharpness {phi:.1e}"
    if isinstance(expect, tuple):
        assert loss <= expect[1], msg
    else:
        assert loss <= EXACT and norm <= EXACT, msg
        assert weights <= (EXACT if expect == "exact" else STEPS_WEIGHTS), msg
        assert phi <= (1e-4 if expect == "exact" else 1e-2), msg
