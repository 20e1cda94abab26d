"""Hypothesis: every layer agrees with the naive loops on random shapes, parameters, inputs
and noise (1 x 1 maps, C = 1, N = 1, H != W, sides that are not multiples of the block,
inputs with many ties, every layout)."""

from __future__ import annotations

import math

import naive
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reference_layers import check_corrdrop, check_grad, check_output, close, multiplier

import guidedrop.functional as F
from guidedrop import primitives

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 17), st.integers(1, 17))
rates = st.floats(0.0, 1.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)
kinds = st.sampled_from(["normal", "int"])       # "int": small integers, many exact ties
layouts = st.sampled_from(["contiguous", "channels_last", "sliced"])
dtypes = st.sampled_from([torch.float32, torch.float32, torch.float64])
normalizes = st.sampled_from(["batch", "sample", "none"])


@pytest.fixture(autouse=True, scope="module")
def reference_backend():
    """Pin the reference path (issue 2); module-scoped, as hypothesis re-runs each test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIDEDROP_BACKEND", "reference")
        yield


def build_x(shape, kind, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    big = (n + 1, c + 1, h + 2, w + 3) if layout == "sliced" else shape
    if kind == "int":
        x = torch.randint(-3, 4, big, generator=g).to(dtype)
    else:
        x = torch.randn(big, generator=g, dtype=dtype)
    if layout == "sliced":
        x = x[1:, 1:, 2:, 3:]
        assert tuple(x.shape) == tuple(shape)
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def uniform(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1))


def check(pkg, x, y_ref, w_ref, binary):
    """pkg: t -> the package's output for t (noise and params bound)."""
    w = multiplier(pkg, x)
    if binary:
        assert torch.equal(w == 0, w_ref == 0), "masks differ"
    close(w, w_ref.to(x.dtype), x.dtype)
    check_output(pkg(x), x, y_ref)
    check_grad(pkg, x, w_ref)


@SETTINGS
@given(shape=shapes, p=st.floats(0.05, 1.0), k=st.integers(1, 8), normalize=normalizes,
       kind=kinds, layout=layouts, dtype=dtypes, seed=seeds)
def test_corrdrop(shape, p, k, normalize, kind, layout, dtype, seed):
    x = build_x(shape, kind, layout, dtype, seed)
    noise = naive.safe_corrdrop_noise(x, p, k, torch.Generator().manual_seed(seed))

    def pkg(t):
        return F.corrdrop(t, p, k, normalize=normalize, noise=noise)
    _, w_ref = naive.naive_corrdrop(x, noise, p=p, block_size=k, normalize=normalize)
    w = multiplier(pkg, x)
    w_exp = check_corrdrop(x, w, w_ref, dict(block_size=k), normalize)
    close(w, w_exp.to(x.dtype), x.dtype)
    check_output(pkg(x), x, naive.apply(x, w_exp))
    check_grad(pkg, x, w_exp)


@SETTINGS
@given(shape=shapes, top_rate=rates, retain=st.floats(0.0, 0.99), kind=kinds, layout=layouts,
       dtype=dtypes, seed=seeds)
def test_selectscale(shape, top_rate, retain, kind, layout, dtype, seed):
    x = build_x(shape, kind, layout, dtype, seed)
    noise = uniform(shape[:2], seed)
    y_ref, w_ref = naive.naive_selectscale(x, noise, top_rate=top_rate, retain=retain)
    check(lambda t: F.selectscale(t, top_rate, retain, noise=noise), x, y_ref, w_ref, False)
    y_ref, w_ref = naive.naive_spatialscale(x, noise, retain=retain)
    check(lambda t: F.spatialscale(t, retain, noise=noise), x, y_ref, w_ref, False)


@SETTINGS
@given(shape=shapes, top_rate=rates, keep=st.floats(0.01, 0.99), kind=kinds, layout=layouts,
       dtype=dtypes, seed=seeds)
def test_selectout(shape, top_rate, keep, kind, layout, dtype, seed):
    x = build_x(shape, kind, layout, dtype, seed)
    noise = uniform(shape[:2], seed)
    c = shape[1]
    if round((1 - keep) * c) > max(1, round(top_rate * c)):
        with pytest.raises(ValueError):
            F.selectout(x, top_rate, keep, noise=noise)
        return
    y_ref, w_ref = naive.naive_selectout(x, noise, top_rate=top_rate, keep=keep)
    check(lambda t: F.selectout(t, top_rate, keep, noise=noise), x, y_ref, w_ref, True)


