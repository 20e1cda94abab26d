"""Hypothesis: every kernel backend gives the reference's output, and samples stay isolated
(issue 11, SPEC §1), through the public ops of guidedrop.functional with explicit noise.

Backends: Triton (under TRITON_INTERPRET=1 without a GPU) and the CUDA sources (on the
SIMT emulator of tests/cuda_emu/ without a GPU, the real ops with one), each forced into
``guidedrop.functional`` through the dispatch table, against the reference.

Inputs: normal floats, small integers (ties; a channel equal to another in another order),
0, +-Inf, NaN, +-3e38 / the dtype's max, tiny and subnormal values; float32 / float16 /
bfloat16 (float64 on the reference); contiguous, channels_last and sliced layouts; 1x1
maps, C = 1, N = 1, H != W, sides that are no multiple of the block, empty dimensions;
rates as int / float / numpy scalars / Fraction and block sizes as numpy integers.

Masks are compared exactly (the zero pattern where x is finite and nonzero), values within
the dtype's tolerance. SPEC §1 lets backends differ only where a uniform lies within
rounding of its threshold; every statistic that decides a mask is exact by design
(backend_contract.md), so a mask must be the reference's. CorrDrop alone gets a
rounding-sized step: its κ divides float32 correlations by their spread, so a mask that
is not the reference's must be the reference's for the noise moved by that step (all of
it up, or all down), and a decision flipped far from its threshold still fails.
"""

from __future__ import annotations

import contextlib
import fractions
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from testing import CUDA, DEV, TRITON_SLOW, load_backend, tol

import guidedrop.functional as F
from guidedrop import dispatch
from guidedrop import reference as R

KERNEL_BACKENDS = ["triton", CUDA]
LAYERS = ["corrdrop", "selectscale", "spatialscale", "selectout", "attentiondrop",
          "focused_dropout", "camdrop", "dropblock"]
