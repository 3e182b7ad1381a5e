"""Expert mixing on the CPU as compiled loops (Numba) over the router's nonzero entries.

A token's router weights are sparse: about k of the E experts per head pass the threshold. The
reference (kernels.mixing) computes the factorised sums with batched matrix products over all
E experts, and a masked token's pairs with some 80 small tensor ops; at a decode step (tens of
tokens) their fixed cost is most of the layer's mixing. Here:

- `_row_entries`, once per routing group (pairs_cache): the nonzero entries of each (t, h)
  router row, as CSR lists;
- `_mix_pairs` (through `_mix_vd` / `_mix_hd`), per layer and token: the factorised sums over
  those entries only (per head, A = sum_i g1[h,i] a_i, then x21[j] += g2[h,j] A and c2[j] +=
  g2[h,j]; VD also the mirror image into x12 and c1), then, for a masked token, every pair of
  a head's side-1 and side-2 entries is looked up in the token's bitset row, and a masked one
  removes w = g1[h,i] g2[h,j] of its terms, as the reference does;
- `_rescale`: x11 = a c1 and x22 = b c2 at the active experts (zero elsewhere).

The outputs equal the reference's up to the order of the sums (tested against it and against
the naive E x E oracle). float32 and float64 activations; bfloat16 and float16 ones are mixed
in float32 and the outputs rounded once (the reference rounds every product: a dense masked
bfloat16 step of 8 tokens at the 850M shape took it 1.3-1.6x the unmasked one). The loops are
serial and release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kernels.mixing import MixHD, MixVD, _any_profile

__all__ = ["mix_hd_cpu", "mix_vd_cpu"]

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _row_entries(g_THE):
    """(start [T*H+1], index): row r = t*H + h lists the experts i with g[t,h,i] != 0 at
    index[start[r]:start[r+1]]."""
    T, H, E = g_THE.shape
    start = np.zeros(T * H + 1, np.int64)
    index = np.empty(T * H * E, np.int32)  # only the used prefix is ever touched
    n = 0
    for t in range(T):
        for h in range(H):
            for i in range(E):
                if g_THE[t, h, i] != 0:
                    index[n] = i
                    n += 1
            start[t * H + h + 1] = n
    return start, index[:n]


@_jit
def _touch_rows(table, profile, start1, index1, H, E):
    """Check that every profile names a row of the table (the loops do not bound-check), and
    load each masked token's side-1 experts' table rows before the pair loop: independent
    loads, so the cache misses of a decode step (a row per expert; the tables are cold after
    the weights streamed through) overlap instead of stalling the pair loop one by one (about
    -40% for the loop at 32 tokens). Returns a sum of the words, so the loads are kept."""
    touched = 0
    for t in range(profile.shape[0]):
        p = profile[t]
        if p >= table.shape[0]:
            raise IndexError("profile_T names a row beyond the mask table")
        if p >= 0:
            for u in range(start1[t * H], start1[t * H + H]):
                touched += table[p, (index1[u] * E) >> 5]
    return touched


@_jit
def _mix_through(x, g_src, start_src, index_src, g_dst, start_dst, index_dst, out, c, t, h, r,
                 acc):
    """Head h of token t (row r of the entries), one side into the other: A = sum_s g_src[s]
    x[t, s], then out[t, d] += g_dst[d] A and c[t, d] += g_dst[d] at the destination entries."""
    acc[:] = 0
    for u in range(start_src[r], start_src[r + 1]):
        s = index_src[u]
        for m in range(acc.shape[0]):
            acc[m] += g_src[t, h, s] * x[t, s, m]
    for v in range(start_dst[r], start_dst[r + 1]):
        d = index_dst[v]
        c[t, d] += g_dst[t, h, d]
        for m in range(acc.shape[0]):
            out[t, d, m] += g_dst[t, h, d] * acc[m]


@_jit
def _mix_pairs(a, b, g1, g2, table, profile, start1, index1, start2, index2,
               x21, c2, x12, c1, side1):
    """Into zeroed outputs, per token: the factorised sums over the token's entries, x21[t, j]
    = sum_h g2[h,j] sum_i g1[h,i] a[t, i] and c2[t, j] = sum_h g2[h,j] (with side1 also x12 and
    c1, the mirror image); then for a masked token each pair (i, j) of a head's entries is
    looked up in its table row, and a masked one removes w = g1[h,i] g2[h,j]: x21[t, j] -= w
    a[t, i] and c2[t, j] -= w, with side1 also x12[t, i] -= w b[t, j] and c1[t, i] -= w."""
    T, H, E = g1.shape
    M = a.shape[2]
    touched = _touch_rows(table, profile, start1, index1, H, E)
    acc = np.empty(M, a.dtype)
    for t in range(T):
        for h in range(H):
            r = t * H + h
            _mix_through(a, g1, start1, index1, g2, start2, index2, x21, c2, t, h, r, acc)
            if side1:
                _mix_through(b, g2, start2, index2, g1, start1, index1, x12, c1, t, h, r, acc)
        p = profile[t]
        if p < 0:
            continue
        for h in range(H):
            r = t * H + h
            for u in range(start1[r], start1[r + 1]):
                i = index1[u]
                gi = g1[t, h, i]
                for v in range(start2[r], start2[r + 1]):
                    j = index2[v]
                    n = i * E + j
                    if (table[p, n >> 5] >> (n & 31)) & 1:
                        w = -(gi * g2[t, h, j])
                        c2[t, j] += w
                        for m in range(M):
                            x21[t, j, m] += a[t, i, m] * w
                        if side1:
                            c1[t, i] += w
                            for m in range(M):
                                x12[t, i, m] += b[t, j, m] * w
    return touched


@_jit
def _rescale(x, out, c, start, index, H):
    """out[t, i] = x[t, i] c[t, i]: at the active experts i of each token, zero elsewhere
    (where c is zero)."""
    for t in range(x.shape[0]):
        for u in range(start[t * H], start[t * H + H]):
            i = index[u]
            for m in range(x.shape[2]):
                out[t, i, m] = x[t, i, m] * c[t, i]


@_jit
def _mix_vd(a, b, g1, g2, table, profile, start1, index1, start2, index2,
            x11, x12, x21, x22, c1, c2):
    H = g1.shape[1]
    touched = _mix_pairs(a, b, g1, g2, table, profile, start1, index1, start2, index2,
                         x21, c2, x12, c1, True)
    _rescale(a, x11, c1, start1, index1, H)
    _rescale(b, x22, c2, start2, index2, H)
    return touched


@_jit
def _mix_hd(x, g1, g2, table, profile, start1, index1, start2, index2, out, c2):
    return _mix_pairs(x, x, g1, g2, table, profile, start1, index1, start2, index2,
                      out, c2, out, c2, False)


def _arrays(*tensors: torch.Tensor):
    """numpy views in the loops' dtype (16-bit tensors widened to float32 copies)."""
    return [t.detach().to(_work_dtype(t.dtype) if t.is_floating_point() else t.dtype)
            .contiguous().numpy() for t in tensors]


