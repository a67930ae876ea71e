"""Adversarial cases (DESIGN.md §10, README "Failure modes"): every fault gives a message naming the key or
file, and the checkpoints written before it stay intact and loadable.

One tiny run (checkpoints at steps 4 and 8) is trained once per module; each case works on a copy.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from exatrain import cli
from exatrain.config import ConfigError, load_config
from exatrain.model.llama import build_model, materialize
from exatrain.parallel.dims import ParallelDims
from exatrain.registry import CALLBACKS
from exatrain.train import trainer
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    file_digest,
    list_checkpoints,
    load_model_weights,
    read_state,
    verify,
)
from helpers import TINY, env, losses, run as run_cmd, torchrun_cmd

REPO = Path(__file__).resolve().parent.parent
BASE = [*TINY, "train.steps=8", "checkpoint.keep=5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    assert trainer.train(load_config("tiny.yaml", [*BASE, f"run_dir={run_dir}"])).status == "completed"
    return run_dir


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run."""
    dst = tmp_path / "run"
    subprocess.run(["cp", "-a", str(trained), str(dst)], check=True)
    return dst


def cfg(run_dir: Path, *overrides: str):
    return load_config("tiny.yaml", [*BASE, f"run_dir={run_dir}", *overrides])


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def assert_intact(run_dir: Path, *steps: int) -> None:
    """Each checkpoint verifies (sizes and checksums) and its weights load into a plain model."""
    config = cfg(run_dir)
    for step in steps:
        verify(step_dir(run_dir, step))
        model = materialize(build_model(config.model), "cpu", 0)
        load_model_weights(step_dir(run_dir, step), model)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def rewrite(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a file and update the manifest to match: what a deliberate attacker (not bit rot) does."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["manifest"][name] = {"bytes": len(data), "blake2b": file_digest(ckpt / name)}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_meta(ckpt: Path, fn) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    fn(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- 1. code execution from a checkpoint


class Reduce:
    """Pickles as `fn(*args)`: what a crafted file makes the unpickler call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(sentinel: Path) -> dict[str, object]:
    touch = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": Reduce(os.system, f"touch {sentinel}"),
        "builtins.eval": Reduce(eval, touch),
        "builtins.exec": Reduce(exec, touch),
        "getattr chain": Reduce(getattr, Reduce(__import__, "os"), "system"),
        "subprocess": Reduce(subprocess.call, ["touch", str(sentinel)]),
        "torch.load": Reduce(torch.load, str(sentinel)),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "getattr chain", "subprocess",
                                  "torch.load"])
def test_crafted_metadata_does_not_execute(run, tmp_path, kind):
    sentinel = tmp_path / "pwned"
    latest = step_dir(run, 8)
    rewrite(latest, ".metadata", pickle.dumps(payloads(sentinel)[kind]))
    with pytest.raises(CheckpointError, match=r"\.metadata refers to .*refusing to load it.*untrusted"):
        trainer.train(cfg(run, "train.steps=10"))
    assert not sentinel.exists()
    assert_intact(run, 4)


def test_crafted_metadata_in_eval_does_not_execute(run, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    rewrite(step_dir(run, 8), ".metadata", pickle.dumps(payloads(sentinel)["os.system"]))
    assert cli.main(["eval", str(run), "--max-docs", "1"]) == 2
    assert "refers to posix.system, which a DCP checkpoint never contains" in capsys.readouterr().err
    assert not sentinel.exists()
    assert_intact(run, 4)


def test_crafted_non_tensor_value_does_not_execute(tmp_path):
    """DCP stores non-tensor values as pickles and its default planner loads them with weights_only=False."""
    sentinel = tmp_path / "pwned"
    dcp.save({"trainer": {"step": Reduce(os.system, f"touch {sentinel}")}}, checkpoint_id=str(tmp_path / "ck"),
             no_dist=True)
    with pytest.raises(CheckpointError, match="trainer.step is not plain data; refusing"):
        read_state({"trainer": {"step": 0}}, tmp_path / "ck", "trainer state", no_dist=True)
    assert not sentinel.exists()


def test_metadata_that_is_not_dcp_metadata(run):
    rewrite(step_dir(run, 8), ".metadata", pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CheckpointError, match="holds a dict, not DCP Metadata"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


def test_metadata_garbage(run):
    rewrite(step_dir(run, 8), ".metadata", b"\x80\x05garbage")
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt: cannot unpickle"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


# ---------------------------------------------------------------- corrupt, missing and mismatched checkpoints


def test_flipped_shard_byte_fails_its_checksum(run):
    shard = next(step_dir(run, 8).glob("*.distcp"))
    flip_byte(shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not match its blake2b checksum[\s\S]*"
                                              r"earlier checkpoint is .*step_00000004"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


@pytest.mark.parametrize("name", [".metadata", "rank_0.pt"])
def test_flipped_byte_in_other_files_fails_its_checksum(run, name):
    flip_byte(step_dir(run, 8) / name)
    with pytest.raises(CheckpointError, match=rf"{name} does not match its blake2b checksum"):
        verify(step_dir(run, 8))
    assert_intact(run, 4)


def test_truncated_shard(run):
    shard = next(step_dir(run, 8).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt.*truncated"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


def test_missing_shard(run):
    next(step_dir(run, 8).glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match=r"corrupt: __0_0.distcp is missing"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


def test_missing_meta_json(run):
    (step_dir(run, 8) / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: meta.json is missing"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


def test_meta_json_not_json(run):
    (step_dir(run, 8) / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        trainer.train(cfg(run, "train.steps=10"))
    assert_intact(run, 4)


def test_unknown_format_version(run):
    edit_meta(step_dir(run, 8), lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="has format 99, this exatrain reads formats 2, 3"):
        verify(step_dir(run, 8))
    assert_intact(run, 4)


def test_meta_json_without_manifest(run):
    edit_meta(step_dir(run, 8), lambda m: m.pop("manifest"))
    with pytest.raises(CheckpointError, match="meta.json lacks manifest"):
        verify(step_dir(run, 8))


def test_format_2_checkpoint_with_sizes_only_still_loads(run):
    def to_v2(m):
        m.update(format_version=2, manifest={k: v["bytes"] for k, v in m["manifest"].items()})
    edit_meta(step_dir(run, 8), to_v2)
    assert_intact(run, 8)


def test_resume_path_not_found(run):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        trainer.train(cfg(run, f"checkpoint.resume={run / 'nowhere'}"))
    assert_intact(run, 4, 8)


@pytest.mark.parametrize("override,diff", [("model.n_layers=3", "model.n_layers: checkpoint 2 vs run 3"),
                                           ("model.dim=64", "model.dim: checkpoint 32 vs run 64")])
def test_checkpoint_of_a_different_model(run, override, diff):
    with pytest.raises(CheckpointError, match=diff):
        trainer.train(cfg(run, "train.steps=10", override))
    assert_intact(run, 4, 8)


def test_cli_train_exits_non_zero_on_a_corrupt_checkpoint(run, capsys):
    flip_byte(next(step_dir(run, 8).glob("*.distcp")))
    assert cli.main(["train", "tiny.yaml", *BASE, f"run_dir={run}", "train.steps=10"]) == 1
    assert "blake2b checksum" in capsys.readouterr().err
    assert_intact(run, 4)


@pytest.mark.slow
def test_dp2_checkpoint_checksums_every_rank_file(tmp_path, cache):
    """Each rank checksums its own shards; the gathered manifest covers them all, and a flipped byte in rank 1's
    shard is caught on load, standalone and by a two-rank resume, with the file named."""
    run_cmd(torchrun_cmd(2, tmp_path, "train.steps=4", "checkpoint.every=0"), cache, timeout=300)
    ckpt = step_dir(tmp_path, 4)
    manifest = json.loads((ckpt / "meta.json").read_text())["manifest"]
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt", ".metadata"} <= manifest.keys()
    assert all(file_digest(ckpt / name) == entry["blake2b"] for name, entry in manifest.items())
    assert_intact(tmp_path, 4)
    flip_byte(ckpt / "__1_0.distcp")
    with pytest.raises(CheckpointError, match="__1_0.distcp does not match its blake2b checksum"):
        verify(ckpt)
    # On resume the ranks split the checksumming; every rank stops, the one that found it names the file.
    proc = run_cmd(torchrun_cmd(2, tmp_path, "train.steps=6", "checkpoint.every=0"), cache, timeout=300, check=False)
    assert proc.returncode != 0
    assert "__1_0.distcp does not match its blake2b checksum" in proc.stderr
    assert "verification failed on rank" in proc.stderr


@pytest.mark.slow
def test_disk_full_on_one_rank_stops_every_rank_at_once(tmp_path, cache):
    """Rank 1 alone hits ENOSPC in checkpoint step 4: both ranks stop with the error right away (no rank waits
    in a barrier until the collective timeout), the partial write is removed, step 2 stays loadable."""
    full = {**env(cache), "EXATRAIN_TEST_FULL_RANK": "1", "EXATRAIN_TEST_FULL_STEP": "4",
            "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = torchrun_cmd(2, tmp_path, "train.steps=6", "checkpoint.every=2", "plugins=[full_disk_plugin]",
                       "parallel.timeout_s=600")
    proc = subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "disk full (ENOSPC) writing checkpoint step 4" in proc.stderr
    assert "failed on rank 1" in proc.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    assert_intact(tmp_path, 2)


# ---------------------------------------------------------------- 4. atomic re-save and honest resume

KILL_IN_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from exatrain.config import load_config
    from exatrain.train import checkpoint
    from exatrain.train.trainer import Trainer
    sys.path.insert(0, "tests")
    from helpers import TINY
    run_dir, when = sys.argv[1], sys.argv[2]
    real_sync = checkpoint._sync_dir
    def sync(path):
        real_sync(path)
        aside = Path(run_dir) / "checkpoints" / "step_00000008.old"
        final = aside.with_name("step_00000008")
        if aside.exists() and (final.exists() == (when == "after_swap")):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._sync_dir = sync
    t = Trainer(load_config("tiny.yaml", [*TINY, "train.steps=8", "checkpoint.keep=5", f"run_dir={run_dir}"]))
    t.save_checkpoint()  # re-saves step 8, which exists
""")


