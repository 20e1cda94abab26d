"""guidedrop._C, the CUDA operators: schemas, fake kernels, opcheck, and each op against
the reference primitive.

Without a GPU (CI) only the first group runs: the extension imports, every schema is
registered and functional, CPU tensors get a clear error, the fake kernels give the
reference's output metadata, and a missing extension gives an ImportError that says how
to build it. The GPU group runs torch.library.opcheck on every op and compares every op
with guidedrop.reference on the same inputs; tests/test_backends.py compares whole layers.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from itertools import product
from pathlib import Path

import pytest
import torch
from testing import DTYPES, HAS_CUDA, HAS_EXT, LAYOUTS, make_x

from guidedrop import reference as R

OPS = (
    "pooled_correlation", "channel_stats", "kth_largest", "map_threshold", "attention_stats",
    "cam", "seed_bits", "seed_coverage", "apply_channel", "apply_block", "apply_seeds",
    "apply_attention",
)
BUILD = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ."  # README

needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"guidedrop._C is not built ({BUILD})")
needs_gpu = pytest.mark.skipif(not (HAS_EXT and HAS_CUDA),
                               reason="needs a CUDA device and guidedrop._C")


def _op(name):
    return getattr(torch.ops.guidedrop, name)


# --------------------------------------------------------------------------- samples


def _g(g: float, device) -> torch.Tensor:
    """The seed rate as the ops take it: a 0-dim float32 tensor (a runtime value)."""
    return torch.tensor(g, dtype=torch.float32, device=device)


def _samples(dtype=torch.float32, layout="contiguous", device="cuda", shape=(2, 3, 5, 7)):
    """{op: args} with small awkward inputs; state tensors from the reference primitives."""
    gen = torch.Generator().manual_seed(1)

    def rand(*s):
        return torch.rand(s, generator=gen).to(device)

    x = make_x(shape, dtype, device, layout)
    n, c, h, w = shape
    r, k = 3, 3
    kt = min(7, h * w)  # rank of the threshold
    active = rand(n, c) < 0.6
    thr, mn, rcp, _ = R.attention_stats(x, kt, active, "ad")
    noise = rand(n, c, h, w)
    cand_s, cand_c = rand(n, h, w) < 0.7, rand(n, c) < 0.7
    bits = R.seed_bits(noise, None, 0.3, r, cand_s, cand_c, (n, c, h, w), device)
    mask = (rand(n, -(-h // k), -(-w // k)) < 0.5).to(torch.uint8)
    scale = 0.5 + rand(n)
    empty = torch.empty(0, dtype=torch.uint8, device=device)
    return {
        "pooled_correlation": (x, k),
        "channel_stats": (x,),
        "kth_largest": (x.float().flatten(1), min(4, c * h * w)),
        "map_threshold": (x, kt),
        "attention_stats": (x, kt, active, "ad"),
        "cam": (x, rand(n, c) - 0.5),
        "seed_bits": (empty, noise, cand_s, cand_c, [n, c, h, w], _g(0.3, device), r, None),
        "seed_coverage": (bits, r, c, h, w),
        "apply_channel": (x, rand(n, c) * 2),
        "apply_block": (x, mask, k, scale),
        "apply_seeds": (x, bits, r, False, scale),
        "apply_attention": (x, x, R.attention_state(thr, mn, rcp, scale), active, "ad"),
    }


def _reference(op, args):
    """The reference primitive on the op's arguments."""
    if op == "seed_bits":
        device_like, noise, cand_s, cand_c, shape, g, r, generator = args
        return R.seed_bits(noise, generator, g, r, cand_s, cand_c, tuple(shape),
                           device_like.device)
    return getattr(R, op)(*args)


def _as_tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# --------------------------------------------------------------------------- no GPU needed


@needs_ext
def test_cuda_schemas_registered():
    from guidedrop import cuda_backend as B

    for op in (*OPS, *B.PLAN_OPS):
        schema = _op(op).default._schema
        assert schema.name == f"guidedrop::{op}"
        # functional: no argument is written to, no output aliases an input
        assert all(a.alias_info is None or not a.alias_info.is_write for a in schema.arguments)
        assert all(ret.alias_info is None for ret in schema.returns)


