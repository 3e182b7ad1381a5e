"""Masked expert mixing (VD, HD): Triton kernels and references against the naive E x E mixing.

Interpreter shapes stay small (every Triton program runs in Python); T = 1000 and E = 512 at
large T run on the references only, against the same naive oracle.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_data import (
    TOL,
    LaunchRecorder,
    activations,
    assert_mix_close,
    meta,
    mixed_profiles,
    naive_mix_hd,
    naive_mix_vd,
    one_expert_weights,
    pack_masks,
    random_masks,
    router_weights,
)

import kernels
from kernels import MixHD, MixVD, bitset_words

# Profiles of the test mask table: 0 random half, 1 empty, 2 full, 3 random tenth.
EMPTY, FULL = 1, 2
NUM_PROFILES = 4


def mask_table(E: int, *, seed: int) -> torch.Tensor:
    masks = random_masks(NUM_PROFILES, E, density=0.5, seed=seed)
    masks[EMPTY] = False
    masks[FULL] = True
    masks[3] = random_masks(1, E, density=0.1, seed=seed + 1)[0]
    return pack_masks(masks)


def make_inputs(T, H, E, M, dtype, *, seed):
    """a, b [T, E, M] in dtype; g1, g2 [T, H, E] float32 (float64 with dtype float64);
    table [4, W]; profile_T [T]."""
    g_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "a": activations(T, E, M, seed=seed, dtype=dtype),
        "b": activations(T, E, M, seed=seed + 1, dtype=dtype),
        "g1": router_weights(T, H, E, seed=seed + 2, dtype=g_dtype),
        "g2": router_weights(T, H, E, seed=seed + 3, dtype=g_dtype),
        "table": mask_table(E, seed=seed + 4),
        "profile": mixed_profiles(T, NUM_PROFILES, seed=seed + 5),
    }


def scale_of(H: int, *xs: torch.Tensor) -> float:
    """Bound of every output: c <= H, |x..| <= H max|x|."""
    return H * max(1.0, *(x.abs().max().item() for x in xs if x.numel()))


def to(device, *xs):
    return [x.to(device) for x in xs]


def cpu(out):
    return type(out)(*(x.cpu() for x in out))


# (T, H, E, M, activation dtype) run through the Triton interpreter.
TRITON_CASES = [
    (1, 8, 512, 8, torch.float32),
    (7, 4, 24, 6, torch.float32),
    (7, 1, 16, 12, torch.bfloat16),
    (128, 4, 16, 4, torch.float32),
]


@pytest.mark.parametrize(("T", "H", "E", "M", "dtype"), TRITON_CASES)
def test_vd_triton_matches_naive(device, T, H, E, M, dtype):
    d = make_inputs(T, H, E, M, dtype, seed=10 * T + E)
    a, b, g1, g2, table, profile = to(device, *d.values())
    plain = cpu(kernels.mix_vd(a, b, g1, g2, impl="triton"))
    out = cpu(kernels.mix_vd(a, b, g1, g2, table, profile, impl="triton"))
    ref = kernels.mix_vd(d["a"], d["b"], d["g1"], d["g2"], d["table"], d["profile"],
                         impl="reference")

    assert isinstance(out, MixVD) and isinstance(plain, MixVD)
    for name in MixVD._fields:
        assert getattr(out, name).dtype == getattr(ref, name).dtype == dtype, name
        assert getattr(out, name).shape == getattr(ref, name).shape, name
    scale = scale_of(H, d["a"], d["b"])
    assert_mix_close(plain, naive_mix_vd(d["a"], d["b"], d["g1"], d["g2"]), dtype=dtype,
                     scale=scale)
    expected = naive_mix_vd(d["a"], d["b"], d["g1"], d["g2"], d["table"], d["profile"])
    assert_mix_close(out, expected, dtype=dtype, scale=scale)
    assert_mix_close(ref, expected, dtype=dtype, scale=scale)
    # Tokens without a profile take the factorised path: the same bits as without a table.
    free = d["profile"] < 0
    for name in MixVD._fields:
        assert torch.equal(getattr(out, name)[free], getattr(plain, name)[free]), name
    # Full-mask tokens lose every composite expert.
    full = d["profile"] == FULL
    for name in MixVD._fields:
        assert (getattr(out, name)[full].abs() <= TOL[dtype] * scale).all(), name


@pytest.mark.parametrize(("T", "H", "E", "M", "dtype"), TRITON_CASES)
def test_hd_triton_matches_naive(device, T, H, E, M, dtype):
    d = make_inputs(T, H, E, 2 * M, dtype, seed=10 * T + E + 1)
    x, g1, g2, table, profile = to(device, d["a"], d["g1"], d["g2"], d["table"], d["profile"])
    plain = cpu(kernels.mix_hd(x, g1, g2, impl="triton"))
    out = cpu(kernels.mix_hd(x, g1, g2, table, profile, impl="triton"))
    ref = kernels.mix_hd(d["a"], d["g1"], d["g2"], d["table"], d["profile"], impl="reference")

    assert isinstance(out, MixHD)
    for name in MixHD._fields:
        assert getattr(out, name).dtype == getattr(ref, name).dtype == dtype, name
        assert getattr(out, name).shape == getattr(ref, name).shape, name
    scale = scale_of(H, d["a"])
    assert_mix_close(plain, naive_mix_hd(d["a"], d["g1"], d["g2"]), dtype=dtype, scale=scale)
    expected = naive_mix_hd(d["a"], d["g1"], d["g2"], d["table"], d["profile"])
    assert_mix_close(out, expected, dtype=dtype, scale=scale)
    assert_mix_close(ref, expected, dtype=dtype, scale=scale)
    free = d["profile"] < 0
    for name in MixHD._fields:
        assert torch.equal(getattr(out, name)[free], getattr(plain, name)[free]), name


@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
def test_every_token_on_one_expert(request, impl):
    """All weight on (5, 17): masking (5, 17) zeroes the layer, (17, 5) or neighbours do not."""
    T, H, E, M = 7, 4, 24, 6
    device = request.getfixturevalue("device") if impl == "triton" else torch.device("cpu")
    masks = torch.zeros(3, E, E, dtype=torch.bool)
    masks[0, 5, 17] = True
    masks[1, 17, 5] = True  # the transpose: catches a swapped i / j
    masks[2, 5, 16] = masks[2, 4, 17] = True
    table = pack_masks(masks)
    profile = torch.tensor([0, 1, 2, -1, 0, 1, 2])
    g1, g2 = one_expert_weights(T, H, E, 5), one_expert_weights(T, H, E, 17)
    a = activations(T, E, M, seed=1)
    b = activations(T, E, M, seed=2)
    args = to(device, a, b, g1, g2, table, profile)
    vd = cpu(kernels.mix_vd(*args, impl=impl))
    hd = cpu(kernels.mix_hd(args[0], *args[2:], impl=impl))
    scale = scale_of(H, a, b)
    assert_mix_close(vd, naive_mix_vd(a, b, g1, g2, table, profile), dtype=torch.float32,
                     scale=scale)
    assert_mix_close(hd, naive_mix_hd(a, g1, g2, table, profile), dtype=torch.float32,
                     scale=scale)
    gone = profile == 0
    assert all(getattr(vd, f)[gone].abs().max() <= 1e-6 for f in MixVD._fields)
    assert all(getattr(hd, f)[~gone].abs().max() > 0 for f in MixHD._fields)
    assert torch.allclose(vd.c1[~gone][:, 5], torch.full((5,), float(H)))


# Reference against the naive oracle over the shape grid (H cycles through 1, 4, 8), in
# float64 and float32; T = 1000 with E = 512 once (float64): the naive oracle takes seconds.
REFERENCE_GRID = [
    (T, (1, 4, 8)[n % 3], E, dtype)
    for n, (T, E) in enumerate(itertools.product((1, 7, 128, 1000), (16, 24, 512)))
    for dtype in (torch.float64, torch.float32)
    if not (T == 1000 and E == 512 and dtype == torch.float32)
]


@pytest.mark.parametrize(("T", "H", "E", "dtype"), REFERENCE_GRID)
def test_reference_matches_naive(T, H, E, dtype):
    d = make_inputs(T, H, E, 6, dtype, seed=T + E + H)
    scale = scale_of(H, d["a"], d["b"])
    args = (d["g1"], d["g2"], d["table"], d["profile"])
    vd = kernels.mix_vd(d["a"], d["b"], *args, impl="reference")
    assert_mix_close(vd, naive_mix_vd(d["a"], d["b"], *args), dtype=dtype, scale=scale)
    hd = kernels.mix_hd(d["b"], *args, impl="reference")
    assert_mix_close(hd, naive_mix_hd(d["b"], *args), dtype=dtype, scale=scale)


def _odd_case(draw_T, draw_H, draw_E, draw_M, density, seed):
    T, H, E, M = draw_T, draw_H, draw_E, draw_M
    d = make_inputs(T, H, E, M, torch.float32, seed=seed)
    d["table"] = pack_masks(random_masks(3, E, density=density, seed=seed))
    d["profile"] = torch.randint(-1, 3, (T,), generator=torch.Generator().manual_seed(seed))
    return d


odd_shapes = st.tuples(
    st.integers(1, 9),  # T
    st.integers(1, 3),  # H
    st.integers(2, 40),  # E: rows of E*E bits that do not fill their last word
    st.integers(1, 5),  # M
    st.sampled_from([0.0, 0.3, 1.0]),  # mask density
    st.integers(0, 2**16),  # seed
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(odd_shapes)
def test_reference_odd_shapes(case):
    d = _odd_case(*case)
    args = (d["g1"], d["g2"], d["table"], d["profile"])
    scale = scale_of(case[1], d["a"], d["b"])
    vd = kernels.mix_vd(d["a"], d["b"], *args, impl="reference")
    assert_mix_close(vd, naive_mix_vd(d["a"], d["b"], *args), dtype=torch.float32, scale=scale)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(odd_shapes)
def test_triton_odd_shapes(device, case):
    d = _odd_case(*case)
    scale = scale_of(case[1], d["a"], d["b"])
    a, b, g1, g2, table, profile = to(device, *d.values())
    vd = cpu(kernels.mix_vd(a, b, g1, g2, table, profile, impl="triton"))
    args = (d["g1"], d["g2"], d["table"], d["profile"])
    assert_mix_close(vd, naive_mix_vd(d["a"], d["b"], *args), dtype=torch.float32, scale=scale)
    hd = cpu(kernels.mix_hd(b, g1, g2, table, profile, impl="triton"))
    assert_mix_close(hd, naive_mix_hd(d["b"], *args), dtype=torch.float32, scale=scale)


def test_no_table_and_empty_table_are_unmasked(device):
    """A [0, W] table (no profiles) with every profile -1 is the unmasked mixing."""
    T, H, E, M = 5, 2, 16, 4
    d = make_inputs(T, H, E, M, torch.float32, seed=3)
    a, b, g1, g2 = to(device, d["a"], d["b"], d["g1"], d["g2"])
    empty = torch.zeros(0, bitset_words(E), dtype=torch.int32, device=device)
    none = torch.full((T,), -1, dtype=torch.int32, device=device)
    plain = kernels.mix_vd(a, b, g1, g2, impl="triton")
    for out in (kernels.mix_vd(a, b, g1, g2, empty, none, impl="triton"),
                kernels.mix_vd(a, b, g1, g2, d["table"].to(device), none, impl="triton")):
        assert all(torch.equal(x, y) for x, y in zip(out, plain))


def test_non_contiguous_inputs(device):
    T, H, E, M = 3, 2, 16, 4
    d = make_inputs(T, H, E, M, torch.float32, seed=4)
    a = d["a"].transpose(1, 2).contiguous().transpose(1, 2)  # [T, E, M] with strides (.., 1, E)
    g1 = torch.cat([d["g1"], d["g1"]], dim=2)[:, :, :E]  # row stride 2E
    assert not a.is_contiguous() and not g1.is_contiguous()
    a_, b_, g1_, g2_, table, profile = to(device, a, d["b"], g1, d["g2"], d["table"], d["profile"])
    out = cpu(kernels.mix_vd(a_, b_, g1_, g2_, table, profile, impl="triton"))
    expected = naive_mix_vd(a, d["b"], g1, d["g2"], d["table"], d["profile"])
    assert_mix_close(out, expected, dtype=torch.float32, scale=scale_of(H, a, d["b"]))


def test_launchers_check_inputs():
    T, H, E, M = 3, 2, 16, 4
    d = make_inputs(T, H, E, M, torch.float32, seed=0)
    a, b, g1, g2, table, profile = d.values()
    with pytest.raises(ValueError, match="go together"):
        kernels.mix_vd(a, b, g1, g2, table, None)
    with pytest.raises(ValueError, match="words"):
        kernels.mix_vd(a, b, g1, g2, table[:, :-1], profile)
    with pytest.raises(TypeError, match="int32"):
        kernels.mix_hd(a, g1, g2, table.long(), profile)
    with pytest.raises(ValueError, match="profile_T"):
        kernels.mix_hd(a, g1, g2, table, profile[:-1])
    with pytest.raises(TypeError, match="profile_T"):
        kernels.mix_hd(a, g1, g2, table, profile.float())
    with pytest.raises(ValueError, match="g2"):
        kernels.mix_vd(a, b, g1, g2[:, :, :-1])
    with pytest.raises(ValueError, match="differ"):
        kernels.mix_vd(a, b[:, :, :-1], g1, g2)
    with pytest.raises(ValueError, match="impl"):
        kernels.mix_hd(a, g1, g2, impl="cuda")
    with pytest.raises(TypeError, match="Triton"):
        kernels.mix_hd(a.double(), g1, g2, impl="triton")


def test_launchers_pick_the_cpu_loops_outside_autograd(monkeypatch):
    """CPU tensors never take Triton; float32/float64/bfloat16 outside autograd take the
    compiled loops, tensors autograd tracks the reference (differentiable)."""
    import kernels.mixing_cpu as mc

    ran: list[str] = []
    for name in ("mix_vd_cpu", "mix_hd_cpu"):
        real = getattr(mc, name)
        monkeypatch.setattr(mc, name, lambda *a, _real=real, _name=name, **k:
                            ran.append(_name) or _real(*a, **k))
    d = make_inputs(2, 1, 16, 4, torch.float32, seed=0)
    args = (d["g1"], d["g2"], d["table"], d["profile"])
    kernels.mix_vd(d["a"], d["b"], *args)
    kernels.mix_hd(d["a"].double(), d["g1"], d["g2"])
    assert ran == ["mix_vd_cpu", "mix_hd_cpu"]
    kernels.mix_vd(d["a"].bfloat16(), d["b"].bfloat16(), *args)
    assert ran == ["mix_vd_cpu", "mix_hd_cpu", "mix_vd_cpu"]
    kernels.mix_hd(d["a"].requires_grad_(), *args).x.sum().backward()
    assert len(ran) == 3 and d["a"].grad is not None
    with pytest.raises(TypeError, match="CPU mixing"):
        kernels.mix_hd(meta(2, 16, 4), *args, impl="cpu")


def test_prepare_mixing_compiles_the_cpu_loops_of_its_dtype_only():
    """In a new process: bfloat16 compiles (or loads) the float32 loops, which mix it, and
    nothing else; float64 then adds its own."""
    import subprocess
    import sys

    code = (
        "import torch, kernels, kernels.mixing_cpu as m\n"
        "kernels.prepare_mixing('cpu', torch.bfloat16)\n"
        "before = [str(s[0].dtype) for f in (m._mix_vd, m._mix_hd) for s in f.signatures]\n"
        "kernels.prepare_mixing('cpu', torch.float64)\n"
        "print(before, [str(s[0].dtype) for f in (m._mix_vd, m._mix_hd)"
        " for s in f.signatures])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["['float32',", "'float32']", "['float32',", "'float64',", "'float32',",
                   "'float64']"]


def test_cpu_loops_refuse_a_profile_beyond_the_table():
    d = make_inputs(3, 2, 16, 4, torch.float32, seed=0)
    profile = torch.tensor([0, NUM_PROFILES, -1])
    for impl in ("cpu", "reference"):
        with pytest.raises(IndexError):
            kernels.mix_vd(d["a"], d["b"], d["g1"], d["g2"], d["table"], profile, impl=impl)
        with pytest.raises(IndexError):
            kernels.mix_hd(d["a"], d["g1"], d["g2"], d["table"], profile, impl=impl)


def assert_close_mix(out, expected, *, dtype: torch.dtype, scale: float):
    """out against another implementation's result (the sums in another order)."""
    assert_mix_close(out, {f: x.double() for f, x in zip(type(expected)._fields, expected)},
                     dtype=dtype, scale=scale)


