"""The callback protocol: how a method hooks into the training loop without an `if` in it.

A callback is an object with any of the hooks below (subclass `Callback` and override what you
need). Hooks run on every rank, in list order: the methods' own callbacks first (MeCo, SeND, ...),
then `train.callbacks`, then callbacks passed to `train()` directly. A callback's state is part of
every checkpoint (key `callbacks.<name>`) and is restored on resume before `on_train_start`.

Checkpointed state follows torch.distributed.checkpoint's rules: tensors must have a shape fixed at
construction (they are loaded in place), other values (numbers, strings, lists, dicts) are stored
whole. State must be the same on every rank, except tensors a rank alone holds (e.g. under pipeline
parallelism, the stage that owns a layer).

To register a callback by name for `train.callbacks` (or from a `plugins` module):

    @CALLBACKS.register("my_method")
    def build(cfg: JobConfig) -> Callback: return MyMethod(cfg.my_section)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from exatrain.engine.base import StepStats

Trainer = Any  # exatrain.train.trainer.Trainer (not imported: the trainer imports this module)


class Callback:
    """Base class with no-op hooks. `name` keys the callback's checkpointed state (default: the class name)."""

    name: str = ""

    def on_build(self, model: nn.Module) -> None:
        """The freshly built model on the meta device, before conversion and parallelisation."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Everything is built and a checkpoint, if any, is loaded; trainer.state says where the run stands."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before the step's batch is drawn (trainer.state.step steps are done)."""

    def on_step_end(self, trainer: Trainer, stats: StepStats, record: dict[str, Any]) -> None:
        """After the optimizer step; `record` is the step's metrics record and may be extended."""

    def on_eval(self, trainer: Trainer, results: dict[str, float]) -> None:
        """After an evaluation; `results` is logged afterwards and may be extended."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint was written completely to `path`."""

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        """The loop ended with `status` (completed or preempted); also runs when it raised (status failed)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
