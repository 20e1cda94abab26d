"""The kernel backends (Triton, and CUDA when built) against ``guidedrop.reference``.

Every primitive of ``python/guidedrop/backend_contract.md`` on awkward inputs (odd
shapes, N = 1, C = 1, 1 x 1 maps, H != W, every dtype, contiguous / channels_last /
sliced): exact agreement for masks, bits, counts, thresholds, maxima, minima and every
apply (the same float32 operations in the same order), float tolerance for sums, means
and correlations. Every layer with ``GUIDEDROP_BACKEND`` forced: the same output and
gradient as the reference with explicit noise, seeded reproducibility and drop rates
with ``noise=None``, and the bytes autograd keeps for backward.

Without a GPU the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``
(tests/conftest.py), which costs ~10 ms per program instance: the shapes here are small.
Tests marked ``gpu`` take full-size shapes and need CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
import sys
import threading

import naive
import pytest
import torch
from testing import (
    DEV,
    HAS_CUDA,
    assert_same,
    load_backend,
    make_x,
    nonfinite_beside_zero_rows,
    permuted_rows,
    radix_maps16,
    radix_rows,
    slow_without_gpu,
    tol,
)

import guidedrop.functional as F
from guidedrop import reference as R

BACKENDS = ["triton", "cuda"]  # "cuda": on a GPU only (the emulated tests are elsewhere)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(params=BACKENDS)
def B(request):
    return load_backend(request.param, emulate=False)


@pytest.fixture(params=BACKENDS)
def backend_name(request, monkeypatch):
    """Forces GUIDEDROP_BACKEND for the layer tests (after checking it can run)."""
    load_backend(request.param, emulate=False)
    monkeypatch.setenv("GUIDEDROP_BACKEND", request.param)
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def x_device() -> torch.device:
    return torch.device(DEV)


def rand(shape, seed: int) -> torch.Tensor:
    """Uniforms drawn on the CPU (the same on every device), moved to DEV."""
    return torch.rand(shape, generator=gen(seed)).to(DEV)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype=torch.float32, scale=1.0) -> None:
    t = tol(dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               rtol=t["rtol"], atol=t["atol"] * scale, equal_nan=True)


# Awkward shapes: 1 x 1 maps, C = 1, N = 1, H != W, odd sides. Every shape in float32 and
# every layout; half precisions on two shapes (the interpreter is slow).
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 9, 9), (3, 1, 13, 6), (2, 5, 15, 15)]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
COMBOS = [(s, torch.float32, lay) for s in SHAPES for lay in LAYOUTS] + [
    (s, dt, lay) for s in [(2, 3, 5, 7), (2, 5, 15, 15)]
    for dt in (torch.float16, torch.bfloat16) for lay in LAYOUTS]


def combo_id(c) -> str:
    shape, dt, lay = c
    return f"{'x'.join(map(str, shape))}-{str(dt)[6:]}-{lay}"


# The default run takes every shape, layout and dtype at least once (and every layout with
# an odd shape and with a half precision); the whole matrix is marked slow (.ci/run's slow
# stage), since the interpreter pays ~10 ms per program instance.
DEFAULT_COMBOS = {"1x1x1x1-float32-contiguous", "2x3x5x7-float32-contiguous",
                  "2x3x5x7-float32-channels_last", "2x3x5x7-float32-sliced",
                  "1x4x9x9-float32-sliced", "3x1x13x6-float32-channels_last",
                  "2x5x15x15-float32-contiguous", "2x3x5x7-float16-channels_last",
                  "2x5x15x15-bfloat16-sliced"}
COMBO_PARAMS = [pytest.param(c, id=combo_id(c),
                             marks=() if combo_id(c) in DEFAULT_COMBOS else pytest.mark.slow)
                for c in COMBOS]
assert len(DEFAULT_COMBOS & {p.id for p in COMBO_PARAMS}) == len(DEFAULT_COMBOS)


@pytest.fixture(params=["histograms", "bits"])
def select_path(request, B, monkeypatch):
    """The Triton select's two ways to a row's k-th largest in registers: histograms
    (Triton 3.8 on) and a bit a step (_select_by_bits: before 3.8, HISTOGRAM_BALLOTS), both
    under the interpreter of a Triton that takes histograms; the other backends run once."""
    if B.name != "triton":
        if request.param == "bits":
            pytest.skip("the Triton select's path")
        return request.param
    import triton

    from guidedrop.triton_kernels import _common
    from guidedrop.triton_kernels import percentile_threshold as pt
    taken = "bits" if pt.HISTOGRAM_BALLOTS else "histograms"
    if request.param != taken and (not _common.INTERPRET or pt.HISTOGRAM_BALLOTS):
        # Only the path this Triton takes, but for the bits path under the interpreter of a
        # Triton that takes histograms (the GPU machine's Triton 3.6 takes bits; CI runs
        # these tests with it too). Compiled, the other path never runs, and Triton 3.6
        # takes 15-40 s (the development CPU) to compile each row-lane histogram select
        # (tl.histogram as ballots), about a hundred of them here; CI compiles each path for
        # sm_90 with the Triton that takes it (tests/test_static_perf.py).
        how = "interpreted" if _common.INTERPRET else "compiled"
        pytest.skip(f"{how}, Triton {triton.__version__} takes the {taken} path")
    monkeypatch.setattr(pt, "HISTOGRAM_BALLOTS", request.param == "bits")
    return request.param


@pytest.fixture(params=["lanes-last", "lanes-first"])
def lanes_first(request, B, monkeypatch):
    """The Triton apply_attention tiles' two orders of axes (percentile_threshold.LANES_FIRST:
    the one each Triton version compiles best); the other backends run once."""
    first = request.param == "lanes-first"
    if B.name != "triton":
        if first:
            pytest.skip("the Triton tiles' order of axes")
        return first
    from guidedrop.triton_kernels import percentile_threshold as pt
    monkeypatch.setattr(pt, "LANES_FIRST", first)
    return first


@pytest.fixture(params=COMBO_PARAMS)
def x(request):
    shape, dtype, layout = request.param
    torch.manual_seed(sum(shape) + len(layout))
    return make_x(shape, dtype, DEV, layout)


def with_ties(x: torch.Tensor) -> torch.Tensor:
    """x rounded to a few values (many ties), same layout."""
    return (x.float() * 2).round().clamp(-3, 3).to(x.dtype) / 2


# ------------------------------------------------------------------ backend module


def test_triton_module_contract():
    mod = load_backend("triton")
    assert mod.name == "triton"
    for fn in ("pooled_correlation", "channel_stats", "kth_largest", "map_threshold",
               "attention_stats", "cam", "seed_bits", "seed_coverage", "apply_channel",
               "apply_block", "apply_seeds", "apply_attention", "unavailable", "unsupported"):
        assert callable(getattr(mod, fn)), fn
    assert mod.unavailable() == ""
    assert mod.unsupported(torch.zeros(1, 1, 1, 1, dtype=torch.float64, device=DEV))
    assert mod.unsupported(torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=DEV))
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert mod.unsupported(torch.zeros(1, 1, 1, 1, dtype=dt, device=DEV)) == ""


# ------------------------------------------------------------------ statistics


def test_channel_stats(B, x):
    amax, mean = B.channel_stats(x)
    ramax, rmean = R.channel_stats(x)
    assert_same(amax, ramax)
    close(mean, rmean, scale=10)


def test_map_threshold(B, x):
    h, w = x.shape[-2:]
    for xx in (x, with_ties(x)):
        for k in sorted({1, max(1, h * w // 3), h * w}):
            assert_same(B.map_threshold(xx, k), R.map_threshold(xx, k))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 64), (2, 1000)], ids=str)
def test_kth_largest(B, shape):
    torch.manual_seed(shape[1])
    v = torch.randn(shape).to(DEV)
    v[:, : shape[1] // 4] = v[:, :1]  # ties
    for vv in (v, v.t().contiguous().t(), -v.abs()):  # strided rows; all negative
        for k in sorted({1, shape[1] // 4 + 1, shape[1]}):
            assert_same(B.kth_largest(vv, k), R.kth_largest(vv, k))


def test_kth_largest_long_rows(B):
    """Rows longer than a program keeps in registers: chunked counting passes."""
    v = torch.randn(2, 20000, generator=gen(1)).to(DEV)
    v[1, 100:200] = v[1, 7]
    assert_same(B.kth_largest(v, 150), R.kth_largest(v, 150))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("length", [1, 3, 7, 300, 3000, 16385,
                                    pytest.param(40000, marks=pytest.mark.slow)])
def test_kth_largest_every_digit(B, select_path, length):
    """Exact k-th largest where the rows differ in one digit only, with ties, ±0, ±Inf,
    NaN: short rows (4-bit digits under 1024, several rows per program, 24 rows: a program
    partly filled; 8-bit digits at 3000) and rows over
    MAX_ROW = 16384 (read twice, candidates packed in a workspace)."""
    v = radix_rows(length, DEV)
    if length <= 300:
        v = torch.cat([v, v.flip(1), v[:, :length // 2 + 1].repeat(1, 2)[:, :length]])
    ks = {1, 2, length // 3 + 1, length - 1, length} if length <= 3000 else {1, 1000, length}
    for k in sorted(k for k in ks if 1 <= k <= length):
        assert_same(B.kth_largest(v, k), R.kth_largest(v, k))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hw", [(7, 7), (15, 20), (50, 60),
                                pytest.param((130, 131), marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_map_threshold_16bit_keys(name, dtype, hw):
    """16-bit maps: the select's passes cover only the key bits the dtype sets (4-bit digits
    at 7 x 7 and 15 x 20, 8-bit at 50 x 60, rows read twice at 130 x 131) and fill the
    bits below, ones where the threshold is negative."""
    B = load_backend(name, emulate=False)
    x = radix_maps16(hw, dtype, DEV)
    n = hw[0] * hw[1]
    for k in (1, 2, n // 3 + 1, n - 1, n):
        assert_same(B.map_threshold(x, k), R.map_threshold(x, k))
    active = torch.ones(x.shape[:2], dtype=torch.bool, device=DEV)
    got, want = B.attention_stats(x, n // 5 + 1, active, "ad"), R.attention_stats(
        x, n // 5 + 1, active, "ad")
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_attention_stats_long_maps(B, layout):
    """Maps over MAX_ROW (130 x 130), bf16, some inactive; a map of ties, one with
    ±Inf / NaN: thr, min, max and the soft mask's sum (exact: backend_contract.md)."""
    x = make_x((1, 4, 130, 130), torch.bfloat16, DEV, layout).clone()
    x[0, 1] = with_ties(x[0, 1])
    x[0, 3, 5, 5], x[0, 3, 9, 9] = float("inf"), -float("inf")
    x[0, 2, 7, 7] = float("nan")
    active = torch.tensor([[True, True, False, True]], device=DEV)
    for mode, k in (("am", 1), ("sm", 5071), ("ad", 130 * 130)):
        got = B.attention_stats(x, k, active, mode)
        ref = R.attention_stats(x, k, active, mode)
        for g, r in zip(got, ref, strict=True):
            assert_same(g[active], r[active])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
