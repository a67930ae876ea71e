"""Artificially slow steps for the time-limit and hang tests, registered through `plugins: [slow_step_plugin]`
and `train.callbacks=[slow_step]`: rank EXATRAIN_TEST_SLOW_RANK (-1: every rank) sleeps EXATRAIN_TEST_SLOW_S
seconds at the end of step EXATRAIN_TEST_SLOW_STEP (0: every step)."""

from __future__ import annotations

import os
import time

from exatrain.registry import CALLBACKS
from exatrain.train.callback import Callback


class SlowStep(Callback):
    def __init__(self) -> None:
        self.rank = int(os.environ.get("EXATRAIN_TEST_SLOW_RANK", "-1"))
        self.step = int(os.environ.get("EXATRAIN_TEST_SLOW_STEP", "0"))
        self.seconds = float(os.environ.get("EXATRAIN_TEST_SLOW_S", "1"))

    def on_step_end(self, trainer, stats, record) -> None:
        if self.rank in (-1, trainer.info.rank) and self.step in (0, trainer.state.step):
            time.sleep(self.seconds)


CALLBACKS.register("slow_step", lambda cfg: SlowStep())
