"""AttentionDrop's and DropBlock's CUDA plan kernels (csrc/cuda/plans/, issue 12), run on the
CPU SIMT emulator, against the reference plan (the torch code of ``layers.<layer>`` on
``guidedrop.reference``) with explicit noise.

AttentionDrop: gamma, the per-map threshold, min, max and the scale bit for bit (the soft
mask's per-map sums are exact float64 sums: backend_contract.md).
DropBlock: the packed seeds and the scale bit for bit (integer counts, then the reference's
float64 arithmetic). Without noise, DropBlock draws Philox in the seed kernel: compared
with the torch code on the same (emulated) CUDA primitives and generator state.
"""

from __future__ import annotations

import math

import pytest
import test_cuda_emulated as CE
import torch
from test_plans_attentiondrop import scale_rounding_case
from testing import assert_same, assert_same_plan, emulated, make_x

from guidedrop import layers as L
from guidedrop import reference as R

pytestmark = [emulated, pytest.mark.skipif(bool(CE.emu.unavailable()),
                                           reason=f"CUDA emulator: {CE.emu.unavailable()}")]

NORMALIZE = ["batch", "sample", "none"]


def _pairs(a, b, default):
    """Every (a, b) pair; those not in `default` are marked slow (the full sweep)."""
    return [pytest.param(i, j, marks=() if (i, j) in default else pytest.mark.slow)
            for i in a for j in b]


@pytest.fixture(scope="module")
def B():
    """python/guidedrop/cuda_backend.py on the emulated ops (plan_<layer> included)."""
    return CE.emu.backend()


# --------------------------------------------------------------------------- AttentionDrop


def _att_noise(n, c, alpha, seed):
    """Uniforms with every third exactly at alpha (rounded to float32): those maps stay
    inactive (u < alpha is strict)."""
    u = torch.rand((n, c), generator=torch.Generator().manual_seed(seed))
    u.view(-1)[::3] = torch.tensor(alpha, dtype=torch.float32)
    return u


def check_att(B, x, alpha, beta, mode, normalize, u):
    kw = dict(mode=mode, normalize=normalize, noise=u)
    want = L.attentiondrop(R, x, alpha, beta, **kw)
    got = L.attentiondrop(B, x, alpha, beta, **kw)
    assert_same_plan(got, want)
    return got


@pytest.mark.parametrize("mode,normalize", _pairs(
    ["ad", "sm", "am"], NORMALIZE, {("ad", "batch"), ("sm", "sample"), ("am", "none")}))
@pytest.mark.parametrize("shape,dtype,layout", [
    ((1, 1, 1, 1), torch.float32, "contiguous"),
    ((2, 5, 7, 9), torch.float32, "channels_last"),
    ((3, 4, 6, 5), torch.bfloat16, "sliced"),
    ((2, 3, 5, 5), torch.float16, "contiguous"),
    ((1, 6, 1, 4), torch.float16, "channels_last"),
])
def test_attentiondrop_plan_matches_reference(B, shape, dtype, layout, mode, normalize):
    torch.manual_seed(sum(shape))
    x = make_x(shape, dtype, "cpu", layout)
    got = check_att(B, x, 0.5, 20.0, mode, normalize, _att_noise(*shape[:2], 0.5, sum(shape)))
    assert not got.state[1].view(-1)[::3].any()  # active; u == alpha: inactive


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1 / 3, 1.0])
def test_attentiondrop_ties_nonfinite_and_noise_dtypes(B, alpha):
    x = (torch.randn(2, 6, 5, 7) * 2).round() / 2  # many ties
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[1, 3, 4, 6] = math.inf, -math.inf, math.nan
    x[0, 4] = math.nan  # a whole map of NaN
    for dt in (torch.float64, torch.float16, torch.bfloat16, torch.float32):
        u = _att_noise(2, 6, alpha, 7).to(dt)
        u[1, 5] = math.nan  # NaN noise: never < alpha
        for mode, normalize in zip(("ad", "sm", "am"), NORMALIZE, strict=True):
            check_att(B, x, alpha, 35.0, mode, normalize, u)
    # non-contiguous noise
    u = _att_noise(6, 2, alpha, 8).t()
    check_att(B, x, alpha, 50.0, "ad", "sample", u)


def test_attentiondrop_noise_none_draws_like_the_reference(B):
    x = torch.randn(2, 4, 6, 6)
    kw = dict(mode="ad", normalize="batch")
    want = L.attentiondrop(R, x, 0.5, 20.0, **kw, generator=torch.Generator().manual_seed(3))
    got = L.attentiondrop(B, x, 0.5, 20.0, **kw, generator=torch.Generator().manual_seed(3))
    assert_same_plan(got, want)


