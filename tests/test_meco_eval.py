"""Metadata-conditioned perplexity (exatrain.eval.perplexity) on a tiny MeCo model trained here."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from exatrain.cli import main
from exatrain.config import load_config
from exatrain.data import build_data
from exatrain.eval.perplexity import evaluate_perplexity, load_run
from exatrain.train.checkpoint import CheckpointError, list_checkpoints
from exatrain.train import trainer
from helpers import TINY

FAKE = "wikipedia.org"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A MeCo run (metadata on, then the cooldown), its result and the cache it used."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXATRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "meco-cache"))  # shared by the MeCo tests
        run_dir = tmp_path_factory.mktemp("meco-run")
        cfg = load_config("tiny.yaml", [*TINY, f"run_dir={run_dir}", "checkpoint.every=0", "optim.lr=1e-2",
                                        "data.meco.enabled=true", "data.meco.cooldown_fraction=0.25"])
        result = trainer.train(cfg)
        assert result.status == "completed"
        yield run_dir, result


def test_loaded_model_reproduces_the_trainers_validation_loss(trained):
    run_dir, result = trained
    run = load_run(run_dir)
    assert run.step == 12 and not run.model.training
    data = build_data(run.cfg, 0, 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data.val.iter_batches(run.cfg.train.eval_batches, run.cfg.train.global_batch):
            logits = run.model(b.tokens, b.positions, b.doc_ids)
            total += F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), reduction="sum").item()
            count += int((b.labels != -100).sum())
    assert total / count == pytest.approx(result.val_loss, rel=1e-5)


def test_plain_condition_is_the_text_after_bos(trained):
    run_dir, _ = trained
    out = evaluate_perplexity(run_dir, ["none"], max_docs=2)
    run = load_run(run_dir)
    data = build_data(run.cfg, 0, 1)
    store, seq = data.val.store, run.cfg.data.seq_len
    for d in out["documents"]:
        text = torch.from_numpy(store.tokens[store.offsets[d["doc"]]:store.offsets[d["doc"] + 1]].astype("int64"))
        assert d["tokens"] == min(len(text), seq)
        ids = torch.cat([torch.tensor([data.tokenizer.bos_id]), text[:seq]])
        with torch.no_grad():
            nll = F.cross_entropy(run.model(ids[None, :-1])[0], ids[1:]).item()
        assert d["ppl"]["none"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-5)


def test_conditions_score_the_same_text_tokens(trained):
    run_dir, _ = trained
    out = evaluate_perplexity(run_dir, ["none", "real", FAKE], max_docs=5)
    s = out["summary"]
    assert list(s) == ["none", "real", FAKE] and out["meco_enabled"]
    assert {r["documents"] for r in s.values()} == {5} and len({r["tokens"] for r in s.values()}) == 1
    assert len({r["loss"] for r in s.values()}) == 3, "the metadata prefix must change the prediction"
    assert all(d["domain"] and set(d["ppl"]) == set(s) for d in out["documents"])
    same = evaluate_perplexity(run_dir, ["https://wikipedia.org/wiki/Python"], max_docs=5)  # MeCo's value: the FAKE
    assert next(iter(same["summary"].values()))["loss"] == pytest.approx(s[FAKE]["loss"], rel=1e-6)


def test_cli_prints_a_table(trained, capsys):
    run_dir, _ = trained
    assert main(["eval", str(run_dir), "--metadata", "none", "--metadata", "real", "--metadata", FAKE,
                 "--max-docs", "3"]) == 0
    table = capsys.readouterr().out
    assert "| metadata |" in table and f"| {FAKE} |" in table and "| real |" in table and "step 12" in table


def test_missing_and_corrupt_checkpoints_are_clear_errors(trained, tmp_path, capsys):
    run_dir, _ = trained
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_run(tmp_path)
    assert main(["eval", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shard = next(list_checkpoints(copy / "checkpoints")[-1].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(copy)
