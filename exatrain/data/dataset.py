"""Pre-tokenized document store, a global sequence packer, and the loaders the trainer uses.

Store: every document's text is tokenized once into a flat token file plus document
offsets, cached under a key over (input bytes, tokenizer, metadata field) and written to a
temporary directory that is renamed into place, so a crashed or concurrent build never
leaves a half cache. Megatron indexed datasets (data.format=megatron) are already tokenized:
their memory-mapped files are the store, documents numbered across prefixes in order.

Packing: a split's documents are visited in an order shuffled per epoch from
`data.shuffle_seed`; each is laid out as `<bos> [metadata prefix] text <eos>` and the
layouts form one endless stream. Row r of the stream is its tokens [r*T, r*T + T], so
T + 1 tokens give T inputs and their T next-token labels; documents continue across rows
and epochs, nothing is padded or dropped. A global batch is the next `global_batch` rows.
Weighted Megatron prefixes replace the per-epoch shuffle by a blended order (`BlendedOrder`).
Every data-parallel rank walks the same stream and materializes only its own slice of the
batch, so what a global step sees does not depend on the data-parallel size, and the
loader state (epoch, position, offset, metadata flags) is global and tiny.

Within a row, `positions` restart at 0 at every document start and at the row start (a
document continued from the previous row is seen as if it began there, which keeps
positions below T); `doc_ids` number the row's document pieces 0, 1, 2, ... for
document-masked attention. A label is -100 when its target is `<bos>` (the next document:
no cross-document prediction) or a metadata token (MeCo).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from exatrain.config import DataConfig, JobConfig, MecoConfig
from exatrain.data.batch import IGNORE_INDEX, Batch
from exatrain.data.documents import DataStats, files_digest, read_documents, resolve_files
from exatrain.data.meco import MetadataPrefixes, build_prefixes, metadata_value
from exatrain.data.megatron import check_tokenizer, parse_prefixes, read_index
from exatrain.data.tokenizer import Tokenizer, build_tokenizer, encode_texts
from exatrain.files import write_atomic

logger = logging.getLogger("exatrain.data")

_CACHE_VERSION = 1
PROGRESS_S = 30.0  # seconds between progress lines of a long tokenization or wait


# --------------------------------------------------------------------------- store


@dataclass
class TokenStore:
    """All documents' text tokens, flat and memory-mapped, plus per-document facts."""

    tokens: np.ndarray  # uint16 or uint32, all documents back to back
    offsets: np.ndarray  # int64 (n_docs + 1,): document i is tokens[offsets[i]:offsets[i + 1]]
    hashes: np.ndarray  # uint64 content hash of each text; assigns the validation split
    doc_file: np.ndarray  # int32 index into `files`
    doc_line: np.ndarray  # int64 line number, for error messages
    files: list[str]  # as given this run (the cache key covers their names and bytes, not their location)
    meta_values: list[str]  # distinct MeCo values (`metadata_value` of the configured field)
    meta_index: np.ndarray  # int32 per document into `meta_values`; -1 = no value
    stats: DataStats
    key: str

    def origin(self, doc: int) -> str:
        return f"{self.files[self.doc_file[doc]]}:{self.doc_line[doc]}"


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _write_store(directory: Path, files: list[Path], tokenizer: Tokenizer, meco: MecoConfig) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    stats = DataStats()
    offsets, hashes, doc_file, doc_line = [0], [], [], []
    values: dict[str, int] = {}
    meta_index: list[int] = []
    file_index = {path: i for i, path in enumerate(files)}

    def texts() -> Iterator[str]:
        for d in read_documents(files, stats):
            hashes.append(_text_hash(d.text))
            doc_file.append(file_index[d.path])
            doc_line.append(d.line)
            value = metadata_value(meco, d.meta.get(meco.field))
            meta_index.append(-1 if value is None else values.setdefault(value, len(values)))
            yield d.text

    last_report = time.monotonic()
    with open(directory / "tokens.bin", "wb") as out:
        for ids in encode_texts(tokenizer, texts(), dtype):
            out.write(ids.tobytes())
            offsets.append(offsets[-1] + len(ids))
            if time.monotonic() - last_report > PROGRESS_S:
                last_report = time.monotonic()
                logger.info("data: tokenized %d documents (%d tokens) so far", len(offsets) - 1, offsets[-1])
    np.savez(directory / "index.npz", offsets=np.asarray(offsets, dtype=np.int64),
             hashes=np.asarray(hashes, dtype=np.uint64), doc_file=np.asarray(doc_file, dtype=np.int32),
             doc_line=np.asarray(doc_line, dtype=np.int64), meta_index=np.asarray(meta_index, dtype=np.int32))
    info = {"dtype": np.dtype(dtype).name, "meta_values": list(values), "stats": stats.to_dict()}
    (directory / "info.json").write_text(json.dumps(info), encoding="utf-8")


