"""The launch budget of every layer on the kernel backends (issue 12), counted on the CPU.

One forward of ``guidedrop.functional.<layer>`` with ``GUIDEDROP_BACKEND`` forced, and one
backward, counted by :func:`guidedrop.launches.count_layer` (aten ops that compute, Triton
launches under the interpreter, the emulated CUDA extension's kernel launches; the same
counts as ``python -m guidedrop bench --model``):

- forward with ``noise`` given: at most 3 launches (statistics, plan, apply); CamDrop 5
  (CAM, candidates, seeds, coverage, apply);
- ``noise=None``: at most one more (the draw);
- backward: exactly 1 (the apply on grad_y);
- no host synchronisation anywhere.

Every layer meets it on both kernel backends (its plan fused into plan kernels, or as small
as SpatialScale's).
"""

from __future__ import annotations

import pytest
import torch
from test_training import SHAPE, _ops  # every layer, rates giving non-trivial masks
from testing import CUDA, emulated, force_backend

from guidedrop import dispatch, launches
from guidedrop.launches import KERNELS, LaunchCounter, count_layer

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BUDGET = {"corrdrop": 3, "selectscale": 3, "spatialscale": 3, "selectout": 3,
          "attentiondrop": 3, "focused_dropout": 3, "camdrop": 5, "dropblock": 3}


@pytest.fixture(params=["triton", CUDA])
def backend(request, monkeypatch):
    force_backend(request.param, monkeypatch)  # without a GPU, CUDA on the emulator
    return request.param


@pytest.mark.parametrize("layer", list(BUDGET))
def test_launch_budget(backend, layer):
    call, noise_shape = _ops(DEV)[layer]
    x = torch.randn(SHAPE, device=DEV)
    c = count_layer(call, x, torch.rand(noise_shape, device=DEV))

    syncs = c.forward.syncs + c.backward.syncs + c.fresh.syncs
    assert not syncs, syncs
    assert len(c.backward.launches) == 1, c.backward.names
    assert len(c.forward.launches) <= BUDGET[layer], c.forward.names
    assert len(c.fresh.launches) <= BUDGET[layer] + 1, c.fresh.names


