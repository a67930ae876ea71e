"""torchrun worker for SeND under parallel layouts: one launch trains several jobs with the real trainer.

    torchrun --nproc-per-node N tests/send_worker.py SPEC.json OUT.json

SPEC: {"base": [overrides shared by every case], "cases": [{"name", "overrides", "stop_after"?}]}. Each
case trains a job in `<EXATRAIN_TEST_RUNS>/<name>` (losses land in its metrics.jsonl); with "stop_after"
the job is first stopped (checkpointed) after that step, as a preemption would, then resumed. A probe callback records, per
SeND update, the units the `send` callback selected, and at the end checks on every rank that its
state (snapshot window, selection) is the same everywhere and that each rank holding the mask zeroes
exactly the last selection. Rank 0 writes {name: {"selections", "consistent", "mask_ok", "seconds"}}
(or {"error"}) to OUT; a failing case does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import StopAfter, run_worker_cases

from exatrain.config import load_config
from exatrain.train.callback import Callback
from exatrain.train.send import find_masks
from exatrain.train.trainer import train


class Probe(Callback):
    name = "send_probe"

    def __init__(self):
        self.selections: dict[int, list[int]] = {}
        self.result: dict = {}

    def on_step_end(self, trainer, stats, record):
        if "send_dropped" in record:
            self.selections[trainer.state.step] = list(self.send(trainer).selected)

    @staticmethod
    def send(trainer):
        return next(cb for cb in trainer.callbacks if getattr(cb, "name", "") == "send")

    def on_train_end(self, trainer, status):
        send = self.send(trainer)
        masks = [m for part in trainer.engine.model_parts for m in find_masks(part)]
        mine = {"selections": self.selections, "window": send.window.snapshots.double().sum().item(),
                "count": send.window.count, "selected": send.selected, "zero_left": send.zero_left}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        expected = sorted(send.selected) if send.cfg.variant == "mask" else []
        self.result = {"selections": {str(k): v for k, v in self.selections.items()},
                       "consistent": all(g == mine for g in gathered),
                       "mask_ok": all(m.dropped.tolist() == expected for m in masks),
                       "holds_mask": len(masks)}


def run_case(case: dict, base: list[str], root: Path) -> dict:
    probe = Probe()
    cfg = load_config("tiny.yaml", [*base, *case["overrides"], f"run_dir={root / case['name']}"])
    if case.get("stop_after"):
        assert train(cfg, callbacks=[StopAfter(case["stop_after"])]).status == "preempted"
    train(cfg, callbacks=[probe])
    holds: list = [None] * dist.get_world_size()
    dist.all_gather_object(holds, probe.result["holds_mask"])
    return {**probe.result, "holders": sum(holds)}


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    root = Path(os.environ["EXATRAIN_TEST_RUNS"])
    run_worker_cases(spec["cases"], lambda case: run_case(case, spec["base"], root),
                     lambda results: out.write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
