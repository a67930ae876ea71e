"""Builder for the embedded default corpus (`exatrain/data/corpus/default.jsonl.gz`).

The default job must train on real English without network access, so the corpus is
gathered from text that ships with a Debian + CPython machine: the Python language
reference and standard-library docstrings, free-software licenses, PyPI package
descriptions, Debian package documentation, Debian changelogs and manual pages. The
sources differ in style and each record carries a realistic origin URL, which is what
MeCo's URL conditioning needs. The artifact is committed; this module regenerates it:

    python -m exatrain.data.corpus --out exatrain/data/corpus/default.jsonl.gz --tokenizer

Selection is deterministic for a given machine: candidates are cleaned, filtered for
prose, deduplicated, taken in hash-of-URL order up to a per-source character budget,
split at paragraph boundaries into documents of at most `MAX_DOC_CHARS`, and written
sorted by (source, url, part) with a fixed gzip timestamp.
"""

from __future__ import annotations

import argparse
import ast
import email
import gzip
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from exatrain.config import TokenizerConfig
from exatrain.data.documents import files_digest
from exatrain.data.tokenizer import ship_tokenizer

logger = logging.getLogger("exatrain.data")

MAX_DOC_CHARS = 8000
MIN_DOC_CHARS = 300
DEBIAN_RELEASE = "bookworm"
MAN_PAGES_PER_PACKAGE = 3

Item = tuple[str, Callable[[], str]]  # (url, text loader): loading is deferred until selected


@dataclass(frozen=True)
class Source:
    name: str
    budget_chars: int  # total characters taken from this source
    item_chars: int  # characters kept from any one item (page, file, package)
    collect: Callable[[], Iterator[Item]]


# --------------------------------------------------------------------------- cleaning


def clean_text(text: str) -> str:
    """Normalise newlines and whitespace runs; keep paragraph structure."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def is_prose(text: str) -> bool:
    """Mostly letters and spaces: rejects tables, code dumps and binary-ish files."""
    if len(text) < MIN_DOC_CHARS:
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) >= 0.75 and len(text.split()) >= 50


def split_paragraphs(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Greedy paragraph packing into chunks of at most `max_chars` (long paragraphs are cut at lines)."""
    pieces: list[str] = []
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        pieces.append(para)
    chunks: list[str] = []
    current = ""
    for para in pieces:
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def _read_maybe_gz(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="strict")


# --------------------------------------------------------------------------- sources


def python_reference() -> Iterator[Item]:
    """The language reference and tutorial snippets that `help('topic')` shows."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"https://docs.python.org/3/reference/{key}.html", lambda key=key: topics[key]


_SKIP_MODULES = {"this", "antigravity", "idlelib", "turtledemo", "test", "lib2to3", "ensurepip",
                 "pydoc_data", "encodings", "tkinter"}


def _module_files() -> Iterator[tuple[str, Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        if (stdlib / f"{name}.py").is_file():
            yield name, stdlib / f"{name}.py"
        elif (stdlib / name / "__init__.py").is_file():
            for path in sorted((stdlib / name).rglob("*.py")):
                rel = path.relative_to(stdlib).with_suffix("").parts
                if any(p.startswith("_") and p != "__init__" for p in rel) or "tests" in rel:
                    continue
                yield ".".join(rel[:-1] if rel[-1] == "__init__" else rel), path


def _docstring_page(name: str, tree: ast.Module) -> str:
    """Render a module like pydoc does: module docstring, then public classes/functions."""
    parts = [name, ast.get_docstring(tree) or ""]

    def add(node: ast.AST, prefix: str) -> None:
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if not doc:
            return
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            head = f"class {prefix}{node.name}" + (f"({bases})" if bases else "")
        else:
            head = f"{prefix}{node.name}({ast.unparse(node.args)})"
        parts.append(head + "\n" + "\n".join("    " + line if line else "" for line in doc.split("\n")))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            add(node, "")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                        add(sub, f"{node.name}.")
    return "\n\n".join(p for p in parts if p)


def python_library() -> Iterator[Item]:
    """Standard-library docstrings, parsed with `ast` (nothing is imported or executed)."""
    def load(name: str, path: Path) -> str:
        try:
            return _docstring_page(name, ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            return ""

    for name, path in _module_files():
        yield f"https://docs.python.org/3/library/{name.lower()}.html", lambda n=name, p=path: load(n, p)


_LICENSE_URLS = {
    "Apache-2.0": "https://www.apache.org/licenses/LICENSE-2.0.txt",
    "Artistic": "https://dev.perl.org/licenses/artistic.html",
    "BSD": "https://opensource.org/license/bsd-3-clause",
    "CC0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/legalcode",
    "GFDL-1.2": "https://www.gnu.org/licenses/old-licenses/fdl-1.2.txt",
    "GFDL-1.3": "https://www.gnu.org/licenses/fdl-1.3.txt",
    "GPL-1": "https://www.gnu.org/licenses/old-licenses/gpl-1.0.txt",
    "GPL-2": "https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt",
    "GPL-3": "https://www.gnu.org/licenses/gpl-3.0.txt",
    "LGPL-2": "https://www.gnu.org/licenses/old-licenses/lgpl-2.0.txt",
    "LGPL-2.1": "https://www.gnu.org/licenses/old-licenses/lgpl-2.1.txt",
    "LGPL-3": "https://www.gnu.org/licenses/lgpl-3.0.txt",
    "MPL-1.1": "https://www.mozilla.org/en-US/MPL/1.1/",
    "MPL-2.0": "https://www.mozilla.org/en-US/MPL/2.0/",
}


def licenses() -> Iterator[Item]:
    """Debian's common licenses; symlinked aliases (GPL -> GPL-3) are skipped."""
    root = Path("/usr/share/common-licenses")
    for path in sorted(root.glob("*")) if root.is_dir() else []:
        if path.is_file() and not path.is_symlink():
            url = _LICENSE_URLS.get(path.name, f"https://spdx.org/licenses/{path.name}.html")
            yield url, lambda p=path: p.read_text(encoding="utf-8", errors="replace")


