"""MeCo data side: prefix layout and loss mask on real tokenizer output, policies, switch and resume."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from exatrain.config import JobConfig, MecoConfig, finalize_config
from exatrain.data import build_data, metadata_prompt
from exatrain.data.dataset import IGNORE_INDEX, PackedLoader
from exatrain.data.meco import meco_url, metadata_value, url_domain
from exatrain.data.tokenizer import SHIPPED_DIR, Tokenizer
from exatrain.train.meco import MecoCooldown

SHIPPED = next(SHIPPED_DIR.glob("tokenizer-bpe4096-*.json"))
WORDS = "the statement returns a value when its argument is evaluated before the loop ends".split()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(SHIPPED)


def records(n: int, missing_every: int = 0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"text": f"Doc {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
               "url": f"https://{rng.choice(['www.python.org', 'gnu.org:443', 'Docs.Example.COM'])}/p/{i}",
               "topic": rng.choice(["law", "code"])}
        if missing_every and i % missing_every == 0:
            del rec["url"]
        out.append(rec)
    return out


def make_cfg(tmp_path: Path, recs: list[dict], **meco) -> JobConfig:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = JobConfig()
    cfg.data.paths = [str(path)]
    cfg.data.tokenizer.path = str(SHIPPED)
    cfg.data.val_fraction = 0.1
    cfg.data.seq_len = cfg.model.max_seq_len = 128
    cfg.data.meco.enabled = True
    for key, value in meco.items():
        setattr(cfg.data.meco, key, value)
    return finalize_config(cfg)


def documents_in(loader: PackedLoader, n_batches: int, tok: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(tokens, labels) of every document that lies wholly inside one row."""
    docs = []
    for _ in range(n_batches):
        batch = loader.next_batch(4)
        for row in range(4):
            t, lab = batch.tokens[row].tolist(), batch.labels[row].tolist()
            starts = [i for i, x in enumerate(t) if x == tok.bos_id]
            for a, b in zip(starts, starts[1:]):
                docs.append((t[a:b], lab[a:b]))
    return docs


def expected_layout(tok: Tokenizer, cfg: MecoConfig, text: str, value: str | None) -> tuple[list[int], list[int]]:
    prefix = tok.encode(cfg.template.format(value=value)) if value is not None else []
    body = tok.encode(text) + [tok.eos_id]
    tokens = [tok.bos_id] + prefix + body
    # label i is token i+1; the prefix targets are masked, the text (from its first token) and <eos> are not
    labels = [IGNORE_INDEX] * len(prefix) + body + [IGNORE_INDEX]  # the last one: the next document's <bos>
    return tokens, labels


def short_url(url: str) -> str:
    """MeCo's `re.sub(r'https?://', '', url).split('/')[0]` (datatools/mds_pack_data.py, --use_short_url)
    written as one left-to-right scan: a match is removed and the scan goes on after it."""
    out, i = [], 0
    while i < len(url):
        scheme = next((s for s in ("https://", "http://") if url.startswith(s, i)), None)
        if scheme:
            i += len(scheme)
        else:
            out.append(url[i])
            i += 1
    return "".join(out).partition("/")[0]


ADVERSARIAL_URLS = [
    "https://www.Example.org:8080/a/b?c=d#e", "http://user:secret@docs.python.org/3/", "en.wikipedia.org/wiki/Foo",
    "WWW.GNU.ORG", "HTTPS://Upper.Scheme.com/x", "https://host.com?q=http://other.org/p", "example.org?x=1/y",
    "https://", "http:///path", "", "   ", " https://spaced.org/ ", "ftp://files.example.com/a", "//cdn.example.net/x",
    "httpshttps://://x.org/", "httphttps://://y.org", "https://https://z.org/", "http://[::1]:80/x",
    "https://xn--bcher-kva.example/", "mailto:someone@example.com", "https://a.org#frag/ment", "http:/one-slash.org/",
]


@pytest.mark.parametrize("url", ADVERSARIAL_URLS)
def test_default_url_value_is_what_meco_writes(url):
    expected = short_url(url)
    assert meco_url(url) == (expected or None)
    assert metadata_value(MecoConfig(), url) == (expected or None)
    assert metadata_value(MecoConfig(url_value="host"), url) == url_domain(url)


