"""CorrDrop's CUDA plan (csrc/cuda/plans/corrdrop.cu after the one-launch statistics of
csrc/cuda/pooled_correlation.cu, issue 12), run on the CPU SIMT emulator, against the
reference plan with explicit noise: S and the scale bit for bit.

The contract is ``layers.corrdrop``'s torch code on the same F (``layers.corrdrop.reference``
on the emulated CUDA backend); where the CUDA F equals the reference backend's to the bit,
the plan is also ``layers.corrdrop(guidedrop.reference)``'s. The noise puts some u0 exactly
on kappa and some u1 exactly on 1 - p_hat (the thresholds the plan compares with, float32).
"""

from __future__ import annotations

import math

import pytest
import test_cuda_emulated as CE
import torch
from test_plans_corrdrop import _noise, check, check_q_rounded_once
from testing import assert_same, assert_same_plan, emulated, make_x

from guidedrop import layers as L

pytestmark = [emulated, pytest.mark.skipif(bool(CE.emu.unavailable()),
                                           reason=f"CUDA emulator: {CE.emu.unavailable()}")]

NORMALIZE = ["batch", "sample", "none"]


@pytest.fixture(scope="module")
def B():
    """python/guidedrop/cuda_backend.py on the emulated ops (plan_corrdrop included)."""
    return CE.emu.backend()


@pytest.mark.parametrize("shape,block_size,dtype,layout,normalize", [
    ((1, 1, 1, 1), 3, torch.float32, "contiguous", "batch"),  # 1x1 map, N = 1, k > map
    ((2, 5, 7, 9), 3, torch.float32, "channels_last", "batch"),
    ((2, 5, 7, 9), 3, torch.float32, "contiguous", "sample"),
    ((3, 4, 6, 5), 2, torch.bfloat16, "sliced", "sample"),
    ((2, 3, 5, 5), 2, torch.float16, "contiguous", "none"),
    ((3, 2, 5, 1), 2, torch.float32, "sliced", "batch"),  # W' = 1
    ((1, 3, 1, 6), 4, torch.float32, "contiguous", "sample"),  # H' = 1, N = 1, border block
    ((2, 3, 4, 6), 9, torch.float32, "channels_last", "batch"),  # block beyond the map
    ((1, 33, 6, 7), 1, torch.float16, "channels_last", "none"),  # N' = 42 > 32, C = 33 > 32
])
def test_plan_matches_reference(B, shape, block_size, dtype, layout, normalize):
    torch.manual_seed(sum(shape))
    x = make_x(shape, dtype, "cpu", layout)
    check(B, x, 0.3, block_size, normalize, _noise(B, x, 0.3, block_size, sum(shape)))


@pytest.mark.parametrize("p", [1e-3, pytest.param(0.3, marks=pytest.mark.slow),
                               pytest.param(0.9, marks=pytest.mark.slow)])
def test_plan_rates_noise_dtypes_and_thresholds(B, p):
    """p_hat below and at its clamp to 1; noise in float64/float16/bfloat16 (rounded to
    float32); u exactly on kappa and on 1 - p_hat; a non-contiguous noise view."""
    x = torch.randn(2, 3, 8, 7)
    u = _noise(B, x, p, 2, 5, torch.float64)
    check(B, x, p, 2, "batch", u)
    check(B, x, p, 2, "sample", u.to(torch.float16 if p < 0.5 else torch.bfloat16))
    check(B, x, p, 2, "none", u.float().transpose(2, 3).contiguous().transpose(2, 3))
    # u0 = 0, u1 = 1: only M keeps (kappa > 0: all but each sample's min F)
    plan = check(B, x, p, 2, "batch", torch.stack([torch.zeros_like(u[0]), torch.ones_like(u[1])]))
    assert 0 < plan.state[0].sum() < plan.state[0].numel()
    if p == 1e-3:  # p_hat < 1: u1 = 0 keeps every block, scale 1
        plan = check(B, x, p, 2, "sample", torch.zeros_like(u))
        assert plan.state[0].all() and torch.equal(plan.state[1], torch.ones(2))


