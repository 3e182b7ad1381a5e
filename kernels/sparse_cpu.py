"""The sparse expert layers on the CPU, each in one compiled call (Numba).

For one step of T tokens at the compact experts side1, side2 [n] (kernels.ActiveExperts),
`vd_layer` / `hd_layer` compute in one call what kernels.sparse composes for other devices:

1. the u projections at the compact experts only, each weight row read in place once for the
   step and dotted with the tokens that use its expert (about H k of the n per side);
2. the mixing, per token over its own experts: G_ij = sum_h g1[h, i] g2[h, j], a pair that
   the token's profile removes left out; c1, c2 as the factorised mixing (kernels.mixing): g
   summed over heads, less the removed pairs' weights;
3. the v projections and biases over the packed tables (kernels.pack_vd / pack_hd), each
   row read once for the step and added to the tokens that weigh it.

Composed of some 30 torch operations around two gathers, an 850M layer at batch 1 took
0.85 ms in bfloat16 (1.1 in float32); in one call 0.6 (0.8). A step of one token runs on the
calling thread; from THREADED_MIN_TOKENS a VD layer's two sides and halves run on two threads
(HD's stays on one). Each expert's rows are prefetched while the previous expert's are
computed.

Weights float32 or bfloat16 (passed as their uint16 bits, widened in the loops by a
bitcast); float32 arithmetic. Roundings as the dense path: with bfloat16 activations, g,
the u projection and relu2 of it are rounded to bfloat16. The GIL is released.
"""

from __future__ import annotations

import concurrent.futures
import threading

import llvmlite.ir
import numba
import numba.extending
import numpy as np
import torch
from numba.core import cgutils

__all__ = ["THREADED_MIN_TOKENS", "hd_layer", "vd_layer"]

# From this many tokens a VD layer's two sides (u), then its two halves (v), run on two threads:
# the caller's and a helper's (the loops release the GIL). 850M layer, weights cold, passive
# OpenMP threads, bf16 ms: T = 1 0.66 threaded / 0.64 serial, 2 0.98 / 1.04, 4 1.44 / 1.79,
# 8 2.26 / 3.17 (fp32 8: 2.89 / 4.40). Numba's own parallel loops start a second OpenMP
# runtime beside torch's, and measured slower (5x at T = 8 with spinning threads).
THREADED_MIN_TOKENS = 2

_jit = numba.njit(cache=True, nogil=True, fastmath=True)


@numba.extending.intrinsic
def _bits_as_f32(typingctx, bits):
    """A uint32's bits as a float32 (a bitcast: the loops below vectorise with it)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())

    return numba.types.float32(numba.types.uint32), codegen


@numba.extending.intrinsic
def _f32_bits(typingctx, x):
    """A float32's bits as a uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.IntType(32))

    return numba.types.uint32(numba.types.float32), codegen


@numba.extending.intrinsic
def _prefetch(typingctx, arr, flat):
    """Hint the cache to load element `flat` of C-contiguous arr (llvm.prefetch: a read,
    kept in all levels). A hint only: it never faults and changes nothing."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = llvmlite.ir.IntType(8).as_pointer()
        i32 = llvmlite.ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, llvmlite.ir.FunctionType(llvmlite.ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p),
                          i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return numba.types.void(arr, numba.types.intp), codegen


@_jit
def _prefetch_rows(W, r, count):
    """Prefetch rows r .. r + count of W [R, D] (the next expert's, while one is computed:
    experts are scattered blocks of a few rows, which the hardware prefetchers start late;
    20% off a cold 850M u projection)."""
    step = 64 // W.itemsize
    for e in range(r * W.shape[1], (r + count) * W.shape[1], step):
        _prefetch(W, e)


@_jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as a float32. Finite x."""
    b = _f32_bits(np.float32(x))
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return _bits_as_f32(b)


def _dot(W, r, y, t):
    """W[r] . y[t] in float32 (W float32, or bfloat16 as uint16 bits)."""


