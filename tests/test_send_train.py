"""SeND and EigenScore through the trainer (DESIGN.md §6).

- every layout (dp2 with FSDP2, tp2 with sequence parallelism, pp2 with 1F1B / interleaved / ZBV, 3D
  pp2·dp2·tp2, activation checkpointing) trains like one process with SeND on: same losses to 1e-5
  relative, the same units selected at every update, the same callback state on every rank, and each
  rank holding the layer masks exactly the selected units (tests/send_worker.py, one torchrun launch
  per world size);
- the callback's snapshots are the units `tracking_states` reads from the model, before the mask;
- kill/resume (SIGKILL) and stop/resume with SeND on are bitwise identical to an uninterrupted run,
  for the mask and for the authors' weight-zeroing variant, in one process and under pp2; EigenScore logging at checkpoints does not
  perturb training; `exatrain eval --eigenscore` reports every method.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import REPO, TINY, StopAfter, env, run, torchrun_worker, train_cmd

from exatrain import cli
from exatrain.config import load_config
from exatrain.data.prompts import encode_prompts, read_prompts
from exatrain.train import trainer
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import list_checkpoints
from exatrain.train.send import tracking_states

WORKER = Path(__file__).resolve().parent / "send_worker.py"
sys.path.insert(0, str(WORKER.parent))
from send_worker import Probe

PROMPTS = ["The license grants you the right to", "import os and then", "Debian packages are built from",
           "This manual page documents the", "The Python standard library provides", "Copyright (C) the authors of"]

# 4 layers so that the tracked block (-2 = 2) sits on the second pipeline stage; untied embeddings for pp.
BASE = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
    "model.tie_embeddings=false", "data.seq_len=32", "train.global_batch=8", "train.micro_batch=2", "train.steps=9",
    "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=0", "checkpoint.save_final=false",
    "schedule.warmup_steps=2", "metrics.tensorboard=false", "metrics.progress_bar=false", "metrics.log_every=1",
    "send.enabled=true", "send.interval=3", "send.fraction=0.25", "send.reset_at_end=false",
]
METHODS = {"residual": [], "mlp": ["send.site=mlp"], "mlp_zero": ["send.site=mlp", "send.variant=zero_weights"]}
PP, V2 = ["parallel.pp=2"], ["parallel.pp=2", "parallel.pp_virtual_stages=2"]
# name -> (method, layout overrides, ranks that hold the tracked block[, stopped after this step and resumed])
CASES_2 = {
    "dp2": ("residual", [], 2),
    "tp2_sp": ("residual", ["parallel.tp=2"], 2),
    "tp2_mlp": ("mlp", ["parallel.tp=2"], 2),
    "pp2_1f1b": ("residual", PP, 1),
    "pp2_interleaved": ("mlp", V2 + ["parallel.pp_schedule=Interleaved1F1B"], 1),
    "pp2_zbv": ("residual", V2 + ["parallel.pp_schedule=ZBVZeroBubble"], 1),
    "dp2_zero_weights_ac_full": ("mlp_zero", ["train.activation_checkpointing=full"], 2),
    "tp2_zero_weights": ("mlp_zero", ["parallel.tp=2", "parallel.sequence_parallel=false"], 2),
    "pp2_zero_weights_stop_resume": ("mlp_zero", PP, 1, 4),
}
CASES_8 = {
    "3d_pp2_dp2_tp2": ("residual", ["parallel.pp=2", "parallel.tp=2"], 4),
    "3d_zero_weights_ac_selective": ("mlp_zero", ["parallel.pp=2", "parallel.tp=2",
                                                  "train.activation_checkpointing=selective"], 4),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("send")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXATRAIN_CACHE", str(root / "cache"))
        yield root


def base(work: Path) -> list[str]:
    return [*BASE, f"send.prompts={work / 'prompts.txt'}"]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if r["kind"] == "train"}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def send_records(run_dir: Path) -> dict[int, dict]:
    """The send_* entries per step (a resumed run's later record for a step wins)."""
    out = {}
    for r in records(run_dir):
        if r["kind"] == "train":
            out[r["step"]] = {k: v for k, v in r.items() if k.startswith("send")}
    return out


@pytest.fixture(scope="module")
def references(work) -> dict[str, dict]:
    """One single-process run per method: losses and the units selected at each update."""
    out = {}
    for method, overrides in METHODS.items():
        probe = Probe()
        run_dir = work / f"ref_{method}"
        trainer.train(load_config("tiny.yaml", [*base(work), *overrides, f"run_dir={run_dir}"]), callbacks=[probe])
        out[method] = {"loss": train_losses(run_dir), "selections": probe.result["selections"]}
    return out


def launch(nproc: int, cases: dict, work: Path, timeout: int) -> dict:
    tmp = work / f"launch{nproc}"
    spec = {"base": base(work), "cases": [
        {"name": name, "overrides": METHODS[case[0]] + case[1], "stop_after": case[3] if len(case) > 3 else 0}
        for name, case in cases.items()]}
    out = torchrun_worker(WORKER, nproc, spec, tmp, timeout, {"EXATRAIN_TEST_RUNS": str(tmp)})
    return {name: {**rec, "run_dir": tmp / name} for name, rec in json.loads(out.read_text()).items()}


@pytest.fixture(scope="module")
def results_2(work):
    return launch(2, CASES_2, work, timeout=560)


@pytest.fixture(scope="module")
def results_8(work):
    return launch(8, CASES_8, work, timeout=560)


def check_layout(results: dict, cases: dict, references: dict, name: str) -> None:
    method, _, holders, *stop = cases[name]
    got, ref = results[name], references[method]
    assert "error" not in got, got.get("error")
    assert got["consistent"], f"{name}: ranks disagree on the SeND state"
    assert got["mask_ok"], f"{name}: a rank's mask does not zero exactly the selected units"
    assert got["holders"] == holders, f"{name}: {got['holders']} ranks hold the tracked block, expected {holders}"
    resumed = {step: units for step, units in ref["selections"].items() if int(step) > (stop[0] if stop else 0)}
    assert got["selections"] == resumed and len(ref["selections"]) == 3
    losses = train_losses(got["run_dir"])
    assert losses.keys() == ref["loss"].keys()
    for step, loss in losses.items():
        assert loss == pytest.approx(ref["loss"][step], rel=1e-5), f"{name}: step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_2))
def test_two_processes_select_like_one(results_2, references, name):
    check_layout(results_2, CASES_2, references, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_8))
