"""The synthetic fact corpus: deterministic, Zipf-distributed, counts that match the documents,
readable by exatrain's data loader; question prompts are training prefixes; answer accuracy of a
model is the same batched as one question at a time."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from exatrain.config import ModelConfig
from exatrain.data.documents import load_documents
from exatrain.data.facts import (
    FactConfig,
    build_world,
    load_questions,
    statement,
    write_corpus,
)
from exatrain.data.prompts import read_prompts
from exatrain.data.tokenizer import byte_tokenizer
from exatrain.eval.hallucination import accuracy_by_bucket, answer_accuracy
from exatrain.model.generate import generate
from exatrain.model.llama import build_model, materialize

SMALL = FactConfig(entities=60, unseen=5, relations=3, values_per_relation=8, documents=600, tracking=6,
                   frequent_min=15, rare_max=2, seed=3)


def test_world_is_deterministic_and_zipf_distributed():
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.documents == b.documents and a.facts == b.facts
    assert build_world(FactConfig(**{**SMALL.__dict__, "seed": 4})).documents != a.documents
    per_entity = Counter()
    for (entity, _), n in a.mentions.items():
        per_entity[entity] += n
    ranks = a.entities[:SMALL.entities]
    head, tail = sum(per_entity[e] for e in ranks[:6]), sum(per_entity[e] for e in ranks[-6:])
    assert head > 10 * tail  # 1/r: the top 6 ranks carry far more than the last 6
    assert all(per_entity[e] == 0 for e in a.entities[SMALL.entities:])  # unseen entities
    assert len(set(a.entities)) == len(a.entities) == 65
    values = {v for (_, r), v in a.facts.items()}
    assert not values & set(a.entities)  # values and entity names never collide


def test_mentions_match_the_documents_and_questions_are_training_prefixes():
    world = build_world(SMALL)
    counted = Counter()
    text = "\n".join(world.documents)
    for (entity, relation), value in world.facts.items():
        counted[entity, relation] = text.count(statement(relation, entity, value))
    assert +counted == +world.mentions  # unary +: drop zero counts
    questions = world.questions()
    assert len(questions) == 65 * 3 and sum(q.split == "tracking" for q in questions) == 6
    for q in questions:
        assert (f"{q.prompt} {q.answer}." in text) == (q.mentions > 0)
        assert q.bucket == ("unseen" if q.mentions == 0 else "rare" if q.mentions <= 2
                            else "frequent" if q.mentions >= 15 else "medium")
    assert {q.bucket for q in questions} == {"frequent", "medium", "rare", "unseen"}


def test_written_corpus_loads_with_exatrain_reader(tmp_path):
    paths = write_corpus(tmp_path, SMALL)
    docs, stats = load_documents([str(paths["facts"])])
    assert len(docs) == 600 and not stats.bad
    assert docs[0].meta["url"].startswith("https://facts.example/wiki/")
    assert docs[0].meta["url"].endswith(docs[0].text.split(" of ", 1)[1].split(" is ", 1)[0])
    assert load_questions(paths["questions"]) == build_world(SMALL).questions()
    assert len(load_questions(paths["questions"], split="tracking")) == 6
    assert read_prompts(paths["tracking"]) == [q.prompt for q in load_questions(paths["questions"], split="tracking")]
    summary = json.loads(paths["world"].read_text())
    assert summary["documents"] == 600 and sum(summary["questions"].values()) == 195


def test_answer_accuracy_batched_equals_one_by_one():
    tok = byte_tokenizer()
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=64,
                      init_std=0.3)
    model = materialize(build_model(cfg), "cpu", seed=0)
    questions = build_world(SMALL).questions()[:24]
    batched = answer_accuracy(model, tok, questions, batch_size=5)
    for q, got in zip(questions, batched):
        prompt = torch.tensor([[tok.bos_id, *tok.encode(q.prompt)]])
        answer = tok.encode(" " + q.answer)
        assert got == (generate(model, prompt, len(answer))[0, prompt.shape[1]:].tolist() == answer)
    stats = accuracy_by_bucket(questions[:4], [True, False, True, True])
    assert stats["all"] == {"n": 4, "accuracy": 0.75}
    assert sum(v["n"] for k, v in stats.items() if k != "all") == 4


def test_config_validation():
    with pytest.raises(ValueError):
        build_world(FactConfig(relations=9))
    with pytest.raises(ValueError):
        build_world(FactConfig(values_per_relation=1))
