"""CamDrop's CUDA plan (csrc/cuda/class_activation.cu + plans/camdrop.cu + seed_bits +
seeds_scale, issue 12), run on the CPU SIMT emulator, against the reference plan (the torch
code of ``layers.camdrop`` on ``guidedrop.reference``) with explicit noise: the packed seeds
(so the candidates, the seed rate and the valid centres) and the scale bit for bit.

Covered: odd shapes (N = 1, C = 1, 1x1 maps, H != W, r = 1, even r, r > H: no plan), C_fc a
multiple of C (alpha averaged in the kernel), weights of every float dtype and layout,
targets of every integer dtype and stride (read by value), every x dtype and layout, ties in
the CAM and in alpha, NaN / ±Inf, noise of every float dtype on the seed rate, more channels
than a chunk of alpha, maps wider than a block; without noise, the Philox draw of the seed
kernel against the torch code on the same emulated primitives; the op's schema, fake kernel
and argument checks; and the device-side assertion on a target out of range (SPEC §6 step 0).
The dtype x layout x shape matrix runs on both kernel backends in tests/test_plans_camdrop.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_cuda_emulated as CE
import torch
from test_backends import with_ties
from test_plans_dropblock import DTYPES, LAYOUTS, NORMALIZE, on_threshold
from testing import assert_same, assert_same_plan, emulated, make_x

from guidedrop import layers as L
from guidedrop import reference as R

pytestmark = [emulated, pytest.mark.skipif(bool(CE.emu.unavailable()),
                                           reason=f"CUDA emulator: {CE.emu.unavailable()}")]

K = 5  # classes


@pytest.fixture(scope="module")
def B():
    """python/guidedrop/cuda_backend.py on the emulated ops (plan_camdrop included)."""
    return CE.emu.backend()


def weights(c, groups, dtype=torch.float32, seed=0, transposed=False):
    """(K, C * groups): magnitudes over 6 decades, so that a wrong rounding or a float32
    sum of the group would show in alpha's last bit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, c * groups, generator=g) * torch.logspace(-3, 3, c * groups)
    if transposed:  # a non-contiguous weight, as a Linear's weight.t() would be
        return w.to(dtype).t().contiguous().t()
    return w.to(dtype)


def targets(n, seed=0):
    return torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(seed))


