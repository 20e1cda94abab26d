"""The CUDA plan kernels (csrc/cuda/plans/) of SelectScale, Selectout and FocusedDropout
against the reference plans of guidedrop.layers, exactly (issue 12).

``cuda_backend.plan_<layer>`` must return the Plan that ``layers.<layer>`` returns on the
reference backend for the same noise: same kind and meta, every state tensor of the same
shape and dtype with bit-identical values. Without a GPU the CUDA sources run on the SIMT
emulator (tests/cuda_emu/); with one, the real ops on the GPU.

Covered: odd shapes (N = 1, C = 1, 1x1 maps, H != W, C over a warp and over a block of
channels), every dtype of x and of noise, contiguous / channels_last / sliced x and strided
noise, ties in the statistics and in the noise, NaN / ±Inf in x, noise exactly on the
thresholds, the draw without noise, argument errors, the fake kernels, and no recompile
when a rate changes under torch.compile.
"""

from __future__ import annotations

import functools
from itertools import product

import pytest
import torch
from testing import (
    DEV,
    DTYPES,
    HAS_CUDA,
    LAYOUTS,
    assert_same,
    assert_same_plan,
    emulated,
    load_backend,
)

from guidedrop import layers as L
from guidedrop import reference as R

pytestmark = [] if HAS_CUDA else [emulated]  # without a GPU: the CUDA sources emulated
NOISE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYERS = ["selectscale", "selectout", "focused_dropout"]
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 5, 1, 4), (1, 37, 2, 3)]


@pytest.fixture(scope="module")
def B():
    return load_backend("cuda")


def _ops():
    return torch.ops.guidedrop if HAS_CUDA else torch.ops.guidedrop_emu


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """x in the memory layout `name` (testing.LAYOUTS), same values."""
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "sliced":  # a view into a larger tensor: other strides, storage offset != 0
        n, c, h, w = x.shape
        base = torch.full((n + 1, c + 2, h + 3, w + 5), 7.0, dtype=x.dtype, device=x.device)
        base[1:, 2:, 1:h + 1, 3:w + 3] = x
        return base[1:, 2:, 1:h + 1, 3:w + 3]
    return x.contiguous()


def strided(u: torch.Tensor) -> torch.Tensor:
    """u as a non-contiguous view (every other element of a larger tensor)."""
    big = torch.full((*u.shape[:-1], 2 * u.shape[-1]), 0.75, dtype=u.dtype, device=u.device)
    big[..., ::2] = u
    return big[..., ::2]


def check(B, layer, x, *args, **kw):
    """The plan kernel's Plan vs the reference plan's (layers.<layer>.reference on R)."""
    got = getattr(B, f"plan_{layer}")(x, *args, **kw)
    want = getattr(L, layer).reference(R, x, *args, **kw)
    u = kw.get("noise")
    assert_same_plan(got, want, f"{layer} {tuple(x.shape)} {x.dtype} {args} "
                         f"{kw.get('per_position', '')} noise {None if u is None else u.dtype}")
    return got


def cases(layer, n, c, h, w, gen):
    """(args, kwargs without noise, noise shape) of `layer` on an (n, c, h, w) input."""
    if layer == "selectscale":
        return [((0.4, 0.1), {}, (n, c)), ((1.0, 0.0), {}, (n, c)), ((0.0, 1.0), {}, (n, c))]
    if layer == "selectout":
        # n_drop = round((1 - keep) * c) <= round(top_rate * c): 0, some, all channels.
        return [((0.6, 0.7), {}, (n, c)), ((0.5, 1.0), {}, (n, c)), ((1.0, 0.01), {}, (n, c))]
    return [((0.3, 0.6), dict(per_position=False), (n,)),
            ((0.3, 0.6), dict(per_position=True), (n, h, w)),
            ((0.0, 1.0), dict(per_position=True), (n, h, w)),
            ((0.5, 0.5), dict(per_position=False), (n,))]


def _valid(layer, args, c):
    if layer != "selectout":
        return True
    top_rate, keep = args
    return round((1 - keep) * c) <= max(1, round(top_rate * c))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_plan_matches_reference(B, layer, dtype):
    """Odd shapes x layouts, the layer's cases and the noise dtypes in turn, strided noise.
    (The emulator runs one OS thread per CUDA thread: few, small cases by default.)"""
    gen = torch.Generator().manual_seed(3)
    combos = [*product(SHAPES[:3], LAYOUTS), (SHAPES[3], "channels_last")]
    for i, (shape, lay) in enumerate(combos):
        x = layout(torch.randn(shape, generator=gen).to(DEV, dtype), lay)
        valid = [cs for cs in cases(layer, *shape, gen) if _valid(layer, cs[0], shape[1])]
        args, kw, ushape = valid[i % len(valid)]
        u = torch.rand(ushape, generator=gen).to(DEV, NOISE_DTYPES[i % len(NOISE_DTYPES)])
        check(B, layer, x, *args, noise=strided(u) if i % 3 == 1 else u, **kw)


