"""A method from outside the package, registered through `plugins: [toy_plugin]`: a model converter
and a callback, each with checkpointed state. tests/test_extending.py checks that they run at the
right points and that their state survives a kill and resume bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from exatrain.model.convert import register_converter
from exatrain.model.llama import RMSNorm
from exatrain.registry import CALLBACKS
from exatrain.train.callback import Callback


class ShiftedNorm(RMSNorm):
    """The final norm plus a learned shift: a new parameter (`norm.shift`) in the model's state."""

    def __init__(self, norm: RMSNorm):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.shift = nn.Parameter(torch.empty_like(norm.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shift

    def init_state(self) -> None:
        nn.init.normal_(self.shift, std=0.01)


@register_converter("toy_shift")
def shift_final_norm(model: nn.Module, cfg) -> None:
    model.converted_on = model.norm.weight.device.type  # the converter must see the meta model
    model.norm = ShiftedNorm(model.norm)


class ToyRecorder(Callback):
    """Logs every hook to `<run_dir>/toy_events.jsonl` (rank 0) and keeps a running sum of the losses."""

    name = "toy"

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "toy_events.jsonl"
        self.loss_sum = 0.0
        self.steps = 0

    def _event(self, trainer, hook: str, **extra) -> None:
        if trainer is None or trainer.info.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"hook": hook, "step": None if trainer is None else trainer.state.step, **extra})
                        + "\n")

    def on_build(self, model):
        self._event(None, "on_build", device=model.norm.weight.device.type, converted=hasattr(model, "converted_on"))

    def on_train_start(self, trainer):
        norm = trainer.engine.model_parts[0].norm
        self._event(trainer, "on_train_start", converted_on=trainer.engine.model_parts[0].converted_on,
                    shifted=type(norm).__name__, loss_sum=self.loss_sum)

    def on_step_start(self, trainer):
        self._event(trainer, "on_step_start")

    def on_step_end(self, trainer, stats, record):
        self.loss_sum += stats.loss
        self.steps += 1
        record["toy_loss_sum"] = self.loss_sum
        record["toy_steps"] = self.steps
        self._event(trainer, "on_step_end")

    def on_eval(self, trainer, results):
        results["toy_steps"] = self.steps
        self._event(trainer, "on_eval")

    def on_checkpoint(self, trainer, path):
        self._event(trainer, "on_checkpoint", path=path.name)

    def on_train_end(self, trainer, status):
        self._event(trainer, "on_train_end", status=status)

    def state_dict(self):
        return {"loss_sum": self.loss_sum, "steps": self.steps}

    def load_state_dict(self, state):
        self.loss_sum, self.steps = state["loss_sum"], state["steps"]


CALLBACKS.register("toy", lambda cfg: ToyRecorder(cfg.run_dir))
