"""The `precision:` section through the trainer and the CLI: FP8 and simulated runs against fp32, kill/resume
bitwise with FP8 and the stability callbacks on, the sharpness and divergence callbacks, and invalid settings
rejected with the key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY, env, kill_after_checkpoint, losses, run, train_cmd

from exatrain.config import ConfigError, load_config, resolve_config
from exatrain.data import build_data, split_micro
from exatrain.eval.sharpness import logit_sharpness, weight_sharpness
from exatrain.model.llama import build_model, materialize
from exatrain.train import trainer
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import list_checkpoints, load_model_weights
from exatrain.train.metrics import read_metrics
from exatrain.train.stability import DIVERGENCE_FILE, Sharpness

FP8 = ["precision.gemm=fp8"]
SHORT = ["checkpoint.every=0", "checkpoint.save_final=false", "train.steps=20", "optim.lr=1e-2"]


def _train(run_dir: Path, *overrides: str, callbacks=()) -> trainer.TrainResult:
    return trainer.train(load_config("tiny.yaml", [*TINY, f"run_dir={run_dir}", *overrides]), callbacks=callbacks)


@pytest.fixture(scope="module")
def fp32_curve(tmp_path_factory, cache) -> list[float]:
    run_dir = tmp_path_factory.mktemp("fp32")
    _train(run_dir, *SHORT)
    return list(losses(run_dir).values())


@pytest.mark.parametrize("overrides, tol", [
    (FP8, 3e-3),                                                      # measured 5.8e-4
    ([*FP8, "precision.fp8.recipe=rowwise"], 3e-3),                   # 1.3e-3
    (["precision.gemm=simulated", "precision.simulated.format=e8m7"], 5e-4),  # bf16 operands: 5e-5
    (["precision.gemm=simulated", "precision.simulated.format=e8m3",
      "precision.simulated.rounding=truncate"], 1e-2),                # 3.6e-3
], ids=["fp8_tensorwise", "fp8_rowwise", "simulated_e8m7", "simulated_e8m3_truncate"])
def test_low_precision_runs_track_fp32(tmp_path, fp32_curve, overrides, tol):
    """20 steps of the tiny model at lr 1e-2 (loss 8.31 -> 7.46): every step's loss within `tol` (relative) of
    fp32's, and not equal to it (the GEMMs really ran in the low-precision format)."""
    _train(tmp_path, *SHORT, *overrides)
    curve = list(losses(tmp_path).values())
    err = max(abs(a - b) / b for a, b in zip(curve, fp32_curve, strict=True))
    assert 0 < err < tol, err


def test_fp8_resume_after_sigkill_is_bitwise_identical(tmp_path, cache):
    """FP8 (tensorwise: stateless dynamic scales) with the sharpness and divergence callbacks on: killed right
    after its step-4 checkpoint and resumed, the run logs the same losses and sharpness as an uninterrupted one."""
    extra = [*FP8, "train.steps=8", "precision.sharpness.every=3", "precision.divergence.enabled=true",
             "precision.divergence.warmup=2", "precision.divergence.median_window=4"]
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    run(train_cmd(ref_dir, *extra), cache)
    kill_after_checkpoint(train_cmd(killed_dir, *extra), killed_dir, 4, env(cache))
    assert max(losses(killed_dir)) < 8
    run(train_cmd(killed_dir, *extra), cache)
    assert losses(killed_dir) == losses(ref_dir)

    def sharpness(d):
        return {r["step"]: r["sharpness_phi"] for r in read_metrics(d / "metrics.jsonl", "train") if "sharpness_phi" in r}
    assert sharpness(killed_dir) == sharpness(ref_dir) and sorted(sharpness(ref_dir)) == [3, 6, 8]
    assert json.loads((killed_dir / DIVERGENCE_FILE).read_text())["diverged"] is False


class PoisonLogits(Callback):
    """Makes the output head return NaN during training step `step` (a non-finite loss, as a diverged run has)."""

    def __init__(self, step: int):
        self.step, self.hook = step, None

    def on_step_start(self, t):
        if t.state.step + 1 == self.step:
            self.hook = t.engine.model_parts[0].output.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_step_end(self, t, stats, record):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def test_divergence_stop_ends_the_run_and_a_resume_stays_stopped(tmp_path, cache):
    over = ["train.steps=12", "checkpoint.every=0", "precision.divergence.enabled=true",
            "precision.divergence.action=stop"]
    result = _train(tmp_path, *over, callbacks=[PoisonLogits(5)])
    assert result.status == "stopped" and result.step == 5
    event = json.loads((tmp_path / DIVERGENCE_FILE).read_text())
    assert event["diverged"] and event["step"] == 5 and event["reason"] == "non-finite loss" and event["loss"] == "nan"
    assert event["steps_done"] == 5 and event["status"] == "stopped"
    records = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in records if "diverged_at" in r] == [5] and records[-1]["step"] == 5
    again = _train(tmp_path, *over)  # resumes from the checkpoint written at the stop
    assert again.status == "stopped" and again.step == 5
    assert read_metrics(tmp_path / "metrics.jsonl", "train")[-1]["step"] == 5

    recorded = _train(tmp_path / "record", *over[:-1], callbacks=[PoisonLogits(5)])
    assert recorded.status == "completed" and recorded.step == 12
    event = json.loads((tmp_path / "record" / DIVERGENCE_FILE).read_text())
    assert event["diverged"] and event["step"] == 5 and event["steps_done"] == 12