@pytest.mark.parametrize("layer", LAYERS)
def test_plan_ties_and_nonfinite(B, layer):
    """Integer-valued x (ties in max |x| and in the means), NaN / ±Inf maps, all-negative
    samples (FocusedDropout's v <= 0), and more channels than one warp."""
    gen = torch.Generator().manual_seed(5)
    for shape in [(2, 6, 3, 4), (1, 40, 1, 2)]:
        n, c, h, w = shape
        ints = torch.randint(-2, 3, shape, generator=gen).float()
        xs = [ints, ints.abs().neg(), ints.clone(), ints.clone()]
        xs[2][0, 1, 0, 0] = float("nan")  # a NaN max |x| and a NaN mean in sample 0
        xs[2][-1, 0, -1, -1] = float("inf")  # an Inf max |x|, an Inf mean and v = Inf
        xs[3][:, :, 0, 0] = -float("inf")  # every mean -Inf; |x| = Inf everywhere
        xs[3][0, -1, 0, 0] = float("nan")
        for i, x in enumerate(xs):
            x = x.to(DEV, DTYPES[i % len(DTYPES)])
            for args, kw, ushape in cases(layer, *shape, gen):
                if not _valid(layer, args, c):
                    continue
                # Few distinct noise values: ties among the candidates' u (Selectout).
                u = torch.randint(0, 3, ushape, generator=gen).float().div(4).to(DEV)
                check(B, layer, x, *args, noise=u, **kw)


def test_selectout_nan_candidates(B):
    """A NaN max |x| ranks largest and is a candidate (in_top): with k = 3, sample 0's
    candidates are NaN and the ties at 1 (t = 1: channels 0 to 5), sample 1's NaN, 3, 3."""
    x = torch.ones(2, 6, 2, 2, device=DEV)
    x[:, 0] = float("nan")
    x[:, 3] = 2.0  # sample 0: amax NaN, 1, 1, 2, 1, 1; k = 3: t = 1, candidates 0..5
    x[1, 1:3] = 3.0  # sample 1: amax NaN, 3, 3, 2, 1, 1; t = 3, candidates 0, 1, 2
    u = torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.25, 0.9]] * 2, device=DEV)
    for keep in (0.5, 0.6, 0.75):  # n_drop = 3 (sample 1: every candidate), 2, 2
        check(B, "selectout", x, 0.5, keep, noise=u)



def test_selectout_drops_only_candidates_whatever_their_noise(B):
    """+Inf and NaN noise of candidates (tests/test_plans_selectscale.py)."""
    from test_plans_selectscale import drops_only_candidates
    drops_only_candidates(B, check)

def test_plan_noise_on_thresholds(B):
    """Noise whose float32 value sits exactly on a threshold: u = 0 and the largest float32
    below 1; equal u among candidates; gamma * v == x[n, r] exactly (kept only if >)."""
    below1 = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    x = torch.tensor([[1.0, 0.5, 0.25, 0.75]], device=DEV).view(1, 4, 1, 1).repeat(2, 1, 1, 1)
    u = torch.tensor([[0.0, below1, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], device=DEV)
    for udt in NOISE_DTYPES:
        check(B, "selectscale", x, 0.5, 0.3, noise=u.to(udt))
        for keep in (0.5, 0.75, 1.0):
            check(B, "selectout", x, 1.0, keep, noise=u.to(udt))
    # FocusedDropout: r = channel 0 (largest mean), v = 1; gamma = low + (high - low) * u
    # equals the unit for u = 0.5 (0.5, exact), 0 (0.25) and 1 - 2^-24 (about 0.75).
    ref = torch.tensor([[0.25, 0.5], [0.75, 1.0]])
    x = torch.cat([ref[None], torch.full((3, 2, 2), 0.1)]).to(DEV)[None].repeat(2, 1, 1, 1)
    for u in (torch.tensor([0.5, 0.0]), torch.tensor([below1, 0.5])):
        check(B, "focused_dropout", x, 0.25, 0.75, per_position=False, noise=u.to(DEV))
    u = torch.tensor([[0.0, 0.5], [below1, 0.5]]).expand(2, 2, 2).to(DEV)  # stride-0 noise
    check(B, "focused_dropout", x, 0.25, 0.75, per_position=True, noise=u)


@pytest.mark.parametrize("layer", LAYERS)
def test_plan_draw_without_noise(B, layer):
    """noise=None: one torch.rand, exactly as layers.rand draws it (the same generator
    state gives the reference's plan), from the default generator or a given one."""
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1)).to(DEV)
    args, kw, _ = cases(layer, 2, 5, 3, 4, None)[1 if layer == "focused_dropout" else 0]
    torch.manual_seed(9)
    got = getattr(B, f"plan_{layer}")(x, *args, **kw)
    torch.manual_seed(9)
    assert_same_plan(got, getattr(L, layer).reference(R, x, *args, **kw), f"{layer} default")
    g1, g2 = (torch.Generator(DEV).manual_seed(4) for _ in range(2))
    assert_same_plan(getattr(B, f"plan_{layer}")(x, *args, generator=g1, **kw),
              getattr(L, layer).reference(R, x, *args, generator=g2, **kw), f"{layer} gen")


