"""The drift monitor: a conformal test martingale of live nonconformity scores against calibration scores."""

from __future__ import annotations

import numpy as np
import pytest
from flockwatch.trainer.drift import DriftMonitor, SimpleJumper


def _scores(a: float, b: float, n: int, seed: int) -> list[float]:
    return np.random.default_rng(seed).beta(a, b, size=n).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_exchangeable_scores_raise_no_alarm(seed: int) -> None:
    monitor = DriftMonitor(_scores(1, 8, 1000, seed), "v1", delta=0.01, seed=seed)
    assert not monitor.update(_scores(1, 8, 3000, seed + 100))
    assert not monitor.state.alarm
    assert monitor.state.max_martingale < 100


def test_less_confident_traffic_raises_the_alarm_quickly() -> None:
    monitor = DriftMonitor(_scores(1, 8, 1000, 0), "v1", delta=0.01)
    assert monitor.update(_scores(2, 4, 500, 1))
    assert monitor.state.alarm and monitor.state.alarm_at is not None and monitor.state.alarm_at < 150
    ks = monitor.ks()
    assert ks["p_value"] < 1e-6


def test_more_confident_traffic_is_drift_too() -> None:
    monitor = DriftMonitor(_scores(1, 8, 1000, 0), "v1", delta=0.01)
    assert monitor.update(_scores(1, 40, 500, 1))


def test_the_alarm_fires_once_and_after_a_quiet_stretch() -> None:
    """The Simple Jumper's capital recovers after many exchangeable scores (a plain product would not)."""
    monitor = DriftMonitor(_scores(1, 8, 2000, 0), "v1", delta=0.01)
    assert not monitor.update(_scores(1, 8, 2000, 1))
    assert monitor.update(_scores(2, 4, 400, 2))
    assert not monitor.update(_scores(2, 4, 400, 3))  # already alarmed under this reference
    assert monitor.state.alarm_at is not None and monitor.state.alarm_at < 2300


def test_tied_scores_are_not_drift() -> None:
    """Consensus decisions often have confidence 1.0: the randomized p-values keep ties uniform."""
    reference = [0.0] * 700 + _scores(1, 8, 300, 0)
    live = [0.0] * 1400 + _scores(1, 8, 600, 1)
    order = np.random.default_rng(2).permutation(len(live))
    monitor = DriftMonitor(reference, "v1", delta=0.01)
    assert not monitor.update([live[i] for i in order])


def test_uniform_p_values_keep_the_martingale_small_and_extreme_ones_grow_it() -> None:
    calm, skewed = SimpleJumper(), SimpleJumper()
    rng = np.random.default_rng(0)
    for p in rng.uniform(size=2000):
        calm.update(float(p))
    for p in rng.uniform(0, 0.2, size=100):
        skewed.update(float(p))
    assert calm.value < 10
    assert skewed.value > 1e3


def test_the_monitor_needs_a_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        DriftMonitor([], "v1")