# The compiled CPU loops against the reference (the same sums over the nonzero entries only,
# in another order) and against the naive oracle, unmasked and masked; bfloat16 mixed in float32.
CPU_GRID = [case for case in REFERENCE_GRID if case[0] != 1000] + [(1000, 4, 512, torch.float32)]
CPU_GRID += [(T, H, E, torch.bfloat16) for T, H, E in ((1, 6, 512), (7, 1, 24), (33, 8, 64))]


@pytest.mark.parametrize(("T", "H", "E", "dtype"), CPU_GRID)
def test_cpu_loops_match_the_reference_and_naive(T, H, E, dtype):
    d = make_inputs(T, H, E, 6, dtype, seed=T + E + H)
    scale = scale_of(H, d["a"], d["b"])
    for args in ((d["g1"], d["g2"]), (d["g1"], d["g2"], d["table"], d["profile"])):
        vd = kernels.mix_vd(d["a"], d["b"], *args, impl="cpu")
        assert all(x.dtype == dtype for x in vd)
        assert_close_mix(vd, kernels.mix_vd(d["a"], d["b"], *args, impl="reference"),
                         dtype=dtype, scale=scale)
        hd = kernels.mix_hd(d["b"], *args, impl="cpu")
        assert_close_mix(hd, kernels.mix_hd(d["b"], *args, impl="reference"),
                         dtype=dtype, scale=scale)
        if T * E <= 128 * 512:
            assert_mix_close(vd, naive_mix_vd(d["a"], d["b"], *args), dtype=dtype, scale=scale)
            assert_mix_close(hd, naive_mix_hd(d["b"], *args), dtype=dtype, scale=scale)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(odd_shapes)
