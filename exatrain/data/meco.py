"""MeCo, the data side (DESIGN.md §5): metadata prefixes, their loss mask, and the schedule.

With metadata on, a document is laid out as `<bos> template.format(value=v) text <eos>`
and the targets `<bos>` and every prefix token are masked (-100): the model learns the text
conditioned on the metadata but is never trained to produce it. For `field: url`, `v` is by
default what the MeCo code writes (`datatools/mds_pack_data.py --use_short_url`:
`re.sub(r'https?://', '', url).split('/')[0]`, so `www.`, case, port and credentials stay);
`url_value: host` normalises it instead (lower-cased host without `www.`, port or credentials:
www.gnu.org and gnu.org become one site). Any other field is used verbatim (e.g. a `topic` column).

The prefix is tokenized on its own, separately from the text, so the text's tokens are the
same with and without metadata: switching to the cooldown needs no re-tokenization, and the
distinct prefixes (one per site or topic) are tokenized once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from exatrain.config import MecoConfig
from exatrain.data.documents import DataStats
from exatrain.data.tokenizer import Tokenizer

logger = logging.getLogger("exatrain.data")


def meco_url(url: str) -> str | None:
    """The MeCo code's short URL: every 'http://' / 'https://' removed, then the text before the first '/'.
    None when that is empty (MeCo would write an empty value)."""
    return re.sub(r"https?://", "", url).split("/")[0] or None


def url_domain(url: str) -> str | None:
    """'https://www.Example.org:8080/a?b' -> 'example.org'; a bare 'example.org/x' works too."""
    url = url.strip()
    try:
        host = urlsplit(url if "://" in url else f"//{url}").hostname
    except ValueError:
        return None
    if not host or any(c.isspace() for c in host):
        return None
    return host.removeprefix("www.") or None


def metadata_value(cfg: MecoConfig, raw: str | None) -> str | None:
    """The value that goes into the template, or None when the document has none."""
    if raw is None:
        return None
    if cfg.field == "url":
        return meco_url(raw) if cfg.url_value == "meco" else url_domain(raw)
    return raw.strip() or None


@dataclass
class MetadataPrefixes:
    """Prefix token ids per distinct value, and which prefix each stored document uses."""

    table: list[np.ndarray]
    index: np.ndarray  # int32, one per stored document; -1 = document skipped (no metadata)

    def __post_init__(self) -> None:
        lengths = np.array([len(t) for t in self.table] + [0], dtype=np.int64)
        self.lengths = lengths[self.index]  # -1 picks the trailing 0

    def tokens(self, doc: int) -> np.ndarray:
        return self.table[self.index[doc]]


def build_prefixes(tokenizer: Tokenizer, cfg: MecoConfig, values: list[str], value_index: np.ndarray,
                   origin: Callable[[int], str], stats: DataStats) -> MetadataPrefixes:
    """Apply `cfg.missing` to documents without a value (`value_index` -1) and tokenize the prefixes.

    `values` are the distinct `metadata_value`s of the corpus, `value_index` each document's entry.
    """
    index = value_index.astype(np.int32, copy=True)
    missing = np.flatnonzero(index < 0)
    values = list(values)
    if len(missing) and cfg.missing == "error":
        raise ValueError(f"{origin(int(missing[0]))}: document has no usable '{cfg.field}' metadata "
                         f"({len(missing)} such documents; set data.meco.missing to 'fallback' or 'skip')")
    if len(missing) == len(index) and cfg.missing == "fallback":
        raise ValueError(f"data.meco.field={cfg.field!r}: none of the {len(index)} documents has a usable value "
                         f"(first: {origin(int(missing[0]))}), so every one would get the fallback "
                         f"{cfg.fallback!r} and MeCo would condition on a constant; add the field to the data.paths "
                         f"documents, pick another data.meco.field, or set data.meco.enabled=false")
    if len(missing) and cfg.missing == "fallback":
        if cfg.fallback not in values:
            values.append(cfg.fallback)
        index[missing] = values.index(cfg.fallback)
        stats.meco_fallback += len(missing)
    elif len(missing):
        stats.meco_skipped += len(missing)
    texts = [cfg.template.format(value=v) for v in values]
    table = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    logger.info("meco: %d distinct '%s' values, prefixes of %s tokens", len(values), cfg.field,
                f"{min(map(len, table))}-{max(map(len, table))}" if table else "0")
    return MetadataPrefixes(table, index)


def metadata_prompt(tokenizer: Tokenizer, cfg: MecoConfig, text: str, value: str | None) -> list[int]:
    """Prompt ids as in training: `<bos>`, the prefix for `value` (real or made up) unless None, the text.

    For `field: url`, `value` may be a URL or a bare domain; it goes through `cfg.url_value` as in training.
    """
    ids = [tokenizer.bos_id]
    if value is not None:
        resolved = metadata_value(cfg, value)
        if resolved is None:
            raise ValueError(f"cannot derive a '{cfg.field}' metadata value from {value!r}")
        ids += tokenizer.encode(cfg.template.format(value=resolved))
    return ids + tokenizer.encode(text)
