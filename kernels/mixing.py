"""Masked expert mixing: the inputs of MONET's `v` projections, with per-token mask profiles.

Unmasked, the composite weights g_ij = sum_h g1[h,i] g2[h,j] factorise, so every output below
costs O(H E M) per token and the E x E matrix is never built. A masked token subtracts only its
masked *active* pairs, head by head: for each head h, the pairs (i, j) with g1[h,i] > 0 and
g2[h,j] > 0 (about k^2 of them) are looked up in the profile's bitset, and each masked one
removes w = g1[h,i] g2[h,j] times its terms. Summed over heads, w is exactly g_ij (g_ij = 0
for masked pairs, nothing renormalised): O(H k^2) lookups and O(masked pairs x M) work.

Outputs, for one token (VD, a = relu2(u1 y) and b = relu2(u2 y) as [E, M]):
    c1[i]  = sum_j G_ij           c2[j]  = sum_i G_ij          (G = g with masked pairs zeroed)
    x11[i] = c1[i] a_i            x12[i] = sum_j G_ij b_j
    x21[j] = sum_i G_ij a_i       x22[j] = c2[j] b_j
so that VD's first half is v11(x11) + v12(x12) + c1 @ b1 and its second half
v21(x21) + v22(x22) + c2 @ b2. HD (x = relu2(u y)) needs x21 and c2 only: v(x21) + c2 @ b.

Mask tables are bitsets: int32 [P, W], W = ceil(E*E / 32); composite expert n = i*E + j is bit
n % 32 of word n // 32. profile_T[t] in [0, P) selects a row, -1 means "no mask".

Legend: T tokens, H routing heads, E experts per side, M expert width (m/2 for VD, m for HD),
P mask profiles, N active pairs of a batch (over tokens and heads).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "MixVD",
    "MixHD",
    "NO_PROFILE",
    "bitset_words",
    "mix_vd",
    "mix_hd",
    "mix_vd_reference",
    "mix_hd_reference",
    "ActivePairs",
    "MaskedPairs",
    "active_pairs",
    "masked_active_pairs",
    "prepare_mixing",
]

NO_PROFILE = -1


class MixVD(NamedTuple):
    x11: torch.Tensor  # [T, E*M]
    x12: torch.Tensor  # [T, E*M]
    x21: torch.Tensor  # [T, E*M]
    x22: torch.Tensor  # [T, E*M]
    c1: torch.Tensor  # [T, E]
    c2: torch.Tensor  # [T, E]


class MixHD(NamedTuple):
    x: torch.Tensor  # [T, E*M]
    c2: torch.Tensor  # [T, E]


def bitset_words(num_experts: int) -> int:
    """Words of one mask-table row for E experts per side."""
    return (num_experts * num_experts + 31) // 32


def _mix_through(x_TEM: torch.Tensor, g_src_THE: torch.Tensor, g_dst_THE: torch.Tensor):
    """out[t, d] = sum_s (sum_h g_src[t,h,s] g_dst[t,h,d]) x[t, s]: the factorised pair sum."""
    per_head_THM = torch.bmm(g_src_THE, x_TEM)
    return torch.bmm(g_dst_THE.transpose(1, 2), per_head_THM)


class ActivePairs(NamedTuple):
    """Every active pair of a batch's masked tokens, as flat lists: (t, i, j) for each head h
    with g1[t,h,i] > 0 and g2[t,h,j] > 0 (about H k^2 per token, no padding), its weight and
    where its bit sits in the token's row of a mask table. It depends on the routing and on
    profile_T only, so every layer of a routing group shares it: a model finds it once per
    routing layer, and a layer only looks its pairs up in its own table."""

    ti: torch.Tensor  # [N] int64: t*E + i, the row of side-1 expert i in a [T*E, ...] view
    tj: torch.Tensor  # [N] int64: t*E + j
    neg_weight: torch.Tensor  # [N] -g1[t,h,i] g2[t,h,j], float32 or better
    word: torch.Tensor  # [N] int64: p*W + n // 32, the word of n = i*E + j in a flat [P*W] table
    bit: torch.Tensor  # [N] int32: n % 32


def active_pairs(g1_THE: torch.Tensor, g2_THE: torch.Tensor, dtype: torch.dtype,
                 profile_T: torch.Tensor, words_per_row: int) -> ActivePairs:
    """The active pairs of the tokens with a profile, for activations of `dtype`: g is rounded
    to that dtype first, as the factorised path does, so that a fully masked expert cancels
    exactly; the pair weights are kept in float32 or better. words_per_row: W of the tables.

    The integer work is done per side-1 entry (t, h, i), about k per head, and each pair only
    adds its side-2 expert j to its entry's offsets. Gathers are index_select, not x[idx]: half
    the fixed cost on the small index lists of a decode step."""
    wdtype = torch.promote_types(dtype, torch.float32)
    tokens = (profile_T >= 0).nonzero().squeeze(1)
    if tokens.numel() < profile_T.numel():
        g1_THE, g2_THE = g1_THE.index_select(0, tokens), g2_THE.index_select(0, tokens)
    g1 = g1_THE.to(dtype).to(wdtype).view(-1)
    g2 = g2_THE.to(dtype).to(wdtype).view(-1)
    T, H, E = g1_THE.shape
    # the nonzero entries of each side (g >= 0), flat indices into [T*H*E]: grouped by row t*H+h
    flat1 = (g1 != 0).nonzero().squeeze(1)
    flat2 = (g2 != 0).nonzero().squeeze(1)
    row1, row2 = flat1 // E, flat2 // E
    i1, j2 = flat1 - row1 * E, flat2 - row2 * E
    t1 = tokens.index_select(0, row1 // H)  # the batch token of each side-1 entry
    tE1 = t1 * E
    bit1 = profile_T.index_select(0, t1).long() * (32 * words_per_row) + i1 * E  # bit of (i, 0)
    g1_neg = g1.index_select(0, flat1).neg_()
    # pairs: each side-1 entry with every side-2 entry of its row
    n2_R = torch.bincount(row2, minlength=T * H)
    per1 = n2_R.index_select(0, row1)
    a = torch.repeat_interleave(per1)  # the side-1 entry of each pair
    first2_R = n2_R.cumsum(0) - n2_R  # the first side-2 entry of each row
    offset1 = first2_R.index_select(0, row1) - (per1.cumsum(0) - per1)  # side-2 entry: + pair
    b = offset1.index_select(0, a) + torch.arange(a.numel(), device=a.device)
    j = j2.index_select(0, b)
    nbit = bit1.index_select(0, a) + j
    tE1_a = tE1.index_select(0, a)
    neg_weight = g1_neg.index_select(0, a) * g2.index_select(0, flat2.index_select(0, b))
    return ActivePairs(tE1_a + i1.index_select(0, a), tE1_a + j, neg_weight, nbit >> 5,
                       (nbit & 31).int())


class MaskedPairs(NamedTuple):
    """The masked active pairs of a batch, one entry per (token, head, pair)."""

    ti: torch.Tensor  # [N] int64: t*E + i
    tj: torch.Tensor  # [N] t*E + j
    neg_weight: torch.Tensor  # [N] -g1[h, i] g2[h, j], float32 or better


def masked_active_pairs(active: ActivePairs, mask_table_PW: torch.Tensor) -> MaskedPairs:
    """The active pairs that their token's profile masks in this table, with their weight
    negated (summed over heads, the weights of a pair are its g_ij): one bitset lookup per
    active pair (no [T, W] copy of the rows)."""
    words = mask_table_PW.reshape(-1).index_select(0, active.word)
    k = ((words >> active.bit) & 1).bool().nonzero().squeeze(1)
    return MaskedPairs(active.ti.index_select(0, k), active.tj.index_select(0, k),
                       active.neg_weight.index_select(0, k))


def _remove_pairs(out_TEM, pairs: MaskedPairs, src_TEM, *, into_side2: bool):
    """out[t, j] -= w src[t, i] (into_side2) or out[t, i] -= w src[t, j], over the pairs."""
    T, E, M = out_TEM.shape
    dst, src = (pairs.tj, pairs.ti) if into_side2 else (pairs.ti, pairs.tj)
    rows = src_TEM.reshape(T * E, M).index_select(0, src).to(pairs.neg_weight.dtype)
    delta = (rows * pairs.neg_weight[:, None]).to(out_TEM.dtype)
    out_TEM.view(T * E, M).index_add_(0, dst, delta)  # alpha=-1 is 7x slower on [N, M] rows


def _remove_weights(c_TE, pairs: MaskedPairs, *, side2: bool):
    """c[t, i] (or c[t, j]) -= w over the pairs: the masked share of each expert's weight."""
    c_TE.view(-1).index_add_(0, pairs.tj if side2 else pairs.ti,
                             pairs.neg_weight.to(c_TE.dtype))


