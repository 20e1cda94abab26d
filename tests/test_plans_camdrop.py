"""CamDrop's plan kernels (``B.plan_camdrop``, issue 12) against the reference plan.

Bit for bit (testing.assert_same_plan) for the same explicit noise: odd
shapes, every dtype and layout, every normalisation, classifier weights of every float
dtype and layout with C_fc / C columns per channel (the in-kernel mean, in float64, must
give the reference's float32 value), ties in the CAM and in alpha (top-k keeps them),
non-finite x and weights, and noise on the seed rate.
"""

from __future__ import annotations

import pytest
import torch
from test_backends import with_ties
from test_plans_dropblock import (
    DTYPES,
    KERNEL_BACKENDS,
    LAYOUTS,
    NORMALIZE,
    on_threshold,
    seeded_generator,
)
from testing import DEV, assert_same, assert_same_plan, load_backend, make_x

from guidedrop import _validation, layers
from guidedrop import reference as R

K = 5  # classes


def weights(c, groups, dtype=torch.float32, seed=0, transposed=False):
    """(K, C * groups): magnitudes over 6 decades, so that a float32 sum in another order
    would show in the mean's rounding."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, c * groups, generator=g) * torch.logspace(-3, 3, c * groups)
    if transposed:  # a non-contiguous weight, as a Linear's weight.t() would be
        return w.to(DEV, dtype).t().contiguous().t()
    return w.to(DEV, dtype)


def targets(n, seed=0):
    return torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(seed)).to(DEV)


def compare(name, x, weight, target, block_size, keep, channel_rate, normalize, noise):
    B = load_backend(name)
    kw = dict(channel_rate=channel_rate, normalize=normalize, noise=noise)
    got = layers.camdrop(B, x, weight, target, block_size, keep, **kw)
    want = layers.camdrop.reference(R, x, weight, target, block_size, keep, **kw)
    assert_same_plan(got, want)
    return got


def noise_for(x, seed=0):
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,block_size", [((1, 1, 3, 3), 3), ((2, 3, 5, 7), 3),
                                              ((3, 2, 4, 9), 2), ((2, 3, 1, 1), 1),
                                              ((2, 3, 5, 7), 6)])
def test_plan_shapes(name, shape, block_size):
    """Odd shapes (C = 1, 1x1 maps, H != W, r = 1, even r; r > H: no plan)."""
    x = make_x(shape, device=DEV)
    n, c, h, w = shape
    r = block_size
    g = layers._seed_rate(1 - 0.7, r, h, w) if r <= min(h, w) else 0.5
    u = on_threshold(noise_for(x, 1), g)
    for normalize in NORMALIZE:
        compare(name, x, weights(c, 1), targets(n), block_size, 0.7, 0.5, normalize, u)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("groups", [1, 2, 3, 5, 8, 13, 40])
def test_plan_alpha_mean(name, groups):
    """alpha = weight[target] averaged over C_fc / C columns: bit-exact (the channel
    candidates and J depend on its last bit), short and long groups."""
    x = make_x((2, 6, 4, 5), device=DEV)
    for wdt, transposed in ((torch.float32, False), (torch.float64, True)):
        w = weights(6, groups, wdt, seed=groups, transposed=transposed)
        compare(name, x, w, targets(2, groups), 2, 0.6, 0.5, "batch", noise_for(x, 2))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_dtypes_layouts(name, dtype, layout):
    x = make_x((2, 3, 5, 7), dtype, DEV, layout)
    w = weights(3, 2, torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    compare(name, x, w, targets(2, 3), 3, 0.8, 0.7, "batch", noise_for(x, 3))
    compare(name, x, weights(3, 1), targets(2, 4), 2, 0.8, 0.4, "sample", noise_for(x, 4))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_ties(name):
    """Ties in J (x on a few values) and in alpha (a weight on a few values): top-k keeps
    every tie; the same target twice."""
    x = with_ties(make_x((3, 6, 5, 6), device=DEV))
    w = weights(6, 2).round().clamp(-2, 2)
    t = torch.tensor([1, 1, 4], device=DEV)
    for rate in (0.0, 0.34, 1.0):
        plan = compare(name, x, w, t, 2, 0.5, rate, "batch", noise_for(x, 5))
    assert plan.state[0].any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Inf * 0
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_nonfinite(name):
    """NaN / ±Inf in x (J NaN or infinite: NaN ranks largest and is a candidate) and in
    the weight (alpha NaN or infinite)."""
    x = make_x((2, 4, 5, 5), device=DEV)
    x[0, 1, 2, 3] = float("nan")
    x[1, :, 0, 0] = float("inf")
    x[1, 2, 4, :] = -float("inf")
    w = weights(4, 2)
    w[2, 3] = float("nan")
    w[3, 0] = float("inf")
    u = noise_for(x, 6)
    for t in ([2, 3], [0, 1], [3, 2]):
        compare(name, x, w, torch.tensor(t, device=DEV), 2, 0.5, 0.5, "sample", u)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_fresh_noise(name):
    B = load_backend(name)
    x = make_x((2, 3, 6, 6), device=DEV)
    gen = seeded_generator(name)
    kw = dict(channel_rate=0.5, normalize="batch")
    a = layers.camdrop(B, x, weights(3, 1), targets(2), 3, 0.5, **kw,
                       generator=gen.manual_seed(1))
    b = layers.camdrop(B, x, weights(3, 1), targets(2), 3, 0.5, **kw,
                       generator=gen.manual_seed(1))
    assert_same_plan(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 3, 3), (3, 1, 13, 6), (2, 5, 15, 15), (4, 3, 9, 20)])
def test_plan_matrix(name, dtype, layout, shape):
    x = make_x(shape, dtype, DEV, layout)
    n, c = shape[:2]
    # each class-group count, block size and normalisation once (the scale does not depend
    # on r, nor the selection on how many classes there are): 3 plans a case, not 9
    for groups, block_size, normalize in zip((1, 4, 9), (1, 3, 7), NORMALIZE, strict=True):
        compare(name, x, weights(c, groups, seed=groups), targets(n, groups),
                block_size, 0.8, 0.5, normalize, noise_for(x, 7))


def test_plan_selection_geometry(monkeypatch):
    """Rows longer than a register tile (re-read chunk by chunk) and several programs of
    rows, the spatial and channel programs differing in number (geometry shrunk so that
    small shapes take those paths)."""
    B = load_backend("triton")  # Triton's launch geometry
    import guidedrop.triton_kernels.plans.camdrop as CD
    x = make_x((3, 6, 4, 5), device=DEV)
    u = noise_for(x, 8)
    w = weights(6, 1).round()  # ties in alpha
    for max_row, chunk, tile in ((8, 8, 8), (32, 4096, 16)):
        monkeypatch.setattr(CD, "MAX_ROW", max_row)
        monkeypatch.setattr(CD, "CHUNK", chunk)
        monkeypatch.setattr(CD, "TILE", tile)
        compare(B.name, x, w, targets(3, 9), 2, 0.5, 0.5, "batch", u)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_plan_strided_targets(name):
    """A sliced or expanded (stride 0) int64 target is read by value, not by memory order
    (found by an adversarial pass: the kernel read target[n] at offset n)."""
    x = make_x((4, 4, 5, 5), device=DEV)
    w = weights(4, 2)
    for t in (torch.tensor([2, 0, 0, 0, 0, 0])[:1].expand(4),
              torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])[::2]):
        compare(name, x, w, t.to(DEV), 2, 0.8, 0.5, "batch", noise_for(x, 2))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.uint8])
def test_plan_target_dtypes(name, dtype):
    """Targets of every integer dtype reach the plan unconverted (no launch) and are read
    by value: uint8 with N = K is an index, never a mask; contiguous and sliced."""
    x = make_x((K, 4, 5, 5), device=DEV)
    w = weights(4, 2)
    u = noise_for(x, 3)
    t64 = torch.tensor([4, 0, 0, 3, 3, 1, 1, 2, 2, 4], device=DEV)
    for t in (t64[::2], t64[1::2].contiguous()):
        got = compare(name, x, w, t.to(dtype), 2, 0.6, 0.5, "batch", u)
        want = layers.camdrop.reference(R, x, w, t, 2, 0.6, channel_rate=0.5,
                                        normalize="batch", noise=u)
        assert_same_plan(got, want)  # the int64 plan: rows W[t] by value


@pytest.mark.parametrize("bad", [[0, 5], [-1, 2], [127, 0], [3, -128]])
def test_plan_target_out_of_range(bad, monkeypatch):
    """SPEC §6 step 0 in the backends (a target not checked on the host: on a GPU, or
    while torch.compile traces): the reference asserts in torch ops (RuntimeError naming
    target on the CPU). The Triton plan asserts in its CAM kernel and clamps the row, so
    that without device assertions nothing is read out of bounds: the CAM of the clamped
    target; with the interpreter's assertions on (as the kernel's debug=True compiles them
    on a GPU) the kernel raises, naming target. On CPU tensors (the interpreter, which
    skips device assertions) the plan op checks the range on the host first: a
    ValueError naming target (it took the clamped class under torch.compile)."""
    x = make_x((2, 4, 5, 5), device=DEV)
    w = weights(4, 2)
    t = torch.tensor(bad, dtype=torch.int8, device=DEV)
    kw = dict(channel_rate=0.5, normalize="batch", noise=noise_for(x, 4))
    with pytest.raises(RuntimeError, match="target"):
        layers.camdrop.reference(R, x, w, t, 2, 0.6, **kw)
    B = load_backend("triton")
    if DEV != "cpu":
        return  # on a GPU the assertion would poison the CUDA context
    with pytest.raises(ValueError, match="target must hold class indices"):
        layers.camdrop(B, x, w, t, 2, 0.6, **kw)
    from guidedrop.triton_kernels.class_activation import cam_launch

    def cam(target):
        j, alpha = torch.empty(2, 5, 5), torch.empty(2, 4)
        cam_launch(x, j, weight=w, target=target, alpha_out=alpha)
        return j, alpha

    clamped = t.long().clamp(0, K - 1)
    for got, want in zip(cam(t), cam(clamped), strict=True):
        assert_same(got, want, "the kernel's clamped row")
    from triton.runtime import interpreter as I
    monkeypatch.setattr(I.interpreter_builder, "options", I.InterpreterOptions(debug=True))
    with pytest.raises(BaseException, match="target must hold class indices"):
        cam(t)
    # the assertion holds for a target in range (it is the range, not its negation)
    _, alpha = cam(torch.tensor([4, 0], dtype=torch.int8))
    assert torch.equal(alpha, w[[4, 0]].view(2, 4, 2).double().mean(2).float())


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("block_size", [6, 9])
def test_plan_target_checked_when_block_exceeds_map(name, block_size, monkeypatch):
    """SPEC §6 step 0 holds whatever the block size: with r > H or r > W no kernel runs
    (nothing is dropped), so the plan asserts a target not checked on the host (a GPU one,
    or one seen while compiling) in torch ops, as the reference does (found by an
    adversarial pass: the CUDA plan returned None without looking at the target)."""
    B = load_backend(name)
    x = make_x((2, 4, 5, 7), device=DEV)
    w = weights(4, 2)
    kw = dict(channel_rate=0.5, normalize="batch", noise=noise_for(x, 4))
    good = torch.tensor([4, 0], device=DEV)
    assert layers.camdrop(B, x, w, good, block_size, 0.6, **kw) is None
    # the device path (the check a CPU target gets on the host is skipped there)
    monkeypatch.setattr(_validation, "target_checked_on_host", lambda t: False)
    for bad in ([0, 5], [-1, 2]):
        t = torch.tensor(bad, device=DEV)
        with pytest.raises(RuntimeError, match="target"):
            layers.camdrop.reference(R, x, w, t, block_size, 0.6, **kw)
        if DEV != "cpu":
            return  # on a GPU the assertion would poison the CUDA context
        with pytest.raises(RuntimeError, match="target"):
            layers.camdrop(B, x, w, t, block_size, 0.6, **kw)
