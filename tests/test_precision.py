"""Real FP8 (torchao) and simulated-precision training on CPU: converters on the meta model before the unchanged
engine parallelises it, single-process accuracy against fp32, and 2-process FSDP2 / TP layouts against one process.

What one process is compared with: the same converter and the same micro-batches at world size 1. Dynamic
tensorwise scales are per micro-batch, so data-parallel ranks must see the single process's micro-batches
(they do: tests/parallel_common.rank_micro_batches) to quantise identically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("torchao")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel_common import one_thread
from precision_common import MX, rel_err, run, weight_err

from exatrain.config import ConfigError
from exatrain.model.llama import build_model
from exatrain.train.precision import convert_to_fp8, convert_to_mxfp8, fp8_config

WORKER = Path(__file__).resolve().parent / "precision_worker.py"
DP = ["parallel.dp_shard=2"]
TP = ["parallel.tp=2", "parallel.dp_shard=1"]


def fp8(recipe: str, **extra) -> dict:
    return {"kind": "fp8", "recipe": recipe, **extra}


@pytest.fixture
def single_process():
    with one_thread():
        yield
    if dist.is_initialized():
        dist.destroy_process_group()


def world_one(spec: dict) -> dict:
    """The single-process run of a case: its model overrides, no layout."""
    model = [o for o in spec.get("overrides", []) if o.startswith("model.")]
    rec = run({**spec, "overrides": model, "resume_after": None}, 1)
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
    got = world_one({"convert": fp8(recipe)})
    assert got["converted"] == 4 * 7  # every block projection; not the head, not the embedding
    assert rel_err(got["loss"], ref["loss"]) < 2e-3  # measured: 3.7e-4 tensorwise, 9e-4 rowwise, 1.2e-4 gw_hp
    assert weight_err(got["weights"], ref["weights"]) > 0  # Adam at lr 1e-2 turns any gradient change into O(lr)
    # 3 steps x 4 micro-batches x 28 Linears x (fwd, dgrad[, wgrad]) real torch._scaled_mm calls
    assert len(calls) == 3 * 4 * 28 * gemms
    assert {a for a, _ in calls} <= {torch.float8_e4m3fn, torch.float8_e5m2}


_FP32: dict = {}


def fp32_reference() -> dict:
    if not _FP32:
        _FP32.update(world_one({"convert": {"kind": "none"}}))
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
    from exatrain.config import ModelConfig

    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 128, "vocab_size": 64,
            "max_seq_len": 16, "tie_embeddings": False}
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------- two processes
# name -> (spec, expectation):
#   "exact"  loss and grad norm per step and the final weights equal one process up to fp32 reduction order;
#   "steps"  losses and grad norms equal; the final weights differ in a few elements (tensorwise's exact
#            amax scales turn fp32 reduction-order noise into fp8 rounding flips, which Adam enlarges);
#   ("close", tol) a different but valid quantisation: losses within tol;
#   ("error", text) a known failure on gloo.
CASES = {
    "dp2_fp8_tensorwise_float8_all_gather": ({"overrides": DP, "convert": fp8("tensorwise", all_gather=True),
                                              "precompute": True}, "steps"),
    "dp2_fp8_float8_all_gather_dcp_resume": ({"overrides": DP, "convert": fp8("tensorwise", all_gather=True),
                                              "precompute": True, "resume_after": 2}, "steps"),
    "dp2_fp8_tensorwise_pow2_scales": ({"overrides": DP, "convert": fp8("tensorwise", pow2=True)}, "exact"),
    "dp2_fp8_rowwise": ({"overrides": DP, "convert": fp8("rowwise")}, "exact"),
    "dp2_fp8_rowwise_with_gw_hp": ({"overrides": DP, "convert": fp8("rowwise_with_gw_hp")}, "exact"),
    "dp2_mxfp8_emulated": ({"overrides": DP + MX, "convert": {"kind": "mxfp8", "recipe": "mxfp8_emulated_rceil"}},
                           "exact"),
    "dp2_simulated_e8m3": ({"overrides": DP, "convert": {"kind": "simulated"}}, "exact"),
    "tp2_fp8_tensorwise_pow2_plain_styles": ({"overrides": TP, "convert": fp8("tensorwise", pow2=True)}, "exact"),
    "tp2_fp8_tensorwise_float8_styles_no_sp": ({"overrides": TP + ["parallel.loss_parallel=false",
                                                                   "parallel.sequence_parallel=false"],
                                                "convert": fp8("tensorwise"), "float8_tp_styles": True}, "steps"),
    "tp2_fp8_tensorwise_float8_styles_sp": ({"overrides": TP + ["parallel.loss_parallel=false"],
                                             "convert": fp8("tensorwise"), "float8_tp_styles": True},
                                            ("error", "Invalid scalar type")),  # gloo cannot all-gather float8
    # per-row scales of the row-parallel GEMMs (wo, w2) see only this rank's half of K
    "tp2_fp8_rowwise_plain_styles": ({"overrides": TP, "convert": fp8("rowwise")}, ("close", 2e-3)),
    "tp2_simulated_e8m3": ({"overrides": TP, "convert": {"kind": "simulated"}}, "exact"),
}
EXACT, STEPS_WEIGHTS = 1e-5, 5e-3


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    import json

    tmp = tmp_path_factory.mktemp("precision")
    spec, out = tmp / "spec.json", tmp / "out.pt"
    spec.write_text(json.dumps([{"name": n, **case} for n, (case, _) in CASES.items()]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(spec), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"precision launch timed out; output tail:\n{output[-20000:]}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"precision launch failed (rc={proc.returncode}); output tail:\n{output[-20000:]}")
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
    msg = f"{name}: loss {loss:.1e}, grad norm {norm:.1e}, weights {weights:.1e}"
    if isinstance(expect, tuple):
        assert loss <= expect[1], msg
    else:
        assert loss <= EXACT and norm <= EXACT, msg
        assert weights <= (EXACT if expect == "exact" else STEPS_WEIGHTS), msg