def test_url_domain():
    assert url_domain("https://www.Example.org:8080/a/b?c=d#e") == "example.org"
    assert url_domain("http://user:secret@docs.python.org/3/") == "docs.python.org"
    assert url_domain("en.wikipedia.org/wiki/Foo") == "en.wikipedia.org"
    assert url_domain("http://[::1]:80/x") == "::1"
    assert url_domain("wwwhat.com") == "wwwhat.com"
    for bad in ("", "   ", "https://", "not a url", "http://[::1"):
        assert url_domain(bad) is None, bad


def test_prefix_and_mask_layout(tmp_path: Path, tok: Tokenizer):
    recs = records(60)
    cfg = make_cfg(tmp_path, recs)
    loader = build_data(cfg, 0, 1, tmp_path / "cache").train
    by_text = {r["text"]: r for r in recs}
    docs = documents_in(loader, 6, tok)
    assert len(docs) > 10
    for tokens, labels in docs:
        header, _, body = tok.decode(tokens[1:-1]).partition("\n\n")
        domain = short_url(by_text[body]["url"])
        assert header == f"URL: {domain}"
        assert (tokens, labels) == expected_layout(tok, cfg.data.meco, body, domain)
        prefix_len = len(tok.encode(f"URL: {domain}\n\n"))
        assert prefix_len > 2 and labels[prefix_len] == tokens[prefix_len + 1], "the first text token is trained"
    assert {short_url(r["url"]) for r in recs} == {"www.python.org", "gnu.org:443", "Docs.Example.COM"}
    host = build_data(make_cfg(tmp_path, recs, url_value="host"), 0, 1, tmp_path / "cache").train
    headers = {tok.decode(t[1:-1]).partition("\n\n")[0] for t, _ in documents_in(host, 6, tok)}
    assert headers == {"URL: python.org", "URL: gnu.org", "URL: docs.example.com"}


def test_text_tokens_identical_with_and_without_metadata(tok: Tokenizer):
    cfg = MecoConfig(enabled=True)
    text = "Comparisons can be chained arbitrarily."
    with_meta = metadata_prompt(tok, cfg, text, "https://docs.python.org/3/reference/")
    plain = metadata_prompt(tok, cfg, text, None)
    assert plain == [tok.bos_id] + tok.encode(text)
    assert with_meta == [tok.bos_id] + tok.encode("URL: docs.python.org\n\n") + tok.encode(text)
    fabricated = metadata_prompt(tok, cfg, text, "en.wikipedia.org")
    assert tok.decode(fabricated[1:]) == "URL: en.wikipedia.org\n\n" + text
    with pytest.raises(ValueError, match="cannot derive"):
        metadata_prompt(tok, cfg, text, "https://")
    with pytest.raises(ValueError, match="cannot derive"):
        metadata_prompt(tok, MecoConfig(enabled=True, url_value="host"), text, "no host here")


def test_other_field_uses_raw_value(tmp_path: Path, tok: Tokenizer):
    recs = records(40)
    cfg = make_cfg(tmp_path, recs, field="topic", template="Topic: {value}\n\n")
    loader = build_data(cfg, 0, 1, tmp_path / "cache").train
    by_text = {r["text"]: r for r in recs}
    for tokens, _ in documents_in(loader, 4, tok):
        header, _, body = tok.decode(tokens[1:-1]).partition("\n\n")
        assert header == f"Topic: {by_text[body]['topic']}"


def test_missing_metadata_policies(tmp_path: Path, tok: Tokenizer):
    recs = records(60, missing_every=5)  # 12 documents without a url
    cfg = make_cfg(tmp_path, recs, missing="fallback", fallback="unknown.invalid")
    bundle = build_data(cfg, 0, 1, tmp_path / "cache")
    assert bundle.stats.meco_fallback == 12 and bundle.stats.train_documents + bundle.stats.val_documents == 60
    assert "12 documents without metadata use the fallback" in bundle.stats.report()
    headers = {tok.decode(t[1:-1]).partition("\n\n")[0] for t, _ in documents_in(bundle.train, 8, tok)}
    assert "URL: unknown.invalid" in headers

    skip = build_data(make_cfg(tmp_path, recs, missing="skip"), 0, 1, tmp_path / "cache")
    assert skip.stats.meco_skipped == 12 and skip.stats.train_documents + skip.stats.val_documents == 48
    kept = {i for i in range(60) if i % 5}
    assert set(skip.train.docs.tolist()) | set(skip.val.docs.tolist()) == kept
    skip.train.set_metadata(False)  # the cooldown keeps the same documents
    assert set(skip.train.docs.tolist()) <= kept

    with pytest.raises(ValueError, match=r"docs\.jsonl:1: document has no usable 'url' metadata \(12 such"):
        build_data(make_cfg(tmp_path, recs, missing="error"), 0, 1, tmp_path / "cache")

    with pytest.raises(ValueError, match=r"data\.meco\.field='source': none of the 60 documents .*docs\.jsonl:1\)"):
        build_data(make_cfg(tmp_path, recs, field="source"), 0, 1, tmp_path / "cache")


