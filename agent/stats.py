"""Statistics for evaluation reports: pure functions of counts.

- ``wilson``: the Wilson score interval of a success rate (Wilson 1927), which keeps its
  coverage for small batches and for rates near 0 or 1, where the normal approximation
  does not.
- ``paired_difference``: the difference between two success rates measured on the same
  tasks, with Newcombe's square-and-add interval for paired data (Newcombe 1998, method
  10), built from the two Wilson intervals and the correlation between the paired results.
- ``mcnemar_exact``: the exact (conditional binomial) McNemar test of "both solve as
  often": under it, each task that one solved and the other did not is a fair coin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile for ``confidence`` (1.96 for 0.95)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n``; ``(0, 1)`` when ``n`` is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes a bound is exactly 0 or 1; rounding must not move it.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True, slots=True)
class PairedDifference:
    """Rate A minus rate B over ``n`` tasks both ran, with its interval."""

    n: int
    estimate: float
    lo: float
    hi: float


def paired_difference(
    both: int, only_a: int, only_b: int, neither: int, confidence: float = 0.95
) -> PairedDifference:
    """Newcombe's interval for ``p_a - p_b`` from the paired 2x2 table: tasks both
    solved, only A solved, only B solved, neither solved."""
    counts = (both, only_a, only_b, neither)
    if min(counts) < 0:
        raise ValueError(f"counts must not be negative, got {counts}")
    n = sum(counts)
    if n == 0:
        return PairedDifference(0, 0.0, -1.0, 1.0)
    a_solved, b_solved = both + only_a, both + only_b
    p_a, p_b = a_solved / n, b_solved / n
    l_a, u_a = wilson(a_solved, n, confidence)
    l_b, u_b = wilson(b_solved, n, confidence)
    psi = _correlation(both, only_a, only_b, neither)
    d_lo = math.sqrt(
        max(0.0, (p_a - l_a) ** 2 + (u_b - p_b) ** 2 - 2 * psi * (p_a - l_a) * (u_b - p_b))
    )
    d_hi = math.sqrt(
        max(0.0, (p_b - l_b) ** 2 + (u_a - p_a) ** 2 - 2 * psi * (p_b - l_b) * (u_a - p_a))
    )
    estimate = p_a - p_b
    return PairedDifference(n, estimate, max(-1.0, estimate - d_lo), min(1.0, estimate + d_hi))


def _correlation(both: int, only_a: int, only_b: int, neither: int) -> float:
    """The phi coefficient of the paired table with Newcombe's continuity correction:
    a positive association is shrunk by n/2 (and to 0 if it is smaller), a negative one
    is kept; 0 when a margin is empty."""
    n = both + only_a + only_b + neither
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    if margins == 0:
        return 0.0
    cross = both * neither - only_a * only_b
    if cross > n / 2:
        return (cross - n / 2) / math.sqrt(margins)
    if cross >= 0:
        return 0.0
    return cross / math.sqrt(margins)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """The two-sided exact McNemar p-value: twice the smaller binomial tail of the
    discordant tasks at p = 1/2, at most 1; 1 when no task is discordant."""
    if min(only_a, only_b) < 0:
        raise ValueError("counts must not be negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile with linear interpolation between order statistics (the
    default of numpy and of R's type 7)."""
    if not values:
        return None
    if not 0 <= q <= 1:
        raise ValueError(f"q must be between 0 and 1, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
