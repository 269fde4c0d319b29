"""Wilson score intervals against values computed by hand from the formula (fast_srt/eval/stats.py)."""

import math

import pytest

from fast_srt.eval.stats import Rate, mcnemar_exact, wilson_interval

Z = 1.959963984540054


@pytest.mark.parametrize("k, n, lo, hi", [
    (5, 10, 0.236593, 0.763407),  # p = 0.5: symmetric around 0.5
    (0, 10, 0.0, 0.277533),  # upper = (z^2/2n + z sqrt(z^2/4n^2)) / (1 + z^2/n) = (z^2/n) / (1 + z^2/n)
    (10, 10, 0.722467, 1.0),
    (1, 4, 0.045587, 0.699358),
    (81, 263, 0.255289, 0.366210),
])
def test_wilson_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-6)  # values rounded to 6 places


def test_wilson_zero_successes_closed_form():
    for n in (1, 7, 32, 1000):
        assert wilson_interval(0, n)[1] == pytest.approx(Z * Z / n / (1 + Z * Z / n), rel=1e-12)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    lo, hi = wilson_interval(500, 1000)  # p = 1/2: centre 1/2, half-width z/(1+z^2/n) sqrt(1/4n + z^2/4n^2)
    half = Z / (1 + Z * Z / 1000) * math.sqrt(0.25 / 1000 + Z * Z / (4 * 1000 * 1000))
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-12)


def test_rate_leaves_out_unknown_labels():
    r = Rate.of([True, False, None, True, None])
    assert (r.k, r.n, r.rate) == (2, 3, 2 / 3)
    assert (r.lo, r.hi) == wilson_interval(2, 3)
    assert r.cell() == f"0.667 [{r.lo:.3f}, {r.hi:.3f}] n=3"
    empty = Rate.of([None, None])
    assert (empty.n, empty.rate, empty.cell()) == (0, None, "- (n=0)")


@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),  # no discordant pair: nothing to tell apart
    (3, 3, 1.0),  # 2 * P[X <= 3], X ~ Bin(6, 1/2) = 2 * 42/64 > 1
    (0, 6, 0.03125),  # 2 * (1/2)^6
    (1, 9, 0.021484375),  # 2 * (1 + 10) / 1024
    (9, 1, 0.021484375),  # symmetric in b and c
    (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
])
def test_mcnemar_exact_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="b, c >= 0"):
        mcnemar_exact(-1, 2)