@pytest.mark.parametrize("when", ["after_aside", "after_swap"])
def test_kill_during_resave_swap_keeps_the_step(run, cache, when):
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SWAP, str(run), when], cwd=REPO, env=env(cache),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000008.old").is_dir()
    assert (ckpts / "step_00000008").is_dir() == (when == "after_swap")
    assert Checkpointer(run, cfg(run)).resume_path() == step_dir(run, 8)
    assert not (ckpts / "step_00000008.old").exists()
    assert_intact(run, 4, 8)
    result = trainer.train(cfg(run, "train.steps=10"))
    assert result.status == "completed" and result.step == 10
    assert max(losses(run)) == 10


def test_resave_swaps_atomically_and_leaves_nothing_aside(run):
    t = trainer.Trainer(cfg(run))
    try:
        before = json.loads((step_dir(run, 8) / "meta.json").read_text())
        t.save_checkpoint()
    finally:
        t.close()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    after = json.loads((step_dir(run, 8) / "meta.json").read_text())["manifest"]
    assert after["__0_0.distcp"] == before["manifest"]["__0_0.distcp"]  # the same state (.metadata names a uuid)
    assert_intact(run, 4, 8)


@pytest.mark.parametrize("leftover", ["metrics", "tmp"])
def test_progress_without_a_checkpoint_refuses_to_restart(run, leftover):
    ckpts = run / "checkpoints"
    if leftover == "tmp":
        (run / "metrics.jsonl").unlink()
        step_dir(run, 8).rename(ckpts / "step_00000008.tmp")
        step_dir(run, 4).rename(run / "kept_4")
        what = r"checkpoints/step_00000008.tmp"
    else:
        for p in list_checkpoints(ckpts):
            p.rename(run / f"kept_{p.name}")
        what = "metrics.jsonl"
    with pytest.raises(CheckpointError, match=rf"has progress \({what}\) but no loadable checkpoint.*"
                                              "checkpoint.resume=never to start over"):
        trainer.train(cfg(run))


