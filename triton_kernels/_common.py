"""Shared pieces of the Triton backend: availability, launch geometry, layouts, jit helpers.

Every kernel indexes its tensors by logical (n, c, h, w) with the strides passed in, so
contiguous, channels_last and sliced inputs take the same kernels without a copy. The
streaming (apply) kernels walk a 2-D tile (outer rows x inner run): rows (n, c, h) x w for
tensors whose output is NCHW, rows (n, h, w) x c for channels_last ones, so that loads and
stores stay coalesced and the integer divisions happen once per row, not per element.

Contiguous NCHW tensors take a flat tile instead (``flat_launch`` / ``group_tile``): rows of
W = 56, 28, 14 or 7 do not start on 16 bytes, so a row tile loads 2 bytes at a time and
spends ~60 instructions per element (issue 13). A flat tile of BLOCK consecutive elements
starts aligned and vectorises at every W; its map index is divided once per tile and,
per group of elements, by a host-computed magic multiplier (``split``), never by a
runtime divisor.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import threading

import numpy as np
import torch
import triton
import triton.language as tl
from torch._functorch import pyfunctorch
from torch._subclasses.fake_tensor import is_fake

from guidedrop import _validation as V

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. when these modules are
# imported: the mode is fixed for the process from then on.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETED = tl.constexpr(INTERPRET)  # the same, for jit code (inline PTX is compiled only)


def _exact_bfloat16_casts() -> None:
    """Make Triton's interpreter convert between bfloat16 and float32 as a GPU does: widened
    exactly (the 16 bits shifted up), narrowed rounding to nearest even (NaN kept a NaN).
    Its bit-level ``_convert_float`` (Triton 3.6 to 3.9) truncates the narrowing and
    mishandles subnormals both ways (a bfloat16 1e-39 was read as 4.4e-39, 2^-133 as 0; a
    tile padded with a subnormal float32 got another value): every statistic of such an x
    (channel max, thresholds, argmax) then differed from the reference's. Patched only
    where a probe shows the fault, so a Triton that fixes it is left alone."""
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def exact(data, src, dst, rounding_mode):
        if src == tl.bfloat16 and dst == tl.float32:
            return data.view(np.uint16).astype(np.uint32) << 16
        if src == tl.float32 and dst == tl.bfloat16:
            b = data.view(np.uint32)
            if rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ:
                r = b
            else:  # to nearest even: add 0x7FFF and the bit that stays lowest
                r = b + np.uint32(0x7FFF) + ((b >> 16) & 1)
            r = np.where(np.isnan(data.view(np.float32)), b | np.uint32(0x400000), r)
            return (r >> 16).astype(np.uint16)
        return convert(data, src, dst, rounding_mode)

    least = np.array([1], dtype=np.uint16)  # bfloat16 2^-133, the least subnormal
    above = np.array([0x3F80C000], dtype=np.uint32)  # float32 1 + 1.5 * 2^-8: up, not cut
    if (convert(least, tl.bfloat16, tl.float32, None).view(np.float32)[0] != 2.0**-133
            or convert(above, tl.float32, tl.bfloat16, None)[0] != 0x3F81
            or convert(least.astype(np.uint32) << 16, tl.float32, tl.bfloat16, None)[0] != 1):
        interpreter._convert_float = exact


def _patch_language_once_per_run() -> None:
    """Make Triton's interpreter patch triton.language once per kernel run and module.
    It patches it (``_patch_lang``: inspect.getmembers of tl, tl.core, tl.math, ...) for
    the kernel's run and again at every call of a @jit function inside it; a repeat for a
    module whose globals were patched in this run changes nothing (the builtins are
    wrapped already, the rest set to the same functions), and cost about a third of an
    interpreted kernel's time here. Triton 3.6 to 3.9 (the same code)."""
    from triton.runtime import interpreter

    patch, run = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched = set()  # ids of the globals whose languages this kernel run has patched
    nothing = interpreter._LangPatchScope()  # (a device call's scope is never restored)

    def patch_lang(fn):
        key = id(fn.__globals__)
        if key in patched:
            return nothing
        patched.add(key)
        return patch(fn)

    def kernel_run(self, *args, **kwargs):  # a launch: the kernel's own patch first
        patched.clear()
        try:
            return run(self, *args, **kwargs)
        finally:
            patched.clear()

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, kernel_run


