"""Every layer of SPEC.md on the reference path against the naive loops of ``naive.py``.

- hand-checked cases (values computed by hand in the test, checked on both the naive
  implementation and the package);
- exact mask agreement with explicit ``noise`` over odd shapes, every dtype, every
  normalize mode, contiguous / channels_last / sliced inputs;
- ``grad_x == grad_y * w``; eval / rate-0 identity; empty tensors; NaN/Inf;
- drop-rate statistics with fixed seeds and ``noise=None``; seeding and ``generator=``.
"""

from __future__ import annotations

import math

import naive
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import AutocastSpy, devices, make_x, tol

import guidedrop
import guidedrop.functional as F

CPU = torch.device("cpu")
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NORMALIZE = ("batch", "sample", "none")


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests pin the reference path (issue 2); kernel backends have their own tests."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")


# Odd shapes: N = 1, C = 1, 1 x 1 maps, H != W, sides not multiples of the blocks.
SHAPES = [
    (2, 3, 7, 5),
    (1, 1, 1, 1),
    (1, 4, 9, 11),
    (3, 2, 13, 6),
    (2, 5, 1, 8),
    (1, 3, 8, 1),
    (2, 6, 10, 10),
]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               **tol(dtype), equal_nan=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_noise(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen(seed))


def rand_x(shape, dtype=torch.float32, seed=0, layout="contiguous", device=CPU) -> torch.Tensor:
    torch.manual_seed(seed)
    return make_x(shape, dtype, device, layout)


def leaf_like(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of x with x's strides (clone() would make a sliced x contiguous)."""
    t = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    return t.copy_(x.detach()).requires_grad_()


def multiplier(op, x, **kw) -> torch.Tensor:
    """The package's w, read back through autograd: d(sum y)/dx = w (in x's dtype)."""
    xg = leaf_like(x)
    assert xg.stride() == x.stride()
    op(xg, **kw).backward(torch.ones(x.shape, dtype=x.dtype, device=x.device))
    return xg.grad


def check_grad(op, x, w_ref, **kw) -> None:
    """x.grad == g * w for a random g (exact up to the dtype's rounding)."""
    xg = leaf_like(x)
    y = op(xg, **kw)
    g = (torch.rand(x.shape, generator=gen(99), dtype=torch.float64) + 0.5).to(x.dtype)
    y.backward(g.to(x.device))
    close(xg.grad, (g.double() * w_ref).to(x.dtype), x.dtype)


def check_output(y, x, y_ref) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, y_ref, x.dtype)


# ------------------------------------------------------------------ layer table

def _cam_inputs(shape, seed=0, groups=2):
    n, c = shape[:2]
    g = gen(seed + 1000)
    weight = torch.randn(4, c * groups, generator=g)
    target = torch.randint(0, 4, (n,), generator=g)
    return weight, target


# name -> (functional op, naive op, params, noise-shape keywords, binary mask?)
CASES = {
    "corrdrop": (F.corrdrop, naive.naive_corrdrop, dict(p=0.4, block_size=3), {}, True),
    "selectscale": (F.selectscale, naive.naive_selectscale, dict(top_rate=0.4, retain=0.1),
                    {}, False),
    "spatialscale": (F.spatialscale, naive.naive_spatialscale, dict(retain=0.2), {}, False),
    "selectout": (F.selectout, naive.naive_selectout, dict(top_rate=0.6, keep=0.7), {}, True),
    "attentiondrop-am": (F.attentiondrop, naive.naive_attentiondrop,
                         dict(alpha=0.5, beta=30.0, mode="am"), {}, True),
    "attentiondrop-sm": (F.attentiondrop, naive.naive_attentiondrop,
                         dict(alpha=0.5, beta=30.0, mode="sm"), {}, False),
    "attentiondrop-ad": (F.attentiondrop, naive.naive_attentiondrop,
                         dict(alpha=0.5, beta=30.0, mode="ad"), {}, False),
    "focused_dropout": (F.focused_dropout, naive.naive_focused_dropout,
                        dict(low=0.3, high=0.6), {}, True),
    "focused_dropout-pp": (F.focused_dropout, naive.naive_focused_dropout,
                           dict(low=0.3, high=0.6, per_position=True),
                           dict(per_position=True), True),
    "camdrop": (F.camdrop, naive.naive_camdrop,
                dict(block_size=2, keep=0.2, channel_rate=0.5), {}, True),
    "camdrop-r3": (F.camdrop, naive.naive_camdrop,
                   dict(block_size=3, keep=0.0, channel_rate=1.0), {}, True),
    "dropblock": (F.dropblock, naive.naive_dropblock, dict(p=0.3, block_size=3), {}, True),
    "dropblock-shared": (F.dropblock, naive.naive_dropblock,
                         dict(p=0.3, block_size=3, shared_channels=True),
                         dict(shared_channels=True), True),
}
HAS_NORMALIZE = {"corrdrop", "attentiondrop-am", "attentiondrop-sm", "attentiondrop-ad",
                 "camdrop", "camdrop-r3", "dropblock", "dropblock-shared"}


def layer_name(case: str) -> str:
    return case.split("-")[0]


def make_noise(case, x, seed):
    _, _, params, nkw, _ = CASES[case]
    shape = naive.noise_shape(layer_name(case), x.shape,
                              block_size=params.get("block_size", 7), **nkw)
    if case == "corrdrop":
        noise = naive.safe_corrdrop_noise(x, params["p"], params["block_size"], gen(seed))
    else:
        noise = rand_noise(shape, seed)
    return noise.to(x.device)


def call_pair(case, x, noise, normalize=None):
    """(package op with kwargs, naive op with kwargs) for x and noise."""
    op, nop, params, _, _ = CASES[case]
    params = dict(params)
    if normalize is not None:
        params["normalize"] = normalize
    if layer_name(case) == "camdrop":
        weight, target = (t.to(x.device) for t in _cam_inputs(x.shape))

        def pkg(t, **extra):
            return op(t, weight, target, noise=noise, **params, **extra)

        def ref(t):
            return nop(t, weight, target, noise, **params)
        return pkg, ref

    def pkg(t, **extra):
        return op(t, noise=noise, **params, **extra)

    def ref(t):
        return nop(t, noise, **params)
    return pkg, ref


