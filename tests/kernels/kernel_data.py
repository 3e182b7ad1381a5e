"""Seeded inputs, mask tables and naive float64 oracles shared by the kernel tests.

The naive mixing builds the E x E composite weights G[t, i, j] = sum_h g1[t,h,i] g2[t,h,j] per
token, zeroes the masked entries and contracts: the O(E^2) way that the kernels must equal.

Legend: T tokens, H routing heads, E experts per side, M expert width, P mask profiles.
"""

from __future__ import annotations

import math

import torch

import kernels
from kernels.mixing import bitset_words

# Tolerance of a kernel output against the float64 oracle, relative to the output's scale
# (its bound H * max|x|): float32 accumulates in float32, bfloat16 also rounds g and outputs.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def router_logits(T: int, H: int, E: int, *, seed: int):
    """z [T, H, E] float32 drawn from the BatchNorm's running statistics, and those statistics."""
    gen = generator(seed)
    mean_H = torch.randn(H, generator=gen, dtype=torch.float64) * 0.5
    var_H = torch.rand(H, generator=gen, dtype=torch.float64) * 2 + 0.25
    z = torch.randn(T, H, E, generator=gen, dtype=torch.float64)
    z_THE = (mean_H[:, None] + var_H.sqrt()[:, None] * z).float()
    return z_THE, mean_H.float(), var_H.float()


