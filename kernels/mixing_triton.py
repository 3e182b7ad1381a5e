"""Triton masked expert mixing (VD and HD): the inputs of the v projections, per-token profiles.

Three launches, each a program per token (S programs per token share its rows when T is small):
  1. _active_experts_kernel (only with a mask table; does nothing for tokens without a profile):
     the ids of each side's active experts, I [K1] and J [K2] (some g[h, e] > 0), into [T, E].
  2. _mix_vd_kernel / _mix_hd_kernel, the factorised path:
       head sums  s1[h] = sum_i g1[h,i] a_i,  s2[h] = sum_j g2[h,j] b_j                [H, M]
       rows       c1[i] = sum_h g1[h,i],  x12[i] = sum_h g1[h,i] s2[h],  x11[i] = c1[i] a_i,
                  and side 2 alike (c2, x21 from s1, x22); every row of a token without a
                  profile, only the inactive rows (all zero) of a masked token, whose head
                  sums go to a [T, sides, H, M] float32 scratch for launch 3.
  3. _masked_vd_kernel / _masked_hd_kernel, tokens with a profile only: each active row is the
     factorised value minus the masked active pairs, W[a, b] = sum_h g1[h,I_a] g2[h,J_b] where
     bit I_a*E + J_b of the profile's table row is set: c1[I_a] -= sum_b W[a,b],
     x12[I_a] -= sum_b W[a,b] b_{J_b}, and side 2 alike. O(K1 K2 (H + M)) per masked token.
Every output row is written by exactly one launch: no atomics, no barriers. The pair loops run
to counts read on the device, so there is no host synchronisation, and every shape (grids,
scratch) depends on T, E, H, M only: torch.compile and CUDA graphs can capture the launches.
g is cast to the activations' dtype first (as the reference), products and sums are float32
on the CUDA cores (H and M are too small for tensor cores, and float32 keeps the masked
cancellation exact), outputs take the activations' dtype.

Legend: T tokens, H routing heads, E experts per side, M expert width, P mask profiles,
W = ceil(E*E/32) words per table row, K1 / K2 active experts of a token on side 1 / 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.mixing import MixHD, MixVD

__all__ = ["mix_vd_triton", "mix_hd_triton"]

# Elements of the largest 3-D product tile ([H, experts, M] or [experts, experts, H or M]) per
# program: 4096 float32 over 128 threads keeps the dense kernels near 80 registers without
# spills at the release shapes (checked with ptxas for sm_80 / sm_90; untuned on hardware).
TILE_ELEMENTS = 4096


@triton.jit
def _compact_active(g_ptr, list_ptr, H, E, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    """Write the ids e with some g[h, e] > 0 (g: [H, E] of one token) to list_ptr; return count."""
    hs = tl.arange(0, BLOCK_H)
    count = tl.zeros([], dtype=tl.int32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        ok = (hs < H)[:, None] & (es < E)[None, :]
        g = tl.load(g_ptr + hs[:, None] * E + es[None, :], mask=ok, other=0.0)
        active = tl.max((g > 0).to(tl.int32), axis=0)  # [BLOCK_E] 0/1
        pos = count + tl.cumsum(active, axis=0) - 1
        tl.store(list_ptr + pos, es, mask=active != 0)
        count += tl.sum(active, axis=0)
    return count


@triton.jit
def _active_experts_kernel(
    g1_ptr,  # [T, H, E]
    g2_ptr,  # [T, H, E]
    profile_ptr,  # int32/int64 [T]
    I_ptr,  # int32 [T, E] out: active side-1 experts of masked tokens (first K1 entries)
    J_ptr,  # int32 [T, E] out: active side-2 experts (first K2 entries)
    count_ptr,  # int32 [T, 2] out: K1, K2 (masked tokens only; other rows are left as they are)
    H,
    E,
    BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if tl.load(profile_ptr + t) >= 0:
        k1 = _compact_active(g1_ptr + t * H * E, I_ptr + t * E, H, E, BLOCK_H, BLOCK_E)
        k2 = _compact_active(g2_ptr + t * H * E, J_ptr + t * E, H, E, BLOCK_H, BLOCK_E)
        tl.store(count_ptr + 2 * t, k1)
        tl.store(count_ptr + 2 * t + 1, k2)


@triton.jit
def _load_g(g_ptr, cols, col_ok, H, E, BLOCK_H: tl.constexpr, XDT: tl.constexpr):
    """g[:, cols] of one token as float32 [BLOCK_H, len(cols)], rounded to XDT first; active."""
    hs = tl.arange(0, BLOCK_H)
    ok = (hs < H)[:, None] & col_ok[None, :]
    g = tl.load(g_ptr + hs[:, None] * E + cols[None, :], mask=ok, other=0.0)
    active = tl.max((g > 0).to(tl.int32), axis=0) != 0  # the rule of _compact_active
    return g.to(XDT).to(tl.float32), active


@triton.jit
def _load_rows(x_ptr, rows, row_ok, M, BLOCK_M: tl.constexpr):
    """x[rows, :] of one token ([E, M] at x_ptr) as float32 [len(rows), BLOCK_M]."""
    ms = tl.arange(0, BLOCK_M)
    ok = row_ok[:, None] & (ms < M)[None, :]
    return tl.load(x_ptr + rows[:, None] * M + ms[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _head_sums(g_ptr, x_ptr, H, E, M, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_M: tl.constexpr, XDT: tl.constexpr):
    """s[h, :] = sum_e g[h, e] x[e, :] for one token: float32 [BLOCK_H, BLOCK_M]."""
    s = tl.zeros([BLOCK_H, BLOCK_M], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        g, active = _load_g(g_ptr, es, es < E, H, E, BLOCK_H, XDT)
        x = _load_rows(x_ptr, es, active, M, BLOCK_M)  # inactive rows are never read
        s += tl.sum(g[:, :, None] * x[None, :, :], axis=1)
    return s


@triton.jit
def _store_rows(mix_ptr, scaled_ptr, c_ptr, x_ptr, rows, row_ok, c, mix, M,
                BLOCK_M: tl.constexpr, WRITE_SCALED: tl.constexpr):
    """Store c[rows], mix[rows, :] and (VD) scaled[rows, :] = c[rows] x[rows, :]."""
    ms = tl.arange(0, BLOCK_M)
    ok = row_ok[:, None] & (ms < M)[None, :]
    offs = rows[:, None] * M + ms[None, :]
    tl.store(c_ptr + rows, c.to(c_ptr.dtype.element_ty), mask=row_ok)
    tl.store(mix_ptr + offs, mix.to(mix_ptr.dtype.element_ty), mask=ok)
    if WRITE_SCALED:
        x = _load_rows(x_ptr, rows, row_ok & (c != 0), M, BLOCK_M)
        tl.store(scaled_ptr + offs, (c[:, None] * x).to(scaled_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dense_rows(gd_ptr, s_src, xd_ptr, mix_ptr, scaled_ptr, c_ptr, masked, split, splits,
                H, E, M, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                XDT: tl.constexpr, WRITE_SCALED: tl.constexpr, HAS_MASK: tl.constexpr):
    """Factorised rows of one destination side: c = sum_h gd, mix = gd^T s_src, scaled = c xd.

    Rows of this program's split only; for a masked token only its inactive rows.
    """
    for e0 in range(split * BLOCK_E, E, splits * BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < E
        g, active = _load_g(gd_ptr, es, e_ok, H, E, BLOCK_H, XDT)  # [BLOCK_H, BLOCK_E]
        c = tl.sum(g, axis=0)
        mix = tl.sum(g[:, :, None] * s_src[:, None, :], axis=0)  # [BLOCK_E, BLOCK_M]
        row_ok = e_ok
        if HAS_MASK:  # a masked token's active rows are _masked_rows' to write
            row_ok = e_ok & ((active & masked) == 0)  # not `~`: the interpreter rejects it
        _store_rows(mix_ptr, scaled_ptr, c_ptr, xd_ptr, es, row_ok, c, mix, M, BLOCK_M,
                    WRITE_SCALED)


@triton.jit
def _masked_rows(gd_ptr, gs_ptr, s_src, xd_ptr, xs_ptr, mix_ptr, scaled_ptr, c_ptr,
                 list_d_ptr, list_s_ptr, k_d, k_s, mask_row_ptr, split, splits, H, E, M,
                 BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 XDT: tl.constexpr, DEST_IS_SIDE1: tl.constexpr, WRITE_SCALED: tl.constexpr):
    """Active rows of one destination side of a masked token: dense value minus masked pairs."""
    for k0 in range(split * BLOCK_K, k_d, splits * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_d
        dst = tl.load(list_d_ptr + ks, mask=k_ok, other=0)  # [BLOCK_K] expert ids
        g_d, _ = _load_g(gd_ptr, dst, k_ok, H, E, BLOCK_H, XDT)  # [BLOCK_H, BLOCK_K]
        c = tl.sum(g_d, axis=0)
        mix = tl.sum(g_d[:, :, None] * s_src[:, None, :], axis=0)  # [BLOCK_K, BLOCK_M]
        for j0 in range(0, k_s, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            j_ok = js < k_s
            src = tl.load(list_s_ptr + js, mask=j_ok, other=0)
            g_s, _ = _load_g(gs_ptr, src, j_ok, H, E, BLOCK_H, XDT)
            G = tl.sum(g_d[:, :, None] * g_s[:, None, :], axis=0)  # [BLOCK_K dst, BLOCK_K src]
            if DEST_IS_SIDE1:
                n = dst[:, None] * E + src[None, :]  # composite expert i * E + j
            else:
                n = src[None, :] * E + dst[:, None]
            ok = k_ok[:, None] & j_ok[None, :]
            word = tl.load(mask_row_ptr + (n >> 5), mask=ok, other=0)
            W = tl.where(ok & (((word >> (n & 31)) & 1) != 0), G, 0.0)
            c -= tl.sum(W, axis=1)
            x_s = _load_rows(xs_ptr, src, j_ok, M, BLOCK_M)  # [BLOCK_K, BLOCK_M]
            mix -= tl.sum(W[:, :, None] * x_s[None, :, :], axis=1)
        _store_rows(mix_ptr, scaled_ptr, c_ptr, xd_ptr, dst, k_ok, c, mix, M, BLOCK_M,
                    WRITE_SCALED)


@triton.jit
def _head_sums_io(s_ptr, s, STORE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr):
    """Store s [BLOCK_H, BLOCK_M] at s_ptr (STORE) or load it from there."""
    offs = tl.arange(0, BLOCK_H)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    if STORE:
        tl.store(s_ptr + offs, s)
        return s
    else:
        return tl.load(s_ptr + offs)


@triton.jit
def _mix_vd_kernel(
    a_ptr, b_ptr,  # [T, E, M] activations
    g1_ptr, g2_ptr,  # [T, H, E] router weights
    profile_ptr,  # int32/int64 [T], -1: no mask (HAS_MASK only)
    s_ptr,  # float32 [T, 2, BLOCK_H, BLOCK_M] out: head sums of masked tokens (HAS_MASK only)
    x11_ptr, x12_ptr, x21_ptr, x22_ptr,  # [T, E*M] outputs, a's dtype
    c1_ptr, c2_ptr,  # [T, E] outputs
    H, E, M,
    HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Phases 1 and 2 for token program_id(0), destination rows split over program_id(1)."""
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    XDT = a_ptr.dtype.element_ty
    g1, g2 = g1_ptr + t * H * E, g2_ptr + t * H * E
    tok = t * E * M  # this token's [E, M] block of activations and outputs
    a, b = a_ptr + tok, b_ptr + tok
    s1 = _head_sums(g1, a, H, E, M, BLOCK_H, BLOCK_E, BLOCK_M, XDT)  # [BLOCK_H, BLOCK_M]
    s2 = _head_sums(g2, b, H, E, M, BLOCK_H, BLOCK_E, BLOCK_M, XDT)
    masked = False
    if HAS_MASK:
        masked = tl.load(profile_ptr + t) >= 0
        if masked & (split == 0):  # for _masked_vd_kernel
            _head_sums_io(s_ptr + t * 2 * BLOCK_H * BLOCK_M, s1, True, BLOCK_H, BLOCK_M)
            _head_sums_io(s_ptr + (t * 2 + 1) * BLOCK_H * BLOCK_M, s2, True, BLOCK_H, BLOCK_M)
    _dense_rows(g1, s2, a, x12_ptr + tok, x11_ptr + tok, c1_ptr + t * E, masked, split, splits,
                H, E, M, BLOCK_H, BLOCK_E, BLOCK_M, XDT, True, HAS_MASK)
    _dense_rows(g2, s1, b, x21_ptr + tok, x22_ptr + tok, c2_ptr + t * E, masked, split, splits,
                H, E, M, BLOCK_H, BLOCK_E, BLOCK_M, XDT, True, HAS_MASK)