@pytest.mark.parametrize("normalize", [
    "sample", pytest.param("batch", marks=pytest.mark.slow),
    pytest.param("none", marks=pytest.mark.slow)])
def test_plan_constant_nonfinite_and_nan_noise(B, normalize):
    """F constant (range 0: kappa = 0), F NaN (a NaN or Inf in x: kappa = 0), all-zero
    maps, NaN and negative noise, and nothing kept in one sample (its "sample" scale 0)."""
    x = torch.randn(3, 2, 6, 6)
    x[0] = 1.0  # constant: every pooled row equal
    x[1, 0, 2, 3] = math.nan
    x[2, 1, 5, 5] = -math.inf
    u = _noise(B, x, 0.4, 3, 2)
    assert B.pooled_correlation(x, 3)[1:].isnan().all()
    check(B, x, 0.4, 3, normalize, u)
    u[1, 0] = 1.0  # sample 0: nothing kept by the draw, and kappa = 0 keeps nothing
    u[0, 0] = 0.5
    u[0, 1, 0, 0], u[1, 1, 0, 1], u[0, 2, 1, 1] = math.nan, math.nan, -0.25  # u0 < kappa = 0
    plan = check(B, x, 0.4, 3, normalize, u)
    assert not plan.state[0][0].any()
    if normalize != "batch":
        assert plan.state[1][0] == (normalize == "none")
    assert plan.state[0][2, 1, 1]
    zeros = torch.zeros(2, 3, 4, 4)
    check(B, zeros, 0.4, 2, normalize, _noise(B, zeros, 0.4, 2, 3))


def test_noise_none_draws_like_the_reference(B):
    """Without noise the plan draws its uniforms as the torch code does: same generator
    state, same plan."""
    x = torch.randn(2, 4, 7, 6)
    kw = dict(normalize="batch")
    want = L.corrdrop.reference(B, x, 0.3, 3, **kw, generator=torch.Generator().manual_seed(3))
    got = L.corrdrop(B, x, 0.3, 3, **kw, generator=torch.Generator().manual_seed(3))
    assert_same_plan(got, want)


def test_rate_tensor_equals_rate_float():
    """The traced form (p_blocks a 0-dim float64 tensor read in the kernel) gives the eager
    form's plan (p_blocks a float argument, a double)."""
    E = CE.emu.ops()
    x = torch.randn(3, 5, 8, 6)
    u = torch.rand(2, 3, 3, 2)
    p_blocks = 0.3 * 48 / 9
    eager = E.corrdrop_plan(x, u, None, p_blocks, 3, "sample")
    traced = E.corrdrop_plan(x, u, torch.tensor(p_blocks, dtype=torch.float64), 0.0, 3, "sample")
    for a, b in zip(eager, traced, strict=True):
        assert_same(a, b)


def test_plan_op_opcheck(B):
    """Schema (functional) and fake kernel of the plan op; its argument checks."""
    assert callable(B.plan_corrdrop)  # what layers.corrdrop calls
    E = CE.emu.ops()
    x = make_x((2, 3, 5, 6), torch.float16, "cpu", "channels_last")
    u = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    torch.library.opcheck(E.corrdrop_plan, (x, u, None, 0.5, 2, "batch"),
                          test_utils=("test_schema", "test_faketensor"))
    p_t = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(E.corrdrop_plan, (x, u[:, :, :1, :1], p_t, 0.0, 99, "none"),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="noise must have shape"):
        E.corrdrop_plan(x, u[:, :, :2], None, 0.5, 2, "batch")
    with pytest.raises(RuntimeError, match="normalize must be one of"):
        E.corrdrop_plan(x, u, None, 0.5, 2, "mean")


def test_plan_q_rounded_once(B):
    check_q_rounded_once(B)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["batch", "sample"])  # "none": their mask, scale 1
def test_plan_matches_reference_large(B, normalize):
    """More samples than the plan block's 32 warps (more pooled positions than lanes:
    test_plan_matches_reference's N' = 42; small maps here keep the emulator quick)."""
    x = make_x((34, 2, 4, 5), torch.bfloat16, "cpu", "sliced")
    check(B, x, 0.2, 2, normalize, _noise(B, x, 0.2, 2, 11))