if INTERPRET:
    _exact_bfloat16_casts()
    _patch_language_once_per_run()

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (major, minor): some kernels take the form that this Triton compiles best (sm_90 SASS read
# by tests/test_static_perf.py; the GPU machine has 3.6, the budgets are calibrated on 3.8)
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])

# Elements per program of the streaming kernels. The interpreter pays ~10 ms per program
# instance and little per element: give it larger tiles.
TILE = 16384 if INTERPRET else 4096
# Elements per program of the apply kernels (8 per thread with 8 warps on a GPU: few
# registers per element, so that many programs and loads are in flight per SM).
APPLY_TILE = 16384 if INTERPRET else 2048
# Elements per program of the flat apply tile (``flat_launch``): 32 per thread with 4 warps,
# four 16-byte vectors of bf16, so that the per-tile index work is spread over more elements
# (16 per thread cost the flat apply_block 1.3-1.5 more SASS instructions per element on sm_90).
FLAT_TILE = 16384 if INTERPRET else 4096
# The channels_last apply tiles of one sample (AttentionDrop's, apply_seeds' with r = 1):
# CL_CHANNELS channels, whose per-channel values (a map's state, bytes of bits) are loaded
# once per tile, by CL_TILE // CL_CHANNELS positions, CL_PER_THREAD elements per thread (4
# warps for the full tile): those loads and their move into the elements' layout (through
# shared memory) are per tile; at 32 elements per thread AttentionDrop's cost 1.6 SASS
# instructions per element more on sm_90.
CL_CHANNELS = 64
CL_TILE = 2 * FLAT_TILE
CL_PER_THREAD = 64
# Longest row the selection kernels keep in registers (AttentionDrop maps, CAM rows);
# longer rows: read twice by the radix select (percentile_threshold), re-read chunk by
# chunk at every counting pass by the CAM candidates' bisection (plans/camdrop).
MAX_ROW = 16384

INT32_MAX = 2**31 - 1


# Each public launcher is a custom op guidedrop_triton::<name> (torch >= 2.6): a
# torch.library.triton_op launching its kernels through torch.library.wrap_triton, so that
# torch.compile traces it with FakeTensors (the host code below reads shapes, strides and
# dtypes only) and inductor sees the kernels. Under TRITON_INTERPRET=1, wrap_triton cannot
# trace interpreted kernels: the launcher is a plain torch.library.custom_op whose fake
# kernel is the launcher itself with the launches skipped (``launch``). Older torch: the
# plain functions.
#
# Tracing the launcher bakes its choices (tiles, kernels, constexpr sizes) into the graph,
# so it guards on the exact sizes: under dynamic shapes that would be a graph per input
# shape (and past torch._dynamo.config.recompile_limit, the whole frame run eagerly). So
# where the op is traced with a symbolic size or stride it calls
# guidedrop_triton::<name>_dynamic instead: a custom_op that tracing does not enter (its
# fake kernel is ``fake``: shapes, dtypes and memory formats only), whose launcher chooses
# at run time from the real sizes. (The choice is made in the op, on FakeTensors: Dynamo's
# own tracing of python code sees a symbolic size as an int.)
HAS_OPS = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def op(name: str, fake):
    """Decorator: registers a launcher (type-hinted for schema inference) as
    guidedrop_triton::<name>, and as guidedrop_triton::<name>_dynamic with the fake kernel
    ``fake`` (same signature: outputs of the launcher's shapes, dtypes and strides, without
    reading a size's value). The function it returns calls the launcher itself in eager
    mode (an op's dispatch costs ~10 µs of host time per call, issue 12) and the op while
    torch.compile traces (the plain function on older torch). Either way the launcher runs
    with its first tensor's CUDA device current (``foreign_device``): also where the op runs
    by itself (torch.ops, an exported program, torch.compile's eager backends)."""
    def register(fn):
        @functools.wraps(fn)
        def launcher(*args, **kwargs):  # fn on its tensors' device (see foreign_device)
            device = foreign_device(args, kwargs.values())
            if device is None:
                return fn(*args, **kwargs)
            with torch.cuda.device(device):
                return fn(*args, **kwargs)

        registered = fn  # what torch.compile traces: the op, or on older torch fn itself
        if HAS_OPS:
            qualname = f"guidedrop_triton::{name}"
            dynamic = torch.library.custom_op(f"{qualname}_dynamic", mutates_args=())(launcher)
            dynamic.register_fake(fake)

            @functools.wraps(fn)
            def body(*args, **kwargs):  # the op's: fn, or traced with symbolic sizes, the twin
                if symbolic(args, kwargs.values()):
                    return dynamic(*args, **kwargs)
                return launcher(*args, **kwargs)

            if not INTERPRET:
                registered = torch.library.triton_op(qualname, mutates_args=())(body)
            else:
                registered = torch.library.custom_op(qualname, mutates_args=())(launcher)
                registered.register_fake(body)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return registered(*args, **kwargs)
            return launcher(*args, **kwargs)
        return call
    return register


