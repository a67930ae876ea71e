"""Megatron/NeMo indexed datasets (`PREFIX.bin` + `PREFIX.idx`, DESIGN.md §13), read and written without
megatron-core.

`.idx` layout (little-endian): the 9-byte header `MMIDIDX\\0\\0`, version u64 = 1, dtype code u8, sequence
count S u64, document-index count D u64, then int32 sequence lengths [S], int64 byte pointers into `.bin`
[S], int64 document indices [D] (sequence numbers where documents start, from 0, ending with S). `.bin`
holds the sequences' tokens back to back. A document is one or more consecutive sequences; exatrain
trains on documents, so it reads the document boundaries, not the sequences.

Megatron files carry no vocabulary, so the tokenizer is checked two ways: `exatrain data prepare` writes
`PREFIX.exatrain.json` with the tokenizer's digest, which must match the job's tokenizer exactly; for a
file made elsewhere the largest token id (scanned once, cached in data.cache_dir) must be below the
tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exatrain.config import JobConfig
from exatrain.errors import ConfigError
from exatrain.files import write_atomic
from exatrain.registry import config_validator

logger = logging.getLogger("exatrain.data")

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
_FIXED = len(HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document-index count
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
SIDECAR = ".exatrain.json"
_SCAN_CHUNK = 1 << 26  # tokens per max-id scan step


def token_dtype(vocab_size: int) -> type[np.integer]:
    """Megatron's choice: uint16 below 65,500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


# --------------------------------------------------------------------------- reading


