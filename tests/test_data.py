"""Data pipeline: embedded corpus, tokenizer, bad-record accounting, packing, resume, DP invariance."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exatrain.config import ConfigError, JobConfig, TokenizerConfig, finalize_config
from exatrain.data import Batch, build_data, load_documents
from exatrain.data.dataset import IGNORE_INDEX, _wait_for_rank0
from exatrain.data.documents import EMBEDDED_CORPUS, files_digest
from exatrain.data.tokenizer import (SHIPPED_DIR, Tokenizer, build_tokenizer, byte_tokenizer, encode_texts, split_text,
                                     tokenizer_filename, train_bpe)

WORDS = "the of and packed sequence token model data shard rank epoch loss gradient attention".split()
SITES = ["www.example.org", "docs.example.com:8443", "blog.example.net"]


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": f"doc{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))),
             "url": f"https://{rng.choice(SITES)}/page/{i}?q=1"} for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_cfg(paths: list[Path], seq_len: int = 64, **data) -> JobConfig:
    cfg = JobConfig()
    cfg.data.paths = [str(p) for p in paths]
    cfg.data.seq_len = seq_len
    cfg.model.max_seq_len = seq_len
    cfg.data.tokenizer.kind = "byte"
    cfg.data.val_fraction = 0.1
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return finalize_config(cfg)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", synthetic_records(120))


FIELDS = ("tokens", "labels", "positions", "doc_ids")


def cat(batches: list[Batch]) -> Batch:
    """Rank slices stacked back into the global batch."""
    return Batch(*(torch.cat([getattr(b, name) for b in batches]) for name in FIELDS))


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------------- corpus and documents


def test_embedded_corpus_has_several_sources():
    docs, stats = load_documents([])
    assert stats.files == 1 and not stats.bad and len(docs) == stats.documents > 500
    sources = {d.meta["source"] for d in docs}
    hosts = {urlsplit(d.meta["url"]).hostname for d in docs}
    assert len(sources) >= 3 and len(hosts) >= 3, (sources, hosts)
    assert len({d.text for d in docs}) == len(docs), "documents are deduplicated"
    assert 1e6 < stats.chars < 6e6 and EMBEDDED_CORPUS.stat().st_size < 3e6
    assert max(len(d.text) for d in docs) <= 8000


def test_bad_records_are_counted_per_reason(tmp_path: Path):
    good = [json.dumps({"text": f"good document {i}", "url": "https://a.org"}).encode() for i in range(3)]
    bad = [
        b'{"text": "caf\xe9 latin-1"}',  # non-UTF-8 bytes
        b'{"text": "\\ud800 lone surrogate"}',  # valid JSON, not encodable
        b'{"text": "unterminated',
        b'["a list"]',
        b'{"url": "https://no-text.org"}',
        b'{"text": 42}',
        b'{"text": "   "}',
    ]
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(good[:1] + bad + good[1:]) + b"\n\n"))
    docs, stats = load_documents([str(path)])
    assert [d.text for d in docs] == [f"good document {i}" for i in range(3)]
    assert dict(stats.bad) == {"invalid_utf8": 2, "invalid_json": 1, "not_an_object": 1, "missing_text": 1,
                               "text_not_string": 1, "empty_text": 1}
    assert stats.first_bad["invalid_json"] == f"{path}:4"
    report = stats.report()
    assert "skipped 7 bad records" in report and "missing_text: 1" in report


def test_text_files_and_directories(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first document\n\nwith two paragraphs\n")
    (tmp_path / "d" / "b.txt.gz").write_bytes(gzip.compress("second document".encode()))
    (tmp_path / "d" / "notes.csv").write_text("ignored")
    docs, stats = load_documents([str(tmp_path / "d")])
    assert [d.text for d in docs] == ["first document\n\nwith two paragraphs\n", "second document"]
    assert stats.files == 2 and docs[0].meta == {}


def test_missing_and_all_bad_paths_raise(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_documents([str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": ""}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: no usable documents \(empty_text: 1, invalid_json: 1\)"):
        load_documents([str(bad)])
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="latin.txt.*invalid_utf8"):
        load_documents([str(latin)])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_data(make_cfg([tmp_path / "nope.jsonl"]), 0, 1, tmp_path / "cache")


# --------------------------------------------------------------------------- tokenizer


def test_shipped_tokenizer_matches_embedded_corpus():
    """A regenerated corpus needs a regenerated tokenizer (python -m exatrain.data.corpus --tokenizer)."""
    name = tokenizer_filename(TokenizerConfig(), files_digest([EMBEDDED_CORPUS]))
    assert (SHIPPED_DIR / name).is_file(), f"shipped tokenizer {name} missing or stale"


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_tokenizer_round_trip(kind: str, tmp_path: Path):
    tok = Tokenizer.load(next(SHIPPED_DIR.glob("tokenizer-bpe4096-*.json"))) if kind == "bpe" else byte_tokenizer()
    assert tok.vocab_size == (4096 if kind == "bpe" else 259)
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    for text in ["Hello, world!", "  leading spaces\n\ttabs", "naïve café — 東京 😀", "literal <bos> and <eos>", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids), "special tokens never come from text"
    if kind == "bpe":
        assert len(tok.encode("The assert statement")) < len("The assert statement") / 2
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert again.digest == tok.digest and again.encode("abc def") == tok.encode("abc def")


def test_bpe_training_is_deterministic_and_cached(tmp_path: Path, monkeypatch):
    texts = [r["text"] for r in synthetic_records(200)]
    assert train_bpe(texts, 300).digest == train_bpe(texts, 300).digest
    cfg = TokenizerConfig(kind="bpe", vocab_size=300)
    first = build_tokenizer(cfg, iter(texts), "digest-1", tmp_path)
    assert (tmp_path / tokenizer_filename(cfg, "digest-1")).is_file() and first.vocab_size == 300
    monkeypatch.setattr("exatrain.data.tokenizer.train_bpe", lambda *a: pytest.fail("cache not used"))
    assert build_tokenizer(cfg, iter(()), "digest-1", tmp_path).digest == first.digest
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path: Path):
    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"junk\.json is not a tokenizer\.json"):
        Tokenizer.load(junk)
    cfg = JobConfig()
    cfg.data.tokenizer.path = str(junk)
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.path: .*junk\.json is not a tokenizer"):
        finalize_config(cfg)
    plain = tmp_path / "plain.json"
    plain.write_text(HFTokenizer(models.BPE()).to_str())
    with pytest.raises(ValueError, match=r"plain\.json: tokenizer lacks the special tokens"):
        Tokenizer.load(plain)


def test_long_texts_are_encoded_in_pieces_with_the_same_ids():
    """A huge single-line document is encoded in bounded pieces (memory) to exactly the whole text's ids."""
    rng = random.Random(0)
    text = "".join(rng.choice(WORDS) + rng.choice([" ", " ", "  ", "\n", ", "]) for _ in range(400))
    pieces = split_text(text, 100)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 100 and len(pieces) > 20
    assert [len(p) for p in split_text("a" * 250, 100)] == [100, 100, 50]
    for tok in (byte_tokenizer(), train_bpe([r["text"] for r in synthetic_records(200)], 300)):
        texts = ["short one", text, "", "x " * 90]
        got = list(encode_texts(tok, texts, np.int32, batch_chars=150, piece_chars=100))
        assert [g.tolist() for g in got] == [tok.encode(t) for t in texts]