def compare(case, x, seed=0, normalize=None):
    """Package vs naive on (x, noise): output, mask (exact), gradient. Returns naive w."""
    noise = make_noise(case, x, seed)
    pkg, ref = call_pair(case, x, noise, normalize)
    x_before = x.clone()
    y = pkg(x)
    assert torch.equal(x, x_before), "the op changed its input"
    y_ref, w_ref = ref(x)
    w = multiplier(lambda t: pkg(t), x).cpu()
    if case == "corrdrop":
        w_ref = check_corrdrop(x, w, w_ref, CASES[case][2], normalize or "batch")
        y_ref = naive.apply(x, w_ref)
    elif CASES[case][4]:
        assert torch.equal(w == 0, w_ref == 0), f"{case}: masks differ"
    close(w, w_ref.to(x.dtype), x.dtype)
    check_output(y, x, y_ref)
    check_grad(lambda t: pkg(t), x, w_ref)
    return w_ref


def check_corrdrop(x, w, w_ref, params, normalize):
    """CorrDrop: exact mask on samples whose kappa is well conditioned (see
    naive.corrdrop_well_conditioned); elsewhere the mask must still be a block mask shared
    by the channels. Returns the expected w: the package's mask, normalised naively."""
    k = params["block_size"]
    n, c, h, wd = x.shape
    mask = w != 0
    ok = naive.corrdrop_well_conditioned(x, k)
    for b in range(n):
        if ok[b]:
            assert torch.equal(mask[b], w_ref[b] != 0), f"corrdrop mask differs, sample {b}"
        blocks = mask[b, 0]
        assert torch.equal(mask[b], blocks.expand(c, h, wd)), "mask not shared by channels"
        for i in range(h):
            for j in range(wd):
                assert blocks[i, j] == blocks[i - i % k, j - j % k], "mask not block-constant"
    return naive.naive_normalize(mask.double(), normalize)


# ------------------------------------------------------------ exact agreement


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_float32(case, shape):
    x = rand_x(shape, torch.float32, seed=hash(shape) % 1000)
    compare(case, x, seed=len(case))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_dtypes(case, dtype, device):
    x = rand_x((2, 5, 9, 7), dtype, seed=3, device=device)
    w_ref = compare(case, x, seed=5)
    # the rates are high enough that the masks are not trivial
    assert (w_ref != 1).any()
    if CASES[case][4] and case != "focused_dropout-pp":
        assert (w_ref != 0).any()


@pytest.mark.parametrize("case", [c for c in CASES if c != "spatialscale"])  # no statistics
def test_autocast_is_off_for_the_statistics(case, monkeypatch):
    """Under torch.autocast the statistics stay float32 (SPEC §1): every backend call of the
    plan (statistics, selection, seeds) runs with autocast off. The apply, x·w, is
    elementwise: autocast leaves it alone."""
    spy = AutocastSpy.install(monkeypatch)
    x = rand_x((2, 8, 9, 7), torch.float32, seed=3)
    pkg, _ = call_pair(case, x, make_noise(case, x, 5))
    expect = pkg(x)
    spy.calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pkg(x)
    plan = [(name, on) for name, on in spy.calls if not name.startswith("apply_")]
    assert plan and not any(on for _, on in plan), spy.calls
    assert y.dtype == x.dtype and torch.equal(y, expect)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("case", sorted(HAS_NORMALIZE))
def test_normalize_modes(case, normalize):
    x = rand_x((3, 4, 8, 9), torch.float32, seed=7)
    w_ref = compare(case, x, seed=11, normalize=normalize)
    if normalize == "none":
        assert set(torch.unique(w_ref).tolist()) <= {0.0, 1.0} or not CASES[case][4]
    assert (w_ref != 1).any()


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_layouts(case, dtype, layout):
    x = rand_x((2, 4, 7, 9), dtype, seed=4, layout=layout)
    if layout == "sliced":
        assert not x.is_contiguous()
    compare(case, x, seed=8)
    if layout == "channels_last":
        noise = make_noise(case, x, 8)
        pkg, _ = call_pair(case, x, noise)
        assert pkg(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("attentiondrop-sm",
                                                                 "attentiondrop-ad")])
def test_gradcheck_float64(case):
    """float64 gradcheck where w is piecewise constant in x (for the soft AttentionDrop
    masks w moves with x while SPEC §1 holds it constant, so finite differences differ)."""
    x = rand_x((1, 3, 5, 4), torch.float64, seed=2)
    noise = make_noise(case, x, 4)
    pkg, _ = call_pair(case, x, noise)
    assert torch.autograd.gradcheck(lambda t: pkg(t), (x.clone().requires_grad_(),))


@pytest.mark.parametrize("case", list(CASES))
def test_backward_keeps_no_x_sized_float_mask(case):
    """SPEC §1: autograd keeps the small state (or x itself), never an x-sized float mask."""
    x = rand_x((2, 8, 16, 16)).requires_grad_()
    noise = make_noise(case, x.detach(), 3)
    pkg, _ = call_pair(case, x.detach(), noise)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pkg(x)
    y.sum().backward()
    assert saved or layer_name(case) != "attentiondrop"
    for t in saved:
        if t.data_ptr() == x.data_ptr():
            continue
        big = t.numel() >= x.numel()
        assert not (big and t.is_floating_point()), f"{case} saved {t.dtype} {tuple(t.shape)}"
        assert t.numel() * t.element_size() < x.numel() * x.element_size()


# --------------------------------------------------------- hand-checked cases


