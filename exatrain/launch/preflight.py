"""Checks at submission that would otherwise fail a real run only after its queue wait.

- ROCm: the `module load rocm/X.Y.Z` a cluster profile's setup runs must match the HIP version this torch
  was built for (torch.version.hip); a mismatch loads a different HIP runtime, RCCL plugin and MIOpen than
  torch expects. Refused at submission; the job checks again on its node (`warn_rocm_mismatch`).
- Storage: on a profile with `home_quota_gb` (Frontier's $HOME is 50 GB; a 22B checkpoint with Adam is
  ~264 GB), run_dir and data.cache_dir under $HOME are refused, compiler caches (Triton, MIOpen, inductor)
  there are warned about. Every cache is configurable: data.cache_dir / $EXATRAIN_CACHE, and the profile's
  `${VAR:-default}` entries take TRITON_CACHE_DIR, MIOPEN_USER_DB_PATH, ... from the submitting shell.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from exatrain.config import ConfigError, JobConfig
from exatrain.launch.slurm import ClusterProfile

log = logging.getLogger("exatrain.launch")

CACHE_VARS = ("TRITON_CACHE_DIR", "MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
# Where each tool caches when its variable is unset.
CACHE_DEFAULTS = {"TRITON_CACHE_DIR": "~/.triton/cache", "MIOPEN_USER_DB_PATH": "~/.config/miopen",
                  "MIOPEN_CUSTOM_CACHE_DIR": "~/.cache/miopen"}


def rocm_module_version(setup: list[str]) -> str:
    """X.Y.Z of the first `module load ... rocm/X.Y.Z` line ('' if the setup loads no ROCm module)."""
    for line in setup:
        m = re.search(r"\bmodule\s+load\b.*?\brocm/(\d+\.\d+(?:\.\d+)?)", line)
        if m:
            return m.group(1)
    return ""


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_rocm(profile: ClusterProfile, torch_hip: str | None) -> None:
    """Refuse a profile whose ROCm module differs (major.minor) from the torch build's HIP version."""
    module = rocm_module_version(profile.setup)
    if not module:
        return
    if not torch_hip:
        print(f"exatrain: warning: cluster profile {profile.name} loads rocm/{module}, but this Python's torch is "
              "not a ROCm build, so the match is checked only on the compute node", file=sys.stderr)
        return
    if major_minor(module) != major_minor(torch_hip):
        raise ConfigError(f"cluster profile {profile.name}: its setup loads rocm/{module} but torch "
                          f"{_torch_version()} was built for HIP {torch_hip}; load the matching module "
                          f"(rocm/{major_minor(torch_hip)}.x) in the profile's setup, or install the torch "
                          f"wheel for ROCm {major_minor(module)}")


def warn_rocm_mismatch(torch_hip: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """On the node: the loaded ROCm ($ROCM_PATH/.info/version) against torch's HIP; returns the warning, if any."""
    root = environ.get("ROCM_PATH", "")
    if not torch_hip or not root:
        return ""
    try:
        loaded = (Path(root) / ".info" / "version").read_text().strip()
    except OSError:
        return ""
    if major_minor(loaded) == major_minor(torch_hip):
        return ""
    msg = (f"exatrain: WARNING: ROCm {loaded} is loaded ({root}) but torch was built for HIP {torch_hip}: "
           "expect RCCL/MIOpen failures or slow fallbacks; load the matching rocm module")
    print("!" * 80, msg, "!" * 80, sep="\n", file=sys.stderr, flush=True)
    return msg


def _torch_version() -> str:
    import torch

    return torch.__version__


def expand(value: str, environ: Mapping[str, str]) -> str:
    """Shell-style `${VAR:-default}`, `${VAR}` and `$VAR` against `environ`; unknown variables stay as written."""
    value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: environ.get(m.group(1)) or m.group(2), value)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: environ.get(m.group(1) or m.group(2), m.group(0)), value)


def under_home(path: str, home: Path) -> bool:
    p = home / path[2:] if path.startswith("~/") else Path(path)
    try:
        return Path(os.path.abspath(p)).resolve().is_relative_to(home.resolve())
    except OSError:
        return False


def check_storage(cfg: JobConfig, profile: ClusterProfile, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Refuse run_dir / data.cache_dir under $HOME on a profile with a home quota; return warnings for caches."""
    if not profile.home_quota_gb or not environ.get("HOME"):
        return []
    home = Path(environ["HOME"])
    quota = f"$HOME ({home}), which has a {profile.home_quota_gb} GB quota on {profile.name}"
    for key, path in (("run_dir", cfg.run_dir), ("data.cache_dir", cfg.data.cache_dir)):
        if under_home(path, home):
            hint = "set EXATRAIN_CACHE or data.cache_dir" if key == "data.cache_dir" else "set run_dir"
            raise ConfigError(f"{key}: {path} is under {quota}; checkpoints and token caches do not fit there "
                              f"(a 22B checkpoint with Adam is ~264 GB): {hint} to a path on the project file "
                              "system (Frontier: /lustre/orion/<PROJID>/scratch/$USER/...)")
    warnings = []
    for var in CACHE_VARS:
        value = expand(environ.get(var) or profile.env.get(var, "") or CACHE_DEFAULTS.get(var, ""), environ)
        if value and under_home(value, home):
            warnings.append(f"{var}={value} is under {quota}; export {var} (or set it in the profile's env) "
                            "to node-local /tmp or the project file system")
    for w in warnings:
        print(f"exatrain: warning: {w}", file=sys.stderr)
    return warnings
