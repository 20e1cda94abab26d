"""Grid sizes at the goal shapes, read on the CPU: every kernel that streams x (or a mask of
x's units) launches enough warps to keep an H200's memory busy.

Each layer of test_backends.LAYERS runs forward and backward at the goal shapes (N = 128:
(64, 56, 56), (256, 28, 28), (1024, 14, 14)), bfloat16 and float32, NCHW and
channels_last, with its kernels recorded, not run: Triton's by a stand-in for
``_common.launch`` (the grid and num_warps of each launch), the CUDA sources' by the
emulator's record mode (tests/cuda_emu: ``emu_record``, each launch's source line, grid and
block). Seconds, although x has 25.7M elements: nothing is computed.

The bound, MIN_WARPS = 2048 warps (about 16 per SM of an H200's 132), is what keeps
enough 16-byte loads in flight to cover DRAM latency at that chip's bandwidth (about 3.4 MB:
4.8 TB/s x 0.7 µs, some three loads a thread). A grid of one program per sample does not:
128 programs of 4 warps (Triton's CAM before MAP_SPLIT) left most of the chip idle. This
checks the grid only: a kernel whose threads idle inside a full grid (the CUDA CAM before
its warps took the channels: 25 of 256 threads a block at 14 x 14) passes it. Kernels known
to miss it are listed in BELOW_MIN with the reason; the test fails when one of them no
longer misses it, so that the entry cannot outlive its fix.

Not held to it: kernels over per-sample or per-map state (plans, scales, candidates), and
the seeds of DropBlock's shared mask (one map per sample: N * H * W units, not x's).

Also the launches a GPU refuses, which a CPU run never makes: Triton grids past CUDA's
limits at huge shapes (on FakeTensors), and CUDA blocks of more than 256 threads whose
kernels do not bound their registers (__launch_bounds__).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import test_backends as TB
import test_triton_compile as TC
import torch
from testing import emulated

from guidedrop import dispatch, sass

ROOT = Path(__file__).resolve().parents[1]
MIN_WARPS = 2048
# Triton kernels under MIN_WARPS at the goal shapes, and why.
BELOW_MIN = {
    "_pooled_correlation_kernel": "one program of 8 warps a sample (1024 warps at N = 128): "
                                  "the Gram phase needs the sample's pooled rows in one "
                                  "program; larger pooling tiles spilled (bf16 7 x 7 to "
                                  "28 x 28). The CUDA kernel takes 32 warps a sample",
}
SHAPES = [(128, 64, 56, 56), (128, 256, 28, 28), (128, 1024, 14, 14)]
DTYPES = (torch.bfloat16, torch.float32)
# Triton: the kernels over x or x's units (sass.TRITON_STREAMING); CUDA: their sources'
# launch sites, but for the plan kernels over per-sample state (csrc/cuda/plans/; CamDrop's
# CAM, which reads x, is class_activation.cu's).
TRITON_KERNELS = set(sass.TRITON_STREAMING)
CUDA_STATE_KERNELS = re.compile(r"^csrc/cuda/plans/")
# Seed kernels of a shared mask: N * H * W units, 1 / C of x.
SHARED_SEEDS = {"_seed_bits_kernel", "_seed_coverage_kernel", "seed_bits_kernel",
                "seed_coverage_kernel"}


def _drive(record, shapes=SHAPES, dtypes=DTYPES):
    """Every layer, forward and backward, at shapes x dtypes x layouts; record(case) is
    called after each with the case's name."""
    for dtype in dtypes:
        for shape in shapes:
            for layout in ("contiguous", "channels_last"):
                x = TB.make_x(shape, dtype, "cpu", layout)
                for case, (op, _, params, _) in TB.LAYERS.items():
                    xg = x.detach().requires_grad_()
                    y = op(xg, noise=None, **params)
                    y.backward(torch.ones_like(y))
                    record(f"{case} {shape} {str(dtype)[6:]} {layout}")


def _short(rows):
    """The launches under MIN_WARPS, one line each."""
    return [f"{kernel} ({case}): {warps} warps" for kernel, case, warps in rows
            if warps < MIN_WARPS]


