"""Rates with their sample size and a 95% Wilson score interval.

Wilson (1927): for k successes in n trials, p = k/n and z = 1.959964 (the 97.5% normal quantile),
  centre = (p + z^2 / 2n) / (1 + z^2 / n),  half-width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at k = 0 or k = n, which matters for the
small samples a CPU evaluation can afford.

Two checkpoints answering the same prompts are compared pairwise with McNemar's exact test: of the b prompts where
only A has the property and the c where only B has it, under "no difference" each discordant prompt falls either
way with probability 1/2, so the two-sided p-value is min(1, 2 P[X <= min(b, c)]) for X ~ Binomial(b + c, 1/2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for k of n; (0, 1) when n is 0 (nothing is known)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (module docstring); 1.0 when there are none."""
    if b < 0 or c < 0:
        raise ValueError(f"need b, c >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Rate:
    """k of n, the rate (None when n is 0) and its 95% Wilson interval."""

    k: int
    n: int
    rate: float | None
    lo: float
    hi: float

    @classmethod
    def of(cls, flags) -> Rate:
        """The rate of True among the flags that are not None (None: no label for that item)."""
        known = [bool(f) for f in flags if f is not None]
        k, n = sum(known), len(known)
        lo, hi = wilson_interval(k, n)
        return cls(k, n, k / n if n else None, lo, hi)

    def to_dict(self) -> dict:
        return asdict(self)

    def cell(self) -> str:
        """'0.281 [0.155, 0.454] n=32' for tables."""
        if self.rate is None:
            return "- (n=0)"
        return f"{self.rate:.3f} [{self.lo:.3f}, {self.hi:.3f}] n={self.n}"