def _read_store(directory: Path, key: str, files: list[Path]) -> TokenStore:
    """The cache in `directory`; a missing, truncated or inconsistent part is a ValueError naming it."""
    try:
        info = json.loads((directory / "info.json").read_text(encoding="utf-8"))
        with np.load(directory / "index.npz") as index:
            arrays = {name: index[name] for name in ("offsets", "hashes", "doc_file", "doc_line", "meta_index")}
        dtype = np.dtype(info["dtype"])
        size = (directory / "tokens.bin").stat().st_size
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"token cache {directory} is unreadable ({type(exc).__name__}: {exc})") from None
    n_docs = len(arrays["offsets"]) - 1
    if size != int(arrays["offsets"][-1]) * dtype.itemsize:
        raise ValueError(f"token cache {directory}: tokens.bin has {size} bytes, its index expects "
                         f"{int(arrays['offsets'][-1]) * dtype.itemsize} (truncated)")
    if any(len(arrays[name]) != n_docs for name in ("hashes", "doc_file", "doc_line", "meta_index")):
        raise ValueError(f"token cache {directory}: index.npz arrays disagree on the document count")
    return TokenStore(
        tokens=np.memmap(directory / "tokens.bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype),
        files=[str(f) for f in files], meta_values=info["meta_values"],
        stats=DataStats.from_dict(info["stats"]), key=key, **arrays,
    )


def load_store(files: list[Path], data_digest: str, tokenizer: Tokenizer, meco: MecoConfig, cache_dir: Path) -> TokenStore:
    """The cached store for these inputs, tokenizing on a miss."""
    settings = {"version": _CACHE_VERSION, "data": data_digest, "tokenizer": tokenizer.digest, "field": meco.field,
                "url_value": meco.url_value}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir / f"tokens-{key}"
    if directory.is_dir():
        try:
            store = _read_store(directory, key, files)
            logger.info("data: using cached tokens %s", directory)
            return store
        except ValueError as exc:
            logger.warning("data: %s; rebuilding it", exc)
            aside = cache_dir / f".tokens-{key}.{os.getpid()}.corrupt.tmp"
            directory.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
    start = time.perf_counter()
    tmp = cache_dir / f".tokens-{key}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True)
    try:
        _write_store(tmp, files, tokenizer, meco)
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first; its cache is identical
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store = _read_store(directory, key, files)
    logger.info("data: tokenized %d documents (%d tokens) in %.1fs -> %s",
                len(store.offsets) - 1, len(store.tokens), time.perf_counter() - start, directory)
    return store


class _ConcatTokens:
    """Several token files read as one sequence, for slices that stay inside one file (a document's)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        i = min(int(np.searchsorted(self.starts, window.start, side="right")) - 1, len(self.parts) - 1)
        return self.parts[i][window.start - self.starts[i]:window.stop - self.starts[i]]


def _index_hashes(digest: str, n: int) -> np.ndarray:
    """splitmix64 of (file digest + document number): a Megatron document's stand-in for a content hash,
    stable for the same files, without reading the tokens."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(int(digest[:16], 16))
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def load_megatron_store(prefixes: list[str], tokenizer: Tokenizer, cache_dir: Path) -> TokenStore:
    """Megatron indexed datasets as one store (documents numbered across prefixes in order), after the
    tokenizer identity check (exatrain.data.megatron)."""
    datasets = [read_index(p) for p in prefixes]
    for ds in datasets:
        check_tokenizer(ds, tokenizer.digest, tokenizer.vocab_size, cache_dir)
    counts = [len(ds.offsets) - 1 for ds in datasets]
    tokens = datasets[0].tokens if len(datasets) == 1 else _ConcatTokens([ds.tokens for ds in datasets])
    starts = np.concatenate([[0], np.cumsum([len(ds.tokens) for ds in datasets])])
    offsets = np.concatenate([ds.offsets[:-1] + start for ds, start in zip(datasets, starts)] + [starts[-1:]])
    key = hashlib.sha256(json.dumps({"megatron": [ds.digest for ds in datasets], "tokenizer": tokenizer.digest})
                         .encode()).hexdigest()[:16]
    n = sum(counts)
    return TokenStore(
        tokens=tokens, offsets=offsets.astype(np.int64),
        hashes=np.concatenate([_index_hashes(ds.digest, c) for ds, c in zip(datasets, counts)]),
        doc_file=np.repeat(np.arange(len(datasets), dtype=np.int32), counts),
        doc_line=np.concatenate([np.arange(c, dtype=np.int64) for c in counts]),
        files=list(prefixes), meta_values=[], meta_index=np.full(n, -1, dtype=np.int32),
        stats=DataStats(files=len(prefixes), documents=n), key=key,
    )


def split_documents(hashes: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Validation = documents whose content hash falls in the lowest `val_fraction` of the range.

    Stable under reordering and additions, and identical copies of a text land on the same side.
    At least one document is held out (the lowest hash) so evaluation always has data.
    """
    if len(hashes) < 2:
        raise ValueError(f"need at least 2 documents to hold out a validation split, got {len(hashes)}")
    is_val = (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction
    if not is_val.any():
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        raise ValueError(f"data.val_fraction={val_fraction} leaves no training documents out of {len(hashes)}")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# --------------------------------------------------------------------------- packing


class ShuffledOrder:
    """Every document of the split once per epoch, in an order shuffled per epoch."""

    def __init__(self, docs: np.ndarray, seed: int):
        self.docs, self.seed, self.size = docs, seed, len(docs)
        self.identity = docs.tobytes()

    def epoch(self, epoch: int) -> np.ndarray:
        return self.docs[np.random.default_rng([self.seed, epoch]).permutation(self.size)]


class BlendedOrder:
    """Weighted sources (Megatron prefixes) interleaved by exact document counts.

    An epoch has as many documents as the split; source i provides `counts[i]` of them, drawn in turn from its
    own endless stream (its documents shuffled anew each time it runs out), at positions shuffled per epoch.
    A source with more than its natural share repeats documents, one with less reaches all of its documents
    over several epochs. `blend_counts` turns token weights into these counts.
    """

    def __init__(self, groups: list[np.ndarray], counts: list[int], seed: int):
        self.groups, self.counts, self.seed, self.size = groups, counts, seed, sum(counts)
        self.identity = b"".join(g.tobytes() for g in groups) + np.asarray(counts, dtype=np.int64).tobytes()

    def epoch(self, epoch: int) -> np.ndarray:
        slots = np.random.default_rng([self.seed, epoch]).permutation(
            np.repeat(np.arange(len(self.groups)), self.counts))
        out = np.empty(self.size, dtype=np.int64)
        for i, (docs, count) in enumerate(zip(self.groups, self.counts)):
            draws = epoch * count + np.arange(count)  # how many documents this source gave before each one
            rounds, picks = draws // len(docs), np.empty(count, dtype=np.int64)
            for r in np.unique(rounds):
                perm = np.random.default_rng([self.seed, i, int(r)]).permutation(len(docs))
                picks[rounds == r] = docs[perm[draws[rounds == r] % len(docs)]]
            out[slots == i] = picks
        return out


def blend_counts(weights: list[float], doc_tokens: list[np.ndarray]) -> list[int]:
    """Documents per epoch from each source, so that each source's share of the tokens is its weight (up to
    document-length variation): count_i proportional to weight_i / mean tokens per document_i, summing to the
    split's document count (largest remainders), at least one each."""
    total = sum(len(t) for t in doc_tokens)
    shares = np.array([w / t.mean() for w, t in zip(weights, doc_tokens)])
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[:total - counts.sum()]] += 1
    return [max(1, int(c)) for c in counts]