# --------------------------------------------------------------------------- packing


def check_rows(batches: list[Batch], tok: Tokenizer, texts: set[str]) -> int:
    """Reference-free packing invariants over consecutive batches; returns the documents completed."""
    tokens = torch.cat([b.tokens for b in batches]).flatten().tolist()
    for b in batches:
        for row in range(b.tokens.shape[0]):
            t, lab, pos, ids = (x[row].tolist() for x in (b.tokens, b.labels, b.positions, b.doc_ids))
            for i in range(len(t)):
                starts_doc = i == 0 or t[i] == tok.bos_id
                assert pos[i] == (0 if starts_doc else pos[i - 1] + 1)
                assert ids[i] == (0 if i == 0 else ids[i - 1] + (t[i] == tok.bos_id))
                if i + 1 < len(t):
                    assert lab[i] == (IGNORE_INDEX if t[i + 1] == tok.bos_id else t[i + 1])
    # Rows are consecutive windows of one stream: each row's last label is the next row's first token.
    flat_labels = torch.cat([b.labels for b in batches])
    firsts = torch.cat([b.tokens for b in batches])[1:, 0]
    expected = torch.where(firsts == tok.bos_id, IGNORE_INDEX, firsts)
    assert torch.equal(flat_labels[:-1, -1], expected)
    # The stream splits into <bos> text <eos> documents of the corpus.
    start = tokens.index(tok.bos_id)
    pieces = np.split(np.array(tokens[start:]), np.flatnonzero(np.array(tokens[start:]) == tok.bos_id))[1:-1]
    for piece in pieces:
        assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
        assert tok.decode(piece[1:-1].tolist()) in texts
    return len(pieces)


