"""Shared pieces of the Triton backend: availability, launch geometry, layouts, jit helpers.

Every kernel indexes its tensors by logical (n, c, h, w) with the strides passed in, so
contiguous, channels_last and sliced inputs take the same kernels without a copy. The
streaming (apply) kernels walk a 2-D tile (outer rows x inner run): rows (n, c, h) x w for
tensors whose output is NCHW, rows (n, h, w) x c for channels_last ones, so that loads and
stores stay coalesced and the integer divisions happen once per row, not per element.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. when these modules are
# imported: the mode is fixed for the process from then on.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per program of the streaming kernels. The interpreter pays ~10 ms per program
# instance and little per element: give it larger tiles.
TILE = 16384 if INTERPRET else 4096
# Elements per program of the apply kernels (8 per thread with 8 warps on a GPU: few
# registers per element, so that many programs and loads are in flight per SM).
APPLY_TILE = 16384 if INTERPRET else 2048
# Longest row the selection kernels keep in registers (AttentionDrop maps, CAM rows);
# longer rows are re-read chunk by chunk at every counting pass.
MAX_ROW = 16384

INT32_MAX = 2**31 - 1


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


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warps(elements: int) -> int:
    """num_warps for a program holding ``elements`` values per tile."""
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16


def needs_int64(*tensors) -> bool:
    """Whether some offset (element index or strided offset) may overflow int32."""
    for t in tensors:
        if t is None:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
        if t.numel() >= INT32_MAX - 2 * TILE or span >= INT32_MAX - 2 * TILE:
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


def apply_geometry(out: torch.Tensor):
    """(channels_last walk, OUTER, INNER, BLOCK_O, BLOCK_I, grid) of a 2-D apply tile."""
    n, c, h, w = out.shape
    cl = walk_channels_last(out)
    outer, inner = (n * h * w, c) if cl else (n * c * h, w)
    bi = min(pow2(inner), APPLY_TILE)
    bo = max(1, min(APPLY_TILE // bi, pow2(outer)))
    grid = (cdiv(outer, bo), cdiv(inner, bi))
    return cl, outer, inner, bo, bi, grid


def same_layout(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether out's offsets are t's (the usual case: out = empty_like(dense t))."""
    return t.stride() == out.stride()


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def pos_offset(p, W, sH, sW, HW_FLAT: tl.constexpr):
    """Offset of position p = h * W + w of a map with strides (sH, sW)."""
    if HW_FLAT:
        off = p * sW
    else:
        off = (p // W) * sH + (p % W) * sW
    return off


@triton.jit
def float_key(v):
    """float32 -> int32 whose signed order is the float order (NaN canonical, largest)."""
    b = v.to(tl.int32, bitcast=True)
    b = tl.where(v != v, 0x7FC00000, b)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def key_float(k):
    """Inverse of float_key."""
    b = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return b.to(tl.float32, bitcast=True)


def bf16_fix(out: torch.Tensor) -> bool:
    """Whether the kernel must round float32 -> bfloat16 by hand (see ``cast_out``)."""
    return INTERPRET and out.dtype == torch.bfloat16


@triton.jit
def cast_out(v, o_ptr, BF16_FIX: tl.constexpr):
    """float32 v -> o_ptr's dtype, rounding to nearest even like torch.

    Triton's interpreter (3.8) truncates float32 -> bfloat16 casts; on a GPU the cast is
    round-to-nearest-even. BF16_FIX rounds by hand on the bit pattern instead.
    """
    if BF16_FIX:
        b = v.to(tl.int32, bitcast=True)
        r = b + 0x7FFF + ((b >> 16) & 1)
        r = tl.where(v != v, b | 0x400000, r)  # NaN stays a (quiet) NaN
        out = (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(o_ptr.dtype.element_ty)
    return out
