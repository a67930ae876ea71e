"""`exatrain launch`: the flags and the command; exatrain.cli registers them as a subcommand.

Flags are shorthands for launch.* config keys (so the run directory's config records them);
`--sweep` must come last since it takes every following key=values axis.
"""

from __future__ import annotations

import argparse
import sys

_FLAGS = {  # flag -> (LaunchConfig field, type, help)
    "--cluster": ("cluster", str, "profile in exatrain/configs/clusters/ (frontier, nvidia, local) or a YAML path"),
    "--nodes": ("nodes", int, "number of nodes"),
    "--tasks-per-node": ("tasks_per_node", int, "ranks per node, one per GPU (default: the profile's)"),
    "--cpus-per-task": ("cpus_per_task", int, "CPU cores per rank (default: the profile's)"),
    "--time": ("time_min", int, "time limit in minutes"),
    "--partition": ("partition", str, "Slurm partition"),
    "--account": ("account", str, "Slurm account (project id on Frontier)"),
    "--qos": ("qos", str, "Slurm quality of service"),
    "--constraint": ("constraint", str, "Slurm node constraint"),
    "--signal": ("signal_s", int, "seconds before the time limit to checkpoint and requeue (default 90)"),
}


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    for flag, (_, typ, text) in _FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--sbatch-extra", action="append", default=None, metavar="OPT",
                   help="extra sbatch long option, repeatable: --sbatch-extra=--mem=0")
    p.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="job array over the cartesian product, e.g. --sweep optim.lr=1e-4,3e-4 train.seed=1,2,3")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch/srun plan, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and report results or failures")
    p.add_argument("--force", action="store_true",
                   help="submit even though the run directory's previous job is still queued or running")


def run_launch(path: str, overrides: list[str], args: argparse.Namespace) -> int:
    from submitit.core.utils import FailedJobError

    from exatrain.config import parse_config
    from exatrain.launch.submit import JobFailed, prepare, submit, wait

    cfg = parse_config(path, overrides)
    for flag, (key, _, _) in _FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            setattr(cfg.launch, key, value)
    if args.sbatch_extra:
        cfg.launch.sbatch_extra = [*cfg.launch.sbatch_extra, *args.sbatch_extra]
    plan = prepare(cfg, args.sweep)
    if args.dry_run:
        print(plan.describe())
        return 0
    try:
        runs = submit(plan, force=args.force)
    except (FailedJobError, RuntimeError) as exc:
        print(f"exatrain launch: submission failed: {exc}", file=sys.stderr)
        return 1
    for run in runs:
        print(f"submitted job {run.job_id}: {run.run_dir} {' '.join(run.point)}".rstrip(), flush=True)
    if not args.wait:
        return 0
    try:
        results = wait(runs, on_state=lambda run, state: print(f"job {run.job_id}: {state}", flush=True))
    except JobFailed as exc:
        print(f"exatrain launch: {exc}", file=sys.stderr)
        return 1
    for run, result in zip(runs, results):
        print(f"job {run.job_id}: {result.status} at step {result.step}, loss {result.final_loss:.4f}, "
              f"run dir {result.run_dir}")
    return 0 if all(r.status == "completed" for r in results) else 3
