"""kernels.attention: the decode loops against float64 softmax attention (grouped-query heads,
a cache longer than the positions read, masked positions, one thread and two), and when the
launcher takes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import attention_cpu


def reference(q, k, v, keep):
    """float64 softmax attention over the first keep.shape[2] positions, heads repeated."""
    S, group = keep.shape[2], q.shape[1] // k.shape[1]
    k = k[:, :, :S].double().repeat_interleave(group, 1)
    v = v[:, :, :S].double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def case(B, N, K, T, S, S_max, Dh, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, T, Dh, generator=g).to(dtype)
    k = torch.randn(B, K, S_max, Dh, generator=g).to(dtype)
    v = torch.randn(B, K, S_max, Dh, generator=g).to(dtype)
    keep = torch.rand(B, T, S, generator=g) < 0.7
    keep[..., -1] = True  # every query keeps a position
    return q, k, v, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,K,T,S,S_max,Dh", [
    (1, 1, 1, 1, 1, 1, 1), (1, 12, 12, 1, 100, 130, 128), (3, 8, 2, 1, 17, 17, 16),
    (2, 6, 3, 3, 9, 40, 5), (5, 4, 1, 2, 33, 33, 7)])
@pytest.mark.parametrize("split", [False, True])
def test_loops_match_float64(dtype, B, N, K, T, S, S_max, Dh, split, monkeypatch):
    monkeypatch.setattr(attention_cpu, "_SPLIT_MIN_WORK", 0 if split else 1 << 62)
    q, k, v, keep = case(B, N, K, T, S, S_max, Dh, dtype, seed=B * 100 + N + T + S)
    got = attention_cpu.attention(q, k, v, keep)
    assert got.dtype == torch.float32 and got.shape == (B, N, T, Dh)
    want = reference(q, k, v, keep)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1)


def test_the_cache_beyond_the_positions_read_is_never_read():
    q, k, v, keep = case(2, 4, 2, 1, 10, 30, 8, torch.float32, seed=1)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:], v2[:, :, 10:] = float("nan"), float("nan")
    assert torch.equal(attention_cpu.attention(q, k, v, keep),
                       attention_cpu.attention(q, k2, v2, keep))
    with pytest.raises(ValueError, match="positions"):
        attention_cpu.attention(q, k[:, :, :9], v[:, :, :9], keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launcher_takes_the_loops_for_one_query_on_the_cpu(dtype, monkeypatch):
    calls = []
    real = attention_cpu.attention
    monkeypatch.setattr(attention_cpu, "attention",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    q, k, v, keep = case(2, 6, 3, 1, 20, 25, 16, dtype, seed=2)
    out = kernels.attention(q, k, v, keep)
    assert calls == [(2, 6, 1, 16)] and out.dtype == dtype
    sdpa = F.scaled_dot_product_attention(
        q.double(), k[:, :, :20].double().repeat_interleave(2, 1),
        v[:, :, :20].double().repeat_interleave(2, 1), attn_mask=keep[:, None])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - sdpa).abs().max() <= tol
    q4, _, _, keep4 = case(2, 6, 3, 4, 20, 25, 16, dtype, seed=3)  # prefill: SDPA
    out4 = kernels.attention(q4, k, v, keep4)
    assert len(calls) == 1 and (out4.double() - reference(q4, k, v, keep4)).abs().max() <= tol
    leaf = q.clone().requires_grad_(True)  # autograd: SDPA, whose gradient flows
    kernels.attention(leaf, k, v, keep).sum().backward()
    assert len(calls) == 1 and leaf.grad is not None
    kernels.attention(q.double(), k.double(), v.double(), keep)  # other dtypes: SDPA
    assert len(calls) == 1
