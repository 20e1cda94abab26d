"""The CUDA kernels of csrc/, run on the CPU by the SIMT emulator of tests/cuda_emu/.

tests/cuda_emu/build.py compiles csrc/guidedrop.cpp and csrc/cuda/*.cu with the host
compiler against tests/cuda_emu/emu.h (one OS thread per CUDA thread), as the library
``guidedrop_emu``: ``torch.ops.guidedrop_emu.<op>`` is the CUDA op on CPU tensors. So CI,
which has no GPU, runs the real kernel source: every op against ``guidedrop.reference`` on
small odd shapes x DTYPES x LAYOUTS (exact where the reference is exact), the kernels'
special paths (long rows, misaligned and channels_last applies, Philox), and every layer
of ``guidedrop.layers`` on a backend module whose primitives are the emulated ops.

The build (~20 s on 2 cores, cached under ~/.cache/guidedrop-emu/) is part of the test: a
kernel that no longer compiles, or that the emulator's rewrites no longer fit, fails here.
The only skip is for a missing CUDA include folder (vector_types.h).

Checked here although a CPU alone would not: misaligned 16-byte accesses (an abort, see
tests/cuda_emu/build.py) and every grid-stride loop past its first pass (grid_for's cap
lowered to one block). Not checked here (see tests/cuda_emu/emu.h): FMA contraction by
nvcc, nvcc-only compile errors, real inter-block concurrency and memory ordering, speed,
graph capture.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest
import test_cuda_ops as T
import torch
from testing import (
    DTYPES,
    LAYOUTS,
    assert_close_dtype,
    assert_same,
    emulated,
    make_x,
    nonfinite_beside_zero_rows,
    permuted_rows,
    radix_maps16,
    radix_rows,
)

from guidedrop import layers as L
from guidedrop import reference as R
from guidedrop.autograd import APPLY_OPS

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"


def _load_build_module():
    """tests/cuda_emu/build.py under a name of its own (not the `build` package)."""
    name = "guidedrop_cuda_emu_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EMU_DIR / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


emu = _load_build_module()

pytestmark = [emulated, pytest.mark.skipif(bool(emu.unavailable()),
                                           reason=f"CUDA emulator: {emu.unavailable()}")]


@pytest.fixture(scope="module")
def E():
    """torch.ops.guidedrop_emu, built once per session (a build error fails the tests)."""
    t0 = time.perf_counter()
    path = emu.build()
    print(f"\nguidedrop_emu: {path} ({time.perf_counter() - t0:.1f} s to build or load)")
    return torch.ops.guidedrop_emu


@pytest.fixture(scope="module")
def B(E):
    """python/guidedrop/cuda_backend.py on the emulated ops."""
    return emu.backend()


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x with its strides, one element off a 16-byte boundary: the kernels' scalar
    paths (x itself, from the allocator, is 16-byte aligned: their vector paths)."""
    odd = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].as_strided(x.shape, x.stride())
    odd.copy_(x)
    assert x.data_ptr() % 16 == 0 and odd.data_ptr() % 16 != 0
    return odd


# --------------------------------------------------------------------------- the emulator


def test_emulator_rewrites():
    """The source rewrites, and the loud failure when one no longer fits."""
    src = """
extern __shared__ uint32_t keys[];
__shared__ float tile[32][33];
void launch() {
  kern<scalar_t, Op<int>>
      <<<grid_for(n, 1), dim3(32, 8), smem, current_stream()>>>(a, b);
  other<<<1, 32>>>();
}
"""
    out = emu.rewrite_cuda(src, "x.cu")
    assert "uint32_t* keys = emu::dyn_smem<uint32_t>();" in out
    assert "__shared__ float tile[32][33];" in out  # emu.h makes __shared__ static
    # each launch names its site (source line, kernel) for the record mode
    assert ("emu::Launcher(grid_for(n, 1), dim3(32, 8), smem, current_stream())"
            '.at("x.cu:5 kern<scalar_t, Op<int>>")(kern<scalar_t, Op<int>>, a, b);') in out
    assert 'emu::Launcher(1, 32).at("x.cu:7 other")(other);' in out
    with pytest.raises(emu.RewriteError, match="kernel launch"):
        emu.rewrite_cuda("void f() { (*table[0])<<<1, 32>>>(x); }", "y.cu")
    with pytest.raises(emu.RewriteError, match="TORCH_LIBRARY"):
        emu.rewrite_ops("TORCH_LIBRARY_FRAGMENT(guidedrop, m) {}", "z.cpp")


# Small kernels on emu.h alone: lane exchange semantics, and errors instead of hangs.
_SELFTEST = r"""
#include "emu.h"
#include <cstdio>
__global__ void lanes(int* out) {
  const int l = threadIdx.x & 31;
  out[threadIdx.x] = __shfl_up_sync(0xffffffffu, l, 3) * 1000 +
                     __shfl_down_sync(0xffffffffu, l, 2) +
                     __shfl_xor_sync(0xffffffffu, l, 5) * 100000 +
                     (__ballot_sync(0xffffffffu, l % 2) == 0xAAAAAAAAu) * 10000000 +
                     __popc(__match_any_sync(0xffffffffu, l / 4)) * 100000000;
}
__global__ void divergent_sync(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void exited_lane(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void split_barriers(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  else __syncthreads();
}
int main() {
  std::vector<int> out(64);
  auto run = [&](const char* name, auto kernel) {
    try {
      emu::Launcher(dim3(2), dim3(64))(kernel, out.data());
      std::printf("%s: ok\n", name);
    } catch (const std::exception& e) {
      std::printf("%s: %s\n", name, e.what());
    }
  };
  run("lanes", lanes);
  std::printf("lanes: %d %d %d\n", out[0], out[5], out[33]);
  run("divergent_sync", divergent_sync);
  run("exited_lane", exited_lane);
  run("split_barriers", split_barriers);
  try { emu::Launcher(dim3(1), dim3(48))(lanes, out.data()); } catch (const std::exception& e) {
    std::printf("partial warp: %s\n", e.what());
  }
}
"""


def test_emulator_selftest(tmp_path):
    (tmp_path / "t.cpp").write_text(_SELFTEST)
    cxx = os.environ.get("CXX", "c++")
    cc = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", f"-I{EMU_DIR}",
                         f"-I{emu.cuda_include()}", "t.cpp", "-o", "t"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    env = dict(os.environ, GUIDEDROP_EMU_TIMEOUT="2")
    res = subprocess.run(["./t"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    lines = dict(line.split(": ", 1) for line in res.stdout.splitlines() if line != "lanes: ok")
    assert "lanes: ok" in res.stdout, res.stdout

    def lane(t):  # what `lanes` computes for thread t
        i = t % 32
        return ((i - 3 if i >= 3 else i) * 1000 + (i + 2 if i + 2 < 32 else i) + (i ^ 5) * 100000
                + 10000000 + 4 * 100000000)

    assert lines["lanes"] == f"{lane(0)} {lane(5)} {lane(33)}", res.stdout
    assert "while the others wait at __syncthreads" in lines["divergent_sync"]
    assert "while the others wait at a warp intrinsic of warp 0" in lines["exited_lane"]
    assert "no progress in 2" in lines["split_barriers"], res.stdout
    assert "48 of 64" in lines["split_barriers"] and "16 of 32" in lines["split_barriers"]
    assert "whole warps" in lines["partial warp"]


# --------------------------------------------------------------------------- every op

# Small odd shapes in every dtype and layout; two wider ones (C > 32 channel lanes / tiles;
# N' = 42 pooled positions, maps of 340 > 256 threads) once per dtype and per layout.
SMALL = [(1, 1, 1, 1), (2, 3, 5, 7)]
WIDE = [(1, 33, 4, 6), (2, 2, 17, 20)]
WIDE_COMBOS = list(zip(DTYPES, LAYOUTS, strict=True))


def _cases(dtype):
    for shape, layout in product(SMALL, LAYOUTS):
        yield shape, layout
    for shape in WIDE:
        for wd, layout in WIDE_COMBOS:
            if wd == dtype:
                yield shape, layout


def _with_r1(op, args):
    """args, and for apply_seeds also its r = 1 forms (the plans' state, seed_blocks: the
    apply_bits kernels), with a mask a channel and one shared by the channels."""
    if op != "apply_seeds":
        return [args]
    x, bits, _, _, scale = args
    n, _, h, w = x.shape
    u = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(x.shape[1]))
    shared = R.seed_bits(u, None, 0.3, 1, None, None, (n, 1, h, w), "cpu")
    return [args, (x, bits, 1, False, scale), (x, shared, 1, True, scale)]


def _check_op(op, args, got, want, what):
    got, want = T._as_tuple(got), T._as_tuple(want)
    assert len(got) == len(want), what
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        tag = f"{what} output {i}"
        assert g.shape == e.shape and g.dtype == e.dtype, (tag, g.shape, e.shape, g.dtype, e.dtype)
        if op == "attention_stats":  # entries of inactive maps are unspecified (0 here)
            act = args[2]
            g, e = g[act], e[act]
            if i < 3:  # thr, min, max exact; the soft-mask sum is a float32 sum
                assert_same(g, e, tag)
                continue
        if op in T.EXACT or (op == "channel_stats" and i == 0):
            assert_same(g, e, tag)
        else:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, tag=tag: f"{tag}: {m}")
        if op.startswith("apply_"):
            assert g.stride() == e.stride(), (tag, g.stride(), e.stride())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", T.OPS)