def foreign_device(*groups) -> torch.device | None:
    """The CUDA device of the first tensor in ``groups`` (iterables of op arguments) where
    it is not the current device, else None. A Triton launch runs on the current device
    and its current stream, whatever its arguments' device: x on cuda:1 while cuda:0 is
    current would be read by cuda:0 (an illegal address, or with peer access a race with
    cuda:1's stream). Autograd's backward threads and inductor set the device themselves;
    an eager call may not, nor make_fx's real mode (wrap_triton launches there). None for
    a FakeTensor (nothing launches on one, and its device may not be this host's) and
    without CUDA initialised."""
    for group in groups:
        for a in group:
            if isinstance(a, torch.Tensor):
                d = a.device
                return (d if d.type == "cuda" and torch.cuda.is_initialized()
                        and d.index != torch.cuda.current_device() and not is_fake(a)
                        else None)
    return None


def symbolic(*groups) -> bool:
    """Whether some argument in ``groups`` (iterables of op arguments) is or holds a
    symbolic value: a SymInt, SymFloat or SymBool, a list of them, or a tensor whose sizes
    or strides are symbolic."""
    sym = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for group in groups:
        for a in group:
            if isinstance(a, torch.Tensor):
                values = (*a.shape, *a.stride())
            elif isinstance(a, (list, tuple)):
                values = a
            else:
                values = (a,)
            if any(isinstance(v, sym) for v in values):
                return True
    return False


def fake_like(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The fake kernel of an apply: its output, t's shape, dtype and memory format."""
    return out_like(t)


@torch.compiler.disable
def _eager(kernel_at_grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), never traced by Dynamo: where it gives up on a frame
    and runs it eagerly (under torch.compile(torch.func.grad(f))), it compiles the frames
    that frame calls, and Triton's interpreter crashed it (InternalTorchDynamoError).
    Under torch.func's transforms the kernel runs outside them (the interpreter's own torch
    ops too) on its arguments unwrapped (``_validation.func_unwrapped``)."""
    if not torch._C._are_functorch_transforms_active():
        return kernel_at_grid(*args, **kwargs)
    args = [V.func_unwrapped(a) for a in args]
    kwargs = {k: V.func_unwrapped(v) for k, v in kwargs.items()}
    with pyfunctorch.temporarily_clear_interpreter_stack():
        return kernel_at_grid(*args, **kwargs)


def launch(kernel):
    """``launch(kernel)[grid](...)``: kernel[grid](...), through wrap_triton while traced
    (see ``op`` and :func:`traced`)."""
    if not HAS_OPS:
        return kernel
    if not INTERPRET:
        return _Launcher(kernel)
    return _Interpreted(kernel)


_TRACING_MODES = ("FAKE", "PROXY", "FUNCTIONAL")


def traced() -> bool:
    """Whether a launch now is being traced: torch.compile, or the FakeTensor, proxy or
    functional mode of AOT tracing / make_fx. Not any user dispatch mode: through
    wrap_triton, FlopCounterMode counts a kernel and never runs it (its output would be
    uninitialised memory); launched directly, modes do not see the kernel (LaunchCounter
    counts it at JITFunction.run)."""
    if torch.compiler.is_compiling():
        return True
    keys = torch._C._TorchDispatchModeKey
    return any(torch._C._get_dispatch_mode(getattr(keys, k)) is not None
               for k in _TRACING_MODES)


class _Launcher:
    """kernel[grid] in eager mode; wrap_triton(kernel)[grid] while :func:`traced`.

    wrap_triton dispatches a higher-order op even in eager mode. On an H200 (torch 2.11,
    2026-12-04) a Triton layer's forward + backward took 1.5-2 ms of host time, against
    0.2-0.4 ms on the CUDA backend, and cProfile put most of it in that op's Python."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        if traced():
            return torch.library.wrap_triton(self.kernel)[grid]
        return functools.partial(_eager, self.kernel[grid])


