"""A method plugged in from outside the package (tests/toy_plugin.py) through `plugins`, a model converter
and a callback: each runs at its documented point, and their state survives a SIGKILL and resume bitwise."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from exatrain.config import load_config
from exatrain.train.checkpoint import list_checkpoints
from helpers import REPO, env, kill_after_checkpoint, run, train_cmd

TESTS = Path(__file__).resolve().parent
PLUGIN = ["plugins=[toy_plugin]", "model.converters=[toy_shift]", "train.callbacks=[toy]", "train.eval_every=6"]


def plugin_env(cache: Path) -> dict[str, str]:
    e = env(cache)
    e["PYTHONPATH"] = f"{REPO}:{TESTS}"
    return e


def train_records(run_dir: Path) -> dict[int, dict]:
    """The latest training record per step (a resumed run's supersedes a killed one's)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = {k: rec[k] for k in ("loss", "grad_norm", "toy_loss_sum", "toy_steps")}
    return out


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "toy_events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("toy_ref")
    proc = subprocess.run(train_cmd(run_dir, *PLUGIN), cwd=REPO, env=plugin_env(cache), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dir


def test_plugin_names_are_validated_against_the_registries():
    with pytest.raises(ValueError, match="model.converters: unknown 'nope'"):
        load_config("tiny.yaml", ["model.converters=[nope]"])
    with pytest.raises(ValueError, match="plugins: cannot import 'no_such_module'"):
        load_config("tiny.yaml", ["plugins=[no_such_module]"])


def test_converter_and_callback_run_at_their_points(reference):
    ev = events(reference)
    build, start = ev[0], ev[1]
    assert build == {"hook": "on_build", "step": None, "device": "meta", "converted": False}
    assert start["hook"] == "on_train_start" and start["converted_on"] == "meta" and start["shifted"] == "ShiftedNorm"
    steps = [e for e in ev if e["hook"] in ("on_step_start", "on_step_end")]
    assert [(e["hook"], e["step"]) for e in steps] == [(h, s + (h == "on_step_end")) for s in range(12)
                                                       for h in ("on_step_start", "on_step_end")]
    assert [e["step"] for e in ev if e["hook"] == "on_eval"] == [6, 12]
    assert [e["path"] for e in ev if e["hook"] == "on_checkpoint"] == [f"step_{s:08d}" for s in (4, 8, 12)]
    assert ev[-1] == {"hook": "on_train_end", "step": 12, "status": "completed"}
    latest = list_checkpoints(reference / "checkpoints")[-1]
    keys = dcp.FileSystemReader(str(latest)).read_metadata().state_dict_metadata
    assert "engine.model.norm.shift" in keys and "callbacks.toy.loss_sum" in keys
    assert train_records(reference)[12]["toy_steps"] == 12


def test_plugin_state_survives_sigkill_and_resume_bitwise(tmp_path, cache, reference):
    kill_after_checkpoint(train_cmd(tmp_path, *PLUGIN, "checkpoint.keep=5"), tmp_path, 8, plugin_env(cache))
    run(train_cmd(tmp_path, *PLUGIN, "checkpoint.keep=5"), cache, timeout=300, env_override=plugin_env(cache))
    assert train_records(tmp_path) == train_records(reference)
    resumed = [e for e in events(tmp_path) if e["hook"] == "on_train_start"][-1]
    assert resumed["step"] >= 8
    assert resumed["loss_sum"] == train_records(reference)[resumed["step"]]["toy_loss_sum"]
