"""Reading documents from JSONL and plain-text files, with bad records counted, not hidden.

Formats (optionally gzip-compressed, by a `.gz` suffix):
- `*.jsonl`: one JSON object per line with a string `text`; other scalar fields (`url`,
  `topic`, ...) are kept as metadata for MeCo. Blank lines are ignored.
- `*.txt` (and `*.md`): the whole file is one document. Blank lines separate paragraphs
  inside real documents, so they are not a safe document separator; use JSONL for many
  small documents. Plain-text documents have no metadata.
A directory stands for every supported file below it, in sorted order. No paths means the
embedded default corpus.

A record is bad when its line is not UTF-8, not valid JSON, not an object, lacks `text`,
has a non-string `text`, or its text is empty/whitespace. Bad records are skipped and
counted per reason in `DataStats`; a file whose records are all bad is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("exatrain.data")

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "default.jsonl.gz"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".md.gz")


@dataclass
class Document:
    text: str
    meta: dict[str, str]
    path: Path
    line: int

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class DataStats:
    """What was read and what was dropped; `report()` is printed at startup."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    first_bad: dict[str, str] = field(default_factory=dict)  # reason -> origin of its first occurrence
    train_documents: int = 0
    train_tokens: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    meco_fallback: int = 0
    meco_skipped: int = 0

    def count_bad(self, reason: str, origin: str) -> None:
        self.bad[reason] += 1
        self.first_bad.setdefault(reason, origin)

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "chars": self.chars,
                "bad": dict(self.bad), "first_bad": self.first_bad}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        return cls(files=d["files"], documents=d["documents"], chars=d["chars"],
                   bad=Counter(d["bad"]), first_bad=d["first_bad"])

    def report(self) -> str:
        chars = f" ({self.chars / 1e6:.2f} M chars)" if self.chars else ""  # token files have no characters
        lines = [f"data: {self.documents:,} documents{chars} from {self.files} file(s)"]
        if self.bad:
            lines.append(f"  skipped {sum(self.bad.values()):,} bad records:")
            lines += [f"    {reason}: {n:,} (first at {self.first_bad[reason]})" for reason, n in sorted(self.bad.items())]
        if self.train_documents:
            lines.append(f"  train: {self.train_documents:,} documents, {self.train_tokens:,} tokens; "
                         f"val: {self.val_documents:,} documents, {self.val_tokens:,} tokens")
        if self.meco_fallback:
            lines.append(f"  meco: {self.meco_fallback:,} documents without metadata use the fallback value")
        if self.meco_skipped:
            lines.append(f"  meco: {self.meco_skipped:,} documents without metadata skipped")
        return "\n".join(lines)


def resolve_files(paths: list[str]) -> list[Path]:
    """Expand directories; empty -> the embedded corpus. Missing or unsupported paths raise."""
    if not paths:
        return [EMBEDDED_CORPUS]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"data path {path} is a directory without *.jsonl[.gz] or *.txt[.gz] files")
            files += found
        elif path.is_file():
            if not path.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
                raise ValueError(f"data path {path}: unsupported file type; expected "
                                 f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"data path not found: {path}")
    return files


def files_digest(files: list[Path]) -> str:
    """Content hash of the inputs: caches follow the bytes, not names or timestamps."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _utf8(text: str) -> bool:
    """JSON escapes can smuggle lone surrogates into a str; those cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_jsonl_line(raw: bytes, path: Path, line: int, stats: DataStats, text_key: str) -> Document | None:
    origin = f"{path}:{line}"
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.count_bad("invalid_utf8", origin)
        return None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError:
        stats.count_bad("invalid_json", origin)
        return None
    if not isinstance(record, dict):
        stats.count_bad("not_an_object", origin)
        return None
    if text_key not in record:
        stats.count_bad("missing_text", origin)
        return None
    text = record[text_key]
    if not isinstance(text, str):
        stats.count_bad("text_not_string", origin)
        return None
    if not text.strip():
        stats.count_bad("empty_text", origin)
        return None
    if not _utf8(text):
        stats.count_bad("invalid_utf8", origin)
        return None
    meta = {k: str(v) for k, v in record.items()
            if k != text_key and isinstance(v, (str, int, float, bool)) and _utf8(str(v))}
    return Document(text, meta, path, line)


def _read_file(path: Path, stats: DataStats, text_key: str) -> Iterator[Document]:
    if path.name.endswith(TEXT_SUFFIXES):
        with _open(path) as f:
            data = f.read()
        doc = _parse_text(data, path, stats)
        if doc is not None:
            yield doc
        return
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            if raw.strip():
                doc = _parse_jsonl_line(raw, path, lineno, stats, text_key)
                if doc is not None:
                    yield doc


def _parse_text(data: bytes, path: Path, stats: DataStats) -> Document | None:
    origin = f"{path}:1"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.count_bad("invalid_utf8", origin)
        return None
    if not text.strip():
        stats.count_bad("empty_text", origin)
        return None
    return Document(text, {}, path, 1)


def read_documents(files: list[Path], stats: DataStats, text_key: str = "text") -> Iterator[Document]:
    """Stream documents from `files` (JSONL text under `text_key`), counting into `stats`; raises on unreadable
    or all-bad files."""
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        stats.files += 1
        bad_before = Counter(stats.bad)
        kept = 0
        try:
            for doc in _read_file(path, stats, text_key):
                kept += 1
                stats.documents += 1
                stats.chars += len(doc.text)
                yield doc
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: cannot read ({exc})") from exc
        bad = stats.bad - bad_before
        if kept == 0:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(bad.items())) or "the file is empty"
            raise ValueError(f"{path}: no usable documents ({reasons})")
        if bad:
            logger.warning("%s: skipped %d bad record(s); see the data report", path, bad.total())


def load_documents(paths: list[str]) -> tuple[list[Document], DataStats]:
    """Read everything into memory (convenience for tools and tests)."""
    stats = DataStats()
    docs = list(read_documents(resolve_files(paths), stats))
    return docs, stats