def noise_for(x, seed=0, r=None, keep=None):
    """Uniforms; with r and keep, some exactly on the float32 seed rate (not a seed) and some
    just below it (a seed)."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    if r is not None and r <= min(x.shape[2:]):
        u = on_threshold(u, L._seed_rate(1 - keep, r, *x.shape[2:]))
    return u


def compare(B, x, weight, target, r, keep, channel_rate, normalize, noise):
    kw = dict(channel_rate=channel_rate, normalize=normalize, noise=noise)
    got = L.camdrop(B, x, weight, target, r, keep, **kw)
    # The reference indexes with int64 (guidedrop.functional's validation converts a CPU
    # target; uint8 would be a mask to torch indexing).
    want = L.camdrop.reference(R, x, weight, target.long(), r, keep, **kw)
    assert_same_plan(got, want)
    return got


@pytest.mark.parametrize("shape,r", [((1, 1, 3, 3), 3), ((2, 3, 5, 7), 3), ((3, 2, 4, 9), 2),
                                     ((2, 3, 1, 1), 1), ((1, 4, 6, 5), 1), ((2, 3, 5, 7), 6)])
def test_plan_shapes(B, shape, r):
    """Odd shapes (N = 1, C = 1, 1x1 maps, H != W, r = 1, even r; r > H: no plan), every
    normalisation, noise on the seed rate."""
    x = make_x(shape)
    u = noise_for(x, 1, r, 0.7)
    for normalize in NORMALIZE:
        plan = compare(B, x, weights(shape[1], 1), targets(shape[0]), r, 0.7, 0.5, normalize, u)
    assert (plan is None) == (r > min(shape[2:]))


@pytest.mark.parametrize("groups", [1, 3, 8, 40])
def test_plan_alpha_mean(B, groups):
    """alpha = weight[target] averaged over C_fc / C columns, weights of every float dtype,
    contiguous or transposed: bit-exact (J and the channel candidates read its last bit)."""
    x = make_x((2, 6, 4, 5))
    for wdt, transposed in ((torch.float32, False), (torch.float64, True),
                            (torch.float16, False), (torch.bfloat16, True)):
        w = weights(6, groups, wdt, seed=groups, transposed=transposed)
        compare(B, x, w, targets(2, groups), 2, 0.6, 0.5, "batch", noise_for(x, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_dtypes_layouts(B, dtype, layout):
    """Every x dtype and layout (channels_last takes the channel-inner CAM kernel)."""
    x = make_x((2, 3, 5, 7), dtype, "cpu", layout)
    compare(B, x, weights(3, 2, torch.float16), targets(2, 3), 3, 0.8, 0.7, "batch",
            noise_for(x, 3, 3, 0.8))
    compare(B, x, weights(3, 1), targets(2, 4), 2, 0.8, 0.4, "sample", noise_for(x, 4))


def test_plan_ties(B):
    """Ties in J (x on a few values) and in alpha (a weight on a few values): the top-k keeps
    every tie; the same target twice; channel_rate 0 (one channel), 1 (all)."""
    for layout in ("contiguous", "channels_last"):
        x = with_ties(make_x((3, 6, 5, 6), layout=layout))
        w = weights(6, 2).round().clamp(-2, 2)
        t = torch.tensor([1, 1, 4])
        for rate in (0.0, 0.34, 1.0):
            plan = compare(B, x, w, t, 2, 0.5, rate, "batch", noise_for(x, 5))
        assert plan.state[0].any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Inf * 0
def test_plan_nonfinite(B):
    """NaN / ±Inf in x (J NaN or infinite: NaN ranks largest and is a candidate) and
    in the weight (alpha NaN or infinite)."""
    x = make_x((2, 4, 5, 5))
    x[0, 1, 2, 3] = float("nan")
    x[1, :, 0, 0] = float("inf")
    x[1, 2, 4, :] = -float("inf")
    w = weights(4, 2)
    w[2, 3] = float("nan")
    w[3, 0] = float("inf")
    u = noise_for(x, 6)
    for t in ([2, 3], [0, 1], [3, 2]):
        compare(B, x, w, torch.tensor(t), 2, 0.5, 0.5, "sample", u)


def test_plan_target_dtypes_and_strides(B):
    """Targets of every integer dtype (uint8 an index, never a mask) and any stride (sliced,
    expanded) are read by value in the kernel: no conversion."""
    x = make_x((4, 4, 5, 5))
    w = weights(4, 2)
    u = noise_for(x, 2)
    base = torch.tensor([2, 0, 4, 1])
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
               torch.uint32, torch.uint64):
        compare(B, x, w, base.to(dt), 2, 0.8, 0.5, "batch", u)
    for t in (torch.tensor([3, 0, 0])[:1].expand(4), torch.tensor([0, 1, 2, 0, 1, 2, 4, 1])[::2],
              torch.tensor([[1, 2], [3, 4], [0, 1], [2, 2]], dtype=torch.int32)[:, 1]):
        compare(B, x, w, t, 2, 0.8, 0.5, "batch", u)


def test_plan_noise_dtypes(B):
    """Noise of every float dtype (rounded to float32 in the seed kernel) and non-contiguous
    noise; everything dropped (scale 0) and nothing dropped (scale 1)."""
    x = make_x((2, 3, 6, 7))
    w = weights(3, 1)
    t = targets(2, 1)
    u = noise_for(x, 7, 3, 0.6)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        compare(B, x, w, t, 3, 0.6, 1.0, "batch", u.to(dt))
    u_t = u.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)  # non-contiguous
    compare(B, x, w, t, 3, 0.6, 1.0, "sample", u_t)
    for u in (torch.zeros(x.shape), torch.ones(x.shape)):
        for normalize in NORMALIZE:
            compare(B, x, w, t, 1, 0.0, 1.0, normalize, u)


def test_plan_wide(B):
    """More channels than a chunk of alpha in shared memory (1024) and maps longer than a
    block of threads (several position tiles per sample), both CAM kernels."""
    for layout in ("contiguous", "channels_last"):
        x = make_x((1, 1030, 2, 3), layout=layout)
        compare(B, x, weights(1030, 1), targets(1, 2), 1, 0.5, 0.01, "batch", noise_for(x, 8))
    # 323 positions: two tiles of the position-per-thread kernel (channels_last takes 32
    # positions per block: several tiles already in test_plan_dtypes_layouts)
    x = make_x((1, 2, 17, 19))
    compare(B, x, weights(2, 2), targets(1, 3), 3, 0.7, 0.5, "batch", noise_for(x, 9, 3, 0.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plan_cam_vectors(B, dtype):
    """The CAM kernel's 16-byte paths: NCHW with N*C*H*W % V == 0, V positions a thread,
    realigned where H*W % V != 0 (7 x 7 maps at every shift, 14 x 14, 5 x 3, the last map's
    last vector with nothing after it; 2 x 3 maps over two chunks of alpha, C > 1024);
    channels_last with C % V == 0, V channels a lane (C = 16, 24, and 1032 over two
    chunks); and a copy one element off 16 bytes (the scalar paths). r = 2: the spatial
    candidates are the top quarter of J, so a J summed wrong moves them and the seeds."""
    cases = [((2, 8, 7, 7), "contiguous"), ((1, 8, 14, 14), "contiguous"),
             ((3, 8, 5, 3), "contiguous"), ((1, 1032, 2, 3), "contiguous"),
             ((2, 16, 5, 3), "channels_last"), ((1, 24, 7, 7), "channels_last"),
             ((1, 1032, 2, 2), "channels_last")]
    for i, (shape, layout) in enumerate(cases):
        x = make_x(shape, dtype, "cpu", layout)
        n, c = shape[:2]
        for xx in (x, CE.misaligned(x)):
            compare(B, xx, weights(c, 2, seed=i), targets(n, i), 2, 0.2, 0.5, "batch",
                    noise_for(x, 10 + i))


def test_plan_noise_none_draws_philox_like_the_torch_code(B):
    """Without noise the seed kernel draws Philox: the plan and the torch code on the same
    emulated primitives, from the same generator state, agree exactly (and no extra draw
    launch: the plan is the same 4 kernels)."""
    E = CE.emu.ops()
    x = make_x((3, 4, 9, 10))
    w, t = weights(4, 2), targets(3, 5)
    kw = dict(channel_rate=0.5, normalize="batch")
    E.emu_set_philox(1234, 8)
    want = L.camdrop.reference(B, x, w, t, 3, 0.3, **kw)
    E.emu_set_philox(1234, 8)
    before = E.emu_launches()
    got = L.camdrop(B, x, w, t, 3, 0.3, **kw)
    assert E.emu_launches() - before == 4
    assert_same_plan(got, want)
    assert got.state[0].any()


def test_plan_rate_tensor_equals_rate_float(B):
    """The traced form (the seed rate a 0-dim float32 tensor read in the kernel) gives the
    eager form's plan (a float argument)."""
    E = CE.emu.ops()
    x = make_x((1, 3, 7, 8))
    w, t = weights(3, 2), targets(1, 6)
    g = L._seed_rate(0.4, 3, 7, 8)
    u = noise_for(x, 10, 3, 0.6)
    eager = E.camdrop_plan(x, w, t, u, None, g, 3, 5, 2, "sample")
    traced = E.camdrop_plan(x, w, t, u, L._rate(g, x), 0.0, 3, 5, 2, "sample")
    assert eager[0].any()
    for a, b in zip(eager, traced, strict=True):
        assert_same(a, b)


