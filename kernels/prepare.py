"""Compile the CPU loops that a model's steps will run, before the first request.

Numba compiles each loop on its first call (or loads it from its on-disk cache). Left to the
first request, a new install's first generation at the 850M shape (bf16, batch 1) took 6.5 s
more than the next (prefill 4.60 s against 0.41, its first decode step 2366 ms against 83)
and, with the cache filled, 0.5 s more. `prepare` runs each launcher once on tiny inputs of
the kinds a step passes: 10.4 s at start-up on a new install, 0.7 s from the cache, and the
first request is as fast as the next (prefill 0.46-0.48 s, first decode step 84-88 ms).
"""

from __future__ import annotations

import torch

__all__ = ["prepare"]


def prepare(device: torch.device | str, dtype: torch.dtype, *, sparse: bool) -> None:
    """Compile now what steps of (device, dtype) activations will run on the CPU: the mixing,
    the router, the decode linear loops and decode attention, and with `sparse` (a model
    whose expert layers may take the sparse path) the sparse expert layers (one token and the
    threaded path, masked and not: 5.5 of a new install's 9.3 s, which a dense model never
    runs). Does nothing for other devices (their kernels are Triton's or torch's)."""
    from kernels.mixing import prepare_mixing

    prepare_mixing(device, dtype)
    if torch.device(device).type != "cpu":
        return
    with torch.no_grad():
        _router()
        if dtype in (torch.float32, torch.bfloat16):
            if sparse:
                _sparse_layers(dtype)
            _linear(dtype)
            _attention(dtype)


def _router() -> None:
    from kernels.router import route

    f32 = torch.float32  # explicit: vLLM builds its model under another default dtype
    route(torch.zeros(2, 1, 4, dtype=f32), torch.zeros(1, dtype=f32), torch.ones(1, dtype=f32),
          sigma=0.5)


def _sparse_layers(dtype: torch.dtype) -> None:
    from kernels.mixing import bitset_words
    from kernels.sparse import active_experts, pack_hd, pack_vd, sparse_hd, sparse_vd

    E, M, D, H = 4, 2, 8, 1
    w = torch.zeros(E * M, D, dtype=dtype), torch.zeros(E * M, dtype=dtype)
    v = torch.zeros(D // 2, E * M, dtype=dtype)
    half = pack_vd(v, v, torch.zeros(E, D // 2, dtype=dtype))
    table = pack_hd(torch.zeros(D, E * M, dtype=dtype), torch.zeros(E, D, dtype=dtype))
    masks = torch.zeros(1, bitset_words(E), dtype=torch.int32)
    for T in (1, 2):  # one token on the calling thread; from two the threaded VD path
        g = torch.full((T, H, E), 1.0 / E, dtype=torch.float32)
        active = active_experts(g, g)
        y = torch.zeros(T, D, dtype=dtype)
        for mask in (None, (masks, torch.zeros(T, dtype=torch.int64))):
            sparse_vd(y, active, w, w, half, half, mask)
            sparse_hd(y, active, w, table, mask)


def _linear(dtype: torch.dtype) -> None:
    from kernels.gemv import gemv_max_tokens, linear

    if gemv_max_tokens(dtype) > 0:
        linear(torch.zeros(1, 8, dtype=dtype), torch.zeros(300, 8, dtype=dtype))


def _attention(dtype: torch.dtype) -> None:
    from kernels.attention import attention

    q = torch.zeros(1, 2, 1, 4, dtype=dtype)
    kv = torch.zeros(1, 1, 3, 4, dtype=dtype)
    attention(q, kv, kv, torch.ones(1, 1, 2, dtype=torch.bool))