@dataclass
class PackerState:
    """Where a split's stream stands; global, so it is valid for any data-parallel size."""

    epoch: int = 0
    index: int = 0  # position in the epoch's document order
    offset: int = 0  # tokens of the current document's layout already consumed
    metadata: bool = False  # layout for documents started from now on
    doc_metadata: bool = False  # layout of the current document; fixed once it has started


class PackedLoader:
    """One split's packed stream, sliced for one data-parallel rank.

    A metadata switch (`set_metadata`) takes effect at the next document start: a document
    already partly consumed keeps its layout, so rows stay contiguous and the switch point is
    part of the state (`doc_metadata`), which makes it deterministic and resumable.
    """

    def __init__(self, store: TokenStore, docs: np.ndarray, prefixes: MetadataPrefixes | None, *,
                 bos_id: int, eos_id: int, seq_len: int, seed: int, document_masking: bool,
                 dp_rank: int, dp_size: int, metadata: bool = False, order: BlendedOrder | None = None):
        self.store = store
        self.docs = docs
        self.order = order or ShuffledOrder(docs, seed)
        self.prefixes = prefixes
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._bos = np.array([bos_id], dtype=np.int64)
        self._eos = np.array([eos_id], dtype=np.int64)
        self._text_len = np.diff(store.offsets)
        self._orders: dict[int, np.ndarray] = {}
        self.fingerprint = hashlib.sha256(store.key.encode() + self.order.identity).hexdigest()[:16]
        self.state = PackerState()
        self.set_metadata(metadata)

    @property
    def num_tokens(self) -> int:
        """Tokens in one epoch of plain documents (with `<bos>` and `<eos>`)."""
        return int(self._text_len[self.docs].sum() + 2 * len(self.docs))

    # -- public API

    def set_metadata(self, enabled: bool) -> None:
        if enabled and self.prefixes is None:
            raise ValueError("metadata conditioning requested but data.meco.enabled is false")
        self.state.metadata = enabled
        if self.state.offset == 0:
            self.state.doc_metadata = enabled

    def next_batch(self, global_batch: int) -> Batch:
        return self._batch(self.state, global_batch)

    def iter_batches(self, n_batches: int, global_batch: int) -> Iterator[Batch]:
        """The first `n_batches` of the stream, with the current metadata flag; same data every call."""
        state = PackerState(metadata=self.state.metadata, doc_metadata=self.state.metadata)
        for _ in range(n_batches):
            yield self._batch(state, global_batch)

    def state_dict(self) -> dict:
        return {**dataclasses.asdict(self.state), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"data loader state is for a different dataset (fingerprint {state.get('fingerprint')}, "
                             f"this one {self.fingerprint}): inputs, tokenizer, val_fraction or MeCo skips changed")
        missing = [f.name for f in dataclasses.fields(PackerState) if f.name not in state]
        if missing:
            raise ValueError(f"data loader state lacks {missing}: {state}")
        restored = PackerState(**{f.name: state[f.name] for f in dataclasses.fields(PackerState)})
        if (restored.metadata or restored.doc_metadata) and self.prefixes is None:
            raise ValueError("data loader state has metadata on but data.meco.enabled is false")
        if not (0 <= restored.index < self.order.size and 0 <= restored.offset
                and restored.offset < self._layout_len(self._doc_at(restored), restored.doc_metadata)):
            raise ValueError(f"data loader state out of range: {state}")
        self.state = restored

    # -- stream walking

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = self.order.epoch(epoch)
        return self._orders[epoch]

    def _doc_at(self, state: PackerState) -> int:
        return int(self._order(state.epoch)[state.index])

    def _layout_len(self, doc: int, metadata: bool) -> int:
        prefix = int(self.prefixes.lengths[doc]) if metadata else 0
        return 2 + prefix + int(self._text_len[doc])

    def _walk(self, state: PackerState, n: int, pieces: list | None) -> None:
        """Advance `state` by `n` tokens, appending (doc, metadata, start, end) pieces if asked."""
        while n > 0:
            doc = self._doc_at(state)
            length = self._layout_len(doc, state.doc_metadata)
            step = min(n, length - state.offset)
            if pieces is not None:
                pieces.append((doc, state.doc_metadata, state.offset, state.offset + step))
            state.offset += step
            n -= step
            if state.offset == length:
                state.index += 1
                state.offset = 0
                state.doc_metadata = state.metadata
                if state.index == self.order.size:
                    state.epoch += 1
                    state.index = 0

    def _layout(self, doc: int, metadata: bool, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, end) of a document's layout and whether each may be a training target."""
        text = self.store.tokens[self.store.offsets[doc]:self.store.offsets[doc + 1]]
        prefix = self.prefixes.tokens(doc) if metadata else self._bos[:0]
        tokens, targets, base = [], [], 0
        for part, trainable in ((self._bos, False), (prefix, False), (text, True), (self._eos, True)):
            lo, hi = max(start, base), min(end, base + len(part))
            if lo < hi:
                tokens.append(np.asarray(part[lo - base:hi - base], dtype=np.int64))
                targets.append(np.full(hi - lo, trainable))
            base += len(part)
        return np.concatenate(tokens), np.concatenate(targets)

    def _row(self, state: PackerState) -> tuple[np.ndarray, ...]:
        pieces: list = []
        self._walk(state, self.seq_len, pieces)
        peek: list = []
        self._walk(copy.copy(state), 1, peek)  # the last input's label, not consumed: it starts the next row
        parts = [self._layout(*p) for p in pieces + peek]
        tokens = np.concatenate([t for t, _ in parts])
        targets = np.concatenate([m for _, m in parts])
        labels = np.where(targets[1:], tokens[1:], IGNORE_INDEX)
        if self.document_masking:
            lengths = [end - start for _, _, start, end in pieces]
            positions = np.concatenate([np.arange(n) for n in lengths])
            doc_ids = np.repeat(np.arange(len(lengths)), lengths)
        else:
            positions, doc_ids = np.arange(self.seq_len), np.zeros(self.seq_len, dtype=np.int64)
        return tokens[:-1], labels, positions, doc_ids

    def _batch(self, state: PackerState, global_batch: int) -> Batch:
        if global_batch % self.dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {self.dp_size}")
        local = global_batch // self.dp_size
        self._walk(state, self.dp_rank * local * self.seq_len, None)
        rows = [self._row(state) for _ in range(local)]
        self._walk(state, (self.dp_size - self.dp_rank - 1) * local * self.seq_len, None)
        return Batch(*(torch.from_numpy(np.stack(col).astype(np.int64)) for col in zip(*rows)))


