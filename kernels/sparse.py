"""Sparse expert evaluation for decode: only the experts that a step's tokens route to.

A token keeps about k experts per head and side, so a decode step of T tokens uses at most
T*H*k of the E experts per side (batch 1 at the releases: about 46 of 512); the dense layer
reads every expert's weights. On the CPU (float32 or bfloat16 tensors) the whole layer is one
compiled call (kernels.sparse_cpu: `vd_layer`, `hd_layer`); elsewhere it is composed, for one
step:

1. `active_experts`: the step's experts per side (the union over tokens of the nonzero router
   entries), both sides padded to one count n (the padding repeats an expert with zero
   weight), and g1, g2 restricted to them ([T, H, n]); once per routing group (on the CPU too);
2. the u projections at those experts only: their rows of u (and bias) read in place by a
   gather-GEMV (`_gather`: Triton kernels on CUDA for T <= 32, kernels.sparse_triton), else
   gathered for one GEMM;
3. mixing over the n compact experts, masks included: while T n^2 is small (decode), through
   the explicit composite weights G [T, n, n] (g_ij = sum_h g1 g2, a masked pair's set to 0;
   the same few products masked or not, `_mix_explicit`); else as kernels.mix_vd / mix_hd
   (each profile's bitset row remapped to the compact pairs, `compact_table`);
4. the v projections and the biases as one `embedding_bag` per half over a packed table
   (`pack_vd`: [V11^T; V12^T; b1] and [V21^T; V22^T; b2]; `pack_hd`: [V^T; b]), which reads
   the active experts' rows in place (the same gather-GEMV kernels where they apply).

The output is the dense layer's up to the order of the sums (tested against it and against
the naive E x E oracle). `use_sparse` picks the path per step by the share of experts in use.

Legend: T tokens, D hidden, H routing heads, E experts per side, M expert width, n active
experts per side (padded), P mask profiles, R rows of a packed table.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.mixing import MixHD, MixVD, bitset_words, mix_hd, mix_vd

__all__ = ["EXPLICIT_MAX_PAIRS", "SPARSE_MAX_SHARE", "SPARSE_MAX_TOKENS", "SPARSE_MIN_EXPERTS",
           "ActiveExperts",
           "active_experts", "compact_table", "pack_hd", "pack_vd", "sparse_hd", "sparse_vd",
           "use_sparse"]

# The sparse path wins while at most this share of the E experts per side is in use, per
# activation dtype, and the step has at most SPARSE_MAX_TOKENS tokens. Measured on one 850M
# expert layer (benchmarks/bench_release.py --threshold, 2-core CPU with AMX, one expert layer
# in one compiled call; dense/sparse): bfloat16 6.7x at share 0.12 (T=1), 1.8x at 0.60 (T=8),
# 1.09x at 0.91 (T=24), 0.94x at 0.95 (T=32), 0.28x at T=512 (the dense bfloat16 products run
# on AMX); float32 5.6x at T=1, 1.5x at 0.91 (T=24), 1.13-1.18x at share 1.0 (T=64-128), 0.91x
# at T=512 (the sparse path's work grows with the tokens, the dense GEMMs' less).
SPARSE_MAX_SHARE = {torch.float32: 1.0, torch.bfloat16: 0.93}
DEFAULT_MAX_SHARE = 0.85
SPARSE_MAX_TOKENS = 256
# ... and only with at least this many experts per side: below it the dense products are small
# and cache-resident, and the sparse path's fixed cost loses. The shipped default model (E = 64,
# D = 128) decoded 12-20% slower on it (batch 1 and 8, float32, three interleaved runs); the
# release shapes have E = 512.
SPARSE_MIN_EXPERTS = 256
# A masked step mixes through the explicit compact weights G [T, n, n] while T n^2 is at most
# this. Measured on one 850M expert layer (2-core CPU, masked with one profile / 8 mixed):
# batch 1 (n ~ 50) bf16 2.70 ms against 3.75 factorised, fp32 2.79 against 2.96; batch 2
# (n ~ 95) 4.1 against 5.3 / 4.4; batch 4 (n ~ 170, T n^2 ~ 1e5) bf16 6.5 against 7.7 but
# fp32 6.6 against 4.1; from batch 8 the factorised mixing wins (it costs T H k^2, G T n^2).
EXPLICIT_MAX_PAIRS = 1 << 15


class ActiveExperts(NamedTuple):
    """A step's experts per side and its routing restricted to them."""

    side1: torch.Tensor  # [n] int64 expert indices, the first n1 distinct, then repeats
    side2: torch.Tensor  # [n] int64
    g1: torch.Tensor  # [T, H, n] float32, zero at the padding
    g2: torch.Tensor  # [T, H, n]
    cache: dict  # the compact routing's pairs cache and bag rows, shared by a routing group


