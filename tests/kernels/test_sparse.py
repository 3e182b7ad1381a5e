"""Sparse expert layers (kernels.sparse) against the naive E x E layer in float64.

The oracle evaluates every expert (a = relu2(U y + c) over all E), builds each token's masked
composite weights and contracts (kernel_data.naive_mix_*), then applies the dense v
projections: what the sparse path must equal while it reads only the active experts' rows.
"""

from __future__ import annotations

import pytest
import torch
from kernel_data import (
    TOL,
    generator,
    mixed_profiles,
    naive_mix_hd,
    naive_mix_vd,
    one_expert_weights,
    pack_masks,
    random_masks,
    router_weights,
)

import kernels
import kernels.sparse
from kernels import active_experts, pack_hd, pack_vd, sparse_hd, sparse_vd, use_sparse
from kernels.sparse import compact_table

EMPTY, FULL = 1, 2


@pytest.fixture(params=["whole", "explicit", "factorised"])
def mixing(request, monkeypatch):
    """The layer in one compiled call (kernels.sparse_cpu, the CPU's), and composed (other
    devices) with both ways of mixing over the compact experts: through the explicit weights
    G (decode sizes) and the factorised kernels.mix_vd / mix_hd (larger steps)."""
    if request.param != "whole":
        compose(monkeypatch)
        limit = 1 << 62 if request.param == "explicit" else 0
        monkeypatch.setattr(kernels.sparse, "EXPLICIT_MAX_PAIRS", limit)
    return request.param


def compose(monkeypatch):
    """Make the sparse layers composed of their steps (kernels.sparse) on the CPU too."""
    monkeypatch.setattr(kernels.sparse, "_whole_layer", lambda *tensors: None)


def mask_of(E, T, *, seed, profile=None):
    masks = random_masks(4, E, density=0.3, seed=seed)
    masks[EMPTY], masks[FULL] = False, True
    profile_T = mixed_profiles(T, 4, seed=seed) if profile is None else torch.full((T,), profile)
    return pack_masks(masks), profile_T