def test_resume_never_moves_existing_checkpoints_aside(run):
    result = trainer.train(cfg(run, "checkpoint.resume=never", "train.steps=2", "checkpoint.every=0"))
    assert result.status == "completed"
    aside = next(run.glob("checkpoints.replaced-*"))
    assert [p.name for p in list_checkpoints(aside)] == ["step_00000004", "step_00000008"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    for step in (4, 8):
        verify(aside / f"step_{step:08d}")
    assert Checkpointer(run, cfg(run)).resume_path() == step_dir(run, 2)


# ---------------------------------------------------------------- 7. disk full during a save


def test_disk_full_during_save_keeps_the_previous_checkpoint(run, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if "step_00000012.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device", os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"disk full \(ENOSPC\) writing checkpoint step 12: .*step_00000012.tmp"
                                              r".*previous checkpoint \(.*step_00000008\) is intact"):
        trainer.train(cfg(run, "train.steps=12"))
    monkeypatch.undo()
    assert not (run / "checkpoints" / "step_00000012.tmp").exists()
    assert_intact(run, 4, 8)


# ---------------------------------------------------------------- 2. non-finite runs and loss spikes


@pytest.mark.parametrize("value", ["1e400", "inf", "-inf", "nan", "100", "0", "-1"])
def test_absurd_learning_rate_is_rejected_up_front(tmp_path, value):
    with pytest.raises(ConfigError, match=r"optim.lr: must be a finite number in \(0, 10\]"):
        cfg(tmp_path, f"optim.lr={value}")


@pytest.mark.parametrize("override,key", [("optim.eps=nan", "optim.eps"), ("optim.grad_clip=inf", "optim.grad_clip"),
                                          ("optim.weight_decay=nan", "optim.weight_decay")])
def test_non_finite_optimizer_settings_are_rejected(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"{key}: must be finite"):
        cfg(tmp_path, override)


def test_absurd_power_schedule_cap_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"schedule.power_lr_max: must be a finite number in \(0, 10\]"):
        cfg(tmp_path, "schedule.name=power", "schedule.power_lr_max=inf")


