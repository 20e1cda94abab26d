"""The SelectScale family's plan kernels against the reference plan (``layers.<layer>``'s
torch code on ``guidedrop.reference``), with explicit noise: w (N, C) bit for bit.

Covers odd shapes, every dtype and layout, ties in max |x| (more candidates than k), NaN
and ±Inf in x, ties and -0 in u (Selectout's stable order), noise of other float dtypes
(rounded to float32 in the kernel), n_drop = 0, rows longer than one chunk, and the rate
arguments as 0-dim tensors (the path torch.compile traces).
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from test_backends import B  # noqa: F401  (B: fixture, every kernel backend)
from testing import DEV, DTYPES, LAYOUTS, ODD_SHAPES, assert_same_plan, load_backend, make_x

from guidedrop import layers as L
from guidedrop import reference as R


def check(B, layer, x, *args, noise):  # noqa: F811
    got = getattr(L, layer)(B, x, *args, noise=noise)
    want = getattr(L, layer).reference(R, x, *args, noise=noise)
    assert_same_plan(got, want)
    return want.state[0]


def _cases():
    """(shape, dtype, layout): every shape, dtype and layout at least once."""
    combos = list(product(DTYPES, LAYOUTS))
    return [(ODD_SHAPES[i % len(ODD_SHAPES)], *combos[i]) for i in range(len(combos))]


@pytest.mark.parametrize("shape,dtype,layout", _cases())
def test_plans_match_reference(B, shape, dtype, layout):  # noqa: F811
    torch.manual_seed(sum(shape))
    n, c = shape[:2]
    x = make_x(shape, dtype, "cpu", layout).to(DEV)
    u = torch.rand(n, c, device=x.device)
    check(B, "selectscale", x, 0.5, 0.1, noise=u)
    check(B, "selectout", x, 0.5, 1 - 1 / c if c > 1 else 0.75, noise=u)


def _tied_x(n, c, h, w):
    """max |x| with many ties (values on a coarse grid), a NaN, +Inf and -Inf channel."""
    x = (torch.randn(n, c, h, w) * 2).round().clamp(-3, 3) / 2
    x[0, 1, 0, 0] = math.nan
    x[0, 2, 1, 1] = math.inf
    if n > 1:
        x[1, 0, 0, 1] = -math.inf
        x[1, 3] = 0.0  # max |x| = 0
    return x.to(DEV)


@pytest.mark.parametrize("top_rate", [0.25, 1.0])
def test_selectscale_ties_nonfinite_noise_dtypes(B, top_rate):  # noqa: F811
    torch.manual_seed(1)
    x = _tied_x(3, 9, 3, 4)
    for dt, retain in ((torch.float64, 0.1), (torch.float16, 1 / 3)):
        u = torch.rand(3, 9, dtype=torch.float64, device=x.device)
        u[:, ::4] = 0.0
        w = check(B, "selectscale", x, top_rate, retain, noise=u.to(dt))
        if top_rate == 0.25:  # k = 2, ties of max |x| keep more channels: the test can fail
            assert ((w != 1).sum(dim=1) > 2).any(), w


def test_selectscale_rounding_many_u(B):  # noqa: F811
    """retain + 2 (1 - retain) u, rounded as torch rounds it (float32, no fma)."""
    torch.manual_seed(2)
    x = torch.randn(2, 512, 1, 1, device=DEV)
    u = torch.rand(2, 512, dtype=torch.float64, device=x.device)
    for retain in (0.1, 1 / 3, 0.7):
        check(B, "selectscale", x, 1.0, retain, noise=u)


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_selectout_ties_nonfinite_noise_dtypes(B, keep):  # noqa: F811
    torch.manual_seed(3)
    x = _tied_x(3, 10, 2, 3)
    # u ties (stable order: first index), -0.0 (== +0), float64 values equal in float32
    u = torch.tensor([0.5, 0.25, 0.25, -0.0, 0.0, 0.25, 0.5, 0.125, 0.0, 0.25],
                     dtype=torch.float64)
    u = torch.stack([u, u.flip(0), u + 2.0**-40]).to(x.device)
    for dt in (torch.float64, torch.float16):
        w = check(B, "selectout", x, 0.5, keep, noise=u.to(dt))
        assert ((w == 0).sum(dim=1) <= round((1 - keep) * 10)).all()
    u_nan = u.clone()
    u_nan[:, 1::3] = math.nan
    check(B, "selectout", x, 1.0, keep, noise=u_nan)



def test_selectout_drops_only_candidates_whatever_their_noise(B):  # noqa: F811
    drops_only_candidates(B, check)


def drops_only_candidates(B, check):  # noqa: F811  (also tests/test_plans_cuda.py's)
    """SPEC §3: the n_d dropped channels are candidates, the n_d with the smallest u, also
    where a candidate's u is +Inf or NaN (ranked last among the candidates, NaN after
    +Inf). Ranked as where(cand, u, inf), such a candidate tied with or ranked after the
    other channels, and those were dropped (channel 0 first)."""
    c, inf, nan = 6, math.inf, math.nan
    x = torch.ones(1, c, 2, 2, device=DEV)
    x[:, 3:] = 10.0  # candidates 3, 4, 5 (top_rate 0.5)
    cases = {  # (u, keep) -> dropped channels
        ((0.1, 0.2, 0.3, inf, inf, inf), 0.5): [3, 4, 5],
        ((0.1, 0.2, 0.3, nan, 0.5, nan), 0.5): [3, 4, 5],
        ((0.1, 0.2, 0.3, nan, inf, 0.5), 2 / 3): [4, 5],
        ((0.1, 0.2, 0.3, nan, inf, nan), 5 / 6): [4],
        ((inf, nan, -inf, nan, nan, nan), 2 / 3): [3, 4],
    }
    for (u, keep), dropped in cases.items():
        u = torch.tensor([u], device=DEV)
        check(B, "selectout", x, 0.5, keep, noise=u)  # the backend's plan is the reference's
        w = L.selectout.reference(R, x, 0.5, keep, noise=u).state[0]
        assert (w[0] == 0).nonzero().flatten().tolist() == dropped, (u, keep)

def test_selectout_no_drop(B):  # noqa: F811
    """round((1 - keep) * C) = 0: nothing dropped, every channel scaled by 1/keep."""
    x = torch.randn(2, 3, 4, 4, device=DEV)
    u = torch.zeros(2, 3, device=x.device)
    w = check(B, "selectout", x, 0.4, 0.9, noise=u)
    assert (w != 0).all()


def test_nan_channels_are_candidates(B):  # noqa: F811
    """A NaN max |x| ranks above every number (kth_largest's order), so its channel is a
    candidate (SPEC §1: the top k are s >= v_k in that order, also where v_k is NaN):
    SelectScale scales at least n_t channels and Selectout drops only candidates. With
    IEEE's NaN >= v_k (false) a NaN channel was never one: SelectScale could scale none,
    and Selectout dropped the first channels by index (channel 0, the smallest max |x|)."""
    c = 10
    x = torch.arange(1.0, c + 1).view(1, c, 1, 1).repeat(2, 1, 3, 3)  # max |x| = c + 1
    x[0, 5, 1, 1] = math.nan  # sample 0: NaN, then channel 9
    x[1, 2, 0, 0] = x[1, 7, 2, 2] = math.nan  # sample 1: two NaNs, v_k NaN at n_t <= 2
    x = x.to(DEV)
    u = torch.linspace(0.05, 0.95, c).repeat(2, 1).to(DEV)  # no u gives w = 1 (u = 0.5)
    want = {0.2: [[5, 9], [2, 7]], 0.1: [[5], [2, 7]]}  # top_rate -> candidates per sample
    for top_rate, cands in want.items():
        w = check(B, "selectscale", x, top_rate, 0.1, noise=u)
        assert [(r != 1).nonzero().flatten().tolist() for r in w.cpu()] == cands, top_rate
    w = check(B, "selectout", x, 0.2, 0.8, noise=u)  # n_t = n_d = 2: both candidates
    assert [(r == 0).nonzero().flatten().tolist() for r in w.cpu()] == want[0.2]


def test_long_rows(B):  # noqa: F811
    """C longer than one chunk of the plan kernel (4096 channels)."""
    torch.manual_seed(4)
    c = 4099
    x = (torch.randn(1, c, 1, 1) * 4).round().to(DEV)  # ties across chunks
    u = (torch.rand(1, c) * 64).floor().div(64).to(x.device)
    check(B, "selectscale", x, 0.3, 0.2, noise=u)
    check(B, "selectout", x, 0.3, 0.8, noise=u)


def test_strided_noise(B):  # noqa: F811
    """noise a view with strides of its own (transposed; every other column of a wider
    tensor): read at its strides, by both plans."""
    torch.manual_seed(6)
    x = make_x((3, 7, 4, 5), device=DEV)
    for u in (torch.rand(7, 3, device=DEV).t(), torch.rand(3, 14, device=DEV)[:, ::2]):
        check(B, "selectscale", x, 0.5, 0.1, noise=u)
        check(B, "selectout", x, 0.5, 0.75, noise=u)


def test_rate_tensors():
    """Triton's traced path (rates and the candidates' count k as 0-dim tensors) gives the
    eager plan (CUDA's: test_plans_cuda.test_plan_ops_rates_tensor)."""
    T = load_backend("triton")
    from guidedrop.triton_kernels.plans import selectscale as S
    torch.manual_seed(5)
    x = torch.randn(3, 11, 4, 4, device=DEV)
    u = torch.rand(3, 11, device=x.device)
    amax, _ = T.channel_stats(x)
    f32, f64 = torch.float32, torch.float64
    for retain in (0.1, 1 / 3):
        want = S._selectscale_plan(amax, u, 4, retain, 2 * (1 - retain))
        got = S._selectscale_plan(amax, u, torch.tensor(4.0, dtype=f64),
                                  torch.tensor(retain, dtype=f32),
                                  torch.tensor(2 * (1 - retain), dtype=f32))
        assert torch.equal(got, want)
    for keep in (0.7, 1 / 3):
        nd = round((1 - keep) * 11)
        want = S._selectout_plan(amax, u, 8, 1 / keep, nd)
        got = S._selectout_plan(amax, u, torch.tensor(8.0, dtype=f64),
                                torch.tensor(1 / keep, dtype=f32),
                                torch.tensor(float(nd), dtype=f64))
        assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("shape,dtype,layout", list(product(ODD_SHAPES, DTYPES, LAYOUTS)))
def test_plans_match_reference_all(B, shape, dtype, layout):  # noqa: F811
    torch.manual_seed(sum(shape))
    n, c = shape[:2]
    x = make_x(shape, dtype, "cpu", layout).to(DEV)
    u = torch.rand(n, c, device=x.device)
    for top_rate, retain in ((0.2, 0.1), (1.0, 0.5)):
        check(B, "selectscale", x, top_rate, retain, noise=u)
    for top_rate, keep in ((0.5, 0.75), (1.0, 0.5), (0.3, 0.9)):
        if round((1 - keep) * c) <= max(1, round(top_rate * c)):
            check(B, "selectout", x, top_rate, keep, noise=u)
