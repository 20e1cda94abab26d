"""guidedrop.primitives (the hot paths the kernels fuse) against the naive loops."""

from __future__ import annotations

import math

import naive
import pytest
import torch
from testing import ODD_SHAPES, REF_DTYPES, AutocastSpy, load_backend, make_x

from guidedrop import primitives as P

LAYOUTS = ["contiguous", "channels_last", "sliced"]
SHAPES = ODD_SHAPES + [(2, 3, 7, 4), (1, 2, 1, 9), (3, 5, 8, 1)]


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests pin the reference path (issue 2); kernel backends have their own tests."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")


def _x(shape, dtype, layout="contiguous", seed=0):
    torch.manual_seed(seed)
    return make_x(shape, dtype, "cpu", layout)


def _check_stats_tensor(t, shape, x):
    assert tuple(t.shape) == tuple(shape)
    # as the primitives' docstrings say: float64 for float64 x, else float32
    assert t.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", REF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_channel_max_mean(shape, dtype, layout):
    x = _x(shape, dtype, layout)
    amax, mean = P.channel_max(x), P.channel_mean(x)
    _check_stats_tensor(amax, shape[:2], x)
    _check_stats_tensor(mean, shape[:2], x)
    # max |x| is exact: it is one of the (float32-cast) values
    expect_max = torch.tensor(naive.channel_scores(x), dtype=torch.float64)
    assert torch.equal(amax.double(), expect_max)
    xs = naive.stat_values(x)
    h, w = shape[2:]
    expect_mean = torch.tensor([[sum(v for row in ch for v in row) / (h * w) for ch in smp]
                                for smp in xs], dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), expect_mean, atol=tol, rtol=tol)


def test_channel_max_is_of_abs():
    x = torch.tensor([[[[1.0, -7.0]], [[0.5, 0.25]]]])
    assert P.channel_max(x).tolist() == [[7.0, 0.5]]
    assert P.channel_mean(x).tolist() == [[-3.0, 0.375]]


@pytest.mark.parametrize("beta", [0.5, 20.0, 33.3, 50.0, 100.0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", REF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
def test_top_percentile_threshold(shape, dtype, layout, beta):
    x = _x(shape, dtype, layout, seed=1)
    t = P.top_percentile_threshold(x, beta)
    _check_stats_tensor(t, shape[:2], x)
    assert torch.equal(t.double(), torch.tensor(naive.map_threshold(x, beta), dtype=torch.float64))


def test_top_percentile_threshold_ties_and_counts():
    # 10 units: beta 25 -> n_beta = ceil(2.5) = 3; values 5, 5, 5, ... -> third largest 5.
    x = torch.tensor([5.0, 1.0, 5.0, 2.0, 5.0, 0.0, 3.0, 4.0, -1.0, 0.5]).view(1, 1, 2, 5)
    assert P.top_percentile_threshold(x, 25.0).item() == 5.0
    # beta 40 -> n_beta = 4: 5, 5, 5, 4
    assert P.top_percentile_threshold(x, 40.0).item() == 4.0
    # tiny beta -> n_beta = max(1, ceil(...)) = 1: the max; beta 100 -> the min
    assert P.top_percentile_threshold(x, 1e-6).item() == 5.0
    assert P.top_percentile_threshold(x, 100.0).item() == -1.0
    # 1 x 1 map
    assert P.top_percentile_threshold(torch.full((2, 3, 1, 1), 7.0), 20.0).eq(7).all()


def test_top_percentile_threshold_count_in_h_then_w_order():
    """SPEC §1, §4: n_β = max(1, ceil(beta * H * W / 100)) in Python floats left to right,
    H before W. With beta = 16.1: ((16.1 * 100) * 10) / 100 rounds up to 162 on a 100 x 10
    map, ((16.1 * 10) * 100) / 100 to 161 on a 10 x 100 one; distinct values 1..1000, so
    the n_β-th largest is 1001 - n_β (839 and 840)."""
    assert math.ceil(16.1 * 100 * 10 / 100) == 162 and math.ceil(16.1 * 10 * 100 / 100) == 161
    x = torch.arange(1.0, 1001.0)
    assert P.top_percentile_threshold(x.view(1, 1, 100, 10), 16.1).item() == 839.0
    assert P.top_percentile_threshold(x.view(1, 1, 10, 100), 16.1).item() == 840.0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", REF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 1, 1, 1), (1, 4, 9, 11), (2, 6, 10, 10),
                                   (3, 2, 13, 6)], ids=str)
def test_pooled_correlation(shape, dtype, layout, k):
    x = _x(shape, dtype, layout, seed=2)
    f = P.pooled_correlation(x, k)
    hp, wp = math.ceil(shape[2] / k), math.ceil(shape[3] / k)
    _check_stats_tensor(f, (shape[0], hp, wp), x)
    fn, _, _, _ = naive.corrdrop_stats(x, k)
    expect = torch.tensor(fn, dtype=torch.float64).view(shape[0], hp, wp)
    tol = 1e-10 if f.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(f.double(), expect, atol=tol, rtol=tol)


