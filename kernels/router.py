"""MONET router: BatchNorm threshold over raw logits, softmax over the kept experts.

For one side (w1 or w2) of a routing layer, per token t and routing head h:
    n = (z - running_mean[h]) / sqrt(running_var[h] + eps)
    t = min(max_e n[e], sigma)              sigma = Phi^-1(1 - k / E)
    g = softmax_e(z[e] if n[e] >= t else -1e10)
so each token keeps about k experts per head, always at least one (the arg max of n).

Legend: T tokens, H routing heads, E experts per side.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
import torch.nn.functional as F

__all__ = ["route", "route_reference", "router_sigma"]

# The authors' release writes -1e10 rather than -inf for dropped experts; exp() of either is 0.
DROPPED_LOGIT = -1e10


def router_sigma(topk: int, num_experts: int) -> float:
    """The BatchNorm threshold Phi^-1(1 - k/E) (standard normal quantile)."""
    if not 0 < topk < num_experts:
        raise ValueError(f"moe_topk must be in (0, moe_experts), got {topk} of {num_experts}")
    return NormalDist().inv_cdf(1.0 - topk / num_experts)


def route_reference(
    z_THE: torch.Tensor,
    running_mean_H: torch.Tensor,
    running_var_H: torch.Tensor,
    *,
    sigma: float,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain-torch router for one side. z_THE: raw logits [T, H, E] (float32 or float64).

    Returns g_THE [T, H, E] in z's dtype; each [t, h, :] sums to 1.
    """
    # F.batch_norm on [T, H, E] normalises channel h with its running statistics: the same
    # arithmetic as the reference's BatchNorm1d(H) in eval mode, so ties break the same way.
    n_THE = F.batch_norm(
        z_THE,
        running_mean_H.to(z_THE.dtype),
        running_var_H.to(z_THE.dtype),
        training=False,
        eps=eps,
    )
    threshold_TH1 = n_THE.amax(-1, keepdim=True).clamp_max(sigma)
    kept_THE = torch.where(n_THE >= threshold_TH1, z_THE, DROPPED_LOGIT)
    return torch.softmax(kept_THE, dim=-1)


# The CPU loops take steps of up to this many logits (T H E); beyond, the reference's threaded
# operations win. 850M routing (H 6, E 512), passive threads, loops / reference: 0.65x at 64
# tokens, 1.76x at 256, 1.42x at 1024, 1.35x at 2048.
CPU_MAX_LOGITS = 1 << 18


def route(
    z_THE: torch.Tensor,
    running_mean_H: torch.Tensor,
    running_var_H: torch.Tensor,
    *,
    sigma: float,
    eps: float = 1e-5,
    impl: str | None = None,
) -> torch.Tensor:
    """Router launcher: checks shapes and dtypes, runs Triton on CUDA, the compiled loops
    (kernels.router_cpu) on CPU logits that autograd does not track, the reference elsewhere.

    impl: None picks (Triton for float32 CUDA logits, the loops for float32 CPU ones of a
    step of at most CPU_MAX_LOGITS), "triton" forces the Triton kernel (on CPU it needs
    TRITON_INTERPRET=1; float32 only), "cpu" the loops (float32 CPU logits), "reference" the
    plain-torch router.
    """
    if z_THE.dim() != 3:
        raise ValueError(f"router logits must be [T, H, E], got {tuple(z_THE.shape)}")
    H = z_THE.shape[1]
    if running_mean_H.shape != (H,) or running_var_H.shape != (H,):
        raise ValueError(
            f"running statistics must be [{H}], got {tuple(running_mean_H.shape)} "
            f"and {tuple(running_var_H.shape)}"
        )
    if z_THE.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"router logits must be float32 or float64, got {z_THE.dtype}")
    from kernels import triton_available

    if impl is None:
        tracked = torch.is_grad_enabled() and z_THE.requires_grad
        if z_THE.dtype != torch.float32 or tracked:
            impl = "reference"
        elif z_THE.is_cuda:
            impl = "triton" if triton_available() else "reference"
        else:
            cpu = z_THE.device.type == "cpu" and z_THE.numel() <= CPU_MAX_LOGITS
            impl = "cpu" if cpu else "reference"
    elif impl not in ("triton", "cpu", "reference"):
        raise ValueError(f"impl must be None, 'triton', 'cpu' or 'reference', got {impl!r}")
    if impl == "triton":
        from kernels.router_triton import route_triton

        return route_triton(
            z_THE.contiguous(), running_mean_H, running_var_H, sigma=sigma, eps=eps
        )
    if impl == "cpu":
        if z_THE.device.type != "cpu" or z_THE.dtype != torch.float32:
            raise TypeError(f"the CPU router loops take float32 CPU logits, got "
                            f"{z_THE.device.type} {z_THE.dtype}")
        from kernels import router_cpu

        return router_cpu.route(z_THE, running_mean_H, running_var_H, sigma=sigma, eps=eps)
    return route_reference(z_THE, running_mean_H, running_var_H, sigma=sigma, eps=eps)