def _used(g_THE: torch.Tensor) -> torch.Tensor:
    return (g_THE != 0).any(1).any(0).nonzero().squeeze(1)


def _pad(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat((idx, idx[:1].expand(n - idx.numel())))


def _restrict(g_THE: torch.Tensor, idx: torch.Tensor, used: int) -> torch.Tensor:
    g = g_THE.index_select(2, idx)
    g[..., used:] = 0  # the padding repeats an expert: it must not count twice
    return g


def active_experts(g1_THE: torch.Tensor, g2_THE: torch.Tensor) -> ActiveExperts:
    """The experts with a nonzero weight for some token of the step, per side (g [T, H, E])."""
    used1, used2 = _used(g1_THE), _used(g2_THE)
    n = max(used1.numel(), used2.numel(), 1)
    if used1.numel() == 0 or used2.numel() == 0:  # no token (T = 0): any expert, zero weight
        used1 = used2 = torch.zeros(1, dtype=torch.long, device=g1_THE.device)
    side1, side2 = _pad(used1, n), _pad(used2, n)
    return ActiveExperts(side1, side2, _restrict(g1_THE, side1, used1.numel()),
                         _restrict(g2_THE, side2, used2.numel()), {})


def use_sparse(g1_THE, g2_THE, pairs_cache: dict | None, *, dtype: torch.dtype,
               max_share: float | None = None) -> ActiveExperts | None:
    """The step's ActiveExperts when at most max_share of the experts per side are in use and
    autograd is off, else None (the dense path). max_share None: SPARSE_MAX_SHARE for
    activations of dtype, for steps of at most SPARSE_MAX_TOKENS tokens with at least
    SPARSE_MIN_EXPERTS experts per side (else dense). Kept in the routing group's pairs_cache
    under "sparse": a group decides once."""
    if pairs_cache is not None and "sparse" in pairs_cache:
        return pairs_cache["sparse"]
    if max_share is None:
        T, E = g1_THE.shape[0], g1_THE.shape[2]
        max_share = (SPARSE_MAX_SHARE.get(dtype, DEFAULT_MAX_SHARE)
                     if E >= SPARSE_MIN_EXPERTS and T <= SPARSE_MAX_TOKENS else 0.0)
    active = None
    if max_share > 0 and not (torch.is_grad_enabled() and g1_THE.requires_grad):
        candidate = active_experts(g1_THE, g2_THE)
        if candidate.side1.numel() <= max_share * g1_THE.shape[2]:
            active = candidate
    if pairs_cache is not None:
        pairs_cache["sparse"] = active
    return active


def _compact_bits(table_PW: torch.Tensor, active: ActiveExperts, num_experts: int):
    """[P, n*n] int32: 1 where the profile removes composite expert (side1[r], side2[s])."""
    nbit = _rows(active, ("nbit", num_experts), lambda: (
        active.side1[:, None] * num_experts + active.side2[None, :]).reshape(-1))  # [n*n]
    return (table_PW.index_select(1, nbit >> 5) >> (nbit & 31).int()) & 1


def compact_table(table_PW: torch.Tensor, active: ActiveExperts, num_experts: int):
    """The mask table over the compact pairs: bit r*n + s of a row is the bit of composite
    expert (side1[r], side2[s]) of the full table. [P, W] -> [P, bitset_words(n)] int32."""
    P, n = table_PW.shape[0], active.side1.numel()
    bits = _compact_bits(table_PW, active, num_experts)  # [P, n*n]
    words = bitset_words(n)
    bits = F.pad(bits, (0, 32 * words - n * n)).view(P, words, 32)
    # distinct powers of two add without carries: the int32 sum is the word's bit pattern
    # (bit 31 wraps to the sign, as the table's own int32 words)
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return (bits << shifts).sum(-1, dtype=torch.int32)


def _mask(mask, active: ActiveExperts, num_experts: int):
    if mask is None:
        return None, None
    table_PW, profile_T = mask
    return compact_table(table_PW, active, num_experts), profile_T


def _explicit(active: ActiveExperts, mask) -> bool:
    """Mix through G: for a masked step of decode size (unmasked, the factorised mixing is
    as fast; past EXPLICIT_MAX_PAIRS, faster either way)."""
    T, _, n = active.g1.shape
    return mask is not None and T * n * n <= EXPLICIT_MAX_PAIRS


def _weights(active: ActiveExperts, dtype: torch.dtype, mask, num_experts: int):
    """G [T, n, n] float32: g_ij = sum_h g1[h, i] g2[h, j] at the compact experts, g rounded
    to the activations' dtype first (as the factorised mixing), and 0 at the pairs the
    token's profile removes (so a removed expert adds exactly nothing)."""
    G = _rows(active, ("G", dtype), lambda: torch.bmm(
        active.g1.to(dtype).float().transpose(1, 2), active.g2.to(dtype).float()))
    if mask is None:
        return G
    table_PW, profile_T = mask
    T, n, _ = G.shape
    keep_PNN = (1 - _compact_bits(table_PW, active, num_experts)).view(-1, n, n)
    keep_PNN = torch.cat((keep_PNN.new_ones(1, n, n), keep_PNN))  # row 0: no profile (-1)
    return G * keep_PNN.index_select(0, profile_T.long() + 1)


def _mix_explicit_vd(a_TnM, b_TnM, G_Tnn) -> MixVD:
    """VD mixing through G: x11 = a c1, x12_i = sum_j G_ij b_j, x21_j = sum_i G_ij a_i,
    x22 = b c2, c1 = G 1, c2 = G^T 1 (float32)."""
    T = a_TnM.shape[0]
    a, b = a_TnM.float(), b_TnM.float()
    c1, c2 = G_Tnn.sum(2), G_Tnn.sum(1)
    return MixVD((a * c1[..., None]).view(T, -1), torch.bmm(G_Tnn, b).view(T, -1),
                 torch.bmm(G_Tnn.transpose(1, 2), a).view(T, -1),
                 (b * c2[..., None]).view(T, -1), c1, c2)


def _mix_explicit_hd(x_TnM, G_Tnn) -> MixHD:
    """HD mixing through G: x_j = sum_i G_ij x_i, c2 = G^T 1 (float32)."""
    T = x_TnM.shape[0]
    return MixHD(torch.bmm(G_Tnn.transpose(1, 2), x_TnM.float()).view(T, -1), G_Tnn.sum(1))


def pack_vd(v_a: torch.Tensor, v_b: torch.Tensor, bias_ED: torch.Tensor) -> torch.Tensor:
    """One half's packed table [2*E*M + E, D/2]: rows V_a^T (expert i: rows i*M..), V_b^T
    (from E*M) and the bias (from 2*E*M). v_a, v_b: [D/2, E*M] weights; bias [E, D/2]."""
    return torch.cat((v_a.t(), v_b.t(), bias_ED)).contiguous()


def pack_hd(v: torch.Tensor, bias_ED: torch.Tensor) -> torch.Tensor:
    """HD's packed table [E*M + E, D]: V^T (expert j: rows j*M..) then the bias b."""
    return torch.cat((v.t(), bias_ED)).contiguous()


def _expert_rows(idx: torch.Tensor, M: int, starts: tuple[int, ...], E: int) -> torch.Tensor:
    """Rows of a packed table for experts idx [n]: per block start s, s + i*M + m for
    m < M (the weight blocks) or s + i (the last block, the bias), blocks in order. [L]"""
    m = torch.arange(M, device=idx.device)
    blocks = [(s + idx[:, None] * M + m).reshape(-1) for s in starts[:-1]]
    return torch.cat((*blocks, starts[-1] + idx))


def _whole_layer(*tensors: torch.Tensor):
    """kernels.sparse_cpu (the whole layer in one compiled call) when every tensor is a
    float32 or bfloat16 one on the CPU; None: the layer composed of the steps below."""
    if all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
           for t in tensors):
        from kernels import sparse_cpu

        return sparse_cpu
    return None


