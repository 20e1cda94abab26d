"""Every layer's plan kernel on both kernel backends (Triton; CUDA on a GPU, else on the SIMT
emulator) against the reference plan on adversarial inputs (issue 12's held-back pass):
x of a single value through stride-0 views, signed zeros only, all NaN / ±Inf, values near
the float32 range, channels_last by permutation; noise with NaN and -0.0, expanded, sliced,
channels_last, or of another dtype. The plan must be the reference's bit for bit
(testing.assert_same_plan) and so must the output. The slow part adds shapes larger than one
program or block handles (70 samples, 1030 channels, 130 x 130 and 5000 x 1 maps).
"""

from __future__ import annotations

import pytest
import torch
from testing import CUDA, DEV, assert_same, assert_same_plan, load_backend, make_x

from guidedrop import layers as L
from guidedrop import reference as R

KERNEL_BACKENDS = ["triton", CUDA]
LAYERS = ["dropblock", "camdrop", "corrdrop", "selectscale", "spatialscale", "selectout",
          "attentiondrop", "focused_dropout"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def xs(shape, name):
    """x of `shape` with one adversarial property `name` (on the CPU; moved by the caller)."""
    n, c, h, w = shape
    g = gen(3)
    if name == "constant_expanded":  # every stride 0: ties everywhere
        return torch.tensor(1.5).expand(shape)
    if name == "signed_zeros":
        return torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)
    if name == "all_nan":
        return torch.full(shape, float("nan"))
    if name == "all_inf":
        return torch.full(shape, float("inf"))
    if name == "huge":  # max - min and the sums overflow float32
        return make_x(shape) * 3e38
    if name == "subnormal":
        return make_x(shape) * 1e-45
    if name == "expanded_c":  # every channel the same map: pooled rows equal or opposite
        return torch.randn(n, 1, h, w, generator=g).expand(shape)
    if name == "expanded_hw":
        return torch.randn(n, c, 1, 1, generator=g).expand(shape)
    if name == "permuted_channels_last":
        return torch.randn(n, h, w, c, generator=g).permute(0, 3, 1, 2)
    if name == "half_inf":
        x = make_x(shape).to(torch.bfloat16)
        return x.masked_fill(torch.rand(shape, generator=g) < 0.1, float("inf"))
    assert name == "mixed_nonfinite", name
    x = make_x(shape)
    x[0, 0, 0, 0], x[-1, -1, -1, -1], x[0, -1, -1, 0] = float("nan"), float("inf"), -0.0
    return x


def noises(shape, name):
    """Uniforms of `shape` with the property `name`."""
    g = gen(5)
    if name == "nan_and_negzero":
        u = torch.rand(shape, generator=g)
        u.view(-1)[::7] = float("nan")
        u.view(-1)[1::5] = -0.0
        return u
    if name == "expanded":  # one value per last index, stride 0 elsewhere
        return torch.rand(shape[-1], generator=g).expand(shape)
    if name == "sliced":
        big = torch.rand(*[s + 1 for s in shape[:-1]], 2 * shape[-1], generator=g)
        return big[(slice(1, None),) * (len(shape) - 1) + (slice(None, None, 2),)]
    if name == "float16_transposed":
        return torch.rand(shape[::-1], generator=g).half().permute(*reversed(range(len(shape))))
    assert name == "float64", name
    return torch.rand(shape, generator=g, dtype=torch.float64)