_NO_TABLE = np.zeros((1, 1), np.int32)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loops' dtype for activations of dtype: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(x_TEM, g1_THE, g2_THE, table_PW, profile_T, pairs_cache):
    """g rounded to the activations' dtype (as the reference's weights) in the loops' dtype,
    the table and profile (every token unmasked when none) and the routing group's entries
    (from pairs_cache when a layer of the group found them)."""
    T, dtype = x_TEM.shape[0], x_TEM.dtype
    work = _work_dtype(dtype)
    g1, g2 = _arrays(g1_THE.to(dtype).to(work), g2_THE.to(dtype).to(work))
    if _any_profile(profile_T, T):
        table, profile = _arrays(table_PW, profile_T.long())
    else:
        table, profile = _NO_TABLE, np.full(T, -1, np.int64)
    key = ("cpu", dtype)
    entries = pairs_cache.get(key) if pairs_cache is not None else None
    if entries is None:
        entries = (*_row_entries(g1), *_row_entries(g2))
        if pairs_cache is not None:
            pairs_cache[key] = entries
    return g1, g2, table, profile, entries


def _zeros(shape, like: torch.Tensor) -> torch.Tensor:
    # torch's fill (threaded); zeroing each token's rows in the loops instead measured slower
    # beyond a few hundred tokens
    return torch.zeros(shape, dtype=_work_dtype(like.dtype))


def mix_vd_cpu(a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None,
               pairs_cache=None) -> MixVD:
    """mix_vd_reference's outputs (up to the order of the sums). Shapes and pairs_cache as
    mix_vd_reference; the launcher (kernels.mix_vd) checks the inputs."""
    T, E, M = a_TEM.shape
    g1, g2, table, profile, entries = _inputs(a_TEM, g1_THE, g2_THE, mask_table_PW, profile_T,
                                              pairs_cache)
    x11, x12, x21, x22 = (_zeros((T, E, M), a_TEM) for _ in range(4))
    c1, c2 = _zeros((T, E), a_TEM), _zeros((T, E), a_TEM)
    a, b = _arrays(a_TEM, b_TEM)
    _mix_vd(a, b, g1, g2, table, profile, *entries,
            *(x.numpy() for x in (x11, x12, x21, x22, c1, c2)))
    dtype = a_TEM.dtype
    return MixVD(*(x.view(T, E * M).to(dtype) for x in (x11, x12, x21, x22)), c1.to(dtype),
                 c2.to(dtype))


def mix_hd_cpu(x_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None,
               pairs_cache=None) -> MixHD:
    """mix_hd_reference's outputs (up to the order of the sums)."""
    T, E, M = x_TEM.shape
    g1, g2, table, profile, entries = _inputs(x_TEM, g1_THE, g2_THE, mask_table_PW, profile_T,
                                              pairs_cache)
    out, c2 = _zeros((T, E, M), x_TEM), _zeros((T, E), x_TEM)
    (x,) = _arrays(x_TEM)
    _mix_hd(x, g1, g2, table, profile, *entries, out.numpy(), c2.numpy())
    return MixHD(out.view(T, E * M).to(x_TEM.dtype), c2.to(x_TEM.dtype))
