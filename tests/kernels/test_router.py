"""Router: Triton kernel and reference against the spec's router written out in float64.

The kernel thresholds float32 n = (z - mean) / std; the oracle thresholds float64 n. They may
disagree only on experts whose n lies within 1e-5 of the threshold (but not on it): rows holding
such an expert are left out of the element-wise comparison, and must be rare.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_data import LaunchRecorder, meta, naive_route, router_logits

import kernels

BOUNDARY = 1e-5


def sigma_for(E: int) -> float:
    return kernels.router_sigma(max(1, min(8, E // 4)), E)


def assert_route_close(g_THE, z_THE, mean_H, var_H, *, sigma, max_ambiguous=0.01):
    """g (any impl) against naive_route: same kept experts, same weights, outside ambiguous rows."""
    want, n, threshold = naive_route(z_THE, mean_H, var_H, sigma=sigma)
    d = n - threshold
    ambiguous_TH = ((d != 0) & (d.abs() < BOUNDARY)).any(-1)
    assert ambiguous_TH.double().mean() <= max_ambiguous
    sure = ~ambiguous_TH
    got = g_THE.double().cpu()
    assert torch.equal(got[sure] > 0, want[sure] > 0), "kept experts differ"
    torch.testing.assert_close(got[sure], want[sure], atol=2e-6, rtol=1e-5)
    sums = got.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert ((got > 0).sum(-1) >= 1).all(), "a row kept no expert"


# The grid in the interpreter: T in {1, 7, 128}, E in {16, 24, 512}, H in {1, 4, 8}.
TRITON_GRID = list(itertools.product((1, 7, 128), (16, 24, 512), (1, 4, 8)))


@pytest.mark.parametrize(("T", "E", "H"), TRITON_GRID)
def test_triton_matches_spec(device, T, E, H):
    z, mean, var = router_logits(T, H, E, seed=T * 1000 + E + H)
    sigma = sigma_for(E)
    g = kernels.route(z.to(device), mean.to(device), var.to(device), sigma=sigma, impl="triton")
    assert g.dtype == torch.float32 and g.shape == z.shape and g.is_contiguous()
    assert_route_close(g, z, mean, var, sigma=sigma)


CPU_GRID = [(1, 16, 1), (7, 24, 4), (1, 512, 6), (8, 512, 6), (128, 512, 8), (1000, 512, 8)]


@pytest.mark.parametrize(("T", "E", "H"), CPU_GRID)
def test_cpu_loops_match_spec_and_reference(T, E, H):
    """The compiled loops against the float64 spec, and against the reference: the same kept
    experts everywhere (n is batch_norm's arithmetic, so even ambiguous rows agree)."""
    z, mean, var = router_logits(T, H, E, seed=T + E + H + 1)
    sigma = sigma_for(E)
    g = kernels.route(z, mean, var, sigma=sigma, impl="cpu")
    assert g.dtype == torch.float32 and g.shape == z.shape and g.is_contiguous()
    assert_route_close(g, z, mean, var, sigma=sigma)
    ref = kernels.route(z, mean, var, sigma=sigma, impl="reference")
    assert torch.equal(g > 0, ref > 0)
    torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)


def test_cpu_loops_on_nan_logits_give_rows_that_sum_to_one():
    z, mean, var = router_logits(2, 2, 16, seed=4)
    z[0, 1] = float("nan")
    g = kernels.route(z, mean, var, sigma=sigma_for(16), impl="cpu")
    torch.testing.assert_close(g[0, 1], torch.full((16,), 1 / 16))
    assert_route_close(g[1:], z[1:], mean, var, sigma=sigma_for(16))


def test_cpu_loops_on_non_contiguous_logits_and_float64_statistics():
    z, mean, var = router_logits(5, 4, 48, seed=3)
    z = z[:, :, ::2]
    g = kernels.route(z, mean.double(), var.double(), sigma=sigma_for(24), impl="cpu")
    assert_route_close(g, z, mean, var, sigma=sigma_for(24))