def test_statistics_float32_under_autocast(monkeypatch):
    """SPEC §1: statistics in float32, also inside torch.autocast, which would otherwise run
    the Gram matrix of pooled_correlation in bfloat16: the backend's call runs with
    autocast off. The other statistics have no op that autocast lowers."""
    x = _x((2, 64, 9, 7), torch.float32, seed=3)
    spy = AutocastSpy.install(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = P.pooled_correlation(x, 3)
        t = P.top_percentile_threshold(x, 20.0)
        m = P.channel_mean(x)
    assert [on for name, on in spy.calls if name == "pooled_correlation"] == [False]
    assert f.dtype == t.dtype == m.dtype == torch.float32


def test_pooled_correlation_hand():
    # 1 x 2 x 2 x 4, k = 2: two pooled positions with rows (1, 1) and (2, -2) (orthogonal)
    # -> P = [[0, 0], [0, 0]], F = 0, 0. With rows (1, 0), (1, 0): P_01 = 1, F = 1/2, 1/2.
    x = torch.tensor([[[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]],
                       [[1.5, 0.5, -2.0, -2.0], [1.0, 1.0, -2.0, -2.0]]]])
    torch.testing.assert_close(P.pooled_correlation(x, 2), torch.zeros(1, 1, 2), atol=1e-6, rtol=0)
    x = torch.tensor([[[[3.0, 3.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    torch.testing.assert_close(P.pooled_correlation(x, 2), torch.full((1, 1, 2), 0.5))
    # a zero row has P_ii = 1 and P_ij = 0: F = [1/3 (the zero row), ...]
    x = torch.zeros(1, 2, 1, 3)
    x[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    x[0, :, 0, 2] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(P.pooled_correlation(x, 1), torch.tensor([[[1 / 3, 0.0, 0.0]]]))
    # k larger than the map: one pooled position per sample, F = 0 (|1 - 1|)
    f = P.pooled_correlation(torch.randn(3, 4, 5, 6), 9)
    assert f.shape == (3, 1, 1)
    torch.testing.assert_close(f, torch.zeros(3, 1, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("k,h,w", [(1, 3, 4), (2, 5, 7), (3, 9, 9), (4, 1, 8), (7, 10, 3)])
def test_block_upsample(k, h, w, mask_dtype):
    hp, wp = math.ceil(h / k), math.ceil(w / k)
    mask = (torch.rand(2, hp, wp, generator=torch.Generator().manual_seed(k)) < 0.5)
    mask = mask.to(mask_dtype)
    out = P.block_upsample(mask, k, h, w)
    assert out.shape == (2, h, w) and out.dtype == mask.dtype
    expect = [[[mask[b, i // k, j // k].item() for j in range(w)] for i in range(h)]
              for b in range(2)]
    assert out.tolist() == expect


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_primitives_not_differentiable(backend, compiled, monkeypatch):
    """The module docstring: no primitive's output carries a gradient on any backend, eager
    or compiled (the reference's amax and sum and block_upsample's indexing, on every
    backend, carried one; compiled with x requiring grad, the Triton ops, which have no
    autograd formula, failed: "Trying to backward through guidedrop_triton...")."""
    load_backend(backend, emulate=False)
    monkeypatch.setenv("GUIDEDROP_BACKEND", backend)
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    mask = torch.rand(2, 2, 2, requires_grad=True)

    def stats(x, mask):
        return (P.channel_max(x), P.channel_mean(x), P.top_percentile_threshold(x, 20.0),
                P.pooled_correlation(x, 2), P.block_upsample(mask, 3, 5, 4))

    if compiled:
        torch._dynamo.reset()
        stats = torch.compile(stats, backend="aot_eager", fullgraph=True)
    for out in stats(x, mask):
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("call,exc,match", [
    (lambda: P.pooled_correlation(torch.randn(1, 2, 3, 3), 0), ValueError, "^k must"),
    (lambda: P.pooled_correlation(torch.randn(1, 2, 3, 3), 2.5), TypeError, "^k must"),
    (lambda: P.pooled_correlation(torch.randn(2, 3, 3), 2), ValueError, "^x must"),
    (lambda: P.channel_max(torch.ones(1, 2, 3, 3, dtype=torch.int64)), TypeError, "^x must"),
    (lambda: P.channel_mean(torch.randn(2, 3)), ValueError, "^x must"),
    # x is checked before anything reads it (x.device, x.shape: AttributeError before)
    (lambda: P.pooled_correlation([[1.0]], 2), TypeError, "^x must"),
    (lambda: P.top_percentile_threshold(None, 20.0), TypeError, "^x must"),
    (lambda: P.top_percentile_threshold(torch.randn(5), 20.0), ValueError, "^x must"),
    (lambda: P.top_percentile_threshold(torch.randn(1, 2, 3, 3), 0.0), ValueError, "^beta must"),
    (lambda: P.top_percentile_threshold(torch.randn(1, 2, 3, 3), 100.5), ValueError, "^beta must"),
    (lambda: P.block_upsample(torch.ones(1, 2, 2), 0, 3, 3), ValueError, "^k must"),
])
def test_primitive_validation(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
