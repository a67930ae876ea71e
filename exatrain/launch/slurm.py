"""Cluster profiles and the Slurm plan: what `sbatch` and `srun` get for a job on a given cluster.

A profile (exatrain/configs/clusters/<name>.yaml) holds what is true of a machine: tasks (= GPUs) per
node, cores per task, srun binding flags, modules and environment. LaunchConfig holds what is true of a
job: nodes, time, account. `make_plan` merges them (job wins where set) into submitit's Slurm
parameters; `render_sbatch` renders the batch script submitit submits for them, for --dry-run (its
layout follows submitit's; tests/test_launch.py compares the two so they cannot drift apart).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from exatrain.config import CONFIG_DIR, ConfigError, LaunchConfig, load_yaml_mapping

PROFILE_DIR = CONFIG_DIR / "clusters"


@dataclass
class ClusterProfile:
    """One cluster's defaults; see exatrain/configs/clusters/*.yaml."""

    name: str = ""
    description: str = ""
    tasks_per_node: int = 1  # one rank per GPU (per GCD on MI250X); CPU clusters: ranks per node
    gpus_per_node: int = 0  # GPUs a node has; > 0 requests one GPU per task
    cpus_per_task: int = 1
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    sbatch: list[str] = field(default_factory=list)  # long sbatch options, "--exclusive", "--mem=0"
    srun: list[str] = field(default_factory=list)  # srun options, "--gpu-bind=closest"
    setup: list[str] = field(default_factory=list)  # batch-script lines before srun: modules, venv
    env: dict[str, str] = field(default_factory=dict)  # exported before srun; may use $SLURM_* variables
    multinode_env: dict[str, str] = field(default_factory=dict)  # exported too when the job has > 1 node
    home_quota_gb: int = 0  # > 0: run_dir and caches must not be under $HOME (exatrain.launch.preflight)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> ClusterProfile:
    """A profile by name (exatrain/configs/clusters/NAME.yaml) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"launch.cluster: no cluster profile {name!r} (known: {', '.join(profile_names())}; "
                          f"or give a path to a YAML file)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClusterProfile), load_yaml_mapping(path))
        profile: ClusterProfile = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cluster profile {path}: {exc}") from None
    profile.name = profile.name or path.stem
    return profile


def parse_long_options(options: list[str], what: str) -> dict[str, Any]:
    """["--mem=0", "--exclusive"] -> {"mem": "0", "exclusive": True} (submitit's additional_parameters)."""
    out: dict[str, Any] = {}
    for opt in options:
        m = re.fullmatch(r"--([A-Za-z][\w-]*)(?:=(.*))?", opt.strip())
        if not m:
            raise ConfigError(f"{what}: {opt!r} is not a long option like --name or --name=value")
        out[m.group(1).replace("-", "_")] = True if m.group(2) is None else m.group(2)
    return out


@dataclass
class SlurmPlan:
    """Everything submitit needs for one job (or job array) on one cluster."""

    cluster: str
    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    time_min: int
    signal_s: int
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    sbatch: dict[str, Any] = field(default_factory=dict)
    srun: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def executor_parameters(self) -> dict[str, Any]:
        """Keyword arguments of submitit.SlurmExecutor.update_parameters (its native names)."""
        params: dict[str, Any] = {
            "job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "time": self.time_min, "signal_delay_s": self.signal_s,
            "setup": self.setup, "srun_args": self.srun, "additional_parameters": self.sbatch,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[key] = getattr(self, key)
        return params


_NAME_REF = r"\$[A-Za-z_]\w*|\$\{[A-Za-z_]\w*\}"
# $NAME, ${NAME}, and ${NAME:-WORD} whose WORD is path-like text and plain references (a user's override of a
# profile default, e.g. ${MIOPEN_USER_DB_PATH:-/tmp/miopen-$USER}); nothing that can run a command.
_VAR_REF = re.compile(rf"({_NAME_REF}|\$\{{[A-Za-z_]\w*:?-(?:[\w./:@%+,=-]|{_NAME_REF})*\}})", re.ASCII)


def _env_line(key: str, value: str) -> str:
    """`export KEY="value"` where only variable references ($SLURM_JOB_ID, ${USER}, ${X:-/default/$USER})
    expand at job time; every other shell-special character ($(...), backquotes, quotes, backslashes) stays
    literal."""
    if not re.fullmatch(r"[A-Za-z_]\w*", key, re.ASCII):
        raise ConfigError(f"cluster profile env: {key!r} is not a valid variable name")
    pieces = _VAR_REF.split(value)  # literal, reference, literal, ...
    quoted = "".join(p if i % 2 else re.sub(r'([\\"$`])', r"\\\1", p) for i, p in enumerate(pieces))
    return f'export {key}="{quoted}"'


def make_plan(launch: LaunchConfig, job_name: str, profile: ClusterProfile | None = None) -> SlurmPlan:
    """Merge the job's launch section over its cluster profile (`profile`, else loaded from launch.cluster) and
    check the result."""
    profile = profile or load_profile(launch.cluster)
    tasks = launch.tasks_per_node or profile.tasks_per_node
    if launch.nodes < 1:
        raise ConfigError(f"launch.nodes: must be >= 1, got {launch.nodes}")
    if tasks < 1:
        raise ConfigError(f"launch.tasks_per_node: must be >= 1, got {tasks}")
    if profile.gpus_per_node and tasks > profile.gpus_per_node:
        raise ConfigError(f"launch.tasks_per_node: one task per GPU, and a {profile.name} node has "
                          f"{profile.gpus_per_node} GPUs; got {tasks}")
    if launch.time_min < 1:
        raise ConfigError(f"launch.time_min: must be >= 1, got {launch.time_min}")
    if not 0 <= launch.signal_s < launch.time_min * 60:
        raise ConfigError(f"launch.signal_s: the stop signal must come within the time limit "
                          f"({launch.time_min} min), got {launch.signal_s} s")
    sbatch = {"requeue": True,  # so a preempted job can requeue itself even where JobRequeue=0
              **parse_long_options(profile.sbatch, f"cluster profile {profile.name} sbatch"),
              **parse_long_options(launch.sbatch_extra, "launch.sbatch_extra")}
    parse_long_options(launch.srun_extra, "launch.srun_extra")  # only checked: srun gets them verbatim
    cpus = launch.cpus_per_task or profile.cpus_per_task
    # A rank that exits non-zero takes the whole step down instead of leaving the others blocked in a
    # collective until the timeout. srun does not inherit sbatch's --cpus-per-task (Slurm 22.05-23.02),
    # so without it every rank is bound to one core.
    srun = ["--kill-on-bad-exit=1", f"--cpus-per-task={cpus}", *profile.srun, *launch.srun_extra]
    env = {**profile.env, **(profile.multinode_env if launch.nodes > 1 else {})}
    setup = [*profile.setup, *(_env_line(k, v) for k, v in env.items())]
    return SlurmPlan(
        cluster=profile.name, job_name=job_name, nodes=launch.nodes, tasks_per_node=tasks,
        gpus_per_node=tasks if profile.gpus_per_node else 0,
        cpus_per_task=cpus, time_min=launch.time_min,
        signal_s=launch.signal_s, partition=launch.partition or profile.partition,
        account=launch.account or profile.account, qos=launch.qos or profile.qos,
        constraint=launch.constraint or profile.constraint, sbatch=sbatch, srun=srun, setup=setup)


STOP_SIGNAL = "USR2"  # what submitit's `#SBATCH --signal` sends; the trainer's train.stop_signal default


def render_sbatch(plan: SlurmPlan, folder: Path, python: str, array_size: int = 0) -> str:
    """The batch script submitit writes for this plan: sorted `#SBATCH` flags, the setup lines, then srun
    running submitit's entry point, with per-rank logs `<folder>/<job>_<rank>_log.{out,err}`."""
    job = "%A_%a" if array_size else "%j"
    stdout, stderr = f"{folder}/{job}_%t_log.out", f"{folder}/{job}_%t_log.err"
    params = {k: v for k, v in plan.executor_parameters().items()
              if k not in ("signal_delay_s", "setup", "srun_args", "additional_parameters")}
    params.update({"wckey": "submitit", "signal": f"{STOP_SIGNAL}@{plan.signal_s}",
                   "output": stdout.replace("%t", "0"), "error": stderr.replace("%t", "0"), "open-mode": "append"})
    if array_size:
        params["array"] = f"0-{array_size - 1}%{min(array_size, 256)}"
    params.update(plan.sbatch)
    lines = ["#!/bin/bash", "", "# Parameters"]
    for key, value in sorted(params.items()):
        flag = key.replace("_", "-")
        lines.append(f"#SBATCH --{flag}" if value is True else f"#SBATCH --{flag}={shlex.quote(str(value))}")
    if plan.setup:
        lines += ["", "# setup", *plan.setup]
    srun = shlex.join(["srun", "--unbuffered", "--output", stdout, "--error", stderr, *plan.srun])
    command = f"{srun} {python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", command, ""]
    return "\n".join(lines)


def requeue(job_id: str) -> None:
    """Put a running job back in the queue; it restarts in a new allocation with the same id."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)


# A job in one of these states still holds (or will again hold) its run directory: a requeued job
# (preemption, node failure) goes REQUEUED -> PENDING -> RUNNING under the same id.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"})


def queue_state(job_id: str) -> str | None:
    """The job's state as the controller sees it ("" once it has left the queue), or None when squeue
    cannot tell (no Slurm on this machine, controller unreachable)."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    states = out.stdout.split()
    return next((s for s in states if s in ACTIVE_STATES), states[0] if states else "")
