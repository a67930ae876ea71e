"""Run metadata written readable by its owner only: a run directory often sits on a shared file system,
and its config, code diff and job records are nobody else's business."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def write_atomic(path: Path | str, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename: a reader sees the old file or the new
    one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_private(path: Path | str, text: str, append: bool = False, sync: bool = False) -> None:
    """Write (or append) `text` to `path` with mode 0600, also when the file already existed wider;
    `sync` flushes it to disk before returning (a file an atomic rename is about to publish)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_MODE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, PRIVATE_MODE)
        f.write(text)
        if sync:
            f.flush()
            os.fsync(fd)