def test_cpu_loops_odd_shapes(case):
    d = _odd_case(*case)
    args = (d["g1"], d["g2"], d["table"], d["profile"])
    scale = scale_of(case[1], d["a"], d["b"])
    assert_mix_close(kernels.mix_vd(d["a"], d["b"], *args, impl="cpu"),
                     naive_mix_vd(d["a"], d["b"], *args), dtype=torch.float32, scale=scale)
    assert_mix_close(kernels.mix_hd(d["a"], *args, impl="cpu"),
                     naive_mix_hd(d["a"], *args), dtype=torch.float32, scale=scale)


def test_cpu_loops_take_non_contiguous_inputs():
    T, H, E, M = 5, 2, 16, 4
    d = make_inputs(T, H, E, M, torch.float32, seed=4)
    a = d["a"].transpose(1, 2).contiguous().transpose(1, 2)
    g1 = torch.cat([d["g1"], d["g1"]], dim=2)[:, :, :E]
    assert not a.is_contiguous() and not g1.is_contiguous()
    args = (g1, d["g2"], d["table"], d["profile"])
    assert_mix_close(kernels.mix_vd(a, d["b"], *args, impl="cpu"),
                     naive_mix_vd(a.contiguous(), d["b"], g1.contiguous(), *args[1:]),
                     dtype=torch.float32, scale=scale_of(H, a, d["b"]))