def _shared_active_pairs(g1_THE, g2_THE, dtype, profile_T, mask_table_PW,
                         pairs_cache: dict | None) -> ActivePairs:
    """The active pairs of the masked tokens, from pairs_cache when a layer of the routing
    group found them."""
    if pairs_cache is not None and dtype in pairs_cache:
        return pairs_cache[dtype]
    active = active_pairs(g1_THE, g2_THE, dtype, profile_T, mask_table_PW.shape[1])
    if pairs_cache is not None:
        pairs_cache[dtype] = active
    return active


def _any_profile(profile_T: torch.Tensor | None, T: int) -> bool:
    if profile_T is None:
        return False
    if profile_T.shape != (T,):
        raise ValueError(f"profile_T must be [{T}], got {tuple(profile_T.shape)}")
    return bool((profile_T >= 0).any())


def mix_vd_reference(
    a_TEM: torch.Tensor,
    b_TEM: torch.Tensor,
    g1_THE: torch.Tensor,
    g2_THE: torch.Tensor,
    mask_table_PW: torch.Tensor | None = None,
    profile_T: torch.Tensor | None = None,
    pairs_cache: dict | None = None,
) -> MixVD:
    """Plain-torch VD mixing. a, b: [T, E, M] activations; g1, g2: [T, H, E] router weights.

    All outputs take a's dtype; g is cast to it first, as in the authors' release.
    pairs_cache: a dict the caller keeps per routing (g1, g2) and batch (the layers that share
    it pass the same profile_T); the active pairs of the masked tokens are kept there, so the
    layers of a routing group find them once.
    """
    T, E, M = a_TEM.shape
    g1 = g1_THE.to(a_TEM.dtype)
    g2 = g2_THE.to(a_TEM.dtype)
    c1_TE = g1.sum(1)
    c2_TE = g2.sum(1)
    x12_TEM = _mix_through(b_TEM, g2, g1)
    x21_TEM = _mix_through(a_TEM, g1, g2)
    if _any_profile(profile_T, T):
        active = _shared_active_pairs(g1_THE, g2_THE, a_TEM.dtype, profile_T, mask_table_PW,
                                      pairs_cache)
        pairs = masked_active_pairs(active, mask_table_PW)
        _remove_weights(c1_TE, pairs, side2=False)
        _remove_weights(c2_TE, pairs, side2=True)
        _remove_pairs(x12_TEM, pairs, b_TEM, into_side2=False)
        _remove_pairs(x21_TEM, pairs, a_TEM, into_side2=True)
    x11_TEM = a_TEM * c1_TE[:, :, None]
    x22_TEM = b_TEM * c2_TE[:, :, None]
    return MixVD(
        x11_TEM.reshape(T, E * M),
        x12_TEM.reshape(T, E * M),
        x21_TEM.reshape(T, E * M),
        x22_TEM.reshape(T, E * M),
        c1_TE,
        c2_TE,
    )