def test_triton_grids_fill_the_gpu(monkeypatch):
    mod, why = dispatch.load("triton")
    if mod is None:
        pytest.skip(f"no Triton backend: {why}")
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    launched = []

    def launch(kernel):
        name = kernel.fn.__name__

        def run(grid, *args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            launched.append((name, math.prod(g) * kwargs.get("num_warps", 4)))
        return TC._Grid(run)

    for m in TC._kernel_modules(mod):
        monkeypatch.setattr(m, "launch", launch)
    rows = []

    def record(case):
        rows.extend((k, case, w) for k, w in launched if k in TRITON_KERNELS
                    and not (case.startswith("dropblock-shared") and k in SHARED_SEEDS))
        launched.clear()

    with sass.gpu_tiles():  # the tiles a GPU gets, not the interpreter's
        _drive(record)
    assert {k for k, _, _ in rows} == TRITON_KERNELS - {"_apply_seeds_rows_kernel",
                                                        "_apply_attention_kernel"}, \
        "a streaming kernel was never launched here (or a new one is not listed)"
    short = _short(r for r in rows if r[0] not in BELOW_MIN)
    assert not short, "\n".join(short)
    for kernel, why in BELOW_MIN.items():
        assert _short(r for r in rows if r[0] == kernel), \
            f"{kernel} now launches {MIN_WARPS} warps or more: remove it from BELOW_MIN ({why})"


# Shapes at CUDA's grid limits (2**31 - 1 programs on axis 0, 65535 on axes 1 and 2):
# a map of 4M positions (Triton's CAM had a program a 64-position block on axis 1: 65536 in
# channels_last), more samples than 65535, more than 2**31 elements (the int64 offsets).
# AttentionDrop's state of 4 floats a map passes 2**31 elements before x at 1 x 1 maps.
HUGE_SHAPES = [(1, 64, 2048, 2048), (70000, 3, 5, 5), (64, 256, 384, 384),
               (1, 2**29 + 7, 1, 1)]


def test_triton_grids_within_cuda_limits(monkeypatch):
    """Every Triton launch of every layer, forward and backward, at HUGE_SHAPES (bfloat16,
    both layouts) has a grid a GPU accepts: over the limit the launch fails ("invalid
    argument"); and a kernel given a tensor of 2**31 elements or more (or strided as far)
    indexes in 64 bits (IDX64). On FakeTensors: shapes only, no memory, nothing runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from guidedrop.triton_kernels._common import needs_int64

    mod, why = dispatch.load("triton")
    if mod is None:
        pytest.skip(f"no Triton backend: {why}")
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    launched, over = [], []

    def launch(kernel):
        def run(grid, *args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            if g[0] > 2**31 - 1 or any(v > 65535 for v in g[1:]):
                launched.append(f"{kernel.fn.__name__} {g}")
            if "IDX64" in kwargs and not kwargs["IDX64"] and needs_int64(
                    *(a for a in args if isinstance(a, torch.Tensor))):
                launched.append(f"{kernel.fn.__name__} in 32 bits")
        return TC._Grid(run)

    def record(case):
        over.extend(f"{fault} ({case})" for fault in launched)
        launched.clear()

    for m in TC._kernel_modules(mod):
        monkeypatch.setattr(m, "launch", launch)
    with FakeTensorMode(), sass.gpu_tiles():
        _drive(record, HUGE_SHAPES, (torch.bfloat16,))
    assert not over, "\n".join(over)


def _cuda_launches(monkeypatch):
    """(site, case, grid, block) of every CUDA launch of ``_drive`` (the emulator's record
    mode), grid and block (x, y, z) tuples; skips without the emulator."""
    import test_cuda_emulated as CE

    if CE.emu.unavailable():
        pytest.skip(f"CUDA emulator: {CE.emu.unavailable()}")
    E = CE.emu.ops()
    monkeypatch.setitem(dispatch._loaded, "cuda", (CE.emu.backend(), ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", "cuda")
    rows = []

    def record(case):
        for r in E.emu_recorded():
            site, g, b = re.fullmatch(r"(.+) (\(\d+, \d+, \d+\)) (\(\d+, \d+, \d+\))", r).groups()
            rows.append((site, case, *(tuple(map(int, re.findall(r"\d+", v))) for v in (g, b))))

    E.emu_record(True)
    try:
        _drive(record)
    finally:
        E.emu_record(False)
        E.emu_recorded()
    assert rows, "no launch recorded"
    return rows


@emulated
def test_cuda_grids_fill_the_gpu(monkeypatch):
    rows = []
    for site, case, g, b in _cuda_launches(monkeypatch):
        kernel = site.split(" ", 1)[1].split("<")[0]
        if CUDA_STATE_KERNELS.match(site) or (case.startswith("dropblock-shared")
                                              and kernel in SHARED_SEEDS):
            continue
        rows.append((site, case, math.prod(g) * math.prod(b) // 32))
    assert not _short(rows), "\n".join(_short(rows))


@emulated
def test_cuda_blocks_over_256_threads_bound_their_registers(monkeypatch):
    """A block of more than 256 threads fits an SM's 65536 registers only if each thread
    takes at most 65536 / threads (64 at 1024): every kernel launched so declares
    __launch_bounds__, which makes nvcc hold it there. Without, one more register after a
    change of code or compiler fails every such launch ("too many resources requested"),
    which neither the emulator nor a CPU run shows (the CorrDrop plan took exactly 64 on
    sm_90). Kernels of at most 256 threads fit at any register count (255 x 256)."""
    sources = "\n".join(p.read_text() for p in ROOT.glob("csrc/**/*.cu*"))
    bounded = set(re.findall(r"__launch_bounds__\([^)]*\)\s+(\w+)", sources))
    big = {site.split(" ", 1)[1].split("<")[0]: math.prod(b)
           for site, _, _, b in _cuda_launches(monkeypatch) if math.prod(b) > 256}
    assert big, "no launch of more than 256 threads recorded"
    assert not set(big) - bounded, {k: v for k, v in big.items() if k not in bounded}
