"""AttentionDrop's plan kernels against the reference plan (``layers.attentiondrop`` torch
code on ``guidedrop.reference``), with explicit noise: gamma, the per-map threshold, min,
max and the scale bit for bit (the soft mask's per-map sums are exact float64 sums:
backend_contract.md)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from testing import assert_same, assert_same_plan, load_backend, make_x

from guidedrop import layers as L
from guidedrop import reference as R


def _noise(n, c, alpha, seed):
    """Uniforms with some exactly at alpha (rounded to float32): those maps stay inactive."""
    u = torch.rand((n, c), generator=torch.Generator().manual_seed(seed))
    u.view(-1)[::3] = torch.tensor(alpha, dtype=torch.float32)
    return u


def check(B, x, alpha, beta, mode, normalize, u):
    want = L.attentiondrop(R, x, alpha, beta, mode=mode, normalize=normalize, noise=u)
    got = L.attentiondrop(B, x, alpha, beta, mode=mode, normalize=normalize, noise=u)
    assert_same_plan(got, want)


@pytest.mark.parametrize("normalize", ["batch", "sample", "none"])
@pytest.mark.parametrize("mode", ["ad", "sm", "am"])
@pytest.mark.parametrize("shape,dtype,layout", [
    ((1, 1, 1, 1), torch.float32, "contiguous"),
    ((2, 5, 7, 9), torch.float32, "channels_last"),
    ((3, 4, 6, 5), torch.bfloat16, "sliced"),
    ((2, 3, 5, 5), torch.float16, "contiguous"),
])
def test_plan_matches_reference(shape, dtype, layout, mode, normalize):
    B = load_backend("triton")
    torch.manual_seed(sum(shape))
    x = make_x(shape, dtype, "cpu", layout)
    check(B, x, 0.5, 20.0, mode, normalize, _noise(*shape[:2], 0.5, sum(shape)))


@pytest.mark.parametrize("alpha", [0.1, 1 / 3, 1.0])
def test_plan_ties_nonfinite_and_noise_dtypes(alpha):
    B = load_backend("triton")
    x = (torch.randn(2, 6, 5, 7) * 2).round() / 2  # many ties
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[1, 3, 4, 6] = math.inf, -math.inf, math.nan
    for dt in (torch.float64, torch.float16, torch.float32):
        u = _noise(2, 6, alpha, 7).to(dt)
        for mode in ("ad", "sm"):
            check(B, x, alpha, 35.0, mode, "batch", u)


def test_noise_none_draws_like_the_reference():
    """Without noise the plan draws its uniforms as the reference does: same generator
    state, same plan."""
    B = load_backend("triton")
    x = torch.randn(2, 4, 6, 6)
    want = L.attentiondrop(R, x, 0.5, 20.0, mode="ad", normalize="batch",
                           generator=torch.Generator().manual_seed(3))
    got = L.attentiondrop(B, x, 0.5, 20.0, mode="ad", normalize="batch",
                          generator=torch.Generator().manual_seed(3))
    assert_same(got.state[1], want.state[1])  # active


@pytest.mark.parametrize("alpha,u", [(1e-40, 1e-40), (1e-46, 0.0), (1e-50, 0.0)])
def test_plan_rounds_alpha_to_float32(alpha, u):
    """gamma = u < float32(alpha) (SPEC §1), subnormal and underflowing alphas included
    (found by an adversarial pass: the interpreter compared with the unrounded alpha)."""
    B = load_backend("triton")
    check(B, torch.randn(2, 3, 6, 6), alpha, 20.0, "ad", "batch", torch.full((2, 3), u))


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def scale_rounding_case(c=3, hw=(15, 17)):
    """x (1, c, H, W) float32 whose "sm" plan's kept weight K (a multiple of 2^-24, every
    map active under zero noise) has float32(units / K) != float32((1 / K) * units) in
    float64: the reference's scale is torch's int / tensor, reciprocal(K) * units, and a
    backend that divides once differs from it in the last bit (found by an adversarial
    pass on Triton). Each map has min 0 and max 1, so f̂ = x and S = 1 - x exactly; units
    is not a power of 2 (then both are exact)."""
    units = c * hw[0] * hw[1]
    ones = 2**24  # S = 1 in units of 2^-24
    for j in range(1 << 22):  # float32 midpoints q = (2j + 1) 2^-24 from 1.25 up
        q = 1.25 + (2 * j + 1) * 2.0**-24
        k_int = round(units * ones / q)
        k = k_int / ones
        if _f32(units / k) != _f32((1.0 / k) * units):
            break
    else:
        raise AssertionError("no case found")
    s = torch.zeros(c, hw[0] * hw[1], dtype=torch.int64)
    s[:, 0] = ones  # x = 0, the min (S = 1); s[:, 1] = 0: x = 1, the max (S = 0)
    rest = k_int - c * ones  # spread over the other units, each S in [0, 1]
    free = s[:, 2:].reshape(-1)
    full, part = divmod(rest, ones)
    free[:full] = ones
    free[full] = part
    s[:, 2:] = free.view(c, -1)
    assert int(s.sum()) == k_int
    x = (1 - s.double() / ones).float().view(1, c, *hw)
    return x


@pytest.mark.parametrize("normalize", ["sample", "batch"])
def test_plan_scale_rounds_as_the_reference(normalize):
    B = load_backend("triton")
    x = scale_rounding_case()
    check(B, x, 0.5, 20.0, "sm", normalize, torch.zeros(1, x.shape[1]))
