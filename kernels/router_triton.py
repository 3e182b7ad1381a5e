"""Triton router kernel: BatchNorm threshold over raw logits, softmax over the kept experts.

One program normalises BLOCK_R rows (row r = t * H + h of the logits) of E experts each, all in
registers: n = (z - mean[h]) * rsqrt(var[h] + eps), threshold min(max_e n, sigma), softmax of the
raw z over the kept experts. The arg max of n is always kept, so each row keeps at least one
expert; equal n values are kept or dropped together (ties). Output is the dense g [T, H, E] that
kernels.mixing consumes; the mixing kernels build their own per-token lists of active experts, and
only for masked tokens, so the router writes nothing else. The projection y @ w.T stays a cuBLAS
GEMM, not fused: fusing would save the round trip of z (T*H*E*4 bytes each way), small next to
the GEMM's weight read (H*E*D) at decode; at prefill it could save about a third (left for later).

Legend: T tokens, H routing heads, E experts per side, R = T * H rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["route_triton"]

# Largest E handled by one row tile; the releases use E = 512.
MAX_BLOCK_E = 16384


@triton.jit
def _route_kernel(
    z_ptr,  # float32 [R, E], R = T * H, contiguous
    mean_ptr,  # [H] running mean
    var_ptr,  # [H] running variance
    g_ptr,  # float32 [R, E] output
    R,
    H,
    E,
    sigma,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """g[r, :] = softmax over e of (z[r, e] if n[r, e] >= min(max_e n[r, :], sigma) else -inf)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = rows < R
    col_ok = (cols < E)[None, :]  # [1, BLOCK_E]
    ok = row_ok[:, None] & col_ok  # [BLOCK_R, BLOCK_E]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h = rows % H
    mean = tl.load(mean_ptr + h, mask=row_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + h, mask=row_ok, other=1.0).to(tl.float32)
    # IEEE-rounded sqrt and division: the threshold compares n with sigma exactly.
    rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(var + eps))
    # Rows past R compute on z = 0 (finite, never stored); columns past E are never kept.
    n = tl.where(col_ok, (z - mean[:, None]) * rstd[:, None], -float("inf"))
    threshold = tl.minimum(tl.max(n, axis=1), sigma)  # [BLOCK_R]
    kept = col_ok & (n >= threshold[:, None])
    z_kept = tl.where(kept, z, -float("inf"))
    z_max = tl.max(z_kept, axis=1)
    p = tl.where(kept, tl.exp(z_kept - z_max[:, None]), 0.0)
    g = p / tl.sum(p, axis=1)[:, None]
    tl.store(g_ptr + offs, g, mask=ok)


def route_triton(
    z_THE: torch.Tensor,
    running_mean_H: torch.Tensor,
    running_var_H: torch.Tensor,
    *,
    sigma: float,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Router on Triton. z_THE: float32 [T, H, E] contiguous raw logits; returns float32 g_THE.

    Same contract as kernels.router.route_reference. No host synchronisation; the launch grid
    depends on the shape only.
    """
    if z_THE.dtype != torch.float32 or not z_THE.is_contiguous():
        raise ValueError("route_triton needs contiguous float32 logits")
    T, H, E = z_THE.shape
    BLOCK_E = triton.next_power_of_2(E)
    if BLOCK_E > MAX_BLOCK_E:
        raise ValueError(f"route_triton handles E <= {MAX_BLOCK_E}, got {E}")
    g_THE = torch.empty_like(z_THE)
    R = T * H
    if R == 0:
        return g_THE
    # About 4096 logits per program: enough work per program, rows stay in registers.
    BLOCK_R = min(max(1, 4096 // BLOCK_E), triton.next_power_of_2(R))
    grid = (triton.cdiv(R, BLOCK_R),)
    _route_kernel[grid](
        z_THE,
        running_mean_H.contiguous(),
        running_var_H.contiguous(),
        g_THE,
        R,
        H,
        E,
        float(sigma),
        float(eps),
        BLOCK_R=BLOCK_R,
        BLOCK_E=BLOCK_E,
        num_warps=4,
    )
    return g_THE