def router_weights(T: int, H: int, E: int, *, seed: int, dtype=torch.float32):
    """Realistic sparse g [T, H, E] from the reference router (about k kept per head).

    float64 g sums to 1 per head to 1e-16: the factorised mixing relies on that sum, so float64
    tests use float64 g (float32 g alone puts the factorised and dense sums 1e-7 apart).
    """
    k = max(1, min(8, E // 4))
    z_THE, mean_H, var_H = router_logits(T, H, E, seed=seed)
    z_THE, mean_H, var_H = z_THE.to(dtype), mean_H.to(dtype), var_H.to(dtype)
    return kernels.route_reference(z_THE, mean_H, var_H, sigma=kernels.router_sigma(k, E))


def one_expert_weights(T: int, H: int, E: int, expert: int) -> torch.Tensor:
    """Every token and head routes all its weight to one expert: g [T, H, E] one-hot."""
    g = torch.zeros(T, H, E)
    g[:, :, expert] = 1.0
    return g


def activations(T: int, E: int, M: int, *, seed: int, dtype=torch.float32) -> torch.Tensor:
    """relu2-like activations [T, E, M]: non-negative, a few exact zeros."""
    x = torch.randn(T, E, M, generator=generator(seed), dtype=torch.float64)
    return x.clamp_min(0).square().to(dtype)


def pack_masks(masked_PEE: torch.Tensor) -> torch.Tensor:
    """bool [P, E, E] (True: composite expert (i, j) removed) -> int32 [P, W] bitset table."""
    P, E, _ = masked_PEE.shape
    W = bitset_words(E)
    bits = torch.zeros(P, W * 32, dtype=torch.int64)
    bits[:, : E * E] = masked_PEE.reshape(P, E * E).long()
    words = (bits.view(P, W, 32) << torch.arange(32)).sum(-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_masks(table_PW: torch.Tensor, E: int) -> torch.Tensor:
    """int32 [P, W] bitset table -> bool [P, E, E]."""
    P = table_PW.shape[0]
    bits = (table_PW.long()[:, :, None] >> torch.arange(32)) & 1
    return bits.reshape(P, -1)[:, : E * E].reshape(P, E, E).bool()


def random_masks(P: int, E: int, *, density: float, seed: int) -> torch.Tensor:
    return torch.rand(P, E, E, generator=generator(seed)) < density


def mixed_profiles(T: int, P: int, *, seed: int) -> torch.Tensor:
    """profile_T [T] int64 cycling through -1 (no mask) and every profile, shuffled."""
    cycle = torch.arange(-1, P).repeat(math.ceil(T / (P + 1)))[:T]
    return cycle[torch.randperm(T, generator=generator(seed))]


def _composite_weights(g1_THE, g2_THE, table_PW, profile_T) -> torch.Tensor:
    """G [t, E, E] float64 with the masked pairs of each token's profile zeroed."""
    G = torch.einsum("thi,thj->tij", g1_THE.double(), g2_THE.double())
    if table_PW is not None:
        E = G.shape[-1]
        has_profile = (profile_T >= 0)[:, None, None]
        removed = unpack_masks(table_PW, E)[profile_T.clamp_min(0)] & has_profile
        G = G.masked_fill(removed, 0.0)
    return G


def _chunks(T: int, E: int):
    step = max(1, (1 << 23) // (E * E))  # at most 64 MiB of float64 G at a time
    return [slice(t, min(t + step, T)) for t in range(0, T, step)]


def naive_mix_vd(a_TEM, b_TEM, g1_THE, g2_THE, table_PW=None, profile_T=None) -> dict:
    """MixVD fields in float64 from the dense masked E x E weights."""
    T, E, M = a_TEM.shape
    a, b = a_TEM.double(), b_TEM.double()
    out = {name: [] for name in ("x11", "x12", "x21", "x22", "c1", "c2")}
    for s in _chunks(T, E):
        prof = None if profile_T is None else profile_T[s]
        G = _composite_weights(g1_THE[s], g2_THE[s], table_PW, prof)
        c1, c2 = G.sum(2), G.sum(1)
        out["c1"].append(c1)
        out["c2"].append(c2)
        out["x11"].append((c1[:, :, None] * a[s]).flatten(1))
        out["x12"].append(torch.bmm(G, b[s]).flatten(1))
        out["x21"].append(torch.bmm(G.transpose(1, 2), a[s]).flatten(1))
        out["x22"].append((c2[:, :, None] * b[s]).flatten(1))
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def naive_mix_hd(x_TEM, g1_THE, g2_THE, table_PW=None, profile_T=None) -> dict:
    """MixHD fields in float64 from the dense masked E x E weights."""
    T, E, M = x_TEM.shape
    x = x_TEM.double()
    out = {"x": [], "c2": []}
    for s in _chunks(T, E):
        prof = None if profile_T is None else profile_T[s]
        G = _composite_weights(g1_THE[s], g2_THE[s], table_PW, prof)
        out["x"].append(torch.bmm(G.transpose(1, 2), x[s]).flatten(1))
        out["c2"].append(G.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def assert_mix_close(out, expected: dict, *, dtype: torch.dtype, scale: float, rows=None):
    """Every field of a MixVD / MixHD against the oracle, within TOL[dtype] * scale."""
    tol = TOL[dtype] * scale
    for name in out._fields:
        got, want = getattr(out, name).double(), expected[name]
        if rows is not None:
            got, want = got[rows], want[rows]
        torch.testing.assert_close(got, want, atol=tol, rtol=0.0, msg=lambda m, n=name: f"{n}: {m}")


def naive_route(z_THE, mean_H, var_H, *, sigma: float, eps: float = 1e-5):
    """The spec's router in float64, written out (no F.batch_norm): g [T, H, E], n, threshold."""
    z = z_THE.double()
    n = (z - mean_H.double()[:, None]) / torch.sqrt(var_H.double()[:, None] + eps)
    threshold = n.amax(-1, keepdim=True).clamp_max(sigma)
    kept = n >= threshold
    g = torch.softmax(z.masked_fill(~kept, -math.inf), dim=-1)
    return g, n, threshold


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: records kernel[grid](*args, **kwargs) launches."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, tuple(grid), args, kwargs))

        return launch


def meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    """A tensor without data: reading a value of it (a host synchronisation) raises."""
    return torch.empty(*shape, dtype=dtype, device="meta")
