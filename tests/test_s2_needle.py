"""Needle-in-a-haystack evaluation: document and prompt construction, and exact-match scoring."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from exatrain.config import ModelConfig, S2Config
from exatrain.data.tokenizer import byte_tokenizer
from exatrain.eval import needle
from exatrain.model.llama import build_model, materialize


def test_passkey_document_places_the_needle_at_depth():
    hay = " ".join(f"w{i}" for i in range(100))
    for depth in (0.0, 0.5, 1.0):
        doc = needle.passkey_document(hay, depth, "12345")
        assert doc.endswith(needle.QUESTION + "12345.")
        pos = doc.index("The pass key is #12345.")
        assert abs(pos / len(hay) - depth) < 0.05
        assert "  " not in doc


def test_write_corpus(tmp_path):
    path = needle.write_corpus(tmp_path / "p.jsonl", n_docs=20, min_chars=300, max_chars=600, seed=3)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(docs) == 20
    for doc in docs:
        key = doc.rsplit("#", 1)[1].rstrip(".")
        assert len(key) == 5 and doc.count("#" + key) == 2 and doc.count("#") == 2, doc
    assert path.read_text() == needle.write_corpus(tmp_path / "q.jsonl", 20, 300, 600, seed=3).read_text()


def test_prompts_have_exact_length_and_answer():
    tok = byte_tokenizer()
    hay = tok.encode(needle.haystack_text()[:20000])
    rng = random.Random(0)
    keys = needle.same_length_keys(tok, rng, 4, 5)
    prompts, answers = needle.passkey_prompts(tok, hay, 300, 0.25, keys, rng)
    assert prompts.shape == (4, 300) and answers.shape == (4, len(tok.encode("12345")))
    for p, a, key in zip(prompts, answers, keys):
        text = tok.decode(p.tolist()[1:])
        assert text.endswith(needle.QUESTION) and tok.decode(a.tolist()) == key
        assert 0.15 < text.index(f"The pass key is #{key}.") / len(text) < 0.3
    with pytest.raises(ValueError, match="too short"):
        needle.passkey_prompts(tok, hay, 20, 0.5, keys, rng)


def test_evaluate_needle_scores_exact_matches(monkeypatch):
    tok = byte_tokenizer()
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=160, attention="s2",
                      s2=S2Config(block_size=16, local_blocks=2, vert_stride=4))
    model = materialize(build_model(cfg), "cpu", seed=0).eval()
    hay = tok.encode(needle.haystack_text()[:20000])
    res = needle.evaluate_needle(model, tok, hay, [120, 160], [0.0, 1.0], trials=2)
    assert [(c["length"], c["depth"]) for c in res["cells"]] == [(120, 0.0), (120, 1.0), (160, 0.0), (160, 1.0)]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in res["cells"])

    def oracle(model, prompts, n):  # answers the key found in the prompt: every cell must score 1
        text = [tok.decode(p.tolist()) for p in prompts]
        keys = [t.split("The pass key is #", 1)[1][:5] for t in text]
        return torch.cat([prompts, torch.tensor([tok.encode(k) for k in keys])], 1)

    monkeypatch.setattr(needle, "generate", oracle)
    res = needle.evaluate_needle(model, tok, hay, [130], [0.5], trials=3)
    assert res["mean"] == 1.0
    assert "| 130 | 0.50 | 1.00 |" in needle.format_grid({"oracle": res})


def test_perplexity_by_kind_splits_passkey_documents_from_text():
    tok = byte_tokenizer()
    texts = [needle.passkey_document("The sky is blue.", 0.5, "12345"), "Plain text.", "More text here."]
    ids = [tok.encode(t) for t in texts]
    store = SimpleNamespace(tokens=np.concatenate([np.array(i) for i in ids]),
                            offsets=np.cumsum([0] + [len(i) for i in ids]))
    docs = [{"doc": i, "tokens": len(d), "ppl": {"none": math.exp(loss)}}
            for i, (d, loss) in enumerate(zip(ids, (1.0, 2.0, 3.0)))]
    res = needle.perplexity_by_kind(docs, store, tok)
    assert res["passkey"]["documents"] == 1 and res["passkey"]["loss"] == pytest.approx(1.0)
    n1, n2 = len(ids[1]), len(ids[2])
    assert res["text"]["documents"] == 2 and res["text"]["loss"] == pytest.approx((2 * n1 + 3 * n2) / (n1 + n2))
    table = needle.format_perplexity({"a": {"all": res["text"], **res}})
    assert table.splitlines()[0] == "| run | all loss (ppl) | passkey loss (ppl) | text loss (ppl) |"
