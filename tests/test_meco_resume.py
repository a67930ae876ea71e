"""MeCo's cooldown switch through the trainer, across a preemption (DESIGN.md §5).

The switch is part of the loader state, so a run stopped while metadata is on and resumed
must turn it off at the same token count and see the same batches as an uninterrupted run.
The batches are observed, not the flag: a document starts with metadata exactly when the
label of its `<bos>` is masked (the next token is a prefix token, never a training target).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import torch.distributed.checkpoint as dcp

from exatrain.config import load_config
from exatrain.data.tokenizer import SPECIAL_TOKENS
from exatrain.train import trainer
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import list_checkpoints
from helpers import TINY, losses

BOS = SPECIAL_TOKENS.index("<bos>")
STEPS, COOLDOWN = 12, 0.5
# 8 rows of 64 tokens a step, so that documents start on both sides of the switch.
MECO = [f"train.steps={STEPS}", "train.global_batch=8", "data.meco.enabled=true",
        f"data.meco.cooldown_fraction={COOLDOWN}", "checkpoint.every=0"]
# Metadata is on for steps whose starting token count is below (1 - cooldown) of the budget.
LAST_METADATA_STEP = math.ceil((1 - COOLDOWN) * STEPS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXATRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "meco-cache"))  # shared by the MeCo tests
        yield


class RecordBatches(Callback):
    """Appends each training step's (tokens, labels); optionally requests a stop after step `stop_after`."""

    def __init__(self, batches: list, stop_after: int | None):
        self.batches, self.stop_after = batches, stop_after

    def on_step_end(self, t, stats, record):
        micro = t.micro_batches
        self.batches.append((torch.cat([b.tokens for b in micro]), torch.cat([b.labels for b in micro])))
        if t.state.step == self.stop_after:
            t.request_stop("test preemption")


def train_recording(run_dir, batches: list, stop_after: int | None = None) -> trainer.TrainResult:
    return trainer.train(load_config("tiny.yaml", [*TINY, *MECO, f"run_dir={run_dir}"]),
                         callbacks=[RecordBatches(batches, stop_after)])


def meco_state(checkpoint) -> dict:
    """The MeCo callback's and the loader's checkpointed state."""
    state = {"callbacks.meco": {"switched_at_step": 0}, "data": {"metadata": False}}
    with warnings.catch_warnings():  # DCP notes that it loads without a process group, which is the point
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


def document_starts(batches: list) -> list[tuple[int, bool]]:
    """(step, has metadata) for every document that starts in the recorded steps."""
    starts = []
    for step, (tokens, labels) in enumerate(batches, 1):
        for r, c in (tokens == BOS).nonzero().tolist():
            starts.append((step, bool(labels[r, c] == -100)))
    return starts


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    run_dir, batches = tmp_path_factory.mktemp("meco-ref"), []
    result = train_recording(run_dir, batches)
    assert result.status == "completed" and len(batches) == STEPS
    return run_dir, batches


def test_switch_happens_at_the_cooldown_token_count(reference):
    run_dir, batches = reference
    starts = document_starts(batches)
    assert all(meta == (step <= LAST_METADATA_STEP) for step, meta in starts), starts
    assert {meta for _, meta in starts} == {True, False}, "the run must start documents on both sides of the switch"
    state = meco_state(list_checkpoints(run_dir / "checkpoints")[-1])
    assert state["data"]["metadata"] is False
    assert state["callbacks.meco"]["switched_at_step"] == LAST_METADATA_STEP + 1


@pytest.mark.parametrize("stop_after", [3, LAST_METADATA_STEP])
def test_resume_before_the_switch_equals_uninterrupted(tmp_path, reference, stop_after):
    ref_dir, ref_batches = reference
    batches: list = []
    first = train_recording(tmp_path, batches, stop_after)
    assert first.status == "preempted" and first.step == stop_after
    checkpoint = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == stop_after
    assert meco_state(checkpoint) == {"callbacks.meco": {"switched_at_step": -1}, "data": {"metadata": True}}
    second = train_recording(tmp_path, batches)
    assert second.status == "completed" and len(batches) == STEPS
    for (tokens, labels), (ref_tokens, ref_labels) in zip(batches, ref_batches):
        assert torch.equal(tokens, ref_tokens) and torch.equal(labels, ref_labels)
    assert losses(tmp_path) == losses(ref_dir)