def test_attention_stats_long_maps_of_one_sign(B):
    """Maps over MAX_ROW (130 x 130, not a multiple of the chunk) all negative or all
    positive: the chunked min and max must ignore the last chunk's positions past the map
    (loaded as 0.0), or a negative map's max (a positive map's min) becomes 0 and so do
    its thresholds' r = 1 / (max - min) and the soft mask's sum."""
    x = make_x((1, 2, 130, 130), torch.float32, DEV).abs() + 0.5
    x[0, 0] = -x[0, 0]
    active = torch.ones(1, 2, dtype=torch.bool, device=DEV)
    for mode, k in (("sm", 5071), ("ad", 130)):
        got = B.attention_stats(x, k, active, mode)
        ref = R.attention_stats(x, k, active, mode)
        for g, r in zip(got, ref, strict=True):
            assert_same(g, r)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
def test_statistics_nan_inf(B):
    x = make_x((2, 3, 6, 5), torch.float32, DEV).clone()
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    x[1, 2, 0, 0] = -float("inf")
    assert_same(B.channel_stats(x)[0], R.channel_stats(x)[0])
    for k in (1, 4, 30):
        assert_same(B.map_threshold(x, k), R.map_threshold(x, k))
    active = torch.ones(2, 3, dtype=torch.bool, device=DEV)
    thr, mn, r, _ = B.attention_stats(x, 4, active, "ad")
    rthr, rmn, rr, _ = R.attention_stats(x, 4, active, "ad")
    assert_same(thr, rthr)
    assert_same(mn, rmn)
    assert_same(r, rr)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_select_signed_zeros(B, select_path, dtype):
    """-0.0 ranks below +0.0 (reference.order_key, the kernels' keys): the k-th largest, min
    and max of maps of mixed zeros are the same bits whatever the elements' order (torch's
    topk and amin return either zero of a tie, by position), so r too (1/(+0 - -0) = +Inf,
    1/(-0 - +0) = -Inf)."""
    z = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.0, -0.0, -0.0])
    maps = torch.stack([z, z.flip(0), z.roll(3), z.abs(), -z.abs(), z[[1, 0, 3, 2, 8, 7, 6, 5, 4]],
                        torch.tensor([0.0, -0.0] * 4 + [0.0]), torch.tensor([-0.0, 0.0] * 4
                                                                           + [-0.0])])
    x = maps.view(1, -1, 3, 3).to(dtype).to(DEV)
    active = torch.ones(x.shape[:2], dtype=torch.bool, device=DEV)

    for k in range(1, 10):
        want = R.map_threshold(x, k)
        assert_same(B.map_threshold(x, k), want)
        assert_same(R.map_threshold(x.flip(-1), k), want)  # the reference: order-free
        for g, r in zip(B.attention_stats(x, k, active, "ad"),
                        R.attention_stats(x, k, active, "ad"), strict=True):
            assert_same(g, r)
    _, mn, r, _ = R.attention_stats(x, 9, active, "sm")
    assert mn[0, 6].item() == 0 and mn[0, 6].signbit() and r[0, 6].item() == math.inf
    assert R.map_threshold(x, 1)[0, 4].signbit()  # -|z|: every zero is -0.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hw", [(7, 7), (14, 15), (50, 60)], ids=str)
def test_select_first_unit_special(B, select_path, dtype, hw):
    """Maps whose first unit is special (NaN, ±Inf, ±0, the map's max or min, a tie with
    the threshold): the Triton select pads a map's tile to a power of 2 with copies of its
    first unit and subtracts them from its histograms and soft-mask sum. Every map pads (49
    in 64, 210 in 256, 3000 in 4096); thr, min, r and the exact msum for every mode. The
    largest maps, a program each under the interpreter (seconds a call), take one sample:
    the first unit equal to the last in the ties' map."""
    n = hw[0] * hw[1]
    x = make_x((2, 8, *hw), torch.float32, DEV).clone()
    first = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 100.0, -100.0]
    for c, v in enumerate(first):
        x[:, c, 0, 0] = v
    x[:, 7] = x[:, 7].round()  # many ties, the first unit among them
    x[1, :, 0, 0] = x[1, :, -1, -1]  # the first unit equal to the last
    if n > 1024:
        x = torch.cat([x[:1, :7], x[1:, 7:]], 1)
    x = x.to(dtype)
    active = torch.ones(x.shape[:2], dtype=torch.bool, device=DEV)
    for k in (1, 2, n // 2, n - 1, n):
        assert_same(B.map_threshold(x, k), R.map_threshold(x, k))
        for mode in ("am", "sm", "ad"):
            for g, r in zip(B.attention_stats(x, k, active, mode),
                            R.attention_stats(x, k, active, mode), strict=True):
                assert_same(g, r)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw", [(7, 7), (5, 6)], ids=str)
def test_select_many_short_maps(B, select_path, dtype, layout, hw):
    """Programs of at least 32 maps of at most 64 units (the Triton select then gives each
    lane whole maps: _load_rows_on_lanes), 3 x 37 of them (a last program partly filled),
    in every layout: special first units, NaN, ±Inf, ±0 and ties, some maps inactive; the
    k-th largest, and thr, min, r and the exact msum of every mode, bit for bit."""
    n = hw[0] * hw[1]
    x = make_x((3, 37, *hw), torch.float32, DEV, layout)
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 100.0, -100.0]
    for c in range(0, 37, 3):
        x[c % 3, c, c % hw[0], c % hw[1]] = special[c % len(special)]
    x[1, 20:30] = x[1, 20:30].round()  # ties
    x[2, 5:9] = -x[2, 5:9].abs().round()  # ties at -0.0 and 0.0
    x = x.to(dtype)
    active = rand((3, 37), 7) < 0.7
    for k in (1, 2, n // 2, n - 1, n):
        assert_same(B.map_threshold(x, k), R.map_threshold(x, k))
        for mode in ("am", "sm", "ad"):
            for g, r in zip(B.attention_stats(x, k, active, mode),
                            R.attention_stats(x, k, active, mode), strict=True):
                assert_same(g[active], r[active])


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_attention_stats(B, x, mode):
    n, c, h, w = x.shape
    active = rand((n, c), 3) < 0.6
    active[0, 0] = True
    for xx in (x, with_ties(x)):
        k = max(1, math.ceil(0.3 * h * w))
        got = B.attention_stats(xx, k, active, mode)
        ref = R.attention_stats(xx, k, active, mode)
        for g, r in zip(got[:3], ref[:3], strict=True):  # thr, min, max: exact where active
            assert_same(g[active], r[active])
        close(got[3][active], ref[3][active], scale=10)  # sum of the soft mask


def test_cam(B, x):
    n, c = x.shape[:2]
    alpha = torch.randn(n, c, generator=gen(4)).to(DEV)
    close(B.cam(x, alpha), R.cam(x, alpha), scale=10 * math.sqrt(c))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cam_exact(B, layout):
    """J is the reference's bit for bit (products exact and sums in float64, rounded once to
    float32), not only within a tolerance: J's top-k decides CamDrop's spatial candidates
    (SPEC §1, §6), so products rounded to float32 first would move J by an ulp and the
    candidates where two J are close."""
    x = make_x((2, 9, 7, 10), torch.float32, DEV, layout)
    alpha = torch.randn(2, 9, generator=gen(12)).to(DEV)
    assert_same(B.cam(x, alpha), R.cam(x, alpha))


@pytest.mark.parametrize("c", [1, 2])
def test_cam_zero_is_positive(B, c):
    """A zero J is +0.0 on every backend and the reference, also where every term is -0.0
    (-0.0 x 1, 0.0 x -1; with C = 1 the reference's einsum is a plain product): -0.0 ranks
    below +0.0 in CamDrop's top-k, so the sign would change its candidates."""
    x = torch.tensor([-0.0, 0.0, -0.0, 1.0]).view(1, 1, 2, 2).repeat(1, c, 1, 1).to(DEV)
    alpha = torch.tensor([[1.0, -1.0][:c]]).to(DEV)
    want = torch.tensor([0.0, 0.0, 0.0, 1.0 if c == 1 else 0.0]).view(1, 2, 2)
    for j in (B.cam(x, alpha).cpu(), R.cam(x, alpha).cpu()):
        assert torch.equal(j, want) and not j.signbit().any(), j


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 9, 5, 6), (1, 3, 19, 19), (1, 2, 8, 10)],
                         ids=str)
def test_statistics_unaligned_maps(B, shape, dtype, monkeypatch):
    """Contiguous x whose maps do not start on 16 bytes (H * W * itemsize % 16 != 0; the
    last shape's do), x itself aligned or a view at element offset 1: Triton reads each map
    from its start rounded down to 16 bytes and on past its end, into the neighbouring
    maps. ±Inf and NaN at the first and last positions of maps must stay in their own map
    (channel_stats) and position (cam). For Triton also on tiles of 128 elements, so that
    a map spans several loop iterations (channel_stats) and programs (cam)."""
    import sys

    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1, generator=gen(5)).to(dtype).to(DEV)
    alpha = torch.randn(n, c, generator=gen(6)).to(DEV)
    tiles = [None]
    mods = [sys.modules.get(f"{B.__name__}.{m}") for m in ("channel_ranking", "class_activation")]
    if all(m is not None and hasattr(m, "TILE") for m in mods):
        tiles.append(128)
    for tile in tiles:
        if tile is not None:
            for m in mods:
                monkeypatch.setattr(m, "TILE", tile)
        for x in (flat[:-1].view(shape).clone(), flat[1:].view(shape)):
            # map 1 lies between a NaN (map 0's last) and a -Inf (map 2's first); the
            # tensor's last element is +Inf
            x[0, 0, 0, 0], x[0, 0, -1, -1] = float("inf"), float("nan")
            x.view(n * c, h * w)[2 % (n * c), 0] = -float("inf")
            x[-1, -1, -1, -1] = float("inf")
            amax, mean = B.channel_stats(x)
            ramax, rmean = R.channel_stats(x)
            assert_same(amax, ramax)
            close(mean, rmean, scale=10)
            close(B.cam(x, alpha), R.cam(x, alpha), scale=10 * math.sqrt(c))


@pytest.mark.parametrize("k", [2, 3])
def test_pooled_correlation(B, x, k):
    """F exactly the reference's: the window sums are float64 on every backend, exact in
    any order of the additions (float32 column sums differed in the last bit)."""
    assert_same(B.pooled_correlation(x, k), R.pooled_correlation(x, k))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_pooled_correlation_exact_float32_windows(B, layout, k):
    """float32 maps of a CNN's width: F exactly the reference's. With float32 window sums in
    another order than avg_pool2d's, 20 of the 32 F at k = 7 differed in the last bit."""
    x = make_x((2, 16, 28, 28), torch.float32, DEV, layout)
    assert_same(B.pooled_correlation(x, k), R.pooled_correlation(x, k))


