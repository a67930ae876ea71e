"""Launch planning without a cluster: profiles, dry-run scripts, sweeps, snapshots, failure-log parsing."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from exatrain.cli import main
from exatrain.config import ConfigError, LaunchConfig, load_config, parse_config
from exatrain.launch import snapshot
from exatrain.launch.slurm import load_profile, make_plan, parse_long_options, profile_names
from exatrain.launch.submit import prepare, srun_task_errors
from exatrain.launch.sweep import config_keys, expand, parse_axes, resolve_key

REPO = Path(__file__).resolve().parent.parent


def dry_run(capsys, *args: str) -> str:
    assert main(["launch", "--dry-run", *args]) == 0
    return capsys.readouterr().out


def sbatch_flags(script: str) -> set[str]:
    return {line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")}


def srun_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("srun "))


def test_profiles_load():
    assert {"frontier", "nvidia", "local"} <= set(profile_names())
    for name in profile_names():
        assert load_profile(name).description


def test_frontier_dry_run(capsys, tmp_path):
    out = dry_run(capsys, "--cluster", "frontier", "--account", "ABC123", "--nodes", "2", "--time", "120",
                  "tiny.yaml", f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", "train.global_batch=64",
                  "train.micro_batch=4")
    flags = sbatch_flags(out)
    assert {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=7", "--account=ABC123",
            "--partition=batch", "--time=120", "--signal=USR2@90", "--requeue", "--job-name=tiny",
            "--network=disable_rdzv_get"} <= flags
    srun = srun_line(out)
    assert "--gpu-bind=closest" in srun and "--gpus-per-task=1" in srun and "--kill-on-bad-exit=1" in srun
    assert "--cpus-per-task=7" in srun, "srun does not inherit sbatch's --cpus-per-task (Slurm 22.05-23.02)"
    for line in ("module load rocm/6.2.4", "module load rccl-net-plugin",
                 'export NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"', 'export NCCL_NET_GDR_LEVEL="3"',
                 'export FI_CXI_DEFAULT_CQ_SIZE="131072"', 'export FI_CXI_RDZV_PROTO="alt_read"',
                 'export HSA_FORCE_FINE_GRAIN_PCIE="1"', 'export NCCL_NET="OFI"',
                 'export MIOPEN_USER_DB_PATH="${MIOPEN_USER_DB_PATH:-/tmp/miopen-$USER-$SLURM_JOB_ID}"',
                 'export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-$USER-$SLURM_JOB_ID}"'):
        assert line in out
    assert "/lustre/orion/world-shared" not in out, "no hard-coded path to someone's plugin build"
    assert "16 ranks" in out and f"{tmp_path}/run/logs/%j_0_log.out" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_local_dry_run_with_sweep(capsys, tmp_path):
    out = dry_run(capsys, "--cluster", "local", "--nodes", "2", "tiny.yaml", f"run_dir={tmp_path}/sw", "train.micro_batch=4",
                  "--sweep", "optim.lr=1e-4,3e-4", "seed=1,2,3")
    flags = sbatch_flags(out)
    assert {"--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--partition=debug", "--array=0-5%6"} <= flags
    assert not any(f.startswith("--gpus") for f in flags)
    assert 'export OMP_NUM_THREADS="1"' in out
    assert f"[5] {tmp_path}/sw/5  optim.lr=3e-4 train.seed=3" in out
    assert f"--output {tmp_path}/sw/logs/%A_%a_%t_log.out" in srun_line(out)


@pytest.mark.parametrize("cluster, sweep", [("frontier", []), ("local", ["--sweep", "seed=1,2,3"]),
                                            ("nvidia", [])])
def test_rendered_script_is_what_submitit_submits(tmp_path, cluster, sweep):
    """The dry-run renderer is exatrain's own; submitit's (private) renderer is only the oracle here."""
    slurm = pytest.importorskip("submitit.slurm.slurm")
    if not hasattr(slurm, "_make_sbatch_string"):
        pytest.skip("this submitit has no _make_sbatch_string to compare with")
    cfg = parse_config("tiny.yaml", [f"run_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache",
                                      "launch.sbatch_extra=[--mem=0,--exclusive]",
                                      "launch.srun_extra=[--cpu-bind=cores]", f"launch.cluster={cluster}",
                                      "launch.nodes=2", "train.micro_batch=1", "train.global_batch=16"])
    plan = prepare(cfg, sweep[1:])
    n = len(plan.runs) if plan.is_array else None
    command = f"{plan.python} -u -m submitit.core._submit {shlex.quote(str(plan.folder))}"
    expected = slurm._make_sbatch_string(command=command,
                                         folder=plan.folder, map_count=n, **plan.slurm.executor_parameters())
    assert plan.sbatch_script() == expected


def test_flags_and_extras_reach_the_script(capsys, tmp_path):
    out = dry_run(capsys, "--cluster", "local", "--qos", "debug", "--constraint", "nvme", "--signal", "300",
                  "--sbatch-extra=--exclusive", "--sbatch-extra=--mem=0", "tiny.yaml", f"run_dir={tmp_path}",
                  "launch.srun_extra=[--cpu-bind=cores]")
    assert {"--qos=debug", "--constraint=nvme", "--signal=USR2@300", "--exclusive", "--mem=0"} <= sbatch_flags(out)
    assert "--cpu-bind=cores" in srun_line(out)


@pytest.mark.parametrize("launch, message", [
    (LaunchConfig(cluster="frontier", tasks_per_node=16), "a frontier node has 8 GPUs"),
    (LaunchConfig(cluster="nowhere"), "no cluster profile 'nowhere'"),
    (LaunchConfig(sbatch_extra=["-N 2"]), "not a long option"),
    (LaunchConfig(time_min=1, signal_s=90), "stop signal must come within the time limit"),
    (LaunchConfig(nodes=0), "launch.nodes"),
])
def test_plan_errors(launch, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(launch, "x")


def test_layout_is_checked_against_the_job_size(tmp_path):
    cfg = load_config("tiny.yaml", [f"run_dir={tmp_path}", "launch.nodes=3", "parallel.tp=4"])
    with pytest.raises(ConfigError, match="the job has 6 ranks"):
        prepare(cfg)


def test_long_options():
    assert parse_long_options(["--exclusive", "--mem=0", "--gres=gpu:8"], "x") == \
        {"exclusive": True, "mem": "0", "gres": "gpu:8"}


def test_sweep_expansion():
    axes = parse_axes(["optim.lr=1e-4,3e-4", "seed=1,2,3", "optim.betas=[0.9,0.95],[0.9,0.99]"])
    assert axes[1] == ("train.seed", ["1", "2", "3"])
    points = expand(axes)
    assert len(points) == 12
    assert points[0] == ["optim.lr=1e-4", "train.seed=1", "optim.betas=[0.9,0.95]"]
    assert points[-1] == ["optim.lr=3e-4", "train.seed=3", "optim.betas=[0.9,0.99]"]
    assert expand([]) == [[]]


def test_sweep_key_errors():
    assert resolve_key("tokenizer.kind") == "data.tokenizer.kind"
    with pytest.raises(ConfigError, match="ambiguous: model.vocab_size, data.tokenizer.vocab_size"):
        resolve_key("vocab_size")
    with pytest.raises(ConfigError, match="matches no config key"):
        parse_axes(["nosuch=1,2"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_axes(["seed=1", "train.seed=2"])
    with pytest.raises(ConfigError, match="expected key=value1,value2"):
        parse_axes(["optim.lr"])
    with pytest.raises(ConfigError, match="launch.. cannot vary"):
        prepare(load_config("tiny.yaml"), ["launch.nodes=1,2"])


def test_train_and_optim_keys_sweep_by_their_short_name():
    """Sections added later (eigenscore, precision, ...) must not make `seed=1,2,3` or `lr=...` ambiguous."""
    keys = [k for k in config_keys() if k.split(".")[0] in ("train", "optim")]
    assert "train.seed" in keys and "optim.lr" in keys
    assert all(resolve_key(k.rsplit(".", 1)[1]) == k for k in keys)


def test_frontier_sbatch_environment_matches_the_profile():
    """slurm/frontier-env.sh (for plain sbatch users) and frontier.yaml (for exatrain launch) agree."""
    profile = load_profile("frontier")
    text = (REPO / "slurm" / "frontier-env.sh").read_text()
    exported = dict(re.findall(r'^export (\w+)="(.*)"$', text, re.M))
    assert exported == profile.env
    multinode = {f'if [ "${{SLURM_NNODES:-1}}" -gt 1 ]; then export {k}="{v}"; fi'
                 for k, v in profile.multinode_env.items()}
    script_lines = {line for line in text.splitlines() if line and not line.startswith(("#", "export"))}
    assert script_lines == {line for line in profile.setup if not line.startswith("export")} | multinode


def test_sweep_points_get_their_own_run_dirs(tmp_path):
    plan = prepare(load_config("tiny.yaml", [f"run_dir={tmp_path}"]), ["optim.lr=1e-3,2e-3"])
    assert [r.run_dir for r in plan.runs] == [tmp_path / "0", tmp_path / "1"]
    assert [r.cfg.optim.lr for r in plan.runs] == [1e-3, 2e-3]
    assert plan.runs[1].cfg.run_dir == str(tmp_path / "1")


def test_snapshot(tmp_path):
    cfg = load_config("tiny.yaml", [f"run_dir={tmp_path}"])
    snapshot.write_snapshot(tmp_path, cfg)
    snapshot.record_submission(tmp_path, {"job_id": "7"})
    assert "run_dir: " + str(tmp_path) in (tmp_path / "launch" / "config.yaml").read_text()
    code = json.loads((tmp_path / "launch" / "code.json").read_text())
    assert code["package_version"]
    if "git" in code:
        assert set(code["git"]) == {"commit", "describe", "dirty", "changed", "untracked"}
    assert json.loads((tmp_path / "launch" / "jobs.jsonl").read_text())["job_id"] == "7"


def test_srun_task_errors_name_the_first_failing_rank():
    log = ("exatrain: rank 0/4 on node1, job 7, restart 0\n"
           "srun: error: node2: task 3: Killed\n"
           "slurmstepd-node1: error: *** STEP 7.0 ON node1 CANCELLED AT 2026-01-01T00:00:00 ***\n"
           "srun: error: node1: tasks 0-1: Terminated\n"
           "srun: error: node2: task 2: Exited with exit code 1\n")
    assert srun_task_errors(log) == [(3, "node2", "Killed"), (0, "node1", "Terminated"), (1, "node1", "Terminated"),
                                     (2, "node2", "Exited with exit code 1")]
