"""End-to-end trainer behaviour: learning, DP equivalence, exact resume after SIGKILL, bad checkpoints."""

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest

from exatrain.config import load_config
from exatrain.train import trainer
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import Checkpointer, CheckpointError, list_checkpoints
from helpers import TINY, StopAfter, env, kill_after_checkpoint, losses, run, torchrun_cmd, train_cmd


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """One uninterrupted single-process run that several tests compare against."""
    run_dir = tmp_path_factory.mktemp("ref")
    run(train_cmd(run_dir), cache)
    return run_dir


def test_loss_decreases_on_default_corpus(tmp_path, cache):
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "train.steps=40", "checkpoint.every=0",
                                    "optim.lr=1e-2", "train.eval_batches=2"])
    result = trainer.train(cfg)
    curve = losses(tmp_path)
    assert result.status == "completed" and result.step == 40
    assert sum(list(curve.values())[-5:]) / 5 < curve[1] - 0.5
    assert result.val_loss < curve[1] - 0.5
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000040"


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, cache, reference):
    kill_after_checkpoint(train_cmd(tmp_path, "checkpoint.keep=5"), tmp_path, 8, env(cache))
    killed_at = max(losses(tmp_path))
    assert killed_at < 12
    run(train_cmd(tmp_path, "checkpoint.keep=5"), cache)
    assert losses(tmp_path) == losses(reference)


def test_dp2_matches_single_process(tmp_path, cache, reference):
    run(torchrun_cmd(2, tmp_path), cache, timeout=300)
    ref, dp = losses(reference), losses(tmp_path)
    assert ref.keys() == dp.keys()
    for step in ref:
        assert dp[step] == pytest.approx(ref[step], rel=1e-5)


def test_mpirun_two_ranks_train_like_one_process(tmp_path, cache, reference):
    """Launched by Open MPI instead of torchrun: mpi4py supplies ranks and the rendezvous address."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (scripts/setup.sh installs Open MPI when run as root)")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", *train_cmd(tmp_path)]
    run(cmd, cache, timeout=300)
    ref, got = losses(reference), losses(tmp_path)
    assert ref.keys() == got.keys()
    assert all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in ref)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, cache, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    ckpts = tmp_path / "checkpoints"
    latest = list_checkpoints(ckpts)[-1]
    shutil.rmtree(latest)
    partial = ckpts / (latest.name + ".tmp")
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half-written")
    previous = list_checkpoints(ckpts)[-1]
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}"])
    assert Checkpointer(tmp_path, cfg).resume_path() == previous
    run(train_cmd(tmp_path), cache)
    assert losses(tmp_path)[12] == losses(reference)[12]
    assert not partial.exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, cache, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    latest = list_checkpoints(tmp_path / "checkpoints")[-1]
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "train.steps=20"])
    with pytest.raises(CheckpointError, match="corrupt.*truncated"):
        trainer.train(cfg)


def test_incompatible_checkpoint_names_the_difference(tmp_path, cache, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "train.steps=20", "model.n_layers=3"])
    with pytest.raises(CheckpointError, match="model.n_layers: checkpoint 2 vs run 3"):
        trainer.train(cfg)


def test_stop_request_checkpoints_and_resumes(tmp_path, cache, reference):
    first = trainer.train(load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}"]), callbacks=[StopAfter(6)])
    assert first.status == "preempted" and first.step == 6
    second = trainer.train(load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}"]))
    assert second.status == "completed"
    assert losses(tmp_path) == losses(reference)


def test_a_method_can_end_the_run_for_good(tmp_path, cache):
    """status "stopped" (e.g. a diverged run) outranks a preemption on another rank and is never requeued."""
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "checkpoint.every=0"])
    result = trainer.train(cfg, callbacks=[StopAfter(3, "preempted"), StopAfter(3, "stopped")])
    assert result.status == "stopped" and result.step == 3
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000003"


def test_stop_at_a_periodic_checkpoint_does_not_save_twice(tmp_path, cache):
    """A stop right after a periodic checkpoint (a time-limit deadline often lands there) keeps that one."""

    class CountSaves(Callback):
        def __init__(self):
            self.saves: list[int] = []

        def on_checkpoint(self, t, path):
            self.saves.append(t.state.step)

    counter = CountSaves()
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "checkpoint.every=2"])
    assert trainer.train(cfg, callbacks=[StopAfter(4), counter]).status == "preempted"
    assert counter.saves == [2, 4]


def test_stop_signal_checkpoints_and_resumes(tmp_path, cache, reference):
    """SIGUSR2 (Slurm's pre-limit signal) mid-run: every rank finishes the step, checkpoints, and stops."""

    class SignalAt(Callback):
        def on_step_start(self, t):
            if t.state.step == 4:
                os.kill(os.getpid(), signal.SIGUSR2)

    before = signal.getsignal(signal.SIGUSR2)
    first = trainer.train(load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}"]), callbacks=[SignalAt()])
    assert first.status == "preempted" and first.step == 5
    assert signal.getsignal(signal.SIGUSR2) is before, "the trainer must give the signal handler back"
    assert trainer.train(load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}"])).status == "completed"
    assert losses(tmp_path) == losses(reference)


class PoisonFirstStep(Callback):
    """Makes the first step's output-layer gradient infinite."""

    def on_step_start(self, t):
        if t.state.step == 0:
            self.hook = t.engine.model_parts[0].output.weight.register_hook(lambda g: g * float("inf"))

    def on_step_end(self, t, stats, record):
        if t.state.step == 1:
            self.hook.remove()


def test_non_finite_steps_are_skipped_or_raise(tmp_path, cache):
    """nan_policy=skip logs and counts a poisoned step and trains on; raise stops with advice."""
    overrides = [*TINY, "train.steps=3", "checkpoint.every=0", "checkpoint.save_final=false"]
    result = trainer.train(load_config("tiny.yaml", [*overrides, f"run_dir={tmp_path / 'skip'}"]),
                           callbacks=[PoisonFirstStep()])
    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r.get("kind", "train") == "train"]
    assert result.status == "completed" and [r.get("skipped", 0) for r in train] == [1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in train[1:])
    with pytest.raises(FloatingPointError, match="nan_policy=skip"):
        trainer.train(load_config("tiny.yaml", [*overrides, f"run_dir={tmp_path / 'raise'}",
                                                "train.nan_policy=raise"]), callbacks=[PoisonFirstStep()])
