"""FocusedDropout's participation flag ``applied`` (SPEC §5, issue 12 item 5).

Compiled or captured, the module draws its participation on x's device and passes it to
the kernels as a 0-d bool (``applied``); a step that does not participate must cost at most
one read of x: the statistics and plan kernels skip x (mask all ones, scale 1), the apply
writes y = x bit for bit, the backward gives grad_y. Checked on every backend: the
reference (torch code, the oracle), Triton under the interpreter and the CUDA sources on
the emulator (the real ops with a GPU):

- the plan with applied False / True equals the reference plan exactly;
- y = x and grad = grad_y bit for bit (-0.0, ±Inf; NaN where NaN; every dtype) when not
  applied;
- the bytes of x the kernels read: one read in all (Triton: the interpreter's loads
  counted; both kernel backends: x on a page that faults on any access for the
  statistics and plan kernels);
- launches of the module's compiled-style path, and torch.compile(fullgraph=True) with no
  recompile while ``applied`` changes from step to step.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from testing import CUDA, DEV, DTYPES, HAS_CUDA, load_backend

import guidedrop
import guidedrop.functional as F
from guidedrop import dispatch, modules
from guidedrop import layers as L
from guidedrop import reference as R
from guidedrop.launches import LaunchCounter

TESTS = Path(__file__).resolve().parent


@pytest.fixture(params=["reference", "triton", CUDA])
def KB(request, monkeypatch):
    """(name, backend module) with GUIDEDROP_BACKEND forced to it (the emulated CUDA ops
    stand in for guidedrop._C without a GPU)."""
    name = request.param
    mod = load_backend(name)
    if name == "cuda" and not HAS_CUDA:
        monkeypatch.setitem(dispatch._loaded, name, (mod, ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", name)
    return name, mod


def _x(dtype=torch.float32, shape=(3, 4, 5, 6), layout="contiguous"):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0], x[0, 1, 2, 3], x[1, 2, 0, 1], x[2, 3, 4, 5] = -0.0, math.nan, math.inf, -math.inf
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=3)[..., 1:shape[3] + 1]
    return x.to(DEV)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def same_bits(y, x):
    """y is x bit for bit (-0.0 and ±Inf included), NaN exactly where x is NaN (a NaN's
    payload and sign may be canonicalised by the float32 -> bfloat16 cast of a kernel,
    as in torch's own x * 1)."""
    nan = x.isnan()
    assert y.dtype == x.dtype and torch.equal(y.isnan(), nan)
    assert torch.equal(_bits(y)[~nan], _bits(x)[~nan])


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("name", ["triton", CUDA])
def test_kernel_channel_stats_take_applied(name):
    """backend_contract.md: the kernel backends' channel_stats take ``applied``; False gives
    0, 0 without reading x, True the statistics (cuda_backend's wrapper took x alone: a
    helper's find)."""
    B = load_backend(name)
    x = _x()
    amax, mean = B.channel_stats(x, torch.tensor(False, device=DEV))
    assert not amax.any() and not mean.any() and amax.shape == mean.shape == (3, 4)
    got = B.channel_stats(x, torch.tensor(True, device=DEV))
    torch.testing.assert_close(got, R.channel_stats(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_plan_with_applied_matches_reference(KB, layout, per_position):
    _, B = KB
    x = _x(torch.float32, layout=layout)
    u = torch.rand((3, 5, 6) if per_position else (3,), device=DEV)
    for a in (False, True):
        applied = torch.tensor(a, device=DEV)
        got = L.focused_dropout(B, x, 0.3, 0.6, per_position=per_position, noise=u,
                                applied=applied)
        want = L.focused_dropout.reference(R, x, 0.3, 0.6, per_position=per_position,
                                           noise=u, applied=applied)
        assert got.kind == want.kind and got.meta == want.meta
        for g, w in zip(got.state, want.state, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)
        if a:  # the plan of the op itself (applied None)
            plain = L.focused_dropout.reference(R, x, 0.3, 0.6, per_position=per_position,
                                                noise=u)
            assert torch.equal(got.state[0], plain.state[0]) and not got.state[0].all()
        else:
            assert got.state[0].all() and torch.equal(got.state[1], torch.ones_like(got.state[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_not_applied_is_the_identity_bit_for_bit(KB, dtype):
    """y = x and x.grad = grad_y exactly (-0.0, NaN, ±Inf kept); the kernel backends'
    backward is one launch."""
    x = _x(dtype).requires_grad_()
    off = torch.tensor(False, device=DEV)
    y = F.focused_dropout(x, noise=torch.rand(3, device=DEV), applied=off)
    same_bits(y.detach(), x.detach())
    grad = _x(dtype).flip(0)
    with LaunchCounter() as c:
        y.backward(grad)
    same_bits(x.grad, grad)
    if KB[0] != "reference":  # the oracle runs torch ops
        assert len(c.launches) == 1, c.names
    on = F.focused_dropout(x.detach(), noise=torch.rand(3, device=DEV),
                           applied=torch.tensor(True, device=DEV))
    assert not torch.equal(on.isnan(), x.isnan())  # the flag is read, not ignored


def test_applied_is_checked():
    x = torch.randn(2, 3, 4, 4)
    for bad, err in ((True, TypeError), (torch.tensor(1), TypeError),
                     (torch.tensor([True]), ValueError)):
        with pytest.raises(err, match="applied"):
            F.focused_dropout(x, applied=bad)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="applied"):
            F.focused_dropout(x.cuda(), applied=torch.tensor(True))
    # another device without a GPU: a meta x (shape inference) and a CPU flag, which a
    # device op would take as a CPU scalar without a word
    with pytest.raises(ValueError, match="^applied must be on x's device meta, got cpu"):
        F.focused_dropout(x.to("meta"), applied=torch.tensor(True))


# --------------------------------------------------------------------------- bytes of x


@contextlib.contextmanager
def bytes_loaded_from(t: torch.Tensor):
    """Counts the bytes that interpreted Triton kernels load from t's storage (every
    masked-in element of every tl.load whose address lies in it): ``box[0]``."""
    from triton.runtime.interpreter import InterpreterBuilder
    lo = t.untyped_storage().data_ptr()
    hi = lo + t.untyped_storage().nbytes()
    box = [0]
    original = InterpreterBuilder.create_masked_load

    def load(self, ptrs, mask, other, *args):
        p = ptrs.data.astype(np.uint64)
        inside = np.broadcast_to(mask.data.astype(bool), p.shape) & (p >= lo) & (p < hi)
        box[0] += int(inside.sum()) * t.element_size()
        return original(self, ptrs, mask, other, *args)

    InterpreterBuilder.create_masked_load = load
    try:
        yield box
    finally:
        InterpreterBuilder.create_masked_load = original


@pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="counts the Triton interpreter's loads")
@pytest.mark.parametrize("participation", [1e-9, 1.0])
def test_module_step_reads_x_once_when_not_applied(monkeypatch, participation):
    """The module on its compiled / captured path (as under torch.compile or CUDA graph
    capture), Triton backend: not participating (participation 1e-9: a draw that is not
    below it; 0 is the identity, no draw), the whole forward is the participation draw
    (rand, lt), the draw of u, the statistics and plan kernels reading nothing of x, and
    the apply reading x once: x.nbytes in all. Participating, the op reads more."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    monkeypatch.setattr(modules, "_traced", lambda x: True)
    torch.manual_seed(0)
    m = guidedrop.FocusedDropout(participation=participation).train()
    x = torch.randn(2, 8, 9, 9)
    with bytes_loaded_from(x) as read, LaunchCounter() as c:
        y = m(x)
    # the apply is the flat-tile or the row-tile kernel, as the layout and W choose
    assert c.names[:5] == ["aten:rand", "aten:lt", "aten:rand", "triton:_channel_stats_kernel",
                           "triton:_focused_plan_kernel"], c.names
    assert len(c.names) == 6 and c.names[5].startswith("triton:_apply_block"), c.names
    assert not c.syncs
    assert isinstance(m.last_applied, torch.Tensor) and bool(m.last_applied) == (participation == 1)
    if participation < 1:
        assert read[0] == x.nbytes, (read[0], x.nbytes)
        assert torch.equal(y, x)
    else:
        assert read[0] >= 2 * x.nbytes, (read[0], x.nbytes)


_GUARDED = r"""
import ctypes, os, sys, torch
sys.path.insert(0, {tests!r})
from guidedrop import layers as L
from testing import load_backend
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
n, c, h, w = 2, 5, 7, 9
size = n * c * h * w * 4
addr = libc.mmap(None, size, 0, 0x22, -1, 0)  # PROT_NONE, private, anonymous
x = torch.frombuffer((ctypes.c_uint8 * size).from_address(addr), dtype=torch.float32)
x = x.view(n, c, h, w)
for name in {names!r}:
    B = load_backend(name)
    for pp, us in ((False, (n,)), (True, (n, h, w))):
        plan = L.focused_dropout(B, x, 0.3, 0.6, per_position=pp, noise=torch.rand(us),
                                 applied=torch.tensor(False))
        assert plan.state[0].all() and (plan.state[1] == 1).all()
        print("untouched", name, pp)
"""


@pytest.mark.skipif(HAS_CUDA or not sys.platform.startswith("linux"),
                    reason="x on a PROT_NONE page of the host (CPU kernels)")
@pytest.mark.slow  # a child Python process: ~7 s
@pytest.mark.parametrize("name", ["triton", CUDA])
def test_not_applied_statistics_and_plan_never_touch_x(name):
    """x on memory that faults on any access: the statistics and plan kernels (Triton
    under the interpreter, the CUDA sources on the emulator) return the identity's plan
    without reading one byte of x (a read would kill the child process)."""
    load_backend(name)  # skips when the backend cannot run here; builds the emulator once
    names = [name]
    code = _GUARDED.format(tests=str(TESTS), names=names)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    assert out.stdout.count("untouched") == 2 * len(names), out.stdout


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.skipif(HAS_CUDA, reason="the CPU compile path (aot_eager)")
@pytest.mark.parametrize("name", ["reference", "triton"])
def test_compile_fullgraph_applied_changes_without_recompile(monkeypatch, name):
    """torch.compile(fullgraph=True) of the module: one graph while the participation
    draw changes from step to step, and each step equals eager with the same draws
    (aot_eager draws as eager does): the op where applied, x exactly elsewhere."""
    if name == "triton":
        load_backend("triton")
    monkeypatch.setenv("GUIDEDROP_BACKEND", name)
    torch._dynamo.reset()
    m = guidedrop.FocusedDropout(participation=0.5).train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    x = torch.randn(2, 4, 5, 6)
    seen = set()
    for step in range(6):
        torch.manual_seed(step)
        y = compiled(x)
        applied = bool(m.last_applied)
        seen.add(applied)
        torch.manual_seed(step)
        assert bool(torch.rand(()) < 0.5) == applied
        want = F.focused_dropout(x, noise=torch.rand(2)) if applied else x
        same_bits(y, want)
    assert seen == {False, True}
    assert counter.frame_count == 1


@pytest.mark.skipif(HAS_CUDA, reason="the CPU compile path (aot_eager)")
def test_compiled_participation_zero_is_the_identity(monkeypatch):
    """SPEC §1 under torch.compile: participation 0 returns x itself and draws nothing
    (torch's generator untouched), as in eager mode; it drew on x's device and ran the op
    with applied False (an attacking helper). A ramp's later rate compiles the op's graph,
    once."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    torch._dynamo.reset()
    m = guidedrop.FocusedDropout(participation=0.0).train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    x = torch.randn(2, 4, 5, 6)
    for _ in range(2):
        state = torch.get_rng_state()
        assert compiled(x) is x
        assert torch.equal(torch.get_rng_state(), state) and m.last_applied is False
    m.participation = 1.0
    assert compiled(x) is not x and bool(m.last_applied)
    m.participation = 0.0
    assert compiled(x) is x and m.last_applied is False
    assert counter.frame_count == 1  # the op's graph; the identity's has no op to compile


# --------------------------------------------------------------------------- the ops


def _op_cases(name):
    """(op, sample args) of the two ops that take ``applied``, on backend ``name``."""
    x = torch.randn(2, 3, 4, 5, device=DEV)
    mean = x.mean(dim=(2, 3))
    u = torch.rand(2, device=DEV)
    if name == "triton":
        load_backend("triton")
        ops = torch.ops.guidedrop_triton  # and the _dynamic twins (their own fake kernels)
        rate = torch.tensor(0.3, device=DEV)
        return [(getattr(ops, f"channel_stats{d}"), (x, torch.tensor(a, device=DEV)))
                for a in (False, True) for d in ("", "_dynamic")] + [
            (getattr(ops, f"focused_dropout_plan{d}"),
             (x, mean, u, rate, rate, False, torch.tensor(a, device=DEV)))
            for a in (False, True) for d in ("", "_dynamic")]
    load_backend("cuda")
    ops = torch.ops.guidedrop if HAS_CUDA else torch.ops.guidedrop_emu
    return [(ops.channel_stats, (x, torch.tensor(a, device=DEV))) for a in (False, True)] + [
        (ops.focused_dropout_plan, (x, mean, u, 0.3, 0.6, False, None,
                                    torch.tensor(a, device=DEV))) for a in (False, True)]


@pytest.mark.parametrize("name", ["triton", CUDA])
def test_ops_with_applied_opcheck(name):
    """Schema and fake kernels of the ops with ``applied``; not applied, the statistics are
    those of a zero map (0) and the plan the identity's."""
    for op, args in _op_cases(name):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        out = op(*args)
        if not bool(args[-1]):
            want = 0 if len(out[0].shape) == 2 else 1  # statistics (N, C) / mask (N, H, W)
            assert (out[0] == want).all() and (out[1] == (0 if want == 0 else 1)).all()
