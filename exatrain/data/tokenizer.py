"""Byte-level tokenizers on top of the `tokenizers` library, trained locally, never downloaded.

Two kinds: `bpe` (byte-level BPE trained on the job's documents) and `byte` (the 256 bytes,
no merges). Both put the special tokens `<bos>`, `<eos>`, `<pad>` at ids 0, 1, 2 and never
produce them from text: a document that contains the string "<eos>" is encoded as bytes.

A trained BPE tokenizer is identified by a key over the training data's digest and the
settings. It is looked up in the package's corpus directory (the shipped tokenizer for the
default corpus), then in the cache directory, and trained and cached there on a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from exatrain.config import ConfigError, JobConfig, TokenizerConfig
from exatrain.files import write_atomic
from exatrain.registry import config_resolver

logger = logging.getLogger("exatrain.data")

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
SHIPPED_DIR = Path(__file__).resolve().parent / "corpus"
_TRAINER_VERSION = 1  # bump when training settings change, so cached tokenizers are not reused


class Tokenizer:
    """The few operations training and evaluation need; specials are never added implicitly."""

    def __init__(self, backend: HFTokenizer):
        backend.encode_special_tokens = True  # "<bos>" inside a document is text, not a control token
        ids = {tok: backend.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; exatrain needs {list(SPECIAL_TOKENS)}")
        self._backend = backend
        self.bos_id: int = ids["<bos>"]
        self.eos_id: int = ids["<eos>"]
        self.pad_id: int = ids["<pad>"]
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.digest = hashlib.sha256(backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Atomic: a reader never sees a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self._backend.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception for any bad file
            raise ValueError(f"{path} is not a tokenizer.json of the `tokenizers` library: {exc}") from None
        try:
            return cls(backend)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


MAX_PIECE_CHARS = 1 << 20  # a longer text is encoded in pieces of about this size
_BATCH_CHARS = 1 << 22  # characters per encode_batch call


def split_text(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Consecutive pieces of at most `max_chars` characters, cut where a byte-level pre-tokenizer splits anyway
    (a space between two non-space characters), so their encodings concatenate to the whole text's; a run of
    `max_chars` without such a space is cut hard."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str], dtype: type[np.integer],
                 batch_chars: int = _BATCH_CHARS, piece_chars: int = MAX_PIECE_CHARS) -> Iterator[np.ndarray]:
    """Each text's ids as an array, in order. Texts are encoded in batches of about `batch_chars` characters and
    long ones in pieces (`split_text`), so memory follows the batch, not the longest document (a 50 MB line
    encoded whole takes gigabytes of tokenizer bookkeeping)."""
    pending: deque[list] = deque()  # [pieces not yet encoded, encoded arrays] per text not yet yielded
    batch: list[str] = []
    owners: list[list] = []
    chars = 0

    def run() -> None:
        for entry, ids in zip(owners, tokenizer.encode_batch(batch)):
            entry[0] -= 1
            entry[1].append(np.asarray(ids, dtype=dtype))
        batch.clear()
        owners.clear()

    def finished() -> Iterator[np.ndarray]:
        while pending and pending[0][0] == 0:
            arrays = pending.popleft()[1]
            yield arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    for text in texts:
        pieces = split_text(text, piece_chars)
        entry = [len(pieces), []]
        pending.append(entry)
        for piece in pieces:
            batch.append(piece)
            owners.append(entry)
            chars += len(piece)
            if chars >= batch_chars:
                run()
                chars = 0
                yield from finished()
    run()
    yield from finished()


def _byte_level(model: models.Model) -> HFTokenizer:
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_symbols() -> list[str]:
    """The byte-level pre-tokenizer's symbol for each byte value 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points 256+.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def byte_tokenizer() -> Tokenizer:
    """Specials at 0..2, then byte value b at id b + 3."""
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + _byte_symbols())}
    backend = _byte_level(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Deterministic for the same texts in the same order (checked by the tests)."""
    backend = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)


def tokenizer_filename(cfg: TokenizerConfig, data_digest: str) -> str:
    settings = {"kind": cfg.kind, "vocab_size": cfg.vocab_size, "data": data_digest, "version": _TRAINER_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"tokenizer-{cfg.kind}{cfg.vocab_size}-{key}.json"


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], data_digest: str, cache_dir: Path) -> Tokenizer:
    """Explicit path, else byte-level, else shipped or cached BPE, else train and cache.

    `texts` is only consumed when training; `data_digest` identifies them.
    """
    if cfg.path:
        logger.info("tokenizer: loading %s", cfg.path)
        return Tokenizer.load(cfg.path)
    if cfg.kind == "byte":
        return byte_tokenizer()
    name = tokenizer_filename(cfg, data_digest)
    for directory in (SHIPPED_DIR, cache_dir):
        if (directory / name).is_file():
            logger.info("tokenizer: loading %s", directory / name)
            return Tokenizer.load(directory / name)
    start = time.perf_counter()
    tokenizer = train_bpe(texts, cfg.vocab_size)
    tokenizer.save(cache_dir / name)
    logger.info("tokenizer: trained BPE (vocab %d) in %.1fs -> %s",
                tokenizer.vocab_size, time.perf_counter() - start, cache_dir / name)
    return tokenizer


def ship_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, data_digest: str, directory: Path = SHIPPED_DIR) -> Path:
    """Train the tokenizer for a corpus and store it where `build_tokenizer` finds it first."""
    path = directory / tokenizer_filename(cfg, data_digest)
    for stale in directory.glob(f"tokenizer-{cfg.kind}{cfg.vocab_size}-*.json"):
        stale.unlink()
    train_bpe(texts, cfg.vocab_size).save(path)
    return path


def configured_vocab_size(cfg: TokenizerConfig) -> int:
    """The vocabulary a job's tokenizer will have, known without reading the corpus: the file's size for
    `path`, 256 bytes + specials for `byte`, the requested size for `bpe` (a BPE trained on a small corpus
    may come out smaller; its unused ids just never occur)."""
    if cfg.path:
        try:
            return Tokenizer.load(cfg.path).vocab_size
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception on bad JSON
            raise ConfigError(f"data.tokenizer.path: cannot load {cfg.path}: {exc}") from None
    if cfg.kind == "byte":
        return 256 + len(SPECIAL_TOKENS)
    return cfg.vocab_size


@config_resolver
def resolve_vocab_size(cfg: JobConfig) -> None:
    """model.vocab_size 0 means the tokenizer's; either is padded up to model.vocab_multiple_of."""
    m = cfg.model
    vocab = m.vocab_size or configured_vocab_size(cfg.data.tokenizer)
    if m.vocab_multiple_of > 0:
        vocab = -(-vocab // m.vocab_multiple_of) * m.vocab_multiple_of
    m.vocab_size = vocab