@numba.extending.overload(_dot)
def _dot_by_type(W, r, y, t):
    if W.dtype == numba.types.float32:
        def dot(W, r, y, t):
            acc = np.float32(0)
            for d in range(W.shape[1]):
                acc += W[r, d] * y[t, d]
            return acc
    else:
        def dot(W, r, y, t):
            acc = np.float32(0)
            for d in range(W.shape[1]):
                acc += _bits_as_f32(np.uint32(W[r, d]) << np.uint32(16)) * y[t, d]
            return acc
    return dot


def _axpy(W, r, s, o):
    """o += s W[r] (o float32 [D]; W as _dot)."""


@numba.extending.overload(_axpy)
def _axpy_by_type(W, r, s, o):
    if W.dtype == numba.types.float32:
        def axpy(W, r, s, o):
            for d in range(W.shape[1]):
                o[d] += s * W[r, d]
    else:
        def axpy(W, r, s, o):
            for d in range(W.shape[1]):
                o[d] += s * _bits_as_f32(np.uint32(W[r, d]) << np.uint32(16))
    return axpy


def _weights(W: torch.Tensor) -> np.ndarray:
    """A weight's array in place: float32, or bfloat16's bits as uint16."""
    W = W.detach()
    if W.dtype == torch.bfloat16:
        return W.view(torch.int16).numpy().view(np.uint16)
    return W.numpy()


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).contiguous().numpy()


@_jit
def _routing(g, bf16):
    """g [T, H, n] as float32, rounded to bfloat16 when bf16, and use [T, n]: the tokens'
    compact experts (g != 0 at some head)."""
    T, H, n = g.shape
    out = np.zeros((T, H, n), np.float32)
    use = np.zeros((T, n), np.bool_)
    for t in range(T):
        for h in range(H):
            for i in range(n):
                v = g[t, h, i]
                if v != 0:
                    use[t, i] = True
                    out[t, h, i] = _round_bf16(v) if bf16 else v
    return out, use


@_jit
def _u_side(W, bias, side, use, y, bf16, act):
    """act[t, i, m] = relu2(W[side[i] M + m] . y[t] + bias[side[i] M + m]) for the tokens
    that use compact expert i (act [T, n, M], zeros). bias [E*M, 1]."""
    T = y.shape[0]
    M = act.shape[2]
    unit = np.ones((1, 1), np.float32)
    n = side.shape[0]
    for i in range(n):
        if i + 1 < n and use[:, i + 1].any():
            _prefetch_rows(W, side[i + 1] * M, M)
        for m in range(M):
            r = side[i] * M + m
            c = _dot(bias, r, unit, 0)  # the bias, widened as a row of one
            for t in range(T):
                if use[t, i]:
                    z = _dot(W, r, y, t) + c
                    if bf16:
                        z = _round_bf16(z)
                    z = max(z, np.float32(0))
                    z = z * z
                    act[t, i, m] = _round_bf16(z) if bf16 else z


@_jit
def _removed(table, p, bit):
    return (table[p, bit >> 5] >> (bit & 31)) & 1


@_jit
def _mix(g1, g2, use1, use2, side1, side2, table, profile, E, a, b, x12, x21, c1, c2):
    """Per token: c1[i] = sum_h g1[h, i] and c2[j] = sum_h g2[h, j], less the weights G_ij
    of the pairs its profile removes (profile [T], -1 none; empty: no mask); x21[j] +=
    sum_i G_ij a[i] over the kept pairs, and x12[i] += sum_j G_ij b[j] when b is not empty
    (VD). Pairs of the token's own experts only (use1, use2)."""
    T, H, n = g1.shape
    M = a.shape[2]
    vd = b.shape[0] > 0
    for t in range(T):
        for h in range(H):
            for i in range(n):
                c1[t, i] += g1[t, h, i]
                c2[t, i] += g2[t, h, i]
        p = profile[t] if profile.shape[0] > 0 else -1
        mine2 = np.nonzero(use2[t])[0]
        for i in np.nonzero(use1[t])[0]:
            for j in mine2:
                w = np.float32(0)
                for h in range(H):
                    w += g1[t, h, i] * g2[t, h, j]
                if w == 0:
                    continue
                if p >= 0 and _removed(table, p, side1[i] * E + side2[j]):
                    c1[t, i] -= w
                    c2[t, j] -= w
                    continue
                for m in range(M):
                    x21[t, j, m] += w * a[t, i, m]
                if vd:
                    for m in range(M):
                        x12[t, i, m] += w * b[t, j, m]