SETTINGS = settings(max_examples=5, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------- backends


@contextlib.contextmanager
def on(name: str):
    """guidedrop.functional runs on backend ``name`` inside the block."""
    mod = load_backend(name)
    env, loaded = os.environ.get("GUIDEDROP_BACKEND"), dispatch._loaded.get(name)
    os.environ["GUIDEDROP_BACKEND"] = name
    dispatch._loaded[name] = (mod, "")
    try:
        yield
    finally:
        if env is None:
            del os.environ["GUIDEDROP_BACKEND"]
        else:
            os.environ["GUIDEDROP_BACKEND"] = env
        if loaded is None:
            dispatch._loaded.pop(name, None)
        else:
            dispatch._loaded[name] = loaded


# --------------------------------------------------------------------------- inputs


def specials(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    return [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3e38, -3e38, fi.max,
            -fi.max, fi.tiny, -fi.tiny, 1.0, -1.0, fi.smallest_normal / 4]


@st.composite
def shapes(draw, empty=True):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    shape = [n, c, h, w]
    if empty and draw(st.integers(0, 11)) == 0:  # an empty dimension now and then
        shape[draw(st.integers(0, 3))] = 0
    return tuple(shape)


@st.composite
def inputs(draw, shape, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """x: (shape) of a drawn dtype and layout, values of a drawn kind."""
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced"]))
    kind = draw(st.sampled_from(["normal", "int", "special", "special"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind != "normal":
        x = torch.randint(-3, 4, shape, generator=g).double()
        n, c, h, w = shape
        if c > 1 and x.numel():  # a tie: the last channel is channel 0 in another order
            x[:, -1] = x[:, 0].flip(-1).flip(-2)
    if kind == "special" and x.numel():
        vals = torch.tensor(specials(dtype), dtype=torch.float64)
        where = torch.rand(shape, generator=g) < draw(st.sampled_from([0.05, 0.3, 1.0]))
        pick = torch.randint(0, len(vals), shape, generator=g)
        x = torch.where(where, vals[pick], x)
    x = x.to(dtype)  # 3e38 becomes Inf in float16
    if layout == "sliced":
        n, c, h, w = shape
        big = torch.full((n + 1, c + 2, h + 3, w + 2), 7.0, dtype=dtype)
        big[1:, 2:, 1 : h + 1, 2:] = x
        return big[1:, 2:, 1 : h + 1, 2:]
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def uniforms(shape, seed) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@st.composite
def cases(draw, layer, shape):
    """(op(x, noise), noise shape, binary mask?, rates): the layer with drawn arguments."""
    n, c, h, w = shape
    unit = st.floats(0.0, 1.0)
    norm = st.sampled_from(["batch", "sample", "none"])
    if layer == "corrdrop":
        p, k, nz = draw(st.floats(0.05, 1.0)), draw(st.integers(1, 5)), draw(norm)
        op = lambda x, u: F.corrdrop(x, p, k, normalize=nz, noise=u)  # noqa: E731
        op.corr = (k, nz)
        return op, (2, n, -(-h // k), -(-w // k)), True
    if layer == "selectscale":
        t, r = draw(unit), draw(st.floats(0.0, 0.99))
        return lambda x, u: F.selectscale(x, t, r, noise=u), (n, c), False
    if layer == "spatialscale":
        r = draw(st.floats(0.0, 0.99))
        return lambda x, u: F.spatialscale(x, r, noise=u), (n, c), False
    if layer == "selectout":
        t, kp = draw(unit), draw(st.floats(0.01, 1.0))
        if c and round((1 - kp) * c) > max(1, round(t * c)):
            kp = 1.0  # n_d > n_t is a ValueError (tested in test_api)
        return lambda x, u: F.selectout(x, t, kp, noise=u), (n, c), True
    if layer == "attentiondrop":
        a, b = draw(st.floats(0.01, 1.0)), draw(st.floats(0.01, 100.0))
        mode, nz = draw(st.sampled_from(["am", "sm", "ad"])), draw(norm)
        return (lambda x, u: F.attentiondrop(x, a, b, mode=mode, normalize=nz, noise=u),
                (n, c), mode == "am")
    if layer == "focused_dropout":
        lo, hi = sorted(draw(st.tuples(unit, unit)))
        pp = draw(st.booleans())
        return (lambda x, u: F.focused_dropout(x, lo, hi, per_position=pp, noise=u),
                (n, h, w) if pp else (n,), True)
    if layer == "camdrop":
        k, kp, cr, nz = draw(st.integers(1, 5)), draw(st.floats(0.0, 0.99)), draw(unit), draw(norm)
        g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        groups = draw(st.integers(1, 2))
        weight = torch.randint(-3, 4, (4, max(c, 1) * groups), generator=g).float().to(DEV)
        target = torch.randint(0, 4, (n,), generator=g).to(DEV)
        return (lambda x, u: F.camdrop(x, weight, target, k, kp, channel_rate=cr,
                                       normalize=nz, noise=u), (n, c, h, w), True)
    p, k, sh, nz = draw(st.floats(0.01, 1.0)), draw(st.integers(1, 6)), draw(st.booleans()), \
        draw(norm)
    return (lambda x, u: F.dropblock(x, p, k, shared_channels=sh, normalize=nz, noise=u),
            (n, 1 if sh else c, h, w), True)


# --------------------------------------------------------------------------- checks


def dropped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The zero pattern of y where x is finite and nonzero (False elsewhere)."""
    return (y == 0) & torch.isfinite(x) & (x != 0)


def nudged(noise: torch.Tensor, step: float) -> torch.Tensor:
    return (noise.double() + step).clamp(0, 1 - 2**-24).to(noise.dtype)


# CorrDrop's rounding-sized step for a uniform: its kappa divides float32 correlations by
# their spread (samples whose spread is rounding are left out).
CORR_STEP = 2.0**-12
CORR_SPREAD = 1e-3


def corr_ok(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample: CorrDrop's kappa is not decided by rounding (SPEC §1)."""
    f = R.pooled_correlation(x.float().contiguous(), min(k, max(x.shape[2:]))).flatten(1)
    spread = (f.amax(1) - f.amin(1)).double()
    return ~((spread > 0) & (spread < CORR_SPREAD)) | ~torch.isfinite(spread)


def same_output(y, x, ref_of, noise, binary, step=None, rows=None, values=True):
    """y (a backend's) is the reference's output ref_of(noise), or, where masks differ and a
    step is given, the reference's for the noise moved by +-step; values within the dtype's
    tolerance."""
    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    assert y.shape == x.shape and y.dtype == x.dtype
    y_ref = ref_of(noise)
    if binary and not torch.equal(sel(dropped(y, x)), sel(dropped(y_ref, x))):
        for s in (step, -step) if step else ():
            y_ref = ref_of(nudged(noise, s))
            if torch.equal(sel(dropped(y, x)), sel(dropped(y_ref, x))):
                break
        else:
            bad = (dropped(y, x) != dropped(ref_of(noise), x)).nonzero()[:5].tolist()
            raise AssertionError(f"masks differ from the reference at {bad}")
    if values:
        torch.testing.assert_close(sel(y).double(), sel(y_ref).double(), equal_nan=True,
                                   **tol(x.dtype))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@SETTINGS
@given(data=st.data())
def test_backend_matches_reference(backend, layer, data):
    load_backend(backend)
    shape = data.draw(shapes(), "shape")
    x = data.draw(inputs(shape), "x").to(DEV)
    op, noise_shape, binary = data.draw(cases(layer, shape), "case")
    noise = uniforms(noise_shape, data.draw(st.integers(0, 2**31 - 1), "noise seed"))

    def ref_of(u):
        with on("reference"):
            return op(x, u)
    with on(backend):
        y = op(x, noise)
    step, rows, values = None, None, True
    if layer == "corrdrop" and x.numel():
        step, (k, nz) = CORR_STEP, op.corr
        ok = corr_ok(x.cpu(), k).to(DEV)
        if not ok.all():  # compare the other samples (their masks only under "batch")
            rows, values = ok, nz != "batch"
    same_output(y, x, ref_of, noise, binary, step, rows, values)


# --------------------------------------------------------------------------- isolation


def poison(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x with non-finite and extreme values in sample 0 (about half of its units)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(specials(x.dtype), dtype=torch.float64).to(x.dtype)
    where = torch.rand(x[0].shape, generator=g) < 0.5
    pick = torch.randint(0, len(vals), x[0].shape, generator=g)
    out = x.clone()
    out[0] = torch.where(where.to(x.device), vals[pick].to(x.device), x[0])
    return out


ISOLATION = {  # layer -> op(x, noise, normalize) and its noise shape
    "corrdrop": (lambda x, u, nz: F.corrdrop(x, 0.5, 3, normalize=nz, noise=u),
                 lambda n, c, h, w: (2, n, -(-h // 3), -(-w // 3))),
    "selectscale": (lambda x, u, nz: F.selectscale(x, 0.5, 0.2, noise=u),
                    lambda n, c, h, w: (n, c)),
    "spatialscale": (lambda x, u, nz: F.spatialscale(x, 0.3, noise=u), lambda n, c, h, w: (n, c)),
    "selectout": (lambda x, u, nz: F.selectout(x, 0.6, 0.7, noise=u), lambda n, c, h, w: (n, c)),
    "attentiondrop-sm": (lambda x, u, nz: F.attentiondrop(x, 0.7, 30.0, mode="sm", normalize=nz,
                                                          noise=u), lambda n, c, h, w: (n, c)),
    "attentiondrop-ad": (lambda x, u, nz: F.attentiondrop(x, 0.7, 30.0, mode="ad", normalize=nz,
                                                          noise=u), lambda n, c, h, w: (n, c)),
    "focused_dropout": (lambda x, u, nz: F.focused_dropout(x, 0.2, 0.7, per_position=True,
                                                           noise=u),
                        lambda n, c, h, w: (n, h, w)),
    "camdrop": (lambda x, u, nz: F.camdrop(x, torch.arange(-4.0, 4.0, device=x.device).view(2, 4)
                                           .repeat_interleave(x.shape[1], 1)[:, : 4 * x.shape[1]],
                                           torch.tensor([0, 1] * x.shape[0], device=x.device)
                                           [: x.shape[0]], 2, 0.5, channel_rate=0.5,
                                           normalize=nz, noise=u),
                lambda n, c, h, w: (n, c, h, w)),
    "dropblock": (lambda x, u, nz: F.dropblock(x, 0.4, 2, normalize=nz, noise=u),
                  lambda n, c, h, w: (n, c, h, w)),
}


@pytest.mark.parametrize("layer", list(ISOLATION))
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@settings(SETTINGS, max_examples=1)
@given(n=st.integers(2, 3), c=st.integers(1, 4), h=st.integers(1, 8), w=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
       seed=st.integers(0, 2**31 - 1))
def test_isolation_of_samples(backend, layer, n, c, h, w, dtype, layout, seed):
    """Non-finite / extreme values in sample 0: with normalize="sample" or "none" every other
    sample's output is bit-identical; with "batch" the others change by one common factor;
    the output is finite wherever x is finite (an Inf or NaN never leaks into a weight)."""
    load_backend(backend)
    op, noise_shape = ISOLATION[layer]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    if layout == "sliced":
        x = torch.randn(n, c, h, w + 3, generator=g).to(dtype)[..., 2 : w + 2]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEV)
    bad = poison(x, seed + 1)
    noise = uniforms(noise_shape(n, c, h, w), seed + 2)
    with on(backend):
        for nz in ("sample", "none", "batch"):
            y, y_bad = op(x, noise, nz), op(bad, noise, nz)
            # (a finite x near the dtype's max may overflow when scaled up: x * w, SPEC §1)
            finite = bad.abs() <= torch.finfo(dtype).max / 64
            assert torch.isfinite(y_bad)[finite].all(), f"{nz}: non-finite leaked"
            if nz != "batch":
                assert torch.equal(y[1:], y_bad[1:]), f"{nz}: sample 0 changed another sample"
                continue
            # one common factor: y_bad[1:] = f * y[1:], the factor read where both are nonzero
            a, b = y[1:].double(), y_bad[1:].double()
            assert torch.equal(a == 0, b == 0), "batch: sample 0 changed another sample's mask"
            nzr = a != 0
            if nzr.any():
                f = (b[nzr] / a[nzr]).median()
                torch.testing.assert_close(b, a * f, **tol(dtype))


# --------------------------------------------------------------------------- argument types


def as_types(r: float):
    """A rate written as each accepted type, with the plain float it converts to."""
    yield np.float64(r), float(np.float64(r))
    yield np.float32(r), float(np.float32(r))
    f = fractions.Fraction(r).limit_denominator(1000)
    yield f, float(f)
    if r in (0.0, 1.0):
        yield int(r), float(r)


@pytest.mark.parametrize("backend", ["reference", TRITON_SLOW, CUDA])
@settings(SETTINGS, max_examples=1)
@given(shape=shapes(empty=False), r=st.sampled_from([0.0, 0.25, 0.3, 0.7, 1.0]),
       k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_argument_types(backend, shape, r, k, seed):
    """numpy scalars, Fractions and ints as rates, numpy integers as block sizes: the same
    output as the plain float / int they convert to, bit for bit, on every layer."""
    load_backend(backend)
    n, c, h, w = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEV)
    weight, target = torch.randn(3, c).to(DEV), torch.tensor([0, 1, 2] * n)[:n].to(DEV)
    kc = -(-h // k), -(-w // k)
    ops = {
        "corrdrop": (lambda p, k: F.corrdrop(x, p, k, noise=uniforms((2, n) + kc, seed)), 1),
        "selectscale": (lambda p, k: F.selectscale(x, p, p, noise=uniforms((n, c), seed)), 0),
        "spatialscale": (lambda p, k: F.spatialscale(x, p, noise=uniforms((n, c), seed)), 0),
        "selectout": (lambda p, k: F.selectout(x, 1.0, max(p, 0.5), noise=uniforms((n, c), seed)),
                      0),
        "attentiondrop": (lambda p, k: F.attentiondrop(x, p, 100 * p or 1, noise=uniforms(
            (n, c), seed)), 0),
        "focused_dropout": (lambda p, k: F.focused_dropout(x, p / 2, p, noise=uniforms(
            (n,), seed)), 0),
        "camdrop": (lambda p, k: F.camdrop(x, weight, target, k, min(p, 0.9), channel_rate=p,
                                           noise=uniforms(shape, seed)), 1),
        "dropblock": (lambda p, k: F.dropblock(x, p, k, noise=uniforms(shape, seed)), 1),
    }
    with on(backend):
        for name, (op, has_k) in ops.items():
            for typed, plain in as_types(r):
                want = op(plain, k)
                got = op(typed, np.int64(k) if has_k else k)
                assert torch.equal(got.isnan(), want.isnan()) and torch.equal(
                    got.nan_to_num(), want.nan_to_num()), f"{name}: {type(typed).__name__}"
            if has_k:
                assert torch.equal(op(r, np.int32(k)), op(r, k)), f"{name}: np.int32"


# --------------------------------------------------------------------------- lazy negations

NEG_OPS = {  # layer -> (op(x, u, weight), noise shape of x (2, 3, 6, 6))
    "corrdrop": (lambda x, u, wt: F.corrdrop(x, 0.5, 2, noise=u), (2, 2, 3, 3)),
    "selectscale": (lambda x, u, wt: F.selectscale(x, 0.5, 0.2, noise=u), (2, 3)),
    "spatialscale": (lambda x, u, wt: F.spatialscale(x, 0.2, noise=u), (2, 3)),
    "selectout": (lambda x, u, wt: F.selectout(x, 0.7, 0.7, noise=u), (2, 3)),
    "attentiondrop": (lambda x, u, wt: F.attentiondrop(x, 0.9, 30.0, mode="ad", noise=u),
                      (2, 3)),
    "focused_dropout": (lambda x, u, wt: F.focused_dropout(x, 0.2, 0.6, noise=u), (2,)),
    "camdrop": (lambda x, u, wt: F.camdrop(x, wt, torch.tensor([0, 2], device=DEV), 2, 0.5,
                                           noise=u), (2, 3, 6, 6)),
    "dropblock": (lambda x, u, wt: F.dropblock(x, 0.3, 2, noise=u), (2, 3, 6, 6)),
}


def lazily_negated(v: torch.Tensor) -> torch.Tensor:
    """v's values in a tensor with the negative bit set, storage holding -v (the imaginary
    part of a conjugate: what z.conj().imag and autograd through complex ops give)."""
    t = torch.complex(torch.zeros_like(v), -v).conj().imag
    assert t.is_neg() and torch.equal(t, v)
    return t


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_lazily_negated_tensors(backend, layer):
    """x, noise, CamDrop's weight and grad_y with the negative bit set (z.conj().imag) give
    what their plain copies give: the kernels read storage, which holds their negation
    (Triton returned -y, and the reference's AttentionDrop raised in Tensor.view)."""
    op, noise_shape = NEG_OPS[layer]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g).to(DEV)
    u = torch.rand(noise_shape, generator=g).to(DEV)
    wt = torch.randn(4, 3, generator=g).to(DEV)
    gy = torch.randn(2, 3, 6, 6, generator=g).to(DEV)
    with on(backend):
        xr = x.clone().requires_grad_()
        y = op(xr, u, wt)
        gx, = torch.autograd.grad(y, xr, gy)
        xn = lazily_negated(x).requires_grad_()
        y_neg = op(xn, lazily_negated(u), lazily_negated(wt))
        gx_neg, = torch.autograd.grad(y_neg, xn, lazily_negated(gy))
        assert torch.equal(y_neg, y) and torch.equal(gx_neg, gx)
