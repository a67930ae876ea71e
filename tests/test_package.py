"""exatrain as users install it: a wheel in a fresh virtual environment, run from another directory.

The wheel must carry the configs, the embedded corpus and its tokenizer, so `exatrain train` and
`exatrain launch --dry-run` work with no checkout around. The fresh venv borrows the third-party
dependencies of the test environment through a .pth line (no downloads: CI and this machine may be
offline), but not its exatrain, which must come from the wheel.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                str(REPO)], tmp)
    assert "project.license" not in out and "SetuptoolsDeprecationWarning" not in out, out
    wheel = next((tmp / "dist").glob("exatrain-*.whl"))
    _run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    venv_python = tmp / "venv" / "bin" / "python"
    venv_site = Path(_run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          tmp).strip())
    (venv_site / "borrowed_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(venv_python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(EXATRAIN_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    return tmp, env


@pytest.mark.slow
def test_wheel_installs_and_trains_from_anywhere(installed):
    tmp, env = installed
    work = tmp / "elsewhere"
    work.mkdir()
    where = _run([str(tmp / "venv" / "bin" / "python"), "-c", "import exatrain; print(exatrain.__file__)"], work, env)
    assert str(tmp / "venv") in where, f"exatrain came from {where}, not the installed wheel"
    overrides = [o for o in TINY if not o.startswith("train.steps")] + ["train.steps=3", "run_dir=run"]
    out = _run([str(tmp / "venv" / "bin" / "exatrain"), "train", *overrides], work, env)
    assert "completed: step 3" in out
    assert (work / "run" / "checkpoints" / "step_00000003" / "meta.json").is_file()


@pytest.mark.slow
def test_wheel_launch_dry_run_uses_the_shipped_profiles(installed):
    tmp, env = installed
    out = _run([str(tmp / "venv" / "bin" / "exatrain"), "launch", "--cluster", "frontier", "--nodes", "2",
                "--account", "ABC123", "--dry-run", "22b-frontier.yaml"], tmp, env)
    assert "#SBATCH --ntasks-per-node=8" in out and "module load rocm" in out