def mix_hd_reference(
    x_TEM: torch.Tensor,
    g1_THE: torch.Tensor,
    g2_THE: torch.Tensor,
    mask_table_PW: torch.Tensor | None = None,
    profile_T: torch.Tensor | None = None,
    pairs_cache: dict | None = None,
) -> MixHD:
    """Plain-torch HD mixing. x: [T, E, M] activations relu2(u y); g1, g2: [T, H, E];
    pairs_cache as mix_vd_reference."""
    T, E, M = x_TEM.shape
    g1 = g1_THE.to(x_TEM.dtype)
    g2 = g2_THE.to(x_TEM.dtype)
    c2_TE = g2.sum(1)
    out_TEM = _mix_through(x_TEM, g1, g2)
    if _any_profile(profile_T, T):
        active = _shared_active_pairs(g1_THE, g2_THE, x_TEM.dtype, profile_T, mask_table_PW,
                                      pairs_cache)
        pairs = masked_active_pairs(active, mask_table_PW)
        _remove_weights(c2_TE, pairs, side2=True)
        _remove_pairs(out_TEM, pairs, x_TEM, into_side2=True)
    return MixHD(out_TEM.reshape(T, E * M), c2_TE)


def _check_mix_inputs(x_TEM, g1_THE, g2_THE, mask_table_PW, profile_T):
    if x_TEM.dim() != 3:
        raise ValueError(f"expert activations must be [T, E, M], got {tuple(x_TEM.shape)}")
    T, E, _ = x_TEM.shape
    for name, g in (("g1", g1_THE), ("g2", g2_THE)):
        if g.dim() != 3 or g.shape[0] != T or g.shape[2] != E:
            raise ValueError(f"{name} must be [{T}, H, {E}], got {tuple(g.shape)}")
    if g1_THE.shape != g2_THE.shape:
        raise ValueError(f"g1 {tuple(g1_THE.shape)} and g2 {tuple(g2_THE.shape)} differ")
    for name, t in (("activations", x_TEM), ("g1", g1_THE), ("g2", g2_THE)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if (mask_table_PW is None) != (profile_T is None):
        raise ValueError("mask_table and profile_T go together")
    if mask_table_PW is not None:
        if mask_table_PW.dtype != torch.int32 or mask_table_PW.dim() != 2:
            raise TypeError("mask_table must be int32 [P, W]")
        if mask_table_PW.shape[1] != bitset_words(E):
            raise ValueError(
                f"mask_table rows must have {bitset_words(E)} words for E={E}, "
                f"got {mask_table_PW.shape[1]}"
            )
        if profile_T.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"profile_T must be int32 or int64, got {profile_T.dtype}")
        if profile_T.shape != (T,):
            raise ValueError(f"profile_T must be [{T}], got {tuple(profile_T.shape)}")


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
IMPLS = ("triton", "cpu", "reference")


