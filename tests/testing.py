"""The testing helpers: dtypes, devices, layouts, awkward shapes and tolerances.

Combine them with ``itertools.product`` in ``pytest.mark.parametrize``::

    from testing import DTYPES, LAYOUTS, ODD_SHAPES, assert_close_dtype, devices, make_x

    @pytest.mark.parametrize("dtype,device,layout", product(DTYPES, devices(), LAYOUTS))
    def test_op(dtype, device, layout): ...
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

from guidedrop import dispatch, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REF_DTYPES = DTYPES + [torch.float64]  # float64 only on the reference path

HAS_CUDA = torch.cuda.is_available()


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


HAS_EXT = _imports("guidedrop._C")  # the CUDA extension is built (it imports without a GPU)

# Marks a test that runs the CUDA sources on the CPU SIMT emulator (tests/cuda_emu, built
# with the host compiler on first use). The default run leaves them out, as it does the
# slow checks: `pytest -m emulated` runs them (a stage of .ci/run of its own).
emulated = pytest.mark.emulated
# The CUDA backend as a test parameter: the real ops with a GPU, else the emulated ones.
CUDA = "cuda" if HAS_CUDA else pytest.param("cuda", marks=emulated)
# The Triton backend as a parameter of a test that runs long under the interpreter (no GPU:
# many launches, each interpreted): slow there, left to .ci/run's slow stage; a default test
# where Triton compiles.
TRITON_SLOW = "triton" if HAS_CUDA else pytest.param("triton", marks=pytest.mark.slow)


def slow_without_gpu(*values) -> list:
    """Test parameters that the default run leaves to .ci/run's slow stage where no GPU is
    present (more cases of a test whose other cases run by default: under the interpreter
    they cost more than they add)."""
    return [v if HAS_CUDA else pytest.param(v, marks=pytest.mark.slow) for v in values]


DEV = "cuda" if HAS_CUDA else "cpu"  # where the kernel backends' tests put their tensors


@functools.cache
def _loaded(name: str, emulate: bool) -> tuple[types.ModuleType | None, str]:
    if name == "cuda" and not HAS_CUDA:
        if not emulate:
            return None, "the CUDA backend needs a GPU"
        import test_cuda_emulated as CE  # builds the emulator on first use
        if CE.emu.unavailable():
            return None, f"no GPU and no CUDA emulator: {CE.emu.unavailable()}"
        return CE.emu.backend(), ""
    mod, why = dispatch.load(name)
    if mod is not None and name != "reference":
        why = mod.unsupported(torch.zeros(1, 1, 1, 1, device=DEV))
    return (None, why) if why else (mod, "")


def load_backend(name: str, *, emulate: bool = True) -> types.ModuleType:
    """The module of backend ``name`` ("reference", "triton" or "cuda") for DEV tensors, or
    skip the test where it cannot run here. Without a GPU, "cuda" is cuda_backend on the
    CUDA sources built for the CPU emulator (tests/cuda_emu; a test that takes it is marked
    emulated, as the CUDA parameter is), or with ``emulate=False`` a skip."""
    mod, why = _loaded(name, emulate)
    if mod is None:
        pytest.skip(f"backend {name}: {why}")
    return mod


def force_backend(name: str, monkeypatch) -> None:
    """GUIDEDROP_BACKEND=name for this test: without a GPU, "cuda" is the CUDA sources on
    the CPU emulator (dispatch hands them CPU tensors); skips where the backend cannot run."""
    mod = load_backend(name)
    if name == "cuda" and not HAS_CUDA:
        monkeypatch.setitem(dispatch._loaded, name, (mod, ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", name)


def fake_backend(name: str = "triton", **overrides) -> types.ModuleType:
    """A backend module for dispatch's and the CLI's rules, no kernel in it: the reference's
    functions under ``name``, with ``overrides`` (a wrong primitive, an ``unsupported(x)``
    that gives a reason to refuse x) put in their place. Install it with
    ``monkeypatch.setitem(dispatch._loaded, name, (fake_backend(name, ...), ""))``."""
    mod = types.ModuleType(f"guidedrop_test_fake_{name}")
    mod.__dict__.update({k: v for k, v in vars(reference).items() if not k.startswith("__")})
    mod.name = name
    mod.__dict__.update(overrides)
    return mod


def devices() -> list[str]:
    """The devices to test on: "cpu", plus "cuda" when a GPU is visible."""
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


# Tolerances for comparing two implementations in the same dtype. Both compute the
# multiplier w in float32 and round t * w once to the dtype, so they differ by at most a
# rounding flip of the output (one ulp: 2**-10 relative for float16, 2**-7 for bfloat16)
# plus float32 reduction-order error in statistics such as the normalisation sum.
_TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for comparing results of ``dtype``."""
    return dict(_TOL[dtype])


