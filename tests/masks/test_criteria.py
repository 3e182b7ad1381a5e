"""Criteria on synthetic routing statistics with known answers, Pearson against numpy/scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from masks.criteria import (
    correlated_experts,
    pearson_from_sums,
    specific_experts,
    specificity,
)

# Four experts, three labels. Columns: expert 0 is label 0's (4x the second), expert 1 is
# shared, expert 2 is label 0's by exactly 2x, expert 3 is label 0's but almost unused.
W = np.array([
    [0.40, 0.30, 0.20, 0.0002],
    [0.10, 0.30, 0.10, 0.0000],
    [0.05, 0.25, 0.05, 0.0001],
])


def test_paper_criterion_factor_two():
    assert specific_experts(W, 0).tolist() == [True, False, True, True]
    assert specific_experts(W, 1).tolist() == [False, False, False, False]


def test_factor_is_configurable():
    assert specific_experts(W, 0, factor=3.0).tolist() == [True, False, False, False]
    assert specific_experts(W, 0, factor=1.0).tolist() == [True, True, True, True]
    assert specific_experts(W, 1, factor=1.0).tolist() == [False, True, False, False]


def test_floor_drops_experts_nobody_uses():
    assert specific_experts(W, 0, floor=0.01).tolist() == [True, False, True, False]
    # an expert nobody routes to is never selected, even with no other label
    assert not specific_experts(np.zeros((2, 3)), 0, factor=None).any()


def test_specificity_ratio():
    np.testing.assert_allclose(specificity(W, 0)[:3], [4.0, 1.0, 2.0])
    assert specificity(W, 2)[3] == pytest.approx(0.5)
    assert specificity(np.array([[1.0, 0.0], [0.0, 0.0]]), 0).tolist() == [np.inf, 0.0]


def test_coverage_takes_most_specific_first():
    # label 0's experts by specificity: e0 (inf), e1 (5x), e2 (2x), e3 (1.5x), e4 (0.5x)
    w = np.array([
        [0.30, 0.25, 0.20, 0.15, 0.10],
        [0.00, 0.05, 0.10, 0.10, 0.20],
    ])
    pick = lambda c, **kw: np.flatnonzero(specific_experts(w, 0, coverage=c, **kw)).tolist()
    assert pick(0.30, factor=None) == [0]
    assert pick(0.31, factor=None) == [0, 1]
    assert pick(0.55, factor=None) == [0, 1]
    assert pick(0.90, factor=None) == [0, 1, 2, 3]
    assert pick(1.00, factor=None) == [0, 1, 2, 3, 4]
    assert pick(1.00, factor=2.0) == [0, 1, 2]  # coverage never adds what the factor excludes
    with pytest.raises(ValueError):
        specific_experts(w, 0, coverage=0.0)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (3, 30), elements=st.floats(0, 1)),
       st.floats(0.05, 1.0), st.integers(0, 2))
def test_coverage_properties(w, coverage, target):
    chosen = specific_experts(w, target, factor=None, coverage=coverage)
    own = w[target]
    if own.sum() == 0:
        assert not chosen.any()
        return
    assert own[chosen].sum() >= coverage * own.sum() - 1e-9
    # minimal: dropping the least specific chosen expert falls short
    ratio = specificity(w, target)
    if chosen.sum() > 1:
        idx = np.flatnonzero(chosen)
        worst = idx[np.lexsort((-own[idx], -ratio[idx]))[-1]]
        assert own[chosen].sum() - own[worst] < coverage * own.sum() + 1e-9
    # monotone in coverage
    more = specific_experts(w, target, factor=None, coverage=min(1.0, coverage + 0.2))
    assert (more | chosen).sum() == more.sum()


def test_pearson_from_sums_against_numpy_and_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    n, N = 500, 40
    s = rng.random(n)
    x = rng.random((n, N)) * (rng.random((n, N)) < 0.3)  # sparse like routing weights
    x[:, 0] = 2 * s + 0.1 * rng.random(n)  # strongly correlated
    x[:, 1] = -s  # anti-correlated
    x[:, 2] = 0.0  # constant: undefined
    r = pearson_from_sums(n, s.sum(), (s * s).sum(), x.sum(0), (x * x).sum(0), (x * s[:, None]).sum(0))
    for e in range(N):
        if e == 2:
            assert np.isnan(r[e])
            continue
        assert r[e] == pytest.approx(np.corrcoef(x[:, e], s)[0, 1], abs=1e-10)
        assert r[e] == pytest.approx(scipy_stats.pearsonr(x[:, e], s).statistic, abs=1e-10)
    assert r[1] == pytest.approx(-1.0)


def test_correlated_experts_thresholds():
    r = np.array([0.3, 0.2, 0.15, 0.07, 0.01, -0.5, np.nan])
    assert correlated_experts(r, 0.2).tolist() == [True, False, False, False, False, False, False]
    assert correlated_experts(r, 0.1).sum() == 3
    assert correlated_experts(r, 0.05).sum() == 4
