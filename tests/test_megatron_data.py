"""Megatron indexed datasets: exatrain's reader/writer against megatron-core's own builder and reader, the
token stream trained on, weighted blending, resume, the tokenizer identity check, `exatrain data prepare`."""

from __future__ import annotations

import json
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from exatrain.cli import main as cli_main
from exatrain.config import ConfigError, JobConfig, finalize_config
from exatrain.data import build_data
from exatrain.data.megatron import IndexedDatasetWriter, read_index
from exatrain.data.prepare import prepare
from exatrain.data.tokenizer import byte_tokenizer, train_bpe
from test_data import assert_batches_equal, cat, synthetic_records, write_jsonl


def core():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def core_write(prefix: Path, docs: list[list[np.ndarray]], dtype=np.uint16) -> str:
    """Documents of one or more sequences each, written by megatron-core's IndexedDatasetBuilder."""
    builder = core().IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(np.asarray(seq, dtype=np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def byte_docs(texts: list[str]) -> list[list[np.ndarray]]:
    """Each text as byte-tokenizer ids, split into two sequences (a document is not a sequence)."""
    tok = byte_tokenizer()
    out = []
    for text in texts:
        ids = np.asarray(tok.encode(text))
        out.append([ids[: len(ids) // 2], ids[len(ids) // 2:]])
    return out


def megatron_cfg(prefixes: list[str], seq_len: int = 64, **data) -> JobConfig:
    cfg = JobConfig()
    cfg.data.format = "megatron"
    cfg.data.megatron_prefixes = prefixes
    cfg.data.seq_len = cfg.model.max_seq_len = seq_len
    cfg.data.tokenizer.kind = "byte"
    cfg.data.val_fraction = 0.1
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return finalize_config(cfg)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reader_and_writer_agree_with_megatron_core(tmp_path: Path, dtype):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 300, rng.integers(0, 20)) for _ in range(rng.integers(1, 4))] for _ in range(30)]
    ds = read_index(core_write(tmp_path / "core", docs, dtype))
    assert ds.tokens.dtype == dtype and len(ds.offsets) == 31
    for i, doc in enumerate(docs):
        assert ds.document(i).tolist() == np.concatenate(doc).tolist()
    writer = IndexedDatasetWriter(tmp_path / "ours", dtype)
    for doc in docs:
        writer.add_document(np.concatenate(doc))
    writer.finalize()
    theirs = core().IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 30 and theirs.document_indices.tolist() == list(range(31))
    for i, doc in enumerate(docs):
        assert theirs[i].tolist() == np.concatenate(doc).tolist()


def test_training_stream_is_the_documents_written(tmp_path: Path):
    """Rows are the <bos> document <eos> layouts of the epoch's documents back to back, document-masked."""
    texts = [r["text"] for r in synthetic_records(80)]
    prefix = core_write(tmp_path / "corpus", byte_docs(texts))
    bundle = build_data(megatron_cfg([prefix]), 0, 1, tmp_path / "cache")
    tok, loader = bundle.tokenizer, bundle.train
    order = loader.order.epoch(0)
    stream = np.concatenate([[tok.bos_id, *tok.encode(texts[d]), tok.eos_id] for d in order])
    rows = (len(stream) - 1) // 64 // 4 * 4
    batches = [loader.next_batch(4) for _ in range(rows // 4)]
    tokens = torch.cat([b.tokens for b in batches]).flatten().numpy()
    assert np.array_equal(tokens, stream[: len(tokens)])
    assert sorted(loader.docs.tolist() + bundle.val.docs.tolist()) == list(range(80))
    for b in batches:  # positions restart at every document start
        assert torch.equal(b.positions == 0, (b.tokens == tok.bos_id) | (torch.arange(64) == 0))
    assert (torch.cat([b.doc_ids for b in batches]).max(dim=1).values > 0).any()


def test_blended_prefixes_weights_resume_and_dp(tmp_path: Path):
    rng = np.random.default_rng(1)
    short = core_write(tmp_path / "short", [[rng.integers(3, 259, 10)] for _ in range(60)])
    long = core_write(tmp_path / "long", [[rng.integers(3, 259, 40)] for _ in range(60)])
    cfg = megatron_cfg([f"3 {short}", f"1 {long}"], val_fraction=0.2)
    loader = build_data(cfg, 0, 1, tmp_path / "cache").train
    epoch = np.concatenate([loader.order.epoch(e) for e in range(4)])
    lengths = np.diff(loader.store.offsets)[epoch] + 2
    from_short = loader.store.doc_file[epoch] == 0
    assert lengths[from_short].sum() / lengths.sum() == pytest.approx(0.75, abs=0.02)
    seen_short = set(epoch[from_short].tolist())
    assert seen_short == set(loader.docs[loader.store.doc_file[loader.docs] == 0].tolist()), "every document"
    for _ in range(5):
        loader.next_batch(8)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    expected = [loader.next_batch(8) for _ in range(4)]
    ranks = [build_data(cfg, r, 2, tmp_path / "cache").train for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for batch in expected:
        assert_batches_equal(cat([r.next_batch(8) for r in ranks]), batch)
    unweighted = build_data(megatron_cfg([short, long], val_fraction=0.2), 0, 1, tmp_path / "cache").train
    with pytest.raises(ValueError, match="different dataset"):
        unweighted.load_state_dict(state)


def test_bad_files_are_config_errors_naming_the_file(tmp_path: Path):
    prefix = core_write(tmp_path / "good", byte_docs(["some text", "more text"]))
    idx, bin_ = Path(prefix + ".idx").read_bytes(), Path(prefix + ".bin").read_bytes()

    def broken(name: str, idx_bytes: bytes | None, bin_bytes: bytes | None) -> str:
        p = tmp_path / name
        for suffix, data in ((".idx", idx_bytes), (".bin", bin_bytes)):
            if data is not None:
                Path(f"{p}{suffix}").write_bytes(data)
        return str(p)

    cases = {
        broken("nobin", idx, None): r"not found: .*nobin\.bin",
        broken("header", b"NOTMEGA!!" + idx[9:], bin_): r"header\.idx: not a Megatron index",
        broken("version", idx[:9] + struct.pack("<Q", 2) + idx[17:], bin_): "version 2",
        broken("float", idx[:17] + struct.pack("<B", 7) + idx[18:], bin_): "float32",
        broken("shortidx", idx[:-8], bin_): r"shortidx\.idx: .* truncated",
        broken("shortbin", idx, bin_[:-2]): r"shortbin\.bin: .* truncated",
    }
    for prefix, message in cases.items():
        with pytest.raises(ConfigError, match=f"data.megatron_prefixes: .*{message}"):
            megatron_cfg([prefix])
    with pytest.raises(ConfigError, match="data.tokenizer.path"):
        megatron_cfg([prefix], tokenizer=JobConfig().data.tokenizer)
    with pytest.raises(ConfigError, match="weight for every prefix"):
        megatron_cfg([f"1 {prefix}", str(tmp_path / "good")])
    with pytest.raises(ConfigError, match="data.paths"):
        megatron_cfg([str(tmp_path / "good")], paths=["x.jsonl"])


def test_tokenizer_identity_is_checked(tmp_path: Path):
    texts = [r["text"] for r in synthetic_records(40)]
    foreign = core_write(tmp_path / "foreign", [[np.array([5, 7, 400])]] + byte_docs(texts))
    with pytest.raises(ValueError, match=r"foreign\.bin holds token id 400, outside .* vocabulary of 259"):
        build_data(megatron_cfg([foreign]), 0, 1, tmp_path / "cache")
    corpus = write_jsonl(tmp_path / "docs.jsonl", synthetic_records(40))
    bpe = train_bpe(texts, 300)
    bpe.save(tmp_path / "bpe.json")
    prepare([str(corpus)], str(tmp_path / "bpe-data"), str(tmp_path / "bpe.json"))
    with pytest.raises(ValueError, match=r"bpe-data\.exatrain\.json: .* tokenized with tokenizer"):
        build_data(megatron_cfg([str(tmp_path / "bpe-data")]), 0, 1, tmp_path / "cache")
    cfg = megatron_cfg([str(tmp_path / "bpe-data")], tokenizer=type(JobConfig().data.tokenizer)(
        path=str(tmp_path / "bpe.json")))
    assert build_data(cfg, 0, 1, tmp_path / "cache").tokenizer.digest == bpe.digest
    Path(tmp_path / "bpe-data.exatrain.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bpe-data\.exatrain\.json: not an exatrain sidecar"):
        build_data(cfg, 0, 1, tmp_path / "cache")


def test_prepare_cli_writes_what_megatron_core_reads(tmp_path: Path):
    records = [{"body": r["text"], "url": r["url"]} for r in synthetic_records(50)]
    corpus = write_jsonl(tmp_path / "docs.jsonl", records)
    (tmp_path / "extra.txt").write_text("a plain text document")
    out = tmp_path / "out" / "corpus"
    assert cli_main(["data", "prepare", str(corpus), str(tmp_path / "extra.txt"), "--output", str(out),
                     "--tokenizer", "byte", "--workers", "2", "--text-key", "body"]) == 0
    tok = byte_tokenizer()
    texts = [r["body"] for r in records] + ["a plain text document"]
    theirs = core().IndexedDataset(str(out))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [tok.encode(t) for t in texts]
    info = json.loads(Path(f"{out}.exatrain.json").read_text())
    assert info["tokenizer"]["digest"] == tok.digest and info["documents"] == 51
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.bin", "corpus.exatrain.json", "corpus.idx"]
    assert cli_main(["data", "prepare", str(tmp_path / "missing.jsonl"), "--output", str(out), "--tokenizer",
                     "byte"]) == 2