def _gather(weight: torch.Tensor, T: int):
    """The gather-GEMV primitives (rows_dot, rows_axpy) for a step of T tokens over weight:
    the Triton kernels for a contiguous float32 or bfloat16 CUDA weight at decode sizes
    (T <= 32, Triton installed); None: torch's index_select + linear and embedding_bag."""
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    from kernels import triton_available

    if weight.is_cuda and weight.is_contiguous() and triton_available():
        from kernels import sparse_triton

        if T <= sparse_triton.MAX_TOKENS:
            return sparse_triton
    return None


def _bag(table_RD, rows_L, weights_TL):
    """out[t] = sum_l weights[t, l] table[rows[l]]: the v projection over the active rows
    (gather-GEMV kernels where _gather has them, else embedding_bag). float32 or better."""
    gather = _gather(table_RD, weights_TL.shape[0])
    if gather is not None:
        return gather.rows_axpy(table_RD, rows_L, weights_TL)
    T = weights_TL.shape[0]
    return F.embedding_bag(rows_L.expand(T, -1), table_RD, mode="sum",
                           per_sample_weights=weights_TL.to(table_RD.dtype).contiguous())


def _u(y_TD, weight, bias, idx, g_THn, M):
    """relu2(U_i y + c_i) at the experts idx [n], in y's dtype: [T, n, M]. With the gather
    kernels (_gather) a token skips the experts it does not use (g zero: their activations
    multiply nothing), and rows no token uses are not read."""
    T = y_TD.shape[0]
    rows = (idx[:, None] * M + torch.arange(M, device=idx.device)).view(-1)  # [n*M]
    gather = _gather(weight, T)
    if gather is not None:
        use = (g_THn != 0).any(1).repeat_interleave(M, dim=1)  # [T, n*M]
        z = (gather.rows_dot(weight, rows, y_TD, use) + bias.index_select(0, rows).float())
        z = z.to(y_TD.dtype)
    else:
        z = F.linear(y_TD, weight.index_select(0, rows), bias.index_select(0, rows))
    return torch.square(F.relu(z)).view(T, -1, M)


