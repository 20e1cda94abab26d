"""Faults found by fuzzing (issue 11) in the block masks, the Bernoulli draws and autograd,
on every backend: the reference, Triton (under TRITON_INTERPRET=1 without a GPU) and the
CUDA sources (on the SIMT emulator of tests/cuda_emu/ without a GPU, the real ops with one).

- Noise dtype (SPEC §1): ``bernoulli(q)`` is ``u < q`` with u and q both rounded to the
  compute dtype first, whatever the dtype of ``noise``.
- Block sizes beyond the map (SPEC §1): any block size >= 1 is valid; it is then one block,
  and no work or memory grows with it.
- Second order (SPEC §1): the backward is grad_y * w with w constant, differentiable again.
- Rates are runtime values (SPEC §8): a schedule never recompiles a compiled model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from test_training import _module_for
from testing import CUDA, DEV, HAS_CUDA, assert_same, load_backend
from torch import nn

import guidedrop
import guidedrop.functional as F
from guidedrop import autograd as A
from guidedrop import dispatch, primitives
from guidedrop import layers as L
from guidedrop import reference as R

BACKENDS = ["reference", "triton", CUDA]
LAYERS = ["corrdrop", "selectscale", "spatialscale", "selectout", "attentiondrop",
          "focused_dropout", "camdrop", "dropblock"]


@pytest.fixture(params=BACKENDS)
def B(request):
    return load_backend(request.param)


@pytest.fixture(params=BACKENDS)
def forced(request, monkeypatch):
    """Forces the backend of guidedrop.functional (the emulated CUDA ops without a GPU)."""
    mod = load_backend(request.param)
    monkeypatch.setenv("GUIDEDROP_BACKEND", request.param)
    monkeypatch.setitem(dispatch._loaded, request.param, (mod, ""))
    return mod


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(B, layer, x, *args, **kw):
    """x * w of ``layer`` on backend B with autograd (x when the layer is the identity)."""
    plan = getattr(L, layer)(B, x.detach(), *args, **kw)
    return x if plan is None else A.apply(B, plan, x)


def _cam_args(n, c, seed=5):
    g = gen(seed)
    weight = torch.randn(10, 2 * c, generator=g)  # C_fc = 2 C: grouped weights
    return weight.to(DEV), torch.randint(0, 10, (n,), generator=g).to(DEV)


def layer_case(layer, n, c, h, w):
    """(args, kwargs, noise shape) of each layer on an (N, C, H, W) map."""
    k = 3
    if layer == "corrdrop":
        return (0.4, k), dict(normalize="batch"), (2, n, -(-h // k), -(-w // k))
    if layer == "selectscale":
        return (0.5, 0.1), {}, (n, c)
    if layer == "spatialscale":
        return (0.3,), {}, (n, c)
    if layer == "selectout":
        return (0.5, 0.75), {}, (n, c)
    if layer == "attentiondrop":
        return (0.6, 20.0), dict(mode="ad", normalize="batch"), (n, c)
    if layer == "focused_dropout":
        return (0.3, 0.6), dict(per_position=True), (n, h, w)
    if layer == "camdrop":
        weight, target = _cam_args(n, c)
        return (weight, target, 3, 0.6), dict(channel_rate=1.0, normalize="batch"), (n, c, h, w)
    return (0.4, 3), dict(shared_channels=False, normalize="batch"), (n, c, h, w)


# --------------------------------------------------------------------------- noise dtype


def _near(q: float, shape, seed) -> torch.Tensor:
    """float64 uniforms within rounding of q: q in float32, one float64 step either side of
    it (well under half a float32 ulp), the midpoint between q and float32(q), and q."""
    q32 = float(torch.tensor(q, dtype=torch.float32))
    d = 2.0 ** -40
    vals = torch.tensor([q32 - d, q32 + d, (q + q32) / 2, q, q32, q32 - 2 * d], dtype=torch.float64)
    idx = torch.randint(0, len(vals), shape, generator=gen(seed))
    far = torch.rand(shape, generator=gen(seed + 1), dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=gen(seed + 2)) < 0.75, vals[idx], far)


def test_dropblock_noise_between_roundings(B):
    """The fuzzed case: float64 noise between g in float32 and g in float64 (float32 x)
    drops exactly what float32(noise) < float32(g) drops, on every backend."""
    x = torch.randn(2, 2, 8, 8, generator=gen(0)).to(DEV)
    g = L._seed_rate(0.3, 3, 8, 8)
    g32 = float(torch.tensor(g, dtype=torch.float32))
    for u in ((g + g32) / 2, g32 - 2.0 ** -40, g32 + 2.0 ** -40):
        noise = torch.full(x.shape, u, dtype=torch.float64, device=DEV)
        y = run(B, "dropblock", x, 0.3, 3, shared_channels=False, normalize="none", noise=noise)
        seeds = (noise.float() < g32) & R.valid_centres(8, 8, 3, DEV)
        want = x * ~R.expand_seeds(seeds, 3)
        assert_same(y, want, f"u = {u!r}")


@pytest.mark.parametrize("layer", LAYERS)
def test_noise_dtype_does_not_change_the_draw(B, layer):
    """Every Bernoulli (and every uniform) of every layer: noise of any float dtype gives
    the output of the same noise rounded to float32 (the compute dtype of float32 x), with
    uniforms placed within rounding of the layer's thresholds; and the reference's."""
    n, c, h, w = 2, 3, 7, 8
    x = torch.randn(n, c, h, w, generator=gen(1)).to(DEV)
    args, kw, shape = layer_case(layer, n, c, h, w)
    if layer == "dropblock":
        q = [L._seed_rate(0.4, 3, h, w)]
    elif layer == "camdrop":
        q = [L._seed_rate(1 - 0.6, 3, h, w)]
    elif layer == "attentiondrop":
        q = [0.6]
    elif layer == "corrdrop":  # kappa of each block, and 1 - p_hat for z = N' (kappa = 0)
        f = R.pooled_correlation(x.cpu(), 3).flatten(1).double()
        kappa = (f - f.amin(1, keepdim=True)) / (f.amax(1, keepdim=True) - f.amin(1, keepdim=True))
        p_hat = 0.4 * h * w / 9 / f.shape[1]
        q = [kappa.flatten()[i].item() for i in range(6)] + [1 - p_hat]
    else:
        q = [0.5]
    noise64 = torch.cat([_near(v, (math.prod(shape),), 10 + i)[None] for i, v in enumerate(q)])
    pick = torch.randint(0, len(q), (math.prod(shape),), generator=gen(3))
    noise64 = noise64.gather(0, pick[None])[0].view(shape).to(DEV)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        noise = noise64.to(dtype)
        y = run(B, layer, x, *args, noise=noise, **kw)
        want = run(B, layer, x, *args, noise=noise.float(), **kw)
        ref = run(R, layer, x, *args, noise=noise, **kw)
        what = f"{layer} {dtype}"
        assert_same(y, want, what)
        if layer == "attentiondrop":  # its scale is a float32 sum on the kernel backends
            torch.testing.assert_close(y, ref)
            assert_same(y == 0, ref == 0, what)
        else:
            assert_same(y, ref, what)


@pytest.mark.parametrize("layer", ["dropblock", "camdrop", "attentiondrop", "corrdrop"])
def test_noise_dtype_float64_x_reference(layer):
    """float64 x (reference only): u and q compared in float64; float32 noise is exact."""
    n, c, h, w = 2, 3, 7, 8
    x = torch.randn(n, c, h, w, generator=gen(2), dtype=torch.float64)
    args, kw, shape = layer_case(layer, n, c, h, w)
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    noise = torch.rand(shape, generator=gen(4))
    for dtype in (torch.float16, torch.bfloat16):
        u = noise.to(dtype)
        assert_same(run(R, layer, x, *args, noise=u, **kw),
                    run(R, layer, x, *args, noise=u.double(), **kw))
    g = L._seed_rate(0.4, 3, h, w)
    if layer == "dropblock":  # a uniform between g32 and g: kept in float64, dropped in float32
        g32 = float(torch.tensor(g, dtype=torch.float32))
        u = torch.full((n, c, h, w), (g + g32) / 2, dtype=torch.float64)
        y = run(R, layer, x, *args, noise=u, **dict(kw, normalize="none"))
        seeds = (u < g) & R.valid_centres(h, w, 3, "cpu")
        assert_same(y, x * ~R.expand_seeds(seeds, 3))


# --------------------------------------------------------------------------- block sizes

HUGE = [10**5, 2**31, 2**63 - 1, 2**63 + 5, 2**64 + 1, 10**400]


def test_corrdrop_block_larger_than_map(B):
    """k >= max(H, W): one block per sample; kept iff u[1] < 1 - p_hat with
    p_hat = min(1, p H W / k^2) (z = 1); the output equals the k = max(H, W) one wherever
    p_hat agrees (always kept once p_hat < 2^-25), on every backend, for any int k."""
    n, c, h, w = 3, 2, 8, 6
    x = torch.rand(n, c, h, w, generator=gen(5)).to(DEV)
    noise = torch.rand(2, n, 1, 1, generator=gen(6)).to(DEV)
    noise[1, 0] = 0.9999  # dropped for k = 8 (p_hat = 0.375), kept once p_hat is tiny
    kept_at_8 = noise[1, :, 0, 0] < 1 - 0.5 * h * w / 64
    at_map = run(B, "corrdrop", x, 0.5, 8, normalize="none", noise=noise)
    assert_same(at_map, x * kept_at_8[:, None, None, None], "k = 8")
    assert_same(run(B, "corrdrop", x, 0.5, 9, normalize="none", noise=noise),
                x * (noise[1, :, 0, 0] < 1 - 0.5 * h * w / 81)[:, None, None, None], "k = 9")
    for k in HUGE:
        y = run(B, "corrdrop", x, 0.5, k, normalize="batch", noise=noise)
        assert_same(y, x, f"k = {k if k < 2**70 else 'huge'}")  # every block kept, scale 1
    # Through the public op (validation included), also on a map wider than tall.
    x2 = torch.rand(1, 2, 3, 11, generator=gen(7)).to(DEV)
    u2 = torch.rand(2, 1, 1, 1, generator=gen(8)).to(DEV)
    for k in (11, 12, 2**63 + 1):
        plan = L.corrdrop(B, x2, 0.3, k, normalize="batch", noise=u2)
        assert plan.state[0].shape == (1, 1, 1) and plan.meta[0] <= 11


def test_corrdrop_block_between_map_sides(B):
    """H < k < W: blocks cut by the bottom border; same as the reference."""
    x = torch.rand(2, 3, 4, 19, generator=gen(9)).to(DEV)
    noise = torch.rand(2, 2, 1, 3, generator=gen(10)).to(DEV)
    assert_same(run(B, "corrdrop", x, 0.5, 7, normalize="batch", noise=noise),
                run(R, "corrdrop", x, 0.5, 7, normalize="batch", noise=noise))


def test_functional_corrdrop_huge_block(forced):
    x = torch.rand(1, 2, 8, 8, generator=gen(11)).to(DEV)
    noise = torch.rand(2, 1, 1, 1, generator=gen(12)).to(DEV)
    for k in (10**5, 2**31, 2**63 + 1, 10**400):
        assert_same(F.corrdrop(x, 0.5, k, noise=noise), x)
    y = guidedrop.CorrDrop(p=0.5, block_size=10**6)(x)  # noise=None: fresh draws
    assert y.shape == x.shape


@pytest.mark.parametrize("forced", ["reference", "triton"], indirect=True)
def test_corrdrop_huge_block_under_dynamic_compile(forced):
    """A helper's attack: CorrDrop compiled with dynamic=True and k >= 2^32 failed in
    torch's int64 (OverflowError: int too big to convert, from k^2 in eq. 11's H W / k^2,
    reference.blocks_dropped); k past int64 (2^64 + 1 a symbolic input: its value then
    overflowed the graph's int64 too) and past the float range. Equal to eager, module and
    functional."""
    x = torch.rand(2, 3, 5, 6, generator=gen(13))
    noise = torch.rand(2, 2, 1, 1, generator=gen(14))

    def op(t, k):
        return F.corrdrop(t, 0.5, k, noise=noise)
    for k in (2**31 - 1, 2**32, 2**63 + 5, 2**64 + 1, 10**400):
        torch._dynamo.reset()
        compiled = torch.compile(op, backend="aot_eager", dynamic=True)
        assert torch.equal(compiled(x, k), op(x, k)), k
        m = guidedrop.CorrDrop(p=0.5, block_size=k)
        torch.manual_seed(0)
        y = torch.compile(m, backend="aot_eager", dynamic=True)(x)
        torch.manual_seed(0)
        assert torch.equal(y, m(x)), k
    torch._dynamo.reset()


def test_apply_block_huge_k(B):
    """apply_block with k beyond the map reads mask[n, 0, 0]: as k = max(H, W)."""
    n, c, h, w = 2, 3, 5, 7
    t = torch.randn(n, c, h, w, generator=gen(13)).to(DEV)
    mask = (torch.rand(n, 1, 1, generator=gen(14)) < 0.5).to(torch.uint8).to(DEV)
    scale = (torch.rand(n, generator=gen(15)) + 0.5).to(DEV)
    want = R.apply_block(t, mask, 7, scale)
    for k in HUGE:
        assert_same(B.apply_block(t, mask, k, scale), want, f"k = {k if k < 2**70 else 'huge'}")


def test_pooled_correlation_huge_k(B, monkeypatch):
    """pooled_correlation with k beyond the map is one window, as k = max(H, W), on every
    backend and through guidedrop.primitives: also k >= 2**63, which the int64 schema of
    a kernel op cannot take unclamped."""
    x = torch.randn(2, 3, 5, 7, generator=gen(18)).to(DEV)
    want = R.pooled_correlation(x, 7)
    monkeypatch.setenv("GUIDEDROP_BACKEND", B.name)
    monkeypatch.setitem(dispatch._loaded, B.name, (B, ""))
    for k in HUGE:
        label = f"k = {k if k < 2**70 else 'huge'}"
        assert_same(B.pooled_correlation(x, k), want, label)
        assert_same(primitives.pooled_correlation(x, k), want, label)


def test_block_upsample_any_k():
    """primitives.block_upsample: any k >= 1; k >= max(H, W) is one block (mask[:, 0, 0])."""
    mask = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    for k, (h, w) in [(1, (3, 4)), (2, (5, 7)), (3, (7, 10)), (3, (9, 12))]:
        i, j = torch.arange(h) // k, torch.arange(w) // k
        assert_same(primitives.block_upsample(mask, k, h, w), mask[:, i][:, :, j], f"k = {k}")
    for k in [12, 13] + HUGE:
        assert_same(primitives.block_upsample(mask, k, 5, 12),
                    mask[:, :1, :1].expand(2, 5, 12).contiguous(),
                    f"k = {k if k < 2**70 else 'huge'}")
    with pytest.raises(ValueError, match="mask"):
        primitives.block_upsample(mask, 2, 7, 8)


@pytest.mark.parametrize("h, w, exc, name", [
    (-1, 4, ValueError, "h"), (3, -2, ValueError, "w"), (3.0, 4, TypeError, "h"),
    (3, True, TypeError, "w"), (torch.tensor(3), 4, TypeError, "h")])
def test_block_upsample_checks_h_w(h, w, exc, name):
    """H and W are integral numbers >= 0 like any size argument (SPEC §1): a negative or
    float H used to reach torch.arange (RuntimeError) or indexing (IndexError)."""
    with pytest.raises(exc, match=f"^{name} "):
        primitives.block_upsample(torch.ones(1, 2, 2), 2, h, w)
    with pytest.raises(TypeError, match="mask"):
        primitives.block_upsample([[[1.0]]], 2, 2, 2)
    assert primitives.block_upsample(torch.ones(1, 2, 2), 2, np.int64(3), np.uint8(0)).shape == (
        1, 3, 0)


def test_dropblock_camdrop_huge_blocks(B):
    """DropBlock: r = min(block_size, H, W) for any block_size; CamDrop with r > H or W
    drops nothing (returns x)."""
    n, c, h, w = 2, 3, 6, 5
    x = torch.randn(n, c, h, w, generator=gen(16)).to(DEV)
    noise = torch.rand(n, c, h, w, generator=gen(17)).to(DEV) * 0.01
    want = run(R, "dropblock", x, 0.3, 5, shared_channels=False, normalize="batch", noise=noise)
    for k in HUGE:
        assert_same(run(B, "dropblock", x, 0.3, k, shared_channels=False, normalize="batch",
                        noise=noise), want, f"k = {k if k < 2**70 else 'huge'}")
    weight, target = _cam_args(n, c)
    for k in HUGE:
        y = run(B, "camdrop", x, weight, target, k, 0.5, channel_rate=1.0, normalize="batch",
                noise=noise)
        assert_same(y, x)


# --------------------------------------------------------------------------- second order


def _plans(B, x, seed=20):
    n, c, h, w = x.shape
    g = gen(seed)
    for layer in LAYERS:
        args, kw, shape = layer_case(layer, n, c, h, w)
        noise = torch.rand(shape, generator=g).to(DEV)
        yield layer, getattr(L, layer)(B, x, *args, noise=noise, **kw)


def test_second_order_every_layer(B):
    """create_graph=True with loss sum(y^2): g = 2 x w^2, d(sum(g v))/dx = 2 w^2 v, and the
    first backward's derivative in grad_y is w; w the backend's constant multiplier (for
    AttentionDrop no derivative through S), equal to the reference's."""
    x0 = torch.randn(2, 3, 7, 8, generator=gen(21)).to(DEV)
    v = torch.randn(x0.shape, generator=gen(22)).to(DEV)
    ref_w = {layer: L.apply(R, p, torch.ones_like(x0), x0) for layer, p in _plans(R, x0)}
    for layer, plan in _plans(B, x0):
        w = L.apply(B, plan, torch.ones_like(x0), x0)
        torch.testing.assert_close(w, ref_w[layer], rtol=1e-6, atol=0)
        x = x0.clone().requires_grad_()
        y = A.apply(B, plan, x)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        torch.testing.assert_close(gx, 2 * x0 * w * w, rtol=1e-6, atol=1e-6)
        (hx,) = torch.autograd.grad((gx * v).sum(), x)
        torch.testing.assert_close(hx, 2 * w * w * v, rtol=1e-6, atol=1e-6, msg=layer)
        gy = torch.randn(x0.shape, generator=gen(23)).to(DEV).requires_grad_()
        (gx,) = torch.autograd.grad(A.apply(B, plan, x), x, gy, create_graph=True)
        (dgy,) = torch.autograd.grad((gx * v).sum(), gy)
        torch.testing.assert_close(dgy, w * v, rtol=1e-6, atol=1e-6, msg=layer)


# float32 on purpose on the kernel backends (they have no float64): gradcheck's advice
# to use double precision does not apply.
@pytest.mark.filterwarnings("ignore:Input #\\d+ requires gradient and is not a double")
def test_gradgradcheck_every_layer(B):
    """torch.autograd.gradgradcheck of x -> x * w with the layer's w held constant (its
    plan, and AttentionDrop's source of S, fixed): double backward never raises and is
    never silently wrong. float64 on the reference, float32 with loose tolerances else."""
    dtype = torch.float64 if B is R else torch.float32
    x0 = torch.randn(2, 2, 5, 6, generator=gen(24), dtype=dtype).to(DEV)
    loose = {} if dtype == torch.float64 else dict(eps=1e-2, atol=1e-2, rtol=1e-2)
    for layer, plan in _plans(B, x0):
        def fn(t, plan=plan):
            src = x0 if plan.kind == "attention" else None
            return A._ApplyPlan.apply(t, src, B, plan.kind, plan.meta, plan.state)
        assert torch.autograd.gradgradcheck(fn, (x0.clone().requires_grad_(),), fast_mode=True,
                                            **loose), layer


def _ops_with_w(x0, noise_seed):
    """(layer, op, w) for every layer: op(x) the public op with fixed noise (drawn from
    ``noise_seed``), w = op(x0) / x0 its multiplier (x0 without zeros)."""
    n, c, h, w = x0.shape
    for layer in LAYERS:
        args, kw, shape = layer_case(layer, n, c, h, w)
        noise = torch.rand(shape, generator=gen(noise_seed)).to(DEV)
        fn = getattr(F, layer)

        def op(t, fn=fn, args=args, kw=kw, noise=noise):
            return fn(t, *args, noise=noise, **kw)
        yield layer, op, op(x0) / x0


def test_second_order_functional(forced):
    """The public ops with create_graph=True: the Hessian-vector product of sum(y^2) is
    2 w^2 v, w = y / x from the same noise (x without zeros)."""
    x0 = (torch.rand(2, 3, 5, 6, generator=gen(27)) + 0.5).to(DEV)
    v = torch.randn(x0.shape, generator=gen(28)).to(DEV)
    for layer, op, wt in _ops_with_w(x0, noise_seed=29):
        x = x0.clone().requires_grad_()
        y = op(x)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        (hx,) = torch.autograd.grad((gx * v).sum(), x)
        torch.testing.assert_close(hx, 2 * wt * wt * v, rtol=1e-5, atol=1e-5, msg=layer)


@pytest.mark.filterwarnings("ignore:`torch.jit.script:FutureWarning")  # jacobian's vmap
def test_grads_batched(forced):
    """torch.autograd.grad(y, x, G, is_grads_batched=True): a batch of grad_y (torch's
    legacy vmap of the backward) gives G * w. Triton's launch could not read the batched
    tensor (NotImplementedError: Cannot access storage of BatchedTensorImpl). With
    create_graph=True: guidedrop's NotImplementedError, not a silently detached gradient."""
    x0 = (torch.rand(2, 3, 5, 6, generator=gen(30)) + 0.5).to(DEV)
    grads = torch.randn((3, *x0.shape), generator=gen(31)).to(DEV)
    for layer, op, wt in _ops_with_w(x0, noise_seed=32):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(op(x), x, grads, is_grads_batched=True)
        torch.testing.assert_close(gx, grads * wt, rtol=1e-5, atol=1e-5, msg=layer)
        # with create_graph torch's batching drops the Function's graph: the gradient did
        # not require grad, and a second backward missed its term without an error
        with pytest.raises(NotImplementedError, match="is_grads_batched=True, create_graph"):
            torch.autograd.grad(op(x), x, grads.clone().requires_grad_(),
                                is_grads_batched=True, create_graph=True)
    # the forward-mode vectorised Jacobian batches its tangents with grad mode on: refused,
    # the message naming it (it named is_grads_batched only)
    with pytest.raises(NotImplementedError, match="strategy='forward-mode'"):
        torch.autograd.functional.jacobian(op, x0, vectorize=True,
                                           strategy="forward-mode")


# --------------------------------------------------------------------------- recompiles


def _module(layer):
    m = _module_for(layer)
    if layer == "focused_dropout":
        m.participation = 1.0  # every step applies the op, so every step is compiled
    return m


def ramp_backends(*before):
    """(*before, backend) for every backend. The kernel backends' ramps are slow:
    tests/test_training.py ramps the default backend."""
    cuda_marks = [pytest.mark.slow, *CUDA.marks] if not HAS_CUDA else pytest.mark.slow
    return [pytest.param(*before, "reference"),
            pytest.param(*before, "triton", marks=pytest.mark.slow),
            pytest.param(*before, "cuda", marks=cuda_marks)]


# dynamic=True on the reference backend only: its fault was the modules', above the backends
# (and with dynamic=None every backend takes the rate symbolic from the second value on).
@pytest.mark.parametrize("dynamic,forced", [*ramp_backends(None), (True, "reference")],
                         indirect=["forced"])
@pytest.mark.parametrize("layer", LAYERS)
def test_rate_ramp_never_recompiles(forced, layer, dynamic):
    """Conv + layer compiled with fullgraph=True and driven by LinearRamp(steps=20), the
    README's set-up: after the first rates (0: the identity; then the rate made symbolic)
    no step recompiles (SPEC §8), on every backend. With dynamic=True the rate is symbolic
    from the first graph on, and a graph that read it without using it (the identity: a
    forward in eval mode first, then the ramp's 0) made Dynamo pin it in every later graph:
    a recompile per step (frames 2, 3, 4, ...), until the modules decided the identity from
    bools (GuidedDropout._identity)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _module(layer)).to(DEV)
    sched = guidedrop.LinearRamp(model, steps=20)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=dynamic)
    weight, target = _cam_args(2, 4)
    x = torch.randn(2, 3, 7, 7, generator=gen(26)).to(DEV)
    frames = []
    with guidedrop.cam_targets(weight, target):
        if dynamic:
            with torch.no_grad():
                compiled.eval()(x)
            compiled.train()
        for _ in range(12):  # past the 8 recompiles that used to fail at step 9
            compiled(x).sum().backward()
            sched.step()
            frames.append(counter.frame_count)
    assert frames[-1] == frames[3], frames  # no compile after the first rates
    assert frames[-1] <= (4 if dynamic else 3), frames


@pytest.mark.parametrize("forced", ramp_backends(), indirect=True)
@pytest.mark.parametrize("layer,rate", [("selectscale", "top_rate"), ("selectout", "top_rate"),
                                        ("camdrop", "channel_rate")])
def test_count_rates_never_recompile(forced, layer, rate):
    """top_rate and channel_rate decide a top-k's size, max(1, round(rate * C)): a python
    int from a symbolic float, which Dynamo specialised on, one recompile per value (SPEC
    §8; frames 1, 3, 4, 5, ...). layers.top_count makes it a runtime tensor while traced:
    after the first change, none; and each compiled step is the eager one, exactly."""
    torch._dynamo.reset()
    kw = {"selectscale": {}, "selectout": dict(keep=0.9),
          "camdrop": dict(block_size=3, keep=0.5)}[layer]
    op = getattr(F, layer)
    weight, target = _cam_args(2, 10)
    args = (weight, target) if layer == "camdrop" else ()
    x = torch.randn(2, 10, 7, 7, generator=gen(27)).to(DEV)
    noise = torch.rand((2, 10, 7, 7) if layer == "camdrop" else (2, 10), generator=gen(28))

    def step(x, value, noise):
        return op(x, *args, **{rate: value}, **kw, noise=noise)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    frames = []
    for value in (0.5, 0.51, 0.3, 0.25, 0.15, 0.95, 0.05):  # counts 5, 5, 3, 2, 2, 10, 1
        u = noise.to(DEV)
        assert torch.equal(compiled(x, value, u), step(x, value, u)), value
        frames.append(counter.frame_count)
    assert frames[-1] == frames[1] <= 2, frames


@pytest.mark.parametrize("forced,compiler", [
    ("reference", "aot_eager"), ("triton", "aot_eager"),
    pytest.param("cuda", "aot_eager", marks=CUDA.marks if not HAS_CUDA else ()),
    pytest.param("reference", "inductor", marks=pytest.mark.slow)], indirect=["forced"])
def test_attention_count_under_dynamic_shapes(forced, compiler):
    """n_β = max(1, ceil(beta * H * W / 100)) in Python floats left to right (SPEC §4) also
    when a new map size makes H and W dynamic: ((16.1 * 100) * 10) / 100 rounds up to 162
    and ((16.1 * 10) * 100) / 100 to 161, but the symbolic product 16.1 * W * H gave 161
    and 162 (inductor: another mask) and the kernel backends failed a guard in the frame
    that created it (found by a helper). layers.beta_count specialises on the sizes."""
    torch._dynamo.reset()

    def step(x, u):
        return F.attentiondrop(x, 0.5, 16.1, mode="am", normalize="none", noise=u)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    u = torch.zeros(1, 1, device=DEV)
    for h, w, n_beta in ((20, 20, 65), (100, 10, 162), (10, 100, 161)):
        x = (torch.randperm(h * w, generator=gen(h)) + 1.0).view(1, 1, h, w).to(DEV)
        y = compiled(x, u)
        assert int((y == 0).sum()) == n_beta, (h, w)
        assert torch.equal(y, step(x, u)), (h, w)
    torch._dynamo.reset()


FUNC_OPS = {  # a layer of each kind of plan: seeds, blocks, channels, attention (keeps x)
    "dropblock": (lambda t, u: F.dropblock(t, 0.3, 3, noise=u), (2, 6, 9, 9)),
    "camdrop": (lambda t, u: F.camdrop(t, *_cam_args(2, 6), 3, 0.3, noise=u), (2, 6, 9, 9)),
    "corrdrop": (lambda t, u: F.corrdrop(t, 0.5, 3, noise=u), (2, 2, 3, 3)),
    "selectout": (lambda t, u: F.selectout(t, 0.5, 0.7, noise=u), (2, 6)),
    "attentiondrop": (lambda t, u: F.attentiondrop(t, 0.7, 20.0, noise=u), (2, 6)),
}


# torch.func's first call scripts a helper of torch's own with the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("layer", FUNC_OPS)
def test_torch_func_transforms(forced, layer):
    """torch.func.grad and forward-mode AD (torch.func.jvp, forward_ad) as for nn.Dropout
    (a helper's attack: the autograd Function had no setup_context and no jvp, and Triton's
    launches could not read torch.func's wrapped tensors): grad, also compiled, and vjp
    equal autograd's (compiled grad: the CUDA backend's was 0, Triton's interpreter and
    CamDrop's target check crashed Dynamo; vjp: Triton could not read the saved wrappers),
    the tangent is t_dot * w, w the forward's multiplier. vmap: guidedrop's error, not a
    wrong answer."""
    f, noise_shape = FUNC_OPS[layer]
    x = torch.randn(2, 6, 9, 9, generator=gen(1)).to(DEV)
    u = torch.rand(noise_shape, generator=gen(2)).to(DEV)
    weights = torch.randn(x.shape, generator=gen(3)).to(DEV)
    xr = x.clone().requires_grad_()
    y = f(xr, u)
    (y * weights).sum().backward()
    grad = torch.func.grad(lambda t: (f(t, u) * weights).sum())
    assert torch.equal(grad(x), xr.grad)
    # compiled: Dynamo would inline the Function's forward under torch.func.grad and
    # differentiate the kernel ops (autograd.apply runs the Function eagerly there)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(grad, backend="aot_eager")(x), xr.grad)
    # vjp_fn runs after vjp's transform has exited, on the wrappers the forward saved
    out, vjp_fn = torch.func.vjp(lambda t: f(t, u), x)
    assert torch.equal(out, y.detach()) and torch.equal(vjp_fn(weights)[0], xr.grad)
    xw = x.clone().requires_grad_()
    f(xw, u).sum().backward()  # w itself: grad_y = 1
    tangent = torch.randn(x.shape, generator=gen(4)).to(DEV)
    out, tan_out = torch.func.jvp(lambda t: f(t, u), (x,), (tangent,))
    assert torch.equal(out, y.detach()) and torch.equal(tan_out, tangent * xw.grad)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        for g in (f, torch.compile(f, backend="aot_eager")):  # compiled: a graph break
            out = torch.autograd.forward_ad.unpack_dual(g(dual, u))
            assert torch.equal(out.tangent, tan_out) and torch.equal(out.primal, y.detach())
    if layer == "camdrop":  # vmap over the classifier's weight, x not batched: guidedrop's
        # error on every backend (the reference broadcast the weight's batch into a raw
        # RuntimeError: only x was checked)
        weight, target = _cam_args(2, 6)
        with pytest.raises(NotImplementedError, match="do not support torch.func.vmap"):
            torch.func.vmap(lambda w: F.camdrop(x, w, target, 3, 0.3, noise=u))(
                torch.stack([weight, weight]))
        return
    n_dim = 1 if layer == "corrdrop" else 0  # the noise's batch dimension
    with pytest.raises(NotImplementedError, match="do not support torch.func.vmap .* "
                       "is_grads_batched"):  # not torch's invitation to write a vmap rule
        torch.func.vmap(lambda t, v: f(t[None], v.unsqueeze(n_dim)).squeeze(0),
                        in_dims=(0, n_dim), randomness="different")(x, u)
    # without noise, vmap's default randomness="error": guidedrop's error, not torch's
    # randomness error (the op drew its noise first), whose advice led to the one above
    with pytest.raises(NotImplementedError, match="do not support torch.func.vmap"):
        torch.func.vmap(lambda t: getattr(F, layer)(t[None]).squeeze(0))(x)
    # FocusedDropout's module draws its participation first: the same check before it
    with pytest.raises(NotImplementedError, match="do not support torch.func.vmap"):
        torch.func.vmap(guidedrop.FocusedDropout(participation=0.5))(x[:, None])


@pytest.mark.parametrize("layer", LAYERS)
def test_shape_inference(forced, layer):
    """FakeTensorMode infers the output of a module and of a functional op in training
    mode, on every backend, as for nn.Dropout: x's shape, dtype and memory format; and so
    does a meta x on the reference. (A helper's attack: FocusedDropout's module read its
    participation draw on the host, CamDrop checked a fake target with numpy.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    args, kw, noise_shape = layer_case(layer, 2, 6, 9, 9)
    weight, target = _cam_args(2, 6)
    module = _module(layer).train()
    for fmt in (torch.contiguous_format, torch.channels_last):
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.randn(2, 6, 9, 9, device=DEV).to(memory_format=fmt)
            u = torch.rand(noise_shape, device=DEV)
            with guidedrop.cam_targets(weight, target):
                outs = [module(x), getattr(F, layer)(x, *args, noise=u, **kw)]
        for y in outs:
            assert is_fake(y) and y.shape == x.shape and y.dtype == x.dtype
            assert y.is_contiguous(memory_format=fmt), layer
    if dispatch.requested() == "reference":
        x = torch.empty(2, 6, 9, 9, device="meta")
        with guidedrop.cam_targets(weight.to("meta"), target.to("meta")):
            assert module(x).shape == x.shape


@pytest.mark.parametrize("layer", ["dropblock", "attentiondrop"])
@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_make_fx(forced, layer, mode):
    """make_fx's graph (torch.func.linearize traces with it) computes the op. Triton under
    TRITON_INTERPRET=1: make_fx traces the launcher itself (torch.compile and torch.export
    trace the op), and its graph returned the outputs unwritten (fake, symbolic; a helper's
    attack) or the interpreter failed on a traced tensor's storage (real): an error that
    says so. On a GPU, wrap_triton records the launches."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from guidedrop.triton_kernels import _common
    args, kw, noise_shape = layer_case(layer, 2, 6, 9, 9)

    def f(t, u):
        return getattr(F, layer)(t, *args, noise=u, **kw)
    x = torch.randn(2, 6, 9, 9, generator=gen(1)).to(DEV)
    u = torch.rand(noise_shape, generator=gen(2)).to(DEV)
    if dispatch.requested() == "triton" and _common.INTERPRET:
        with pytest.raises(NotImplementedError, match="make_fx .* cannot trace"):
            make_fx(f, tracing_mode=mode)(x, u)
        return
    assert torch.equal(make_fx(f, tracing_mode=mode)(x, u)(x, u), f(x, u))


@pytest.mark.parametrize("layer", LAYERS)
def test_shapes_under_dynamic_compile(forced, layer):
    """The README's graphs per shape under torch.compile(dynamic=True): every backend traces
    the sizes symbolically, one graph for every shape (N, C, H and W all change), forward
    and backward, in NCHW and then in channels_last. The Triton ops take their _dynamic twins there
    (the launchers choose their tiles at run time; tracing them would guard on the exact
    sizes: a graph per shape before). Each compiled output and gradient equals eager's.
    H > W, then H < W in each layout (a max(H, W) passed as an int specialised CUDA's
    CorrDrop). Sizes >= 2, no duck sizing (equal sizes of different dimensions are not one
    symbol),
    C * H * W odd (the packed seeds guard on a multiple of 8). AttentionDrop's n_β makes a
    graph per map size (layers.beta_count): its H and W stay."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    shapes = [(2, 3, 9, 7), (3, 5, 11, 9), (4, 7, 5, 13), (5, 9, 11, 7), (3, 11, 5, 9)]
    if layer == "attentiondrop":
        shapes = [(n, c, 9, 7) for n, c, _, _ in shapes]
    frames = []  # after each shape (the first compile may count twice: a restart)
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for i, (n, c, h, w) in enumerate(shapes):
            args, kw, noise_shape = layer_case(layer, n, c, h, w)

            def step(x, u, *args, kw=kw):
                return getattr(F, layer)(x, *args, noise=u, **kw)
            compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
            x = torch.randn(n, c, h, w, generator=gen(h)).to(DEV)
            if i >= 3:  # a new layout: one graph more (strides guarded), then no other
                x = x.to(memory_format=torch.channels_last)
            u = torch.rand(noise_shape, generator=gen(w)).to(DEV)
            grad = torch.randn(x.shape, generator=gen(c)).to(DEV)
            outs = []
            for f in (compiled, step):
                xr = x.clone().requires_grad_()
                y = f(xr, u, *args)
                y.backward(grad)
                outs.append((y.detach(), xr.grad))
            assert all(map(torch.equal, *outs)), (layer, n, c, h, w)
            frames.append(counter.frame_count)
    # the new layout: one graph more, and at most one restart (a float Dynamo has to
    # specialise, e.g. AttentionDrop's beta, is found again: the record of the last
    # compile is stale there, functional._clear_stale_pins)
    assert frames[1:3] == [frames[0]] * 2 and frames[4] == frames[3], frames
    assert 1 <= frames[3] - frames[0] <= 2, frames
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles C++ on the CPU
@pytest.mark.parametrize("forced", ["triton"], indirect=True)
@pytest.mark.parametrize("layer", ["dropblock", "attentiondrop", "camdrop"])
def test_dynamic_shapes_under_inductor(forced, layer):
    """test_shapes_under_dynamic_compile's one graph for every shape with inductor, which
    runs the Triton ops' _dynamic twins as fallback kernels among its own code."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    frames = []
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for n, c in ((2, 3), (3, 5), (4, 7)):
            args, kw, noise_shape = layer_case(layer, n, c, 9, 7)

            def step(x, u, *args, kw=kw):
                return getattr(F, layer)(x, *args, noise=u, **kw) * 2 + 1
            compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
            x = torch.randn(n, c, 9, 7, generator=gen(c)).to(DEV)
            u = torch.rand(noise_shape, generator=gen(n)).to(DEV)
            assert torch.equal(compiled(x, u, *args), step(x, u, *args)), (layer, n, c)
            frames.append(counter.frame_count)
    assert frames[1:] == [frames[0]] * 2, frames
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles C++ on the CPU
@pytest.mark.parametrize("forced", ["reference", "triton"], indirect=True)
def test_selectout_drop_count_under_inductor(forced):
    """n_d = round((1 - keep) * C) as eager computes it, also compiled by inductor: with C =
    15 and keep = 0.9, 1.4999999999999996 rounds to 1. Inductor rewrote the python product
    of the symbolic keep as 15 - 15 * keep = 1.5, which rounds to 2: two channels dropped,
    one of them not a candidate at top_rate = 0.05 (n_t = 1), and no error."""
    torch._dynamo.reset()
    x = torch.randn(2, 15, 5, 5, generator=gen(31)).to(DEV)
    u = torch.rand(2, 15, generator=gen(32)).to(DEV)

    def step(x, keep, u):
        return F.selectout(x, 0.05, keep, noise=u)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for keep in (0.95, 0.9):  # the second compiles keep as a symbolic float
        y = compiled(x, keep, u)
        assert torch.equal(y, step(x, keep, u)), keep
        assert ((y == 0).flatten(2).all(2).sum(1) == 1).all(), keep  # n_d = 1 a sample
    torch._dynamo.reset()


# --------------------------------------------------------------------------- torch.fx


class _Functional(nn.Module):
    """Every functional op and primitive called from forward, imported in both styles."""

    def forward(self, x, weight, target):
        from guidedrop.functional import dropblock  # bound before tracing: not patchable
        y = dropblock(x, 0.4, 3, normalize="sample")
        y = F.corrdrop(y, p=0.4, block_size=2)
        y = F.selectscale(F.spatialscale(F.selectout(y, 0.5, 0.75), 0.3), 0.5, 0.1)
        y = F.attentiondrop(y, 0.6, 20.0, mode="sm")
        y = F.focused_dropout(F.camdrop(y, weight, target, 3, 0.6), 0.3, 0.6)
        stats = (primitives.channel_max(y) + primitives.channel_mean(y)
                 + primitives.top_percentile_threshold(y, 30.0))
        f = primitives.block_upsample(primitives.pooled_correlation(y, 2), 2, 7, 7)
        return y + stats[:, :, None, None] + f[:, None]


def test_fx_traces_the_functional_ops(forced):
    """torch.fx.symbolic_trace of a module that calls the functional ops and primitives
    (not the modules): each is one call_function node, as nn.functional.dropout is, and
    the traced module computes what the eager one computes (it used to raise
    ``x must be a torch.Tensor, got Proxy``)."""
    gm = torch.fx.symbolic_trace(_Functional())
    names = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"
             and n.target.__module__.startswith("guidedrop")}
    assert names == set(LAYERS) | {"channel_max", "channel_mean", "top_percentile_threshold",
                                   "block_upsample", "pooled_correlation"}, names
    x = torch.randn(2, 4, 7, 7, generator=gen(30)).to(DEV)
    weight, target = _cam_args(2, 4)
    torch.manual_seed(1)
    _seed_emulator(forced)
    eager = _Functional()(x, weight, target)
    torch.manual_seed(1)
    _seed_emulator(forced)
    assert_same(gm(x, weight, target), eager)


def _seed_emulator(B):
    """The emulated CUDA ops draw Philox from the emulator's own state, not torch's seed."""
    if B.__name__ == "guidedrop_emu_backend":
        torch.ops.guidedrop_emu.emu_set_philox(1, 0)


@pytest.mark.parametrize("forced", ["reference"], indirect=True)
@pytest.mark.parametrize("hw", [(4, 6), (2, 7), (6, 4)])
def test_corrdrop_dynamic_compile_map_within_one_block_row(forced, hw):
    """A helper's attack: with symbolic sizes, the reference CorrDrop where H <= block < W
    (one row of windows) failed to compile ("Guard failed on the same frame it was
    created") once it pooled by reshaping the padded x into windows (reference.window_means)."""
    torch._dynamo.reset()
    h, w = hw
    x = torch.randn(2, 3, h, w, generator=gen(h))
    u = torch.rand(2, 2, -(-h // 5), -(-w // 5), generator=gen(w))

    def op(t):
        return F.corrdrop(t, 0.4, 5, noise=u)
    assert torch.equal(torch.compile(op, dynamic=True, backend="aot_eager", fullgraph=True)(x),
                       op(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("forced", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("layer", ["dropblock", "corrdrop"])
def test_maps_below_the_block_under_dynamic_compile(forced, layer):
    """Maps smaller than the block, compiled with dynamic shapes: the block clamped to the
    map stays symbolic, so the sizes below the block share a graph. The reference backend
    took a graph per map size (a loop of r shifted ORs, avg_pool2d's kernel size: constants
    of the graph). Frames after each shape: N, C, H and W change under the block of 7 (a
    graph for them), then above it (CorrDrop: one graph more, k = 7, not max(H, W));
    the outputs and gradients equal eager's."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    # C * H * W odd (the packed seeds guard on a multiple of 8); min(H, W) and max(H, W)
    # change under the block
    shapes = [(2, 3, 3, 5), (3, 5, 5, 3), (2, 3, 3, 3), (3, 5, 5, 5), (2, 3, 9, 11),
              (3, 5, 11, 9)]
    frames = []
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for n, c, h, w in shapes:
            gx = torch.Generator().manual_seed(h * w)
            x = torch.randn(n, c, h, w, generator=gx).requires_grad_()
            grad = torch.randn(x.shape, generator=gx)
            if layer == "dropblock":
                u = torch.rand(n, c, h, w, generator=gx)

                def step(x, u=u):
                    return F.dropblock(x, 0.4, 7, noise=u)
            else:
                u = torch.rand(2, n, -(-h // 7), -(-w // 7), generator=gx)

                def step(x, u=u):
                    return F.corrdrop(x, 0.4, 7, noise=u)
            outs = []
            compiled = torch.compile(step, dynamic=True, fullgraph=True, backend=counter)
            for f in (compiled, step):
                y = f(x)
                outs.append((y, *torch.autograd.grad(y, x, grad)))
            assert all(map(torch.equal, *outs)), (layer, n, c, h, w)
            frames.append(counter.frame_count)
    # (the first compile may count twice: a restart)
    assert frames[2:4] == [frames[1]] * 2, frames
    # CorrDrop: one graph more (and at most one restart, as in the test above)
    assert frames[-1] - frames[3] in ((0,) if layer == "dropblock" else (1, 2)), frames
    torch._dynamo.reset()