@SETTINGS
@given(shape=shapes, alpha=st.floats(0.01, 1.0), beta=st.floats(0.01, 100.0),
       mode=st.sampled_from(["am", "sm", "ad"]), normalize=normalizes, kind=kinds,
       layout=layouts, dtype=dtypes, seed=seeds)
def test_attentiondrop(shape, alpha, beta, mode, normalize, kind, layout, dtype, seed):
    x = build_x(shape, kind, layout, dtype, seed)
    noise = uniform(shape[:2], seed)
    y_ref, w_ref = naive.naive_attentiondrop(x, noise, alpha=alpha, beta=beta, mode=mode,
                                             normalize=normalize)

    def pkg(t):
        return F.attentiondrop(t, alpha, beta, mode=mode, normalize=normalize, noise=noise)
    check(pkg, x, y_ref, w_ref, mode == "am")


# low / high on a dyadic grid keep gamma * v free of float32-vs-float64 rounding on the
# integer-valued inputs (the comparison x_r > gamma * v is then decided identically).
grid = st.integers(0, 16).map(lambda i: i / 16)


@SETTINGS
@given(shape=shapes, lh=st.tuples(grid, grid), per_position=st.booleans(), kind=kinds,
       layout=layouts, dtype=dtypes, seed=seeds)
def test_focused_dropout(shape, lh, per_position, kind, layout, dtype, seed):
    low, high = min(lh), max(lh)
    x = build_x(shape, kind, layout, dtype, seed)
    n, _, h, w = shape
    noise = uniform((n, h, w) if per_position else (n,), seed)
    y_ref, w_ref = naive.naive_focused_dropout(x, noise, low=low, high=high,
                                               per_position=per_position)

    def pkg(t):
        return F.focused_dropout(t, low, high, per_position=per_position, noise=noise)
    check(pkg, x, y_ref, w_ref, True)


@SETTINGS
@given(shape=shapes, k=st.integers(1, 6), keep=st.floats(0.0, 0.99),
       channel_rate=rates, groups=st.integers(1, 3), normalize=normalizes, kind=kinds,
       layout=layouts, dtype=dtypes, seed=seeds)
def test_camdrop(shape, k, keep, channel_rate, groups, normalize, kind, layout, dtype, seed):
    x = build_x(shape, kind, layout, dtype, seed)
    n, c = shape[:2]
    g = torch.Generator().manual_seed(seed + 2)
    # integer weights with integer inputs keep the CAM exact (its ties are then real ties);
    # averaging over groups of 3 would not be exact, so those inputs use groups of 4
    if kind == "int" and groups == 3:
        groups = 4
    weight = torch.randint(-3, 4, (4, c * groups), generator=g).float() if kind == "int" else \
        torch.randn(4, c * groups, generator=g)
    target = torch.randint(0, 4, (n,), generator=g)
    noise = uniform(shape, seed)
    y_ref, w_ref = naive.naive_camdrop(x, weight, target, noise, block_size=k, keep=keep,
                                       channel_rate=channel_rate, normalize=normalize)

    def pkg(t):
        return F.camdrop(t, weight, target, k, keep, channel_rate=channel_rate,
                         normalize=normalize, noise=noise)
    check(pkg, x, y_ref, w_ref, True)


@SETTINGS
@given(shape=shapes, p=st.floats(0.01, 1.0), k=st.integers(1, 9), shared=st.booleans(),
       normalize=normalizes, layout=layouts, dtype=dtypes, seed=seeds)
def test_dropblock(shape, p, k, shared, normalize, layout, dtype, seed):
    x = build_x(shape, "normal", layout, dtype, seed)
    n, c, h, w = shape
    noise = uniform((n, 1 if shared else c, h, w), seed)
    y_ref, w_ref = naive.naive_dropblock(x, noise, p=p, block_size=k, shared_channels=shared,
                                         normalize=normalize)

    def pkg(t):
        return F.dropblock(t, p, k, shared_channels=shared, normalize=normalize, noise=noise)
    check(pkg, x, y_ref, w_ref, True)


@SETTINGS
@given(shape=shapes, beta=st.floats(0.01, 100.0), seed=seeds)
def test_n_beta_matches_threshold_count(shape, beta, seed):
    """At least n_beta units of every map are >= the threshold, and fewer than n_beta are >."""
    x = build_x(shape, "int", "contiguous", torch.float32, seed)
    t = primitives.top_percentile_threshold(x, beta)
    nb = naive.n_beta(beta, shape[2], shape[3])
    assert nb == max(1, math.ceil(beta * shape[2] * shape[3] / 100))
    flat = x.flatten(2)
    assert ((flat >= t[..., None]).sum(-1) >= nb).all()
    assert ((flat > t[..., None]).sum(-1) < nb).all()