@needs_ext
def test_cuda_backend_module():
    from guidedrop import cuda_backend as B
    from guidedrop import dispatch

    assert B.name == "cuda"
    assert set(B.OPS) == set(OPS)
    assert (B.unavailable() == "") == torch.cuda.is_available()
    assert "CUDA tensor" in B.unsupported(torch.zeros(1, 1, 1, 1))
    if torch.cuda.is_available():
        assert "float64" in B.unsupported(torch.zeros(1, 1, 1, 1, device="cuda",
                                                      dtype=torch.float64))
    else:
        assert dispatch.load("cuda")[0] is None


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_cuda_ops_refuse_cpu_tensors(op):
    args = _samples(device="cpu")[op]
    with pytest.raises(RuntimeError, match="CUDA kernels only"):
        _op(op)(*args)


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_fake_matches_reference_metadata(op, layout):
    """The fake kernels (run on meta tensors) give the reference's shapes, dtypes, strides."""
    import guidedrop.cuda_backend  # noqa: F401  (registers the fakes)

    args = _samples(torch.float16, layout, device="cpu")[op]
    fake = _as_tuple(_op(op)(*_to(args, "meta")))
    ref = _as_tuple(_reference(op, args))
    assert len(fake) == len(ref)
    for f, e in zip(fake, ref, strict=True):
        assert f.device.type == "meta"
        assert (f.shape, f.dtype) == (e.shape, e.dtype)
        if op.startswith("apply_"):
            assert f.stride() == e.stride(), "apply ops keep t's memory format"


def test_cuda_extension_shares_torchs_libstdcxx():
    """guidedrop._C needs libstdc++.so, the C++ runtime torch uses. Linked statically (as
    the H200 machine's CC/CXX did, 2026-12-04), a TORCH_CHECK's message loses its numbers
    (here) or kills the process (SIGSEGV there). The file is found, not imported, so a
    .so that does not load is checked too (HAS_EXT would skip it)."""
    spec = importlib.util.find_spec("guidedrop._C")
    if spec is None or not spec.origin:
        pytest.skip(f"guidedrop._C is not built ({BUILD})")
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    # LC_ALL=C: readelf's labels are translated (LANGUAGE=fr: "Bibliothèque partagée").
    dynamic = subprocess.run([readelf, "-d", spec.origin], capture_output=True, text=True,
                             check=True, env={**os.environ, "LC_ALL": "C"}).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert any(lib.startswith("libstdc++.so") for lib in needed), (spec.origin, needed)


def _fake_extension(monkeypatch, module):
    """guidedrop._C as ``module`` (None: `import guidedrop._C` fails, as where it is not
    built), cuda_backend not yet imported and no backend loaded but the reference."""
    import guidedrop
    from guidedrop import dispatch

    monkeypatch.setitem(sys.modules, "guidedrop._C", module)
    if module is None:
        monkeypatch.delattr(guidedrop, "_C", raising=False)  # else `from . import _C` takes it
    else:
        monkeypatch.setattr(guidedrop, "_C", module, raising=False)
    monkeypatch.delitem(sys.modules, "guidedrop.cuda_backend", raising=False)
    monkeypatch.setattr(dispatch, "_loaded", {"reference": dispatch._loaded["reference"]})
    return dispatch


