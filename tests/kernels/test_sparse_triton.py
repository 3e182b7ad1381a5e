"""Triton gather-GEMV (kernels.sparse_triton) against float64.

rows_dot and rows_axpy on seeded inputs, in float32 and bfloat16, at odd shapes (T = 1 and 3,
N, L, D not powers of two, R = 512 rows), with the edge cases of the sparse layers (no token
uses a row, a single row, the same row repeated) and a structural check that only the rows a
token needs are read (every other row is NaN). On a machine without a GPU they run under
TRITON_INTERPRET=1 (tests/kernels/conftest.py); shapes stay small for it.
"""

from __future__ import annotations

import pytest
import torch
from kernel_data import TOL, generator

pytest.importorskip("triton")

from kernels import sparse_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [  # T, R, N (or L), D
    (1, 512, 37, 12),  # a decode step over E = 512 rows, tiny D
    (3, 50, 23, 300),  # nothing a power of two; D over several column tiles and splits
    (3, 40, 300, 10),  # many rows: several row blocks (rows_axpy: several splits of L)
    (37, 30, 9, 20),  # more tokens than one token block (MAX_TOKENS = 32)
]


def inputs(T, R, N, D, *, dtype, seed, density=0.6):
    gen = generator(seed)
    W = torch.randn(R, D, generator=gen, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, R, (N,), generator=gen)
    y = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
    use = torch.rand(T, N, generator=gen) < density
    x = (torch.randn(T, N, generator=gen, dtype=torch.float64) * use).to(dtype)
    return W, rows, y, use, x


def assert_close(got, want64, scale, dtype, device):
    """got against the float64 value of the same (rounded) inputs: the kernels' only error is
    float32 accumulation, so TOL[float32] relative to scale, for bfloat16 inputs too (their
    products are exact in float32)."""
    assert got.dtype == torch.float32 and got.device.type == device.type
    assert got.shape == want64.shape
    tol = TOL[torch.float32] * max(1.0, scale)
    torch.testing.assert_close(got.cpu().double(), want64, atol=tol, rtol=0.0,
                               msg=lambda m: f"{dtype}: {m}")


def dot_reference(W, rows, y, use):
    Wr, y64 = W[rows].double(), y.double()
    return (y64 @ Wr.T) * use, (y64.abs() @ Wr.abs().T).max().item()