def test_3d_selects_like_one_process(results_8, references, name):
    check_layout(results_8, CASES_8, references, name)


def test_masks_change_training_and_variants_differ(references):
    """Sanity of the references themselves: identical until the first update, different afterwards."""
    res, mlp, zero = (references[m]["loss"] for m in ("residual", "mlp", "mlp_zero"))
    assert [res[s] for s in (1, 2, 3)] == [mlp[s] for s in (1, 2, 3)] == [zero[s] for s in (1, 2, 3)]
    assert res[9] != mlp[9] != zero[9]
    assert references["mlp"]["selections"]["3"] == references["mlp_zero"]["selections"]["3"]


class CheckTracking(Callback):
    """Runs after the send callback. At each tracking step its newest snapshot must equal `tracking_states`
    of the model; where the weight-zeroing variant has just zeroed the selected units' weights, those
    units must now read exactly 0 and the others still equal the snapshot."""

    def __init__(self, texts: list[str]):
        self.texts, self.checked, self.zeroed = texts, 0, 0

    def on_step_end(self, t, stats, record):
        if "send_snapshots" not in record:
            return
        send, model = Probe.send(t), t.engine.model_parts[0]
        ids = encode_prompts(t.data.tokenizer, self.texts, t.cfg.data.seq_len)
        states = tracking_states(model, ids, t.cfg.send.layer, t.cfg.send.site, t.data.tokenizer.pad_id)
        keep = torch.ones(states.shape[1], dtype=torch.bool)
        w1 = model.layers[str(send.layer)].feed_forward.w1.weight
        if send.selected and bool((w1[send.selected] == 0).all()):
            assert (states[:, send.selected] == 0).all()
            keep[send.selected] = False
            self.zeroed += 1
        torch.testing.assert_close(send.window.snapshots[-1][:, keep], states[:, keep], rtol=1e-5, atol=1e-6)
        self.checked += 1


ZERO = [*TINY, "send.enabled=true", "send.site=mlp", "send.variant=zero_weights", "send.interval=6",
        "send.zero_repeats=2", "send.fraction=0.3", "eigenscore.every=4", "eigenscore.k=4",
        "eigenscore.max_new_tokens=3", "eigenscore.max_prompts=3"]