def _pick_impl(impl: str | None, x: torch.Tensor, *inputs: torch.Tensor) -> str:
    """impl None: Triton for CUDA activations of a Triton dtype; the compiled CPU loops
    (kernels.mixing_cpu; 16-bit activations mixed in float32) for CPU activations that
    autograd does not track; else the reference. A name in IMPLS forces that path."""
    from kernels import triton_available

    if impl is None:
        if x.is_cuda:
            return "triton" if x.dtype in _TRITON_DTYPES and triton_available() else "reference"
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *inputs))
        cpu = x.device.type == "cpu" and x.dtype in _CPU_DTYPES and not tracked
        return "cpu" if cpu else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    if impl == "triton" and x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton mixing kernels take {_TRITON_DTYPES}, got {x.dtype}")
    if impl == "cpu" and (x.device.type != "cpu" or x.dtype not in _CPU_DTYPES):
        raise TypeError(f"the CPU mixing loops take CPU tensors of {_CPU_DTYPES}, "
                        f"got {x.device.type} {x.dtype}")
    return impl


def prepare_mixing(device: torch.device | str, dtype: torch.dtype) -> None:
    """Compile now what mixing of (device, dtype) activations will run, so that no request
    pays for it: the CPU loops (Numba; about 2 s on a new install, 0.5 s from its
    on-disk cache). Does nothing where the launcher picks another path."""
    E = 4
    x = torch.ones(2, E, 1, dtype=dtype, device=device)
    if _pick_impl(None, x) != "cpu":
        return
    g = torch.full((2, 1, E), 1.0 / E, dtype=torch.float32)
    table = torch.full((1, bitset_words(E)), -1, dtype=torch.int32)
    profile = torch.zeros(2, dtype=torch.int64)
    mix_vd(x, x, g, g, table, profile)
    mix_hd(x, g, g, table, profile)


def mix_vd(
    a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None, *, impl=None,
    pairs_cache=None,
) -> MixVD:
    """VD mixing launcher: Triton on CUDA, compiled loops on the CPU, the reference where
    neither applies (other dtypes, autograd). Shapes as mix_vd_reference.

    impl: None picks; "triton" forces the Triton kernels (on CPU they need TRITON_INTERPRET=1),
    "cpu" the compiled CPU loops, "reference" the plain-torch path. pairs_cache: see
    mix_vd_reference (the Triton kernels find the pairs in-kernel and do not use it).
    """
    _check_mix_inputs(a_TEM, g1_THE, g2_THE, mask_table_PW, profile_T)
    if a_TEM.shape != b_TEM.shape or a_TEM.dtype != b_TEM.dtype:
        raise ValueError(
            f"a {tuple(a_TEM.shape)} {a_TEM.dtype} and b {tuple(b_TEM.shape)} {b_TEM.dtype} differ"
        )
    impl = _pick_impl(impl, a_TEM, b_TEM, g1_THE, g2_THE)
    if impl == "triton":
        from kernels.mixing_triton import mix_vd_triton

        return mix_vd_triton(a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW, profile_T)
    if impl == "cpu":
        from kernels.mixing_cpu import mix_vd_cpu

        return mix_vd_cpu(a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW, profile_T, pairs_cache)
    return mix_vd_reference(a_TEM, b_TEM, g1_THE, g2_THE, mask_table_PW, profile_T, pairs_cache)


def mix_hd(
    x_TEM, g1_THE, g2_THE, mask_table_PW=None, profile_T=None, *, impl=None, pairs_cache=None
) -> MixHD:
    """HD mixing launcher: picks as mix_vd. Shapes and pairs_cache as mix_vd."""
    _check_mix_inputs(x_TEM, g1_THE, g2_THE, mask_table_PW, profile_T)
    impl = _pick_impl(impl, x_TEM, g1_THE, g2_THE)
    if impl == "triton":
        from kernels.mixing_triton import mix_hd_triton

        return mix_hd_triton(x_TEM, g1_THE, g2_THE, mask_table_PW, profile_T)
    if impl == "cpu":
        from kernels.mixing_cpu import mix_hd_cpu

        return mix_hd_cpu(x_TEM, g1_THE, g2_THE, mask_table_PW, profile_T, pairs_cache)
    return mix_hd_reference(x_TEM, g1_THE, g2_THE, mask_table_PW, profile_T, pairs_cache)