def axpy_reference(W, rows, x):
    Wr, x64 = W[rows].double(), x.double()
    return x64 @ Wr, (x64.abs() @ Wr.abs()).max().item() if x.numel() else 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_dot_matches_float64(device, shape, dtype):
    W, rows, y, use, _ = inputs(*shape, dtype=dtype, seed=sum(shape))
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    got = sparse_triton.rows_dot(*on(W, rows, y, use))
    want, scale = dot_reference(W, rows, y, use)
    assert_close(got, want, scale, dtype, device)
    assert torch.equal(got.cpu() == 0, ~use | (want == 0))  # zero exactly where unused


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_axpy_matches_float64(device, shape, dtype):
    W, rows, _, _, x = inputs(*shape, dtype=dtype, seed=sum(shape) + 1)
    got = sparse_triton.rows_axpy(W.to(device), rows.to(device), x.to(device))
    want, scale = axpy_reference(W, rows, x)
    assert_close(got, want, scale, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rows_no_token_needs_are_not_read(device, dtype):
    """Rows outside `rows`, and gathered rows that no token uses (rows_dot) or weighs
    (rows_axpy), are NaN: a read of one would show in rows_axpy's output (0 * NaN), and in
    rows_dot's if it reached a token that uses the row. Row 0, where a kernel that loaded
    the indices but not the rows masked would land, is one of them."""
    T, R, N, D = 3, 64, 29, 40
    W, rows, y, use, x = inputs(T, R, N, D, dtype=dtype, seed=7, density=0.4)
    rows = rows.clamp_min(1)
    use[:, 5] = False  # one gathered row nobody uses
    x = x * use
    needed = torch.zeros(R, dtype=torch.bool)
    needed[rows[use.any(0)]] = True
    poisoned = W.masked_fill(~needed[:, None], float("nan"))
    dev = lambda t: t.to(device)  # noqa: E731
    z = sparse_triton.rows_dot(dev(poisoned), dev(rows), dev(y), dev(use)).cpu()
    out = sparse_triton.rows_axpy(dev(poisoned), dev(rows), dev(x)).cpu()
    assert not needed[0] and torch.isfinite(z).all() and torch.isfinite(out).all()
    assert_close(z, *dot_reference(W, rows, y, use), dtype, device)
    assert_close(out, *axpy_reference(W, rows, x), dtype, device)


def test_no_use_a_single_row_and_repeated_rows(device):
    T, R, D = 3, 20, 7
    W, _, y, _, _ = inputs(T, R, 1, D, dtype=torch.float32, seed=11)
    dev = lambda t: t.to(device)  # noqa: E731
    rows = torch.tensor([4, 9, 4, 4, 17])
    none = torch.zeros(T, 5, dtype=torch.bool)
    assert torch.equal(sparse_triton.rows_dot(dev(W), dev(rows), dev(y), dev(none)).cpu(),
                       torch.zeros(T, 5))
    assert torch.equal(sparse_triton.rows_axpy(dev(W), dev(rows), dev(torch.zeros(T, 5))).cpu(),
                       torch.zeros(T, D))
    one = torch.tensor([9])
    z = sparse_triton.rows_dot(dev(W), dev(one), dev(y), dev(torch.ones(T, 1, dtype=torch.bool)))
    torch.testing.assert_close(z.cpu(), (y @ W[9])[:, None], atol=1e-5, rtol=0)
    x = torch.tensor([[1.0, 0.0, 2.0, -0.5, 0.0], [0.0, 1.0, 0.0, 0.0, 3.0], [0.5, 0, 0.5, 0, 0]])
    out = sparse_triton.rows_axpy(dev(W), dev(rows), dev(x)).cpu()
    want = torch.stack((2.5 * W[4], W[9] + 3 * W[17], W[4]))  # repeated rows add up
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    z = sparse_triton.rows_dot(dev(W), dev(rows), dev(y), dev(torch.ones(T, 5, dtype=torch.bool)))
    assert torch.equal(z[:, 0], z[:, 2]) and torch.equal(z[:, 0], z[:, 3])


def test_empty_steps(device):
    W = torch.randn(10, 6, device=device)
    rows = torch.tensor([1, 2], device=device)
    y0 = torch.zeros(0, 6, device=device)
    assert sparse_triton.rows_dot(W, rows, y0, torch.zeros(0, 2, dtype=torch.bool,
                                                          device=device)).shape == (0, 2)
    assert sparse_triton.rows_axpy(W, rows[:0], torch.zeros(2, 0, device=device)).eq(0).all()


def test_launchers_check_their_inputs(device):
    W = torch.randn(10, 6, device=device)
    rows = torch.tensor([1, 2], device=device)
    y = torch.randn(3, 6, device=device)
    use = torch.ones(3, 2, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_triton.rows_dot(W.t().contiguous().t(), rows, y, use)
    with pytest.raises(ValueError, match="weight"):
        sparse_triton.rows_axpy(W.double(), rows, torch.ones(3, 2, device=device))
    with pytest.raises(ValueError, match="rows must be int64"):
        sparse_triton.rows_dot(W, rows.int(), y, use)
    with pytest.raises(ValueError, match=r"y must be \[T, 6\]"):
        sparse_triton.rows_dot(W, rows, y[:, :5], use)
    with pytest.raises(ValueError, match="use must be bool"):
        sparse_triton.rows_dot(W, rows, y, use.float())
    with pytest.raises(ValueError, match=r"weights must be \[T, 2\]"):
        sparse_triton.rows_axpy(W, rows, torch.ones(3, 3, device=device))
    if device.type == "cuda":
        with pytest.raises(ValueError, match="rows is on cpu"):
            sparse_triton.rows_dot(W, rows.cpu(), y, use)