def _op_samples():
    x = torch.randn(2, 5, 3, 4, device=DEV)
    amax = x.abs().amax(dim=(2, 3))
    mean = x.mean(dim=(2, 3))
    u = torch.rand(2, 5, device=DEV)
    return {
        "selectscale_plan": (amax, u, 0.4, 0.1),
        "selectout_plan": (amax, u.double(), 0.6, 0.7),
        "focused_dropout_plan": (x.to(torch.bfloat16), mean, torch.rand(2, 3, 4, device=DEV),
                                 0.3, 0.6, True),
    }


@pytest.mark.parametrize("op", ["selectscale_plan", "selectout_plan", "focused_dropout_plan"])
def test_plan_opcheck(B, op):
    """Schema (nothing mutated or aliased) and the fake kernels against the real outputs."""
    torch.library.opcheck(getattr(_ops(), op), _op_samples()[op],
                          test_utils=("test_schema", "test_faketensor"))


def test_plan_ops_check_arguments(B):
    ops, s = _ops(), _op_samples()
    amax, u = s["selectscale_plan"][:2]
    with pytest.raises(RuntimeError, match="more than the 2 candidates"):
        ops.selectout_plan(amax, u, 0.4, 0.2)  # n_drop = 4, k = round(0.4 * 5) = 2
    ops.selectout_plan(amax, u, 0.4, 0.5)  # n_drop = round(2.5) = 2 (half to even) = k
    with pytest.raises(RuntimeError, match="noise must have shape"):
        ops.selectscale_plan(amax, u[:, :3], 0.4, 0.1)
    with pytest.raises(RuntimeError, match="noise must be float32"):
        ops.selectscale_plan(amax, u.to(torch.int32), 0.4, 0.1)
    with pytest.raises(RuntimeError, match="keep must be in"):
        ops.selectout_plan(amax, u, 0.4, 0.0)
    x, mean, _, *_ = s["focused_dropout_plan"]
    with pytest.raises(RuntimeError, match="noise must have shape"):
        ops.focused_dropout_plan(x, mean, torch.rand(2, device=DEV), 0.3, 0.6, True)
    with pytest.raises(RuntimeError, match="low and high"):
        ops.focused_dropout_plan(x, mean, torch.rand(2, device=DEV), 0.7, 0.6, False)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e8m0fnu], ids=str)
def test_plan_ops_refuse_unread_noise_dtypes(B, dtype):
    """Every op that reads noise refuses float8 (floating to at::isFloatingType; its kernels
    read float32, float64, float16 and bfloat16 only: AttentionDrop's read a float8 element
    as 4 bytes); seeds_plan and camdrop_plan check it where seed_bits does (prepare_seeds).
    The layers pass float8 noise as float32 (layers._readable)."""
    ops, x = _ops(), torch.rand(2, 3, 6, 6, device=DEV)
    u = functools.partial(torch.rand, device=DEV)
    calls = {
        "attentiondrop_plan": lambda: ops.attentiondrop_plan(x, u(2, 3).to(dtype), None, 0.5, 4,
                                                             "ad", "batch"),
        "corrdrop_plan": lambda: ops.corrdrop_plan(x, u(2, 2, 3, 3).to(dtype), None, 0.1, 2,
                                                   "batch"),
        "seed_bits": lambda: B.seed_bits(u(2, 3, 6, 6).to(dtype), None, 0.1, 1, None, None,
                                         (2, 3, 6, 6), DEV),
        "selectscale_plan": lambda: ops.selectscale_plan(x[..., 0, 0], u(2, 3).to(dtype), 0.4,
                                                         0.1),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name}: noise must be float32, float64, "
                                               "float16 or bfloat16"):
            call()