# Triton's interpreter patches triton.language and its grid state globally while a kernel
# runs: two threads' launches at once fail (InterpreterError), also in plain Triton. So
# interpreted launches run one at a time; a GPU launch needs no lock.
_INTERPRETER_LOCK = threading.Lock()


class _Interpreted:
    """An interpreted kernel that does not run on FakeTensors (shape-only tracing); one
    launch at a time across threads."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake
            if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
                # make_fx traces the launcher itself (torch.compile and torch.export trace
                # the op, whose fake kernel runs with the mode popped): its graph returned
                # the outputs unwritten (FakeTensors), or the interpreter failed on a
                # traced tensor's storage. On a GPU the launch is recorded (wrap_triton).
                # (Shape inference with FakeTensors alone is fine.)
                raise NotImplementedError(
                    "make_fx (and torch.func.linearize) cannot trace guidedrop's Triton "
                    "kernels under TRITON_INTERPRET=1: use torch.compile or torch.export, "
                    "or another backend")
            if not any(isinstance(a, torch.Tensor) and (is_fake(a) or a.is_meta)
                       for a in args):
                # numpy evaluates the kernel and would warn where a GPU computes quietly
                # what the kernels rely on (AttentionDrop's 1/0 = Inf and 0·Inf = NaN,
                # then taken as f̂ = 0, SPEC §4)
                with (_INTERPRETER_LOCK,
                      np.errstate(divide="ignore", invalid="ignore", over="ignore")):
                    _eager(self.kernel[grid], *args, **kwargs)
        return run


def unavailable() -> str:
    """"" when the kernels can run here, else why not (see guidedrop.dispatch)."""
    if INTERPRET or torch.cuda.is_available():
        return ""
    return "no CUDA device is visible and TRITON_INTERPRET is not 1"


def unsupported(x: torch.Tensor) -> str:
    """"" when the kernels can take tensor x, else why not."""
    if not isinstance(x, torch.Tensor):
        return f"expected a tensor, got {type(x).__name__}"
    if x.dtype not in DTYPES:
        return f"the Triton kernels take float32/float16/bfloat16, got {x.dtype}"
    if x.device.type == "cuda":
        return ""
    if INTERPRET and x.device.type == "cpu":
        return ""
    return (f"the Triton kernels run on CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1), got {x.device}")


def as_float32(v) -> float:
    """v rounded to float32 (nearest even), as ``layers._rate`` rounds a rate for float32,
    float16 and bfloat16 x: what a float32 kernel argument holds on a GPU, which the
    interpreter does not round (subnormal rates differ there otherwise)."""
    return struct.unpack("f", struct.pack("f", float(v)))[0]


def pow2(n: int) -> int:
    """The least power of 2 >= n (1 for n < 1), in plain Python: triton.next_power_of_2 goes
    through Triton's constexpr-function wrapper, a few µs of host time at each launch."""
    return 1 << (max(1, int(n)) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b  # not -(-a // b): Dynamo traces this form (reference.pooled_size)


def warps(elements: int) -> int:
    """num_warps for a program holding ``elements`` values per tile."""
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16


def needs_int64(*tensors) -> bool:
    """Whether some offset (element index or strided offset) may overflow int32."""
    for t in tensors:
        if t is None:
            continue
        if t.numel() >= INT32_MAX - 2 * TILE:
            return True
        if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(
                memory_format=torch.channels_last)):
            continue  # dense: the span is numel - 1 (the strides' sum costs µs a launch)
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
        if span >= INT32_MAX - 2 * TILE:
            return True
    return False


