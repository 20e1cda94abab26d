"""FocusedDropout's plan kernel against the reference plan (``layers.focused_dropout``'s torch
code on ``guidedrop.reference``), with explicit noise: the mask (N, H, W) uint8 and the
scale (N,) bit for bit, per sample and per position.

Covers odd shapes, every dtype and layout, tied channel means (first index), a NaN mean
(the first NaN, as torch.argmax), NaN / Inf in the reference map, v <= 0 (all kept),
x exactly at gamma * v (strict >), noise of other float dtypes, maps longer than one chunk
and the rate arguments as 0-dim tensors (the path torch.compile traces).
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from test_plans_dropblock import KERNEL_BACKENDS
from test_plans_selectscale import _cases
from testing import DEV, DTYPES, LAYOUTS, ODD_SHAPES, assert_same_plan, load_backend, make_x

from guidedrop import layers as L
from guidedrop import reference as R


@pytest.fixture(params=KERNEL_BACKENDS)
def B(request):
    """Every kernel backend: Triton, and CUDA (on the SIMT emulator without a GPU)."""
    return load_backend(request.param)


def check(B, x, low, high, per_position, u):
    got = L.focused_dropout(B, x, low, high, per_position=per_position, noise=u)
    want = L.focused_dropout.reference(R, x, low, high, per_position=per_position, noise=u)
    assert_same_plan(got, want)
    return want.state[0]


def _noise(x, per_position, dtype=torch.float32):
    n, _, h, w = x.shape
    return torch.rand((n, h, w) if per_position else (n,), dtype=dtype, device=x.device)


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("shape,dtype,layout", _cases())
def test_plan_matches_reference(B, shape, dtype, layout, per_position):
    torch.manual_seed(sum(shape))
    x = make_x(shape, dtype, "cpu", layout).to(DEV)
    check(B, x, 0.3, 0.6, per_position, _noise(x, per_position))


@pytest.mark.parametrize("per_position", [False, True])
def test_ties_nonfinite_thresholds(B, per_position):
    torch.manual_seed(1)
    x = torch.randn(5, 4, 3, 5)
    x[0, 2] = x[0, 1] = x[0].mean(dim=0).abs() + 1  # tied top means: the first, channel 1
    x[1, 1, 0, 0] = math.nan  # a NaN mean: the first NaN channel, v NaN, nothing kept
    x[1, 3, 2, 2] = math.nan
    x[2] = -x[2].abs()  # v <= 0: everything kept
    x[3, 0] += 10
    x[3, 0, 1, 1] = math.inf  # v = Inf
    # sample 4: v = 1 and x on gamma = low + (high - low) u exactly (low 0, high 1: gamma = u)
    x[4] = 0.0
    x[4, 2] = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).repeat(3, 1)
    x = x.to(DEV)
    u = _noise(x, per_position)
    if per_position:
        u[4] = x[4, 2]
    else:
        u[4] = 0.5
    for dt in (torch.float64, torch.float16):
        mask = check(B, x, 0.0, 1.0, per_position, u.to(dt))
        assert mask[2].all() and not mask[1].any()
    mask = check(B, x, 0.3, 0.6, per_position, u)
    assert 0 < mask.sum() < mask.numel()


@pytest.mark.parametrize("per_position", [False, True])
def test_v_zero_keeps_everything(B, per_position):
    """v = 0 exactly (the reference channel's maximum is +0.0 in sample 0, -0.0 in sample 1:
    x_r > γ·0 holds nowhere) keeps the whole sample (SPEC §5 step 4: v <= 0), as v < 0
    does; a sample with v > 0 beside them."""
    torch.manual_seed(4)
    x = torch.randn(3, 4, 5, 6)
    x[0, 0] = 0.0  # r = 0 (mean 0, the others below), v = +0.0
    x[0, 1:] = -x[0, 1:].abs() - 0.5
    x[1, 2] = -x[1, 2].abs() - 0.5  # r = 2 (mean above the others'), its maximum -0.0
    x[1, 2, 1, 3] = -0.0
    x[1, [0, 1, 3]] = x[1, 2] - 1
    x = x.to(DEV)
    mask = check(B, x, 0.3, 0.6, per_position, _noise(x, per_position))
    assert mask[0].all() and mask[1].all() and not mask[2].all()


@pytest.mark.parametrize("per_position", [False, True])
def test_strided_noise(B, per_position):
    """noise a view with strides of its own (a slice of a wider tensor; transposed maps
    with per_position): read at its strides."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 5, 6).to(DEV)
    if per_position:
        us = [torch.rand(2, 6, 8, device=DEV)[:, 1:, 1:7],
              torch.rand(2, 6, 5, device=DEV).transpose(1, 2)]
    else:
        us = [torch.rand(2, 3, device=DEV)[:, 1]]
    for u in us:
        check(B, x, 0.3, 0.6, per_position, u)


def test_long_maps(B):
    """H * W longer than one chunk of the plan kernel (4096 positions), many channels."""
    torch.manual_seed(2)
    x = torch.randn(2, 5, 67, 63).to(DEV).contiguous(memory_format=torch.channels_last)
    for per_position in (False, True):
        check(B, x, 0.2, 0.7, per_position, _noise(x, per_position))


def test_rate_tensors():
    """Triton's traced path (rates as 0-dim tensors) gives the eager plan."""
    B = load_backend("triton")
    from guidedrop.triton_kernels.plans import focused_dropout as P
    torch.manual_seed(3)
    x = torch.randn(3, 4, 5, 6, device=DEV)
    _, mean = B.channel_stats(x)
    for per_position, (low, high) in product((False, True), ((0.3, 0.6), (0.1, 1 / 3))):
        u = _noise(x, per_position)
        want = P._focused_plan(x, mean, u, low, high - low, per_position)
        got = P._focused_plan(x, mean, u, torch.tensor(low), torch.tensor(high - low),
                              per_position)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("shape,dtype,layout", list(product(ODD_SHAPES, DTYPES, LAYOUTS)))
def test_plan_matches_reference_all(B, shape, dtype, layout, per_position):
    torch.manual_seed(sum(shape))
    x = make_x(shape, dtype, "cpu", layout).to(DEV)
    for low, high in ((0.3, 0.6), (0.0, 1.0), (0.5, 0.5)):
        check(B, x, low, high, per_position, _noise(x, per_position))