class PoisonWeights(Callback):
    """Fills the output weight with NaN after step `step` (what an LR of inf does, or corrupt shard bytes)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, t, stats, record):
        if t.state.step == self.step:
            with torch.no_grad():
                t.engine.model_parts[0].output.weight.fill_(float("nan"))


def test_skip_policy_notices_non_finite_weights(run):
    with pytest.raises(FloatingPointError, match="the weights themselves are non-finite"):
        trainer.train(cfg(run, "train.steps=16"), callbacks=[PoisonWeights(9)])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004", "step_00000008"]
    assert_intact(run, 4, 8)


def test_non_finite_weights_are_never_checkpointed(run):
    """With keep=1, saving non-finite weights and rotating would leave no finite checkpoint at all."""
    with pytest.raises(FloatingPointError, match="weights are non-finite; not writing a checkpoint.*step_00000008"):
        trainer.train(cfg(run, "train.steps=16", "checkpoint.keep=1"), callbacks=[PoisonWeights(12)])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004", "step_00000008"]
    assert_intact(run, 4, 8)


class PoisonGradients(Callback):
    """Makes the output-layer gradient infinite from step `start` on."""

    def __init__(self, start: int):
        self.start, self.hook = start, None

    def on_step_start(self, t):
        if t.state.step + 1 >= self.start and self.hook is None:
            self.hook = t.engine.model_parts[0].output.weight.register_hook(lambda g: g * float("nan"))


CALLBACKS.register("test_adversarial_poison_last", lambda job: PoisonGradients(job.train.steps))


def test_run_ending_non_finite_exits_non_zero(run, capsys):
    code = cli.main(["train", "tiny.yaml", *BASE, f"run_dir={run}", "train.steps=10",
                     "train.callbacks=[test_adversarial_poison_last]"])
    assert code == 1
    assert "ended with a non-finite loss or gradients at step 10" in capsys.readouterr().err
    assert_intact(run, 4, 8, 10)


class SpikeAt(Callback):
    """Scales the output weight by 30 for step `step` (a loss spike); `restore` undoes it after the step."""

    def __init__(self, step: int, restore: bool):
        self.step, self.restore, self.saved = step, restore, None

    def on_step_start(self, t):
        if t.state.step + 1 == self.step and self.saved is None:
            w = t.engine.model_parts[0].output.weight
            self.saved = w.detach().clone()
            with torch.no_grad():
                w.mul_(30)

    def on_step_end(self, t, stats, record):
        if t.state.step == self.step and self.restore:
            with torch.no_grad():
                t.engine.model_parts[0].output.weight.copy_(self.saved)


SPIKE = ["train.spike_warmup=2", "train.spike_threshold=1.5"]


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and r.get("kind", "train") == "train"]


def test_spike_skip_drops_the_update(tmp_path):
    run = tmp_path / "spiky"
    result = trainer.train(cfg(run, "train.steps=12", "train.spike_policy=skip", *SPIKE),
                           callbacks=[SpikeAt(10, restore=True)])
    assert result.status == "completed"
    spikes = [(r["step"], r.get("skipped")) for r in train_records(run) if r.get("spike")]
    assert spikes == [(10, 1)]
    assert_intact(run, 4, 8, 12)


def test_spike_rollback_reloads_the_last_checkpoint_with_data_advanced(tmp_path):
    run = tmp_path / "spiky"
    result = trainer.train(cfg(run, "train.steps=12", "train.spike_policy=rollback", *SPIKE),
                           callbacks=[SpikeAt(10, restore=False)])
    assert result.status == "completed" and result.step == 12
    records = [r for r in train_records(run) if r["step"] > 8]
    assert [r["step"] for r in records] == [9, 10, 9, 10, 11, 12]
    assert records[1].get("spike") == 1
    assert records[2]["loss"] != records[0]["loss"]  # the replayed step 9 trains on later batches
    assert_intact(run, 4, 8, 12)


def test_spike_guard_enabled_on_resume_starts_fresh(run):
    """A checkpoint written without the spike guard resumes with it on: the guard has no state there yet."""
    result = trainer.train(cfg(run, "train.steps=10", "train.spike_policy=skip", *SPIKE))
    assert (result.status, result.step) == ("completed", 10)
    assert_intact(run, 4, 8, 10)


def test_spike_rollback_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="loss spike .* no checkpoint to roll back to yet"):
        trainer.train(cfg(tmp_path / "fresh", "train.spike_policy=rollback", *SPIKE),
                      callbacks=[SpikeAt(3, restore=False)])


# ---------------------------------------------------------------- existing clear-error classes: config and data


@pytest.mark.parametrize("override,message", [
    ("train.spike_policy=sometimes", "train.spike_policy: got 'sometimes', expected one of none, skip, rollback"),
    ("train.spike_threshold=0.5", "train.spike_threshold: must be a finite multiple"),
    ("train.spike_window=0", "train.spike_window: must be >= 1"),
    ("train.nan_policy=ignore", "train.nan_policy: got 'ignore'"),
    ("train.global_batch=5", "train.global_batch: 5 is not a multiple of train.micro_batch=2"),
    ("data.seq_len=128", "data.seq_len: 128 exceeds model.max_seq_len=64"),
    ("checkpoint.keep=0", "checkpoint.keep: keep must be >= 1"),
    ("train.steps=0", "train.steps: must be positive"),
    ("no_such.key=1", "no_such"),
    ("train.steps=many", "train.steps"),
])
def test_bad_config_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg(tmp_path, override)


def test_spike_rules_that_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="train.spike_policy: rollback reloads the newest checkpoint"):
        cfg(tmp_path, "train.spike_policy=rollback", "checkpoint.every=0")
    with pytest.raises(ConfigError, match="train.spike_policy: skip drops an update .* parallel.engine=native"):
        cfg(tmp_path, "train.spike_policy=skip", "parallel.engine=deepspeed")


def test_tp_not_dividing_heads(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.tp=2 must divide the KV heads \(model.n_kv_heads=1\)"):
        ParallelDims.from_config(cfg(tmp_path, "parallel.tp=2"), 2)


def test_missing_config_file(tmp_path):
    with pytest.raises((ConfigError, FileNotFoundError), match="no_such_config.yaml"):
        load_config(str(tmp_path / "no_such_config.yaml"))


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found: .*absent.jsonl"):
        trainer.train(cfg(tmp_path / "r", f"data.paths=[{tmp_path / 'absent.jsonl'}]"))


def test_malformed_data_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable documents"):
        trainer.train(cfg(tmp_path / "r", f"data.paths=[{bad}]"))