@dataclass
class IndexedDataset:
    """One prefix, memory-mapped: tokens (the whole .bin) and each document's token offsets."""

    prefix: str
    tokens: np.ndarray  # memmap of .bin
    offsets: np.ndarray  # int64 (n_docs + 1,): document i is tokens[offsets[i]:offsets[i + 1]]
    digest: str  # of the .idx bytes plus the .bin size: identifies the files without reading the .bin

    @property
    def sidecar(self) -> Path:
        return Path(self.prefix + SIDECAR)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def read_index(prefix: str) -> IndexedDataset:
    """Open `prefix`.idx/.bin; any missing file, bad header, version or dtype, or a .bin of the wrong size is
    a ValueError/FileNotFoundError naming the file."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise FileNotFoundError(f"Megatron dataset file not found: {path}")
    raw = np.memmap(idx, dtype=np.uint8, mode="r") if idx.stat().st_size else np.zeros(0, np.uint8)
    if len(raw) < _FIXED or bytes(raw[:len(HEADER)]) != HEADER:
        raise ValueError(f"{idx}: not a Megatron index (expected the header {HEADER!r})")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", bytes(raw[len(HEADER):_FIXED]))
    if version != VERSION:
        raise ValueError(f"{idx}: index version {version}, only version {VERSION} is supported")
    if code not in DTYPES or not np.issubdtype(DTYPES[code], np.integer):
        name = np.dtype(DTYPES[code]).name if code in DTYPES else "unknown"
        raise ValueError(f"{idx}: token dtype code {code} ({name}) is not an integer token type")
    dtype = np.dtype(DTYPES[code])
    expected = _FIXED + 12 * n_seq + 8 * n_doc
    if len(raw) != expected:
        multimodal = " (a multimodal index with sequence modes is not supported)" if len(raw) == expected + n_seq else ""
        raise ValueError(f"{idx}: {len(raw)} bytes, expected {expected} for {n_seq} sequences and "
                         f"{n_doc} document indices{multimodal}: truncated or not a Megatron index")
    lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=_FIXED)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=_FIXED + 4 * n_seq)
    doc_index = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=_FIXED + 12 * n_seq)
    starts = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if (lengths < 0).any() or not np.array_equal(pointers, starts[:-1] * dtype.itemsize):
        raise ValueError(f"{idx}: sequence pointers are not the running sum of the sequence lengths")
    if n_doc < 1 or doc_index[0] != 0 or doc_index[-1] != n_seq or (np.diff(doc_index) < 0).any():
        raise ValueError(f"{idx}: document indices must rise from 0 to the sequence count {n_seq}")
    size = bin_.stat().st_size
    if size != int(starts[-1]) * dtype.itemsize:
        raise ValueError(f"{bin_}: {size} bytes, but {idx} describes {int(starts[-1])} {dtype.name} tokens "
                         f"({int(starts[-1]) * dtype.itemsize} bytes): truncated or from another index")
    tokens = np.memmap(bin_, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    digest = hashlib.sha256(raw)
    digest.update(str(size).encode())
    return IndexedDataset(prefix, tokens, starts[doc_index], digest.hexdigest())


def parse_prefixes(entries: list[str]) -> tuple[list[str], list[float] | None]:
    """`data.megatron_prefixes` entries, "PREFIX" or "WEIGHT PREFIX" (Megatron's --data-path pairs):
    (prefixes, weights or None). Weights are all given or none, and positive."""
    prefixes, weights = [], []
    for entry in entries:
        parts = entry.split()
        if len(parts) == 2:
            try:
                weights.append(float(parts[0]))
            except ValueError:
                raise ConfigError(f"data.megatron_prefixes: {entry!r}: expected 'PREFIX' or 'WEIGHT PREFIX'") from None
        elif len(parts) != 1:
            raise ConfigError(f"data.megatron_prefixes: {entry!r}: expected 'PREFIX' or 'WEIGHT PREFIX'")
        prefixes.append(str(Path(parts[-1]).expanduser()))
    if weights and len(weights) != len(prefixes):
        raise ConfigError("data.megatron_prefixes: give a weight for every prefix or for none")
    if any(not w > 0 for w in weights):
        raise ConfigError(f"data.megatron_prefixes: weights must be positive, got {weights}")
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"data.megatron_prefixes: a prefix is listed twice: {prefixes}")
    return prefixes, weights or None


def read_sidecar(prefix: str) -> dict | None:
    path = Path(prefix + SIDECAR)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        valid = isinstance(info["tokenizer"]["digest"], str) and isinstance(info["max_token_id"], int)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ValueError(f"{path}: not an exatrain sidecar (needs tokenizer.digest and max_token_id); delete it "
                         f"to treat {prefix} as data made elsewhere")
    return info


def max_token_id(ds: IndexedDataset, cache_dir: Path, info: dict[str, Any] | None) -> int:
    """Largest token id in the .bin: from its sidecar `info`, else a chunked scan cached under `cache_dir`."""
    if info is not None:
        return int(info["max_token_id"])
    cached = cache_dir / f"megatron-maxid-{ds.digest[:16]}.json"
    if cached.is_file():
        return int(json.loads(cached.read_text())["max_token_id"])
    logger.info("data: scanning %s.bin for its largest token id (no %s sidecar)", ds.prefix, SIDECAR)
    top, bottom = -1, 0
    for start in range(0, len(ds.tokens), _SCAN_CHUNK):
        chunk = ds.tokens[start:start + _SCAN_CHUNK]
        top, bottom = max(top, int(chunk.max())), min(bottom, int(chunk.min()))
    if bottom < 0:
        raise ValueError(f"{ds.prefix}.bin holds negative token ids ({bottom})")
    write_atomic(cached, json.dumps({"prefix": ds.prefix, "max_token_id": top}))
    return top


def check_tokenizer(ds: IndexedDataset, digest: str, vocab_size: int, cache_dir: Path) -> None:
    """The tokenizer identity check (see the module docstring); raises ValueError naming the files."""
    info = read_sidecar(ds.prefix)
    if info is not None and info["tokenizer"]["digest"] != digest:
        made = info["tokenizer"]
        raise ValueError(f"{ds.sidecar}: {ds.prefix} was tokenized with tokenizer {made['digest'][:12]} (vocab "
                         f"{made['vocab_size']}, {made.get('source', '?')}), but data.tokenizer is {digest[:12]} "
                         f"(vocab {vocab_size}): set data.tokenizer.path to the tokenizer the data was made with")
    top = max_token_id(ds, cache_dir, info)
    if top >= vocab_size:
        raise ValueError(f"{ds.prefix}.bin holds token id {top}, outside data.tokenizer's vocabulary of "
                         f"{vocab_size}: the data was made with another tokenizer (set data.tokenizer.path)")


# --------------------------------------------------------------------------- writing


class IndexedDatasetWriter:
    """Writes `prefix`.bin/.idx one document at a time; both appear (by rename) only at `finalize`."""

    def __init__(self, prefix: str | Path, dtype: type[np.integer]):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES or not np.issubdtype(self.dtype, np.integer):
            raise ValueError(f"unsupported token dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f"{self.prefix}.{os.getpid()}.tmp"
        self._bin = open(self._tmp + ".bin", "wb")
        self.lengths: list[int] = []
        self.max_token_id = -1

    def add_document(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if len(ids):
            self.max_token_id = max(self.max_token_id, int(ids.max()))
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(len(ids))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._tmp + ".idx", "wb") as f:
            f.write(HEADER + struct.pack("<QBQQ", VERSION, CODES[self.dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for suffix in (".bin", ".idx"):
            Path(self._tmp + suffix).unlink(missing_ok=True)


def write_sidecar(prefix: str, info: dict) -> None:
    write_atomic(Path(prefix + SIDECAR), json.dumps(info, indent=1))


# --------------------------------------------------------------------------- config


@config_validator
def validate_megatron(cfg: JobConfig) -> None:
    """data.format=megatron: prefixes given, readable and consistent; the text-only options off."""
    d = cfg.data
    if d.format != "megatron":
        if d.megatron_prefixes:
            raise ConfigError("data.megatron_prefixes: set, but data.format is "
                              f"{d.format!r} (use data.format=megatron)")
        return
    if not d.megatron_prefixes:
        raise ConfigError("data.megatron_prefixes: data.format=megatron needs at least one PREFIX "
                          "(PREFIX.bin and PREFIX.idx)")
    if d.paths:
        raise ConfigError("data.paths: text inputs are not read with data.format=megatron; "
                          "tokenize them with `exatrain data prepare` or clear data.paths")
    if d.meco.enabled:
        raise ConfigError("data.meco.enabled: Megatron datasets carry no document metadata")
    if d.tokenizer.kind == "bpe" and not d.tokenizer.path:
        raise ConfigError("data.tokenizer.path: data.format=megatron needs the tokenizer the data was made with "
                          "(a BPE cannot be trained on token files), or data.tokenizer.kind=byte")
    prefixes, _ = parse_prefixes(d.megatron_prefixes)
    for prefix in prefixes:
        try:
            read_index(prefix)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.megatron_prefixes: {exc}") from None