LAYOUTS = ["contiguous", "channels_last", "sliced"]

# Small awkward (N, C, H, W): N=1, C=1, 1x1 maps, H != W, sides that are not multiples of
# the block or pooling sizes (5, 7) nor of a power of two.
ODD_SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (1, 4, 9, 9),
    (3, 1, 13, 6),
    (2, 5, 15, 15),
    (2, 8, 14, 14),
]


def make_x(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    layout: str = "contiguous",
) -> torch.Tensor:
    """A standard-normal (N, C, H, W) tensor in ``layout``.

    The values are drawn on the CPU in float32 (float64 for float64) and then converted,
    so they are the same on every device and the same, up to rounding, in every dtype.

    layout: "contiguous"; "channels_last"; "sliced": a view cut out of a larger tensor
    (every stride but the last differs from the default and the storage offset is not 0).
    """
    n, c, h, w = shape
    src = torch.float64 if dtype == torch.float64 else torch.float32
    if layout == "sliced":
        base = torch.randn(n + 1, c + 2, h + 3, w + 5, dtype=src)
        return base.to(device=device, dtype=dtype)[1:, 2:, 1 : h + 1, 3 : w + 3]
    x = torch.randn(shape, dtype=src).to(device=device, dtype=dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "contiguous":
        return x
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def radix_rows(length: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(8, length) float32 rows that exercise every digit of a radix select on the key:
    keys differing only in the lowest byte (with ties) or the lowest 3 bytes, negatives
    (the sign digit), ±0.0 with ±subnormals, ±Inf with a NaN, all equal, normal."""
    g = torch.Generator().manual_seed(length)
    j = torch.randperm(length, generator=g).double()
    ulp = 2.0**-23
    zeros = torch.where(j % 2 == 0, 0.0, -0.0)
    zeros[j % 5 == 1] = 1e-45
    zeros[j % 7 == 3] = -1e-45
    inf = torch.randn(length, generator=g, dtype=torch.float64)
    inf[j % 4 == 0] = float("inf")
    inf[j % 4 == 1] = -float("inf")
    inf[j == length // 2] = float("nan")
    rows = [1 + (j % 256) * ulp, 1 + j * ulp, -(1 + j * ulp), -(j % 3) * 0.25 - 1,
            zeros, inf, torch.full((length,), -2.5, dtype=torch.float64),
            torch.randn(length, generator=g, dtype=torch.float64)]
    return torch.stack(rows).float().to(device)


def radix_maps16(hw: tuple[int, int], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """(1, 6, h, w) maps of a 16-bit float dtype for a select that reads only the key bits
    the dtype can set (bfloat16: 16, float16: 19, the bits below filled from the sign):
    every bit pattern at random (NaN, ±Inf, subnormals, both signs), the same without NaN,
    all negative (the filled bits are ones), ties of a few negatives and zeros, and
    radix_rows's normal and ±0 rows rounded to the dtype."""
    h, w = hw
    g = torch.Generator().manual_seed(h * w)
    bits = torch.randint(-32768, 32768, (h * w,), generator=g, dtype=torch.int16)
    bits = bits.view(dtype)
    finite = torch.where(bits.isnan(), torch.zeros_like(bits), bits)
    ties = torch.tensor([-0.0, 0.0, -1.5, -2.0], dtype=dtype)[torch.randint(4, (h * w,),
                                                                          generator=g)]
    rows = radix_rows(h * w)
    maps = [bits, finite, -finite.abs(), ties, rows[7].to(dtype), rows[4].to(dtype)]
    return torch.stack(maps).reshape(1, len(maps), h, w).to(device)


def permuted_rows(v: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """x (1, c, 1, c) float32 for v (c,) whose pooled rows at k = 1 (position i = v rolled
    by i) hold the same values in c channel orders: every F_i is mathematically equal, so
    exactly equal (SPEC §1). A float32 Gram (sums in channel order) gave 1-ulp different F
    for 13 of 30 such x, which turned CorrDrop's kappa from 0 into 0 or 1."""
    c = v.numel()
    rows = torch.stack([torch.roll(v, i) for i in range(c)])  # (positions, channels)
    return rows.T.reshape(1, c, 1, c).float().contiguous().to(device)


def nonfinite_beside_zero_rows(dtype: torch.dtype, device: str | torch.device = "cpu",
                               channels_last: bool = False) -> list:
    """(x, k) for CorrDrop's pooled correlation where a NaN or an Inf shares a sample with
    zero pooled rows: the reference's F is NaN for every row of that sample (0 · NaN in
    its Gram product reaches the zero rows), and a backend that sets P_ij = 0 for a zero
    row must not hide it there. x (3, 3, 4, 4): sample 0 zero but one NaN (a row whose
    only nonzero is NaN: its max |a| may read as 0), sample 1 zero but one +Inf and one 1,
    sample 2 finite with zero windows (its F stays finite: the NaN is per sample).
    k = 2 (N' = 4, the Gram path) and 4 (N' = 1, one window)."""
    x = torch.zeros(3, 3, 4, 4)
    x[0, 1, 0, 0] = float("nan")
    x[1, 1, 0, 0], x[1, 0, 3, 3] = float("inf"), 1.0
    x[2, :, 2:, :2] = torch.arange(1.0, 13.0).view(3, 2, 2)
    x[2, 0, 0, 3] = -2.0
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [(x, 2), (x, 4)]


def assert_close_dtype(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    """Assert ``actual`` matches ``expected`` within :func:`tol` of ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. Both are compared in float64 on the CPU, so
    ``expected`` may be a float64 reference. Shapes must be equal; NaNs must match.
    """
    dtype = actual.dtype if dtype is None else dtype
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected.detach().cpu().double(),
        equal_nan=True,
        **tol(dtype),
    )


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """``actual`` equals ``expected`` bit for bit: same shape and dtype, and the same values
    to the sign of a zero (-0.0 ranks below +0.0 in every selection: SPEC, reference.order_key),
    a NaN where the other has one, of any sign and payload. Compared on the CPU, so
    ``expected`` may come from the reference on a copy there."""
    assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), (
        what, tuple(actual.shape), tuple(expected.shape), actual.dtype, expected.dtype)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}" if what else m)
    if a.is_floating_point():  # assert_close takes -0.0 == +0.0
        bad = (a.signbit() != e.signbit()) & (e == 0)
        assert not bad.any(), f"{what} signed zeros differ at {bad.nonzero()[:5].tolist()}"


def assert_same_plan(got, want, what: str = "") -> None:
    """Two ``layers.Plan``s are equal bit for bit (:func:`assert_same` per state tensor):
    same kind and meta, and per state tensor the same shape, dtype and values. ``want`` None
    (no plan: nothing dropped) wants ``got`` None."""
    if want is None or got is None:
        assert got is want, (what, got, want)
        return
    assert (got.kind, got.meta) == (want.kind, want.meta), (what, got.kind, got.meta,
                                                            want.kind, want.meta)
    assert len(got.state) == len(want.state), what
    for i, (g, w) in enumerate(zip(got.state, want.state, strict=True)):
        assert_same(g, w, f"{what} state[{i}]")


class AutocastSpy:
    """The reference backend in place of every dispatched one, recording for each of its
    calls whether CPU autocast was on (``calls``: (name, enabled)): the guard of SPEC §1
    (statistics in float32 under autocast) seen directly. The reference computes in float64,
    where autocast changes nothing, so outputs compared inside and outside autocast
    could not show a missing guard."""

    def __init__(self):
        self.calls = []

    @classmethod
    def install(cls, monkeypatch) -> AutocastSpy:
        import guidedrop.dispatch
        spy = cls()
        monkeypatch.setattr(guidedrop.dispatch, "backend_for", lambda x: spy)
        return spy

    def __getattr__(self, name):
        import guidedrop.reference
        fn = getattr(guidedrop.reference, name)  # AttributeError where it has none
        if not callable(fn):
            return fn

        def spy(*args, **kwargs):
            self.calls.append((name, torch.is_autocast_enabled("cpu")))
            return fn(*args, **kwargs)
        return spy
