"""MeCo, the training side (DESIGN.md §5): metadata conditioning for the first (1 − cooldown_fraction)
of the run's tokens, then a cooldown on plain documents; optimizer and LR schedule just continue.

It is a callback (`meco`, added automatically when `data.meco.enabled`): before each step it tells the
training loader whether documents starting from now on get their metadata prefix. The loader applies
the switch at the next document start and checkpoints it, so resuming on either side is exact. The
data side (prefixes, loss masks) is exatrain.data.meco.
"""

from __future__ import annotations

import logging
from typing import Any

from exatrain.config import ConfigError, JobConfig, MecoConfig, require
from exatrain.registry import CALLBACKS, config_resolver, config_validator
from exatrain.train.callback import Callback

log = logging.getLogger("exatrain")


class MecoCooldown(Callback):
    name = "meco"

    def __init__(self, cfg: MecoConfig, total_tokens: int):
        self.cfg = cfg
        self.total_tokens = total_tokens
        self.switched_at_step = -1  # the first step trained without metadata

    @classmethod
    def from_job(cls, job: JobConfig) -> MecoCooldown:
        return cls(job.data.meco, job.train.steps * job.train.global_batch * job.data.seq_len)

    @property
    def cooldown_start_tokens(self) -> float:
        return (1.0 - self.cfg.cooldown_fraction) * self.total_tokens

    def metadata_on(self, tokens_seen: int) -> bool:
        """On while fewer than (1 - cooldown_fraction) of the run's tokens have been trained on."""
        return self.cfg.enabled and tokens_seen < self.cooldown_start_tokens

    def last_metadata_step(self, tokens_per_step: int) -> int:
        """How many steps start with metadata on (the step number of the last one), as `on_step_start` decides."""
        return sum(self.metadata_on(k * tokens_per_step) for k in range(self.total_tokens // tokens_per_step))

    def on_step_start(self, trainer: Any) -> None:
        on = self.metadata_on(trainer.state.tokens_seen)
        if not on and self.switched_at_step < 0:
            self.switched_at_step = trainer.state.step + 1
            log.info("meco: cooldown from step %d (%d tokens seen): documents start without metadata",
                     self.switched_at_step, trainer.state.tokens_seen)
        trainer.data.train.set_metadata(on)

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at_step": self.switched_at_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switched_at_step = int(state["switched_at_step"])


CALLBACKS.register("meco", MecoCooldown.from_job)


@config_resolver
def add_meco_callback(cfg: JobConfig) -> None:
    if cfg.data.meco.enabled and "meco" not in cfg.train.callbacks:
        cfg.train.callbacks.insert(0, "meco")


@config_validator
def validate_meco(cfg: JobConfig) -> None:
    m = cfg.data.meco
    require(m.missing in ("fallback", "skip", "error"), "data.meco.missing",
            f"got {m.missing!r}, expected one of fallback, skip, error")
    require(m.url_value in ("meco", "host"), "data.meco.url_value", f"got {m.url_value!r}, expected meco or host")
    require(0.0 <= m.cooldown_fraction < 1.0, "data.meco.cooldown_fraction", "must be in [0, 1)")
    require("{value}" in m.template, "data.meco.template", "must contain the '{value}' placeholder")
    try:
        m.template.format(value="example.org")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"data.meco.template: {m.template!r} is not a valid format string with only {{value}} "
                          f"({exc!r}); write literal braces as '{{{{' and '}}}}'") from None
    require(bool(m.field.strip()), "data.meco.field", "must name a document field, e.g. url or topic")
    require(m.missing != "fallback" or bool(m.fallback.strip()), "data.meco.fallback",
            "must be non-empty when data.meco.missing=fallback")
    require(m.enabled or "meco" not in cfg.train.callbacks, "train.callbacks",
            "the meco callback needs data.meco.enabled=true")
