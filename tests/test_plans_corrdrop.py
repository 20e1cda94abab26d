"""CorrDrop's plan kernel against the reference plan, with explicit noise: S and the scale
bit for bit.

The contract is ``layers.corrdrop``'s torch code on the same F (``layers.corrdrop.reference``
on the Triton backend: Triton's F, the torch arithmetic after it); where Triton's F equals
the reference backend's to the bit, the plan is also ``layers.corrdrop(guidedrop.reference)``'s.
The noise puts some u0 exactly on kappa and some u1 exactly on 1 - p_hat (the thresholds
the plan compares with, in float32).
"""

from __future__ import annotations

import math

import naive
import pytest
import torch
from test_backends import triton_common
from testing import assert_same_plan, load_backend, make_x

from guidedrop import layers as L
from guidedrop import reference as R


def _thresholds(f, u, p, block_size, h, w):
    """kappa and 1 - p_hat of the torch code for F (N, N') and u0, in float32 (1 - p_hat
    from float64, rounded once)."""
    fmin, fmax = f.amin(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)
    rng = fmax - fmin
    kappa = torch.where(rng > 0, (f - fmin) / torch.where(rng > 0, rng, 1), 0)
    z = (~(u[0].flatten(1) < kappa)).sum(dim=1, keepdim=True)
    p_hat = (torch.ones_like(f[:, :1], dtype=torch.float64) * (p * ((h * w) / (block_size**2)))
             / z.clamp_min(1))
    return kappa, (1 - p_hat.clamp(max=1)).float()