# --------------------------------------------------------------------------- entry point


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: PackedLoader
    val: PackedLoader
    stats: DataStats


def _prepare(cfg: DataConfig, cache_dir: Path) -> tuple[Tokenizer, TokenStore]:
    if cfg.format == "megatron":
        tokenizer = build_tokenizer(cfg.tokenizer, (), "", cache_dir)  # a path or bytes (validated): never trained
        return tokenizer, load_megatron_store(parse_prefixes(cfg.megatron_prefixes)[0], tokenizer, cache_dir)
    files = resolve_files(cfg.paths)
    digest = files_digest(files)
    texts = (doc.text for doc in read_documents(files, DataStats()))  # consumed only if a BPE must be trained
    tokenizer = build_tokenizer(cfg.tokenizer, texts, digest, cache_dir)
    return tokenizer, load_store(files, digest, tokenizer, cfg.meco, cache_dir)


_MARKERS = ".prepare"  # under data.cache_dir: rank 0's "started", "done" and "failed" files for the other ranks
_MARKER_LIFETIME_S = 7 * 86400
_SHARED_GRACE_S = 60.0  # no "started" file by then: this rank does not share rank 0's cache directory


def _wait_for_rank0(markers: Path, run: str, timeout_s: float) -> bool:
    """Poll for rank 0's outcome of preparation run `run`: True when done; raises its error, or on timeout.
    False when its "started" file never appears (data.cache_dir is not shared): the caller prepares itself."""
    begin = last_report = time.monotonic()
    delay = 0.05
    while True:
        waited = time.monotonic() - begin
        if (markers / f"{run}.failed").is_file():
            raise RuntimeError(f"data preparation failed on rank 0: {(markers / f'{run}.failed').read_text()}")
        if (markers / f"{run}.done").is_file():
            return True
        if waited > _SHARED_GRACE_S and not (markers / f"{run}.started").is_file():
            logger.warning("data: rank 0 has not started preparing in %s after %.0fs: the cache directory is "
                           "not shared; preparing on this rank", markers.parent, waited)
            return False
        if waited > timeout_s:
            raise TimeoutError(f"data: rank 0 did not finish preparing the data within data.prepare_timeout_s="
                               f"{timeout_s:g}s (markers in {markers}); prepare it beforehand "
                               f"(`exatrain data prepare`) or raise the timeout")
        if time.monotonic() - last_report > PROGRESS_S:
            last_report = time.monotonic()
            logger.info("data: waiting for rank 0 to prepare the data (%.0fs of data.prepare_timeout_s=%gs)",
                        waited, timeout_s)
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _prepare_once(cfg: DataConfig, cache_dir: Path) -> tuple[Tokenizer, TokenStore]:
    """Under torch.distributed, rank 0 builds the caches and the others then read them.

    Tokenizing a real corpus takes longer than any collective timeout (parallel.timeout_s), so the other ranks
    do not wait inside a collective: one quick broadcast names this preparation, then they poll for rank 0's
    "done" or "failed" file under data.cache_dir, logging progress, bounded by data.prepare_timeout_s.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _prepare(cfg, cache_dir)
    run = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(run, src=0)
    markers = cache_dir / _MARKERS
    if dist.get_rank() != 0:
        _wait_for_rank0(markers, run[0], cfg.prepare_timeout_s)
        return _prepare(cfg, cache_dir)
    markers.mkdir(parents=True, exist_ok=True)
    for old in markers.iterdir():
        if time.time() - old.stat().st_mtime > _MARKER_LIFETIME_S:
            old.unlink(missing_ok=True)
    (markers / f"{run[0]}.started").touch()
    try:
        prepared = _prepare(cfg, cache_dir)
    except Exception as exc:  # re-raised after telling the other ranks
        write_atomic(markers / f"{run[0]}.failed", f"{type(exc).__name__}: {exc}")
        raise
    write_atomic(markers / f"{run[0]}.done", "")
    return prepared


def _blend(store: TokenStore, docs: np.ndarray, weights: list[float], seed: int,
           split: str | None = None) -> BlendedOrder:
    """The weighted order over a split's documents of each prefix; a prefix with none is an error for `split`
    (training), else left out of the blend (a small prefix may have no validation document)."""
    groups = [docs[store.doc_file[docs] == i] for i in range(len(weights))]
    if split is not None:
        for prefix, group in zip(store.files, groups):
            if not len(group):
                raise ValueError(f"data.megatron_prefixes: {prefix} has no {split} documents")
    used = [i for i, g in enumerate(groups) if len(g)]
    layout_len = np.diff(store.offsets) + 2  # <bos> text <eos>
    lengths = [layout_len[groups[i]] for i in used]
    return BlendedOrder([groups[i] for i in used], blend_counts([weights[i] for i in used], lengths), seed)


def build_data(cfg: JobConfig, dp_rank: int, dp_size: int, cache_dir: Path | str | None = None) -> DataBundle:
    """Tokenizer, train and validation loaders for data-parallel rank `dp_rank` of `dp_size`; caches go to
    `cache_dir` (default data.cache_dir)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    d = cfg.data
    cache_dir = Path(cache_dir if cache_dir is not None else d.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, store = _prepare_once(d, cache_dir)
    stats = store.stats
    train_docs, val_docs = split_documents(store.hashes, d.val_fraction)
    prefixes = None
    if d.meco.enabled:
        prefixes = build_prefixes(tokenizer, d.meco, store.meta_values, store.meta_index, store.origin, stats)
        keep = prefixes.index >= 0
        train_docs, val_docs = train_docs[keep[train_docs]], val_docs[keep[val_docs]]
        if not len(train_docs) or not len(val_docs):
            raise ValueError(f"data.meco.missing=skip left {len(train_docs)} train and {len(val_docs)} validation "
                             f"documents with '{d.meco.field}' metadata")
    common = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, seq_len=d.seq_len, seed=d.shuffle_seed,
                  document_masking=d.document_masking, dp_rank=dp_rank, dp_size=dp_size)
    weights = parse_prefixes(d.megatron_prefixes)[1] if d.format == "megatron" else None
    train_order = val_order = None
    if weights:
        train_order = _blend(store, train_docs, weights, d.shuffle_seed, "training")
        val_order = _blend(store, val_docs, weights, d.shuffle_seed)
    train = PackedLoader(store, train_docs, prefixes, metadata=d.meco.enabled, order=train_order, **common)
    val = PackedLoader(store, val_docs, prefixes, order=val_order, **common)
    stats.train_documents, stats.train_tokens = len(train_docs), train.num_tokens
    stats.val_documents, stats.val_tokens = len(val_docs), val.num_tokens
    logger.info("%s", stats.report())
    eval_tokens = cfg.train.eval_batches * cfg.train.global_batch * d.seq_len
    if eval_tokens > val.num_tokens:
        logger.warning("data: an evaluation reads %d tokens but the validation split has %d; it wraps around "
                       "(raise data.val_fraction for a larger split)", eval_tokens, val.num_tokens)
    return DataBundle(tokenizer, train, val, stats)
