"""LR schedules: known values, phase shapes, resume, batch-size changes, rejected settings."""

from __future__ import annotations

import math

import pytest

from exatrain.config import ConfigError, load_config
from exatrain.train.schedules import Schedule, build_schedule, decay_factor

SEQ, BATCH, STEPS, WARMUP = 16, 4, 100, 10
TOK = SEQ * BATCH


def make(name: str, *extra: str) -> Schedule:
    cfg = load_config(None, [f"schedule.name={name}", f"schedule.warmup_steps={WARMUP}", f"train.steps={STEPS}",
                             f"train.global_batch={BATCH}", "train.micro_batch=1", f"data.seq_len={SEQ}",
                             "optim.lr=1e-3", *extra])
    return build_schedule(cfg)


def curve(s: Schedule, batch: int = BATCH) -> list[float]:
    return [s.lr(step * batch * SEQ, batch) for step in range(STEPS * BATCH // batch)]


def test_token_boundaries_from_config():
    s = make("wsd", "schedule.decay_fraction=0.2")
    assert (s.total_tokens, s.warmup_tokens, s.decay_tokens, s.decay_start) == (6400, 640, 1280, 5120)


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
def test_warmup_ramps_linearly_to_peak(name):
    s = make(name)
    lrs = curve(s)
    assert lrs[0] == pytest.approx(1e-3 / WARMUP)
    assert lrs[WARMUP // 2 - 1] == pytest.approx(0.5e-3)
    assert lrs[WARMUP - 1] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP]))


def test_cosine_known_points_and_floor():
    s = make("cosine", "schedule.min_lr_ratio=0.1")
    mid = WARMUP + (STEPS - WARMUP) // 2
    assert s.lr(mid * TOK, BATCH) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert s.lr(STEPS * TOK, BATCH) == pytest.approx(1e-4)
    lrs = curve(s)[WARMUP:]
    assert lrs[0] == 1e-3 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > 1e-4


def test_constant_never_decays():
    assert set(curve(make("constant"))[WARMUP:]) == {1e-3}


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_wsd_stable_then_decay_to_floor(kind):
    s = make("wsd", "schedule.decay_fraction=0.2", f"schedule.decay_kind={kind}", "schedule.min_lr_ratio=0.0")
    lrs = curve(s)
    assert set(lrs[WARMUP - 1:80]) == {1e-3}
    decay = lrs[80:]
    assert decay[0] == 1e-3 and all(a > b for a, b in zip(decay, decay[1:]))
    assert 0 < decay[-1] < 0.1e-3
    assert s.lr(s.total_tokens, BATCH) == 0.0


def test_decay_factor_shapes():
    for kind in ("linear", "exponential", "cosine"):
        assert decay_factor(kind, 0.0, 0.1) == pytest.approx(1.0)
        assert decay_factor(kind, 1.0, 0.1) == pytest.approx(0.1)
        assert decay_factor(kind, 7.0, 0.1) == pytest.approx(0.1)
    assert decay_factor("linear", 0.5, 0.0) == pytest.approx(0.5)
    assert decay_factor("cosine", 0.5, 0.0) == pytest.approx(0.5)
    assert decay_factor("exponential", 0.5, 0.0) == pytest.approx((math.exp(0.5) - 1) / (math.e - 1))
    assert decay_factor("exponential", 0.5, 0.0) < 0.5  # convex: front-loaded drop


def test_power_formula_known_value():
    s = Schedule("power", peak_lr=1.0, seq_len=SEQ, total_tokens=10**8, warmup_tokens=0, decay_tokens=0)
    assert s.lr(10**6, 4) == pytest.approx(0.0139354, rel=1e-5)  # 4 * 4 * (1e6)^-0.51
    assert s.lr(10**6, 1) == pytest.approx(0.0139354 / 4, rel=1e-5)
    assert s.lr(10**3, 4) == 0.02  # capped at lr_max
    assert s.lr(0, 4) == 0.02