def walk_channels_last(t: torch.Tensor) -> bool:
    """Whether to walk t (N, C, H, W) in (n, h, w, c) order: its channels are innermost."""
    n, c, h, w = t.shape
    if c == 1 or t.stride(1) != 1:
        return False
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return True
    inner = [t.stride(d) for d in (2, 3) if t.shape[d] > 1]
    return bool(inner) and min(inner) > 1


def hw_flat(t: torch.Tensor) -> bool:
    """Whether position p = h * W + w of a map sits at p * stride(3)."""
    _, _, h, w = t.shape
    return h == 1 or t.stride(2) == w * t.stride(3)


def out_like(t: torch.Tensor) -> torch.Tensor:
    """The output of an apply: t's shape, dtype and memory format (dense, as empty_like)."""
    return torch.empty_like(t)


def same_layout(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether out's offsets are t's (the usual case: out = empty_like(dense t))."""
    return t.stride() == out.stride()


def apply_flags(t: torch.Tensor, out: torch.Tensor, *more) -> dict:
    """IDX64, SAME of an apply t -> out (more: other tensors the kernel indexes)."""
    return dict(IDX64=needs_int64(t, out, *more), SAME=same_layout(t, out))


def apply_launch(t: torch.Tensor, out: torch.Tensor, *more):
    """(grid, OUTER, INNER, meta) of a 2-D apply tile (``apply_tile``) from t to out.

    meta: the kernel's CL (channels_last walk), GRID3, MAGW, BO, BI (tile), IDX64, SAME
    and num_warps keywords; more: other tensors the kernel indexes. GRID3 (the
    channels_last walk, N <= 65535, H * W * W <= 2**30): the grid is (positions, channels,
    samples), so that no row index is divided by a runtime value (h, w of a position by
    the magic multiplier MAGW = ceil(2**30 / W)); OUTER is then H * W.
    """
    n, c, h, w = out.shape
    cl = walk_channels_last(out)
    grid3 = cl and n <= 65535 and h * w * w <= 2**30
    outer, inner = (h * w if grid3 else n * h * w, c) if cl else (n * c * h, w)
    bi = min(pow2(inner), APPLY_TILE)
    bo = max(1, min(APPLY_TILE // bi, pow2(outer)))
    grid = (cdiv(outer, bo), cdiv(inner, bi)) + ((n,) if grid3 else ())
    meta = dict(CL=cl, GRID3=grid3, MAGW=-(-2**30 // max(w, 1)), BO=bo, BI=bi,
                num_warps=warps(bo * bi), **apply_flags(t, out, *more))
    return grid, outer, inner, meta


def magic(d: int, span: int) -> tuple[int, bool]:
    """(MAGIC, BIG) of ``split`` by d for values p < d + span: BIG when d >= span (then
    p < 2d: one compare), else MAGIC = ceil(2**30 / d), exact for p * d < 2 * span**2 <=
    2**30 (span <= 23170: flat_launch's reach FLAT_TILE + 2, 16386 interpreted, at 1 x 1)."""
    assert 2 * span * span <= 2**30
    return (0, True) if d >= span else (-(-2**30 // d), False)


# Readable bytes that the plan kernels leave after a block mask (``mask_buffer``): the flat
# apply_block then reads a group's mask columns without a mask per load (past the end of a
# row they are the next row's bytes, past the mask's last row these).
MASK_SLACK = 16


def mask_buffer(shape: tuple[int, ...], device) -> torch.Tensor:
    """An uninitialised contiguous uint8 tensor of ``shape`` with MASK_SLACK more bytes in
    its storage after it (a view of a longer buffer)."""
    numel = math.prod(shape)
    return torch.empty(numel + MASK_SLACK, dtype=torch.uint8, device=device)[:numel].view(shape)


def slack_after(t: torch.Tensor) -> int:
    """Elements of t's storage after the last one t addresses (0 for an empty t)."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.untyped_storage().nbytes() // t.element_size() - last - 1


def divisor(d: int) -> tuple[int, int]:
    """(MAGIC, SHIFT) of ``divide`` by d >= 1: s = ceil(log2 d), MAGIC = ceil(2**(32 + s) / d)
    - 2**32 (in [0, 2**32): 0 for a power of two). Then n // d = (umulhi(n, MAGIC) + n) >> s
    for every 0 <= n < 2**31: the error of the 33-bit multiplier, e = (MAGIC + 2**32) * d
    - 2**(32 + s) < d <= 2**s, keeps n * e < 2**(32 + s) (Granlund and Montgomery, "Division by
    invariant integers using multiplication", PLDI 1994, section 4).

    MAGIC is returned as the int32 of its 32 bits (``divide`` bitcasts it back): torch
    2.11's inductor fails on a user kernel's int argument of 2**31 or more (seen on an H200,
    ``expr_fits_within_32bit`` on a plain int)."""
    s = (d - 1).bit_length()
    m = -(-2 ** (32 + s) // d) - 2**32
    return m - 2**32 if m >= 2**31 else m, s


def rows_aligned(t: torch.Tensor) -> bool:
    """Whether the row tile's rows of t start on 16 bytes (W * itemsize % 16 == 0): there it
    vectorises too, and kernels that gather per-map values per element (apply_block,
    apply_attention) spend fewer instructions per element in rows than in a flat tile."""
    return t.shape[-1] * t.element_size() % 16 == 0


def flat_launch(t: torch.Tensor, out: torch.Tensor, *more):
    """(grid, meta) of a flat apply tile (``group_tile``) from t to out, or None unless t,
    out and the tensors of ``more`` (read at the same positions) are all contiguous NCHW.

    channels_last tensors keep the row tile: rows (n, h, w) x c vectorise along C already,
    and a flat tile there needs the sample index per element too (18 instructions per
    element against 15.5 on sm_90). meta: HW, MAG1, C, MAG2, HW_M, HW_S, C_M, C_S, BIG1,
    BIG2, BLOCK, IDX64 and num_warps keywords."""
    n, c, h, w = out.shape
    tensors = (t, out, *more)
    if not all(a.is_contiguous() for a in tensors):
        return None
    block = min(FLAT_TILE, pow2(out.numel()))
    mag1, big1 = magic(h * w, block)  # the tile's first position + j < H * W + block
    mag2, big2 = magic(c, block // (h * w) + 2)  # + the maps it enters, <= block // HW + 1
    hw_m, hw_s = divisor(h * w)
    c_m, c_s = divisor(c)
    meta = dict(HW=h * w, MAG1=mag1, C=c, MAG2=mag2, HW_M=hw_m, HW_S=hw_s, C_M=c_m, C_S=c_s,
                BIG1=big1, BIG2=big2, BLOCK=block,
                EVEN=out.numel() % block == 0, IDX64=needs_int64(*tensors),
                num_warps=warps(block // 4))
    return (cdiv(out.numel(), block),), meta


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def split(p, D, MAGIC, BIG: tl.constexpr):
    """(p // D, p % D) of int32 0 <= p < D + block, MAGIC and BIG from ``magic(D, block)``:
    a multiply-high (or a compare), not a division by the runtime D."""
    if BIG:
        q = (p >= D).to(tl.int32)
    else:
        q = tl.umulhi(p * 4, MAGIC)
    return q, p - q * D


@triton.jit
def divide(n, MAGIC, SHIFT):
    """n // d of int32 0 <= n < 2**31 by a runtime d >= 1, (MAGIC, SHIFT) = ``divisor(d)``:
    a multiply-high, an add and a shift (the sum < 2**32 fits uint32), not the ~20
    instructions of a division."""
    u = n.to(tl.uint32)
    # tl.cast: inductor's analysis of which arguments a kernel mutates compiles it with
    # every int argument a constant, which has no .to
    m = tl.cast(MAGIC, tl.uint32, bitcast=True)
    return ((tl.umulhi(u, m) + u) >> SHIFT).to(tl.int32)


@triton.jit
def tile_offsets(start, BLOCK: tl.constexpr, V: tl.constexpr, U: tl.constexpr,
                 LANES_FIRST: tl.constexpr = False):
    """The flat offsets start + [0, BLOCK) in groups of U * V: (BLOCK // V, V) for U = 1;
    else (U, BLOCK // (U * V), V), a group's U vectors consecutive, held by one thread, or
    (BLOCK // (U * V), U, V) (LANES_FIRST: for Triton before 3.8, whose coalescing takes
    the groups' axis first for the lanes only there; percentile_threshold.LANES_FIRST)."""
    g = tl.arange(0, BLOCK // (U * V)) * (U * V)
    if U == 1:
        e = start + g[:, None] + tl.arange(0, V)[None, :]
    elif LANES_FIRST:
        e = (start + g[:, None, None] + (tl.arange(0, U) * V)[None, :, None]
             + tl.arange(0, V)[None, None, :])
    else:
        e = (start + (tl.arange(0, U) * V)[:, None, None] + g[None, :, None]
             + tl.arange(0, V)[None, None, :])
    return e


@triton.jit
def map_tile(TOTAL, HW, MAG1, HW_M, HW_S, BIG1: tl.constexpr, BLOCK: tl.constexpr,
             V: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr, U: tl.constexpr = 1,
             LANES_FIRST: tl.constexpr = False):
    """This program's flat tile of a contiguous (N, C, H, W) tensor (launched by
    flat_launch) as (BLOCK // V, V) groups of V consecutive elements (V * itemsize >= 16
    bytes: one or more vectors per group), the index work per group, not per element.
    Per tile, the tile's first map by ``divide`` ((HW_M, HW_S) from ``divisor``; a
    division when IDX64); per group, ``split`` of a local (tile-relative) int32 value by a
    magic multiplier.

    U > 1: groups of U * V elements, e (U, BLOCK // (U * V), V), a group's U vectors held by
    one thread (its per-group values computed once for them), or (BLOCK // (U * V), U, V)
    (LANES_FIRST, ``tile_offsets``); TOTAL must be a multiple of U * V, and m is per group,
    (1, groups, 1) or (groups, 1, 1).

    Returns (e, m, mp0, dmp, pos): e (BLOCK // V, V) the flat indices, m the valid ones,
    the tile's first map mp0 (n * C + c) and of each group's first element (groups,) its
    map mp0 + dmp and its position pos in it. EVEN (TOTAL % BLOCK == 0): m is a constant
    true, so that loads and stores are unmasked.
    """
    # the product in 64 bits: program_id * BLOCK passes 2**31 before the last tiles
    start = (tl.program_id(0).to(tl.int64) if IDX64 else tl.program_id(0)) * BLOCK
    if IDX64:
        mp0 = start // HW
    else:
        mp0 = divide(start, HW_M, HW_S)
    e = tile_offsets(start, BLOCK, V, U, LANES_FIRST)
    g = tl.arange(0, BLOCK // (U * V)) * (U * V)
    dmp, pos = split((start - mp0 * HW).to(tl.int32) + g, HW, MAG1, BIG1)
    if U == 1:
        m = tl.full(e.shape, True, tl.int1) if EVEN else e < TOTAL
    else:  # TOTAL a multiple of U * V: a group is valid or not as a whole, one compare
        m = tl.full(g.shape, True, tl.int1) if EVEN else start + g < TOTAL
        m = m[:, None, None] if LANES_FIRST else m[None, :, None]
    return e, m, mp0, dmp, pos


@triton.jit
def group_tile(TOTAL, HW, MAG1, C, MAG2, HW_M, HW_S, C_M, C_S, BIG1: tl.constexpr,
               BIG2: tl.constexpr, BLOCK: tl.constexpr, V: tl.constexpr, IDX64: tl.constexpr,
               EVEN: tl.constexpr, U: tl.constexpr = 1):
    """``map_tile`` with each group's sample and channel: (e, m, n, c, pos), n and c
    (groups,). Per tile the first map's sample by ``divide`` ((C_M, C_S) from ``divisor``);
    per group a ``split`` by a magic multiplier."""
    e, m, mp0, dmp, pos = map_tile(TOTAL, HW, MAG1, HW_M, HW_S, BIG1, BLOCK, V, IDX64, EVEN, U)
    if IDX64:
        n0 = mp0 // C
    else:
        n0 = divide(mp0, C_M, C_S)
    dn, c = split((mp0 - n0 * C).to(tl.int32) + dmp, C, MAG2, BIG2)
    return e, m, n0 + dn, c, pos


@triton.jit
def pos_offset(p, W, sH, sW, HW_FLAT: tl.constexpr):
    """Offset of position p = h * W + w of a map with strides (sH, sW)."""
    if HW_FLAT:
        off = p * sW
    else:
        off = (p // W) * sH + (p % W) * sW
    return off


@triton.jit
def tile_nchw(o, i, C, H, W, CL: tl.constexpr):
    """Logical (n, c, h, w) of rows o x inner i of an apply tile, and the rows' map index.

    CL: rows (n, h, w), inner c; else rows (n, c, h), inner w. The row coordinates are
    (BO,) vectors, the inner one is i itself, (BI,). map0 = n * C + c of each row's first
    map: (n, 0) for CL (add the inner c), (n, c) otherwise.
    """
    if CL:
        w = o % W
        nh = o // W
        h = nh % H
        n = nh // H
        c = i
        map0 = n * C
    else:
        h = o % H
        nc = o // H
        c = nc % C
        n = nc // C
        w = i
        map0 = nc
    return n, c, h, w, map0


@triton.jit
def tile_offset(n, c, h, w, sN, sC, sH, sW, CL: tl.constexpr):
    """(BO, BI) offsets of a tensor with strides (sN, sC, sH, sW) at tile_nchw's coordinates."""
    if CL:
        off = (n * sN + h * sH + w * sW)[:, None] + (c * sC)[None, :]
    else:
        off = (n * sN + c * sC + h * sH)[:, None] + (w * sW)[None, :]
    return off


@triton.jit
def apply_tile(OUTER, INNER, C, H, W, MAGW, CL: tl.constexpr, GRID3: tl.constexpr,
               BO: tl.constexpr, BI: tl.constexpr, IDX64: tl.constexpr):
    """This program's 2-D apply tile (see the module docstring), launched by apply_launch.

    Returns (ov, m, n, c, h, w, map0): ov (BO,) the valid rows, m (BO, BI) the valid
    elements, (n, c, h, w, map0) as tile_nchw. GRID3 (CL only): the rows are positions
    h * W + w of sample program_id(2), split by the magic multiplier MAGW, no division.
    """
    # rows past 2**31 (IDX64 but for GRID3's positions of one sample): o in 64 bits
    o = (tl.program_id(0).to(tl.int64) if IDX64 and not GRID3 else tl.program_id(0)) * BO \
        + tl.arange(0, BO)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    ov = o < OUTER
    m = ov[:, None] & (i < INNER)[None, :]
    if GRID3:
        h = tl.umulhi(o * 4, MAGW)
        w = o - h * W
        n = o * 0 + tl.program_id(2)
        if IDX64:
            n = n.to(tl.int64)
            h = h.to(tl.int64)
            w = w.to(tl.int64)
            i = i.to(tl.int64)
        c = i
        map0 = n * C
    else:
        if IDX64:  # (o is int64 from its product above)
            i = i.to(tl.int64)
        n, c, h, w, map0 = tile_nchw(o, i, C, H, W, CL)
    return ov, m, n, c, h, w, map0


@triton.jit
def out_offset(t_off, n, c, h, w, sN, sC, sH, sW, CL: tl.constexpr, SAME: tl.constexpr):
    """tile_offset of the output with strides (sN, sC, sH, sW); SAME: out has t's strides,
    t_off serves (no second offset computation)."""
    if SAME:
        o_off = t_off
    else:
        o_off = tile_offset(n, c, h, w, sN, sC, sH, sW, CL)
    return o_off


@triton.jit
def float_key(v):
    """float32 -> int32 whose signed order is the float order (NaN canonical, largest)."""
    b = v.to(tl.int32, bitcast=True)
    b = tl.where(v != v, 0x7FC00000, b)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def in_top(v, thr):
    """v is in the top k whose k-th largest is thr (SPEC §1: ties kept), in the order the
    selections rank by (float_key): a NaN above every number, so also when thr is NaN; -0.0
    and +0.0 equal (compared by value)."""
    return (v >= thr) | (v != v)


@triton.jit
def key_float(k):
    """Inverse of float_key."""
    b = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return b.to(tl.float32, bitcast=True)


def aligned(a: torch.Tensor, nbytes: int) -> bool:
    """Whether a's data starts on a multiple of nbytes. Under torch.compile's trace (a fake
    tensor: no address) from its storage offset, the storage taken to start aligned, as
    inductor takes every storage."""
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(a) or a.is_meta:
        return a.storage_offset() * a.element_size() % nbytes == 0
    return a.data_ptr() % nbytes == 0