@_jit
def _v_block(table, start, side, x, out, col):
    """out[t, col:] += sum_i sum_m x[t, i, m] table[start + side[i] M + m] (x [T, n, M]): one
    block of a packed table (kernels.pack_vd / pack_hd), each row read once per step."""
    T, n, M = x.shape
    Dh = table.shape[1]
    for i in range(n):
        if i + 1 < n:
            _prefetch_rows(table, start + side[i + 1] * M, M)
        for m in range(M):
            for t in range(T):
                s = x[t, i, m]
                if s != 0:
                    _axpy(table, start + side[i] * M + m, s, out[t, col:col + Dh])


@_jit
def _scale(x, c):
    """x[t, i, :] *= c[t, i]."""
    T, n, M = x.shape
    for t in range(T):
        for i in range(n):
            for m in range(M):
                x[t, i, m] *= c[t, i]


@_jit
def _vd_mix(g1r, g2r, use1, use2, side1, side2, table, profile, E, a, b):
    """VD's mixing: x12, x21, c1, c2, and a, b scaled in place into x11 = a c1, x22 = b c2."""
    x12 = np.zeros_like(a)
    x21 = np.zeros_like(a)
    c1 = np.zeros(a.shape[:2], np.float32)
    c2 = np.zeros(a.shape[:2], np.float32)
    _mix(g1r, g2r, use1, use2, side1, side2, table, profile, E, a, b, x12, x21, c1, c2)
    _scale(a, c1)
    _scale(b, c2)
    return x12, x21, c1, c2


@_jit
def _vd_half(table, EM, side, x_a, x_b, c, out, col):
    """One half of VD's output (columns col:): a packed table's two weight blocks and bias."""
    T, n = c.shape
    _v_block(table, 0, side, x_a, out, col)
    _v_block(table, EM, side, x_b, out, col)
    _v_block(table, 2 * EM, side, c.reshape(T, n, 1), out, col)


@_jit
def _vd_layer(y, W1, bias1, W2, bias2, side1, side2, g1, g2, table, profile, first, second,
              bf16, out):
    T = y.shape[0]
    n = side1.shape[0]
    EM = W1.shape[0]
    E = first.shape[0] - 2 * EM
    M = EM // E
    g1r, use1 = _routing(g1, bf16)
    g2r, use2 = _routing(g2, bf16)
    a = np.zeros((T, n, M), np.float32)
    b = np.zeros((T, n, M), np.float32)
    _u_side(W1, bias1, side1, use1, y, bf16, a)
    _u_side(W2, bias2, side2, use2, y, bf16, b)
    x12, x21, c1, c2 = _vd_mix(g1r, g2r, use1, use2, side1, side2, table, profile, E, a, b)
    _vd_half(first, EM, side1, a, x12, c1, out, 0)
    _vd_half(second, EM, side2, x21, b, c2, out, first.shape[1])


@_jit
def _hd_layer(y, W, bias, side1, side2, g1, g2, table, profile, packed, bf16, out):
    T, D = out.shape
    n = side1.shape[0]
    EM = W.shape[0]
    E = packed.shape[0] - EM
    M = EM // E
    g1r, use1 = _routing(g1, bf16)
    g2r, use2 = _routing(g2, bf16)
    x = np.zeros((T, n, M), np.float32)
    _u_side(W, bias, side1, use1, y, bf16, x)
    x21 = np.zeros((T, n, M), np.float32)
    c1 = np.zeros((T, n), np.float32)
    c2 = np.zeros((T, n), np.float32)
    none = np.zeros((0, n, M), np.float32)  # no b, no x12
    _mix(g1r, g2r, use1, use2, side1, side2, table, profile, E, x, none, none, x21, c1, c2)
    _v_block(packed, 0, side2, x21, out, 0)
    _v_block(packed, EM, side2, c2.reshape(T, n, 1), out, 0)