def _corrdrop_hand_input():
    """(1, 2, 4, 4), k = 2: pooled rows a_0=(1,0), a_1=(0,1), a_2=(1,1), a_3=(0,0)
    (positions (0,0), (0,1), (1,0), (1,1)); every window averages to them but is not
    constant, so the pooling is exercised."""
    pooled = [[(1, 0), (0, 1)], [(1, 1), (0, 0)]]
    x = torch.zeros(1, 2, 4, 4)
    wiggle = torch.tensor([[0.5, -0.5], [-0.25, 0.25]])
    for i in range(2):
        for j in range(2):
            for c in range(2):
                v = pooled[i][j][c]
                x[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = v + (wiggle if v else 0)
    return x


def test_corrdrop_hand_pooled_2x2():
    x = _corrdrop_hand_input()
    # By hand: â = (1,0), (0,1), (1,1)/√2, 0. P rows: [0, 0, 1/√2, 0], [0, 0, 1/√2, 0],
    # [1/√2, 1/√2, 0, 0], [0, 0, 0, 1] (zero row: P_33 = 1). F = row sums / 4.
    s2 = 1 / math.sqrt(2)
    f_hand = [s2 / 4, s2 / 4, 2 * s2 / 4, 1 / 4]
    f, kap, hp, wp = naive.corrdrop_stats(x, 2)
    assert (hp, wp) == (2, 2)
    assert f[0] == pytest.approx(f_hand, abs=1e-12)
    # kappa = (F - F_min)/(F_max - F_min): 0, 0, 1, √2 - 1
    assert kap[0] == pytest.approx([0, 0, 1, math.sqrt(2) - 1], abs=1e-12)
    fp = guidedrop.primitives.pooled_correlation(x, 2)
    assert fp.dtype == torch.float32 and fp.shape == (1, 2, 2)
    torch.testing.assert_close(fp[0].flatten().double(), torch.tensor(f_hand, dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    # noise[0] = u for M = u < kappa: M = 0, 0, 1 (u=.9 < 1), 1 (u=.2 < .414) -> z = 2.
    # p = 0.3, whole blocks: p' = 0.3, p̂ = min(1, 0.3 * 4 / 2) = 0.6, B = u < 0.4:
    # B_0 = 1 (u=.1), B_1 = 0 (u=.7). S = 1, 0, 1, 1: the top-right block is dropped.
    noise = torch.tensor([[[[0.3, 0.9], [0.9, 0.2]]], [[[0.1, 0.7], [0.5, 0.5]]]])
    s_hand = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    s_hand[:, :, 0:2, 2:4] = 0
    for normalize, scale in (("none", 1.0), ("batch", 32 / 24), ("sample", 32 / 24)):
        y_ref, w_ref = naive.naive_corrdrop(x, noise, p=0.3, block_size=2, normalize=normalize)
        assert torch.equal(w_ref, s_hand * scale)
        y = F.corrdrop(x, 0.3, 2, normalize=normalize, noise=noise)
        torch.testing.assert_close(y.double(), x.double() * s_hand * scale)


def test_corrdrop_hand_flat_samples():
    """F_max == F_min gives kappa = 0 everywhere, so M = 0, z = N' and p̂ = min(1, p')."""
    # sample 0 all zero: every row is zero, P_ii = 1, F_i = 1/4 for all four blocks.
    x = torch.zeros(2, 3, 6, 6)
    x[1] = torch.randn(3, 6, 6, generator=gen(0))
    f, kap, _, _ = naive.corrdrop_stats(x, 3)
    assert f[0] == [0.25] * 4 and kap[0] == [0.0] * 4
    assert torch.equal(guidedrop.primitives.pooled_correlation(x, 3)[0], torch.full((2, 2), 0.25))
    # p = 0.5, k = 3, 6 x 6: p' = 0.5, p̂ = min(1, 0.5 * 4 / 4) = 0.5; B = u < 0.5.
    noise = torch.zeros(2, 2, 2, 2)
    noise[1, 0] = torch.tensor([[0.95, 0.2], [0.2, 0.95]])   # sample 0: B = 0, 1, 1, 0
    e0 = torch.zeros(3, 6, 6, dtype=torch.float64)
    e0[:, 0:3, 3:6] = 1
    e0[:, 3:6, 0:3] = 1
    _, w_ref = naive.naive_corrdrop(x, noise, p=0.5, block_size=3, normalize="none")
    assert torch.equal(w_ref[0], e0)
    w = multiplier(lambda t: F.corrdrop(t, 0.5, 3, normalize="none", noise=noise), x)
    assert torch.equal(w[0].double(), e0)
    # N' = 1 (3 x 3 map, k = 3): kappa = 0, M = 0, z = 1; with p = 1, p' = 1 and p̂ = 1:
    # B = u < 0 never holds, everything is dropped.
    xone = torch.randn(2, 3, 3, 3, generator=gen(1))
    w = multiplier(lambda t: F.corrdrop(t, 1.0, 3, normalize="none",
                                        noise=torch.zeros(2, 2, 1, 1)), xone)
    assert torch.equal(w, torch.zeros_like(w))
    # ... and with p = 0.5, B = u < 0.5 keeps it for u = 0.4, drops it for u = 0.6
    noise = torch.tensor([0.0, 0.0, 0.4, 0.6]).view(2, 2, 1, 1)
    w = multiplier(lambda t: F.corrdrop(t, 0.5, 3, normalize="none", noise=noise), xone)
    assert w[0].eq(1).all() and w[1].eq(0).all()


def test_corrdrop_p_hat():
    """p' = p·H·W/(k²·H'·W'); p̂ = min(1, p'·N'/z); z = 0 drops nothing (it cannot happen
    through the layer: the F_min block has kappa = 0, so M = 0 there)."""
    assert naive.corrdrop_phat(0.36, 2, 5, 5, 9) == pytest.approx(0.25)   # H' = W' = 3
    assert naive.corrdrop_phat(0.1, 2, 4, 4, 2) == pytest.approx(0.2)
    assert naive.corrdrop_phat(0.5, 2, 4, 4, 1) == 1.0
    assert naive.corrdrop_phat(0.5, 2, 4, 4, 0) == 0.0


@pytest.mark.parametrize("p,h,w,z,kept", [
    (0.58, 5, 10, 29, True),    # p'N'/z = 1 - 1.1e-16 in SPEC's order: q = 1.1e-16 > u = 0
    (2 / 3, 7, 3, 14, False),   # p'N'/z = 1 in SPEC's order: q = 0, u = 0 drops
])
def test_corrdrop_p_hat_in_spec_order(p, h, w, z, kept):
    """p̂ = p'·N'/z with p' = p·H·W/(k²·H'·W') rounded as written (SPEC §1, §2 step 4):
    where p'·N'/z is 1 mathematically, the order of the float steps decides q = 1 − p̂
    (another order, p·H·W/k²/z, swaps these two cases). k = 1: N' = H·W rows; the first z
    are zero rows (F = 1/N', κ = 0: M = 0), the others equal (F = (N' − z − 1)/N', κ = 1:
    M = 1), so exactly z candidates; noise 0 everywhere."""
    x = torch.zeros(1, 2, h, w)
    x.view(2, -1)[0, z:] = 1.0
    noise = torch.zeros(2, 1, h, w)
    assert naive.corrdrop_block_mask(x, noise, p, 1)[0] == [
        [1 if i * w + j >= z or kept else 0 for j in range(w)] for i in range(h)]
    _, w_ref = naive.naive_corrdrop(x, noise, p=p, block_size=1, normalize="none")
    w = multiplier(lambda t: F.corrdrop(t, p, 1, normalize="none", noise=noise), x)
    assert torch.equal(w.double(), w_ref)


def test_selectscale_hand_tie():
    # |x| maxima per channel: 3, 5, 5 (a -5), 1, 2 -> n_t = round(0.2 * 5) = 1, v_1 = 5,
    # both tied channels 1 and 2 are candidates.
    x = torch.zeros(1, 5, 2, 2)
    for c, v in enumerate([3.0, 5.0, -5.0, 1.0, 2.0]):
        x[0, c, 1, 0] = v
        x[0, c, 0, 1] = 0.5
    noise = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    expect_c = torch.tensor([1.0, 0.1 + 1.8 * 0.2, 0.1 + 1.8 * 0.3, 1.0, 1.0], dtype=torch.float64)
    expect = expect_c.view(1, 5, 1, 1).expand(1, 5, 2, 2)
    _, w_ref = naive.naive_selectscale(x, noise, top_rate=0.2, retain=0.1)
    torch.testing.assert_close(w_ref, expect)
    y = F.selectscale(x, 0.2, 0.1, noise=noise)
    torch.testing.assert_close(y.double(), x.double() * expect, atol=1e-6, rtol=1e-6)
    # SpatialScale: every channel gets rho + 2(1 - rho) u
    y = F.spatialscale(x, 0.4, noise=noise)
    ws = (0.4 + 1.2 * noise.double()).view(1, 5, 1, 1)
    torch.testing.assert_close(y.double(), x.double() * ws, atol=1e-6, rtol=1e-6)


def test_selectout_hand():
    # C = 10, top_rate 0.3 -> n_t = 3; keep 0.8 -> n_d = round(0.2 * 10) = 2.
    # maxima 9, 1, 8, 2, 7, 3, 7 (tie), 0, 0, 0 -> v_3 = 7: candidates 0, 2, 4, 6 (ties kept).
    # u of the candidates: 0.5, 0.2, 0.2, 0.9 -> the two smallest: channels 2 and 4. The
    # non-candidates 1, 3, 5, 7-9 have smaller u but are never dropped.
    x = torch.zeros(1, 10, 1, 3)
    for c, v in enumerate([9, 1, 8, 2, 7, 3, 7, 0, 0, 0]):
        x[0, c, 0, 2] = float(v)
        x[0, c, 0, 0] = 0.25
    u = torch.tensor([[0.5, 0.0, 0.2, 0.0, 0.2, 0.0, 0.9, 0.1, 0.1, 0.1]])
    w_c = torch.full((10,), 1 / 0.8, dtype=torch.float64)
    w_c[[2, 4]] = 0
    expect = w_c.view(1, 10, 1, 1).expand(1, 10, 1, 3)
    _, w_ref = naive.naive_selectout(x, u, top_rate=0.3, keep=0.8)
    torch.testing.assert_close(w_ref, expect)
    torch.testing.assert_close(multiplier(lambda t: F.selectout(t, 0.3, 0.8, noise=u), x).double(),
                               expect, atol=1e-6, rtol=1e-6)
    # tie for the last slot: n_d = 1 (keep 0.9), u of candidates 0.5, 0.2, 0.2, 0.9:
    # the first index (channel 2) is dropped, channel 4 is kept.
    w_c = torch.full((10,), 1 / 0.9, dtype=torch.float64)
    w_c[2] = 0
    expect = w_c.view(1, 10, 1, 1).expand(1, 10, 1, 3)
    _, w_ref = naive.naive_selectout(x, u, top_rate=0.3, keep=0.9)
    torch.testing.assert_close(w_ref, expect)
    torch.testing.assert_close(multiplier(lambda t: F.selectout(t, 0.3, 0.9, noise=u), x).double(),
                               expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode,expect", [
    ("am", [[1.0, 0.0], [1.0, 0.0]]),
    ("sm", [[1.0, 0.0], [2 / 3, 1 / 3]]),
    ("ad", [[1.0, 0.0], [1.0, 1 / 3]]),
])
def test_attentiondrop_hand_2x2(mode, expect):
    # map [[1, 4], [2, 3]], beta = 50 -> n_beta = ceil(50*4/100) = 2, t = 3 (top: 4, 3);
    # f̂ = (x - 1)/3 = [[0, 1], [1/3, 2/3]]. Channel 1 has u = .9 >= alpha: untouched.
    x = torch.tensor([[[[1.0, 4.0], [2.0, 3.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    noise = torch.tensor([[0.2, 0.9]])
    expect = torch.stack([torch.tensor(expect, dtype=torch.float64),
                          torch.ones(2, 2, dtype=torch.float64)]).unsqueeze(0)
    _, w_ref = naive.naive_attentiondrop(x, noise, alpha=0.5, beta=50.0, mode=mode,
                                         normalize="none")
    torch.testing.assert_close(w_ref, expect)
    thr = guidedrop.primitives.top_percentile_threshold(x, 50.0)
    assert thr.tolist() == [[3.0, 7.0]]
    y = F.attentiondrop(x, 0.5, 50.0, mode=mode, normalize="none", noise=noise)
    torch.testing.assert_close(y.double(), x.double() * expect, atol=1e-6, rtol=1e-6)
    yb = F.attentiondrop(x, 0.5, 50.0, mode=mode, normalize="batch", noise=noise)
    scale = 8 / float(expect.sum())
    torch.testing.assert_close(yb.double(), x.double() * expect * scale, atol=1e-5, rtol=1e-5)


def test_attentiondrop_constant_map_and_ties():
    """max == min gives f̂ = 0; ties at the threshold are all 'top' (x >= t)."""
    x = torch.tensor([[[[2.0, 2.0], [2.0, 2.0]], [[1.0, 3.0], [3.0, 0.0]]]])
    noise = torch.tensor([[0.0, 0.0]])
    # map 0: t = 2, every unit is top; am drops all, sm/ad keep all (f̂ = 0).
    # map 1: beta 25 -> n_beta = 1, t = 3: both 3s are top.
    for mode, e0, e1 in (("am", [[0, 0], [0, 0]], [[1, 0], [0, 1]]),
                         ("sm", [[1, 1], [1, 1]], [[2 / 3, 0], [0, 1]]),
                         ("ad", [[1, 1], [1, 1]], [[1, 0], [0, 1]])):
        expect = torch.tensor([[e0, e1]], dtype=torch.float64)
        _, w_ref = naive.naive_attentiondrop(x, noise, alpha=1.0, beta=25.0, mode=mode,
                                             normalize="none")
        torch.testing.assert_close(w_ref, expect)
        w = multiplier(lambda t, mode=mode: F.attentiondrop(t, 1.0, 25.0, mode=mode,
                                                            normalize="none", noise=noise), x)
        torch.testing.assert_close(w.double(), expect, atol=1e-6, rtol=1e-6)


def test_attentiondrop_gamma_is_u_below_alpha():
    """SPEC §1 (bernoulli(q) is u < q) and §4: a map's gamma is 1 only where u < alpha, so
    u == alpha leaves the map untouched. alpha = 0.5 and u = 0.5 are exact in every dtype:
    channel 0 (u = alpha) keeps w = 1; channel 1 (u = 0.25) drops its top unit (am mode)."""
    x = torch.tensor([[[[1.0, 4.0], [2.0, 3.0]], [[1.0, 4.0], [2.0, 3.0]]]])
    noise = torch.tensor([[0.5, 0.25]])
    w = multiplier(lambda t: F.attentiondrop(t, 0.5, 25.0, mode="am", normalize="none",
                                             noise=noise), x)
    expect = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]]])
    assert torch.equal(w, expect)


def test_top_k_counts_a_nan_channel_as_the_largest():
    """SPEC §1 (NaN propagates, top-k by value) and §3: a channel whose max |x| is NaN
    ranks above every number in the candidates' top k (layers._top), both where the k-th
    largest is that NaN (n_t = 1) and where it is a number (n_t = 2: the NaN channel and
    the channel of max 5, not the one of max 3). SelectScale's w of a candidate is
    retain + 2 (1 - retain) u, read through autograd (finite where x is NaN)."""
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = float("nan"), 1.0
    x[0, 1, 0, 1], x[0, 2, 1, 0] = 5.0, 3.0
    noise = torch.tensor([[0.25, 0.5, 0.75]])
    cand_w = 0.5 + 2 * 0.5 * noise  # retain = 0.5: exact in float32
    for top_rate, cand in ((1 / 3, [True, False, False]), (2 / 3, [True, True, False])):
        w = multiplier(lambda t, r=top_rate: F.selectscale(t, r, 0.5, noise=noise), x)
        expect = torch.where(torch.tensor([cand]), cand_w, 1.0)
        assert torch.equal(w, expect.view(1, 3, 1, 1).expand(x.shape)), top_rate


def test_focused_dropout_hand():
    x = torch.tensor([
        # channel means 1 and 2 -> r = 1, v = 4
        [[[1.0, 1.0], [1.0, 1.0]], [[4.0, 2.0], [1.0, 1.0]]],
        # every value <= 0 -> v <= 0: the sample is left unchanged
        [[[-1.0, -2.0], [-3.0, 0.0]], [[-1.0, -1.0], [-1.0, -1.0]]],
        # equal channel means -> r = 0 (first index), v = 3
        [[[3.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [4.0, 0.0]]],
    ])
    noise = torch.tensor([0.25, 0.5, 0.25])

    def expect(*maps):
        return torch.tensor([[m, m] for m in maps], dtype=torch.float64)

    ones = [[1.0, 1.0], [1.0, 1.0]]
    cases = [
        # low .4, high .6: gamma = .45 -> keep x_r > 1.8 (sample 0), > 1.35 (sample 2)
        (dict(low=0.4, high=0.6), noise, expect([[1, 1], [0, 0]], ones, [[1, 0], [0, 0]])),
        # gamma = .5 exactly: threshold 2 and the unit equal to 2 is dropped (strict >)
        (dict(low=0.5, high=0.5), noise, expect([[1, 0], [0, 0]], ones, [[1, 0], [0, 0]])),
        # per position: gamma .4 except ~.6 at (0, 1): 2 > .6 * 4 fails
        (dict(low=0.4, high=0.6, per_position=True),
         torch.tensor([[[0.0, 1.0 - 2 ** -24], [0.0, 0.0]]] * 3),
         expect([[1, 0], [0, 0]], ones, [[1, 0], [0, 0]])),
    ]
    for params, u, e in cases:
        _, w_ref = naive.naive_focused_dropout(x, u, **params)
        torch.testing.assert_close(w_ref, e)
        w = multiplier(lambda t, u=u, params=params: F.focused_dropout(t, noise=u, **params), x)
        torch.testing.assert_close(w.double(), e)


def test_focused_dropout_v_zero_leaves_sample_unchanged():
    """SPEC §5 step 4, v = 0 exactly (v <= 0, not v < 0): the reference channel's maximum
    is 0 (a dead ReLU channel with the highest mean), so x_r > γ·v = 0 would drop every
    position; the sample is left unchanged instead, its other channels too."""
    x = torch.zeros(2, 2, 2, 2)
    x[:, 1] = torch.tensor([[-5.0, 1.0], [1.0, 1.0]])  # mean -0.5 < 0: r = 0, v = 0
    x[1, 0, 0, 0] = -1.0  # sample 1: r = 0 again (mean -0.25), v = 0 at the other units
    for per_position in (False, True):
        u = torch.full((2, 2, 2) if per_position else (2,), 0.5)
        _, w_ref = naive.naive_focused_dropout(x, u, per_position=per_position)
        assert torch.equal(w_ref, torch.ones_like(w_ref))
        y = F.focused_dropout(x, 0.3, 0.6, per_position=per_position, noise=u)
        assert torch.equal(y, x)
        w = multiplier(lambda t, u=u, pp=per_position: F.focused_dropout(
            t, 0.3, 0.6, per_position=pp, noise=u), x)
        assert torch.equal(w, torch.ones_like(w))


def test_camdrop_hand():
    # N = 1, C = 2, 5 x 5, r = 3: valid centres 1..3 in each direction. W = [[1, 0], [0, 1]],
    # target 0 -> alpha = (1, 0): J = x[0, 0]. n_s = max(1, 25 // 9) = 2 positions: J peaks
    # at (2, 2) = 9 and (0, 0) = 8 ((0, 0) is not a valid centre). channel_rate .5 -> 1
    # channel: channel 0. noise 0 everywhere -> seeds where candidate & valid: only (2, 2) in
    # channel 0 -> rows/cols 1..3 of channel 0 dropped.
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0] = torch.arange(25.0).view(5, 5) / 100
    x[0, 0, 2, 2], x[0, 0, 0, 0] = 9.0, 8.0
    x[0, 1] = 5.0
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0])
    noise = torch.zeros(1, 2, 5, 5)
    e = torch.ones(1, 2, 5, 5, dtype=torch.float64)
    e[0, 0, 1:4, 1:4] = 0
    _, w_ref = naive.naive_camdrop(x, weight, target, noise, block_size=3, keep=0.5,
                                   channel_rate=0.5, normalize="none")
    torch.testing.assert_close(w_ref, e)
    w = multiplier(lambda t: F.camdrop(t, weight, target, 3, 0.5, channel_rate=0.5,
                                       normalize="none", noise=noise), x)
    torch.testing.assert_close(w.double(), e)
    # group averaging: C_fc = 4 = 2 * C, alpha = mean of pairs -> (0.5, 2.5): channel 1 now.
    weight4 = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    target0 = torch.tensor([0])
    # J = .5 x0 + 2.5 x1 = .5 x0 + 12.5: same ranking as x0.
    e = torch.ones(1, 2, 5, 5, dtype=torch.float64)
    e[0, 1, 1:4, 1:4] = 0
    _, w_ref = naive.naive_camdrop(x, weight4, target0, noise, block_size=3, keep=0.5,
                                   channel_rate=0.5, normalize="none")
    torch.testing.assert_close(w_ref, e)
    w = multiplier(lambda t: F.camdrop(t, weight4, target0, 3, 0.5, channel_rate=0.5,
                                       normalize="none", noise=noise), x)
    torch.testing.assert_close(w.double(), e)
    # r > H: no valid centre, nothing dropped
    w = multiplier(lambda t: F.camdrop(t, weight, target, 6, 0.5, channel_rate=0.5,
                                       normalize="none", noise=noise), x)
    assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("r", [2, 3, 8])
def test_reference_camdrop_function(r):
    """guidedrop.reference.camdrop (the layer on the reference backend, public) equals the
    functional op, also for a block larger than the map (r = 3 on 1 x 7 maps: no valid
    centre, x itself; it raised a TypeError on the plan-less case: an attacking helper)."""
    from guidedrop import reference
    x = torch.randn(2, 4, 1 if r == 3 else 9, 7, generator=gen(21))
    weight, target = torch.randn(3, 4, generator=gen(22)), torch.tensor([0, 2])
    u = torch.rand(x.shape, generator=gen(23))
    y = reference.camdrop(x, weight, target, r, 0.5, channel_rate=0.5, normalize="batch",
                          noise=u)
    assert torch.equal(y, F.camdrop(x, weight, target, r, 0.5, channel_rate=0.5, noise=u))
    if r > 2:  # no valid centre: x itself
        assert y is x


@pytest.mark.parametrize("shape", [(2, 4, 0, 6), (2, 0, 6, 6), (0, 4, 6, 6)], ids=str)
def test_reference_layer_functions_on_empty_x(shape):
    """guidedrop.reference.<layer> returns an empty x itself, as the functional ops do (an
    attacking helper: DropBlock, FocusedDropout, CorrDrop and CamDrop raised
    ZeroDivisionError, IndexError or RuntimeError from the layers' code)."""
    from guidedrop import reference
    x = torch.randn(shape)
    weight, target = torch.randn(3, 4), torch.zeros(shape[0], dtype=torch.long)
    calls = {"corrdrop": (0.1, 3), "selectscale": (0.2, 0.5), "spatialscale": (),
             "selectout": (0.5, 0.9), "attentiondrop": (0.1, 20.0),
             "focused_dropout": (0.3, 0.6), "camdrop": (weight, target, 3, 0.9),
             "dropblock": (0.1, 3)}
    params = {"corrdrop": dict(normalize="batch"), "attentiondrop": dict(mode="ad",
              normalize="batch"), "focused_dropout": dict(per_position=False),
              "camdrop": dict(channel_rate=0.125, normalize="batch"),
              "dropblock": dict(shared_channels=False, normalize="batch")}
    for layer, args in calls.items():
        assert getattr(reference, layer)(x, *args, **params.get(layer, {})) is x, layer


@pytest.mark.parametrize("r,centre,rows", [
    (3, (3, 3), (2, 5)),     # offset r//2 = 1 before the centre
    (2, (1, 1), (0, 2)),     # even block: offset 1, block (0..1)
    (4, (2, 2), (0, 4)),     # offset 2
    (1, (0, 6), None),       # r = 1: a single unit
])
def test_dropblock_single_seed(r, centre, rows):
    x = torch.ones(1, 2, 7, 7)
    noise = torch.ones(1, 2, 7, 7) * 0.999
    noise[0, 1, centre[0], centre[1]] = 0.0
    e = torch.ones(1, 2, 7, 7, dtype=torch.float64)
    if rows is None:
        e[0, 1, centre[0], centre[1]] = 0
    else:
        e[0, 1, rows[0]:rows[1], rows[0]:rows[1]] = 0
    for normalize, scale in (("none", 1.0), ("batch", 98 / float(e.sum())),
                             ("sample", 98 / float(e.sum()))):
        _, w_ref = naive.naive_dropblock(x, noise, p=0.2, block_size=r, normalize=normalize)
        torch.testing.assert_close(w_ref, e * scale)
        y = F.dropblock(x, 0.2, r, normalize=normalize, noise=noise)
        torch.testing.assert_close(y.double(), e * scale, atol=1e-6, rtol=1e-6)


def test_dropblock_invalid_centre_and_clamped_block():
    x = torch.ones(1, 1, 7, 7)
    noise = torch.ones(1, 1, 7, 7) * 0.999
    noise[0, 0, 0, 0] = 0.0       # (0, 0) is not a valid centre for r = 3
    y = F.dropblock(x, 0.2, 3, normalize="none", noise=noise)
    assert torch.equal(y, x)
    # block_size 9 on a 7 x 4 map: r = min(9, 7, 4) = 4, valid rows 2..5, cols 2..2
    x = torch.ones(1, 1, 7, 4)
    noise = torch.ones(1, 1, 7, 4) * 0.999
    noise[0, 0, 5, 2] = 0.0
    e = torch.ones(1, 1, 7, 4, dtype=torch.float64)
    e[0, 0, 3:7, 0:4] = 0
    _, w_ref = naive.naive_dropblock(x, noise, p=0.2, block_size=9, normalize="none")
    torch.testing.assert_close(w_ref, e)
    y = F.dropblock(x, 0.2, 9, normalize="none", noise=noise)
    torch.testing.assert_close(y.double(), e)


def test_zero_sum_normalisation_gives_zero_not_nan():
    """Everything dropped: batch / sample normalisation gives 0, never inf or NaN."""
    x = torch.randn(2, 2, 3, 3, generator=gen(0))
    noise = torch.zeros(2, 2, 3, 3)   # g = 0.5 with block 1: u = 0 seeds, u = .999 does not
    for normalize in NORMALIZE:
        y = F.dropblock(x, 0.5, 1, normalize=normalize, noise=noise)
        assert torch.equal(y, torch.zeros_like(y))
        _, w_ref = naive.naive_dropblock(x, noise, p=0.5, block_size=1, normalize=normalize)
        assert torch.equal(w_ref, torch.zeros_like(w_ref))
    # sample normalisation: one sample fully dropped, the other scaled on its own
    noise[1] = 0.999
    y = F.dropblock(x, 0.5, 1, normalize="sample", noise=noise)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    torch.testing.assert_close(y[1], x[1])
    y = F.dropblock(x, 0.5, 1, normalize="batch", noise=noise)
    torch.testing.assert_close(y[1], 2 * x[1])


# ------------------------------------------------------ identity, empty, non-finite

IDENTITY = {
    "corrdrop": (lambda x, **k: F.corrdrop(x, 0.0, 3, **k)),
    "dropblock": (lambda x, **k: F.dropblock(x, 0.0, 3, **k)),
    "attentiondrop": (lambda x, **k: F.attentiondrop(x, 0.0, **k)),
    "selectscale": (lambda x, **k: F.selectscale(x, 0.5, 1.0, **k)),
    "spatialscale": (lambda x, **k: F.spatialscale(x, 1.0, **k)),
    "selectout": (lambda x, **k: F.selectout(x, 0.5, 1.0, **k)),
    "camdrop": (lambda x, **k: F.camdrop(x, torch.randn(3, x.shape[1]),
                                         torch.zeros(x.shape[0], dtype=torch.long), 3, 1.0,
                                         **k)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eval_is_identity(case):
    x = rand_x((2, 3, 6, 5))
    noise = make_noise(case, x, 0)
    pkg, _ = call_pair(case, x, noise)
    assert pkg(x, training=False) is x
    xg = x.clone().requires_grad_()
    assert pkg(xg, training=False) is xg


@pytest.mark.parametrize("name", list(IDENTITY))
def test_rate_zero_is_identity(name):
    x = rand_x((2, 3, 6, 5))
    assert IDENTITY[name](x) is x
    xg = x.clone().requires_grad_()
    assert IDENTITY[name](xg) is xg


EMPTY_SHAPES = [(0, 3, 5, 5), (2, 0, 5, 5), (2, 3, 0, 5), (2, 3, 5, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_empty(case, shape):
    x = torch.randn(shape)
    op, _, params, _, _ = CASES[case]
    if layer_name(case) == "camdrop":
        c = shape[1]
        y = op(x, torch.randn(3, 2 * c if c else 4), torch.zeros(shape[0], dtype=torch.long),
               **params)
    else:
        y = op(x, **params)
    assert y.shape == x.shape and y.dtype == x.dtype and y.numel() == 0


@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_inputs_do_not_crash(case):
    x = rand_x((2, 4, 7, 6))
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 2, 4, 4] = float("-inf")
    op, _, params, nkw, _ = CASES[case]
    noise = rand_noise(naive.noise_shape(layer_name(case), x.shape,
                                         block_size=params.get("block_size", 7), **nkw), 0)
    pkg, _ = call_pair(case, x, noise)
    for y in (pkg(x), pkg(x.clone().requires_grad_())):
        assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    if layer_name(case) != "camdrop":
        assert op(x, **params).shape == x.shape   # the noise=None path as well


def test_nonfinite_propagate_to_kept_units():
    """DropBlock's mask does not depend on x: NaN/Inf stay where the unit is kept."""
    x = rand_x((2, 3, 7, 7))
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, 6, 6] = float("inf")
    noise = torch.ones(2, 3, 7, 7) * 0.999
    noise[0, 1, 3, 3] = 0.0
    y = F.dropblock(x, 0.3, 3, normalize="none", noise=noise)
    _, w_ref = naive.naive_dropblock(x, noise, p=0.3, block_size=3, normalize="none")
    assert math.isnan(y[0, 0, 0, 0]) and y[1, 2, 6, 6] == float("inf")
    finite = torch.isfinite(x)
    torch.testing.assert_close(y[finite].double(), (x.double() * w_ref)[finite])


# ------------------------------------------------------------------ statistics


def _dropblock_expected_fraction(p, r, h, w):
    """E[fraction dropped] = mean over units of 1 - (1 - g)^(#valid centres covering it)."""
    g = float(torch.tensor(naive.seed_rate(p, r, h, w), dtype=torch.float32))

    def cover(i, size):
        return sum(1 for s in range(size - r + 1) if s <= i <= s + r - 1)
    tot = sum(1 - (1 - g) ** (cover(i, h) * cover(j, w)) for i in range(h) for j in range(w))
    return tot / (h * w)


def test_corrdrop_drops_p():
    """p = 0.2, 28 x 28 maps, k = 7 (whole blocks): E[dropped fraction] = p exactly when
    p̂ < 1; binomial tolerance from the 256 * 16 block draws."""
    torch.manual_seed(0)
    x = torch.randn(256, 4, 28, 28)
    p = 0.2
    y = F.corrdrop(x, p, 7, normalize="none")
    dropped = (y == 0).float()
    frac = dropped.mean().item()
    blocks = 256 * 16
    sd = math.sqrt(p * (1 - p) / blocks)
    assert abs(frac - p) < 5 * sd, (frac, sd)
    # whole blocks, shared by channels
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))


def test_dropblock_drop_rate():
    """p = 0.2, 28 x 28, block 7: the dropped fraction matches the exact expectation (which
    is below p because blocks overlap) within 5 standard errors estimated from the maps."""
    torch.manual_seed(1)
    p = 0.2
    x = torch.randn(32, 16, 28, 28).abs() + 1
    y = F.dropblock(x, p, 7, normalize="none")
    per_map = (y == 0).double().mean(dim=(2, 3)).flatten()
    frac = per_map.mean().item()
    se = per_map.std().item() / math.sqrt(per_map.numel())
    expected = _dropblock_expected_fraction(p, 7, 28, 28)
    assert 0.15 < expected < p
    assert abs(frac - expected) < 5 * se, (frac, expected, se)
    # shared channels: the mask is the same for every channel
    y = F.dropblock(x, p, 7, shared_channels=True, normalize="none")
    z = y == 0
    assert torch.equal(z, z[:, :1].expand_as(z))
    per_sample = z[:, 0].double().mean(dim=(1, 2))
    se = per_sample.std().item() / math.sqrt(per_sample.numel())
    assert abs(per_sample.mean().item() - expected) < 5 * se, (per_sample.mean(), expected, se)


def test_attentiondrop_map_fraction():
    torch.manual_seed(2)
    alpha = 0.3
    x = torch.randn(64, 64, 5, 5)
    y = F.attentiondrop(x, alpha, 20.0, mode="am", normalize="none")
    hit = (y == 0).flatten(2).any(-1).double()
    sd = math.sqrt(alpha * (1 - alpha) / hit.numel())
    assert abs(hit.mean().item() - alpha) < 5 * sd


def test_selectout_drops_exactly_nd():
    torch.manual_seed(3)
    x = torch.randn(16, 10, 4, 4)
    y = F.selectout(x, 0.5, 0.7)
    dropped = (y == 0).flatten(2).all(-1).sum(1)
    assert dropped.tolist() == [3] * 16


SEEDED = {
    "corrdrop": lambda x, **k: F.corrdrop(x, 0.4, 3, **k),
    "selectscale": lambda x, **k: F.selectscale(x, 0.4, 0.1, **k),
    "spatialscale": lambda x, **k: F.spatialscale(x, 0.2, **k),
    "selectout": lambda x, **k: F.selectout(x, 0.6, 0.7, **k),
    "attentiondrop": lambda x, **k: F.attentiondrop(x, 0.5, 30.0, **k),
    "focused_dropout": lambda x, **k: F.focused_dropout(x, 0.3, 0.6, **k),
    "camdrop": lambda x, **k: F.camdrop(x, torch.ones(3, x.shape[1]) +
                                        torch.arange(x.shape[1]).float(),
                                        torch.zeros(x.shape[0], dtype=torch.long), 3, 0.5,
                                        channel_rate=0.5, **k),
    "dropblock": lambda x, **k: F.dropblock(x, 0.3, 3, **k),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_seed_and_generator_reproducible(name):
    op = SEEDED[name]
    x = rand_x((4, 6, 9, 9), seed=5)
    torch.manual_seed(123)
    a = op(x)
    torch.manual_seed(123)
    b = op(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    c = op(x, generator=gen(7))
    d = op(x, generator=gen(7))
    assert torch.equal(c, d)
    outs = {op(x, generator=gen(s)).sum().item() for s in range(6)}
    assert len(outs) > 1, "different seeds should give different outputs"
    # the explicit generator does not consume the default generator
    torch.manual_seed(123)
    op(x, generator=gen(7))
    assert torch.equal(op(x), a)


@pytest.mark.parametrize("name", list(SEEDED))
def test_random_path_is_a_valid_mask(name):
    """noise=None: the output is x * w with w of the layer's form (sanity, not exactness)."""
    x = rand_x((2, 4, 9, 9), seed=6)
    w = multiplier(lambda t: SEEDED[name](t, generator=gen(1)), x)
    y = SEEDED[name](x, generator=gen(1))
    torch.testing.assert_close(y, x * w)
    assert torch.isfinite(w).all() and (w >= 0).all()


@pytest.mark.parametrize("shape, k", [((1, 2, 1, 5000), 10**9), ((1, 2, 3, 4000), 1000),
                                      ((1, 2, 4000, 2), 7), ((2, 3, 10, 9), 4)])
def test_window_means_pad_less_than_a_window(shape, k, monkeypatch):
    """Eager, CorrDrop's window sums pad x by less than one window in each dimension (under
    2x the map): a thin map with a block as large as the map (k = max(H, W)) was padded to
    k x k (1 x 100000: 80 GB of float64; SPEC §1, no memory grows with block_size beyond the
    map). The means are each window's valid units' mean."""
    from guidedrop import reference as R
    x = rand_x(shape, seed=1).double()
    h, w = shape[2:]
    kk = R.one_window(k, h, w)
    hp, wp = R.pooled_size(h, w, kk)
    pad, padded = torch.nn.functional.pad, []
    monkeypatch.setattr(torch.nn.functional, "pad",
                        lambda t, *a, **kw: padded.append(pad(t, *a, **kw)) or padded[-1])
    a = R.window_means(x, kk, hp, wp)
    (ph, pw), window = padded[0].shape[-2:], (min(kk, h), min(kk, w))
    assert len(padded) == 1 and ph < h + window[0] and pw < w + window[1], (ph, pw)
    want = torch.stack([torch.stack([x[..., i * kk:(i + 1) * kk, j * kk:(j + 1) * kk].mean((-2, -1))
                                     for j in range(wp)], -1) for i in range(hp)], -2)
    torch.testing.assert_close(a, want)


def test_pooled_correlation_gram_in_blocks(monkeypatch):
    """Eager, the reference holds P (N, N', N') in blocks of at most GRAM_BLOCK elements (at
    block_size 1 on 56 x 56 maps, batch 128, the whole P was 10 GB and made several times),
    with the same F as in one block: zero rows (P_ii = 1), a NaN (its sample's F NaN), N'
    not a multiple of the block's side, rows above and below the diagonal mirrored."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from guidedrop import reference as R

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    x = rand_x((2, 3, 64, 64), seed=4)  # N' = 4096: P 2 x 4096^2 = 8 GRAM_BLOCKs
    x[0, :, :8, :8] = 0
    x[1, 2, 5, 7] = math.nan
    with Largest() as mode:
        f = R.pooled_correlation(x, 1)
    assert mode.numel <= R.GRAM_BLOCK, mode.numel
    assert f[1].isnan().all() and not f[0].isnan().any()
    small = rand_x((3, 5, 23, 17), seed=5)
    small[1, :, :3, :] = 0
    whole = R.pooled_correlation(small, 2)
    monkeypatch.setattr(R, "GRAM_BLOCK", 3 * 7**2)  # blocks of 7 x 7 rows: N' = 108
    assert torch.equal(R.pooled_correlation(small, 2), whole)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12),
       k=st.integers(1, 14), density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       seed=st.integers(0, 2**16))
def test_compiled_forms_of_windows_and_blocks(n, c, h, w, k, density, seed):
    """Under torch.compile the reference sums CorrDrop's one window (a map within the block)
    with sum() and counts DropBlock's blocks by prefix sums (symbolic block sizes: one graph
    below the block); eager, avg_pool2d and shifted ORs. Both forms agree exactly: blocks
    larger than the map, ties (bfloat16 values), signed zeros, values of mixed magnitudes
    (exact float64 sums)."""
    from guidedrop import reference as R
    g = gen(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2.0 ** torch.randint(-8, 9, (n, c, h, w),
                                                                       generator=g))
    x = x.bfloat16().double()
    seeds = torch.rand(n, c, h, w, generator=g) < density
    kk = R.one_window(k, h, w)
    hp, wp = -(-h // kk), -(-w // kk)
    r = min(k, h, w)
    eager = (R.window_means(x, kk, hp, wp), R.expand_seeds(seeds, r))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled = (R.window_means(x, kk, hp, wp), R.expand_seeds(seeds, r))
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
