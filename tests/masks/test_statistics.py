"""Routing statistics: the dense and sparse accumulations against a naive per-token E x E
reference (float64), on router-like weights with exact zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masks.statistics import (
    CorrelationAccumulator,
    LabelAccumulator,
    LabelStatistics,
    composite_square_sums,
    composite_sums,
    group_layers,
)
from masks.testing import random_router_probs


def naive_G(g1, g2):  # [T, E, E] per-token composite weights, reference only
    return torch.einsum("thi,thj->tij", g1.double(), g2.double())


def routing(T, H, E, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return (random_router_probs(T, H, E, k, generator=gen),
            random_router_probs(T, H, E, k, generator=gen))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(0, 40), H=st.integers(1, 4), E=st.sampled_from([3, 8, 17, 70]),
       groups=st.integers(1, 3), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_composite_sums_match_the_naive_reference(T, H, E, groups, weighted, seed):
    g1, g2 = routing(T, H, E, min(3, E - 1) or 1, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    groups_T = torch.randint(0, groups, (T,), generator=gen)
    weights_T = torch.randn(T, generator=gen) if weighted else None
    G = naive_G(g1, g2)
    if weighted:
        G = G * weights_T.double()[:, None, None]
    want = torch.stack([G[groups_T == n].sum(0) for n in range(groups)])
    for method in ("dense", "sparse"):
        got = composite_sums(g1, g2, groups_T=groups_T, num_groups=groups,
                             weights_T=weights_T, method=method)
        assert got.dtype == torch.float64 and got.shape == (groups, E, E)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(0, 40), H=st.integers(1, 4), E=st.sampled_from([3, 8, 17, 70]),
       seed=st.integers(0, 2**16))
def test_square_sums_add_heads_before_squaring(T, H, E, seed):
    g1, g2 = routing(T, H, E, min(3, E - 1) or 1, seed)
    want = naive_G(g1, g2).square().sum(0)
    for method in ("dense", "sparse"):
        got = composite_square_sums(g1, g2, method=method, chunk=7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_every_token_on_one_expert():
    T, H, E = 5, 2, 8
    g1 = torch.zeros(T, H, E)
    g1[:, :, 3] = 1
    g2 = torch.zeros(T, H, E)
    g2[:, :, 6] = 1
    for method in ("dense", "sparse"):
        sums = composite_sums(g1, g2, method=method)[0]
        assert sums[3, 6] == T * H and sums.sum() == T * H
        assert composite_square_sums(g1, g2, method=method)[3, 6] == T * H * H


def test_unrestricted_router_rows_are_kept_whole():
    """A row may keep many experts (k is an expected count): the sparse path must see all."""
    T, H, E = 6, 2, 40
    g1 = torch.softmax(torch.randn(T, H, E), -1)  # dense rows: every expert nonzero
    g2, _ = routing(T, H, E, 2, 0)
    want = naive_G(g1, g2).sum(0)
    torch.testing.assert_close(composite_sums(g1, g2, method="sparse")[0], want)


def test_label_accumulator_and_save_load(tmp_path):
    E, H, T = 8, 2, 30
    acc = LabelAccumulator(routing_layers=[0, 2], num_layers=4, num_experts=E, num_heads=H,
                           groups=2)
    batches = []
    for seed in range(3):
        probs = {0: routing(T, H, E, 3, seed), 2: routing(T, H, E, 3, seed + 10)}
        labels = ["a" if t % 3 else "b" for t in range(T)]
        if seed == 2:
            labels = ["c"] * T
        acc.add(probs, labels)
        batches.append((probs, labels))
    stats = acc.result(model_id="m", corpus_fingerprint="fp")
    assert stats.labels == ["a", "b", "c"]
    assert stats.tokens.tolist() == [40, 20, 30]
    for r, layer in enumerate([0, 2]):
        for n, label in enumerate(stats.labels):
            want = sum(naive_G(*p[layer])[[l == label for l in ls]].sum(0) for p, ls in batches)
            np.testing.assert_allclose(stats.mass[n, r], want.numpy(), rtol=1e-6, atol=1e-9)
    total = stats.mean().sum(axis=(2, 3))  # sum_ij g_ij = H for every token
    np.testing.assert_allclose(total, H)
    loaded = LabelStatistics.load(stats.save(tmp_path / "s.npz"))
    assert loaded.labels == stats.labels and loaded.model_id == "m"
    np.testing.assert_array_equal(loaded.mass, stats.mass)
    assert group_layers(2, groups=2, num_layers=4) == [2, 3]
    assert group_layers(4, groups=4, num_layers=6) == [4, 5]


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_correlation_accumulator_matches_scipy(method):
    scipy_stats = pytest.importorskip("scipy.stats")
    E, H = 6, 2
    acc = CorrelationAccumulator(routing_layers=[0], num_layers=1, num_experts=E, num_heads=H,
                                 groups=1, method=method)
    xs, ss = [], []
    for seed in range(3):
        g1, g2 = (g.double() for g in routing(50, H, E, 2, seed))
        s = torch.rand(50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        acc.add({0: (g1, g2)}, s)
        xs.append(naive_G(g1, g2))
        ss.append(s.double())
    x, s = torch.cat(xs).numpy(), torch.cat(ss).numpy()
    r = acc.result().pearson()[0]
    for i in range(E):
        for j in range(E):
            if np.ptp(x[:, i, j]) == 0:
                assert np.isnan(r[i, j])
            else:
                want = scipy_stats.pearsonr(x[:, i, j], s).statistic
                assert r[i, j] == pytest.approx(want, abs=1e-9)


def test_sparse_path_in_token_chunks(monkeypatch):
    import masks.statistics as statistics

    monkeypatch.setattr(statistics, "_SPARSE_CHUNK", 5)
    g1, g2 = routing(23, 3, 20, 3, 7)
    groups_T = torch.arange(23) % 2
    weights_T = torch.rand(23)
    G = naive_G(g1, g2)
    want = torch.stack([(G * weights_T.double()[:, None, None])[groups_T == n].sum(0)
                        for n in range(2)])
    got = composite_sums(g1, g2, groups_T=groups_T, num_groups=2, weights_T=weights_T,
                         method="sparse")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(composite_square_sums(g1, g2, method="sparse"),
                               G.square().sum(0), rtol=1e-5, atol=1e-7)