def call(layer, x, noise_kind):
    """(args, kwargs) of layers.<layer> for x, with noise of the kind given."""
    n, c, h, w = x.shape
    if layer == "dropblock":
        return (x, 0.5, 2), dict(shared_channels=False, normalize="batch",
                                 noise=noises((n, c, h, w), noise_kind))
    if layer == "camdrop":
        wt = torch.randn(4, 2 * c, generator=gen(7))
        t = torch.arange(n) % 4
        return (x, wt, t, 2, 0.4), dict(channel_rate=0.5, normalize="sample",
                                       noise=noises((n, c, h, w), noise_kind))
    if layer == "corrdrop":
        # big maps: bigger blocks, so the pooled map (the plan's work, quadratic in its
        # size) stays a few hundred positions while x spans many apply tiles
        k = 2 if h * w <= 4096 else 9
        return (x, 0.6, k), dict(normalize="batch",
                                 noise=noises((2, n, -(-h // k), -(-w // k)), noise_kind))
    if layer == "selectscale":
        return (x, 0.4, 0.2), dict(noise=noises((n, c), noise_kind))
    if layer == "spatialscale":
        return (x, 0.4), dict(noise=noises((n, c), noise_kind))
    if layer == "selectout":
        return (x, 0.7, 0.5), dict(noise=noises((n, c), noise_kind))
    if layer == "attentiondrop":
        return (x, 0.8, 25), dict(mode="ad", normalize="sample", noise=noises((n, c), noise_kind))
    return (x, 0.3, 0.6), dict(per_position=True, noise=noises((n, h, w), noise_kind))


def compare(name, layer, x, noise_kind):
    B = load_backend(name)
    x = x.to(DEV)
    args, kw = call(layer, x, noise_kind)
    args = tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args)
    kw["noise"] = kw["noise"].to(DEV)
    got = getattr(L, layer)(B, *args, **kw)
    want = getattr(L, layer).reference(R, *args, **kw)
    assert_same_plan(got, want, f"{name} {layer}")
    if want is not None:
        assert_same(L.apply(B, got, x, x), L.apply(R, want, x, x), f"{name} {layer}")


FAST = [("constant_expanded", "nan_and_negzero"), ("mixed_nonfinite", "expanded"),
        ("expanded_c", "sliced")]
SLOW_X = ["signed_zeros", "all_nan", "all_inf", "huge", "subnormal", "expanded_hw",
          "permuted_channels_last", "half_inf"]
SLOW_NOISE = ["nan_and_negzero", "expanded", "sliced", "float16_transposed", "float64"]


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("x_kind,noise_kind", FAST)
def test_adversarial_values(name, layer, x_kind, noise_kind):
    compare(name, layer, xs((2, 3, 5, 7), x_kind), noise_kind)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("x_kind", SLOW_X)
def test_adversarial_values_sweep(name, layer, x_kind):
    # two noise kinds per x kind, rotating: every noise kind meets several x kinds, in
    # two fifths of the interpreted (or emulated) time of the whole cross product
    k = SLOW_X.index(x_kind)
    for i in (k, k + 3):  # and both shapes
        noise_kind = SLOW_NOISE[i % len(SLOW_NOISE)]
        compare(name, layer, xs((2, 3, 5, 7) if i % 2 else (1, 4, 3, 9), x_kind), noise_kind)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", [(70, 3, 2, 2), (1, 1030, 1, 2), (1, 2, 130, 130),
                                   (1, 1, 5000, 1), (2, 5, 1, 13)])
def test_larger_than_a_block(name, layer, shape):
    compare(name, layer, make_x(shape), "nan_and_negzero")


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("c", [2, 3, 5, 33])
def test_corrdrop_opposite_rows_correlate_exactly(name, c):
    """Pooled rows that are equal or opposite (x with every channel the same map: the rows
    are ±(v, ..., v)) have |â_i·â_j| = 1 exactly, so every F_i of a sample is equal and
    F_max = F_min (SPEC §1, §2.3) as in the reference (found by an adversarial pass: the
    kernels took 1 − ‖â_i − â_j‖²/2, which is −1 ± ulp for opposite rows, so F differed by
    an ulp and CorrDrop drew blocks from rounding noise)."""
    B = load_backend(name)
    x = torch.randn(3, 1, 9, 11, generator=gen(c)).expand(3, c, 9, 11).to(DEV)
    for v in (x, -x.contiguous(), x.contiguous(memory_format=torch.channels_last)):
        f = B.pooled_correlation(v, 2)
        want = R.pooled_correlation(v, 2)
        assert torch.equal(f.cpu(), want.cpu()), (f, want)
        assert torch.equal(f.amax((1, 2)), f.amin((1, 2)))  # the rows are all ± each other
    u = noises((2, 3, 5, 6), "float64")
    got = L.corrdrop(B, x, 0.6, 2, normalize="batch", noise=u.to(DEV))
    assert_same_plan(got, L.corrdrop.reference(R, x, 0.6, 2, normalize="batch", noise=u.to(DEV)))