def weights(D, E, M, *, seed, vertical):
    gen = generator(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * 0.3  # noqa: E731
    if vertical:
        return {"u1": (rnd(E * M, D), rnd(E * M)), "u2": (rnd(E * M, D), rnd(E * M)),
                **{v: rnd(D // 2, E * M) for v in ("v11", "v12", "v21", "v22")},
                "b1": rnd(E, D // 2), "b2": rnd(E, D // 2)}
    return {"u": (rnd(E * M, D), rnd(E * M)), "v": rnd(D, E * M), "b": rnd(E, D)}


def relu2(x):
    return x.clamp_min(0).square()


def naive_layer(y, g1, g2, w, mask, *, vertical):
    """The dense masked layer in float64 over all E experts: [T, D]."""
    T, E = y.shape[0], g1.shape[2]
    table, profile = mask if mask is not None else (None, None)
    if vertical:
        M = w["u1"][0].shape[0] // E
        a = relu2(y @ w["u1"][0].T + w["u1"][1]).view(T, E, M)
        b = relu2(y @ w["u2"][0].T + w["u2"][1]).view(T, E, M)
        x = naive_mix_vd(a, b, g1, g2, table, profile)
        first = x["x11"] @ w["v11"].T + x["x12"] @ w["v12"].T + x["c1"] @ w["b1"]
        second = x["x21"] @ w["v21"].T + x["x22"] @ w["v22"].T + x["c2"] @ w["b2"]
        return torch.cat((first, second), -1)
    M = w["u"][0].shape[0] // E
    x = naive_mix_hd(relu2(y @ w["u"][0].T + w["u"][1]).view(T, E, M), g1, g2, table, profile)
    return x["x"] @ w["v"].T + x["c2"] @ w["b"]


def run_sparse(y, g1, g2, w, mask, *, vertical, dtype, device="cpu"):
    c = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    active = active_experts(g1.to(device), g2.to(device))
    if mask is not None:
        mask = tuple(t.to(device) for t in mask)
    if vertical:
        first = pack_vd(c(w["v11"]), c(w["v12"]), c(w["b1"]))
        second = pack_vd(c(w["v21"]), c(w["v22"]), c(w["b2"]))
        return sparse_vd(c(y), active, tuple(map(c, w["u1"])), tuple(map(c, w["u2"])), first,
                         second, mask)
    return sparse_hd(c(y), active, tuple(map(c, w["u"])), pack_hd(c(w["v"]), c(w["b"])), mask)


def check(T, H, E, M, D, *, vertical, dtype, masked, seed, g=None, profile=None,
          device="cpu"):
    y = torch.randn(T, D, generator=generator(seed), dtype=torch.float64)
    g1, g2 = g if g is not None else (router_weights(T, H, E, seed=seed + 1),
                                      router_weights(T, H, E, seed=seed + 2))
    w = weights(D, E, M, seed=seed + 3, vertical=vertical)
    mask = mask_of(E, T, seed=seed + 4, profile=profile) if masked else None
    got = run_sparse(y, g1, g2, w, mask, vertical=vertical, dtype=dtype, device=device).cpu()
    want = naive_layer(y, g1.double(), g2.double(), w, mask, vertical=vertical)
    assert got.shape == (T, D) and got.dtype == dtype
    tol = TOL[dtype] * 10 * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0.0)
    return got, want


SHAPES = [  # T, H, E, M, D
    (1, 4, 512, 2, 16),  # a decode step at E = 512
    (3, 3, 37, 3, 10),  # nothing a power of two
    (8, 2, 16, 4, 8),  # a step that uses most experts
]


@pytest.mark.parametrize("vertical", [True, False], ids=["VD", "HD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_layer_equals_the_naive_layer(shape, masked, dtype, vertical, mixing):
    check(*shape, vertical=vertical, dtype=dtype, masked=masked, seed=sum(shape))


def force_triton_gather(monkeypatch) -> list:
    """Make the sparse layers use the Triton gather-GEMV (kernels.sparse_triton) whatever the
    device (on a CPU under TRITON_INTERPRET=1); returns the list of its calls."""
    from kernels import sparse_triton

    calls = []

    class Recorded:
        def rows_dot(*args):
            calls.append("rows_dot")
            return sparse_triton.rows_dot(*args)

        def rows_axpy(*args):
            calls.append("rows_axpy")
            return sparse_triton.rows_axpy(*args)

    compose(monkeypatch)
    monkeypatch.setattr(kernels.sparse, "_gather", lambda weight, T: Recorded)
    return calls


@pytest.mark.parametrize("vertical", [True, False], ids=["VD", "HD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_sparse_layer_on_the_triton_gather(device, monkeypatch, shape, masked, dtype, vertical):
    """The layer with the Triton primitives equals the naive layer and the CPU's (one call)."""
    kw = dict(vertical=vertical, dtype=dtype, masked=masked, seed=sum(shape) + 100)
    on_cpu, want = check(*shape, **kw)
    calls = force_triton_gather(monkeypatch)
    got, _ = check(*shape, **kw, device=device)
    per_side = ["rows_dot", "rows_dot", "rows_axpy", "rows_axpy"] if vertical else [
        "rows_dot", "rows_axpy"]
    assert calls == per_side
    tol = TOL[dtype] * 10 * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), on_cpu.double(), atol=tol, rtol=0.0)


def test_layer_implementation_by_device_dtype_and_step_size(device):
    """The whole layer in one call when every tensor is a CPU float32 / bfloat16 one, at any
    T; composed otherwise: Triton gathers for contiguous CUDA weights up to T = 32 (decode),
    torch's gather + GEMM beyond."""
    from kernels import sparse_cpu

    whole, pick = kernels.sparse._whole_layer, kernels.sparse._gather
    w = torch.zeros(4, 4)
    assert whole(w, w.bfloat16()) is sparse_cpu
    assert whole(w, w.half()) is None and whole(w.double()) is None
    assert pick(w, 1) is None
    if device.type == "cuda":
        from kernels import sparse_triton

        w = w.to(device)
        assert whole(w) is None and whole(w.cpu(), w) is None
        assert pick(w, 32) is sparse_triton and pick(w.bfloat16(), 1) is sparse_triton
        assert pick(w, 33) is None and pick(w.half(), 1) is None and pick(w.t(), 1) is None


@pytest.mark.parametrize("vertical", [True, False], ids=["VD", "HD"])
@pytest.mark.parametrize("profile", [EMPTY, FULL], ids=["empty-mask", "full-mask"])
def test_empty_and_full_masks(profile, vertical, mixing):
    got, want = check(5, 2, 24, 2, 8, vertical=vertical, dtype=torch.float32, masked=True,
                      seed=3, profile=profile)
    if profile == FULL:  # every composite expert removed: nothing is left but rounding
        assert got.abs().max() <= 1e-6


@pytest.mark.parametrize("vertical", [True, False], ids=["VD", "HD"])
def test_every_token_on_one_expert(vertical, mixing):
    T, H, E = 6, 3, 40
    g = (one_expert_weights(T, H, E, 7), one_expert_weights(T, H, E, 11))
    check(T, H, E, 2, 8, vertical=vertical, dtype=torch.float32, masked=True, seed=5, g=g)
    active = active_experts(*g)
    assert active.side1.tolist() == [7] and active.side2.tolist() == [11]


def test_masked_decode_steps_mix_through_the_explicit_weights():
    """At the 850M shape (E = 512, H = 6, k = 8) a masked batch-1 step (about 50 experts per
    side) mixes through G; batch 8 (most of the experts) and unmasked steps factorised."""
    mask = (torch.zeros(1, kernels.bitset_words(512), dtype=torch.int32), torch.zeros(1))
    for T, explicit in ((1, True), (8, False)):
        g = (router_weights(T, 6, 512, seed=T), router_weights(T, 6, 512, seed=T + 99))
        assert kernels.sparse._explicit(active_experts(*g), mask) is explicit, T
        assert not kernels.sparse._explicit(active_experts(*g), None)


def test_active_experts_pads_both_sides_to_one_count_with_zero_weight():
    g1, g2 = torch.zeros(2, 1, 10), torch.zeros(2, 1, 10)
    g1[0, 0, 3] = g1[1, 0, 5] = g1[1, 0, 8] = 1 / 2
    g2[:, 0, 4] = 1.0
    active = active_experts(g1, g2)
    assert active.side1.tolist() == [3, 5, 8] and active.side2.tolist() == [4, 4, 4]
    assert active.g2[:, :, 1:].abs().sum() == 0 and torch.equal(active.g2[:, :, 0], g2[:, :, 4])
    assert torch.equal(active.g1, g1[:, :, [3, 5, 8]])


def test_compact_table_keeps_the_bits_of_the_active_pairs():
    E = 45
    masks = random_masks(3, E, density=0.5, seed=1)
    g1, g2 = router_weights(2, 2, E, seed=2), router_weights(2, 2, E, seed=3)
    active = active_experts(g1, g2)
    compact = compact_table(pack_masks(masks), active, E)
    n = active.side1.numel()
    want = masks[:, active.side1][:, :, active.side2]
    from kernel_data import unpack_masks

    assert torch.equal(unpack_masks(compact, n), want)


def test_use_sparse_decides_by_share_once_per_routing_group():
    g = router_weights(1, 4, 512, seed=1)
    cache = {}
    f32 = torch.float32
    active = use_sparse(g, g, cache, dtype=f32)
    assert active is not None and cache["sparse"] is active
    assert use_sparse(g, g, cache, dtype=f32, max_share=0.0) is active  # the group's decision
    assert use_sparse(g, g, None, dtype=f32, max_share=0.0) is None
    assert kernels.SPARSE_MAX_SHARE[f32] * 512 >= active.side1.numel()
    many = router_weights(64, 4, 512, seed=2)  # 64 tokens use nearly every expert
    assert use_sparse(many, many, None, dtype=f32) is not None  # float32: sparse still wins
    assert use_sparse(many, many, None, dtype=torch.bfloat16) is None  # over bf16's share
    more = router_weights(kernels.SPARSE_MAX_TOKENS + 1, 4, 512, seed=3)
    assert use_sparse(more, more, None, dtype=f32) is None  # too many tokens
    assert use_sparse(more, more, None, dtype=f32, max_share=1.0) is not None  # forced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_threads_give_the_one_thread_layer_exactly(monkeypatch, dtype):
    """From THREADED_MIN_TOKENS a VD layer's sides and halves run on a helper thread too:
    the same loops over disjoint outputs, so the same bits as on one thread."""
    from kernels import sparse_cpu

    outs = []
    for limit in (1, 1 << 30):
        monkeypatch.setattr(sparse_cpu, "THREADED_MIN_TOKENS", limit)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        outs.append(check(8, 4, 512, 2, 16, vertical=True, dtype=dtype, masked=True,
                          seed=11)[0])
    assert torch.equal(outs[0], outs[1])


def test_each_calling_thread_has_its_own_helper():
    """A build job's thread never queues behind the engine's helper, nor shares its
    priority: each thread that runs a layer starts its own."""
    import threading

    from kernels import sparse_cpu

    mine, theirs = sparse_cpu._helper(), []
    worker = threading.Thread(target=lambda: theirs.append(sparse_cpu._helper()))
    worker.start()
    worker.join()
    assert sparse_cpu._helper() is mine and theirs[0] is not mine


@pytest.mark.parametrize("vertical", [True, False], ids=["VD", "HD"])
def test_a_profile_not_one_per_token_is_refused(vertical):
    """The compiled layer reads an empty profile as "no mask": a mask whose profile does
    not name every token must fail, never run unmasked."""
    T, H, E, M, D = 3, 2, 16, 2, 8
    g = (router_weights(T, H, E, seed=1), router_weights(T, H, E, seed=2))
    w = weights(D, E, M, seed=3, vertical=vertical)
    table = mask_of(E, T, seed=4)[0]
    for profile in (torch.zeros(0, dtype=torch.int32), torch.zeros(T - 1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="mask profile"):
            run_sparse(torch.randn(T, D, dtype=torch.float64), *g, w, (table, profile),
                       vertical=vertical, dtype=torch.float32)