@pytest.mark.parametrize(("T", "E", "H"), [(1, 16, 1), (7, 24, 4), (128, 512, 8), (1000, 512, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_spec(T, E, H, dtype):
    z, mean, var = router_logits(T, H, E, seed=T + E + H)
    sigma = sigma_for(E)
    g = kernels.route(z.to(dtype), mean, var, sigma=sigma, impl="reference")
    assert g.dtype == dtype
    assert_route_close(g, z, mean, var, sigma=sigma)


def test_keeps_about_k_experts():
    """Logits drawn from the running statistics: E * P(n >= sigma) = k experts per head."""
    T, H, E, k = 1000, 8, 512, 8
    z, mean, var = router_logits(T, H, E, seed=7)
    g = kernels.route(z, mean, var, sigma=kernels.router_sigma(k, E))
    kept = (g > 0).sum(-1).double()
    assert kept.min() >= 1
    assert abs(kept.mean().item() - k) < 0.3


def tie_rows(E: int, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of n values with exactly equal entries, as z, and their expected g (float64)."""
    sigma = sigma_for(E)
    n_rows, expected = [], []
    n = torch.zeros(E)  # all equal, below sigma: all kept, uniform
    n_rows.append(n)
    expected.append(torch.full((E,), 1.0 / E))
    n = torch.full((E,), -1.0)  # two equal maxima below sigma: both kept, half each
    n[3] = n[7] = sigma / 2
    n_rows.append(n)
    e = torch.zeros(E)
    e[3] = e[7] = 0.5
    expected.append(e)
    n = 10.0 + torch.arange(E) / E  # every n above sigma: all kept, softmax of the raw z
    n_rows.append(n)
    expected.append(None)
    n = torch.full((E,), -2.0)  # three equal values above sigma, the rest below
    n[[0, 5, E - 1]] = sigma + 1.0
    n_rows.append(n)
    e = torch.zeros(E)
    e[[0, 5, E - 1]] = 1.0 / 3
    expected.append(e)
    z = torch.stack(n_rows) * std + mean  # equal n give equal z, so ties survive rounding
    want = torch.stack([torch.softmax(z[i].double(), -1) if x is None else x.double()
                        for i, x in enumerate(expected)])
    return z, want


@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
def test_ties(request, impl):
    device = request.getfixturevalue("device") if impl == "triton" else torch.device("cpu")
    E, H = 16, 2
    mean = torch.tensor([0.25, -1.5])
    var = torch.tensor([4.0, 0.5])
    rows = [tie_rows(E, mean[h].item(), (var[h] + 1e-5).sqrt().item()) for h in range(H)]
    z = torch.stack([r[0] for r in rows], dim=1)  # [T=4, H, E]
    want = torch.stack([r[1] for r in rows], dim=1)
    g = kernels.route(z.to(device), mean.to(device), var.to(device), sigma=sigma_for(E),
                      impl=impl)
    torch.testing.assert_close(g.double().cpu(), want, atol=1e-6, rtol=1e-5)
    assert torch.equal(g.cpu() > 0, want > 0)


def test_non_contiguous_logits(device):
    T, H, E = 5, 4, 24
    z, mean, var = router_logits(T, H, 2 * E, seed=3)
    z = z[:, :, ::2]  # strided view
    g = kernels.route(z.to(device), mean.to(device), var.to(device), sigma=sigma_for(E),
                      impl="triton")
    assert_route_close(g, z, mean, var, sigma=sigma_for(E))


def test_launcher_checks_inputs():
    z, mean, var = router_logits(3, 2, 16, seed=0)
    sigma = sigma_for(16)
    with pytest.raises(ValueError, match=r"\[T, H, E\]"):
        kernels.route(z[0], mean, var, sigma=sigma)
    with pytest.raises(ValueError, match="running statistics"):
        kernels.route(z, mean[:1], var, sigma=sigma)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.route(z.half(), mean, var, sigma=sigma)
    with pytest.raises(ValueError, match="impl"):
        kernels.route(z, mean, var, sigma=sigma, impl="gpu")
    with pytest.raises(TypeError, match="float32 CPU logits"):
        kernels.route(z.double(), mean, var, sigma=sigma, impl="cpu")
    with pytest.raises(ValueError, match="moe_topk"):
        kernels.router_sigma(16, 16)


def test_cpu_logits_take_the_loops_unless_tracked_or_float64(monkeypatch):
    import kernels.router as router
    import kernels.router_cpu as rc

    if kernels.triton_available():
        import kernels.router_triton as rt

        monkeypatch.setattr(rt, "route_triton", lambda *a, **k: pytest.fail("Triton on CPU"))
    calls = []
    monkeypatch.setattr(rc, "route", lambda *a, **k: calls.append("cpu"))
    reference = router.route_reference
    monkeypatch.setattr(router, "route_reference",
                        lambda *a, **k: calls.append("reference") or reference(*a, **k))
    z, mean, var = router_logits(3, 2, 16, seed=0)
    kernels.route(z, mean, var, sigma=sigma_for(16))
    kernels.route(z.double(), mean, var, sigma=sigma_for(16))
    kernels.route(z.clone().requires_grad_(), mean, var, sigma=sigma_for(16))
    with torch.no_grad():
        kernels.route(z.clone().requires_grad_(), mean, var, sigma=sigma_for(16))
    many = kernels.router.CPU_MAX_LOGITS // 32 + 1  # a long prefill: the threaded reference
    kernels.route(router_logits(many, 2, 16, seed=1)[0], mean, var, sigma=sigma_for(16))
    assert calls == ["cpu", "reference", "reference", "cpu", "reference"]


def test_triton_launcher_never_syncs(monkeypatch):
    """route on data-less (meta) tensors: no value is read on the host."""
    pytest.importorskip("triton")
    import kernels.router_triton as rt

    calls: list = []
    monkeypatch.setattr(rt, "_route_kernel", LaunchRecorder("_route_kernel", calls))
    g = kernels.route(meta(7, 4, 512), meta(4), meta(4), sigma=sigma_for(512), impl="triton")
    assert g.device.type == "meta" and g.shape == (7, 4, 512) and g.dtype == torch.float32
    assert len(calls) == 1
