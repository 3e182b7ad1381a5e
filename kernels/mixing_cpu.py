"""Masked expert mixing on the CPU: the masked pairs' removal as compiled loops (Numba).

The plain-torch reference (kernels.mixing) finds a masked token's active pairs with some 80
small tensor ops per routing group; at a decode step (tens of tokens) their fixed cost, not
the arithmetic, is most of what a mask costs. Here the unmasked, factorised outputs come from
the reference and the removal is two compiled loops:

- `_row_entries`, once per routing group (pairs_cache): the nonzero entries of each (t, h)
  router row of the masked tokens, as CSR lists;
- `_remove_pairs` (through `_remove_vd` / `_remove_hd`), per layer: for each masked token and
  head, every pair of its side-1 and side-2 entries is looked up in the token's bitset row,
  and a masked one removes w = g1[h,i] g2[h,j] of its terms, in the reference's order and
  arithmetic (the outputs are bitwise the reference's).

float32 and float64 activations (other dtypes take the reference). The loops are serial (torch
keeps the threads busy around them) and release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kernels.mixing import MixHD, MixVD, _any_profile, mix_hd_reference, mix_vd_reference

__all__ = ["mix_hd_cpu", "mix_vd_cpu"]

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _row_entries(g_THE, profile_T):
    """(start [T*H+1], index): row r = t*H + h lists the experts i with g[t,h,i] != 0 at
    index[start[r]:start[r+1]]; the rows of unmasked tokens are empty."""
    T, H, E = g_THE.shape
    start = np.zeros(T * H + 1, np.int64)
    index = np.empty(T * H * E, np.int32)  # only the used prefix is ever touched
    n = 0
    for t in range(T):
        for h in range(H):
            if profile_T[t] >= 0:
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
def _remove_pairs(a, b, g1, g2, table, profile, start1, index1, start2, index2,
                  x21, c2, x12, c1, side1):
    """For each masked token and head, look every pair (i, j) of its entries up in the
    token's table row; a masked one removes w = g1[h,i] g2[h,j]: x21[t, j] -= w a[t, i] and
    c2[t, j] -= w, and with side1 also x12[t, i] -= w b[t, j] and c1[t, i] -= w. The order
    and arithmetic are the reference's (its pair lists run t, h, i, j)."""
    T, H, E = g1.shape
    M = a.shape[2]
    touched = _touch_rows(table, profile, start1, index1, H, E)
    for t in range(T):
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
    """out[t, i] = x[t, i] c[t, i] again for the active experts of the masked tokens (the
    rows of the others are empty), whose weight c the removal may have changed."""
    for t in range(x.shape[0]):
        for u in range(start[t * H], start[t * H + H]):
            i = index[u]
            for m in range(x.shape[2]):
                out[t, i, m] = x[t, i, m] * c[t, i]


@_jit
def _remove_vd(a, b, g1, g2, table, profile, start1, index1, start2, index2,
               x11, x12, x21, x22, c1, c2):
    H = g1.shape[1]
    touched = _remove_pairs(a, b, g1, g2, table, profile, start1, index1, start2, index2,
                            x21, c2, x12, c1, True)
    _rescale(a, x11, c1, start1, index1, H)
    _rescale(b, x22, c2, start2, index2, H)
    return touched


@_jit
def _remove_hd(x, g1, g2, table, profile, start1, index1, start2, index2, out, c2):
    return _remove_pairs(x, x, g1, g2, table, profile, start1, index1, start2, index2,
                         out, c2, out, c2, False)


def _arrays(*tensors: torch.Tensor):
    return [t.detach().contiguous().numpy() for t in tensors]


def _masked_inputs(x_TEM, g1_THE, g2_THE, profile_T, pairs_cache):
    """g rounded to the activations' dtype (as the reference's weights), the profile and the
    routing group's active entries (from pairs_cache when a layer of the group found them)."""
    g1, g2, profile = _arrays(g1_THE.to(x_TEM.dtype), g2_THE.to(x_TEM.dtype), profile_T.long())
    key = ("cpu", x_TEM.dtype)
    if pairs_cache is not None and key in pairs_cache:
        return g1, g2, profile, pairs_cache[key]
    entries = (*_row_entries(g1, profile), *_row_entries(g2, profile))
    if pairs_cache is not None:
        pairs_cache[key] = entries
    return g1, g2, profile, entries


def _view_TEM(out: torch.Tensor, T: int, E: int) -> np.ndarray:
    assert out.is_contiguous()
    return out.view(T, E, -1).numpy()


def mix_vd_cpu(a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None,
               pairs_cache=None) -> MixVD:
    """mix_vd_reference's result, the masked pairs removed by compiled loops. Shapes and
    pairs_cache as mix_vd_reference; the launcher (kernels.mix_vd) checks the inputs."""
    T, E, _ = a_TEM.shape
    out = mix_vd_reference(a_TEM, b_TEM, g1_THE, g2_THE)
    if not _any_profile(profile_T, T):
        return out
    g1, g2, profile, entries = _masked_inputs(a_TEM, g1_THE, g2_THE, profile_T, pairs_cache)
    a, b, table = _arrays(a_TEM, b_TEM, mask_table_PW)
    _remove_vd(a, b, g1, g2, table, profile, *entries,
               *(_view_TEM(x, T, E) for x in (out.x11, out.x12, out.x21, out.x22)),
               out.c1.numpy(), out.c2.numpy())
    return out


def mix_hd_cpu(x_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None,
               pairs_cache=None) -> MixHD:
    """mix_hd_reference's result, the masked pairs removed by a compiled loop."""
    T, E, _ = x_TEM.shape
    out = mix_hd_reference(x_TEM, g1_THE, g2_THE)
    if not _any_profile(profile_T, T):
        return out
    g1, g2, profile, entries = _masked_inputs(x_TEM, g1_THE, g2_THE, profile_T, pairs_cache)
    x, table = _arrays(x_TEM, mask_table_PW)
    _remove_hd(x, g1, g2, table, profile, *entries, _view_TEM(out.x, T, E), out.c2.numpy())
    return out
