"""torchrun worker for the FP8 / simulated-precision layout tests: one launch runs every case.

    torchrun --nproc-per-node 2 tests/precision_worker.py SPEC.json OUT.pt

SPEC is a list of {"name", "overrides", "convert", ...} (tests/precision_common.run). Rank 0 saves
{name: record or {"error": traceback}} to OUT with torch.save; a failing case does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from helpers import run_worker_cases
from precision_common import run


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    run_worker_cases(json.loads(Path(spec_path).read_text()),
                     lambda case: run(case, world, checkpoint_dir=str(Path(out_path).parent / f"ckpt_{case['name']}")),
                     lambda results: torch.save(results, out_path))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
