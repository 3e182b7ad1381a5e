"""Bias-free linear layers for decode steps: x W^T as F.linear. On the CPU outside autograd,
steps of few tokens take compiled matrix-vector loops (kernels.gemv_cpu); float32 steps of
more tokens take oneDNN's matrix product (torch.ops.mkldnn._linear_pointwise, the plain weight
in place) rather than F.linear's BLAS; everything else F.linear."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["gemv_max_tokens", "linear"]


@functools.cache
def _bf16_products() -> str:
    """How this CPU multiplies bfloat16: "amx" (tiles), "avx512" (AVX512-BF16 dot products)
    or "widened" (neither: torch widens element by element)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512"
    return "widened"


@functools.cache
def _cpu_vendor() -> str:
    """"intel", "amd" or "other" (from /proc/cpuinfo; "other" where it cannot be read): MKL,
    torch's float32 product, runs its own fast code on Intel CPUs only."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "other")
    except OSError:
        pass
    return "other"


# bfloat16 steps of up to this many tokens take the loops, per kind of bfloat16 product.
_BF16_MAX_TOKENS = {"amx": 0, "avx512": 2, "widened": 512}


def gemv_max_tokens(dtype: torch.dtype) -> int:
    """Steps of up to this many tokens take the loops. Measured on 2-core CPUs, one [4608,
    1536] weight, cold (24 in turn), F.linear / loops: AVX2 bfloat16 1.15x at 1 token, 2.7x
    at 8, 3.2x at 32, 2.8x at 512 (torch widens bfloat16 element-wise there). AVX512-BF16 (no
    AMX): bfloat16 1.7x at 1, 1.3x at 2, 0.65x at 4. AMX: bfloat16 level at one token on one
    machine, F.linear faster on another (Xeon, cold [4608 | 1536 | 3072 | 32000, 1536]: loops
    / F.linear 1.36 | 1.06 | 1.17 | 1.36x at one token): none.
    float32 against oneDNN's product (AVX512 EPYC; [4608 | 1536 | 3072, 1536]): 1.29 | 1.18 |
    0.93x at 1 token, 1.07 | 1.09 | 1.20x at 4, 0.97 | 0.86 | 0.80x at 6, 0.48x at 64. On an
    Intel CPU (Xeon with AMX, [4608 | 1536 | 3072 | 32000, 1536]) MKL's matrix-vector product
    wins at one token, F.linear / loops 0.74 | 0.80 | 0.62 | 0.94x, and oneDNN's from 4
    (0.95 | 1.08 | 0.75 | 0.91x of the loops): none there."""
    if dtype == torch.float32:
        return 0 if _cpu_vendor() == "intel" else 4
    if dtype == torch.bfloat16:
        return _BF16_MAX_TOKENS[_bf16_products()]
    return 0


def _onednn(weight: torch.Tensor, tokens: int) -> bool:
    """Whether oneDNN's float32 product takes this step: on the same AVX512 EPYC, F.linear /
    oneDNN 1.6-2.8x from 1 to 64 tokens on [4608 | 1536 | 3072, 1536] weights (torch's float32
    product is MKL's, which runs its generic code on AMD CPUs). On an Intel CPU MKL's own code
    runs, and wins at one token: F.linear / oneDNN 0.88 | 0.82 | 0.84 | 0.94x there, 1.08 |
    0.94 | 0.94 | 1.45x at 4, 1.48 | 1.04 | 1.17 | 1.90x at 8 (the shapes above and lm_head)."""
    return (weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and (tokens > 1 or _cpu_vendor() != "intel"))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x [..., D] and weight [N, D], in x's dtype. On the CPU, outside
    autograd, with a contiguous float32 or bfloat16 weight of x's dtype: at most
    gemv_max_tokens tokens take compiled loops that read each weight row once per step
    (float32 accumulation, rounded to x's dtype as F.linear's result is); more float32 tokens
    oneDNN's product."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (tokens > 0 and x.dtype == weight.dtype and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        if tokens <= gemv_max_tokens(weight.dtype):
            from kernels import gemv_cpu

            out = gemv_cpu.gemv(x.reshape(tokens, x.shape[-1]), weight)
            return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
        if _onednn(weight, tokens):
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)