def test_attentiondrop_rate_tensor_equals_rate_float(B):
    """The traced form (alpha a 0-dim float32 tensor read in the kernel) gives the eager
    form's plan (alpha a float argument)."""
    E = CE.emu.ops()
    x = torch.randn(3, 5, 4, 6)
    u = _att_noise(3, 5, 0.3, 1)
    eager = E.attentiondrop_plan(x, u, None, 0.3, 5, "sm", "batch")
    traced = E.attentiondrop_plan(x, u, L._rate(0.3, x), 0.0, 5, "sm", "batch")
    for a, b in zip(eager, traced, strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("normalize", ["sample", "batch"])
def test_attentiondrop_scale_rounds_as_the_reference(B, normalize):
    """A kept weight where one float64 division rounds otherwise than the reference's
    reciprocal(kept) * units (test_plans_attentiondrop.scale_rounding_case)."""
    x = scale_rounding_case()
    check_att(B, x, 0.5, 20.0, "sm", normalize, torch.zeros(1, x.shape[1]))

# --------------------------------------------------------------------------- DropBlock


def _db_noise(shape, g, seed, dtype=torch.float32):
    """Uniforms with some exactly at g (rounded to float32, as the kernels compare) and
    some NaN: neither is a seed."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    flat = u.view(-1)
    flat[::5] = torch.tensor(g, dtype=torch.float32)
    flat[3::11] = math.nan
    return u.to(dtype)


def check_db(B, x, p, k, shared, normalize, u):
    kw = dict(shared_channels=shared, normalize=normalize, noise=u)
    want = L.dropblock(R, x, p, k, **kw)
    got = L.dropblock(B, x, p, k, **kw)
    assert_same_plan(got, want)
    return got


@pytest.mark.parametrize("shared,normalize", _pairs(
    [False, True], NORMALIZE,
    {(False, "batch"), (True, "sample"), (True, "batch"), (False, "none")}))
@pytest.mark.parametrize("shape,dtype,layout,k", [
    ((1, 1, 1, 1), torch.float32, "contiguous", 3),
    ((2, 3, 7, 5), torch.float32, "channels_last", 3),
    ((3, 2, 6, 9), torch.bfloat16, "sliced", 2),
    ((2, 4, 5, 5), torch.float16, "contiguous", 7),  # block larger than the map
    ((3, 4, 9, 11), torch.float32, "contiguous", 3),  # several blocks per sample
])
def test_dropblock_plan_matches_reference(B, shape, dtype, layout, k, shared, normalize):
    n, c, h, w = shape
    x = make_x(shape, dtype, "cpu", layout)
    r = min(k, h, w)
    p = 0.3
    g = L._seed_rate(p, r, h, w)
    u = _db_noise((n, 1 if shared else c, h, w), min(g, 1.0), sum(shape))
    got = check_db(B, x, p, k, shared, normalize, u)
    assert got.state[1].dtype == torch.float32


def test_dropblock_noise_dtypes_layouts_and_extremes(B):
    x = torch.randn(2, 3, 6, 7)
    g = L._seed_rate(0.2, 3, 6, 7)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        for normalize in NORMALIZE:
            check_db(B, x, 0.2, 3, False, normalize, _db_noise((2, 3, 6, 7), g, 1, dt))
    u = _db_noise((2, 7, 6, 3), g, 2).permute(0, 3, 2, 1)  # non-contiguous noise
    check_db(B, x, 0.2, 3, False, "batch", u)
    # Everything dropped (kept 0: scale 0) and nothing dropped (scale 1).
    for u in (torch.zeros(2, 3, 6, 7), torch.ones(2, 3, 6, 7)):
        for normalize in NORMALIZE:
            check_db(B, x, 0.9, 3, False, normalize, u)
            check_db(B, x, 0.9, 3, True, normalize, u[:, :1])


@pytest.mark.parametrize("shared", [False, True])
def test_dropblock_noise_none_draws_philox_like_the_torch_code(B, shared):
    """Without noise both draw Philox in the seed kernel: the plan kernel and the torch
    code on the same emulated primitives, from the same generator state, agree exactly."""
    E = CE.emu.ops()
    x = torch.randn(3, 4, 9, 10)
    kw = dict(shared_channels=shared, normalize="batch")
    E.emu_set_philox(1234, 8)
    want = L.dropblock.reference(B, x, 0.25, 3, **kw)
    E.emu_set_philox(1234, 8)
    got = L.dropblock(B, x, 0.25, 3, **kw)
    assert_same_plan(got, want)
    assert got.state[0].any()


def test_dropblock_rate_tensor_equals_rate_float():
    E = CE.emu.ops()
    x = torch.randn(2, 3, 7, 8)
    u = _db_noise((2, 3, 7, 8), 0.05, 3)
    g = L._seed_rate(0.3, 3, 7, 8)
    eager = E.seeds_plan(x, u, None, None, [2, 3, 7, 8], None, g, 3, 3, "sample")
    traced = E.seeds_plan(x, u, None, None, [2, 3, 7, 8], L._rate(g, x), 0.0, 3, 3, "sample")
    for a, b in zip(eager, traced, strict=True):
        assert_same(a, b)


def test_plan_ops_opcheck(B):
    """Schemas (functional) and fake kernels of the two plan ops."""
    assert callable(B.plan_attentiondrop) and callable(B.plan_dropblock)  # what layers calls
    E = CE.emu.ops()
    x = make_x((2, 3, 5, 6), torch.float16, "cpu", "channels_last")
    u = _att_noise(2, 3, 0.5, 0)
    torch.library.opcheck(E.attentiondrop_plan, (x, u, None, 0.5, 4, "ad", "batch"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(E.attentiondrop_plan, (x, u, L._rate(0.5, x), 0.0, 4, "am", "none"),
                          test_utils=("test_schema", "test_faketensor"))
    nz = _db_noise((2, 1, 5, 6), 0.1, 0)
    torch.library.opcheck(E.seeds_plan, (x, nz, None, None, [2, 1, 5, 6], None, 0.1, 3, 3,
                                         "batch"), test_utils=("test_schema", "test_faketensor"))