def test_emulated_op_matches_reference(E, op, dtype):
    for shape, layout in _cases(dtype):
        args = T._samples(dtype, layout, device="cpu", shape=shape)[op]
        _check_op(op, args, getattr(E, op)(*args), T._reference(op, args),
                  f"{op} {shape} {dtype} {layout}")


@pytest.mark.parametrize("op", T.OPS)
def test_emulated_op_one_block_grids(E, op, monkeypatch):
    """Every grid_for grid one block (GUIDEDROP_EMU_MAX_GRID, emu.h), so that each
    grid-stride loop runs several passes (96 or 99 maps; 8640 or 8910 elements, 5 passes
    of 16-byte chunks in bfloat16; C = 32 takes the channels_last applies' 16-byte path),
    as on a GPU past 2^18 blocks of work (common.cuh): the outputs without the cap's."""
    monkeypatch.setenv("GUIDEDROP_EMU_MAX_GRID", "1")
    for dtype, layout, c in product(DTYPES, LAYOUTS, (32, 33)):
        args = T._samples(dtype, layout, device="cpu", shape=(3, c, 9, 10))[op]
        for a in _with_r1(op, args):
            _check_op(op, a, getattr(E, op)(*a), T._reference(op, a),
                      f"{op} one block {dtype} {layout} C={c} {a[2:4] if len(a) > 3 else ''}")


