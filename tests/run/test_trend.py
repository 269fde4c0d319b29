"""The end-of-run trend: least-squares slope and its 95% interval against values worked out by hand."""

import random

import pytest

from fast_srt.run.trend import slope_interval, t975, trend, trend_lines


def test_slope_interval_by_hand():
    # y = 2x + e with residuals (+1, -2, +1) at x = 0, 1, 2: slope 2 exactly (the residuals are orthogonal to x),
    # s^2 = 6 / 1, Sxx = 2, se = sqrt(3), half-width = t(1) * sqrt(3)
    s, lo, hi = slope_interval([0, 1, 2], [1, 0, 5])
    assert s == pytest.approx(2.0)
    assert hi - s == pytest.approx(12.706 * 3 ** 0.5, rel=1e-4) and s - lo == pytest.approx(hi - s)
    assert slope_interval([1, 1, 1], [1, 2, 3]) is None and slope_interval([1, 2], [1, 2]) is None
    assert t975(1) == 12.706 and t975(1000) == pytest.approx(1.96, abs=1e-3)


def test_interval_covers_the_true_slope_95_percent_of_the_time():
    """Coverage over many noisy series of 5 points (3 degrees of freedom): the t interval covers the true slope in
    about 95% of them; a normal 1.96 interval would cover only about 86%."""
    rng = random.Random(12345)
    covered = 0
    for _ in range(600):
        fit = slope_interval([1, 2, 3, 4, 5], [0.3 * x + rng.gauss(0, 1.0) for x in range(1, 6)])
        covered += fit[1] <= 0.3 <= fit[2]
    assert 0.92 <= covered / 600 <= 0.98


def test_trend_sees_a_rise_and_not_noise():
    rng = random.Random(7)
    rising = [{"step": i, "reward/defender_mean": 0.1 * i + rng.gauss(0, 0.05)} for i in range(1, 21)]
    t = trend(rising, "reward/defender_mean")
    assert t["lo"] > 0 and t["last"] > t["first"]
    flat = [{"step": i, "reward/defender_mean": (-1) ** i * 0.5} for i in range(1, 21)]
    t = trend(flat, "reward/defender_mean")
    assert t["lo"] < 0 < t["hi"]
    lines = trend_lines(rising + [{"step": 21, "format/attacker_violation_rate": None}])
    assert len(lines) == 1 and "rising" in lines[0] and "defender reward" in lines[0]