def test_pooled_correlation_permuted_rows(B):
    """Rows of the same values in another channel order: F exactly equal, and equal to the
    reference's (float64 normalisation and dot products, each rounded to the 2^-32 grid)."""
    for c in (3, 4, 5, 8, 13, 40):
        for seed in range(5):
            x = permuted_rows(torch.rand(c, generator=gen(seed)), DEV)
            f = B.pooled_correlation(x, 1)
            assert (f == f.flatten()[0]).all(), (c, seed, f)
            assert_same(f, R.pooled_correlation(x, 1), f"c={c} seed={seed}")


def test_corrdrop_permuted_rows(backend_name, monkeypatch):
    """The attack's case: equal F give kappa = 0 everywhere, so every position drops at
    p_hat = 0.3 and a u1 of 0.65 keeps it; 1-ulp different F gave kappa 0 or 1, one kept
    position and p_hat = 0.4, so u1 = 0.65 dropped the three others."""
    x = permuted_rows(torch.tensor([0.2320304811, 0.4074228108, 0.7340787053, 0.5900934339]), DEV)
    noise = torch.full((2, 1, 1, 4), 0.5, device=DEV)
    noise[1] = 0.65
    y = F.corrdrop(x, 0.3, 1, normalize="none", noise=noise)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    assert_same(y, F.corrdrop(x, 0.3, 1, normalize="none", noise=noise), backend_name)
    assert (y == x).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_pooled_correlation_nonfinite_beside_zero_rows(B, dtype, channels_last):
    """A NaN or an Inf makes every F of its sample NaN, the zero rows' too, as in the
    reference; the other samples' F stay finite (and equal the reference's)."""
    for x, k in nonfinite_beside_zero_rows(dtype, DEV, channels_last):
        f, want = B.pooled_correlation(x, k), R.pooled_correlation(x, k)
        assert want[:2].isnan().all() and torch.isfinite(want[2]).all(), want
        close(f, want, scale=10)


@pytest.mark.parametrize("shape,k", [((1, 4, 32, 32), 1), ((2, 5, 15, 15), 7),
                                     ((1, 40, 6, 7), 1), ((2, 3, 4, 4), 5)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pooled_correlation_sizes(B, shape, k, layout):
    """N' = 1024 pooled positions (several Gram tiles), C over one channel chunk, N' = 1."""
    x = make_x(shape, torch.float32, DEV, layout)
    close(B.pooled_correlation(x, k), R.pooled_correlation(x, k), scale=10)
    z = torch.zeros_like(x)  # zero rows: P_ii = 1
    close(B.pooled_correlation(z, k), R.pooled_correlation(z, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((3, 3, 7, 7), 3), ((3, 3, 7, 7), 7), ((3, 4, 14, 14), 3),
                                     ((3, 4, 14, 14), 7), ((3, 2, 19, 19), 7), ((3, 5, 8, 10), 3)],
                         ids=str)
def test_pooled_correlation_unaligned_maps(B, shape, k, dtype):
    """Contiguous x whose maps and window rows do not start on 16 bytes (H * W * itemsize or
    W * itemsize % 16 != 0; the last shape's do), x itself aligned or a view at element
    offset 1: a kernel that reads a map or a row of windows from 16 bytes before it must
    pool only its own units. Sample 0 ends in a NaN and sample 2 starts with a -Inf (their
    F are NaN), so a read across samples turns sample 1's F NaN; in sample 1 each map
    starts and ends with a large value of its own sign, so a window that takes a unit of
    another map or row changes F by far more than the tolerance."""
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1, generator=gen(7)).to(dtype).to(DEV)
    for x in (flat[:-1].view(shape).clone(), flat[1:].view(shape)):
        spikes = torch.tensor([(-1.0) ** i * 50 * (i + 1) for i in range(c)]).to(dtype).to(DEV)
        x[1, :, 0, 0], x[1, :, -1, -1] = spikes, -spikes
        x[0, -1, -1, -1], x[2, 0, 0, 0] = float("nan"), -float("inf")
        f, want = B.pooled_correlation(x, k), R.pooled_correlation(x, k)
        assert f[[0, 2]].isnan().all() and torch.isfinite(f[1]).all(), f
        close(f, want, scale=10)


# ------------------------------------------------------------------ seeds


SEED_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 9, 17), (2, 4, 13, 8), (3, 2, 7, 16)]


@pytest.mark.parametrize("shape", SEED_SHAPES, ids=str)
@pytest.mark.parametrize("r", [1, 3, *slow_without_gpu(2, 5)])
def test_seed_bits_with_noise(B, shape, r):
    n, c, h, w = shape
    cand_s = rand((n, h, w), 1) < 0.7
    for cs in sorted({c, 1}):
        noise = rand((n, cs, h, w), 2)
        cand_c = rand((n, cs), 3) < 0.7
        for cands in [(None, None), (cand_s, None), (None, cand_c), (cand_s, cand_c)]:
            args = (0.3, r, *cands, (n, cs, h, w), x_device())
            assert_same(B.seed_bits(noise, None, *args), R.seed_bits(noise, None, *args))
        # a noise view with strides, and float16 noise (compared in float16, as torch does)
        wide = rand((n, cs, h, w + 3), 5)[..., 1:w + 1]
        args = (0.3, r, None, None, (n, cs, h, w), x_device())
        assert_same(B.seed_bits(wide, None, *args), R.seed_bits(wide, None, *args))
        half = noise.half()
        assert_same(B.seed_bits(half, None, *args), R.seed_bits(half, None, *args))


# Bytes whose bits run past their row into the next rows and maps: W not a multiple of 8,
# W < 7 (several rows per byte), H = 1 (several maps per byte), W = 1, a row of 9 bytes.
CARRY_SHAPES = [(2, 5, 2, 3), (1, 3, 1, 6), (3, 4, 3, 1), (2, 2, 3, 70), (1, 9, 4, 13)]


@pytest.mark.parametrize("small_tiles", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape", CARRY_SHAPES, ids=str)
def test_seed_bits_bytes_across_rows_and_maps(B, shape, small_tiles, monkeypatch):
    """The seed kernels step a byte's units from its first one (no division per unit),
    carrying into the next rows and maps: exact against the reference, with candidates and
    strided noise, Philox bits only at valid centres; for Triton also (slow: many
    interpreted programs) on tiles of 8 bytes (so that maps, rows and byte columns each
    span several programs) and on the int64 index path."""
    import sys

    n, c, h, w = shape
    bm = sys.modules.get(f"{B.__name__}.block_mask")
    passes = [False]
    if small_tiles:
        if bm is None or not hasattr(bm, "map_grid"):
            pytest.skip("Triton's launch geometry")
        monkeypatch.setattr(bm, "TILE", 64)
        passes.append(True)
    cand_s = rand((n, h, w), 1) < 0.8
    cand_c = rand((n, c), 2) < 0.8
    noise = rand((n, c, h, w + 2), 3)[..., 1:w + 1]
    # the small tiles multiply the interpreted programs: there an even and an odd r, and
    # the int64 pass with candidates only
    rs = (2, 3) if small_tiles else (1, 2, 3)
    for wide in passes:
        if wide:
            monkeypatch.setattr(bm, "needs_int64", lambda *ts: True)
        for r in rs:
            for cands in [(cand_s, cand_c)] + ([] if wide else [(None, None)]):
                args = (0.6, r, *cands, (n, c, h, w), x_device())
                bits = B.seed_bits(noise, None, *args)
                assert_same(bits, R.seed_bits(noise, None, *args))
                assert_same(B.seed_coverage(bits, r, c, h, w), R.seed_coverage(bits, r, c, h, w))
            philox = R.unpack_seeds(B.seed_bits(None, None, 1.0, r, None, None, (n, c, h, w),
                                                x_device()), c, h, w)
            assert torch.equal(philox, R.valid_centres(h, w, r, DEV).expand(n, c, h, w))


def test_seed_bits_philox(B):
    """noise=None: reproducible under torch.manual_seed and generator=, rate g, only at
    valid centres and candidates, zero padding bits."""
    shape, g, r = (2, 4, 32, 30), 0.2, 3
    n, c, h, w = shape
    dev = x_device()
    torch.manual_seed(5)
    a = B.seed_bits(None, None, g, r, None, None, shape, dev)
    torch.manual_seed(5)
    b = B.seed_bits(None, None, g, r, None, None, shape, dev)
    assert_same(a, b)
    gpu_gen = torch.Generator(device=dev)
    c1 = B.seed_bits(None, gpu_gen.manual_seed(3), g, r, None, None, shape, dev)
    c2 = B.seed_bits(None, gpu_gen.manual_seed(3), g, r, None, None, shape, dev)
    assert_same(c1, c2)
    assert not torch.equal(a, c1)
    seeds = R.unpack_seeds(a, c, h, w)
    assert torch.equal(R.pack_bits(seeds.flatten(1)), a)  # bits beyond C*H*W are 0
    valid = R.valid_centres(h, w, r, dev)
    assert not seeds[..., ~valid].any()
    m = valid.sum().item() * n * c
    frac = seeds.sum().item() / m
    assert abs(frac - g) < 5 * math.sqrt(g * (1 - g) / m), frac
    # candidates
    cand_s = rand((n, h, w), 6) < 0.5
    cand_c = rand((n, c), 7) < 0.5
    s = R.unpack_seeds(B.seed_bits(None, None, 0.9, r, cand_s, cand_c, shape, dev), c, h, w)
    assert not (s & ~(cand_s[:, None] & cand_c[:, :, None, None])).any()
    assert s.any()


def test_seed_bits_philox_independent(B):
    """noise=None at g = 1/2 with every unit a valid centre (r = 1): no two units share a
    uniform (a kernel's Philox counters overlapping, say). At every lag up to 16 (a byte's
    8 bits take two calls of four uniforms) and between the samples, both bits are set
    with probability 1/4, within 5 standard errors (about 0.025). Counters 2q + half
    written q + half (a byte's second call the next byte's first) give 0.375 at lag 4."""
    n, c, h, w = 2, 4, 32, 30
    torch.manual_seed(8)
    bits = B.seed_bits(None, None, 0.5, 1, None, None, (n, c, h, w), x_device())
    s = R.unpack_seeds(bits, c, h, w).flatten(1).double()
    flat = s.flatten()
    for d in range(1, 17):
        both = (flat[:-d] * flat[d:]).mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(3 / 16 / (flat.numel() - d)), (d, both)
    both = (s[0] * s[1]).mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(3 / 16 / s.shape[1]), both


@pytest.mark.parametrize("r", [1, 2, 3, 4, 5, 7, 9, 13])
def test_seed_coverage_and_apply_seeds(B, r):
    shape = (2, 3, 17, 21)
    n, c, h, w = shape
    for cs in (c, 1):
        noise = rand((n, cs, h, w), r)
        bits = R.seed_bits(noise, None, 0.04, r, None, None, (n, cs, h, w), noise.device)
        assert_same(B.seed_coverage(bits, r, cs, h, w), R.seed_coverage(bits, r, cs, h, w))
        xx = make_x(shape, torch.float32, DEV)
        scale = rand((n,), 8) + 0.5
        assert_same(B.apply_seeds(xx, bits, r, cs == 1, scale),
                    R.apply_seeds(xx, bits, r, cs == 1, scale))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 9, 13), (2, 2, 6, 10), (1, 3, 4, 4)],
                         ids=str)