def _mask_arrays(mask, T: int):
    """(table, profile) for the loops; no mask: an empty profile. A profile that is not one
    entry per token is refused: the loops read an empty one as "no mask" (fail closed)."""
    if mask is None:
        return np.zeros((1, 1), np.int32), np.zeros(0, np.int32)
    table_PW, profile_T = mask
    if profile_T.shape != (T,):
        raise ValueError(f"mask profile must be [{T}], got {tuple(profile_T.shape)}")
    return (table_PW.contiguous().numpy(),
            profile_T.to(torch.int32).contiguous().numpy())


def vd_layer(y_TD, side1, side2, g1_THn, g2_THn, u1, u2, first_RD, second_RD, mask=None):
    """The VD expert layer at the compact experts side1, side2 [n] (kernels.ActiveExperts;
    g restricted to them, zero at the padding) in one call: float32 [T, D]. u1, u2: (weight
    [E*M, D], bias [E*M]); first, second: kernels.pack_vd tables; mask: None or (table
    [P, W] int32, profile [T]). Weights float32 or bfloat16, read in place. From
    THREADED_MIN_TOKENS tokens (and with torch allowed more than one thread) the two sides'
    u projections, then the two halves' v projections, run on two threads."""
    T = y_TD.shape[0]
    out = torch.zeros(T, 2 * first_RD.shape[1], dtype=torch.float32)
    args = (_f32(y_TD), _weights(u1[0]), _weights(u1[1][:, None]), _weights(u2[0]),
            _weights(u2[1][:, None]), side1.numpy(), side2.numpy(), _f32(g1_THn),
            _f32(g2_THn), *_mask_arrays(mask, T), _weights(first_RD), _weights(second_RD),
            y_TD.dtype == torch.bfloat16, out.numpy())
    if T >= THREADED_MIN_TOKENS and torch.get_num_threads() > 1:
        _vd_layer_threaded(*args)
    else:
        _vd_layer(*args)
    return out


def _vd_layer_threaded(y, W1, bias1, W2, bias2, side1, side2, g1, g2, table, profile, first,
                       second, bf16, out):
    """_vd_layer's steps, each side's (then half's) on its own thread: the calling one and
    _helper()'s (the loops release the GIL). From Python, where _vd_layer is one compiled
    call: a step of one token would pay the extra calls and gain nothing."""
    n = side1.shape[0]
    EM = W1.shape[0]
    E = first.shape[0] - 2 * EM
    (g1r, use1), (g2r, use2) = _routing(g1, bf16), _routing(g2, bf16)
    a = np.zeros((y.shape[0], n, EM // E), np.float32)
    b = np.zeros_like(a)
    helper = _helper()
    done = helper.submit(_u_side, W2, bias2, side2, use2, y, bf16, b)
    _u_side(W1, bias1, side1, use1, y, bf16, a)
    done.result()
    x12, x21, c1, c2 = _vd_mix(g1r, g2r, use1, use2, side1, side2, table, profile, E, a, b)
    done = helper.submit(_vd_half, second, EM, side2, x21, b, c2, out, first.shape[1])
    _vd_half(first, EM, side1, a, x12, c1, out, 0)
    done.result()


_helpers = threading.local()


def _helper() -> concurrent.futures.ThreadPoolExecutor:
    """The calling thread's own helper thread (started by it, so with its niceness: a mask
    build's job thread never shares the engine's helper, nor lends it its priority); it ends
    with its thread's executor."""
    helper = getattr(_helpers, "executor", None)
    if helper is None:
        helper = _helpers.executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="monet-experts")
    return helper


def hd_layer(y_TD, side1, side2, g1_THn, g2_THn, u, table_RD, mask=None):
    """The HD expert layer in one call, as vd_layer: u (weight [E*M, D], bias [E*M]); table:
    kernels.pack_hd's. float32 [T, D]."""
    out = torch.zeros(y_TD.shape[0], table_RD.shape[1], dtype=torch.float32)
    _hd_layer(_f32(y_TD), _weights(u[0]), _weights(u[1][:, None]), side1.numpy(),
              side2.numpy(), _f32(g1_THn), _f32(g2_THn), *_mask_arrays(mask, y_TD.shape[0]),
              _weights(table_RD), y_TD.dtype == torch.bfloat16, out.numpy())
    return out