@emulated
@pytest.mark.parametrize("layer", list(BUDGET))
def test_cuda_kernels_per_op(layer, monkeypatch):
    """launches.KERNELS, from which the counter takes the real extension's launches (not
    visible from Python), is what each op of csrc/ launches: the emulator counts the
    launches of the same sources, op by op, over a forward (noise given and drawn) and a
    backward."""
    import test_cuda_emulated as CE
    from torch.utils._python_dispatch import TorchDispatchMode

    if CE.emu.unavailable():
        pytest.skip(f"no CUDA emulator: {CE.emu.unavailable()}")
    monkeypatch.setitem(dispatch._loaded, "cuda", (CE.emu.backend(), ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", "cuda")
    ops = torch.ops.guidedrop_emu
    launched = []

    class PerOp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = ops.emu_launches()
            out = func(*args, **(kwargs or {}))
            if func.namespace == "guidedrop_emu":
                launched.append((func._schema.name.split("::")[-1],
                                 ops.emu_launches() - before))
            return out

    call, noise_shape = _ops("cpu")[layer]
    x = torch.randn(SHAPE, requires_grad=True)
    with PerOp():
        call(x, torch.rand(noise_shape)).sum().backward()
        call(x.detach(), None)
    assert launched, "no op of the extension ran"
    assert launched == [(name, KERNELS.get(name, 1)) for name, _ in launched]


@pytest.mark.parametrize("layer", list(BUDGET))
def test_triton_int_arguments_fit_int32(layer, monkeypatch):
    """Every int a layer's Triton kernels take (positional or keyword) fits int32: torch
    2.11's inductor fails to compile a graph whose user Triton kernel takes an int of 2**31
    or more (seen on an H200 with the flat apply tile's division magic numbers)."""
    if dispatch.load("triton")[0] is None:
        pytest.skip(f"backend triton unavailable: {dispatch.load('triton')[1]}")
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    call, noise_shape = _ops(DEV)[layer]
    c = count_layer(call, torch.randn(SHAPE, device=DEV), torch.rand(noise_shape, device=DEV))
    ints = {}
    for launch in c.forward.launches + c.backward.launches + c.fresh.launches:
        if launch.spec is None:
            continue
        ints.update({(launch.name, i): a[2] for i, a in enumerate(launch.spec["args"])
                     if a[0] == "int"})
        ints.update({(launch.name, k): v for k, v in launch.spec["kwargs"].items()
                     if isinstance(v, int) and not isinstance(v, bool)})
    assert ints, "no int arguments recorded"
    wide = {k: v for k, v in ints.items() if not -2**31 <= v < 2**31}
    assert not wide, wide


def test_launch_bytes_bound_what_it_moves():
    """A launch's bytes are its inputs' plus its outputs': an in-place op reads and writes
    its tensor, which counts twice (once, before: ``bench --model``'s bytes were no upper
    bound on the reference's in-place ops); a tensor passed twice is read once."""
    a, b = torch.ones(64), torch.ones(64)
    with LaunchCounter() as c:
        a.add_(b)  # reads a and b, writes a
        torch.add(a, a)  # reads a, writes a new tensor
    assert [launch.nbytes for launch in c.launches] == [3 * 256, 2 * 256]


def test_launch_bytes_take_each_tensors_itemsize():
    """A launch's bytes are numel x itemsize of each of its tensors, the dtype's own
    itemsize (not 4 for every dtype): 64 bf16 elements converted to float64 read 64 x 2 and
    write 64 x 8 = 640 bytes; a float64 add of a tensor with itself reads 512 once and
    writes 512 = 1024. The counter's total is their sum, every launch's (1664)."""
    a, b = torch.ones(64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.float64)
    with LaunchCounter() as c:
        a.to(torch.float64)
        torch.add(b, b)
    assert c.names == ["aten:_to_copy", "aten:add"]
    assert [launch.nbytes for launch in c.launches] == [64 * 2 + 64 * 8, 2 * 64 * 8]
    assert c.nbytes == 640 + 1024


def test_launch_bytes_count_views_of_one_storage_apart():
    """Tensors are the same tensor for the bytes only with the same storage, offset, dtype
    and shape: a launch given a[:32] and a (same storage and offset, other shapes) reads
    both, 128 + 256 bytes (keyed on the storage and offset alone, a[:32] hid a: 128), and
    writes their 96 floats, 384: 768 in all. a and its int32 view (same storage, offset and
    shape, other dtype) are two tensors too: an add of them reads 256 + 256 and writes 64
    floats, 256: 768 (keyed without the dtype, 512)."""
    a = torch.ones(64)
    with LaunchCounter() as c:
        torch.cat([a[:32], a])
        torch.add(a, a.view(torch.int32))
    assert c.names == ["aten:cat", "aten:add"]
    assert [launch.nbytes for launch in c.launches] == [128 + 256 + 96 * 4, 3 * 256]


def test_launch_bytes_count_keyword_only_tensors():
    """A tensor an aten op takes as a keyword-only argument (searchsorted's ``sorter``,
    which the dispatcher passes in kwargs) is read too: 64 float32 sorted values (256) +
    8 float32 queries (32) + the 64 int64 sorter (512), and 8 int64 indices written (64):
    864 bytes (352 without the sorter)."""
    a = torch.rand(64)
    sorter, v = torch.argsort(a), torch.rand(8)
    with LaunchCounter() as c:
        torch.searchsorted(a, v, sorter=sorter)
    assert c.names == ["aten:searchsorted"]
    assert c.launches[0].nbytes == 256 + 32 + 512 + 64


def test_host_syncs_are_recorded_not_launched():
    """A host synchronisation is recorded in ``syncs`` under its aten name, in order, and
    is no launch: ``nonzero`` (its output's size waits for the device), ``.item()``
    (``_local_scalar_dense``) and ``torch.equal`` (a bool on the host)."""
    t, s = torch.tensor([0.0, 1.0, 2.0]), torch.ones(1)
    with LaunchCounter() as c:
        t.nonzero()
        s.item()
        torch.equal(t, t)
    assert c.syncs == ["nonzero", "_local_scalar_dense", "equal"]
    assert c.launches == []


def test_count_layer_counts_each_pass_and_the_floor():
    """count_layer on a stand-in layer, y = x * noise (noise=None: drawn with rand_like),
    x bf16 (2, 3, 4, 4): 96 elements of 2 bytes, 192 bytes a tensor.
    - forward with noise: one mul, reading x and noise, writing y: 3 x 192 = 576;
    - forward with noise=None: rand_like (reads x's 192 for its shape, writes 192: 384),
      then the mul (576): 960;
    - backward: grad_x = grad_y * noise, one mul (576);
    - floor: 3 reads + 2 writes of x, 5 x 192 = 960 (x's itemsize, not 4)."""
    def call(x, noise):
        if noise is None:
            noise = torch.rand_like(x)
        return x * noise

    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    c = count_layer(call, x, torch.rand(2, 3, 4, 4, dtype=torch.bfloat16))
    assert c.forward.names == ["aten:mul"] and c.forward.nbytes == 576
    assert c.fresh.names == ["aten:rand_like", "aten:mul"]
    assert [launch.nbytes for launch in c.fresh.launches] == [384, 576]
    assert c.fresh.nbytes == 960
    assert c.backward.names == ["aten:mul"] and c.backward.nbytes == 576
    assert c.floor_bytes == 5 * 96 * 2
    assert c.forward.syncs == c.fresh.syncs == c.backward.syncs == []


@torch.library.custom_op("guidedrop::_launch_counter_probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for an op of the CUDA extension (namespace guidedrop)."""
    return x * 2


def test_extension_op_counts_its_kernels(monkeypatch):
    """An op of the CUDA extension (namespace ``guidedrop``; its launches are not visible
    from Python) counts launches.KERNELS[op] kernels, 1 where the op is not listed, named
    ``cuda:<op>``; the first carries the op's bytes (64 fp16 elements read and 64 written:
    256), the others none, so that the op's bytes count once. Its own aten ops are not
    counted (the extension's kernels are)."""
    x = torch.ones(64, dtype=torch.float16)
    with LaunchCounter() as c:
        torch.ops.guidedrop._launch_counter_probe(x)
    assert c.names == ["cuda:_launch_counter_probe"]
    assert [launch.nbytes for launch in c.launches] == [256]
    monkeypatch.setitem(launches.KERNELS, "_launch_counter_probe", 3)
    with LaunchCounter() as c:
        torch.ops.guidedrop._launch_counter_probe(x)
    assert c.names == ["cuda:_launch_counter_probe"] * 3
    assert [launch.nbytes for launch in c.launches] == [256, 0, 0]
    assert c.nbytes == 256


def test_counter_reentered_restores_the_triton_launchers():
    """Entered again while active (as __torch_dispatch__ does around a guidedrop_triton
    op's body), the counter keeps Triton's launchers patched until its outermost exit
    (restored at an inner exit, the launches made after a Triton op's body went
    uncounted), and that exit puts the originals back."""
    triton_jit = pytest.importorskip("triton.runtime.jit")
    from triton.runtime.interpreter import InterpretedFunction

    before = (triton_jit.JITFunction.run, InterpretedFunction.run)
    with LaunchCounter() as c:
        with c:
            with c:
                pass
        # both patched while active
        assert triton_jit.JITFunction.run is not before[0]
        assert InterpretedFunction.run is not before[1]
    assert (triton_jit.JITFunction.run, InterpretedFunction.run) == before


def test_triton_launch_bytes_and_warmup():
    """A Triton launch counts the bytes of its tensor arguments, positional or keyword
    (x given positionally, y_ptr by keyword: 64 fp16 each, 256 bytes), under its kernel's
    name; a warmup (kernel.warmup: compiles, launches nothing) is no launch."""
    triton = pytest.importorskip("triton")
    import triton.language as tl


    @triton.jit
    def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)

    x = torch.ones(64, dtype=torch.float16, device=DEV)
    y = torch.empty_like(x)
    with LaunchCounter() as c:
        _double_kernel[(1,)](x, y_ptr=y, n=64, BLOCK=64)
        _double_kernel.warmup(x, y, 64, BLOCK=64, grid=(1,))
    assert c.names == ["triton:_double_kernel"]
    assert c.launches[0].nbytes == 2 * 64 * 2
    assert torch.equal(y, torch.full_like(x, 2))


def test_triton_launches_skip_wrap_triton_in_eager():
    """Outside tracing, the Triton backend launches its kernels directly: wrap_triton's
    higher-order op made every Triton layer host-bound on an H200 (1.5-2 ms of host time a
    forward + backward). Traced (torch.compile, FakeTensor, make_fx), it goes through
    wrap_triton, which torch.compile needs; under a user's dispatch mode it does not
    (FlopCounterMode would count the kernel and never run it)."""
    if dispatch.load("triton")[0] is None:
        pytest.skip(f"backend triton unavailable: {dispatch.load('triton')[1]}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    from guidedrop.triton_kernels._common import traced
    assert not traced()
    for mode in (FlopCounterMode(display=False), LaunchCounter()):
        with mode:
            assert not traced()
    with FakeTensorMode():
        assert traced()
    seen = []
    make_fx(lambda x: seen.append(traced()) or x + 1)(torch.zeros(()))
    assert seen == [True]
    assert torch.compile(lambda x: x + traced(), backend="eager", fullgraph=True)(
        torch.zeros(())).item() == 1


@pytest.mark.parametrize("layer", list(BUDGET))
def test_eager_step_binds_no_signature(layer, monkeypatch):
    """An eager forward and backward (second order too) never binds the autograd Function's
    arguments with inspect.signature. torch does that at every call of a Function whose
    forward has no ctx (the form torch.func needs, with setup_context): with the kernels
    stubbed, 60 of a layer's 155 µs of host time a forward + backward on this CPU. The host
    path is the backends' common one, so the reference's is checked."""
    import inspect
    bound = []
    signature = inspect.signature

    def spy(obj, *args, **kwargs):
        if getattr(obj, "__module__", "").startswith("guidedrop"):
            bound.append(obj.__qualname__)
        return signature(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", spy)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    call, noise_shape = _ops("cpu")[layer]
    x = torch.randn(SHAPE, requires_grad=True)
    (g,) = torch.autograd.grad(call(x, torch.rand(noise_shape)).square().sum(), x,
                               create_graph=True)
    g.sum().backward()
    assert x.grad is not None and not bound, bound


@emulated
def test_host_overhead_script_runs_on_the_cpu():
    """benchmarks/host_overhead.py --cpu (the host-time figures of benchmarks/RESULTS.md
    without a GPU; its CUDA column stubs the emulated backend's ops) runs, and times every
    layer on every backend."""
    import subprocess

    import test_cuda_emulated as CE
    if CE.emu.unavailable():
        pytest.skip(f"no CUDA emulator: {CE.emu.unavailable()}")
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "host_overhead.py"), "--cpu"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[2:]}
    assert set(rows) == set(BUDGET), r.stdout
    for cells in rows.values():
        assert len(cells) == 3 and all(float(c) > 0 for c in cells), r.stdout