@triton.jit
def _masked_vd_kernel(
    a_ptr, b_ptr, g1_ptr, g2_ptr,  # as _mix_vd_kernel
    table_ptr,  # int32 [P, W] mask bitsets
    profile_ptr,  # int32/int64 [T], -1: no mask
    I_ptr, J_ptr, count_ptr,  # from _active_experts_kernel
    s_ptr,  # float32 [T, 2, BLOCK_H, BLOCK_M] from _mix_vd_kernel
    x11_ptr, x12_ptr, x21_ptr, x22_ptr, c1_ptr, c2_ptr,  # outputs, as _mix_vd_kernel
    H, E, M, W,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Phase 3 for token program_id(0) if it has a profile; active rows split over program_id(1)."""
    t = tl.program_id(0).to(tl.int64)
    profile = tl.load(profile_ptr + t)
    if profile >= 0:
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        XDT = a_ptr.dtype.element_ty
        g1, g2 = g1_ptr + t * H * E, g2_ptr + t * H * E
        tok = t * E * M
        a, b = a_ptr + tok, b_ptr + tok
        s1 = _head_sums_io(s_ptr + t * 2 * BLOCK_H * BLOCK_M, 0, False, BLOCK_H, BLOCK_M)
        s2 = _head_sums_io(s_ptr + (t * 2 + 1) * BLOCK_H * BLOCK_M, 0, False, BLOCK_H, BLOCK_M)
        k1 = tl.load(count_ptr + 2 * t)
        k2 = tl.load(count_ptr + 2 * t + 1)
        row = table_ptr + profile.to(tl.int64) * W
        I, J = I_ptr + t * E, J_ptr + t * E
        _masked_rows(g1, g2, s2, a, b, x12_ptr + tok, x11_ptr + tok, c1_ptr + t * E, I, J, k1,
                     k2, row, split, splits, H, E, M, BLOCK_H, BLOCK_K, BLOCK_M, XDT, True, True)
        _masked_rows(g2, g1, s1, b, a, x21_ptr + tok, x22_ptr + tok, c2_ptr + t * E, J, I, k2,
                     k1, row, split, splits, H, E, M, BLOCK_H, BLOCK_K, BLOCK_M, XDT, False,
                     True)


@triton.jit
def _mix_hd_kernel(
    x_ptr,  # [T, E, M] activations relu2(u y)
    g1_ptr, g2_ptr,  # [T, H, E]
    profile_ptr,  # as _mix_vd_kernel
    s_ptr,  # float32 [T, 1, BLOCK_H, BLOCK_M] out: head sums of masked tokens
    out_ptr,  # [T, E*M] output x, x's dtype
    c2_ptr,  # [T, E] output
    H, E, M,
    HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """HD phases 1 and 2: only side-2 destinations (out = x21, c2)."""
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    XDT = x_ptr.dtype.element_ty
    x = x_ptr + t * E * M
    s1 = _head_sums(g1_ptr + t * H * E, x, H, E, M, BLOCK_H, BLOCK_E, BLOCK_M, XDT)
    masked = False
    if HAS_MASK:
        masked = tl.load(profile_ptr + t) >= 0
        if masked & (split == 0):
            _head_sums_io(s_ptr + t * BLOCK_H * BLOCK_M, s1, True, BLOCK_H, BLOCK_M)
    _dense_rows(g2_ptr + t * H * E, s1, x, out_ptr + t * E * M, out_ptr, c2_ptr + t * E, masked,
                split, splits, H, E, M, BLOCK_H, BLOCK_E, BLOCK_M, XDT, False, HAS_MASK)


@triton.jit
def _masked_hd_kernel(
    x_ptr, g1_ptr, g2_ptr, table_ptr, profile_ptr, I_ptr, J_ptr, count_ptr,  # as the VD kernels
    s_ptr,  # float32 [T, 1, BLOCK_H, BLOCK_M] from _mix_hd_kernel
    out_ptr, c2_ptr,  # outputs, as _mix_hd_kernel
    H, E, M, W,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """HD phase 3: active side-2 rows of a token with a profile."""
    t = tl.program_id(0).to(tl.int64)
    profile = tl.load(profile_ptr + t)
    if profile >= 0:
        XDT = x_ptr.dtype.element_ty
        x = x_ptr + t * E * M
        s1 = _head_sums_io(s_ptr + t * BLOCK_H * BLOCK_M, 0, False, BLOCK_H, BLOCK_M)
        k1 = tl.load(count_ptr + 2 * t)
        k2 = tl.load(count_ptr + 2 * t + 1)
        row = table_ptr + profile.to(tl.int64) * W
        _masked_rows(g2_ptr + t * H * E, g1_ptr + t * H * E, s1, x, x, out_ptr + t * E * M,
                     out_ptr, c2_ptr + t * E, J_ptr + t * E, I_ptr + t * E, k2, k1, row,
                     tl.program_id(1), tl.num_programs(1), H, E, M, BLOCK_H, BLOCK_K, BLOCK_M,
                     XDT, False, False)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _blocks(H: int, E: int, M: int) -> tuple[dict[str, int], dict[str, int]]:
    """Tile sizes of the dense and the masked kernels.

    The contractions run on CUDA cores as broadcast products reduced over one axis (H and M
    are too small for tensor cores, and float32 keeps the masked cancellation exact), so each
    3-D product tile stays within TILE_ELEMENTS.
    """
    BLOCK_H, BLOCK_M = triton.next_power_of_2(H), triton.next_power_of_2(M)
    BLOCK_E = _pow2_at_most(TILE_ELEMENTS // (BLOCK_H * BLOCK_M))
    BLOCK_E = max(8, min(BLOCK_E, 128, triton.next_power_of_2(E)))
    BLOCK_K = _pow2_at_most(int((TILE_ELEMENTS // max(BLOCK_H, BLOCK_M)) ** 0.5))
    BLOCK_K = max(8, min(BLOCK_K, 32, triton.next_power_of_2(E)))
    return (
        {"BLOCK_H": BLOCK_H, "BLOCK_E": BLOCK_E, "BLOCK_M": BLOCK_M},
        {"BLOCK_H": BLOCK_H, "BLOCK_K": BLOCK_K, "BLOCK_M": BLOCK_M},
    )


def _grid(T: int, E: int, block: int) -> tuple[int, int]:
    """(T, programs per token): split a token's rows when T alone cannot fill the device."""
    return T, max(1, min(triton.cdiv(E, block), 256 // max(T, 1), 8))


def _masking(g1_THE, g2_THE, mask_table_PW, profile_T, sides: int, blocks: dict):
    """None without profiles, else (table, profile, I, J, counts, head-sum scratch), with the
    active-expert lists of the masked tokens written by _active_experts_kernel."""
    if mask_table_PW is None or mask_table_PW.shape[0] == 0:
        return None  # no table rows: every profile must be -1, so no token is masked
    T, H, E = g1_THE.shape
    dev = g1_THE.device
    profile = profile_T.contiguous()
    I_TE = torch.empty(T, E, dtype=torch.int32, device=dev)
    J_TE = torch.empty(T, E, dtype=torch.int32, device=dev)
    count_T2 = torch.empty(T, 2, dtype=torch.int32, device=dev)
    s = torch.empty(T, sides, blocks["BLOCK_H"], blocks["BLOCK_M"], dtype=torch.float32,
                    device=dev)
    _active_experts_kernel[(T,)](
        g1_THE, g2_THE, profile, I_TE, J_TE, count_T2, H, E,
        BLOCK_H=blocks["BLOCK_H"], BLOCK_E=64, num_warps=4,
    )
    return mask_table_PW.contiguous(), profile, I_TE, J_TE, count_T2, s


def mix_vd_triton(a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None) -> MixVD:
    """VD mixing on Triton; contract of kernels.mixing.mix_vd_reference (inputs checked there).

    profile_T values must be negative (no mask) or a row of mask_table_PW: they are not
    checked, as that would need a host synchronisation.
    """
    T, E, M = a_TEM.shape
    H = g1_THE.shape[1]
    a, b = a_TEM.contiguous(), b_TEM.contiguous()
    g1, g2 = g1_THE.contiguous(), g2_THE.contiguous()
    x11, x12, x21, x22 = (a.new_empty(T, E * M) for _ in range(4))
    c1, c2 = a.new_empty(T, E), a.new_empty(T, E)
    if T == 0 or E == 0:
        return MixVD(x11, x12, x21, x22, c1.zero_(), c2.zero_())
    dense, sparse = _blocks(H, E, M)
    masking = _masking(g1, g2, mask_table_PW, profile_T, 2, dense)
    profile, s = (masking[1], masking[5]) if masking else (g1, g1)  # unused without a mask
    _mix_vd_kernel[_grid(T, E, dense["BLOCK_E"])](
        a, b, g1, g2, profile, s, x11, x12, x21, x22, c1, c2, H, E, M,
        HAS_MASK=masking is not None, num_warps=4, **dense,
    )
    if masking:
        table, profile, I_TE, J_TE, count_T2, s = masking
        _masked_vd_kernel[_grid(T, E, sparse["BLOCK_K"])](
            a, b, g1, g2, table, profile, I_TE, J_TE, count_T2, s, x11, x12, x21, x22, c1, c2,
            H, E, M, table.shape[1], num_warps=4, **sparse,
        )
    return MixVD(x11, x12, x21, x22, c1, c2)


def mix_hd_triton(x_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None) -> MixHD:
    """HD mixing on Triton; contract of kernels.mixing.mix_hd_reference (inputs checked there)."""
    T, E, M = x_TEM.shape
    H = g1_THE.shape[1]
    x = x_TEM.contiguous()
    g1, g2 = g1_THE.contiguous(), g2_THE.contiguous()
    out, c2 = x.new_empty(T, E * M), x.new_empty(T, E)
    if T == 0 or E == 0:
        return MixHD(out, c2.zero_())
    dense, sparse = _blocks(H, E, M)
    masking = _masking(g1, g2, mask_table_PW, profile_T, 1, dense)
    profile, s = (masking[1], masking[5]) if masking else (g1, g1)
    _mix_hd_kernel[_grid(T, E, dense["BLOCK_E"])](
        x, g1, g2, profile, s, out, c2, H, E, M,
        HAS_MASK=masking is not None, num_warps=4, **dense,
    )
    if masking:
        table, profile, I_TE, J_TE, count_T2, s = masking
        _masked_hd_kernel[_grid(T, E, sparse["BLOCK_K"])](
            x, g1, g2, table, profile, I_TE, J_TE, count_T2, s, out, c2, H, E, M,
            table.shape[1], num_warps=4, **sparse,
        )
    return MixHD(out, c2)