@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_seeds_at_every_valid_centre(B, shape, r):
    """g = 1: a seed at every valid centre, the border ones included, in maps whose H*W is
    not a multiple of 8: the kernels read a row's bits as one string per sample, so a
    block must stop at its map's edge (and at the next map's first bit)."""
    n, c, h, w = shape
    for cs in (c, 1):
        bits = R.seed_bits(rand((n, cs, h, w), r), None, 1.0, r, None, None, (n, cs, h, w), DEV)
        seeds = R.unpack_seeds(bits, cs, h, w)
        assert seeds[..., R.valid_centres(h, w, r, DEV)].all()
        assert_same(B.seed_coverage(bits, r, cs, h, w), R.seed_coverage(bits, r, cs, h, w))
        assert (R.seed_coverage(bits, r, cs, h, w) == cs * h * w).all()
        xx = make_x(shape, torch.float32, DEV, "channels_last")
        one = torch.ones(n, device=DEV)
        assert_same(B.apply_seeds(xx, bits, r, cs == 1, one),
                    R.apply_seeds(xx, bits, r, cs == 1, one))
        # only the last valid centre of each map: its block ends at the map's last unit
        last = torch.zeros(n, cs, h, w, dtype=torch.bool, device=DEV)
        last[..., h - r + r // 2, w - r + r // 2] = True
        first = torch.zeros_like(last)
        first[..., r // 2, r // 2] = True
        for s in (last, first):
            b = R.pack_bits(s.flatten(1))
            assert_same(B.seed_coverage(b, r, cs, h, w), R.seed_coverage(b, r, cs, h, w))
            assert_same(B.apply_seeds(xx, b, r, cs == 1, one),
                        R.apply_seeds(xx, b, r, cs == 1, one))


@pytest.mark.parametrize("shape,r", [((1, 2, 60, 70), 53), ((1, 1, 50, 120), 49),
                                     ((1, 2, 30, 100), 25)], ids=str)
def test_seed_coverage_large_blocks(B, shape, r):
    """Blocks wider than one 48-offset piece of the byte expansion."""
    n, c, h, w = shape
    seeds = torch.zeros(shape, dtype=torch.bool)
    seeds[..., h // 2, w // 2] = True
    seeds[0, 0, r // 2, w - r + r // 2] = True
    bits = R.pack_bits(seeds.flatten(1)).to(DEV)
    assert_same(B.seed_coverage(bits, r, c, h, w), R.seed_coverage(bits, r, c, h, w))
    xx = make_x(shape, torch.float32, DEV)
    one = torch.ones(n, device=DEV)
    assert_same(B.apply_seeds(xx, bits, r, False, one), R.apply_seeds(xx, bits, r, False, one))


# ------------------------------------------------------------------ applies


def check_apply(out: torch.Tensor, ref: torch.Tensor, t: torch.Tensor) -> None:
    assert_same(out, ref)
    assert out.device == t.device
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)


def grad_like(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for grad_y with another layout than x (contiguous), and an expanded one."""
    g = torch.randn(x.shape, generator=gen(11)).to(device=x.device, dtype=x.dtype)
    return [g, g[:1, :1, :1, :1].expand(x.shape)]


def test_apply_channel(B, x):
    w = rand(x.shape[:2], 1)
    for t in [x, *grad_like(x)]:
        check_apply(B.apply_channel(t, w), R.apply_channel(t, w), t)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_apply_block(B, x, k):
    n, _, h, w = x.shape
    mask = (rand((n, -(-h // k), -(-w // k)), k) < 0.5).to(torch.uint8)
    scale = rand((n,), 2) * 3
    for t in [x, *grad_like(x)]:
        check_apply(B.apply_block(t, mask, k, scale), R.apply_block(t, mask, k, scale), t)


@pytest.mark.parametrize("r", [2, 3])  # r = 1 .. 13 and huge r: test_seed_coverage_*
def test_apply_seeds(B, x, r):
    n, c, h, w = x.shape
    scale = rand((n,), 3) + 0.5
    for cs in sorted({c, 1}):
        bits = R.seed_bits(rand((n, cs, h, w), r), None, 0.15, r, None, None,
                           (n, cs, h, w), x.device)
        for t in [x, *grad_like(x)]:
            check_apply(B.apply_seeds(t, bits, r, cs == 1, scale),
                        R.apply_seeds(t, bits, r, cs == 1, scale), t)


@pytest.mark.parametrize("shape", [(2, 8, 7, 7), (3, 16, 14, 14), (2, 4, 8, 8), (2, 8, 3, 3),
                                   (1, 8, 5, 9), (2, 24, 4, 6), (2, 3, 5, 7), (2, 8200, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_seeds_packed_mask(B, shape, dtype):
    """r = 1 applies any packed mask (the seeds plans' blocks, reference.seed_blocks): every
    bit random, the padding bits after a sample's last unit set too, one scale infinite
    (0 * inf: NaN where dropped, as the reference), in each layout; samples of whole bytes
    with maps of 8s (one byte per 8 elements), of other sizes (two bytes shifted, a group
    running into the next map) and under 7 positions (1 x 1: a tile's channels split with
    the largest magic multiplier), and C * H * W % 8 != 0 (the row tiles)."""
    n, c, h, w = shape
    scale = rand((n,), 4) * 3
    scale[-1] = float("inf")
    for cs in (c, 1):
        bits = torch.randint(0, 256, (n, -(-cs * h * w // 8)), generator=gen(cs),
                             dtype=torch.uint8).to(DEV)
        for layout in LAYOUTS:
            t = make_x(shape, dtype, DEV, layout)
            check_apply(B.apply_seeds(t, bits, 1, cs == 1, scale),
                        R.apply_seeds(t, bits, 1, cs == 1, scale), t)


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_apply_attention(B, x, mode):
    n, c, h, w = x.shape
    active = rand((n, c), 5) < 0.5
    k = max(1, math.ceil(0.2 * h * w))
    thr, mn, r, _ = R.attention_stats(x, k, active, mode)
    scale = rand((n,), 6) + 0.5
    for t in [x, *grad_like(x)]:  # forward (t is x) and backward (t = grad_y)
        st = R.attention_state(thr, mn, r, scale)
        check_apply(B.apply_attention(t, x, st, active, mode),
                    R.apply_attention(t, x, st, active, mode), t)


# Contiguous NCHW applies take a flat tile (triton_kernels._common.group_tile) of 16384
# elements under the interpreter: shapes of several tiles, with tiles that start inside a map
# (the magic-multiplier split of positions and channels), maps longer than a tile (its
# compare split, and many tiles per map), and more channels than a tile's maps (the
# compare split of channels), and whole tiles only (the unmasked EVEN kernels: 7 tiles);
# H * W a multiple of 8, of 4 only (a 16-byte bf16 group meets a map's end at its middle:
# the attention apply picks a map per half group) and odd.
FLAT_SHAPES = [(2, 70, 11, 13), (1, 2, 130, 130), (1, 400, 7, 7), (1, 256, 16, 28),
               (2, 45, 14, 14)]


@pytest.mark.parametrize("shape", FLAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_applies_flat_tiles(B, shape):
    x = make_x(shape, torch.bfloat16, DEV, "contiguous")
    n, c, h, w = shape
    scale = rand((n,), 2) * 3
    g = grad_like(x)[0]
    for t in (x, g):
        wc = rand((n, c), 1)
        assert_same(B.apply_channel(t, wc), R.apply_channel(t, wc))
        for k in (1, 3, 7):  # 7: the flat kernel's mask bytes per group (K >= V - 1)
            mask = (rand((n, -(-h // k), -(-w // k)), k) < 0.5).to(torch.uint8)
            assert_same(B.apply_block(t, mask, k, scale), R.apply_block(t, mask, k, scale))
    active = rand((n, c), 5) < 0.5
    scale[-1] = math.inf  # S * scale: NaN where S = 0
    check_attention_modes(B, x, (x, g), active, scale, max(1, h * w // 5))


def check_attention_modes(B, x, ts, active, scale, k):
    """apply_attention of each t in ts against the reference's, in every mode, the state
    from the reference's statistics (the k-th largest) and scale."""
    for mode in ("am", "sm", "ad"):
        thr, mn, r, _ = R.attention_stats(x, k, active, mode)
        st = R.attention_state(thr, mn, r, scale)
        for t in ts:
            assert_same(B.apply_attention(t, x, st, active, mode),
                        R.apply_attention(t, x, st, active, mode))


# Triton's flat AttentionDrop tile in groups of 4 vectors (U = 4) where groups of V elements
# would span two maps (H * W % V != 0) and samples are whole groups of 4 V (C * H * W %
# (4 V) == 0, so one scale per group), the map end anywhere in a group (7 x 7, 3 x 11: H * W
# = 33, just over a bf16 group) or at a multiple of 4 (14 x 14); float32 groups of 16. NaN
# in the inactive maps, whose x is never read, must change nothing.
QUAD_SHAPES = [(2, 32, 7, 7), (1, 32, 3, 11), (2, 16, 7, 7), (1, 96, 14, 14), (2, 32, 11, 13)]


@pytest.mark.parametrize("shape", QUAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_apply_attention_flat_groups(B, shape, dtype, lanes_first):
    n, c, h, w = shape
    active = rand((n, c), 5) < 0.5
    x = torch.where(active[:, :, None, None], make_x(shape, dtype, DEV, "contiguous"), math.nan)
    scale = rand((n,), 2) * 3
    scale[-1] = math.inf  # S * scale: NaN where S = 0
    check_attention_modes(B, x, (x, grad_like(x)[0]), active, scale, max(1, h * w // 5))


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_apply_attention_words_only_aligned(B, offset, lanes_first, monkeypatch):
    """bfloat16 t and x 2 bytes past a 4-byte boundary (offset 1) in the grouped flat tile:
    Triton reads them as int32 words ("sm", "ad") only where both start on 4 bytes (a word
    load of a 2-byte aligned address faults on a GPU; the interpreter would not show it);
    the reference's outputs either way."""
    shape = (2, 32, 7, 7)
    numel = math.prod(shape)

    def at_offset(v):
        buf = torch.empty(numel + 1, dtype=torch.bfloat16, device=DEV)
        return buf[offset:offset + numel].view(shape).copy_(v)

    x = at_offset(make_x(shape, torch.bfloat16, DEV, "contiguous"))
    g = at_offset(torch.randn(shape, generator=gen(4)).to(DEV, torch.bfloat16))
    words = []
    if B.__name__.endswith("triton_kernels"):
        import guidedrop.triton_kernels.percentile_threshold as PT
        real = PT.launch

        def spy(kernel):
            class Grid:
                def __getitem__(self, grid):
                    def run(*args, **kwargs):
                        words.append(kwargs.get("WORDS"))
                        return real(kernel)[grid](*args, **kwargs)
                    return run
            return Grid()
        monkeypatch.setattr(PT, "launch", spy)
    check_attention_modes(B, x, (x, g), rand(shape[:2], 6) < 0.5, rand((2,), 3) * 2, 9)
    if words:  # "am", "sm", "ad", each for t = x and t = g
        assert words == [False, False] + [offset == 0] * 4, words


# channels_last t, x and out: Triton's per-sample tile (_apply_attention_cl_kernel) of up to
# 64 channels (several channel tiles at C = 130), a tail of positions and of channels
# (C = 5, 70), channels fewer than a 16-byte vector (C = 3); x read per 16-byte vector where
# one of its maps is active: NaN in the inactive maps must change nothing.
CL_SHAPES = [(2, 130, 5, 7), (3, 5, 9, 4), (1, 70, 1, 1), (2, 3, 6, 6)]


@pytest.mark.parametrize("shape", CL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_apply_attention_channels_last(B, shape, dtype, lanes_first):
    n, c, h, w = shape
    x = make_x(shape, dtype, DEV, "channels_last")
    active = rand((n, c), 7) < 0.3
    x = torch.where(active[:, :, None, None], x, math.nan).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen(12)).to(DEV, dtype).contiguous(
        memory_format=torch.channels_last)
    scale = rand((n,), 8) * 2
    scale[-1] = math.inf
    check_attention_modes(B, x, (x, g), active, scale, max(1, h * w // 3))


def test_triton_apply_attention_checks_its_arguments():
    """The kernels index the state by map and read x where t is: other shapes, which would
    read past a buffer, and unknown modes are a ValueError, not a wrong result."""
    T = load_backend("triton")
    x = torch.randn(2, 3, 4, 4)
    active = torch.ones(2, 3, dtype=torch.bool)
    state = R.attention_state(*R.attention_stats(x, 3, active, "ad")[:3], torch.ones(2))
    bad = [(x, state[..., :3], active, "ad"), (x, state.flatten(0, 1), active, "ad"),
           (x, state, active[0], "ad"), (x[..., :3], state, active, "ad"),
           (x, state, active, "xx")]
    for xx, st, act, mode in bad:
        with pytest.raises(ValueError, match="apply_attention"):
            T.apply_attention(x, xx, st, act, mode)


# The flat tile's first map and sample (group_tile): n // d by a multiply-high, an add and a
# shift (triton_kernels._common.divisor / divide), for every int32 n >= 0 and d >= 1; the
# shapes above reach tile starts of a few 10**5 only. divisor's arithmetic:
# tests/test_numerics.py (hypothesis, which the GPU machine's venv of .ci/run lacks).
def triton_common():
    """The Triton backend's _common module (skips without the backend)."""
    import importlib
    return importlib.import_module(f"{load_backend('triton').__name__}._common")


try:  # a probe of the Triton backend's jit ``divide`` (test_triton_divide_kernel)
    import triton
    import triton.language as tl

    from guidedrop.triton_kernels._common import divide

    @triton.jit
    def _divide_kernel(n_ptr, o_ptr, MAGIC, SHIFT, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(o_ptr + i, divide(tl.load(n_ptr + i), MAGIC, SHIFT))
except ImportError:  # no Triton: the test skips (load_backend)
    pass


def test_triton_divide_kernel():
    """The jit ``divide`` (uint32 multiply-high, add, shift) on the worst n of each divisor:
    the largest int32, the multiples of d and the values just below them."""
    common = triton_common()
    for d in (1, 2, 3, 7, 49, 196, 3136, 65537, 2**30 + 1, 2**31 - 1):
        top = (2**31 - 1) // d * d
        n = torch.tensor([0, 1, d - 1, d, top - 1, top, 2**31 - 2, 2**31 - 1],
                         dtype=torch.int32, device=DEV)
        out = torch.empty_like(n)
        _divide_kernel[(1,)](n, out, *common.divisor(d), BLOCK=8)
        assert torch.equal(out.cpu(), n.cpu() // d), d


# The flat DropBlock apply (triton_kernels/block_mask.py, _apply_block_flat_kernel) per
# path: k = 1 with contiguous mask rows (groups inside a map where H * W is a multiple of
# the group, else groups that run into the next map, of the same sample or the next: C = 1
# and C * H * W not a multiple of the group), k = 1 with strided masks and 2 <= k < 7 (the
# per-group mask bytes of a row and the next), k >= 7 and k beyond the map; W = 7 (a group
# spans a whole row), 14, 28, 56 and odd; partial and whole (EVEN) tiles; every dtype
# (groups of 8 elements, or 4 in float32 where C * H * W is a multiple of 4, unless k = 1
# reads contiguous mask rows of maps of a multiple of 8 elements: 16 x 16). Mask bytes of
# any value, not only 0 / 1: a wrongly chosen byte shows.
BLOCK_FLAT_SHAPES = [(2, 3, 7, 7), (2, 8, 7, 7), (3, 5, 14, 14), (1, 2, 14, 14), (2, 2, 28, 28),
                     (1, 3, 9, 56), (2, 3, 5, 13), (3, 1, 6, 7), (1, 4, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, *slow_without_gpu(torch.float32, torch.float16)],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", BLOCK_FLAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_apply_block_flat_paths(B, shape, dtype):
    x = make_x(shape, dtype, DEV, "contiguous")
    n, c, h, w = shape
    scale = rand((n,), 2) * 3
    for k in (1, 2, 3, 4, 5, 6, 7, 60):
        hs, ws = -(-h // k), -(-w // k)
        wide = (rand((n, hs + 1, 2 * ws + 3), k) * 256).to(torch.uint8)
        # contiguous; rows strided (stride(1) = 2 * ws + 3); columns strided (stride(2) = 2)
        masks = (wide[:, :hs, :ws].contiguous(), wide[:, 1:, :ws], wide[:, :hs, 1:2 * ws:2])
        for mask in masks:
            assert_same(B.apply_block(x, mask, k, scale), R.apply_block(x, mask, k, scale))


# Maps of 4096 * k rows or columns and more: the flat apply_block's multiply-shift by
# ceil(2**20 / k) would overflow 32 bits there (found by the attack helper: column 4096 read as
# column 0 at k = 2), so they take the row tile; strided mask columns keep k = 1 off the
# LINEAR path.
@pytest.mark.parametrize("shape,k", [((1, 1, 1, 8193), 1), ((1, 1, 1, 8193), 2),
                                     ((1, 2, 1, 12289), 3), ((1, 1, 4100, 8), 1)])
def test_apply_block_wide_maps(B, shape, k):
    x = make_x(shape, torch.bfloat16, DEV, "contiguous")
    n, c, h, w = shape
    hs, ws = -(-h // k), -(-w // k)
    wide = (rand((n, hs, 2 * ws), k) * 256).to(torch.uint8)
    scale = rand((n,), 2) + 0.5
    for mask in (wide[:, :, :ws], wide[:, :, ::2]):
        assert_same(B.apply_block(x, mask, k, scale), R.apply_block(x, mask, k, scale))


def test_applies_empty(B):
    t = torch.zeros(0, 3, 4, 4, device=DEV)
    assert B.apply_channel(t, torch.zeros(0, 3, device=DEV)).shape == t.shape
    bits = torch.zeros(0, 6, dtype=torch.uint8, device=DEV)
    assert B.apply_seeds(t, bits, 3, False, torch.zeros(0, device=DEV)).shape == t.shape


def test_triton_int64_indexing(monkeypatch):
    """The int64 offset path (tensors of 2**31 elements or more) gives the same results:
    forced on small tensors."""
    mod = load_backend("triton")
    import importlib
    for sub in ("_common", "block_mask", "channel_ranking", "class_activation",
                "percentile_threshold", "pooled_correlation"):
        monkeypatch.setattr(importlib.import_module(f"{mod.__name__}.{sub}"), "needs_int64",
                            lambda *ts: True)
    x = make_x((2, 3, 9, 10), torch.float32, DEV, "channels_last")
    n, c, h, w = x.shape
    assert_same(mod.channel_stats(x)[0], R.channel_stats(x)[0])
    assert_same(mod.map_threshold(x, 7), R.map_threshold(x, 7))
    active = rand((n, c), 1) < 0.5
    st, rst = mod.attention_stats(x, 7, active, "ad"), R.attention_stats(x, 7, active, "ad")
    assert_same(st[0][active], rst[0][active])
    close(mod.cam(x, rand((n, c), 2)), R.cam(x, rand((n, c), 2)), scale=10)
    close(mod.pooled_correlation(x, 3), R.pooled_correlation(x, 3), scale=10)
    # contiguous: the window rows read from 16 bytes before them (W = 10: realigned)
    close(mod.pooled_correlation(x.contiguous(), 3), R.pooled_correlation(x, 3), scale=10)
    scale = rand((n,), 3) + 0.5
    for t in (x, x.contiguous()):
        assert_same(mod.apply_channel(t, rand((n, c), 4)), R.apply_channel(t, rand((n, c), 4)))
        mask = (rand((n, 3, 4), 5) < 0.5).to(torch.uint8)
        assert_same(mod.apply_block(t, mask, 3, scale), R.apply_block(t, mask, 3, scale))
        st = R.attention_state(*rst[:3], scale)
        assert_same(mod.apply_attention(t, x, st, active, "ad"),
                    R.apply_attention(t, x, st, active, "ad"))
        for cs in (c, 1):
            noise = rand((n, cs, h, w), 6)
            args = (0.2, 3, None, None, (n, cs, h, w), x_device())
            bits = mod.seed_bits(noise, None, *args)
            assert_same(bits, R.seed_bits(noise, None, *args))
            assert_same(mod.seed_coverage(bits, 3, cs, h, w), R.seed_coverage(bits, 3, cs, h, w))
            assert_same(mod.apply_seeds(t, bits, 3, cs == 1, scale),
                        R.apply_seeds(t, bits, 3, cs == 1, scale))
    mod.seed_bits(None, None, 0.2, 3, None, None, (n, c, h, w), x_device())


# ------------------------------------------------------------------ layers


def cam_inputs(n, c):
    g = gen(1000 + c)
    weight = torch.randn(4, 2 * c, generator=g)
    return weight.to(DEV), torch.randint(0, 4, (n,), generator=g).to(DEV)


def _cam(x, noise, **kw):
    weight, target = (t.to(x.device) for t in cam_inputs(*x.shape[:2]))
    return F.camdrop(x, weight, target, noise=noise, **kw)


# name -> (op(x, noise=, **params), noise shape of x's shape, params, binary mask?)
LAYERS = {
    "corrdrop": (F.corrdrop, lambda s: (2, s[0], -(-s[2] // 3), -(-s[3] // 3)),
                 dict(p=0.4, block_size=3), True),
    "selectscale": (F.selectscale, lambda s: s[:2], dict(top_rate=0.4, retain=0.1), False),
    "spatialscale": (F.spatialscale, lambda s: s[:2], dict(retain=0.2), False),
    "selectout": (F.selectout, lambda s: s[:2], dict(top_rate=0.6, keep=0.7), True),
    "attentiondrop-am": (F.attentiondrop, lambda s: s[:2],
                         dict(alpha=0.5, beta=30.0, mode="am"), True),
    "attentiondrop-sm": (F.attentiondrop, lambda s: s[:2],
                         dict(alpha=0.5, beta=30.0, mode="sm"), False),
    "attentiondrop-ad": (F.attentiondrop, lambda s: s[:2],
                         dict(alpha=0.5, beta=30.0, mode="ad", normalize="sample"), False),
    "focused_dropout": (F.focused_dropout, lambda s: s[:1], dict(low=0.3, high=0.6), True),
    "focused_dropout-pp": (F.focused_dropout, lambda s: (s[0], s[2], s[3]),
                           dict(low=0.3, high=0.6, per_position=True), True),
    "camdrop": (_cam, tuple, dict(block_size=3, keep=0.5, channel_rate=0.5), True),
    "dropblock": (F.dropblock, tuple, dict(p=0.3, block_size=3), True),
    "dropblock-shared": (F.dropblock, lambda s: (s[0], 1, s[2], s[3]),
                         dict(p=0.3, block_size=3, shared_channels=True, normalize="none"),
                         True),
}
LAYER_INPUTS = [((2, 6, 10, 10), torch.float32, "contiguous"),
                ((2, 5, 15, 15), torch.bfloat16, "channels_last"),
                ((3, 4, 13, 6), torch.float16, "sliced")]


def layer_noise(case, x, seed):
    op, shape_of, params, _ = LAYERS[case]
    if case == "corrdrop":
        return naive.safe_corrdrop_noise(x.cpu(), params["p"], params["block_size"],
                                         gen(seed)).to(DEV)
    return rand(shape_of(tuple(x.shape)), seed)


def run_layer(case, x, noise, grad):
    """(y, x.grad) of the layer on the backend GUIDEDROP_BACKEND names."""
    op, _, params, _ = LAYERS[case]
    xg = x.detach().clone().requires_grad_()
    y = op(xg, noise=noise, **params)
    y.backward(grad)
    return y.detach(), xg.grad


@pytest.mark.parametrize("inputs", LAYER_INPUTS, ids=combo_id)
@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_matches_reference(backend_name, monkeypatch, case, inputs):
    shape, dtype, layout = inputs
    torch.manual_seed(7)
    x = make_x(shape, dtype, DEV, layout)
    noise = layer_noise(case, x, 3)
    grad = torch.randn(shape, generator=gen(9)).to(DEV, dtype)
    y, gx = run_layer(case, x, noise, grad)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    y_ref, gx_ref = run_layer(case, x, noise, grad)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    binary = LAYERS[case][3]
    if case == "corrdrop":  # kappa decided by rounding when F is (nearly) constant
        ok = torch.tensor(naive.corrdrop_well_conditioned(x.cpu(), 3), device=DEV)
        y, y_ref, gx, gx_ref = (t[ok] for t in (y, y_ref, gx, gx_ref))
    if binary:
        assert torch.equal(gx == 0, gx_ref == 0), f"{case}: masks differ"
    close(y, y_ref, dtype)
    close(gx, gx_ref, dtype)


def test_triton_bfloat16_casts_are_exact():
    """Every bfloat16 widened to float32 and back, and float32 values narrowed (ties to even,
    subnormals, the overflow to Inf, NaN), in a Triton kernel: as torch converts them. On a
    GPU the hardware's casts; under the interpreter the conversion _common patches (its own
    truncated the narrowing and mangled subnormals both ways)."""
    load_backend("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def widen_narrow(b_ptr, f_ptr, w_ptr, n_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(w_ptr + i, tl.load(b_ptr + i, mask=m).to(tl.float32), mask=m)
        tl.store(n_ptr + i, tl.load(f_ptr + i, mask=m).to(tl.bfloat16), mask=m)

    b = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bits = b.view(torch.int16).to(torch.int32) << 16
    f = torch.cat([(bits + d).view(torch.float32) for d in (0, 0x7FFF, 0x8000, 0x8001)])
    b = torch.cat([b] * 4).to(DEV)
    f = f.to(DEV)
    wide, narrow = torch.empty_like(f), torch.empty_like(b)
    widen_narrow[(triton.cdiv(f.numel(), 4096),)](b, f, wide, narrow, f.numel(), BLOCK=4096)
    nan = b.isnan()
    assert torch.equal(wide[~nan].view(torch.int32), b[~nan].float().view(torch.int32))
    assert wide[nan].isnan().all()
    want = f.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(narrow[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert narrow[nan].isnan().all()


def test_interpreter_cast_probe(monkeypatch):
    """_common patches Triton's interpreter where its bfloat16 casts are wrong in either
    way, and leaves a correct one alone: a converter exact on subnormals that still
    truncates the narrowing is patched (the first probe, a tie, could not tell truncation
    from rounding to even: a fresh helper)."""
    import numpy as np
    from triton.runtime import interpreter

    from guidedrop.triton_kernels import _common

    def exact_or_cut(cut):
        def convert(data, src, dst, rounding_mode):
            if src.primitive_bitwidth == 16:  # bfloat16 -> float32
                return data.view(np.uint16).astype(np.uint32) << 16
            b = data.view(np.uint32)
            r = b if cut else b + np.uint32(0x7FFF) + ((b >> 16) & 1)
            return (r >> 16).astype(np.uint16)
        return convert

    for cut in (True, False):
        fake = exact_or_cut(cut)
        monkeypatch.setattr(interpreter, "_convert_float", fake)
        _common._exact_bfloat16_casts()
        assert (interpreter._convert_float is fake) is not cut


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's")
def test_interpreter_patches_the_language_once_per_run(monkeypatch):
    """_common makes Triton's interpreter patch triton.language once per kernel run and
    module, not at every device-function call inside the kernel (about a third of the
    interpreted kernels' time): a layer's runs patch a few times each (their kernel's module
    and Triton's standard library), and every patch is undone after the run. The layer's
    values are the other tests' (every one of them runs with it)."""
    load_backend("triton")
    import triton.language as tl
    from triton.runtime import interpreter

    runs, patches = [], []
    run, builtin = interpreter.GridExecutor.__call__, interpreter._patch_builtin

    def counted_run(self, *args, **kwargs):
        runs.append(1)
        return run(self, *args, **kwargs)

    def counted_builtin(*args, **kwargs):  # 3 to 4 calls a module patched
        patches.append(1)
        return builtin(*args, **kwargs)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted_run)
    monkeypatch.setattr(interpreter, "_patch_builtin", counted_builtin)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    x = torch.randn(2, 5, 7, 9, generator=gen(3))
    F.attentiondrop(x, 0.5, 30.0, noise=torch.rand(2, 5, generator=gen(4)))
    # (Triton's own first run leaves some attributes set: tl.tensor.__repr__ restored
    # into the class, tl.core's builtins wrapped; the same with or without _common's patch)
    attrs = ("__index__", "__bool__", "__repr__", "T")
    before = {a: tl.tensor.__dict__.get(a) for a in attrs}, tl.load, tl.core.load
    runs.clear()
    patches.clear()
    F.attentiondrop(x, 0.5, 30.0, noise=torch.rand(2, 5, generator=gen(4)))
    assert len(runs) >= 2
    # before: about 600 a run (its every device-function call patched again)
    assert len(patches) <= 12 * len(runs), (len(patches), len(runs))
    assert ({a: tl.tensor.__dict__.get(a) for a in attrs}, tl.load, tl.core.load) == before


@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_matches_reference_on_bfloat16_subnormals(backend_name, monkeypatch, case):
    """x of bfloat16 subnormals (|x| < 2^-126, zeros among them): every statistic sees them
    as the reference does. Triton's interpreter widened a subnormal bfloat16 wrongly (1e-39
    read as 4.4e-39: other channel maxima, thresholds and argmaxes, other masks; found by
    an attacking helper); _common patches its conversion."""
    # multiples of 2^-133, bfloat16's smallest subnormal: exact, and CorrDrop's F is that of
    # the integers (F does not change with a positive scale), well conditioned
    ints = torch.randint(-127, 128, (2, 5, 7, 9), generator=gen(5)).float()
    x = (ints * 2.0**-133).to(DEV, torch.bfloat16)
    assert (x.abs() < torch.finfo(torch.bfloat16).tiny).all() and x.count_nonzero() > 300
    if case == "corrdrop":
        assert all(naive.corrdrop_well_conditioned(ints, 3))
    noise = layer_noise(case, x, 3)
    grad = torch.randn(x.shape, generator=gen(9)).to(DEV, torch.bfloat16)
    y, gx = run_layer(case, x, noise, grad)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    y_ref, gx_ref = run_layer(case, x, noise, grad)
    assert (y_ref == 0).any() and (y_ref != 0).any(), f"{case}: nothing to compare"
    assert torch.equal(y == 0, y_ref == 0), f"{case}: masks differ"
    close(y.float() * 2.0**133, y_ref.float() * 2.0**133, torch.bfloat16)  # in units of 2^-133
    close(gx, gx_ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.float8_e8m0fnu], ids=str)
def test_layers_float8_noise_and_weight(backend_name, monkeypatch, dtype):
    """noise, and CamDrop's weight, of a float8 dtype (SPEC §1: any floating dtype): every
    layer as on the reference, exactly. The CUDA ops refused float8 (CamDrop's seed kernel
    after two launches) and Triton's launcher has no type for float8_e8m0fnu (KeyError);
    layers.fusable passes them as float32 (exact) to every backend."""
    x = make_x((2, 4, 6, 7), torch.float32, DEV, "contiguous")
    weight = torch.randn(3, 8, generator=gen(4)).to(DEV, dtype)
    target = torch.tensor([2, 0], device=DEV)
    for case in LAYERS:
        op, shape_of, params, _ = LAYERS[case]
        u = layer_noise(case, x, 5).to(dtype)
        if case == "camdrop":
            def run(u=u):
                return F.camdrop(x, weight, target, noise=u, block_size=3, keep=0.5,
                                 channel_rate=0.5)
        else:
            def run(op=op, u=u, params=params):
                return op(x, noise=u, **params)
        y = run()
        with monkeypatch.context() as m:
            m.setenv("GUIDEDROP_BACKEND", "reference")
            want = run()
        if case.startswith("attentiondrop"):  # its scale: a float32 sum in another order
            close(y, want)
        else:
            assert_same(y, want, f"{case} {dtype}")


SEEDED = {
    "corrdrop": lambda x, **k: F.corrdrop(x, 0.4, 3, **k),
    "selectscale": lambda x, **k: F.selectscale(x, 0.4, 0.1, **k),
    "selectout": lambda x, **k: F.selectout(x, 0.6, 0.7, **k),
    "attentiondrop": lambda x, **k: F.attentiondrop(x, 0.5, 30.0, **k),
    "focused_dropout": lambda x, **k: F.focused_dropout(x, 0.3, 0.6, **k),
    "camdrop": lambda x, **k: _cam(x, None, block_size=3, keep=0.5, channel_rate=0.5, **k),
    "dropblock": lambda x, **k: F.dropblock(x, 0.3, 3, **k),
    "dropblock-shared": lambda x, **k: F.dropblock(x, 0.3, 3, shared_channels=True, **k),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_layer_seeded(backend_name, name):
    """noise=None: the same torch.manual_seed gives the same output, another seed another
    output (three calls: each is many launches under the interpreter)."""
    op = SEEDED[name]
    torch.manual_seed(5)
    x = make_x((4, 6, 9, 9), torch.float32, DEV)
    outs = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        outs.append(op(x))
    assert_same(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]), "another seed should give another output"


def _dropblock_expected_fraction(p, r, h, w):
    """E[fraction dropped] = mean over units of 1 - (1 - g)^(#valid centres covering it)."""
    g = float(torch.tensor(p / r**2 * h * w / ((h - r + 1) * (w - r + 1)), dtype=torch.float32))

    def cover(i, size):
        return sum(1 for s in range(size - r + 1) if s <= i <= s + r - 1)
    tot = sum(1 - (1 - g) ** (cover(i, h) * cover(j, w)) for i in range(h) for j in range(w))
    return tot / (h * w)


def test_dropblock_drop_rate(backend_name):
    """Philox seeds in the kernel: the dropped fraction matches DropBlock's expectation, within
    10 % of it, both with a mask a channel and one shared by the channels. 160 maps of 56 x
    56 at p = 0.2: the expectation is 0.179, a map's fraction has a standard deviation of
    about 0.05 (measured), so the band is about 4.5 standard errors, and p = 0.16 (0.147) or
    p = 0.25 (0.218) would fall outside it."""
    torch.manual_seed(1)
    p = 0.2
    expected = _dropblock_expected_fraction(p, 7, 56, 56)
    for shared, shape in ((False, (8, 20, 56, 56)), (True, (160, 2, 56, 56))):
        x = (torch.randn(shape).abs() + 1).to(DEV)
        z = F.dropblock(x, p, 7, shared_channels=shared, normalize="none") == 0
        if shared:
            assert torch.equal(z, z[:, :1].expand_as(z))
            z = z[:, :1]
        assert z.shape[0] * z.shape[1] == 160
        assert abs(z.double().mean().item() - expected) < 0.1 * expected, (z.double().mean(),
                                                                           expected, shared)


def test_corrdrop_drop_rate(backend_name):
    """p = 0.2, 28 x 28 maps, k = 7: E[dropped fraction] = p (binomial over the 16 blocks of
    each of 256 samples, standard deviation 0.00625); within 4 of them, 12.5 % of p."""
    torch.manual_seed(0)
    p = 0.2
    x = torch.randn(256, 4, 28, 28).to(DEV)
    dropped = (F.corrdrop(x, p, 7, normalize="none") == 0).double()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))
    sd = math.sqrt(p * (1 - p) / (256 * 16))
    assert abs(dropped.mean().item() - p) < 4 * sd


def saved_bytes(op, x) -> int:
    """Bytes of the tensors autograd keeps for backward, x itself excluded."""
    kept = []

    def pack(t):
        if not (t.data_ptr() == x.data_ptr() and t.shape == x.shape):
            kept.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = op(x)
    y.sum().backward()
    return sum(kept)


MEMORY = {**{k: v for k, v in SEEDED.items()},
          "spatialscale": lambda x, **k: F.spatialscale(x, 0.2, **k),
          "focused_dropout-pp": lambda x, **k: F.focused_dropout(x, 0.3, 0.6, per_position=True,
                                                                 **k)}


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow) for s in
                                   [(2, 64, 28, 32), (2, 64, 28, 28), (2, 32, 14, 14)]]
                         + [(3, 16, 7, 7)], ids=str)
@pytest.mark.parametrize("name", list(MEMORY))
def test_saved_for_backward(backend_name, name, shape):
    """At most x's bytes / 16 (bf16 x) plus a few bytes per sample (the (N,) scale) kept
    for backward, whatever H and W (the seed bits are one string per sample); AttentionDrop
    keeps x and its per-map statistics."""
    torch.manual_seed(2)
    x = make_x(shape, torch.bfloat16, DEV).requires_grad_()
    kept = saved_bytes(MEMORY[name], x)
    budget = x.numel() * x.element_size() // 16 + 16 * x.shape[0]
    if name == "attentiondrop":
        budget = 64 * x.shape[0] * x.shape[1]  # per-map statistics only, x excepted
    assert kept <= budget, (kept, budget)


# ------------------------------------------------------------------ full size (GPU)


@gpu
@needs_cuda
@pytest.mark.parametrize("inputs", [
    ((8, 64, 56, 56), torch.bfloat16, "channels_last"),
    ((8, 64, 56, 56), torch.float32, "contiguous"),
    ((4, 16, 112, 112), torch.float16, "sliced"),
    ((4, 256, 14, 14), torch.bfloat16, "contiguous")], ids=combo_id)
@pytest.mark.parametrize("case", [c for c in LAYERS if c != "corrdrop"] + ["corrdrop7"])
def test_layer_full_size(backend_name, monkeypatch, case, inputs):
    shape, dtype, layout = inputs
    torch.manual_seed(3)
    x = make_x(shape, dtype, DEV, layout)
    grad = torch.randn(shape, device=DEV, dtype=dtype)
    if case == "corrdrop7":  # no naive safe noise at this size: compare F, then the apply
        B = load_backend(backend_name, emulate=False)
        close(B.pooled_correlation(x, 7), R.pooled_correlation(x, 7), scale=10)
        return
    noise = rand(LAYERS[case][1](shape), 4)
    y, gx = run_layer(case, x, noise, grad)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    y_ref, gx_ref = run_layer(case, x, noise, grad)
    if LAYERS[case][3]:
        mismatch = ((gx == 0) != (gx_ref == 0)).double().mean().item()
        assert mismatch < 1e-4, f"{case}: masks differ on {mismatch:.2e} of the units"
    close(y, y_ref, dtype)
    close(gx, gx_ref, dtype)


@gpu
@needs_cuda
def test_primitives_full_size(B):
    x = make_x((8, 64, 56, 56), torch.bfloat16, DEV, "channels_last")
    assert_same(B.channel_stats(x)[0], R.channel_stats(x)[0])
    assert_same(B.map_threshold(x, 628), R.map_threshold(x, 628))
    v = torch.randn(16, 112 * 112, device=DEV)
    assert_same(B.kth_largest(v, 500), R.kth_largest(v, 500))
    v = torch.randn(4, 50000, device=DEV)  # longer than a register row: chunked passes
    assert_same(B.kth_largest(v, 777), R.kth_largest(v, 777))
    x = make_x((2, 32, 112, 112), torch.float32, DEV)
    close(B.pooled_correlation(x, 4), R.pooled_correlation(x, 4), scale=10)  # N' = 784
    bits = R.seed_bits(None, None, 0.01, 7, None, None, (8, 64, 56, 56), DEV)
    assert_same(B.seed_coverage(bits, 7, 64, 56, 56), R.seed_coverage(bits, 7, 64, 56, 56))


# ------------------------------------------------------------------ custom ops


def triton_ops():
    """torch.ops.guidedrop_triton, or skip (no Triton backend here, or torch < 2.6)."""
    load_backend("triton")
    from guidedrop.triton_kernels import _common
    if not _common.HAS_OPS:
        pytest.skip("torch.library.triton_op needs torch >= 2.6 (the plain launchers run)")
    return torch.ops.guidedrop_triton


def op_samples():
    """Arguments of every guidedrop_triton op (small: each opcheck runs the kernels a few
    times)."""
    x = make_x((2, 3, 5, 6), torch.float32, DEV, "channels_last")
    n, c, h, w = x.shape
    t = torch.randn(x.shape, generator=gen(1)).to(DEV, torch.bfloat16)
    active = rand((n, c), 2) < 0.5
    thr, mn, r, _ = R.attention_stats(x, 7, active, "ad")
    scale = rand((n,), 3) + 0.5
    bits = R.seed_bits(rand((n, c, h, w), 4), None, 0.3, 3, None, None, (n, c, h, w), DEV)
    bits1 = R.seed_bits(rand((n, 1, h, w), 4), None, 0.3, 3, None, None, (n, 1, h, w), DEV)
    seed = torch.tensor([12345], device=DEV)
    g = torch.tensor(0.3, dtype=torch.float32, device=DEV)  # the rate: a 0-dim tensor
    return {
        "apply_channel": [(x, rand((n, c), 5)), (t, rand((n, c), 5))],
        "apply_block": [(x, (rand((n, 2, 2), 6) < 0.5).to(torch.uint8), 3, scale)],
        "apply_seeds": [(x, bits, 3, False, scale), (t, bits1, 3, True, scale)],
        "apply_attention": [(x, x, R.attention_state(thr, mn, r, scale), active, "ad"),
                            (t, x, R.attention_state(thr, mn, r, scale), active, "sm")],
        "channel_stats": [(x,)],
        "map_threshold": [(x, 7)],
        "kth_largest": [(rand((3, 9), 7), 4)],
        "attention_stats": [(x, 7, active, "am")],
        "cam": [(x, rand((n, c), 8))],
        "pooled_correlation": [(x, 2)],
        "seed_bits": [(rand((n, c, h, w), 9), seed[:0], g, 3, None, None, [n, c, h, w]),
                      (None, seed, g, 3, rand((n, h, w), 10) < 0.5, rand((n, c), 11) < 0.5,
                       [n, 1, h, w])],
        "seed_coverage": [(bits, 3, c, h, w), (bits1, 2, 1, h, w)],
    }


@pytest.fixture
def fake_devices(monkeypatch):
    """The current CUDA device as a stand-in ([index], 0 at first) for torch.cuda's
    current_device and device(...), on a machine without CUDA."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    return current


def test_triton_layers_launch_on_their_tensors_device(monkeypatch, fake_devices):
    """A Triton launch runs on the current CUDA device (and its stream), whatever its arguments'
    device: each op makes its tensors' device the current one for its launches and then
    restores the caller's. Without it, x on cuda:1 while cuda:0 is current was read from
    cuda:0 (an illegal address, or with peer access a race with cuda:1's stream). Every
    layer's forward (its plans, statistics and applies) with x a FakeTensor on cuda:1 (then
    cuda:0), the current device a stand-in and the launches recorded: an eager run on a GPU,
    faked (``is_fake`` told so). The backward runs the same ops, in autograd's thread of x's
    device (which the engine sets; fake devices cannot run it)."""
    import test_triton_compile as TC
    from torch._subclasses.fake_tensor import FakeTensorMode

    from guidedrop import dispatch
    from guidedrop.triton_kernels import _common

    load_backend("triton")
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    monkeypatch.setattr(_common, "is_fake", lambda a: False)
    seen = []
    for m in TC._kernel_modules(dispatch.load("triton")[0]):
        monkeypatch.setattr(m, "launch", lambda kernel: TC._Grid(
            lambda grid, *args, **kwargs: seen.append((kernel.fn.__name__, fake_devices[0]))))
    with FakeTensorMode():
        for index in (1, 0):
            x = torch.empty((2, 8, 7, 7), device=f"cuda:{index}")
            for case, (op, _, params, _) in LAYERS.items():
                seen.clear()
                op(x, noise=None, **params)
                assert seen and {d for _, d in seen} == {index}, (case, index, seen)
                assert fake_devices[0] == 0, case


def test_triton_ops_run_on_their_tensors_device(monkeypatch):
    """The ops run by themselves (torch.ops.guidedrop_triton.*, as an exported program or
    torch.compile's eager backends run them) switch the device as their Python callers do:
    the op's kernel is the launcher that switches. On the CPU: every op run on its samples
    with ``foreign_device`` naming cuda:7 and torch.cuda.device recording the switch."""
    from guidedrop.triton_kernels import _common

    ops = triton_ops()
    switched = []

    @contextlib.contextmanager
    def device(d):
        switched.append(torch.device(d).index)
        yield

    monkeypatch.setattr(_common, "foreign_device", lambda *groups: torch.device("cuda:7"))
    monkeypatch.setattr(torch.cuda, "device", device)
    for name, calls in op_samples().items():
        switched.clear()
        getattr(ops, name)(*calls[0])
        assert switched and set(switched) == {7}, (name, switched)


def test_triton_ops_registered():
    """Every primitive is an op guidedrop_triton::<name>, with its twin <name>_dynamic of
    the same schema (the op traced with symbolic sizes), and the backend's public
    functions are the ops or thin wrappers around them (same contract signatures)."""
    ops = triton_ops()
    mod = load_backend("triton")
    names = {name for name in ops if not name.endswith("_dynamic")}
    assert {name for name in ops if name.endswith("_dynamic")} == {f"{n}_dynamic" for n in names}
    # the primitives, and the plan kernels' ops (tests/test_plans_*.py)
    assert set(op_samples()) == {name for name in names if not name.endswith("_plan")}
    for name in names:
        schema = getattr(ops, name).default._schema
        dynamic = getattr(ops, f"{name}_dynamic").default._schema
        assert schema.name == f"guidedrop_triton::{name}"
        assert str(dynamic) == str(schema).replace(f"::{name}(", f"::{name}_dynamic(")
    for name in op_samples():
        assert callable(getattr(mod, name))


@pytest.mark.parametrize("name", [
    "apply_channel", "apply_block", "apply_seeds", "apply_attention", "channel_stats",
    "map_threshold", "kth_largest", "attention_stats", "cam", "pooled_correlation",
    "seed_bits", "seed_coverage"])
def test_triton_opcheck(name):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and AOT
    dispatch of each op. On a GPU the ops are triton_ops (wrap_triton kernels); under
    TRITON_INTERPRET=1, where wrap_triton cannot trace interpreted kernels, they are
    custom_ops whose fake kernel is the launcher with the launches skipped."""
    ops = triton_ops()
    for args in op_samples()[name]:
        for op in (getattr(ops, name), getattr(ops, f"{name}_dynamic")):  # fake: `fake`
            torch.library.opcheck(op, args)


# Traces guidedrop_triton::apply_block as a GPU run does (TRITON_INTERPRET=0: a triton_op),
# on CPU tensors (nothing runs: the compiler stops after AOT tracing), printing the ops of
# the forward graph.
_GPU_TRACE = """
import sys, torch
import guidedrop.triton_kernels
from torch._dynamo.backends.common import aot_autograd

def stop(gm, example_inputs):
    print(sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"}))
    raise SystemExit(0)

def f(t, mask, scale):
    return torch.ops.guidedrop_triton.apply_block(t, mask, 3, scale)

t, mask = torch.randn(2, 3, 7, 7), torch.ones(2, 3, 3, dtype=torch.uint8)
torch.compile(f, backend=aot_autograd(fw_compiler=stop), dynamic=sys.argv[1] == "1")(
    t, mask, torch.ones(2))
"""


@pytest.mark.parametrize("dynamic", [False, True])
def test_triton_op_traced_as_on_a_gpu(dynamic, tmp_path):
    """On a GPU each op is a triton_op: with static shapes AOT tracing enters its launcher
    and the graph holds its kernel (triton_kernel_wrapper_functional, which inductor
    compiles in); with symbolic sizes, the op's _dynamic twin, opaque, one node. The
    interpreter, which the other tests use, registers custom_ops instead."""
    triton_ops()  # or skip
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    (tmp_path / "trace.py").write_text(_GPU_TRACE)
    done = subprocess.run([sys.executable, str(tmp_path / "trace.py"), str(int(dynamic))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ops = done.stdout.strip().splitlines()[-1]
    if dynamic:
        assert "guidedrop_triton.apply_block_dynamic" in ops and "triton_kernel" not in ops, ops
    else:
        assert "triton_kernel_wrapper_functional" in ops and "guidedrop_triton" not in ops, ops


# layer -> (its plan module in triton_kernels.plans, the op's name there, functional call)
PLAN_OPS = {
    "dropblock_plan": ("dropblock", "_plan", lambda x: F.dropblock(x, 0.3, 3)),
    "camdrop_plan": ("camdrop", "_plan", lambda x: F.camdrop(
        x, torch.randn(4, x.shape[1], generator=gen(2)).to(DEV), torch.tensor([1, 3]).to(DEV),
        3, 0.5)),
    "corrdrop_plan": ("corrdrop", "_plan", lambda x: F.corrdrop(x, p=0.4, block_size=2)),
    "attentiondrop_plan": ("attentiondrop", "_plan", lambda x: F.attentiondrop(x, 0.6, 20.0)),
    "focused_dropout_plan": ("focused_dropout", "_focused_plan",
                             lambda x: F.focused_dropout(x, 0.3, 0.6)),
    "selectscale_plan": ("selectscale", "_selectscale_plan", lambda x: F.selectscale(x, 0.5, 0.5)),
    "selectout_plan": ("selectscale", "_selectout_plan", lambda x: F.selectout(x, 0.5, 0.75)),
}


@pytest.mark.parametrize("name", sorted(PLAN_OPS))
def test_triton_plan_opcheck(name, monkeypatch):
    """torch.library.opcheck of each plan kernel's op and its _dynamic twin, on the
    arguments its layer passes it while traced (rates as 0-dim tensors; recorded from an
    eager call that torch.compiler.is_compiling() takes for a traced one), in NCHW and
    channels_last with odd sizes: the twin's fake kernel gives the launcher's shapes, dtypes
    and strides."""
    import importlib
    ops = triton_ops()
    module, attr, layer = PLAN_OPS[name]
    mod = importlib.import_module(f"guidedrop.triton_kernels.plans.{module}")
    calls, launcher = [], getattr(mod, attr)

    def record(*args):
        calls.append(args)
        return launcher(*args)
    monkeypatch.setattr(mod, attr, record)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    for fmt in ("contiguous", "channels_last"):
        layer(make_x((2, 5, 7, 9), torch.float32, DEV, fmt))
    assert len(calls) == 2
    for args in calls:
        for op in (getattr(ops, name), getattr(ops, f"{name}_dynamic")):
            torch.library.opcheck(op, args)


# One case per layer by default; the other modes and variants in the slow stage (without a
# GPU: ~2 s each, Dynamo's tracing).
COMPILE_DEFAULT = ("corrdrop", "selectscale", "selectout", "attentiondrop-ad", "focused_dropout",
                   "camdrop", "dropblock")


@pytest.mark.parametrize("case", [*COMPILE_DEFAULT, *slow_without_gpu(
    *(c for c in LAYERS if c not in COMPILE_DEFAULT))])
def test_layer_compile_fullgraph(monkeypatch, case):
    """torch.compile(fullgraph=True) of the layer on the Triton backend (inductor on a GPU,
    aot_eager under the interpreter: inductor cannot compile CPU tensors' interpreted
    kernels) gives eager's output and x.grad for the same noise."""
    triton_ops()
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    torch._dynamo.reset()
    op, _, params, binary = LAYERS[case]
    x = make_x((2, 4, 9, 9), torch.float32, DEV, "channels_last")
    noise = layer_noise(case, x, 3)
    grad = torch.randn(x.shape, generator=gen(9)).to(DEV)

    if case == "camdrop":  # the CAM inputs drawn outside (Dynamo cannot trace Generator())
        weight, target = cam_inputs(*x.shape[:2])
        op = functools.partial(F.camdrop, weight=weight, target=target)

    def fn(x, u):
        return op(x, noise=u, **params)

    backend = "inductor" if HAS_CUDA else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    ye, gxe = run_layer_fn(fn, x, noise, grad)
    yc, gxc = run_layer_fn(compiled, x, noise, grad)
    if binary:
        assert torch.equal(gxc == 0, gxe == 0), f"{case}: masks differ"
    if backend == "inductor":  # x * w may be fused differently: a float32 rounding
        close(yc, ye)
        close(gxc, gxe)
    else:
        assert_same(yc, ye)
        assert_same(gxc, gxe)
    with torch.no_grad():
        close(compiled(x, noise), ye)


@gpu
@needs_cuda
def test_compiled_plan_scales_round_each_operation(monkeypatch):
    """Compiled by inductor, the Triton plan kernels keep their enable_fp_fusion=False
    (inductor launches a user kernel with options of its own; tests/test_triton_compile.py
    reads the eager kernels' PTX): SelectScale's w = retain + 2 (1 - retain) u as eager's,
    to the bit, for 16384 draws of u, read as y = x * w on x = 1 (every channel selected).
    Fused, w moves by an ulp for some u (u = 0.6069953: 1.1925915 for 1.1925917)."""
    triton_ops()
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    torch._dynamo.reset()
    x = torch.ones(64, 256, 1, 1, device=DEV)
    u = torch.rand(64, 256, generator=gen(4)).to(DEV)

    def fn(x, u):
        return F.selectscale(x, top_rate=1.0, retain=0.1, noise=u)

    assert_same(torch.compile(fn, fullgraph=True)(x, u), fn(x, u))


def run_layer_fn(fn, x, noise, grad):
    xg = x.detach().clone().requires_grad_()
    y = fn(xg, noise)
    y.backward(grad)
    return y.detach(), xg.grad


def test_layers_from_threads(backend_name):
    """Layers called from 4 Python threads at once give the serial outputs, on each kernel
    backend (found by a helper: under TRITON_INTERPRET, Triton's interpreter patches global
    state while a kernel runs, and concurrent launches failed with InterpreterError)."""
    cases = [(name, make_x((2, 4, 9 + i, 11), torch.float32, DEV, "contiguous"))
             for i, name in enumerate(("dropblock", "attentiondrop-ad", "corrdrop", "camdrop"))]

    def run(name, x):
        op, _, params, _ = LAYERS[name]
        return op(x, noise=layer_noise(name, x, 5), **params)

    serial = [run(*c) for c in cases]
    out, errors = [None] * len(cases), []

    def worker(i):
        try:
            for _ in range(2):
                out[i] = run(*cases[i])
        except Exception as e:  # noqa: BLE001 - reported below with the thread's case
            errors.append(f"{cases[i][0]}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (name, _), y, want in zip(cases, out, serial, strict=True):
        assert torch.equal(y, want), name