def test_power_phases():
    extra = ("schedule.decay_fraction=0.1", "schedule.decay_kind=exponential", "schedule.min_lr_ratio=0.0",
             "schedule.power_lr_max=1.0", "schedule.power_a=0.01")
    s = make("power", *extra)
    lrs = curve(s)
    peak = s.power_lr(s.warmup_tokens, BATCH)
    assert lrs[0] == pytest.approx(peak / WARMUP)
    assert lrs[WARMUP - 1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP]))
    power = lrs[WARMUP:90]
    assert all(a > b for a, b in zip(power, power[1:]))
    assert power[5] == pytest.approx(BATCH * 0.01 * ((WARMUP + 5) * TOK) ** -0.51)
    decay = lrs[90:]
    assert decay[0] == pytest.approx(s.power_lr(90 * TOK, BATCH))
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert s.lr(s.total_tokens, BATCH) == 0.0


def test_power_capped_is_flat_at_lr_max():
    lrs = curve(make("power", "schedule.decay_fraction=0.2"))
    assert set(lrs[WARMUP - 1:80]) == {0.02}


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd", "power"])
def test_resume_is_exact(name):
    """A schedule rebuilt from the config gives bit-identical LRs from any token count on."""
    full = curve(make(name, "schedule.power_a=0.01"))
    resumed = make(name, "schedule.power_a=0.01")
    assert [resumed.lr(step * TOK, BATCH) for step in range(37, STEPS)] == full[37:]


def test_batch_change_is_consistent():
    """After warmup the LR at a token count ignores the batch (cosine, wsd) or scales with it (power, uncapped)."""
    for name in ("constant", "cosine", "wsd"):
        s = make(name)
        for n in (WARMUP * TOK, 33 * TOK, 91 * TOK):
            assert s.lr(n, 2 * BATCH) == s.lr(n, BATCH)
    s = make("power", "schedule.power_a=0.01", "schedule.power_lr_max=1.0")
    for n in (WARMUP * TOK, 40 * TOK, 85 * TOK):
        assert s.lr(n, 2 * BATCH) == pytest.approx(2 * s.lr(n, BATCH))


def test_warmup_in_tokens_not_steps():
    s = make("wsd")
    big = [s.lr(k * 2 * TOK, 2 * BATCH) for k in range(WARMUP)]
    assert big[WARMUP // 2 - 1] == pytest.approx(1e-3)  # twice the batch: warmup done in half the steps
    assert big[0] == pytest.approx(2e-3 / WARMUP)


def test_degenerate_lengths_do_not_crash():
    s = make("cosine", "schedule.warmup_steps=500")
    assert 0 < s.lr(0, BATCH) < 1e-3
    s = make("wsd", "schedule.decay_fraction=0.0")
    assert s.lr(STEPS * TOK - TOK, BATCH) == 1e-3


@pytest.mark.parametrize("override, key", [
    ("schedule.power_b=0.0", "schedule.power_b"),
    ("schedule.power_b=0.3", "schedule.power_b"),
    ("schedule.decay_fraction=1.0", "schedule.decay_fraction"),
    ("schedule.decay_fraction=-0.1", "schedule.decay_fraction"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
    ("schedule.power_a=0", "schedule.power_a"),
    ("schedule.power_lr_max=0", "schedule.power_lr_max"),
    ("schedule.name=step", "schedule.name"),
    ("schedule.decay_kind=step", "schedule.decay_kind"),
    ("model.mup.base_dim=0", "model.mup.base_dim"),
    ("model.mup.emb_mult=0", "model.mup.emb_mult"),
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_schedule_rejects_bad_values_without_validate():
    with pytest.raises(ConfigError, match="schedule.name"):
        Schedule("linear", 1e-3, SEQ, 100, 0, 0)
    with pytest.raises(ConfigError, match="schedule.power_b"):
        Schedule("power", 1e-3, SEQ, 100, 0, 0, power_b=0.5)
    with pytest.raises(ConfigError, match="schedule.decay_kind"):
        Schedule("wsd", 1e-3, SEQ, 100, 0, 0, decay_kind="step")