def _noise(B, x, p, block_size, seed, dtype=torch.float32):
    """Uniforms (2, N, H', W'), every third u0 set to its kappa and every third u1 to
    1 - p_hat (both exactly representable in float32, so in dtype float32 / float64)."""
    n, _, h, w = x.shape
    k = R.one_window(block_size, h, w)
    hp, wp = -(-h // k), -(-w // k)
    u = torch.rand((2, n, hp, wp), generator=torch.Generator().manual_seed(seed))
    f = B.pooled_correlation(x, k).flatten(1)
    kappa, _ = _thresholds(f, u, p, block_size, h, w)
    u[0].view(n, -1)[:, ::3] = kappa[:, ::3]
    _, q = _thresholds(f, u, p, block_size, h, w)
    u[1].view(n, -1)[:, 1::3] = q.expand(n, hp * wp)[:, 1::3]
    return u.to(dtype)


def check(B, x, p, block_size, normalize, u):
    """The plan against the torch code on B's F, and against the reference's plan where the
    two Fs are the same bits (then the whole layer agrees)."""
    kw = dict(normalize=normalize, noise=u)
    got = L.corrdrop(B, x, p, block_size, **kw)
    assert_same_plan(got, L.corrdrop.reference(B, x, p, block_size, **kw))
    k = R.one_window(block_size, *x.shape[2:])
    if torch.equal(B.pooled_correlation(x, k).cpu(), R.pooled_correlation(x.cpu(), k)):
        assert_same_plan(got, L.corrdrop(R, x.cpu(), p, block_size, normalize=normalize,
                                         noise=u.cpu()))
    return got


@pytest.mark.parametrize("shape,block_size,dtype,layout,normalize", [
    ((1, 1, 1, 1), 3, torch.float32, "contiguous", "batch"),
    ((2, 5, 7, 9), 3, torch.float32, "channels_last", "batch"),
    ((2, 5, 7, 9), 3, torch.float32, "contiguous", "sample"),
    ((3, 4, 6, 5), 2, torch.bfloat16, "sliced", "sample"),
    ((2, 3, 5, 5), 2, torch.float16, "contiguous", "none"),
    ((3, 2, 5, 1), 2, torch.float32, "sliced", "batch"),  # W' = 1
    ((1, 3, 1, 6), 4, torch.float32, "contiguous", "sample"),  # H' = 1, N = 1, border block
    ((2, 3, 4, 6), 9, torch.float32, "channels_last", "batch"),  # block beyond the map
])
def test_plan_matches_reference(shape, block_size, dtype, layout, normalize):
    B = load_backend("triton")
    torch.manual_seed(sum(shape))
    x = make_x(shape, dtype, "cpu", layout)
    check(B, x, 0.3, block_size, normalize, _noise(B, x, 0.3, block_size, sum(shape)))


@pytest.mark.parametrize("p", [1e-3, 0.3, 0.9])
def test_plan_rates_noise_dtypes_and_thresholds(p):
    """p_hat below and at its clamp to 1; noise in float64/float16/bfloat16 (rounded to
    float32); u exactly on kappa and on 1 - p_hat; a non-contiguous noise view."""
    B = load_backend("triton")
    x = torch.randn(2, 3, 8, 7)
    u = _noise(B, x, p, 2, 5, torch.float64)
    check(B, x, p, 2, "batch", u)
    check(B, x, p, 2, "sample", u.to(torch.float16 if p < 0.5 else torch.bfloat16))
    check(B, x, p, 2, "sample", u.float().transpose(2, 3).contiguous().transpose(2, 3))
    # u0 = 0, u1 = 1: only M keeps (kappa > 0: all but each sample's min F)
    plan = check(B, x, p, 2, "batch", torch.stack([torch.zeros_like(u[0]), torch.ones_like(u[1])]))
    assert 0 < plan.state[0].sum() < plan.state[0].numel()
    if p == 1e-3:  # p_hat < 1: u1 = 0 keeps every block, scale 1
        plan = check(B, x, p, 2, "batch", torch.zeros_like(u))
        assert plan.state[0].all() and torch.equal(plan.state[1], torch.ones(2))


# (p, H, W, k): where float32 steps (p * HW / k², / z, 1 - p_hat) moved q an ulp off SPEC's
# (the first four: 0.67000002 against 0.66999996); where float64 in another order than
# SPEC's, p * (HW / k²), did (1 - p̂ = 3.3e-16, not 2.2e-16: a fresh helper); and others
Q_CASES = [(0.33, 7, 7, 7), (0.33, 56, 56, 7), (0.33, 13, 11, 4), (0.7, 9, 9, 2),
           (1 - 2**-52, 7, 7, 7), (0.1, 56, 56, 7), (0.3, 8, 7, 2), (1e-3, 5, 6, 3)]


def check_q_rounded_once(B, device="cpu"):
    """SPEC §1 and §2 step 4: B_i = u1 < q with q = 1 - p̂ rounded to float32 once, p̂ in
    python floats as SPEC writes it (the naive oracle's q). x constant, so kappa = 0, M
    keeps nothing and z = N'; u1 is q at even blocks (dropped) and the float below it at
    odd ones (kept). float32 steps gave the q an ulp below for the first cases, so every
    block was dropped (an attacking helper: CorrDrop(p=0.33, block_size=7) on a 7 x 7
    map)."""
    for p, h, w, k in Q_CASES:
        hp, wp = -(-h // k), -(-w // k)
        q = torch.tensor(naive.f32(1.0 - naive.corrdrop_phat(p, k, h, w, hp * wp)))
        below = torch.nextafter(q, torch.tensor(0.0))
        odd = (torch.arange(hp * wp) % 2 == 1).view(1, hp, wp)
        u = torch.stack([torch.zeros(1, hp, wp), torch.where(odd, below, q)]).to(device)
        x = torch.ones(1, 2, h, w, device=device)
        keep, _ = L.corrdrop(B, x, p, k, normalize="none", noise=u).state
        assert torch.equal(keep.cpu().bool(), odd), (p, h, w, k)


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_plan_q_rounded_once(name):
    check_q_rounded_once(load_backend(name))


def test_plan_constant_and_nonfinite_maps():
    """F constant (range 0: kappa = 0), F NaN (a NaN or Inf in x: kappa = 0), and nothing
    kept in one sample (scale 0 for "sample")."""
    B = load_backend("triton")
    x = torch.randn(3, 2, 6, 6)
    x[0] = 1.0  # constant: every pooled row equal
    x[1, 0, 2, 3] = math.nan
    x[2, 1, 5, 5] = -math.inf
    u = _noise(B, x, 0.4, 3, 2)
    assert B.pooled_correlation(x, 3)[1:].isnan().all()
    check(B, x, 0.4, 3, "batch", u)
    u[1, 0] = 1.0  # sample 0: nothing kept by the draw, and kappa = 0 keeps nothing
    u[0, 0] = 0.5
    plan = check(B, x, 0.4, 3, "sample", u)
    assert not plan.state[0][0].any() and plan.state[1][0] == 0
    zeros = torch.zeros(2, 3, 4, 4)
    check(B, zeros, 0.4, 2, "batch", _noise(B, zeros, 0.4, 2, 3))


def test_noise_none_draws_like_the_reference():
    """Without noise the plan draws its uniforms as the torch code does: same generator
    state, same plan."""
    B = load_backend("triton")
    x = torch.randn(2, 4, 7, 6)
    want = L.corrdrop.reference(B, x, 0.3, 3, normalize="batch",
                                generator=torch.Generator().manual_seed(3))
    got = L.corrdrop(B, x, 0.3, 3, normalize="batch",
                     generator=torch.Generator().manual_seed(3))
    assert_same_plan(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["batch", "sample"])
def test_plan_matches_reference_large(normalize):
    """Several chunks of pooled positions per sample (N' = 1225 > 1024) and of samples."""
    B = load_backend("triton")
    x = torch.randn(5, 2, 70, 70)
    check(B, x, 0.2, 2, normalize, _noise(B, x, 0.2, 2, 11))


def test_plan_mask_has_slack_for_the_flat_apply():
    """The Triton plan's S is a view with MASK_SLACK readable bytes after it (the flat
    apply_block reads a group's mask columns past a row's end unmasked there, issue 13);
    the apply of the layer then equals the reference's."""
    B = load_backend("triton")
    common = triton_common()
    x = make_x((2, 3, 14, 14), torch.bfloat16, "cpu", "contiguous")
    u = _noise(B, x, 0.3, 3, 7)
    kind, meta, (mask, scale) = B.plan_corrdrop(x, 0.3, 3, normalize="batch", noise=u)
    assert mask.is_contiguous() and mask.shape == (2, 5, 5)
    assert common.slack_after(mask) == common.MASK_SLACK
    assert common.slack_after(mask.contiguous().clone()) == 0
    for t in (x, torch.randn_like(x)):
        assert torch.equal(B.apply_block(t, mask, 3, scale), R.apply_block(t, mask, 3, scale))
