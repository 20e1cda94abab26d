"""AttentionDrop's plan kernels against the reference plan (``layers.attentiondrop`` torch
code on ``guidedrop.reference``), with explicit noise: gamma, the per-map threshold, min,
max and the scale bit for bit (the soft mask's per-map sums are exact float64 sums:
backend_contract.md)."""

from __future__ import annotations

import math

import pytest
import torch
from test_backends import load_backend
from testing import assert_same, assert_same_plan, make_x

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
