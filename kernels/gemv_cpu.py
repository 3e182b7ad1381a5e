"""Matrix-vector products for decode steps on the CPU (Numba): x W^T for a few tokens x.

A decode step of the release shapes is a few dozen products of one to a few tokens with
weights of 2-100 MB, which only streaming the weights bounds. torch's bfloat16 product
(oneDNN, no prepacking) read about 10 GB/s there at one token; these loops read each weight
row once per step, widen bfloat16 by a bitcast (as kernels.sparse_cpu), dot it with every
token, and split the rows between the calling thread and its helper (the loops release the
GIL). float32 accumulation; the caller rounds to its dtype, as torch's product does.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.sparse_cpu import _dot, _helper, _jit, _weights

__all__ = ["gemv"]

_SPLIT_MIN_ROWS = 256  # fewer rows: one thread (the hand-off would cost more than it saves)


@_jit
def _rows(W, x, out, r0, r1):
    """out[t, r] = W[r] . x[t] for rows r0 <= r < r1."""
    T = x.shape[0]
    for r in range(r0, r1):
        for t in range(T):
            out[t, r] = _dot(W, r, x, t)


def gemv(x_TD: torch.Tensor, weight_ND: torch.Tensor) -> torch.Tensor:
    """x [T, D] (any float dtype) times weight [N, D]^T (float32 or bfloat16, C-contiguous,
    read in place): float32 [T, N]."""
    T, N = x_TD.shape[0], weight_ND.shape[0]
    x = x_TD.detach().to(torch.float32).contiguous().numpy()
    W = _weights(weight_ND)
    out = np.empty((T, N), np.float32)
    if N >= _SPLIT_MIN_ROWS and torch.get_num_threads() > 1:
        half = N // 2
        done = _helper().submit(_rows, W, x, out, half, N)
        _rows(W, x, out, 0, half)
        done.result()
    else:
        _rows(W, x, out, 0, N)
    return torch.from_numpy(out)
