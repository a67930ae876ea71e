"""What code and config a run was submitted with, written into its run directory before submission.

run_dir/launch/config.yaml   the resolved config the job receives
run_dir/launch/code.json     package version, git commit/describe, dirty flag and changed paths
run_dir/launch/code.diff     `git diff HEAD` when the tree is dirty (untracked files are listed, not copied)
run_dir/launch/jobs.jsonl    one line per submission: job id, cluster, shape, log folder
"""

from __future__ import annotations

import datetime
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from exatrain.config import JobConfig, to_yaml
from exatrain.files import write_private

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """Package version always; git details when exatrain runs from a checkout (not an installed wheel)."""
    try:
        version = metadata.version("exatrain")
    except metadata.PackageNotFoundError:
        version = "unknown"
    info: dict[str, Any] = {"package_version": version}
    if _git("rev-parse", "--is-inside-work-tree") is None:
        return info
    status = _git("status", "--porcelain") or ""
    commit = _git("rev-parse", "HEAD")
    info["git"] = {
        "commit": commit.strip() if commit else None,  # None: a repository without commits yet
        "describe": (_git("describe", "--always", "--dirty", "--tags") or "").strip() or None,
        "dirty": bool(status.strip()),
        "changed": [line[3:] for line in status.splitlines() if not line.startswith("??")],
        "untracked": [line[3:] for line in status.splitlines() if line.startswith("??")],
    }
    return info


def write_snapshot(run_dir: Path, cfg: JobConfig) -> None:
    d = run_dir / "launch"
    d.mkdir(parents=True, exist_ok=True)
    write_private(d / "config.yaml", to_yaml(cfg))
    version = code_version()
    write_private(d / "code.json", json.dumps(version, indent=2) + "\n")
    diff = _git("diff", "HEAD", "--binary") if version.get("git", {}).get("commit") else None
    if diff:
        write_private(d / "code.diff", diff)
    else:
        (d / "code.diff").unlink(missing_ok=True)


def record_submission(run_dir: Path, entry: dict[str, Any]) -> None:
    entry = {"submitted": datetime.datetime.now().isoformat(timespec="seconds"), **entry}
    write_private(run_dir / "launch" / "jobs.jsonl", json.dumps(entry) + "\n", append=True)
