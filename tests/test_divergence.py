"""The divergence detector flags non-finite losses and spikes over the running median after the warmup, keeps the
first event, and resumes from its state dict exactly like an uninterrupted run."""

from __future__ import annotations

import math

import pytest

from exatrain.config import ConfigError
from exatrain.train.divergence import NON_FINITE, SPIKE, Divergence, DivergenceDetector


def run(detector: DivergenceDetector, losses: list[float], start: int = 0) -> list[Divergence]:
    return [e for step, loss in enumerate(losses, start) if (e := detector.observe(step, loss)) is not None]


def test_non_finite_loss_diverges_at_once_even_in_warmup():
    d = DivergenceDetector(warmup=100)
    assert run(d, [5.0, 4.0, float("nan"), 3.0]) == [Divergence(2, NON_FINITE, d.event.loss, None)]
    assert math.isnan(d.event.loss) and d.diverged
    assert run(DivergenceDetector(), [1.0, float("inf")])[0].reason == NON_FINITE


def test_spike_over_running_median_after_warmup():
    d = DivergenceDetector(threshold=2.0, window=4, warmup=3)
    events = run(d, [10.0, 3.0, 2.0, 2.0, 2.1, 1.9, 2.0, 4.5, 9.0])
    # median of the previous 4 losses at step 7 is median(2.0, 2.1, 1.9, 2.0) = 2.0; 4.5 > 2 x 2.0
    assert events == [Divergence(7, SPIKE, 4.5, 2.0)] and d.event == events[0]  # step 8 does not replace it


def test_no_spike_during_warmup_or_below_threshold():
    d = DivergenceDetector(threshold=2.0, window=3, warmup=5)
    assert run(d, [1.0, 5.0, 9.0, 1.0, 1.0, 1.9, 1.0, 1.99]) == []  # steps 1-2 are spikes but inside the warmup
    assert not d.diverged


def test_median_ignores_one_earlier_spike():
    d = DivergenceDetector(threshold=1.5, window=5, warmup=0)
    assert run(d, [2.0, 2.0, 2.9, 2.0, 2.0, 3.1]) == [Divergence(5, SPIKE, 3.1, 2.0)]


def test_state_dict_round_trip_resumes_identically():
    losses = [3.0, 2.5, 2.2, 2.1, 2.0, 2.05, 1.95, 5.0, 2.0]
    whole = DivergenceDetector(threshold=2.0, window=3, warmup=2)
    expected = run(whole, losses)
    first = DivergenceDetector(threshold=2.0, window=3, warmup=2)
    run(first, losses[:5])
    resumed = DivergenceDetector(threshold=2.0, window=3, warmup=2)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, losses[5:], start=5) == expected and resumed.state_dict() == whole.state_dict()
    done = DivergenceDetector()
    done.load_state_dict(whole.state_dict() | {"history": [1.0]})
    assert done.event == expected[0]


@pytest.mark.parametrize("kwargs,key", [({"threshold": 1.0}, "precision.divergence.threshold"),
                                        ({"threshold": float("nan")}, "precision.divergence.threshold"),
                                        ({"window": 0}, "precision.divergence.median_window"),
                                        ({"warmup": -1}, "precision.divergence.warmup")])
def test_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DivergenceDetector(**kwargs)