def test_cuda_backend_import_error_says_how_to_build(monkeypatch):
    _fake_extension(monkeypatch, None)  # monkeypatch puts the previous modules back afterwards
    with pytest.raises(ModuleNotFoundError, match=re.escape(BUILD)):
        import guidedrop.cuda_backend  # noqa: F401
    # the hint is the README's command
    assert BUILD in (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_cuda_backend_refuses_a_build_for_another_torch(monkeypatch):
    """A _C built against another torch can load (its symbols found) and crash later:
    cuda_backend compares the version setup.py recorded and names both, and dispatch.load
    warns of it once (auto would pass over it unseen)."""
    import types

    stale = types.ModuleType("guidedrop._C")
    stale.torch_version = "2.0.0+stale"
    dispatch = _fake_extension(monkeypatch, stale)
    with pytest.raises(ImportError, match=rf"built against torch 2\.0\.0\+stale; this is torch "
                                          rf"{re.escape(torch.__version__)}\..*{re.escape(BUILD)}"):
        import guidedrop.cuda_backend  # noqa: F401
    with pytest.warns(RuntimeWarning, match=r"cuda backend is unavailable: .*2\.0\.0\+stale"):
        assert dispatch.load("cuda")[0] is None


def test_cuda_backend_not_built_is_no_warning(monkeypatch):
    dispatch = _fake_extension(monkeypatch, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "is not built" in dispatch.load("cuda")[1]


@needs_ext
def test_cuda_extension_records_its_torch():
    import guidedrop._C as C

    assert C.torch_version == torch.__version__


# --------------------------------------------------------------------------- GPU: opcheck


# Every dtype on contiguous inputs, every layout in float32 (opcheck compiles: keep it short).
OPCHECK_CASES = [(d, "contiguous") for d in DTYPES] + [(torch.float32, lay) for lay in LAYOUTS[1:]]


@pytest.mark.parametrize(("dtype", "layout"), OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.usefixtures("_cuda_backend")
@pytest.mark.gpu
@needs_gpu
def test_cuda_opcheck(op, dtype, layout):
    torch.library.opcheck(_op(op), _samples(dtype, layout)[op])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.usefixtures("_cuda_backend")
def test_cuda_opcheck_seed_bits_philox():
    # Random without noise: only the checks that do not compare two runs' values.
    empty = torch.empty(0, dtype=torch.uint8, device="cuda")
    torch.library.opcheck(_op("seed_bits"), (empty, None, None, None, [2, 3, 9, 11],
                                             _g(0.2, "cuda"), 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def _cuda_backend():
    import guidedrop.cuda_backend  # noqa: F401  (the fakes opcheck needs)


# --------------------------------------------------------------------------- GPU: values

EXACT = {"kth_largest", "map_threshold", "seed_bits", "seed_coverage", "apply_channel",
         "apply_block", "apply_seeds", "apply_attention"}


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 5, 15, 15), (2, 40, 9, 6)],
                         ids=str)
@pytest.mark.parametrize(("dtype", "layout"), list(product(DTYPES, LAYOUTS)), ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.gpu
@needs_gpu
def test_cuda_op_matches_reference(op, dtype, layout, shape):
    args = _samples(dtype, layout, shape=shape)[op]
    got = _as_tuple(_op(op)(*args))
    want = _as_tuple(_reference(op, args))
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        assert g.shape == e.shape and g.dtype == e.dtype, (i, g.shape, e.shape, g.dtype, e.dtype)
        if op == "attention_stats":  # entries of inactive maps are unspecified (0 here)
            act = args[2]
            g, e = g[act], e[act]
            if i < 3:  # thr, min, max are exact; the soft-mask sum is a float32 sum
                assert torch.equal(g, e), i
                continue
        if op in EXACT or (op == "channel_stats" and i == 0):
            assert torch.equal(g, e), (op, i, (g != e).sum().item())
        else:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        if op.startswith("apply_"):
            assert g.stride() == e.stride()


@pytest.mark.gpu
@needs_gpu
def test_cuda_kth_largest_ties_nan_signed_zero_and_long_rows():
    rows = [
        [5.0, 1.0, 5.0, 2.0, 5.0, 0.0, 3.0, 4.0, -1.0, 0.5],
        [float("nan"), 1.0, float("inf"), -float("inf"), 2.0, float("nan"), 0.0, -0.0, 3.0, 3.0],
        [-0.0, 0.0, -0.0, 0.0, -1e-45, 1e-45, -3.0, -2.0, -2.0, -2.0],
        [7.0] * 10,
    ]
    v = torch.tensor(rows, device="cuda")
    for k in range(1, 11):
        got, want = _op("kth_largest")(v, k), R.kth_largest(v, k)
        torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
    # Rows longer than the shared-memory buffer (10240 keys) and than a block; strided rows.
    big = torch.randn(3, 30000, device="cuda").round(decimals=1)  # many ties
    for k in (1, 2, 17, 4999, 15000, 30000):
        assert torch.equal(_op("kth_largest")(big, k), R.kth_largest(big, k))
        assert torch.equal(_op("kth_largest")(big.t().contiguous().t(), k), R.kth_largest(big, k))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_map_threshold_large_maps(layout):
    x = make_x((1, 2, 110, 100), torch.float16, "cuda", layout)  # 11000 > 10240 keys
    for k in (1, 100, 2200, 11000):
        assert torch.equal(_op("map_threshold")(x, k), R.map_threshold(x, k))
    active = torch.tensor([[True, True]], device="cuda")
    for mode in ("am", "sm", "ad"):
        got, want = _op("attention_stats")(x, 2200, active, mode), R.attention_stats(
            x, 2200, active, mode)
        for g, e in zip(got, want, strict=True):  # msum too: exact in any order
            assert torch.equal(g, e)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("op", ["apply_channel", "apply_block", "apply_seeds", "apply_attention"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_apply_vector_and_scalar_paths_agree(op, dtype):
    """Aligned dense input (16-byte vector path) vs a misaligned copy (scalar path)."""
    shape = (2, 3, 9, 13)  # numel not a multiple of the vector width: a tail chunk
    args = _samples(dtype, "contiguous", shape=shape)[op]
    x = args[0]
    storage = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    x_odd = storage[1:].view(shape).copy_(x)  # contiguous, not 16-byte aligned
    assert x_odd.data_ptr() % 16 != 0
    odd_args = (x_odd, x_odd, *args[2:]) if op == "apply_attention" else (x_odd, *args[1:])
    a, b = _op(op)(*args), _op(op)(*odd_args)
    assert torch.equal(a, b)
    xcl = x.contiguous(memory_format=torch.channels_last)
    cl_args = (xcl, xcl, *args[2:]) if op == "apply_attention" else (xcl, *args[1:])
    assert torch.equal(_op(op)(*cl_args), a)


@pytest.mark.gpu
@needs_gpu
def test_cuda_apply_grad_layouts():
    """Backward passes grad_y in any layout, e.g. the stride-0 grad of y.sum()."""
    args = _samples(torch.float32, "channels_last")["apply_seeds"]
    x = args[0]
    g = torch.ones(1, device="cuda").expand(x.shape)
    got = _op("apply_seeds")(g, *args[1:])
    assert torch.equal(got, R.apply_seeds(g, *args[1:]))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_seed_bits_philox(shared):
    from guidedrop import cuda_backend as B

    n, c, h, w, r, g = 4, 8, 33, 35, 5, 0.05
    shape = (n, 1 if shared else c, h, w)
    gen = torch.Generator(device="cuda").manual_seed(123)
    a = B.seed_bits(None, gen, g, r, None, None, shape, "cuda")
    b = B.seed_bits(None, gen, g, r, None, None, shape, "cuda")
    gen.manual_seed(123)
    a2 = B.seed_bits(None, gen, g, r, None, None, shape, "cuda")
    assert torch.equal(a, a2), "same seed, same bits"
    assert not torch.equal(a, b), "the generator's offset advances"
    seeds = R.unpack_seeds(a, shape[1], h, w)
    valid = R.valid_centres(h, w, r, "cuda")
    assert not seeds[..., ~valid].any(), "seeds only at valid centres"
    rate = seeds[..., valid].float().mean().item()
    count = seeds[..., valid].numel()
    assert abs(rate - g) < 6 * (g * (1 - g) / count) ** 0.5
    # candidates are respected
    cand_s = torch.rand(n, h, w, device="cuda") < 0.5
    cand_c = torch.rand(n, shape[1], device="cuda") < 0.5
    s = R.unpack_seeds(B.seed_bits(None, None, 0.5, r, cand_s, cand_c, shape, "cuda"), *shape[1:])
    assert not (s & ~(cand_s[:, None] & cand_c[:, :, None, None])).any()


@pytest.mark.gpu
@needs_gpu
def test_cuda_seed_bits_noise_dtypes():
    """u < g with u rounded to float32 whatever noise's dtype (SPEC §1), like the reference."""
    shape, g = (2, 3, 8, 9), 0.30000001
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        noise = torch.rand(shape, device="cuda", dtype=torch.float64).to(dtype)
        noise[0, 0, 4, 4] = torch.tensor(g, dtype=torch.float32).to(dtype)  # the boundary
        got = _op("seed_bits")(torch.empty(0, device="cuda"), noise, None, None, list(shape),
                               _g(g, "cuda"), 1, None)
        assert torch.equal(got, R.seed_bits(noise, None, g, 1, None, None, shape, "cuda"))


@pytest.mark.gpu
@needs_gpu
def test_cuda_seed_bits_graph_capture():
    from guidedrop import cuda_backend as B

    shape, g = (2, 4, 16, 16), 0.1
    B.seed_bits(None, None, g, 3, None, None, shape, "cuda")  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = B.seed_bits(None, None, g, 3, None, None, shape, "cuda")
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out), "each replay draws new uniforms"
