"""Report statistics against published worked examples and, where installed, scipy."""

from __future__ import annotations

import itertools

import pytest

from agent.stats import mcnemar_exact, mean, paired_difference, quantile, wilson, z_value


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion",
        # the Wilson score method on its examples
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombes_worked_examples(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_edges() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 10)[0] == 0.0
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_newcombes_paired_interval_matches_the_published_example() -> None:
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8:
    # complete response before and after consolidation therapy (Cavo et al., 2012),
    # Newcombe square-and-add: -0.0621 (95% CI -0.1186 to -0.0046)
    d = paired_difference(59, 6, 16, 80)
    assert d.n == 161
    assert (d.estimate, d.lo, d.hi) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=5e-5)


def test_the_paired_interval_is_antisymmetric_and_contains_its_estimate() -> None:
    for both, a, b, neither in itertools.product(range(0, 7, 2), repeat=4):
        d = paired_difference(both, a, b, neither)
        r = paired_difference(both, b, a, neither)
        if d.n:
            assert d.lo <= d.estimate <= d.hi
            assert (r.lo, r.hi) == pytest.approx((-d.hi, -d.lo))
            assert d.lo >= -1 and d.hi <= 1


def test_exact_mcnemar_matches_the_binomial_tail() -> None:
    # 6 against 16 discordant tasks: 2 * P(X <= 6), X ~ Bin(22, 1/2) = 2 * 110056 / 2**22
    assert mcnemar_exact(6, 16) == pytest.approx(2 * 110056 / 2**22)
    assert mcnemar_exact(16, 6) == mcnemar_exact(6, 16)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0  # capped, not 2 * P(X <= 5)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)


def test_against_scipy_where_it_is_installed() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (1, 7, 30, 263):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
            ci90 = scipy_stats.binomtest(k, n).proportion_ci(0.9, method="wilson")
            assert wilson(k, n, 0.9) == pytest.approx((ci90.low, ci90.high), abs=1e-12)
    for a, b in itertools.product(range(0, 25, 3), repeat=2):
        if a + b:
            p = scipy_stats.binomtest(a, a + b, 0.5).pvalue
            assert mcnemar_exact(a, b) == pytest.approx(p, rel=1e-9)


def test_summaries() -> None:
    assert mean([]) is None and mean([1, 2, 6]) == 3
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([5], 0.95) == 5 and quantile([], 0.5) is None
    np = pytest.importorskip("numpy")
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for q in (0.0, 0.1, 0.5, 0.95, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
