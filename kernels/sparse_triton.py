"""Gather-GEMV on CUDA as Triton kernels: the sparse decode path's two products over a few rows.

The sparse expert layers (kernels.sparse) multiply a decode step's T tokens (1..32) with the
rows of the active experts only, read in place from a large weight (same contracts as the
Numba loops in kernels.sparse_cpu):
  rows_dot   z[t, n] = W[rows[n]] . y[t] where use[t, n], else 0     (the u projection)
  rows_axpy  out[t] = sum_l x[t, l] W[rows[l]]                        (the v projection)
Each program owns a block of outputs (BLOCK_N rows of z, or BLOCK_D columns of out) for every
token and a slice of the reduction axis (D, or L): it reads its rows' slices once for all T
tokens, as float32 [rows, BLOCK_D] tiles, and multiplies them with every token in one
[BLOCK_T, rows, BLOCK_D] broadcast product on the CUDA cores (float32 keeps the products of
bfloat16 values exact; at T <= 32 the row reads, not the multiplies, should bound the time,
so tensor cores are left until a GPU measurement says otherwise). A row no token uses
(use all False, or x zero for every token: the padding experts) is never loaded. The
reduction axis is split over a second grid axis when the output blocks alone give too few
programs to fill the GPU; the splits write float32 partials [S, T, *] that one torch sum adds
(deterministic, no atomics). Weights float32, bfloat16 or float16; other operands any float
dtype, read as float32; output float32. Row indices are not range-checked (that would
synchronise with the host): they must lie in [0, R).

Legend: T tokens, D row width, R rows of W, N / L gathered rows, S splits of the reduction.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_TOKENS", "rows_axpy", "rows_dot"]

# The decode sizes these kernels are for: kernels.sparse uses them up to this T (a larger T is
# a GEMM's job); the launchers take any T, in blocks of at most MAX_TOKENS tokens.
MAX_TOKENS = 32
# Elements of the [BLOCK_T, rows, BLOCK_D] product tile per program: 4096 float32 over 128
# threads, the mixing kernels' budget (kernels.mixing_triton). Untuned on hardware.
TILE_ELEMENTS = 4096
# Split the reduction axis until the grid has about this many programs: two per SM of an
# H100 / H200 (132 SMs). Untuned on hardware.
MIN_PROGRAMS = 264
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rows_dot_kernel(
    w_ptr,  # [R, D] weights, contiguous
    rows_ptr,  # int64 [N]
    y_ptr,  # [T, D] activations, contiguous
    use_ptr,  # bool [T, N], contiguous
    part_ptr,  # float32 [S, T, N] out: the partial dot products of split s
    T, N, D,
    d_per_split,  # a multiple of BLOCK_D
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z rows n of program_id(0)'s block, tokens of program_id(2)'s block, d of split 1."""
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    ts = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_ok, t_ok = ns < N, ts < T
    tn_ok = t_ok[:, None] & n_ok[None, :]
    use = tl.load(use_ptr + ts[:, None] * N + ns[None, :], mask=tn_ok, other=0) != 0
    used = n_ok & (tl.max(use.to(tl.int32), axis=0) != 0)  # [BLOCK_N]: some token needs row n
    rows = tl.load(rows_ptr + ns, mask=used, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    d_first = split * d_per_split
    for d0 in range(0, d_per_split, BLOCK_D):
        ds = d_first + d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        w = tl.load(w_ptr + rows[:, None] * D + ds[None, :], mask=used[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]: unused rows never read
        y = tl.load(y_ptr + ts[:, None] * D + ds[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        acc += tl.sum(y[:, None, :] * w[None, :, :], axis=2)
    acc = tl.where(use, acc, 0.0)
    offs = (split * T).to(tl.int64) * N + ts[:, None] * N + ns[None, :]
    tl.store(part_ptr + offs, acc, mask=tn_ok)


@triton.jit
def _rows_axpy_kernel(
    w_ptr,  # [R, D] table, contiguous
    rows_ptr,  # int64 [L]
    x_ptr,  # [T, L] row weights, contiguous
    part_ptr,  # float32 [S, T, D] out: the partial sums of split s
    T, L, D,
    l_per_split,  # a multiple of BLOCK_L
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out columns d of program_id(0)'s block, tokens of program_id(2)'s, rows l of split 1."""
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    ts = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_ok, t_ok = ds < D, ts < T
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    l_first = split * l_per_split
    for l0 in range(0, l_per_split, BLOCK_L):
        ls = l_first + l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        x = tl.load(x_ptr + ts[:, None] * L + ls[None, :], mask=t_ok[:, None] & l_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_L]
        used = l_ok & (tl.max((x != 0).to(tl.int32), axis=0) != 0)  # some token weighs row l
        rows = tl.load(rows_ptr + ls, mask=used, other=0).to(tl.int64)
        w = tl.load(w_ptr + rows[:, None] * D + ds[None, :], mask=used[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_D]: zero-weight rows never read
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    offs = (split * T).to(tl.int64) * D + ts[:, None] * D + ds[None, :]
    tl.store(part_ptr + offs, acc, mask=t_ok[:, None] & d_ok[None, :])


def _check(W_RD: torch.Tensor, rows: torch.Tensor, name: str) -> None:
    if W_RD.dim() != 2 or W_RD.dtype not in WEIGHT_DTYPES or not W_RD.is_contiguous():
        raise ValueError(f"{name}: weight must be a contiguous [R, D] tensor of "
                         f"{WEIGHT_DTYPES}, got {tuple(W_RD.shape)} {W_RD.dtype}"
                         f"{'' if W_RD.is_contiguous() else ' (not contiguous)'}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"{name}: rows must be int64 [N], got {tuple(rows.shape)} {rows.dtype}")
    if not W_RD.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {W_RD.device}")


def _same_device(name: str, W_RD: torch.Tensor, **tensors: torch.Tensor) -> None:
    for key, t in tensors.items():
        if t.device != W_RD.device:
            raise ValueError(f"{name}: {key} is on {t.device}, the weight on {W_RD.device}")


def _float(name: str, key: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name}: {key} must be floating point, got {t.dtype}")


def _blocks(T: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_rows): one token block, a column tile of up to 128 (at least
    16 wide), and as many rows as the product tile's budget leaves."""
    BLOCK_T = triton.next_power_of_2(max(1, min(T, MAX_TOKENS)))
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), 128)
    while BLOCK_T * BLOCK_D > TILE_ELEMENTS // 2 and BLOCK_D > 16:
        BLOCK_D //= 2
    return BLOCK_T, BLOCK_D, max(1, TILE_ELEMENTS // (BLOCK_T * BLOCK_D))


def _splits(programs: int, chunks: int) -> tuple[int, int]:
    """(S, chunks per split): split `chunks` reduction tiles until about MIN_PROGRAMS run."""
    splits = max(1, min(chunks, MIN_PROGRAMS // max(programs, 1)))
    per_split = triton.cdiv(chunks, splits)
    return triton.cdiv(chunks, per_split), per_split


def rows_dot(W_RD: torch.Tensor, rows_N: torch.Tensor, y_TD: torch.Tensor,
             use_TN: torch.Tensor) -> torch.Tensor:
    """z[t, n] = W[rows[n]] . y[t] where use[t, n], else 0: float32 [T, N] on W's device.

    W [R, D] contiguous float32 / bfloat16 / float16; rows int64 [N]; y [T, D] float; use bool
    [T, N]. Rows no token uses are not read. Same contract as kernels.sparse_cpu.rows_dot.
    """
    name = "rows_dot"
    _check(W_RD, rows_N, name)
    _same_device(name, W_RD, rows=rows_N, y=y_TD, use=use_TN)
    _float(name, "y", y_TD)
    (R, D), N = W_RD.shape, rows_N.shape[0]
    if y_TD.dim() != 2 or y_TD.shape[1] != D:
        raise ValueError(f"{name}: y must be [T, {D}], got {tuple(y_TD.shape)}")
    T = y_TD.shape[0]
    if use_TN.dtype != torch.bool or use_TN.shape != (T, N):
        raise ValueError(f"{name}: use must be bool [{T}, {N}], got {tuple(use_TN.shape)} "
                         f"{use_TN.dtype}")
    if T == 0 or N == 0 or D == 0:
        return torch.zeros(T, N, dtype=torch.float32, device=W_RD.device)
    BLOCK_T, BLOCK_D, budget = _blocks(T, D)
    BLOCK_N = min(triton.next_power_of_2(N), budget)
    t_blocks, n_blocks = triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N)
    S, per_split = _splits(t_blocks * n_blocks, triton.cdiv(D, BLOCK_D))
    part = torch.empty(S, T, N, dtype=torch.float32, device=W_RD.device)
    _rows_dot_kernel[(n_blocks, S, t_blocks)](
        W_RD, rows_N.contiguous(), y_TD.contiguous(), use_TN.contiguous(), part, T, N, D,
        per_split * BLOCK_D, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return part[0] if S == 1 else part.sum(0)


def rows_axpy(W_RD: torch.Tensor, rows_L: torch.Tensor, x_TL: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_l x[t, l] W[rows[l]]: float32 [T, D] on W's device.

    W [R, D] contiguous float32 / bfloat16 / float16; rows int64 [L]; x [T, L] float. Rows
    with a zero weight for every token are not read. Same contract as
    kernels.sparse_cpu.rows_axpy.
    """
    name = "rows_axpy"
    _check(W_RD, rows_L, name)
    _same_device(name, W_RD, rows=rows_L, weights=x_TL)
    _float(name, "weights", x_TL)
    (R, D), L = W_RD.shape, rows_L.shape[0]
    if x_TL.dim() != 2 or x_TL.shape[1] != L:
        raise ValueError(f"{name}: weights must be [T, {L}], got {tuple(x_TL.shape)}")
    T = x_TL.shape[0]
    if T == 0 or L == 0 or D == 0:
        return torch.zeros(T, D, dtype=torch.float32, device=W_RD.device)
    BLOCK_T, BLOCK_D, budget = _blocks(T, D)
    BLOCK_L = min(triton.next_power_of_2(L), budget)
    t_blocks, d_blocks = triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D)
    S, per_split = _splits(t_blocks * d_blocks, triton.cdiv(L, BLOCK_L))
    part = torch.empty(S, T, D, dtype=torch.float32, device=W_RD.device)
    _rows_axpy_kernel[(d_blocks, S, t_blocks)](
        W_RD, rows_L.contiguous(), x_TL.contiguous(), part, T, L, D, per_split * BLOCK_L,
        BLOCK_T=BLOCK_T, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return part[0] if S == 1 else part.sum(0)