def _site_packages() -> list[Path]:
    dirs = [Path(p) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths(vars={"base": sys.base_prefix})["purelib"]}]
    return sorted(d for d in dirs if d.is_dir()) + [Path("/usr/lib/python3/dist-packages")]


def pypi_descriptions() -> Iterator[Item]:
    """Long descriptions (README shown on PyPI) from installed distributions' METADATA."""
    seen: set[str] = set()
    for site in _site_packages():
        for meta in sorted(site.glob("*.dist-info/METADATA")):
            msg = email.message_from_bytes(meta.read_bytes())
            name = msg.get("Name")
            if not name:
                continue
            norm = re.sub(r"[-_.]+", "-", name).lower()
            body = msg.get_payload() if not msg.is_multipart() else ""
            body = body if isinstance(body, str) and body.strip() else msg.get("Description", "")
            if norm in seen or not body:
                continue
            seen.add(norm)
            yield f"https://pypi.org/project/{norm}/", lambda b=body: b


def _dpkg_sources() -> dict[str, tuple[str, str]]:
    """Binary package -> (source package, source version) from the dpkg database."""
    status = Path("/var/lib/dpkg/status")
    out: dict[str, tuple[str, str]] = {}
    if not status.is_file():
        return out
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, flags=re.M))
        if "Package" not in fields:
            continue
        version = fields.get("Version", "0")
        source = fields.get("Source", fields["Package"])
        if m := re.match(r"(\S+) \((.+)\)", source):
            source, version = m.group(1), m.group(2)
        out[fields["Package"]] = (source, version.split(":")[-1])
    return out


_DOC_NAME = re.compile(r"^(README|NEWS|FAQ|TODO|HACKING|USAGE)|\.(md|txt|rst|markdown)(\.gz)?$")


def debian_docs() -> Iterator[Item]:
    """Upstream and Debian READMEs, NEWS and FAQs under /usr/share/doc."""
    sources = _dpkg_sources()
    root = Path("/usr/share/doc")
    for pkg_dir in sorted(root.iterdir()) if root.is_dir() else []:
        source, version = sources.get(pkg_dir.name, (pkg_dir.name, "latest"))
        for path in sorted(pkg_dir.rglob("*")):
            rel = path.relative_to(pkg_dir)
            if not path.is_file() or path.is_symlink() or "examples" in rel.parts or not _DOC_NAME.search(path.name):
                continue
            name = str(rel)[:-3] if path.suffix == ".gz" else str(rel)
            yield f"https://sources.debian.org/src/{source}/{version}/{name}", lambda p=path: _read_maybe_gz(p)


def debian_changelogs() -> Iterator[Item]:
    """Debian packaging changelogs, in the URL layout of metadata.ftp-master.debian.org."""
    sources = _dpkg_sources()
    root = Path("/usr/share/doc")
    for path in sorted(root.glob("*/changelog.Debian.gz")) if root.is_dir() else []:
        source, version = sources.get(path.parent.name, (path.parent.name, "latest"))
        prefix = source[:4] if source.startswith("lib") else source[0]
        yield f"https://metadata.ftp-master.debian.org/changelogs/main/{prefix}/{source}/{source}_{version}_changelog", lambda p=path: _read_maybe_gz(p)