def test_plan_op_opcheck(B):
    """Schema (functional: nothing mutated or aliased) and the fake kernel."""
    assert "camdrop_plan" in B.PLAN_OPS
    E = CE.emu.ops()
    x = make_x((1, 2, 3, 4), torch.float16, "cpu", "channels_last")
    w, t = weights(2, 2, torch.bfloat16), targets(1).to(torch.int32)
    torch.library.opcheck(E.camdrop_plan, (x, w, t, None, L._rate(0.1, x), 0.0, 2, 3, 1, "batch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_plan_op_checks_arguments(B):
    E = CE.emu.ops()
    x = make_x((2, 3, 5, 6))
    w, t, u = weights(3, 2), targets(2), noise_for(x)

    def call(**kw):
        a = dict(x=x, weight=w, target=t, noise=u, g_t=None, g=0.1, r=3, k_s=3, k_c=1,
                 normalize="batch")
        a.update(kw)
        return E.camdrop_plan(*a.values())

    for kw, match in [
        (dict(weight=weights(2, 2)), "multiple of C"),
        (dict(weight=w.to(torch.int32)), "weight must be a 2-D"),
        (dict(target=t.bool()), "target must hold class indices of an integer dtype"),
        (dict(target=t.float()), "target must hold class indices of an integer dtype"),
        (dict(target=t[:1]), "target must have shape"),
        (dict(r=6), "r must be in"),
        (dict(k_s=31), "k must be in"),
        (dict(k_c=0), "k must be in"),
        (dict(noise=u[:, :2]), "noise must have shape"),
        (dict(normalize="all"), "normalize must be one of"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call(**kw)


@pytest.mark.slow
def test_plan_rate_ramp_does_not_recompile(B, monkeypatch):
    """The module on the (emulated) CUDA backend compiled with fullgraph=True while a
    schedule moves its drop rate: one more compile (the rate made symbolic), then never
    again (the seed rate reaches the traced op as a tensor); each step draws what eager
    draws from the same Philox state."""
    import torch._dynamo.testing

    import guidedrop
    from guidedrop import dispatch

    E = CE.emu.ops()
    monkeypatch.setattr(B, "unsupported", lambda x: "")  # the emulated ops take CPU tensors
    monkeypatch.setitem(dispatch._loaded, "cuda", (B, ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", "cuda")
    mod = guidedrop.CamDrop(block_size=3, keep=0.9, channel_rate=0.5)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mod, fullgraph=True, backend=counter)
    x, w, t = make_x((2, 4, 7, 7)), weights(4, 2), targets(2)
    for rate in (0.3, 0.4, 0.5, 0.6):
        mod.drop_rate = rate
        with guidedrop.cam_targets(w, t):
            E.emu_set_philox(5, 0)
            y = compiled(x)
            E.emu_set_philox(5, 0)
            assert_same(y, mod(x))
    assert counter.frame_count <= 2, counter.frame_count
    assert not torch.equal(y, x)


_ASSERT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import test_cuda_emulated as CE
    E = CE.emu.ops()
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3)
    E.camdrop_plan(x, w, torch.tensor([1, {bad}], dtype={dtype}), None, None, 0.1, 3, 2, 1,
                   "batch")
    print("no assertion")
""")


@pytest.mark.parametrize("bad,dtype", [(4, "torch.int64"),
                                       pytest.param(-1, "torch.int8", marks=pytest.mark.slow)])
def test_target_out_of_range_is_a_device_assertion(B, bad, dtype):
    """SPEC §6 step 0: the first kernel asserts the target's range on the device (the op
    checks nothing on the host: that would be a sync on a GPU), with a message naming
    ``target``. On the emulator the failed assertion aborts the process, so it runs in a
    subprocess."""
    tests = str(Path(__file__).resolve().parent)
    script = _ASSERT_SCRIPT.format(tests=tests, bad=bad, dtype=dtype)
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "no assertion" not in p.stdout
    assert "target must hold class indices in [0, K)" in p.stderr, p.stderr[-2000:]
