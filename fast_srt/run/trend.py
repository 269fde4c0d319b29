"""Whether a run learned: per-step series from metrics.jsonl, their least-squares slope per step with a 95%
confidence interval (Student t on n - 2 degrees of freedom), and the mean of the first and last steps.

A slope whose interval excludes 0 is a trend the run's own noise does not explain; a short CPU run often cannot
tell, and says so ("flat within noise").
"""

from __future__ import annotations

import math

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96 is within 2%)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

SERIES = (("reward/defender_mean", "defender reward"), ("reward/attacker_mean", "attacker reward"),
          ("format/defender_violation_rate", "defender format violations"),
          ("format/attacker_violation_rate", "attacker format violations"))


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.959964


def slope_interval(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """(slope, lo, hi): ordinary least squares of ys on xs and its 95% interval; None with fewer than 3 points."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx)
    half = t975(n - 2) * se
    return slope, slope - half, slope + half


def trend(records: list[dict], key: str, edge: int = 3) -> dict | None:
    """Slope and interval of one metric over the steps that have it, with the means of the first and last `edge`
    steps."""
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and not math.isnan(r[key])]
    if len(pts) < 3:
        return None
    xs, ys = [float(p[0]) for p in pts], [float(p[1]) for p in pts]
    fit = slope_interval(xs, ys)
    if fit is None:
        return None
    k = min(edge, len(ys) // 2)
    return {"steps": len(pts), "slope": fit[0], "lo": fit[1], "hi": fit[2], "first": sum(ys[:k]) / k,
            "last": sum(ys[-k:]) / k, "edge": k}


def trend_lines(records: list[dict]) -> list[str]:
    """The end-of-run summary: one line per series."""
    lines = []
    for key, name in SERIES:
        t = trend(records, key)
        if t is None:
            continue
        verdict = ("rising" if t["lo"] > 0 else "falling" if t["hi"] < 0 else "flat within noise")
        lines.append(f"trend {name:<27} first {t['edge']} steps {t['first']:+.2f} -> last {t['edge']} "
                     f"{t['last']:+.2f}; slope {t['slope']:+.3f}/step [95% {t['lo']:+.3f}, {t['hi']:+.3f}] over "
                     f"{t['steps']} steps: {verdict}")
    return lines