def _rows(active: ActiveExperts, key, make):
    if key not in active.cache:
        active.cache[key] = make()
    return active.cache[key]


def sparse_vd(y_TD, active: ActiveExperts, u1, u2, first_RD, second_RD, mask=None):
    """The VD expert layer at the active experts. u1, u2: (weight [E*M, D], bias [E*M]);
    first, second: pack_vd tables; mask: None or (table [P, W] int32, profile [T]). [T, D]"""
    whole = _whole_layer(y_TD, *u1, *u2, first_RD, second_RD)
    if whole is not None:
        return whole.vd_layer(y_TD, active.side1, active.side2, active.g1, active.g2, u1, u2,
                              first_RD, second_RD, mask).to(y_TD.dtype)
    EM = u1[0].shape[0]
    E = first_RD.shape[0] - 2 * EM
    M = EM // E
    a = _u(y_TD, *u1, active.side1, active.g1, M)
    b = _u(y_TD, *u2, active.side2, active.g2, M)
    if _explicit(active, mask):
        mix = _mix_explicit_vd(a, b, _weights(active, a.dtype, mask, E))
    else:
        mix = mix_vd(a, b, active.g1, active.g2, *_mask(mask, active, E),
                     pairs_cache=active.cache)
    starts = (0, E * M, 2 * E * M)
    rows1 = _rows(active, ("vd1", M, E), lambda: _expert_rows(active.side1, M, starts, E))
    rows2 = _rows(active, ("vd2", M, E), lambda: _expert_rows(active.side2, M, starts, E))
    first = _bag(first_RD, rows1, torch.cat((mix.x11, mix.x12, mix.c1), 1))
    second = _bag(second_RD, rows2, torch.cat((mix.x21, mix.x22, mix.c2), 1))
    return torch.cat((first, second), -1).to(y_TD.dtype)


def sparse_hd(y_TD, active: ActiveExperts, u, table_RD, mask=None):
    """The HD expert layer at the active experts. u: (weight [E*M, D], bias [E*M]); table:
    pack_hd's; mask as sparse_vd. [T, D]"""
    whole = _whole_layer(y_TD, *u, table_RD)
    if whole is not None:
        return whole.hd_layer(y_TD, active.side1, active.side2, active.g1, active.g2, u,
                              table_RD, mask).to(y_TD.dtype)
    EM = u[0].shape[0]
    E = table_RD.shape[0] - EM
    M = EM // E
    x = _u(y_TD, *u, active.side1, active.g1, M)
    if _explicit(active, mask):
        mix = _mix_explicit_hd(x, _weights(active, x.dtype, mask, E))
    else:
        mix = mix_hd(x, active.g1, active.g2, *_mask(mask, active, E),
                     pairs_cache=active.cache)
    rows = _rows(active, ("hd", M, E), lambda: _expert_rows(active.side2, M, (0, EM), E))
    return _bag(table_RD, rows, torch.cat((mix.x, mix.c2), 1)).to(y_TD.dtype)