def test_packing_invariants(corpus: Path, tmp_path: Path):
    bundle = build_data(make_cfg([corpus]), 0, 1, tmp_path / "cache")
    texts = {r["text"] for r in synthetic_records(120)}
    batches = [bundle.train.next_batch(8) for _ in range(45)]  # > 1 epoch of ~20k tokens
    assert batches[0].tokens.shape == (8, 64) and batches[0].tokens.dtype == torch.long
    assert all(b.labels.dtype == b.positions.dtype == b.doc_ids.dtype == torch.long for b in batches)
    assert check_rows(batches, bundle.tokenizer, texts) > 110
    assert (torch.cat([b.doc_ids for b in batches]).max(dim=1).values > 0).any()
    assert bundle.train.state_dict()["epoch"] >= 1, "the stream continues across epochs"


def test_epoch_visits_every_train_document_once(corpus: Path, tmp_path: Path):
    bundle = build_data(make_cfg([corpus]), 0, 1, tmp_path / "cache")
    tok, loader = bundle.tokenizer, bundle.train
    seen: list[str] = []
    current: list[int] = []
    while loader.state_dict()["epoch"] == 0:
        for t in loader.next_batch(4).tokens.flatten().tolist():
            if t == tok.bos_id:
                current = []
            elif t == tok.eos_id:
                seen.append(tok.decode(current))
            else:
                current.append(t)
    texts = [r["text"] for r in synthetic_records(120)]
    train_texts = sorted(texts[i] for i in loader.docs)
    assert sorted(seen[: len(train_texts)]) == train_texts


def test_no_document_masking(corpus: Path, tmp_path: Path):
    batch = build_data(make_cfg([corpus], document_masking=False), 0, 1, tmp_path / "cache").train.next_batch(4)
    assert torch.equal(batch.positions, torch.arange(64).expand(4, 64))
    assert not batch.doc_ids.any()
    assert (batch.labels == IGNORE_INDEX).any(), "still no prediction across documents"


def test_deterministic_and_seeded(corpus: Path, tmp_path: Path):
    def first_batches(seed: int, cache: str) -> list[Batch]:
        loader = build_data(make_cfg([corpus], shuffle_seed=seed), 0, 1, tmp_path / cache).train
        return [loader.next_batch(8) for _ in range(3)]

    a, b, c = first_batches(1, "c1"), first_batches(1, "c2"), first_batches(2, "c1")
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    assert not torch.equal(a[0].tokens, c[0].tokens)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_data_parallel_size_invariance(corpus: Path, tmp_path: Path, dp_size: int):
    cfg = make_cfg([corpus])
    single = build_data(cfg, 0, 1, tmp_path / "cache").train
    ranks = [build_data(cfg, r, dp_size, tmp_path / "cache").train for r in range(dp_size)]
    for _ in range(5):
        assert_batches_equal(cat([r.next_batch(8) for r in ranks]), single.next_batch(8))
    assert all(r.state_dict() == single.state_dict() for r in ranks)
    with pytest.raises(ValueError, match="not divisible"):
        ranks[0].next_batch(6 if dp_size == 4 else 7)