def test_sharpness_callback_matches_a_direct_computation(tmp_path, cache):
    """The callback's φ_ε (through the engine's eval forward and an output-head hook) and weight sharpness equal
    the plain functions on the final checkpoint's weights and the same validation rows."""
    over = ["train.steps=6", "checkpoint.every=0", "precision.sharpness.every=3", "precision.sharpness.epsilon=0.01",
            "precision.sharpness.weight_directions=2", "precision.sharpness.weight_radius=0.1"]
    _train(tmp_path, *over)
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl", "train")}
    assert [s for s, r in records.items() if "sharpness_phi" in r] == [3, 6]
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", *over])
    model = materialize(build_model(cfg.model), "cpu", 0)
    load_model_weights(list_checkpoints(tmp_path / "checkpoints")[-1], model)
    batch = next(build_data(cfg, 0, 1).val.iter_batches(1, cfg.train.global_batch))
    kwargs = {"positions": batch.positions, "doc_ids": batch.doc_ids}
    direct = logit_sharpness(model, batch.tokens, batch.labels, 0.01, **kwargs)
    assert records[6]["sharpness_phi"] == pytest.approx(direct.phi, rel=1e-5)
    assert records[6]["sharpness_ce"] == pytest.approx(direct.loss, rel=1e-6)
    weights = weight_sharpness(model, batch.tokens, batch.labels, 2, 0.1, 0, **kwargs)
    # a difference of two float32 losses near 8.3 (ulp 9.5e-7), summed per micro-batch vs over the whole batch
    assert records[6]["weight_sharpness_mean"] == pytest.approx(weights.mean_increase, abs=4e-6)
    assert records[3]["sharpness_phi"] != records[6]["sharpness_phi"] and direct.phi > 0
    assert len(split_micro(batch, cfg.train.micro_batch)) == 2


def test_weight_sharpness_is_refused_on_several_ranks():
    cfg = load_config("tiny.yaml", ["precision.sharpness.every=10", "precision.sharpness.weight_directions=4"])
    with pytest.raises(ConfigError, match=r"precision\.sharpness\.weight_directions: .*single-process"):
        Sharpness(cfg.precision.sharpness, world_size=2)
    Sharpness(cfg.precision.sharpness, world_size=1)


def test_resolver_adds_converter_and_callbacks_once():
    cfg = load_config("tiny.yaml", ["precision.gemm=simulated", "precision.sharpness.every=5",
                                    "precision.divergence.enabled=true", "model.converters=[]"])
    assert cfg.model.converters == ["simulated"] and cfg.train.callbacks == ["divergence", "sharpness"]
    assert resolve_config(cfg) == cfg
    plain = load_config("tiny.yaml")
    assert plain.model.converters == [] and plain.train.callbacks == [] and plain.train.dtype == "fp32"


@pytest.mark.parametrize("overrides, key", [
    (["precision.gemm=simulated", "precision.simulated.format=e0m3"], "precision.simulated.format.exponent_bits"),
    (["precision.gemm=simulated", "precision.simulated.weight=e8m24"], "precision.simulated.weight.mantissa_bits"),
    (["precision.gemm=simulated", "precision.simulated.layers=[{pattern: 'layers.*.attention.*', grad_output: e9m2}]"],
     "precision.simulated.layers.0.grad_output.exponent_bits"),
    (["precision.simulated.format=e8"], "precision.simulated.format"),
    (["precision.simulated.rounding=up"], "precision.simulated.rounding"),
    (["precision.simulated.overflow=wrap"], "precision.simulated.overflow"),
    (["precision.gemm=simulated", "train.dtype=bf16"], "precision.gemm"),
    (["precision.gemm=int4"], "precision.gemm"),
    (["precision.gemm=fp8", "precision.fp8.recipe=blockwise"], "precision.fp8.recipe"),
    (["precision.fp8.recipe=rowwise", "precision.fp8.fsdp_float8_all_gather=true"],
     "precision.fp8.fsdp_float8_all_gather"),
    (["precision.fp8.fsdp_float8_all_gather=true", "precision.fp8.power_of_two_scales=true"],
     "precision.fp8.power_of_two_scales"),
    (["precision.fp8.recipe=rowwise", "precision.fp8.float8_tp_styles=true"], "precision.fp8.float8_tp_styles"),
    (["precision.fp8.float8_tp_styles=true", "parallel.tp=2", "train.device=cpu"], "precision.fp8.float8_tp_styles"),
    (["precision.gemm=fp8", "parallel.engine=deepspeed"], "precision.gemm"),
    (["precision.mxfp8.recipe=mxfp4"], "precision.mxfp8.recipe"),
    (["precision.exclude=['']"], "precision.exclude"),
    (["model.converters=[fp8]"], "model.converters"),
    (["precision.sharpness.every=-1"], "precision.sharpness.every"),
    (["precision.sharpness.epsilon=0"], "precision.sharpness.epsilon"),
    (["precision.divergence.threshold=1.0"], "precision.divergence.threshold"),
    (["precision.divergence.action=halt"], "precision.divergence.action"),
    (["train.callbacks=[divergence]"], "train.callbacks"),
    (["train.dtype=fp16"], "train.dtype"),
])
def test_invalid_precision_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ":"):
        load_config("tiny.yaml", overrides)


def test_valid_combinations_load():
    load_config("tiny.yaml", ["precision.fp8.float8_tp_styles=true", "parallel.tp=2", "train.device=cpu",
                              "parallel.sequence_parallel=false", "precision.gemm=fp8"])
    load_config("tiny.yaml", ["precision.gemm=fp8", "train.dtype=bf16_params",
                              "precision.fp8.fsdp_float8_all_gather=true"])
    cfg = load_config("tiny.yaml", ["precision.gemm=simulated", "precision.simulated.format=fp32",
                                    "precision.simulated.layers=[{pattern: '*.feed_forward.*', weight: e4m3fn}]"])
    assert cfg.precision.simulated.layers[0].weight == "e4m3fn"
