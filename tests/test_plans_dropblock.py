"""DropBlock's plan kernels (``B.plan_dropblock``, issue 12) against the reference plan.

The plan of a kernel backend must be the reference's ``layers.dropblock`` plan bit for bit
(same kind and meta; state tensors of the same shape and dtype, equal values) for the same
explicit noise: odd shapes, every dtype and layout, shared or per-channel masks, every
normalisation, and noise sitting exactly on the seed rate. Backends without the plan
kernel (yet) are skipped.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from testing import CUDA, DEV, assert_same_plan, load_backend, make_x

from guidedrop import layers
from guidedrop import reference as R

KERNEL_BACKENDS = ["triton", CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
NORMALIZE = ["batch", "sample", "none"]


def seeded_generator(name: str) -> torch.Generator:
    """A generator on DEV for a test that draws twice from one seed, or skip: the CUDA
    emulator has only its default generator (test_plans_cuda_camdrop.py and
    test_plans_cuda_attention_dropblock.py set its Philox state instead)."""
    if name == "cuda" and DEV == "cpu":
        pytest.skip("the CUDA emulator takes no generator")
    return torch.Generator(device=DEV)


def f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def on_threshold(u: torch.Tensor, g: float) -> torch.Tensor:
    """u with every third value exactly the float32 seed rate g (u < g is false there) and
    every fifth one the float32 just below it (a seed)."""
    u = u.clone()
    g32 = f32(g)
    below = math.nextafter(g32, -math.inf)
    flat = u.view(-1)
    flat[::3] = g32
    flat[1::5] = f32(below)
    return u


def compare(name, x, p, block_size, shared, normalize, noise):
    B = load_backend(name)
    kw = dict(shared_channels=shared, normalize=normalize, noise=noise)
    got = layers.dropblock(B, x, p, block_size, **kw)
    want = layers.dropblock.reference(R, x, p, block_size, **kw)
    assert_same_plan(got, want)
    return got


def noise_for(x, shared, seed=0):
    n, c, h, w = x.shape
    return torch.rand((n, 1 if shared else c, h, w), generator=torch.Generator().manual_seed(seed)
                      ).to(DEV)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,block_size", [((1, 1, 1, 1), 3), ((2, 3, 5, 7), 3),
                                              ((3, 2, 4, 9), 2), ((2, 3, 5, 7), 9),
                                              ((2, 2, 6, 3), 1)])
@pytest.mark.parametrize("shared", [False, True])
def test_plan_shapes(name, shape, block_size, shared):
    """Odd shapes (1x1 maps, H != W, a block larger than the map, r = 1, even r), every
    normalisation; noise on the threshold."""
    torch.manual_seed(1)
    x = make_x(shape, device=DEV)
    r = min(block_size, shape[2], shape[3])
    g = layers._seed_rate(0.3, r, shape[2], shape[3])
    u = on_threshold(noise_for(x, shared), g)
    for normalize in NORMALIZE:
        compare(name, x, 0.3, block_size, shared, normalize, u)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_dtypes_layouts(name, dtype, layout):
    x = make_x((2, 3, 5, 7), dtype, DEV, layout)
    for shared, normalize in ((False, "batch"), (True, "sample")):
        compare(name, x, 0.2, 3, shared, normalize, noise_for(x, shared, 2))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_noise_dtypes_and_nonfinite(name):
    """u is rounded to float32 before u < g (SPEC §1) whatever its dtype: float64 noise
    just below g rounds onto it (no seed); half noise; NaN never seeds."""
    x = make_x((2, 2, 6, 5), device=DEV)
    g = f32(layers._seed_rate(0.4, 3, 6, 5))
    u = noise_for(x, False, 3).double()
    flat = u.view(-1)
    flat[::4] = g - 2.0 ** -40  # rounds to g in float32
    flat[1::7] = math.nan
    plan = compare(name, x, 0.4, 3, False, "batch", u)
    assert plan.state[0].any()  # a test that seeds something
    compare(name, x, 0.4, 3, False, "sample", u.half())
    compare(name, x, 0.4, 3, True, "batch", u[:, :1].bfloat16())


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_plan_everything_dropped(name, normalize):
    """g >= 1: every valid centre seeds, nothing is kept, the scale is 0 ("none": 1)."""
    x = make_x((2, 3, 4, 4), device=DEV)
    plan = compare(name, x, 1.0, 1, False, normalize, noise_for(x, False, 4))
    assert bool((plan.state[1] == (1.0 if normalize == "none" else 0.0)).all())


def test_plan_scale_loops(monkeypatch):
    """Many coverage programs and samples per scale step: the last-program ticket and the
    sample / part loops of the scale (tiles shrunk so that small shapes take them)."""
    B = load_backend("triton")  # Triton's launch geometry
    import guidedrop.triton_kernels.block_mask as bm
    monkeypatch.setattr(bm, "TILE", 64)
    monkeypatch.setattr(bm, "SCALE_TILE", 2)
    x = make_x((5, 2, 3, 9), device=DEV)
    for normalize in NORMALIZE:
        compare(B.name, x, 0.3, 3, False, normalize, noise_for(x, False, 5))
    # the ticket is reset for every plan: a second plan on the same device is still right
    compare(B.name, x, 0.1, 2, True, "batch", noise_for(x, True, 6))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_rates_are_runtime(name):
    """Rates that differ in the last float32 bit give the reference's seeds each time."""
    x = make_x((2, 2, 6, 6), device=DEV)
    u = noise_for(x, False, 7)
    for p in (0.25, math.nextafter(0.25, 1.0), 0.5, 0.1 + 1e-9):
        compare(name, x, p, 3, False, "batch", u)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_fresh_noise(name):
    """noise=None: a valid plan (the seed kernel's own Philox draw), the same with the same
    generator seed."""
    B = load_backend(name)
    x = make_x((2, 3, 6, 6), device=DEV)
    gen = seeded_generator(name)
    kw = dict(shared_channels=False, normalize="batch")
    a = layers.dropblock(B, x, 0.5, 3, **kw, generator=gen.manual_seed(1))
    b = layers.dropblock(B, x, 0.5, 3, **kw, generator=gen.manual_seed(1))
    assert_same_plan(a, b)
    assert a.state[0].shape == (2, math.ceil(3 * 36 / 8)) and a.state[1].dtype == torch.float32



def test_triton_philox_key_has_63_bits():
    """The Triton seed kernel's Philox key fills both 32-bit words: each call's counters
    start at 0, so two calls that draw one key draw the same seeds, and a 31-bit key
    repeats about M^2 / 2^32 times in M calls (found by a helper: ~400 pairs in a long
    run). 64 draws all below 2^32 would have odds of 2^-2000."""
    from guidedrop.triton_kernels.block_mask import draw_seed
    gen = torch.Generator().manual_seed(0)
    keys = torch.cat([draw_seed(None, gen, "cpu") for _ in range(64)])
    assert keys.dtype == torch.int64 and (keys >= 0).all()
    assert (keys >= 2**32).any() and len(set(keys.tolist())) == 64

@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 13, 6), (2, 5, 15, 15), (4, 3, 9, 20)])
def test_plan_matrix(name, dtype, layout, shape):
    x = make_x(shape, dtype, DEV, layout)
    # each block size and each normalisation once (the scale does not depend on r)
    for block_size, normalize in zip((1, 3, 7), NORMALIZE, strict=True):
        for shared in (False, True):
            compare(name, x, 0.3, block_size, shared, normalize, noise_for(x, shared, 8))