@pytest.mark.parametrize("op", T.OPS)
def test_emulated_opcheck(B, op):
    """Schema (no input mutated, no output aliased) and the fake kernels of cuda_backend.py
    against the real kernels' outputs (shapes, dtypes, strides)."""
    for dtype, layout in WIDE_COMBOS:
        args = T._samples(dtype, layout, device="cpu")[op]
        torch.library.opcheck(getattr(torch.ops.guidedrop_emu, op), args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", APPLY_OPS)
def test_emulated_apply_op_autograd(B, op):
    """The CUDA apply ops' autograd formula (cuda_backend registers it), which a program
    exported in train mode runs, its graph holding the bare op: grad_t = op(grad_y, *args),
    the args constant, and differentiable again (second order)."""
    f = getattr(torch.ops.guidedrop_emu, op)
    args = T._samples(device="cpu")[op]
    t = args[0].detach().clone().requires_grad_()
    y = f(t, *args[1:])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
    (gt,) = torch.autograd.grad(y, t, g, create_graph=True)
    assert torch.equal(gt, f(g.detach(), *args[1:]))
    (gg,) = torch.autograd.grad(gt.sum(), g)
    assert torch.equal(gg, f(torch.ones_like(t), *args[1:]))


def test_emulated_ops_registered(E):
    for op in T.OPS:
        assert getattr(E, op).default._schema.name == f"guidedrop_emu::{op}"


def test_emulated_ops_check_arguments(E):
    x = torch.randn(2, 3, 5, 7)
    with pytest.raises(RuntimeError, match="float64 runs on the reference backend"):
        E.channel_stats(x.double())
    with pytest.raises(RuntimeError, match="k must be in"):
        E.map_threshold(x, 36)
    with pytest.raises(RuntimeError, match="mode must be one of"):
        E.attention_stats(x, 3, torch.ones(2, 3, dtype=torch.bool), "xx")


def test_emulated_statistics_nan_inf_ties(E):
    x = make_x((2, 3, 6, 5), torch.float32).clone()
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    x[1, 2, 0, 0] = -float("inf")
    ties = (make_x((2, 3, 6, 5), torch.float16, layout="channels_last").float() * 2).round() / 2
    active = torch.ones(2, 3, dtype=torch.bool)
    # maps whose rows are not one stride apart (transposed, sliced): map_select's
    # per-unit (h, w) index; the others take its flat one
    for xx in (x, ties, x.transpose(2, 3), ties[..., 1:4]):
        assert_same(E.channel_stats(xx)[0], R.channel_stats(xx)[0], "amax")
        for k in (1, 4, xx.shape[2] * xx.shape[3]):
            assert_same(E.map_threshold(xx, k), R.map_threshold(xx, k), f"map_threshold k={k}")
        for mode in ("am", "sm", "ad"):
            got = E.attention_stats(xx, 4, active, mode)
            want = R.attention_stats(xx, 4, active, mode)
            for i in range(3):
                assert_same(got[i], want[i], f"attention_stats {mode} {i}")


def test_emulated_kth_largest_ties_nan_signed_zero_and_long_rows(E):
    rows = [
        [5.0, 1.0, 5.0, 2.0, 5.0, 0.0, 3.0, 4.0, -1.0, 0.5],
        [float("nan"), 1.0, float("inf"), -float("inf"), 2.0, float("nan"), 0.0, -0.0, 3.0, 3.0],
        [-0.0, 0.0, -0.0, 0.0, -1e-45, 1e-45, -3.0, -2.0, -2.0, -2.0],
        [7.0] * 10,
    ]
    v = torch.tensor(rows)
    for k in range(1, 11):
        assert_same(E.kth_largest(v, k), R.kth_largest(v, k), f"k={k}")
    # Rows longer than the shared-memory buffer (10240 keys): keys re-read from memory.
    big = torch.randn(2, 10300, generator=torch.Generator().manual_seed(3)).round(decimals=1)
    for k in (1, 17, 5150, 10300):
        assert_same(E.kth_largest(big, k), R.kth_largest(big, k), f"long rows k={k}")
        assert_same(E.kth_largest(big.t().contiguous().t(), k),
                    R.kth_largest(big, k), f"strided k={k}")


@pytest.mark.parametrize("hw", [(3, 3), (103, 100)], ids=str)
def test_emulated_attention_stats_signed_zeros(E, hw):
    """Maps of mixed ±0 (and ±1): thr, min and r in reference.order_key's order, -0.0
    below +0.0, to the sign bit (the min and max of the keys; a float a < b kept either
    zero of a tie); maps in shared memory and over it (read twice)."""
    n = hw[0] * hw[1]
    z = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.0, -0.0, -0.0]).repeat(n // 9 + 1)[:n]
    x = torch.stack([z, z.flip(0), z.abs(), -z.abs(), torch.where(z == 0, z, 0.0),
                     torch.where(z == 0, z, 0.0).flip(0)]).view(1, 6, *hw)
    active = torch.ones(1, 6, dtype=torch.bool)
    for k in (1, 2, n // 2, n):
        got, want = E.attention_stats(x, k, active, "sm"), R.attention_stats(x, k, active, "sm")
        for i in range(4):
            assert_same(got[i], want[i], f"k={k} {i}")
            assert torch.equal(got[i].signbit(), want[i].signbit()), (k, i, got[i], want[i])


@pytest.mark.slow
def test_emulated_kth_largest_every_digit_long_rows(E):
    """Rows over the shared-memory buffer (10240 keys), read twice: the top digit's keys
    packed into shared memory, or, for the rows whose keys all share the top 8 bits
    (1 + j ulp: more than 10240 candidates), the lower passes re-reading x. The same for
    attention_stats' maps too long for map_select_regs_kernel (over 14336 units), where
    the second read also takes the map's min and max whether or not it packs the keys."""
    v = radix_rows(10300)
    for k in (1, 2, 5150, 10300):
        assert_same(E.kth_largest(v, k), R.kth_largest(v, k), f"k={k}")
    active = torch.tensor([[True, True]])
    for hw in ((103, 100), (121, 120)):  # map_select_regs_kernel's block form; then not
        x = 1 + make_x((1, 2, *hw), torch.float32).abs() / 8  # keys of one top digit
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            got, want = (B_.attention_stats(xx, 2200, active, "sm") for B_ in (E, R))
            for i in range(4):
                assert_same(got[i], want[i], f"attention_stats {hw} {xx.stride()} {i}")


@pytest.mark.parametrize("hw", [(7, 7), (50, 60), (103, 100), (112, 128), (113, 128)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_map_threshold_16bit_keys(E, dtype, hw):
    """16-bit maps: the radix passes stop at the last key bit the dtype sets (bfloat16: 2
    passes, float16: 3) and fill the bits below, ones where the threshold is negative or
    NaN. Maps on 4 lanes (7 x 7), on a block in 16-byte loads (50 x 60) and unit by
    unit (103 x 100: not whole chunks), the longest on a block, 256 threads of 56 keys
    (112 x 128), and the next whole-chunk size (113 x 128), which takes map_select_kernel
    and reads x twice (over 10240 keys)."""
    x = radix_maps16(hw, dtype)
    n = hw[0] * hw[1]
    for k in (1, 2, n // 3 + 1, n - 1, n):
        assert_same(E.map_threshold(x, k), R.map_threshold(x, k), f"{hw} k={k}")
    active = torch.ones(x.shape[:2], dtype=torch.bool)
    got, want = E.attention_stats(x, n // 5 + 1, active, "ad"), R.attention_stats(
        x, n // 5 + 1, active, "ad")
    for i in range(4):
        assert_same(got[i], want[i], f"{hw} attention_stats {i}")


# one case a map size: the sizes take a minute or more together, one case each lets
# pytest-xdist spread them over its workers
@pytest.mark.parametrize("hw", [(1, 1), (6, 8), (8, 8), (5, 13), (12, 12), (16, 16), (1, 257),
                                (28, 28), (32, 32), (25, 41), (36, 36), (56, 56), (56, 64),
                                (64, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_map_select_warp_and_block_sizes(E, dtype, hw):
    """Maps of 1 to 1024 units take map_select_regs_kernel's warp forms (its keys in
    registers: 4 lanes per map, 16 keys a lane up to 64 units, 64 up to 256, 8 maps a warp,
    some of them past the last map or inactive; else a warp, 32 keys a lane; contiguous NCHW
    maps of whole 16-byte chunks in 16-byte loads, 6 x 8, 12 x 12 and 28 x 28 with chunks
    of padding, 8 x 8, 16 x 16 and 32 x 32 without); longer
    contiguous NCHW maps of whole 16-byte chunks, up to 256 x 56 units, its block form (a
    block per map, 56 keys a thread: 36 x 36 on a warp of which most is padding, 56 x 56 on
    2 warps, 56 x 64 on 2 with no padding, 64 x 128 on 5;
    test_emulated_map_threshold_16bit_keys: the most), other maps of rows one stride apart
    (25 x 41: not whole chunks; channels_last) the same unit by unit; the rest the
    block-wide map_select_kernel (transposed maps over 1024 units). Maps on each side of
    each boundary, with rows one stride apart (NCHW, channels_last) and not (transposed: the
    per-unit (h, w) of a multiply-high), every digit of the select, the soft mask's sum in
    every mode."""
    h, w = hw
    n = h * w
    x = (radix_maps16((h, w), dtype) if dtype != torch.float32
         else radix_rows(n)[2:].reshape(1, 6, h, w))
    active = torch.tensor([[True, False, True, True, True, True]])
    for xx in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3)):
        for k in sorted({1, min(2, n), n // 3 + 1, max(n - 1, 1), n}):
            assert_same(E.map_threshold(xx, k), R.map_threshold(xx, k), f"{h}x{w} k={k}")
        for mode in ("am", "sm", "ad"):
            got = E.attention_stats(xx, n // 5 + 1, active, mode)
            want = R.attention_stats(xx, n // 5 + 1, active, mode)
            for i in range(4):
                assert_same(got[i][active], want[i][active], f"{h}x{w} {mode} {i}")
                assert not got[i][~active].any()  # inactive maps: 0
    rows = x.flatten(2)[0].float()
    for k in (1, n):
        assert_same(E.kth_largest(rows, k), R.kth_largest(rows, k), f"rows {n} k={k}")


@pytest.mark.parametrize("hw", [(8, 8), (12, 12)], ids=str)
def test_emulated_attention_stats_groups_of_a_warp(E, hw):
    """Maps of 4 lanes, 8 a warp, 16 keys a lane (8 x 8) or 64 (12 x 12): a warp whose maps
    are all inactive skips them, one with some active computes its inactive maps without
    writing them, and the last warp's groups past the last map write nothing."""
    x = radix_maps16(hw, torch.bfloat16)  # 6 maps
    x = torch.cat([x, x.flip(1)] * 2, 1)[:, :22]  # 3 warps of 8 maps, the last 2 short
    active = torch.tensor([[False] * 8 + [True, False, False, True] + [False] * 4
                           + [True] * 4 + [False, True]])
    for mode in ("am", "sm", "ad"):
        got = E.attention_stats(x, 13, active, mode)
        want = R.attention_stats(x, 13, active, mode)
        for i in range(4):
            assert_same(got[i][active], want[i][active], f"{mode} {i}")
            assert not got[i][~active].any()


@pytest.mark.parametrize("shape", [(2, 40, 7, 7), (1, 70, 12, 12)], ids=str)
def test_emulated_attention_stats_many_blocks(E, shape):
    """More maps than a block of 4-lane groups takes (32): the grid-stride loop's later blocks,
    in both layouts, random active maps, every mode."""
    n, c, h, w = shape
    active = torch.rand(n, c, generator=torch.Generator().manual_seed(c)) < 0.7
    for layout in ("contiguous", "channels_last"):
        x = make_x(shape, torch.bfloat16, layout=layout)
        assert_same(E.map_threshold(x, 9), R.map_threshold(x, 9), f"{layout} map_threshold")
        for mode in ("am", "sm", "ad"):
            got, want = E.attention_stats(x, 9, active, mode), R.attention_stats(x, 9, active, mode)
            for i in range(4):
                assert_same(got[i][active], want[i][active], f"{layout} {mode} {i}")


def test_emulated_map_threshold_large_maps(E):
    # 14520 units: past the register block form (256 x 56) and the 10240 keys in shared memory
    x = make_x((1, 2, 121, 120), torch.float16, layout="channels_last")
    for k in (1, 2200):
        assert_same(E.map_threshold(x, k), R.map_threshold(x, k), f"k={k}")
    active = torch.tensor([[True, False]])
    got, want = E.attention_stats(x, 2200, active, "ad"), R.attention_stats(x, 2200, active, "ad")
    for i in range(4):  # msum too: exact in any order (backend_contract.md)
        assert_same(got[i][active], want[i][active], f"attention_stats {i}")


@pytest.mark.parametrize("op", ["apply_channel", "apply_block", "apply_seeds", "apply_attention"])
def test_emulated_apply_vector_and_scalar_paths_agree(E, op):
    """Aligned dense input (16-byte vector path) vs a misaligned copy (scalar path)."""
    shape = (2, 3, 9, 13)  # numel not a multiple of the vector width: a tail chunk
    for dtype in DTYPES:
        args = T._samples(dtype, "contiguous", device="cpu", shape=shape)[op]
        x = args[0]
        x_odd = misaligned(x)
        odd = (x_odd, x_odd, *args[2:]) if op == "apply_attention" else (x_odd, *args[1:])
        a = getattr(E, op)(*args)
        assert_same(a, T._reference(op, args), f"{op} {dtype} aligned")
        assert_same(getattr(E, op)(*odd), a, f"{op} {dtype} misaligned")
        xcl = x.contiguous(memory_format=torch.channels_last)
        cl = (xcl, xcl, *args[2:]) if op == "apply_attention" else (xcl, *args[1:])
        assert_same(getattr(E, op)(*cl), a, f"{op} {dtype} channels_last")
    # backward passes grad_y in any layout, e.g. the stride-0 grad of y.sum()
    args = T._samples(torch.float32, "channels_last", device="cpu")[op]
    g = torch.ones(1).expand(args[0].shape)
    gargs = (g, *args[1:])
    assert_same(getattr(E, op)(*gargs), T._reference(op, gargs), f"{op} stride-0 grad")
    # each tensor operand alone one element off its alignment: a vector path chosen on the
    # others' alignment reads it misaligned, a fault on a GPU (an abort here: build.py's
    # ALIGNMENT); 8 x 8 maps and channels_last with C = 8 take the vector paths
    for (shape, layout), dtype in product((((2, 3, 9, 13), "contiguous"),
                                           ((2, 3, 8, 8), "contiguous"),
                                           ((2, 8, 3, 5), "channels_last")), DTYPES):
        for args in _with_r1(op, T._samples(dtype, layout, device="cpu", shape=shape)[op]):
            want = getattr(E, op)(*args)
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.numel() > 1:
                    odd = (*args[:i], misaligned(a), *args[i + 1:])
                    assert_same(getattr(E, op)(*odd), want,
                                f"{op} {dtype} {layout} {args[2:4]} operand {i}")


def test_emulated_channel_stats_vector_and_scalar_paths(E):
    """channel_stats' 16-byte vector paths (a contiguous map: scalar head, vectors, scalar
    tail; channels_last with C % V == 0: V channels per lane) and its scalar paths
    (misaligned or sliced x, C % V != 0) against the reference. The values are bfloat16
    numbers, so every float64 sum is exact whatever its order and the means must be exactly
    the reference's: an element missed or read twice shows."""
    cases = [((2, 3, 9, 13), "contiguous"), ((1, 2, 17, 20), "contiguous"),
             ((2, 3, 5, 7), "sliced"), ((2, 16, 5, 7), "channels_last"),
             ((1, 264, 3, 3), "channels_last"), ((2, 24, 3, 5), "channels_last"),
             ((2, 6, 4, 3), "channels_last")]
    for dtype in DTYPES:
        for shape, layout in cases:
            x = make_x(shape, layout=layout).to(torch.bfloat16).to(dtype)
            variants = {"": x}
            if layout != "sliced":  # a copy one element off a 16-byte boundary
                variants[" misaligned"] = misaligned(x)
            ramax, rmean = R.channel_stats(x)
            for tag, xx in variants.items():
                amax, mean = E.channel_stats(xx)
                what = f"{shape} {dtype} {layout}{tag}"
                assert_same(amax, ramax, f"amax {what}")
                assert_same(mean, rmean, f"mean {what}")


def test_emulated_cam_vector_and_scalar_paths(E):
    """cam's 16-byte vector paths (dense aligned x: NCHW with N*C*H*W % V == 0, V positions
    per warp, its lanes over the channels (C over 32: several a lane, and lanes without
    one), realigned from two vectors where H*W % V != 0: 7 x 7 maps start at every
    shift, 14 x 14 at 0 and 8 bytes, and the last map's last vector has no vector after
    it; channels_last with C % V == 0, V channels per lane, alpha in shared memory,
    several samples per block) and its scalar paths (a copy one element off a 16-byte
    boundary; N*C*H*W or C not a multiple of V) against the reference. x and alpha are
    bfloat16 numbers, so every product and float64 sum is exact whatever its order and J
    must be exactly the reference's: a channel or position missed, read twice, shifted or
    paired with the wrong alpha shows. Also: more channels than one chunk of alpha in
    shared memory (1,024: CamDrop's plan kernel, which the op shares), sliced x (the
    strided paths), alpha with strides, and no channels (J = 0)."""
    gen = torch.Generator().manual_seed(3)
    cases = [((2, 5, 4, 6), "contiguous"), ((1, 3, 7, 7), "contiguous"),
             ((2, 8, 7, 7), "contiguous"), ((1, 4, 14, 14), "contiguous"),
             ((3, 8, 5, 3), "contiguous"), ((2, 70, 7, 7), "contiguous"),
             ((1, 40, 14, 14), "contiguous"), ((1, 1030, 2, 4), "contiguous"),
             ((2, 16, 3, 5), "channels_last"), ((3, 264, 3, 3), "channels_last"),
             ((2, 6, 2, 3), "channels_last"), ((1, 2056, 2, 2), "channels_last"),
             ((2, 5, 4, 6), "sliced"), ((1, 1030, 2, 3), "sliced"), ((2, 0, 3, 3), "contiguous"),
             ((2, 0, 3, 3), "channels_last")]
    for dtype in DTYPES:
        for shape, layout in cases:
            x = make_x(shape, layout=layout).to(torch.bfloat16).to(dtype)
            alpha = torch.randn(shape[:2], generator=gen).to(torch.bfloat16).float()
            want = R.cam(x, alpha)
            runs = [("", x, alpha), (" alpha strided", x, alpha.t().contiguous().t())]
            if layout != "sliced" and x.numel():  # (a sliced x is strided already)
                runs.append((" misaligned", misaligned(x), alpha))
            for tag, xx, a in runs:
                assert_same(E.cam(xx, a), want, f"cam {shape} {dtype} {layout}{tag}")
    # a zero J is +0.0 (test_backends.py test_cam_zero_is_positive), on both NCHW paths
    for shape in ((1, 1, 2, 8), (1, 1, 1, 3)):
        assert not E.cam(torch.full(shape, -0.0), torch.ones(1, 1)).signbit().any(), shape


# --------------------------------------------------------------------------- correlation


def test_emulated_pooled_correlation_constant_inputs(E):
    """The exact diagonal P_ii: equal rows give exactly equal F (CorrDrop's kappa = 0)."""
    ones, zeros = torch.ones(1, 3, 6, 6), torch.zeros(1, 3, 6, 6)
    f1, f0 = E.pooled_correlation(ones, 3), E.pooled_correlation(zeros, 3)
    assert_same(f1, R.pooled_correlation(ones, 3), "ones")
    assert_same(f0, R.pooled_correlation(zeros, 3), "zeros")
    assert (f1 == f1.flatten()[0]).all() and abs(f1.flatten()[0].item() - 0.75) < 1e-6
    assert (f0 == 0.25).all()
    # More pooled positions than a Gram tile (N' = 33, 45, 110): the diagonal falls in
    # different lanes of the row sum, every F must still be equal.
    gen = torch.Generator().manual_seed(0)
    for shape, k in [((1, 3, 1, 33), 1), ((1, 33, 5, 9), 1), ((2, 5, 30, 30), 3)]:
        c = shape[1]
        for v in (torch.ones(c), torch.randn(c, generator=gen)):
            x = v[None, :, None, None].expand(shape).contiguous()
            f = E.pooled_correlation(x, k)
            assert (f == f.flatten()[0]).all(), (shape, k, f.unique())
            torch.testing.assert_close(f, R.pooled_correlation(x, k), rtol=1e-5, atol=1e-5)
        z = E.pooled_correlation(torch.zeros(shape), k)
        assert (z == 1 / z[0].numel()).all(), shape


def test_emulated_pooled_correlation_permuted_rows(E):
    """Rows of the same values in another channel order: F exactly equal, and equal to the
    reference's (test_backends.test_pooled_correlation_permuted_rows)."""
    gen = torch.Generator().manual_seed(0)
    for c in (4, 5, 8, 13, 40):
        for _ in range(5):
            x = permuted_rows(torch.rand(c, generator=gen))
            f = E.pooled_correlation(x, 1)
            assert (f == f.flatten()[0]).all(), (c, f)
            assert_same(f, R.pooled_correlation(x, 1), f"c={c}")


def test_emulated_pooled_correlation_vector_and_scalar_paths(E):
    """The pooling's 16-byte vector paths (dense aligned x: NCHW, a thread per window over
    the aligned vectors that cover its rows; channels_last with C % V == 0, V channels per
    thread) give F bit for bit as the scalar path (a copy one element off a 16-byte
    boundary): the same window sums in the same order. And F is the reference's, exactly
    (float64 window sums)."""
    cases = [((2, 8, 14, 14), 3, "contiguous"), ((1, 16, 7, 7), 7, "contiguous"),
             ((2, 4, 10, 12), 5, "contiguous"), ((2, 16, 9, 11), 3, "channels_last"),
             ((1, 24, 7, 7), 7, "channels_last")]
    for dtype in DTYPES:
        for shape, k, layout in cases:
            x = make_x(shape, dtype, layout=layout)
            odd = misaligned(x)
            f = E.pooled_correlation(x, k)
            what = f"{shape} k={k} {dtype} {layout}"
            assert_same(f, E.pooled_correlation(odd, k), f"vector vs scalar path {what}")
            assert_same(f, R.pooled_correlation(x, k), what)


def test_emulated_pooled_correlation_nonfinite_beside_zero_rows(E):
    """A NaN or an Inf makes every F of its sample NaN, the zero rows' too (their P_ij = 0
    must not hide it), as in the reference; the vector and scalar pooling paths alike."""
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            for x, k in nonfinite_beside_zero_rows(dtype, channels_last=cl):
                want = R.pooled_correlation(x, k)
                assert want[:2].isnan().all() and torch.isfinite(want[2]).all(), want
                for tag, xx in (("", x), (" misaligned", misaligned(x))):
                    f = E.pooled_correlation(xx, k)
                    assert_same(f, want, f"k={k} {dtype} channels_last={cl}{tag}")


def test_emulated_pooled_correlation_sizes(E):
    for shape, k, layout in [((1, 4, 12, 11), 1, "channels_last"), ((2, 40, 6, 7), 1, "sliced"),
                             ((2, 3, 4, 4), 5, "contiguous")]:
        x = make_x(shape, torch.float32, layout=layout)
        assert_same(E.pooled_correlation(x, k), R.pooled_correlation(x, k), f"{shape} {layout}")


def test_emulated_pooled_correlation_float64_windows(E):
    """float32 maps of a CNN's width: F exactly the reference's (float64 window sums, exact
    in any order), and window sums past the float32 range give a finite F, the one of x
    scaled down by a power of two (float32 sums overflowed to Inf: F NaN)."""
    for layout in LAYOUTS:
        x = make_x((2, 16, 28, 28), torch.float32, layout=layout)
        for k in (3, 7):
            f = E.pooled_correlation(x, k)
            assert_same(f, R.pooled_correlation(x, k), f"k={k} {layout}")
            small = x.abs().clamp(max=1) + 0.5
            big = small * 2.0**126  # in [2^125, 1.5 * 2^126]: every window sum over 2^128
            assert_same(E.pooled_correlation(big, k), E.pooled_correlation(small, k),
                        f"2^126 k={k} {layout}")


# --------------------------------------------------------------------------- Philox

_MASK = 0xFFFFFFFF


def _philox4x32_10(ctr, key):
    """Philox-4x32-10 (Salmon et al. 2011) on Python ints."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + 0x9E3779B9) & _MASK, (k1 + 0xBB67AE85) & _MASK
    return c0, c1, c2, c3


def test_philox_known_answers():
    """The Random123 known-answer vectors (kat_vectors, philox4x32_10)."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((_MASK,) * 4, (_MASK, _MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        assert _philox4x32_10(ctr, key) == want


def _philox_uniforms(shape, seed, offset):
    """The kernel's u for every element e of shape: word e % 4 of Philox(counter
    (offset / 4, e / 4), key seed), as (bits >> 8) * 2^-24."""
    n = math.prod(shape)
    key = (seed & _MASK, seed >> 32)
    ctr_lo = offset // 4
    u = []
    for group in range((n + 3) // 4):
        words = _philox4x32_10((ctr_lo & _MASK, ctr_lo >> 32, group & _MASK, group >> 32), key)
        u += [(wd >> 8) * 2.0**-24 for wd in words]
    return torch.tensor(u[:n], dtype=torch.float32).view(shape)


@pytest.mark.parametrize("shared", [False, True])
def test_emulated_seed_bits_philox(E, B, shared):
    """Without noise: Philox uniforms keyed by the element index, the generator's offset
    advancing by 4 per call, candidates respected; bits as the reference's from those u."""
    n, c, h, w, r, g = 2, 3, 9, 11, 3, 0.2
    shape = (n, 1 if shared else c, h, w)
    seed = 0x1234_5678_9ABC_DEF1
    gen = torch.Generator().manual_seed(5)
    cand_s = torch.rand(n, h, w, generator=gen) < 0.7
    cand_c = torch.rand(n, shape[1], generator=gen) < 0.7
    for cs, cc in [(None, None), (cand_s, cand_c)]:
        E.emu_set_philox(seed, 8)
        a = B.seed_bits(None, None, g, r, cs, cc, shape, "cpu")
        b = B.seed_bits(None, None, g, r, cs, cc, shape, "cpu")
        E.emu_set_philox(seed, 12)
        assert_same(B.seed_bits(None, None, g, r, cs, cc, shape, "cpu"), b, "offset advances by 4")
        assert not torch.equal(a, b)
        for bits, offset in ((a, 8), (b, 12)):
            u = _philox_uniforms(shape, seed, offset)
            assert_same(bits, R.seed_bits(u, None, g, r, cs, cc, shape, "cpu"), f"offset {offset}")


def test_emulated_seed_bits_noise_dtypes(E):
    """u < g with u rounded to float32 whatever noise's dtype (SPEC §1), like the reference."""
    shape, g = (2, 3, 8, 9), 0.30000001
    g32 = torch.tensor(g, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        noise = torch.rand(shape, dtype=torch.float64).to(dtype)
        noise[0, 0, 4, 4] = g32.to(dtype)  # the boundary
        got = E.seed_bits(torch.empty(0), noise, None, None, list(shape), g32, 1, None)
        assert_same(got, R.seed_bits(noise, None, g, 1, None, None, shape, "cpu"), str(dtype))


@pytest.mark.parametrize("shape", [(2, 5, 2, 3), (3, 4, 3, 1), (2, 3, 7, 70), (1, 9, 4, 13)],
                         ids=str)
def test_emulated_seed_bits_runs_across_rows_and_maps(E, shape):
    """seed_bits steps each thread's run of bytes unit by unit from its first unit (no
    division per unit), carrying into the next rows and maps: runs that start mid-row, bytes
    spanning several rows (W < 8) and maps (H * W < 8), with candidates and strided noise."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(7)
    noise = torch.rand(n, c, h, w + 2, generator=gen)[..., 1:w + 1]
    cand_s = torch.rand(n, h, w, generator=gen) < 0.8
    cand_c = torch.rand(n, c, generator=gen) < 0.8
    g32 = torch.tensor(0.6, dtype=torch.float32)
    for r in (1, 2):
        for cs, cc in [(None, None), (cand_s, cand_c)]:
            got = E.seed_bits(torch.empty(0), noise, cs, cc, list(shape), g32, r, None)
            assert_same(got,
                        R.seed_bits(noise, None, 0.6, r, cs, cc, shape, "cpu"), f"{r} {cs is None}")


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_emulated_seeds_at_map_edges(E, r):
    """Seeds at every valid centre, at the first one only and at the last one only, in maps
    whose H*W is not a multiple of 8: the bits of a sample are one string, so a block must
    stop at its map's edge."""
    for n, c, h, w in [(2, 3, 5, 7), (1, 4, 9, 13)]:
        for cs in (c, 1):
            every = R.unpack_seeds(R.seed_bits(torch.rand(n, cs, h, w), None, 1.0, r, None,
                                               None, (n, cs, h, w), "cpu"), cs, h, w)
            assert (R.seed_coverage(R.pack_bits(every.flatten(1)), r, cs, h, w)
                    == cs * h * w).all()
            first, last = torch.zeros_like(every), torch.zeros_like(every)
            first[..., r // 2, r // 2] = True
            last[..., h - r + r // 2, w - r + r // 2] = True
            x = make_x((n, c, h, w), torch.float32, "cpu")
            one = torch.ones(n)
            for name, seeds in [("every", every), ("first", first), ("last", last)]:
                bits = R.pack_bits(seeds.flatten(1))
                assert_same(E.seed_coverage(bits, r, cs, h, w), R.seed_coverage(bits, r, cs, h, w),
                            f"coverage {name} {cs}")
                assert_same(E.apply_seeds(x, bits, r, cs == 1, one),
                            R.apply_seeds(x, bits, r, cs == 1, one), f"apply {name} {cs}")


# --------------------------------------------------------------------------- layers


def _run(B, layer, x, *args, **kw):
    plan = getattr(L, layer)(B, x, *args, **kw)
    return x if plan is None else L.apply(B, plan, x, x)


def _layer_cases(layer, n, c, h, w, gen):
    def u(*s):
        return torch.rand(s, generator=gen)

    k = 3
    if layer == "corrdrop":
        return [((0.3, k), dict(normalize="batch", noise=u(2, n, -(-h // k), -(-w // k))))]
    if layer == "selectscale":
        return [((0.5, 0.1), dict(noise=u(n, c)))]
    if layer == "spatialscale":
        return [((0.1,), dict(noise=u(n, c)))]
    if layer == "selectout":
        return [((0.6, 0.7), dict(noise=u(n, c)))]
    if layer == "attentiondrop":
        return [((0.6, 20.0), dict(mode="ad", normalize="batch", noise=u(n, c))),
                ((0.6, 33.0), dict(mode="sm", normalize="sample", noise=u(n, c))),
                ((0.6, 50.0), dict(mode="am", normalize="none", noise=u(n, c)))]
    if layer == "focused_dropout":
        return [((0.3, 0.6), dict(per_position=False, noise=u(n))),
                ((0.3, 0.6), dict(per_position=True, noise=u(n, h, w)))]
    if layer == "camdrop":
        weight = torch.randn(10, 2 * c, generator=gen)
        target = torch.randint(0, 10, (n,), generator=gen)
        return [((weight, target, 3, 0.7), dict(channel_rate=0.5, normalize="batch",
                                                noise=u(n, c, h, w)))]
    assert layer == "dropblock"
    return [((0.3, 3), dict(shared_channels=False, normalize="batch", noise=u(n, c, h, w))),
            ((0.3, 3), dict(shared_channels=True, normalize="sample", noise=u(n, 1, h, w)))]


LAYERS = ["corrdrop", "selectscale", "spatialscale", "selectout", "attentiondrop",
          "focused_dropout", "camdrop", "dropblock"]


@pytest.mark.parametrize("max_grid", [None, "1"], ids=["grids", "one_block"])
@pytest.mark.parametrize("layer", LAYERS)
def test_emulated_layer_matches_reference(B, layer, max_grid, monkeypatch):
    """guidedrop.layers.<layer> on the emulated CUDA backend vs on the reference, with
    explicit noise: identical outputs (AttentionDrop: its scale comes from a float32 sum);
    also with every grid_for grid one block (test_emulated_op_one_block_grids), the plan
    kernels' loops over the samples."""
    if max_grid:
        monkeypatch.setenv("GUIDEDROP_EMU_MAX_GRID", max_grid)
    gen = torch.Generator().manual_seed(11)
    for shape, (dtype, layout) in product([(2, 3, 5, 7), (2, 4, 9, 8)], WIDE_COMBOS):
        torch.manual_seed(sum(shape))
        x = make_x(shape, dtype, "cpu", layout)
        for args, kw in _layer_cases(layer, *shape, gen):
            what = f"{layer} {shape} {dtype} {layout} {kw.get('mode', '')}"
            y = _run(B, layer, x, *args, **kw)
            want = _run(R, layer, x, *args, **kw)
            assert y.stride() == want.stride(), what
            if layer == "attentiondrop":
                assert_close_dtype(y, want)
            else:
                assert_same(y, want, what)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e8m0fnu], ids=str)
def test_emulated_layers_float8_noise_and_weight(B, dtype):
    """noise and CamDrop's weight of a float8 dtype, which the CUDA ops do not read (they
    refused it): every layer as on the reference (layers.fusable passes float32, exact)."""
    gen = torch.Generator().manual_seed(12)
    x = make_x((2, 4, 9, 8), torch.float32)
    for layer in LAYERS:
        for args, kw in _layer_cases(layer, *x.shape, gen):
            kw = dict(kw, noise=kw["noise"].to(dtype))
            if layer == "camdrop":
                args = (args[0].to(dtype), *args[1:])
            y, want = _run(B, layer, x, *args, **kw), _run(R, layer, x, *args, **kw)
            if layer == "attentiondrop":
                assert_close_dtype(y, want)
            else:
                assert_same(y, want, f"{layer} {dtype}")


def test_emulated_dropblock_philox(B, E):
    """DropBlock without noise: Philox seeds in the kernel, about the requested drop rate."""
    E.emu_set_philox(7, 0)
    x = torch.randn(2, 4, 16, 16)
    y = _run(B, "dropblock", x, 0.2, 3, shared_channels=False, normalize="batch")
    dropped = (y == 0).float().mean().item()
    assert 0.1 < dropped < 0.3, dropped
    E.emu_set_philox(7, 0)
    assert_same(_run(B, "dropblock", x, 0.2, 3, shared_channels=False, normalize="batch"),
                y, "rerun")


def test_emulated_layers_constant_input(B):
    """CorrDrop on a constant map: F all equal, kappa = 0, so the emulated kernels and the
    reference draw the same mask from the same noise."""
    x = torch.ones(2, 3, 9, 9)
    noise = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    assert_same(_run(B, "corrdrop", x, 0.3, 3, normalize="batch", noise=noise),
                _run(R, "corrdrop", x, 0.3, 3, normalize="batch", noise=noise), "corrdrop ones")


# --------------------------------------------------------------------------- line widths

# Line lengths of the apply kernel's three vector paths (csrc/cuda/common.cuh): a multiple
# of the vector width V (8 in bf16, 4 in float32: one line state a chunk), at least V - 1
# (a chunk on two lines) and shorter (one state an element); W for NCHW, C for channels_last.
LINE_WIDTHS = (56, 32, 28, 14, 7, 3, 2)


@pytest.mark.parametrize("op", ["apply_channel", "apply_block", "apply_seeds", "apply_attention"])
def test_emulated_apply_line_widths(E, op):
    for dtype in (torch.bfloat16, torch.float32):
        for wd in LINE_WIDTHS:
            for shape, layout in [((2, 2, 3, wd), "contiguous"), ((2, wd, 2, 3), "channels_last")]:
                args = T._samples(dtype, layout, device="cpu", shape=shape)[op]
                got = getattr(E, op)(*args)
                assert_same(got, T._reference(op, args), f"{op} {dtype} {shape} {layout}")
                assert got.stride() == args[0].stride()


# apply_channel's flat 16-byte chunks (csrc/cuda/channel_ranking.cu): NCHW maps of
# HW >= V elements (a chunk on one or two maps, its two weights shuffled from the warp's
# loads): HW = V (8 in bf16, 4 in float32: a warp's 32 chunks on 32 maps), 9, 49 (7 x 7, a
# tail of numel % V elements), 196, 784, 3136; channels_last with C % V == 0 (V weights a
# 16-byte load): C = 8, 16, 64 and 12 (float32 only). Maps under V elements (HW = 4 in
# bf16, 3, 1) and other C take the generic kernel.
CHANNEL_FLAT = [((2, 40, 2, 4), "contiguous"), ((2, 40, 2, 2), "contiguous"),
                ((3, 37, 3, 3), "contiguous"),
                ((3, 37, 7, 7), "contiguous"), ((1, 70, 14, 14), "contiguous"),
                ((1, 9, 28, 28), "contiguous"), ((1, 3, 56, 56), "contiguous"),
                ((2, 5, 1, 3), "contiguous"), ((4, 70, 1, 1), "contiguous"),
                ((2, 8, 3, 5), "channels_last"), ((3, 16, 7, 7), "channels_last"),
                ((1, 64, 14, 14), "channels_last"), ((2, 12, 5, 5), "channels_last"),
                ((2, 7, 3, 3), "channels_last")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_apply_channel_flat_chunks(E, dtype):
    """Every (n, c) a weight of its own, so a chunk given its neighbour map's weight
    differs; w also as a view 4 bytes off a 16-byte boundary (copied for the vectors)."""
    for shape, layout in CHANNEL_FLAT:
        n, c = shape[:2]
        x = make_x(shape, dtype, layout=layout)
        w = torch.rand(n, c, generator=torch.Generator().manual_seed(c)) * 2 + 0.25
        w_odd = torch.empty(n * c + 1)[1:].view(n, c)
        w_odd.copy_(w)
        want = R.apply_channel(x, w)
        for ww in (w, w_odd):
            got = E.apply_channel(x, ww)
            assert_same(got, want, f"{dtype} {shape} {layout} w at {ww.data_ptr() % 16}")
            assert got.stride() == x.stride()


# apply_block's flat 16-byte chunks (csrc/cuda/block_mask.cu): contiguous NCHW with
# W >= V - 1 and C * H * W a multiple of V (apply_block_rows_kernel: k >= V - 1 with three
# mask bytes a chunk, smaller k a constant) at W = 7, 14, 28, 56, 32 and odd widths, chunks
# running into the next row and the next map (2 x 8 x 7 x 7, 3 x 4 x 5 x 14, 2 x 16 x 5 x 7);
# many samples a warp (N = 40, 36, 33: the scale shuffles of float32). channels_last with
# C % V == 0 (apply_block_pixels_kernel). The rest takes the generic apply_kernel: W < V - 1
# (W = 4 in bf16 / fp16), C * H * W % V != 0 (2 x 3 x 7 x 7, 3 x 5 x 5 x 14: chunks that
# would span two samples), C % V != 0 in channels_last.
BLOCK_FLAT = [(2, 3, 7, 7), (3, 5, 5, 14), (2, 2, 6, 28), (1, 2, 9, 56), (2, 3, 4, 32),
              (3, 1, 3, 9), (2, 5, 3, 15), (2, 16, 5, 7), (1, 8, 3, 4), (40, 1, 1, 9),
              (40, 1, 1, 7), (36, 1, 2, 4), (2, 8, 7, 7), (3, 4, 5, 14), (40, 1, 1, 8),
              (33, 2, 2, 6), (2, 8, 3, 15)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_apply_block_flat_chunks(E, dtype):
    """Mask values 0, 1, 2 and a scale per sample, so that an element given a neighbour
    column's, row's, map's or sample's multiplier differs; k = 1 .. 7 (each 1 <= k < 7 a
    kernel of its own in bf16) and k > H, W (one mask value a map); also a mask larger than
    needed (its row stride is Ws, not
    ceil(W / k)), a sliced x and a misaligned x (the generic kernel)."""
    gen = torch.Generator().manual_seed(5)
    for (n, c, h, w), k in product(BLOCK_FLAT, (1, 2, 3, 4, 5, 6, 7, 100)):
        kk = min(k, max(h, w))
        for hs, ws in [(-(-h // kk), -(-w // kk)), (-(-h // kk) + 1, -(-w // kk) + 2)]:
            mask = torch.randint(0, 3, (n, hs, ws), generator=gen, dtype=torch.uint8)
            scale = torch.rand(n, generator=gen) * 2 + 0.25
            what = f"{dtype} {(n, c, h, w)} k={k} mask {hs}x{ws}"
            xs = {layout: make_x((n, c, h, w), dtype, layout=layout) for layout in LAYOUTS}
            xs["misaligned"] = misaligned(xs["contiguous"])
            for name, x in xs.items():
                got = E.apply_block(x, mask, k, scale)
                assert_same(got, R.apply_block(x, mask, k, scale), f"{what} {name}")
                if name != "sliced":
                    assert got.stride() == x.stride(), (what, name)


# apply_attention_maps_kernel (csrc/cuda/percentile_threshold.cu): contiguous NCHW maps of
# H * W >= V elements, chunks in one map (H * W a multiple of V, the ONE_MAP kernels: 7 x 8,
# 4 x 14, 9 x 56) or on two (H * W a multiple of 4 only, a map per half chunk in bf16: 6 x 6,
# 14 x 14; 7 x 8 and 4 x 14 in fp32 on two samples too), many maps a chunk's neighbours
# (C = 16), a tail of numel % V. H * W % 4 != 0: four chunks an iteration, the map's end
# anywhere in them, where H * W >= 4 V and C * H * W % (4 V) == 0 (7 x 7 with C = 32 in bf16,
# C = 16 in fp32; 3 x 11, H * W = 33, just over 4 V in bf16); else (2 x 3 x 7 x 7, 3 x 1 x
# 3 x 5, 7 x 7 with C = 16 in bf16), maps under V elements (1 x 4 in bf16 / fp16), sliced
# and misaligned x take the generic apply_kernel. apply_attention_pixels_kernel: t, x and
# out channels_last with C % V == 0 (C = 16 and 32; in fp32 also C = 12), 4 pixels a thread
# R = ceil(H * W / 4) apart (the last thread's 4 pixels cut at H * W = 49, 33, 21, 98);
# channels_last with another C, or t of another layout, take apply_kernel.
ATTENTION_FLAT = [(2, 3, 7, 7), (2, 3, 7, 8), (3, 1, 3, 5), (2, 16, 4, 14), (1, 2, 9, 56),
                  (2, 3, 1, 4), (2, 5, 6, 6), (1, 3, 14, 14), (2, 32, 7, 7), (2, 16, 7, 7),
                  (1, 32, 3, 11), (3, 12, 3, 7), (1, 16, 7, 14)]


def test_emulated_apply_attention_reads_each_maps_scale(E):
    """The state's scale column is read per map, as the reference does, in every layout
    (the channels_last line took its first map's for every channel)."""
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    active = torch.tensor([[True, False, True, False]])
    state = torch.tensor([[[.5, 1, -2, .25], [0, 2, 0, 0], [.5, 3, -2, .25], [0, 4, 0, 0]]])
    for layout in ("contiguous", "channels_last"):
        xx = x.contiguous(memory_format=torch.channels_last) if layout != "contiguous" else x
        for mode in ("am", "sm", "ad"):
            assert_same(E.apply_attention(xx, xx, state, active, mode),
                        R.apply_attention(xx, xx, state, active, mode), f"{layout} {mode}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_apply_attention_flat_chunks(E, dtype):
    """Every mode, half the maps active, a scale per sample, x given as t (the forward) and
    apart from t (the backward: t = grad_y), so that an element given its neighbour map's or
    sample's state, or t's values for x's, differs from the reference; an infinite scale
    (S * scale is NaN where S = 0)."""
    gen = torch.Generator().manual_seed(9)
    for (n, c, h, w), mode in product(ATTENTION_FLAT, ("am", "sm", "ad")):
        active = torch.rand(n, c, generator=gen) < 0.5
        active[0, 0] = True
        scale = torch.rand(n, generator=gen) * 2 + 0.25
        scale[-1] = math.inf
        xs = {layout: make_x((n, c, h, w), dtype, layout=layout) for layout in LAYOUTS}
        xs["misaligned"] = misaligned(xs["contiguous"])
        for name, x in xs.items():
            thr, mn, r, _ = R.attention_stats(x, max(1, h * w // 4), active, mode)
            g = torch.randn(x.shape, generator=gen).to(dtype)
            # grad_y in NCHW, and in x's layout (channels_last: the pixels kernel)
            for t in (x, g, g.contiguous(memory_format=torch.channels_last)):
                what = f"{dtype} {(n, c, h, w)} {mode} {name} {'x' if t is x else t.stride()}"
                st = R.attention_state(thr, mn, r, scale)
                assert_same(E.apply_attention(t, x, st, active, mode),
                            R.apply_attention(t, x, st, active, mode), what)


@pytest.mark.parametrize("shared", [False, True])
def test_emulated_apply_packed_mask(E, shared):
    """apply_seeds with r = 1 (the seeds plans' blocks): random bits, padding bits set, one
    infinite scale; NCHW samples of whole bytes in chunks of 8 (maps of 8s: one byte; 14 x
    14, 7 x 7, 3 x 3: two bytes and the next map's first bits), channels_last with C % V ==
    0 (a bit per pixel, or per channel), and the generic kernel elsewhere."""
    gen = torch.Generator().manual_seed(4)
    for n, c, h, w in [(2, 8, 7, 7), (2, 16, 14, 14), (2, 8, 8, 8), (3, 8, 3, 3), (2, 4, 5, 6),
                       (2, 3, 5, 7)]:
        cs = 1 if shared else c
        bits = torch.randint(0, 256, (n, -(-cs * h * w // 8)), generator=gen, dtype=torch.uint8)
        scale = torch.rand(n, generator=gen) * 3
        scale[-1] = float("inf")
        for dtype in (torch.bfloat16, torch.float32):
            for layout in ("contiguous", "channels_last"):
                x = make_x((n, c, h, w), dtype, "cpu", layout)
                assert_same(E.apply_seeds(x, bits, 1, shared, scale),
                            R.apply_seeds(x, bits, 1, shared, scale),
                            f"{(n, c, h, w)} {dtype} {layout}")


@pytest.mark.parametrize("shared", [False, True])
def test_emulated_seeds_runs(E, shared):
    """apply_seeds and seed_coverage cover a row by runs of up to 32 units (seed_cover.cuh's
    covered_run): rows longer than a run, blocks as wide as the run allows (r = 26 with runs
    of 32, r = 40 with runs of 18) and the per-unit fallback past 57 (r = 59)."""
    gen = torch.Generator().manual_seed(3)
    for (n, c, h, w), r, g in [((2, 3, 5, 56), 1, 0.3), ((1, 2, 9, 70), 3, 0.05),
                               ((2, 2, 7, 28), 7, 0.1), ((1, 2, 30, 75), 26, 0.01),
                               ((1, 1, 41, 64), 40, 0.2), ((1, 1, 60, 61), 59, 0.9)]:
        cs = 1 if shared else c
        noise = torch.rand(n, cs, h, w, generator=gen)
        bits = R.seed_bits(noise, None, g, r, None, None, (n, cs, h, w), "cpu")
        what = f"{(n, c, h, w)} r={r} shared={shared}"
        assert_same(E.seed_coverage(bits, r, cs, h, w), R.seed_coverage(bits, r, cs, h, w), what)
        scale = torch.rand(n, generator=gen) + 0.5
        for dtype, layout in [(torch.bfloat16, "contiguous"), (torch.float32, "channels_last")]:
            x = make_x((n, c, h, w), dtype, "cpu", layout)
            assert_same(E.apply_seeds(x, bits, r, shared, scale),
                        R.apply_seeds(x, bits, r, shared, scale), f"{what} {dtype} {layout}")


@pytest.mark.parametrize("r", [50, 51, 53])
def test_emulated_seeds_wide_blocks_one_seed(E, r):
    """Blocks of r = 50 to 53 units, one seed at a time at every valid centre of a row
    (every bit of the block a unit covered by that seed only): apply_seeds' covered_run
    reads the len + r - 1 seed bits a run can reach as one 64-bit word, up to 7 bits into
    its first byte, so at most 57 of them (bfloat16 runs of up to 8 units: len + r - 1 = 57
    to 60 here, on each side of the per-unit fallback), and seed_coverage's block_byte
    dilates in pieces of 50 offsets (r > 50: two pieces). test_emulated_seeds_runs' random
    seeds cover every unit several times over, so a seed bit lost there shows nowhere."""
    n, c, h, w = 1, 1, r + 3, 130  # W % 8 == 2: runs of every length from 2 to 8
    x = make_x((n, c, h, w), torch.bfloat16)
    one = torch.ones(n)
    for row in range(r // 2, h - r + r // 2 + 1):
        for col in range(r // 2, w - r + r // 2 + 1):
            seeds = torch.zeros(n, c * h * w, dtype=torch.bool)
            seeds[0, row * w + col] = True
            bits = R.pack_bits(seeds)
            what = f"r={r} seed at {(row, col)}"
            assert_same(E.apply_seeds(x, bits, r, False, one),
                        R.apply_seeds(x, bits, r, False, one), f"apply {what}")
            assert_same(E.seed_coverage(bits, r, c, h, w), R.seed_coverage(bits, r, c, h, w),
                        f"coverage {what}")


def test_emulated_channel_stats_short_maps_nan_and_float64_sums(E):
    """channel_stats where its tests above have only long or aligned maps: NCHW maps
    shorter than the scalar head up to their first 16-byte boundary (H * W < 8 in
    bfloat16: a lane must not read the next map's units); channels_last with a NaN at a
    position of another row of threads than the first (its amax is NaN: the rows'
    combination propagates it too); and sums that float32 would round (2^25 + 1 + ... -
    2^25: the float64 sum is exact, the mean the reference's)."""
    for dtype in DTYPES:
        for shape in [(2, 3, 1, 3), (3, 5, 1, 2), (2, 3, 2, 3), (1, 7, 1, 1)]:
            x = make_x(shape, dtype)
            for got, want, name in zip(E.channel_stats(x), R.channel_stats(x), ("amax", "mean"),
                                       strict=True):
                assert_same(got, want, f"{name} {shape} {dtype}")
    x = make_x((2, 16, 5, 7), torch.float32, layout="channels_last").clone()
    x[0, 3, 4, 6] = x[1, 12, 2, 1] = float("nan")
    got, want = E.channel_stats(x)[0], R.channel_stats(x)[0]
    assert want.isnan().sum() == 2
    assert_same(got, want, "channels_last NaN")
    x = torch.ones(2, 3, 8, 8)
    x[:, :, 0, 0], x[:, :, 7, 7] = 2.0**25, -(2.0**25)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        assert_same(E.channel_stats(xx)[1], R.channel_stats(xx)[1], f"mean {xx.stride()}")


def test_emulated_focused_dropout_argmax_ties_and_zero_max(B):
    """FocusedDropout's plan kernel: channels of equal means (the same values in another
    order; also past the first thread's channels, C > 32) give the first of them (SPEC
    §5, torch.argmax), which differs from the others' mask; and a reference channel whose
    max is exactly 0 keeps every unit (v <= 0)."""
    gen = torch.Generator().manual_seed(6)
    for shape in [(2, 4, 5, 7), (2, 40, 3, 4)]:
        x = make_x(shape, torch.float32).clone()
        x[:, 1] += 5
        x[:, 2] = x[:, 1].flip(-1)
        x[:, -1] = x[:, 1].flip(-2)
        for pp in (False, True):
            noise = torch.rand((shape[0], *shape[2:]) if pp else shape[:1], generator=gen)
            assert_same(_run(B, "focused_dropout", x, 0.3, 0.6, per_position=pp, noise=noise),
                        _run(R, "focused_dropout", x, 0.3, 0.6, per_position=pp, noise=noise),
                        f"ties {shape} per_position={pp}")
    x = -make_x((2, 4, 5, 7), torch.float32).abs() - 1
    x[:, 1] += 1.0
    x[:, 1, 2, 3] = 0.0  # channel 1: the largest mean, its max exactly 0
    noise = torch.rand(2, generator=gen)
    y = _run(B, "focused_dropout", x, 0.3, 0.6, per_position=False, noise=noise)
    assert_same(y, _run(R, "focused_dropout", x, 0.3, 0.6, per_position=False, noise=noise),
                "max 0")
    assert_same(y, x, "max 0 keeps everything")


def test_emulated_attentiondrop_everything_dropped(B):
    """AttentionDrop's plan where no unit is kept: every map active and "am" on constant
    maps (x >= thr everywhere, S = 0), so kept = 0 and the scale is 0 in both
    normalisations, as the reference's, not 1 / 0: y = 0, not NaN (0 * Inf)."""
    x = torch.ones(2, 3, 5, 7) * torch.arange(1.0, 4.0)[None, :, None, None]
    noise = torch.zeros(2, 3)
    for norm in ("batch", "sample"):
        y = _run(B, "attentiondrop", x, 0.6, 20.0, mode="am", normalize=norm, noise=noise)
        assert_same(y, _run(R, "attentiondrop", x, 0.6, 20.0, mode="am", normalize=norm,
                            noise=noise), norm)
        assert not y.any(), norm


def test_emulated_channel_plans_runtime_rates_round_as_eager(E):
    """The SelectScale / Selectout plans with their rates as a float64 tensor read in the
    kernel (torch.compile's runtime rates): the candidates k = round(top_rate * C), half to
    even, and n_drop = round((1 - keep) * C) (keep = 0.8), as the host computes them for float rates
    (7 * 0.5 = 3.5 and 7 * 0.9 = 6.3, 10 * 0.25 = 2.5, 10 * 0.35 = 3.5, 10 * 0.56 = 5.6)."""
    gen = torch.Generator().manual_seed(8)
    for c, tops in [(7, (0.5, 0.9, 0.3)), (10, (0.25, 0.35, 0.56))]:
        amax = torch.rand(3, c, generator=gen)
        u = torch.rand(3, c, generator=gen)
        for top in tops:
            rates = torch.tensor([top, 0.8], dtype=torch.float64)
            assert_same(E.selectscale_plan(amax, u, 0.0, 0.0, rates),
                        E.selectscale_plan(amax, u, top, 0.8, None), f"selectscale {c} {top}")
            assert_same(E.selectout_plan(amax, u, 0.0, 0.0, rates),
                        E.selectout_plan(amax, u, top, 0.8, None), f"selectout {c} {top}")
