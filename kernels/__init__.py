"""Kernels for MONET layers: router, masked expert mixing and the decode step's products.

Each operation has a plain-torch reference, Triton kernels for CUDA and a launcher that checks
its inputs and picks one (`impl=` forces a choice; on a CPU the Triton kernels then need
TRITON_INTERPRET=1). The router and mixing also have compiled CPU loops (Numba; mixing's over
the router's nonzero entries), the launchers' pick on the CPU outside autograd. Sparse expert layers for decode
(kernels.sparse) evaluate only the experts a step uses, reading only the active experts' rows:
on the CPU the whole layer in one compiled call (Numba, kernels.sparse_cpu), on CUDA composed
with Triton gather-GEMV for steps of up to 32 tokens (kernels.sparse_triton). A decode step's
linear layers (kernels.linear) and attention over the cache (kernels.attention) take compiled
CPU loops for few tokens, torch elsewhere. Only torch, triton and numba are imported (and
llvmlite, Numba's own)."""

from __future__ import annotations

import functools

from kernels.mixing import (
    NO_PROFILE,
    MixHD,
    MixVD,
    bitset_words,
    mix_hd,
    mix_hd_reference,
    mix_vd,
    mix_vd_reference,
    prepare_mixing,
)
from kernels.attention import attention
from kernels.prepare import prepare
from kernels.gemv import gemv_max_tokens, linear
from kernels.router import route, route_reference, router_sigma
from kernels.sparse import (
    SPARSE_MAX_SHARE,
    SPARSE_MAX_TOKENS,
    ActiveExperts,
    active_experts,
    pack_hd,
    pack_vd,
    sparse_hd,
    sparse_vd,
    use_sparse,
)

__all__ = [
    "attention",
    "gemv_max_tokens",
    "NO_PROFILE",
    "SPARSE_MAX_SHARE",
    "SPARSE_MAX_TOKENS",
    "ActiveExperts",
    "active_experts",
    "pack_hd",
    "pack_vd",
    "sparse_hd",
    "sparse_vd",
    "use_sparse",
    "linear",
    "MixHD",
    "MixVD",
    "bitset_words",
    "mix_hd",
    "mix_hd_reference",
    "mix_vd",
    "mix_vd_reference",
    "prepare",
    "prepare_mixing",
    "route",
    "route_reference",
    "router_sigma",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (its kernels still need a CUDA tensor to run)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