def test_metadata_off_gives_plain_documents(tmp_path: Path, tok: Tokenizer):
    recs = records(60)
    cfg = make_cfg(tmp_path, recs)
    cfg.data.meco.enabled = False
    loader = build_data(cfg, 0, 1, tmp_path / "cache").train
    texts = {r["text"] for r in recs}
    for tokens, labels in documents_in(loader, 4, tok):
        assert tok.decode(tokens[1:-1]) in texts and labels[0] != IGNORE_INDEX
    with pytest.raises(ValueError, match="data.meco.enabled is false"):
        loader.set_metadata(True)


def _stream_after(loader: PackedLoader, n: int) -> torch.Tensor:
    return torch.cat([loader.next_batch(4).tokens.flatten() for _ in range(n)])


def test_switch_takes_effect_at_next_document_and_resumes(tmp_path: Path, tok: Tokenizer):
    cfg = make_cfg(tmp_path, records(80))
    cache = tmp_path / "cache"
    switched = build_data(cfg, 0, 1, cache).train
    unswitched = build_data(cfg, 0, 1, cache).train
    for _ in range(3):
        switched.next_batch(4)
        unswitched.next_batch(4)
    assert switched.state_dict()["offset"] > 0, "the switch lands inside a document"
    switched.set_metadata(False)
    state = pickle.loads(pickle.dumps(switched.state_dict()))
    assert state["metadata"] is False and state["doc_metadata"] is True

    after = _stream_after(switched, 4).tolist()
    reference = _stream_after(unswitched, 4).tolist()
    first_bos = after.index(tok.bos_id)
    assert after[:first_bos] == reference[:first_bos], "the current document finishes in its old layout"
    bos_positions = [i for i, x in enumerate(after) if x == tok.bos_id]
    assert len(bos_positions) > 3
    for i in bos_positions[:-1]:
        assert not tok.decode(after[i + 1:i + 6]).startswith("URL:"), "later documents are plain"

    resumed = build_data(cfg, 0, 1, cache).train  # starts with metadata on, as a fresh MeCo job does
    resumed.load_state_dict(state)
    assert _stream_after(resumed, 4).tolist() == after
    ranks = [build_data(cfg, r, 2, cache).train for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    rebuilt = torch.cat([torch.cat([r.next_batch(4).tokens for r in ranks]).flatten() for _ in range(4)])
    assert rebuilt.tolist() == after


def test_switch_at_document_boundary_is_immediate(tmp_path: Path, tok: Tokenizer):
    loader = build_data(make_cfg(tmp_path, records(40)), 0, 1, tmp_path / "cache").train
    assert loader.state_dict()["offset"] == 0
    loader.set_metadata(False)
    row = loader.next_batch(4).tokens[0].tolist()
    assert row[0] == tok.bos_id and not tok.decode(row[1:6]).startswith("URL:")
    loader.set_metadata(True)
    assert loader.state_dict()["doc_metadata"] is False, "a started document keeps its layout"


def test_metadata_schedule():
    meco = MecoCooldown(MecoConfig(enabled=True, cooldown_fraction=0.1), 1000)
    assert meco.metadata_on(0) and meco.metadata_on(899)
    assert not meco.metadata_on(900) and not meco.metadata_on(1000)
    assert meco.last_metadata_step(100) == 9 and meco.last_metadata_step(300) == 3
    assert not MecoCooldown(MecoConfig(enabled=False), 1000).metadata_on(0)
    assert MecoCooldown(MecoConfig(enabled=True, cooldown_fraction=0.0), 1000).metadata_on(999)
