"""Attention of a decode step on the CPU (Numba): a few queries per sequence against its cache.

torch's scaled_dot_product_attention runs a flash-attention kernel made for long query blocks;
with one query per sequence in bfloat16 it measured 1.2 ms per 850M layer at batch 8 and 100
cached positions, 12 ms at 1000 (2-core AVX512-BF16 CPU), where reading the cache once takes
a tenth of that. Here each (sequence, head) pair reads its keys and values once: scores in
float32 (bfloat16 widened by a bitcast, as kernels.sparse_cpu), a softmax over the positions
the mask keeps, the values' weighted sum. Grouped-query heads read their key-value head in
place. The pairs are split between the calling thread and its helper (the loops release the
GIL) when there is enough work for two.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from kernels.sparse_cpu import _bits_as_f32, _helper, _jit, _weights

__all__ = ["attention"]

_SPLIT_MIN_WORK = 1 << 18  # multiply-adds below which one thread runs all pairs


def _load(x):
    """x as a float32 (float32 as is, bfloat16 from its uint16 bits)."""


@numba.extending.overload(_load)
def _load_by_type(x):
    if x == numba.types.float32:
        return lambda x: x
    return lambda x: _bits_as_f32(np.uint32(x) << np.uint32(16))


@_jit
def _pairs(q, k, v, keep, out, p0, p1):
    """out[b, n, t] = softmax_s(q[b, n, t] . k[b, n // g, s] / sqrt(Dh), s kept) . v[b, n // g]
    for the (sequence, head) pairs p0 <= b * N + n < p1, over the first S = keep.shape[2]
    positions of k, v [B, K, S_max, Dh]; g = N / K query heads per key head."""
    B, N, T, Dh = q.shape
    S = keep.shape[2]
    group = N // k.shape[1]
    scale = np.float32(1.0 / math.sqrt(Dh))
    weights = np.empty(S, np.float32)
    acc = np.empty(Dh, np.float32)
    for p in range(p0, p1):
        b, n = p // N, p % N
        kv = n // group
        for t in range(T):
            top = -np.inf
            for s in range(S):
                if keep[b, t, s]:
                    score = np.float32(0)
                    for d in range(Dh):
                        score += q[b, n, t, d] * _load(k[b, kv, s, d])
                    score *= scale
                    weights[s] = score
                    top = max(top, score)
            total = np.float32(0)
            for s in range(S):
                if keep[b, t, s]:
                    w = np.float32(math.exp(weights[s] - top))
                    weights[s] = w
                    total += w
                else:
                    weights[s] = 0
            acc[:] = 0
            for s in range(S):
                w = weights[s]
                if w != 0:
                    for d in range(Dh):
                        acc[d] += w * _load(v[b, kv, s, d])
            for d in range(Dh):
                out[b, n, t, d] = acc[d] / total


def attention(q_BNTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
              keep_BTS: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, N, T, Dh] (any float dtype) where keep [B, T, S] (bool) is
    true, over the first S positions of k, v [B, K, S_max, Dh] (float32 or bfloat16, N a
    multiple of K; a cache, read in place when contiguous); every query keeps at least one
    position. float32 [B, N, T, Dh]."""
    B, N, T, Dh = q_BNTD.shape
    if keep_BTS.shape[2] > k_BKSD.shape[2]:
        raise ValueError(f"keep covers {keep_BTS.shape[2]} positions of {k_BKSD.shape[2]}")
    q = q_BNTD.detach().to(torch.float32).contiguous().numpy()
    k, v = (_weights(x.contiguous()) for x in (k_BKSD, v_BKSD))
    keep = keep_BTS.detach().contiguous().numpy()
    out = np.empty((B, N, T, Dh), np.float32)
    pairs = B * N
    if pairs > 1 and pairs * T * keep.shape[2] * Dh >= _SPLIT_MIN_WORK \
            and torch.get_num_threads() > 1:
        half = pairs // 2
        done = _helper().submit(_pairs, q, k, v, keep, out, half, pairs)
        _pairs(q, k, v, keep, out, 0, half)
        done.result()
    else:
        _pairs(q, k, v, keep, out, 0, pairs)
    return torch.from_numpy(out)