def test_plan_ops_rates_tensor(B):
    """The traced path of the plan ops (rates as a float64 (2,) tensor read by the kernel,
    the float arguments placeholders) gives what the float arguments give."""
    ops, s = _ops(), _op_samples()
    amax, u = s["selectscale_plan"][:2]
    for top_rate, q in [(0.4, 0.1), (0.5, 0.5), (1.0, 0.3), (0.1, 1.0)]:  # 0.5 * 5: half-even
        rates = torch.tensor([top_rate, q], dtype=torch.float64, device=DEV)
        assert_same(ops.selectscale_plan(amax, u, 0.0, 0.0, rates),
                    ops.selectscale_plan(amax, u, top_rate, q))
        if round((1 - q) * 5) <= max(1, round(top_rate * 5)):
            assert_same(ops.selectout_plan(amax, u, 0.0, 0.0, rates),
                            ops.selectout_plan(amax, u, top_rate, q))
    x, mean, un, *_ = s["focused_dropout_plan"]
    for low, high in [(0.3, 0.6), (0.0, 1.0), (0.1, 0.7)]:
        rates = torch.tensor([low, high], dtype=torch.float64, device=DEV)
        for g, e in zip(ops.focused_dropout_plan(x, mean, un, 0.0, 0.0, True, rates),
                        ops.focused_dropout_plan(x, mean, un, low, high, True), strict=True):
            assert_same(g, e)


@pytest.mark.parametrize("layer", LAYERS)
def test_plan_rate_ramp_does_not_recompile(B, layer, monkeypatch):
    """The module on the CUDA backend compiled with fullgraph=True while a schedule moves
    its rate: it compiles once more (the rate made symbolic), then never again, because the
    traced plan op reads the rates from a tensor (a float op argument would be specialised:
    one recompile per rate)."""
    import torch._dynamo.testing

    import guidedrop
    from guidedrop import dispatch

    monkeypatch.setenv("GUIDEDROP_BACKEND", "cuda")
    monkeypatch.setitem(dispatch._loaded, "cuda", (B, ""))
    mod, field = {
        "selectscale": (guidedrop.SelectScale(top_rate=0.5), "retain"),
        "selectout": (guidedrop.Selectout(top_rate=0.5, keep=0.75), "keep"),
        "focused_dropout": (guidedrop.FocusedDropout(participation=1.0, high=0.9), "low"),
    }[layer]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mod, fullgraph=True, backend=counter)
    x = torch.randn(2, 8, 3, 3, device=DEV)
    for r in (0.9, 0.8, 0.7, 0.6):
        setattr(mod, field, r)
        torch.manual_seed(0)
        y = compiled(x)
        torch.manual_seed(0)
        if layer == "focused_dropout" and x.is_cuda:
            # traced, the module draws its participation on x's device first (eager: on
            # the CPU), then the noise (modules.FocusedDropout); seen on an H200
            torch.rand((), device=x.device)
        assert_same(y, mod(x))
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.slow
def test_selectout_many_channels(B):
    """More channels than a block has threads: the ties of Selectout counted across chunks."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (2, 300, 1, 2), generator=gen).float().to(DEV)
    u = torch.randint(0, 4, (2, 300), generator=gen).float().div(4).to(DEV)
    check(B, "selectout", x, 0.5, 0.8, noise=u)
    check(B, "selectscale", x, 0.5, 0.2, noise=u)


@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS)
def test_plan_sweep(B, layer):
    """Random shapes, rates, dtypes and layouts (10 on the emulator: a second a case; the
    fixed cases of test_plan_matrix and the adversarial tests run there too)."""
    gen = torch.Generator().manual_seed(17)
    for _ in range(40 if HAS_CUDA else 10):
        shape = tuple(int(v) for v in torch.randint(1, 12, (4,), generator=gen))
        shape = (shape[0], int(torch.randint(1, 70, (), generator=gen)), *shape[2:])
        dtype = DTYPES[int(torch.randint(0, 3, (), generator=gen))]
        lay = LAYOUTS[int(torch.randint(0, 3, (), generator=gen))]
        x = layout(torch.randn(shape, generator=gen).to(DEV, dtype), lay)
        a, b = sorted(torch.rand(2, generator=gen).tolist())
        if layer == "selectscale":
            args, kw, ushape = (a, b), {}, shape[:2]
        elif layer == "selectout":
            args, kw, ushape = (b, 1 - a * b), {}, shape[:2]
            if not _valid(layer, args, shape[1]) or args[1] <= 0:
                continue
        else:
            pp = bool(torch.randint(0, 2, (), generator=gen))
            args, kw = (a, b), dict(per_position=pp)
            ushape = (shape[0], *shape[2:]) if pp else shape[:1]
        check(B, layer, x, *args, noise=torch.rand(ushape, generator=gen).to(DEV), **kw)