def test_resume_equals_uninterrupted_across_dp_sizes(corpus: Path, tmp_path: Path):
    cfg = make_cfg([corpus])
    reference = build_data(cfg, 0, 1, tmp_path / "cache").train
    for _ in range(7):
        reference.next_batch(8)
    state = pickle.loads(pickle.dumps(reference.state_dict()))
    expected = [reference.next_batch(8) for _ in range(6)]

    resumed = build_data(cfg, 0, 1, tmp_path / "cache").train
    resumed.load_state_dict(state)
    for batch in expected:
        assert_batches_equal(resumed.next_batch(8), batch)
    ranks = [build_data(cfg, r, 2, tmp_path / "cache").train for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for batch in expected:
        assert_batches_equal(cat([r.next_batch(8) for r in ranks]), batch)


def test_state_for_other_data_is_rejected(corpus: Path, tmp_path: Path):
    state = build_data(make_cfg([corpus]), 0, 1, tmp_path / "cache").train.state_dict()
    other = write_jsonl(tmp_path / "other.jsonl", synthetic_records(50, seed=1))
    with pytest.raises(ValueError, match="different dataset"):
        build_data(make_cfg([other]), 0, 1, tmp_path / "cache").train.load_state_dict(state)


def test_validation_split_is_disjoint_and_fixed(corpus: Path, tmp_path: Path):
    bundle = build_data(make_cfg([corpus]), 0, 1, tmp_path / "cache")
    train, val = set(bundle.train.docs.tolist()), set(bundle.val.docs.tolist())
    assert train.isdisjoint(val) and len(train | val) == 120 and 3 <= len(val) <= 30
    assert bundle.stats.val_documents == len(val) and bundle.stats.train_tokens == bundle.train.num_tokens
    first = list(bundle.val.iter_batches(3, 4))
    bundle.train.next_batch(8)
    for a, b in zip(first, bundle.val.iter_batches(3, 4)):
        assert_batches_equal(a, b)
    val_texts = {r["text"] for i, r in enumerate(synthetic_records(120)) if i in val}
    assert check_rows(first, bundle.tokenizer, val_texts) >= 1
    halves = [list(build_data(make_cfg([corpus]), r, 2, tmp_path / "cache").val.iter_batches(3, 4)) for r in range(2)]
    for i, batch in enumerate(first):
        assert_batches_equal(cat([halves[0][i], halves[1][i]]), batch)


def test_caches_are_reused_and_tokens_match(corpus: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    bundle = build_data(make_cfg([corpus]), 0, 1, cache)
    assert len(list(cache.glob("tokens-*"))) == 1 and not list(cache.glob(".*tmp"))
    again = build_data(make_cfg([corpus]), 0, 1, cache)
    assert again.stats.report() == bundle.stats.report()
    store = again.train.store
    text = synthetic_records(120)[5]["text"]
    assert store.tokens[store.offsets[5]:store.offsets[6]].tolist() == bundle.tokenizer.encode(text)


def test_a_damaged_token_cache_is_named_and_rebuilt(corpus: Path, tmp_path: Path, caplog):
    cache = tmp_path / "cache"
    first = build_data(make_cfg([corpus]), 0, 1, cache).train.next_batch(8)
    (store,) = cache.glob("tokens-*")
    for damage, message in ((lambda: os.truncate(store / "tokens.bin", 100), "tokens.bin has 100 bytes"),
                            (lambda: (store / "index.npz").unlink(), "index.npz")):
        damage()
        caplog.clear()
        with caplog.at_level("WARNING", logger="exatrain.data"):
            again = build_data(make_cfg([corpus]), 0, 1, cache)
        assert f"token cache {store}" in caplog.text and message in caplog.text and "rebuilding" in caplog.text
        assert_batches_equal(again.train.next_batch(8), first)
    assert [p.name for p in cache.iterdir() if p.name.startswith(("tokens-", ".tokens-"))] == [store.name]


def test_default_job_data(tmp_path: Path):
    """The default config: embedded corpus and shipped tokenizer, no training."""
    cfg = JobConfig()
    bundle = build_data(cfg, 0, 1, tmp_path)
    assert not list(tmp_path.glob("tokenizer-*")), "the shipped tokenizer is used"
    batch = bundle.train.next_batch(cfg.train.global_batch)
    assert batch.tokens.shape == (cfg.train.global_batch, cfg.data.seq_len)
    assert bundle.tokenizer.vocab_size == cfg.data.tokenizer.vocab_size
    assert bundle.stats.train_tokens > 900_000 and bundle.stats.val_documents > 0
    assert "train:" in bundle.stats.report()


def test_waiting_for_rank0_reports_failure_timeout_and_an_unshared_cache(tmp_path: Path, monkeypatch):
    markers = tmp_path / ".prepare"
    markers.mkdir()
    (markers / "run1.started").touch()
    (markers / "run1.failed").write_text("ValueError: bad.jsonl: no usable documents")
    with pytest.raises(RuntimeError, match="failed on rank 0: ValueError: bad.jsonl"):
        _wait_for_rank0(markers, "run1", 10)
    (markers / "run2.started").touch()
    with pytest.raises(TimeoutError, match="data.prepare_timeout_s=0.2s"):
        _wait_for_rank0(markers, "run2", 0.2)
    monkeypatch.setattr("exatrain.data.dataset._SHARED_GRACE_S", 0.1)
    assert _wait_for_rank0(markers, "run3", 10) is False, "no 'started' file: prepare on this rank"
    (markers / "run2.done").touch()
    assert _wait_for_rank0(markers, "run2", 10) is True


SLOW_TOKENIZE_S = 4.0
COLLECTIVE_TIMEOUT_S = 1.5


def _distributed_worker(rank: int, init_file: str, data: str, cache: str, out: str) -> None:
    """Rank 0's tokenizer is slower than the process group's collective timeout (the old rank-0-prepares-
    inside-a-broadcast scheme timed out here); the other rank waits on rank 0's marker files instead."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        if rank == 0:
            encode_batch = Tokenizer.encode_batch

            def slow(self, texts):
                time.sleep(SLOW_TOKENIZE_S)
                return encode_batch(self, texts)

            Tokenizer.encode_batch = slow
        cfg = make_cfg([Path(data)])
        cfg.data.tokenizer.kind, cfg.data.tokenizer.vocab_size = "bpe", 300
        start = time.monotonic()
        bundle = build_data(cfg, rank, 2, Path(cache))
        result = {"tokens": bundle.train.next_batch(8).tokens.tolist(), "vocab": bundle.tokenizer.vocab_size,
                  "seconds": time.monotonic() - start}
        cfg.data.paths = [data + ".missing"]
        try:
            build_data(cfg, rank, 2, Path(cache))
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        dist.barrier()  # the group survived the long preparation
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # The results are on disk; skip interpreter teardown, where a loaded 2-core machine has seen gloo abort
    # ("terminate called without an active exception") after a clean destroy_process_group.
    os._exit(0)


@pytest.mark.slow
def test_distributed_rank0_builds_and_failures_propagate(corpus: Path, tmp_path: Path):
    """Rank 0 trains the tokenizer and tokenizes, slower than the collective timeout; rank 1 waits for its
    marker file, then reads the caches; a rank-0 error reaches rank 1."""
    cache = tmp_path / "cache"
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(corpus), str(cache), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert len(list(cache.glob("tokenizer-*.json"))) == 1 and len(list(cache.glob("tokens-*"))) == 1
    assert r1["seconds"] > SLOW_TOKENIZE_S > COLLECTIVE_TIMEOUT_S, "rank 1 outwaited the collective timeout"
    cfg = make_cfg([corpus])
    cfg.data.tokenizer.kind, cfg.data.tokenizer.vocab_size = "bpe", 300
    single = build_data(cfg, 0, 1, cache).train.next_batch(8).tokens.tolist()
    assert r0["tokens"] + r1["tokens"] == single and r0["vocab"] == r1["vocab"] == 300
    assert r0["error"].startswith("FileNotFoundError") and "docs.jsonl.missing" in r0["error"]
    assert r1["error"].startswith("RuntimeError: data preparation failed on rank 0: FileNotFoundError")