def _man_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for listing in sorted(Path("/var/lib/dpkg/info").glob("*.list")):
        pkg = listing.stem.split(":")[0]
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("/usr/share/man/man"):
                owners[line] = pkg
    return owners


def _render_man(groff: str, path: Path) -> str:
    roff = gzip.decompress(path.read_bytes())
    if roff.lstrip().startswith(b".so "):  # an alias page that only includes another one
        return ""
    # No hyphenation (.nh), left-adjusted, very long lines: paragraphs come out unwrapped.
    rendered = subprocess.run([groff, "-man", "-Tutf8", "-P-cbou", "-rLL=2000n", "-dAD=l", "-k"],
                              input=b".nh\n" + roff, capture_output=True, check=False).stdout
    text = rendered.decode("utf-8", errors="replace").strip("\n")
    body = textwrap.dedent(text[text.find("\n") + 1: text.rfind("\n")])  # drop running header and footer
    return re.sub(r"(?<=\S)  +", " ", body)


def man_pages() -> Iterator[Item]:
    """English manual pages rendered to plain text with groff (skipped if groff is missing)."""
    groff = shutil.which("groff")
    if groff is None:
        logger.warning("groff not found: skipping manual pages")
        return
    owners = _man_owners()
    by_package: dict[str, list[Path]] = {}
    for section in ("1", "5", "7", "8"):
        for path in Path(f"/usr/share/man/man{section}").glob("*.gz"):
            if not path.is_symlink():
                by_package.setdefault(owners.get(str(path), "man-db"), []).append(path)
    for pkg, paths in sorted(by_package.items()):
        # A few pages per package, so that CLIs with thousands of subcommand pages do not dominate.
        for path in sorted(paths, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())[:MAN_PAGES_PER_PACKAGE]:
            url = f"https://manpages.debian.org/{DEBIAN_RELEASE}/{pkg}/{path.name[:-3]}.en.html"
            yield url, lambda p=path: _render_man(groff, p)


SOURCES = (
    Source("python-reference", 600_000, 40_000, python_reference),
    Source("python-library", 700_000, 16_000, python_library),
    Source("licenses", 300_000, 60_000, licenses),
    Source("pypi", 700_000, 16_000, pypi_descriptions),
    Source("debian-docs", 500_000, 16_000, debian_docs),
    Source("debian-changelogs", 300_000, 3_000, debian_changelogs),
    Source("manpages", 500_000, 12_000, man_pages),
)


# --------------------------------------------------------------------------- build


def _url_order(item: Item) -> str:
    return hashlib.sha1(item[0].encode()).hexdigest()


def collect_source(source: Source, seen: set[str]) -> list[dict[str, str]]:
    """Clean, filter and budget one source; `seen` holds chunk hashes for cross-source dedup."""
    records: list[dict[str, str]] = []
    used = 0
    for url, load in sorted(source.collect(), key=_url_order):
        try:
            text = _truncate(clean_text(load()), source.item_chars)
        except (UnicodeDecodeError, OSError, EOFError):
            continue
        if not is_prose(text):
            continue
        chunks = [c for c in split_paragraphs(text) if len(c) >= MIN_DOC_CHARS]
        for chunk in chunks:
            digest = hashlib.sha1(chunk.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            records.append({"text": chunk, "url": url, "source": source.name})
            used += len(chunk)
        if used >= source.budget_chars:
            break
    logger.info("%s: %d documents, %.2f MB", source.name, len(records), used / 1e6)
    return records


def build_corpus(sources: tuple[Source, ...] = SOURCES) -> list[dict[str, str]]:
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    for source in sources:
        # A stable sort: the chunks of one URL keep their reading order.
        records.extend(sorted(collect_source(source, seen), key=lambda r: r["url"]))
    return records


def write_corpus(records: list[dict[str, str]], out: Path) -> None:
    """Reproducible bytes: sorted records, compact JSON, gzip with mtime 0; atomic rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl.gz path")
    parser.add_argument("--tokenizer", action="store_true",
                        help="also train the default BPE tokenizer for it and ship it next to --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = build_corpus()
    write_corpus(records, args.out)
    chars = sum(len(r["text"]) for r in records)
    logger.info("wrote %s: %d documents, %.2f MB text, %.2f MB compressed",
                args.out, len(records), chars / 1e6, args.out.stat().st_size / 1e6)
    if args.tokenizer:
        config = TokenizerConfig()
        texts = (r["text"] for r in records)  # the same texts, in the same order, as reading the file back
        path = ship_tokenizer(texts, config, files_digest([args.out]), args.out.parent)
        logger.info("wrote %s (vocab %d)", path, config.vocab_size)


if __name__ == "__main__":
    main()
