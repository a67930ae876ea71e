"""Submission-time guards for real hardware (exatrain.launch.preflight) and the profile's Slurm flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from exatrain.config import ConfigError, LaunchConfig, load_config
from exatrain.launch.preflight import (check_rocm, check_storage, expand, rocm_module_version,
                                       warn_rocm_mismatch)
from exatrain.launch.slurm import ClusterProfile, load_profile, make_plan


def test_rocm_module_must_match_torch_hip(capsys):
    frontier = load_profile("frontier")
    assert rocm_module_version(frontier.setup) == "6.2.4"
    check_rocm(frontier, "6.2.41133-dd7f95766")  # same major.minor: accepted
    with pytest.raises(ConfigError, match=r"rocm/6.2.4 but torch .* HIP 6.4.43482"):
        check_rocm(frontier, "6.4.43482-0f2d60242")
    check_rocm(frontier, None)
    assert "not a ROCm build" in capsys.readouterr().err
    check_rocm(load_profile("nvidia"), "6.4.1")  # no ROCm module: nothing to check


def test_node_warns_loudly_on_a_loaded_rocm_mismatch(tmp_path, capsys):
    (tmp_path / ".info").mkdir()
    (tmp_path / ".info" / "version").write_text("6.3.1-48\n")
    assert "ROCm 6.3.1-48 is loaded" in warn_rocm_mismatch("6.2.41133-dd7f95766", {"ROCM_PATH": str(tmp_path)})
    assert "!!!!" in capsys.readouterr().err
    assert warn_rocm_mismatch("6.3.42131", {"ROCM_PATH": str(tmp_path)}) == ""
    assert warn_rocm_mismatch(None, {"ROCM_PATH": str(tmp_path)}) == ""


def test_expand_shell_defaults():
    env = {"USER": "ann", "TRITON_CACHE_DIR": "/lustre/t"}
    assert expand("${TRITON_CACHE_DIR:-/tmp/x}", env) == "/lustre/t"
    assert expand("${MIOPEN_USER_DB_PATH:-/tmp/miopen-$USER-$SLURM_JOB_ID}", env) == "/tmp/miopen-ann-$SLURM_JOB_ID"


def test_home_storage_is_refused_on_frontier(tmp_path):
    home = tmp_path / "home"
    scratch = tmp_path / "lustre"
    frontier = load_profile("frontier")
    ok = load_config("tiny.yaml", [f"run_dir={scratch}/run", f"data.cache_dir={scratch}/cache"])
    env = {"HOME": str(home), "USER": "ann"}
    assert check_storage(ok, frontier, env) == []
    for key in ("run_dir", "data.cache_dir"):
        bad = load_config("tiny.yaml", [f"run_dir={scratch}/run", f"data.cache_dir={scratch}/cache",
                                        f"{key}={home}/x"])
        with pytest.raises(ConfigError, match=rf"{key}: .* under \$HOME .* 50 GB quota on frontier"):
            check_storage(bad, frontier, env)
    warned = check_storage(ok, frontier, {**env, "TRITON_CACHE_DIR": f"{home}/.triton"})
    assert len(warned) == 1 and warned[0].startswith("TRITON_CACHE_DIR=")
    # A profile that sets no Triton cache leaves Triton's default, ~/.triton/cache: warned.
    bare = ClusterProfile(name="bare", home_quota_gb=50)
    assert [w.split("=")[0] for w in check_storage(ok, bare, env)] == ["TRITON_CACHE_DIR", "MIOPEN_USER_DB_PATH",
                                                                       "MIOPEN_CUSTOM_CACHE_DIR"]
    local = load_config("tiny.yaml", [f"run_dir={home}/run"])
    assert check_storage(local, load_profile("local"), env) == [], "only profiles with a home quota check"


def test_srun_cpus_and_multinode_env():
    one = make_plan(LaunchConfig(cluster="frontier", nodes=1), "j")
    two = make_plan(LaunchConfig(cluster="frontier", nodes=2), "j")
    assert "--cpus-per-task=7" in one.srun and one.sbatch["network"] == "disable_rdzv_get"
    assert 'export NCCL_NET="OFI"' in two.setup and 'export NCCL_NET="OFI"' not in one.setup
    assert "--cpus-per-task=8" in make_plan(LaunchConfig(cluster="nvidia"), "j").srun
    assert "--cpus-per-task=3" in make_plan(LaunchConfig(cluster="nvidia", cpus_per_task=3), "j").srun


def test_recipes_fit_the_two_hour_bin():
    for name in ("22b-frontier.yaml", "175b-frontier.yaml", "1t-frontier.yaml"):
        cfg = load_config(name, ["run_dir=/tmp/x"])
        la = cfg.launch
        assert la.time_min <= 120 and la.stop_margin >= 1 and la.save_s > 0
        assert la.signal_s >= 300, "the fallback signal leaves room for a minutes-long step and a save"
        assert Path(cfg.run_dir).is_absolute()
