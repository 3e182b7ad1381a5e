"""Gather-GEMV on the CPU as compiled loops (Numba): weight rows read in place, per token.

The sparse expert layers (kernels.sparse) need two products over a few rows of a large
weight: the u projection at the active experts (`rows_dot`: out[t, l] = W[rows[l]] . y[t]) and
the v projection over the packed table (`rows_axpy`: out[t] = sum_l x[t, l] W[rows[l]]).
torch does the first only by copying the rows out (index_select: slow for bfloat16, and a
second pass over the bytes) and the second with embedding_bag. Here each row is read once
for all the step's tokens, and a token skips the rows of experts it does not use (`use`,
[T, L]), so a step of several tokens costs the union of their rows in bytes but only each
token's own rows in arithmetic. float32 and bfloat16 weights (bfloat16 passed as its uint16
bits, widened to float32 per row); float32 accumulation. Serial loops, GIL released.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np
import torch

__all__ = ["rows_axpy", "rows_dot"]

_jit = numba.njit(cache=True, nogil=True, fastmath=True)


def _row(W, r, bits, buf):
    """Row r of W as float32: the row itself when W is float32; bfloat16 bits (uint16) are
    widened into buf (bits is buf's uint32 view). Chosen by W's type at compile time."""


@numba.extending.overload(_row)
def _row_by_type(W, r, bits, buf):
    if W.dtype == numba.types.float32:
        return lambda W, r, bits, buf: W[r]

    def widen(W, r, bits, buf):
        for d in range(W.shape[1]):
            bits[d] = np.uint32(W[r, d]) << 16
        return buf

    return widen


@_jit
def _rows_dot(W, rows, y, use, out):
    T, D = y.shape
    bits = np.empty(D, np.uint32)
    buf = bits.view(np.float32)
    for l in range(rows.shape[0]):
        if not use[:, l].any():
            continue
        w = _row(W, rows[l], bits, buf)
        for t in range(T):
            if use[t, l]:
                acc = np.float32(0)
                for d in range(D):
                    acc += w[d] * y[t, d]
                out[t, l] = acc


@_jit
def _rows_axpy(W, rows, x, out):
    T, D = out.shape
    bits = np.empty(D, np.uint32)
    buf = bits.view(np.float32)
    for l in range(rows.shape[0]):
        if not (x[:, l] != 0).any():
            continue
        w = _row(W, rows[l], bits, buf)
        for t in range(T):
            s = x[t, l]
            if s != 0:
                for d in range(D):
                    out[t, d] += s * w[d]


def _weights(W: torch.Tensor) -> np.ndarray:
    if W.dtype == torch.bfloat16:
        return W.view(torch.int16).numpy().view(np.uint16)
    return W.numpy()


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).contiguous().numpy()


def rows_dot(W_RD: torch.Tensor, rows_L: torch.Tensor, y_TD: torch.Tensor,
             use_TL: torch.Tensor) -> torch.Tensor:
    """out[t, l] = W[rows[l]] . y[t] where use[t, l], else 0: float32 [T, L]. W [R, D]
    contiguous float32 or bfloat16; rows int64 [L]; y [T, D]; use bool [T, L]."""
    out = torch.zeros(y_TD.shape[0], rows_L.shape[0], dtype=torch.float32)
    _rows_dot(_weights(W_RD), rows_L.numpy(), _f32(y_TD), use_TL.contiguous().numpy(),
              out.numpy())
    return out


def rows_axpy(W_RD: torch.Tensor, rows_L: torch.Tensor, x_TL: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_l x[t, l] W[rows[l]]: float32 [T, D]. W [R, D] contiguous float32 or
    bfloat16; rows int64 [L]; x [T, L]."""
    out = torch.zeros(x_TL.shape[0], W_RD.shape[1], dtype=torch.float32)
    _rows_axpy(_weights(W_RD), rows_L.numpy(), _f32(x_TL), out.numpy())
    return out
