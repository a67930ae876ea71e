"""What runs on every rank of a submitted job: train, stop cleanly on the pre-limit signal, requeue.

Slurm sends SIGUSR2 `launch.signal_s` seconds before the time limit (`#SBATCH --signal`), and
`scancel --signal=USR2` does the same for a preemption. The trainer's handler (train.stop_signal)
only asks it to stop; the trainer agrees across ranks at the next step boundary, writes a checkpoint
and returns "preempted". Rank 0 then requeues the job, every rank exits without a result, and the
requeued job resumes from that checkpoint (checkpoint.resume=auto). SIGTERM (plain `scancel`, a node
shutdown) stops the same way but is not requeued, as the job is being cancelled: the ranks exit 75
(EXIT_TERMINATED) after the checkpoint, and a resubmission resumes. submitit's own handler would
checkpoint from inside the signal handler, mid-step; the trainer's replaces it for this reason.

A failing rank logs its rank, host and error before re-raising; srun --kill-on-bad-exit then ends
the other ranks, so the job fails promptly instead of hanging in a collective.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
from typing import Any

from exatrain.launch.bootstrap import detect_rank
from exatrain.launch.preflight import CACHE_VARS, warn_rocm_mismatch
from exatrain.launch.slurm import requeue

log = logging.getLogger("exatrain.launch")


class RankFailed(RuntimeError):
    """Raised from a failed rank so the submitter's traceback starts with who failed and where."""


def _node_local_dirs() -> None:
    """MIOpen does not create its cache directories; the compiler caches live on node-local /tmp (frontier.yaml)."""
    for var in CACHE_VARS:
        if os.environ.get(var):
            os.makedirs(os.environ[var], exist_ok=True)


class TrainJob:
    """The callable submitit pickles: one training run on every rank of the allocation."""

    def __init__(self, config: dict[str, Any], max_requeues: int):
        self.config = config
        self.max_requeues = max_requeues

    def __call__(self) -> Any:
        from exatrain.config import from_dict
        from exatrain.train.trainer import train

        import torch

        faulthandler.enable()  # a segfault or fatal signal still prints this rank's Python stack
        _node_local_dirs()
        info = detect_rank()
        if info.rank == 0:
            warn_rocm_mismatch(torch.version.hip)
        where = f"rank {info.rank}/{info.world_size} on {os.environ.get('SLURMD_NODENAME') or socket.gethostname()}"
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        # On stderr: it marks where this attempt starts in a requeued job's appended log.
        print(f"exatrain: {where}, job {os.environ.get('SLURM_JOB_ID')}, restart {restarts}", file=sys.stderr,
              flush=True)
        try:
            result = train(from_dict(self.config))
        except Exception as exc:
            print(f"exatrain: {where} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise RankFailed(f"{where} failed: {type(exc).__name__}: {exc}") from exc
        if result.status != "preempted" or "SLURM_JOB_ID" not in os.environ or result.signal == "SIGTERM":
            return result  # outside Slurm, or a cancelled job: nothing to requeue, the caller resubmits
        if restarts >= self.max_requeues:
            print(f"exatrain: stopped at step {result.step} and not requeued: {restarts} requeues already "
                  f"(launch.max_requeues={self.max_requeues}); resubmit to continue", flush=True)
            return result
        if info.rank == 0:
            job_id = os.environ["SLURM_JOB_ID"]
            print(f"exatrain: checkpointed at step {result.step}; requeueing job {job_id}", flush=True)
            requeue(job_id)
        # No result file: the submitter keeps waiting for the requeued job's.
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """`srun python -m exatrain.launch.job CONFIG key=value...`: one rank of a job submitted with a plain
    sbatch script (slurm/*.sbatch) instead of `exatrain launch`, with the same stop/requeue handling.
    Exit status: 0 completed, 3 stopped without a requeue, 75 checkpointed on SIGTERM (resubmit to resume)."""
    from exatrain.config import load_config, split_config_args, to_dict
    from exatrain.train.trainer import exit_code

    cfg = load_config(*split_config_args(sys.argv[1:] if argv is None else argv))
    result = TrainJob(to_dict(cfg), cfg.launch.max_requeues)()
    if int(os.environ.get("SLURM_PROCID", 0)) == 0:
        print(f"exatrain: {result.status} at step {result.step}, loss {result.final_loss:.4f}, run dir {result.run_dir}")
    return exit_code(result)


if __name__ == "__main__":
    sys.exit(main())