def test_triton_launchers_never_sync(monkeypatch):
    """On data-less (meta) tensors the launchers run: nothing reads a value on the host, so no
    synchronisation; grids and scratch follow from the shapes (torch.compile, CUDA graphs)."""
    pytest.importorskip("triton")
    import kernels.mixing_triton as mt

    calls: list = []
    for name in ("_active_experts_kernel", "_mix_vd_kernel", "_masked_vd_kernel",
                 "_mix_hd_kernel", "_masked_hd_kernel"):
        monkeypatch.setattr(mt, name, LaunchRecorder(name, calls))
    T, H, E, M = 5, 4, 24, 6
    x, g = meta(T, E, M, dtype=torch.bfloat16), meta(T, H, E)
    table, profile = meta(3, bitset_words(E), dtype=torch.int32), meta(T, dtype=torch.int64)
    vd = kernels.mix_vd(x, x, g, g, table, profile, impl="triton")
    hd = kernels.mix_hd(x, g, g, table, profile, impl="triton")
    plain = kernels.mix_vd(x, x, g, g, impl="triton")
    assert [c[0] for c in calls] == [
        "_active_experts_kernel", "_mix_vd_kernel", "_masked_vd_kernel",
        "_active_experts_kernel", "_mix_hd_kernel", "_masked_hd_kernel", "_mix_vd_kernel",
    ]
    assert all(c[1][0] == T for c in calls)
    assert calls[1][3]["HAS_MASK"] and not calls[-1][3]["HAS_MASK"]
    for out in (vd, hd, plain):
        assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in out)
    assert vd.x11.shape == (T, E * M) and vd.c2.shape == (T, E) and hd.x.shape == (T, E * M)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_layers_of_a_routing_group_share_active_pairs(impl):
    """One routing, two layers with different mask tables, one pairs cache: each layer's output
    is its own naive masked mixing, and the routing's active pairs are found once."""
    T, H, E, M = 9, 3, 24, 4
    d = make_inputs(T, H, E, M, torch.float64, seed=31)
    d["g1"][0, 1] = 1.0 / E  # a head that keeps every expert
    tables = (d["table"], mask_table(E, seed=77))
    cache: dict = {}
    for table in tables:
        args = (d["g1"], d["g2"], table, d["profile"])
        vd = kernels.mix_vd(d["a"], d["b"], *args, impl=impl, pairs_cache=cache)
        assert_mix_close(vd, naive_mix_vd(d["a"], d["b"], *args), dtype=torch.float64,
                         scale=scale_of(H, d["a"], d["b"]))
        alone = kernels.mix_vd(d["a"], d["b"], *args, impl=impl)
        assert all(torch.equal(x, y) for x, y in zip(vd, alone))
        hd = kernels.mix_hd(d["b"], *args, impl=impl, pairs_cache=cache)
        assert_mix_close(hd, naive_mix_hd(d["b"], *args), dtype=torch.float64,
                         scale=scale_of(H, d["b"]))
    if impl == "reference":
        assert list(cache) == [torch.float64]
        assert (cache[torch.float64].ti // E == 0).sum() >= E * (d["g2"][0, 1] > 0).sum()
    else:  # per (t, h) row, the experts with g != 0: row (0, 1) keeps all E of side 1
        assert list(cache) == [("cpu", torch.float64)]
        start1 = cache["cpu", torch.float64][0]
        assert start1[2] - start1[1] == E