def test_zero_weights_stop_resume_is_exact_and_eigenscore_logging_changes_nothing(work, tmp_path):
    prompts = [f"send.prompts={work / 'prompts.txt'}"]
    check = CheckTracking(read_prompts(work / "prompts.txt"))
    full = trainer.train(load_config("tiny.yaml", [*ZERO, *prompts, f"run_dir={tmp_path / 'full'}"]), callbacks=[check])
    # tracking every interval/window = 2 steps; zeroed at the update (6) and once more (zero_repeats=2)
    assert full.status == "completed" and check.checked == 6 and check.zeroed == 2
    first = trainer.train(load_config("tiny.yaml", [*ZERO, *prompts, f"run_dir={tmp_path / 'cut'}"]),
                          callbacks=[StopAfter(7)])
    assert first.status == "preempted" and first.step == 7
    trainer.train(load_config("tiny.yaml", [*ZERO, *prompts, f"run_dir={tmp_path / 'cut'}"]))
    plain = tmp_path / "no_es"
    trainer.train(load_config("tiny.yaml", [*ZERO, *prompts, "eigenscore.every=0", f"run_dir={plain}"]))
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full") == train_losses(plain)
    assert send_records(tmp_path / "cut") == send_records(tmp_path / "full")
    assert sum("send_dropped" in r for r in send_records(plain).values()) == 2  # updates at 6 and 12
    es = {r["step"]: r for r in records(tmp_path / "full") if "es_exact" in r}
    assert sorted(es) == [4, 8, 12]
    assert all(isinstance(es[s][f"es_{m}"], float) for s in es for m in ("exact", "chebyshev", "slq"))
    # the final checkpoint's callback state: the selection and the pending re-zeroings, as logged
    state = {"callbacks.send": {"selected": [], "zero_left": 0, "count": 0}}
    with warnings.catch_warnings():  # DCP notes that it loads without a process group, which is the point
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]), no_dist=True)
    assert state["callbacks.send"]["count"] == 6 and len(state["callbacks.send"]["selected"]) == int(0.3 * 128)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["eval", str(tmp_path / "full"), "--eigenscore", "--k", "5", "--max-new-tokens", "3",
                       "--max-prompts", "2", "--json", str(tmp_path / "es.json")])
    assert rc == 0
    table = out.getvalue()
    assert "EigenScore of 2 prompts" in table and all(f"| {m} |" in table for m in ("exact", "chebyshev", "slq"))
    saved = json.loads((tmp_path / "es.json").read_text())
    assert saved["k"] == 5 and len(saved["per_prompt"]) == 2 and saved["step"] == 12


SEND_TINY = ["send.enabled=true", "send.interval=6", "send.fraction=0.25", "checkpoint.keep=5"]


@pytest.mark.slow
def test_resume_after_sigkill_with_send_is_bitwise_identical(work, tmp_path):
    cache = work / "cache"
    overrides = [*SEND_TINY, f"send.prompts={work / 'prompts.txt'}"]
    reference = tmp_path / "ref"
    run(train_cmd(reference, *overrides), cache)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *overrides), cwd=REPO, env=env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step_00000008"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.exists(), "the run never reached its step-8 checkpoint"
    assert max(train_losses(killed)) < 12
    run(train_cmd(killed, *overrides), cache)
    assert train_losses(killed) == train_losses(reference)
    assert send_records(killed) == send_records(reference)
    assert [s for s, r in send_records(reference).items() if "send_dropped" in r] == [6, 12]


@pytest.mark.slow
def test_compiled_blocks_track_and_mask_like_eager(work, tmp_path):
    """torch.compile'd blocks (MaskedFeedForward, the mask's recording) give the same losses and selections."""
    got = {}
    for compiled in (False, True):
        probe = Probe()
        run_dir = tmp_path / f"compile_{compiled}"
        cfg = load_config("tiny.yaml", [*TINY, "train.steps=6", "checkpoint.every=0", "checkpoint.save_final=false",
                                        "send.enabled=true", "send.site=mlp", "send.interval=3",
                                        f"send.prompts={work / 'prompts.txt'}", f"train.compile={compiled}",
                                        f"run_dir={run_dir}"])
        trainer.train(cfg, callbacks=[probe])
        got[compiled] = (train_losses(run_dir), probe.result["selections"])
    assert len(got[True][1]) == 2
    assert got[True][1] == got[False][1]
    assert got[True][0] == pytest.approx(got[False][0], rel=1e-5)
