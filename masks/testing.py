"""Synthetic routing for tests and benchmarks: router-like weights with known structure."""

from __future__ import annotations

from statistics import NormalDist

import torch

__all__ = ["random_router_probs"]


def random_router_probs(
    T: int,
    H: int,
    E: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    bias_HE: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Router-like weights [T, H, E] float32 following MONET's rule on standard-normal logits
    (plus an optional per-expert bias, to make some experts preferred): keep the experts whose
    logit is at least min(max logit, sigma), sigma = Phi^-1(1 - k/E), so each row keeps about
    k experts and at least one; softmax over the kept ones, the rest exactly 0."""
    z = torch.randn(T, H, E, generator=generator).to(device)
    if bias_HE is not None:  # then standardise each head, as the router's BatchNorm does
        z = z + bias_HE.to(device)
        z = (z - z.mean(dim=(0, 2), keepdim=True)) / z.std(dim=(0, 2), keepdim=True)
    sigma = NormalDist().inv_cdf(1 - k / E)
    threshold = z.amax(-1, keepdim=True).clamp_max(sigma)
    return torch.softmax(z.masked_fill(z < threshold, float("-inf")), dim=-1)
