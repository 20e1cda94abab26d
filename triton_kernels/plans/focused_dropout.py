"""FocusedDropout's plan on Triton (``layers.focused_dropout``, SPEC §5) in 2 launches.

1. statistics (``channel_stats``): the channel means m (N, C) (float64 sums);
2. plan (``_focused_plan_kernel``, one program per sample): the reference channel
   r = argmax_c m (first index on ties, the first NaN if any, as torch.argmax), v = max of
   x[n, r] (NaN if the map has one, as torch.amax), read from x with its strides, and the
   keep mask (N, H, W) uint8: ``x[n, r] > gamma * v``, or 1 everywhere when v <= 0, with
   ``gamma = low + (high - low) * u`` rounded as torch does (float32(low) + float32(
   float32(high - low) * u), no fma: ``enable_fp_fusion=False``); u per sample, or per
   position with ``per_position``. The program also writes the state's scale (N,) of
   ones, so that no fill runs on the device.

``applied`` (the module's participation under torch.compile or CUDA graphs, a 0-d bool on
x's device) reaches both kernels: when it holds False the statistics read nothing of x and
the plan writes keep = 1 and scale 1 without reading x, so the step costs one read of x
(the apply, y = x bit for bit) instead of the op and a select.

The apply (``apply_block`` with k = 1) is the third launch; with ``noise=None`` one
``torch.rand`` draws u exactly as the reference does. low and high - low are runtime
arguments (floats in eager mode, 0-dim tensors while torch.compile traces, SPEC §8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop.layers import Plan, _rate, rand, rate64

from .._common import (
    as_float32,
    float_key,
    hw_flat,
    key_float,
    launch,
    needs_int64,
    op,
    pos_offset,
    pow2,
)
from ..channel_ranking import channel_stats
from .selectscale import rate_arg

BLOCK_MAX = 4096  # channels / positions per chunk


@triton.jit(do_not_specialize=["low", "spread"])  # rates: never specialisation keys
def _focused_plan_kernel(x_ptr, mean_ptr, u_ptr, applied_ptr, mask_ptr, scale_ptr, low, spread,
                         C, W, L, sN, sC, sH, sW, s_uN, s_uH, s_uW,
                         PER_POSITION: tl.constexpr, RATE_PTR: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK: tl.constexpr, HW_FLAT: tl.constexpr,
                         IDX64: tl.constexpr, HAS_APPLIED: tl.constexpr):
    n = tl.program_id(0)
    if IDX64:
        n = n.to(tl.int64)
    # Not applied (the module's participation, SPEC §5): keep = 1 everywhere, and neither
    # the means nor x are read (empty loops, masked loads).
    on = tl.full([], 1, tl.int1)
    if HAS_APPLIED:
        on = tl.load(applied_ptr) != 0
    c_end = tl.where(on, C, 0)
    l_end = tl.where(on, L, 0)
    # r = argmax_c mean: the largest key (NaN canonical, largest; -0 is +0), first index
    best = tl.full([], -2147483647 - 1, tl.int32)
    r = tl.full([], 0, tl.int32)
    for c0 in range(0, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = tl.load(mean_ptr + n * C + c, mask=c < C, other=0.0)
        key = tl.where(c < C, float_key(tl.where(m == 0.0, 0.0, m)), -2147483647 - 1)
        top = tl.max(key, axis=0)
        first = tl.min(tl.where(key == top, c, 2147483647), axis=0)
        r = tl.where(top > best, first, r)
        best = tl.maximum(best, top)
    base = n * sN + r * sC
    # v = max over the map x[n, r] (NaN if it has one)
    kmax = tl.full([], -2147483647 - 1, tl.int32)
    for p0 in range(0, l_end, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        if IDX64:
            p = p.to(tl.int64)
        xv = tl.load(x_ptr + base + pos_offset(p, W, sH, sW, HW_FLAT), mask=p < L, other=0.0)
        key = tl.where(p < L, float_key(xv.to(tl.float32)), -2147483647 - 1)
        kmax = tl.maximum(kmax, tl.max(key, axis=0))
    v = key_float(kmax)
    low = rate_arg(low, RATE_PTR)
    spread = rate_arg(spread, RATE_PTR)
    if not PER_POSITION:
        gamma = low + spread * tl.load(u_ptr + n * s_uN).to(tl.float32)
    for p0 in range(0, L, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        if IDX64:
            p = p.to(tl.int64)
        xv = tl.load(x_ptr + base + pos_offset(p, W, sH, sW, HW_FLAT), mask=p < l_end,
                     other=0.0)
        if PER_POSITION:
            u = tl.load(u_ptr + n * s_uN + (p // W) * s_uH + (p % W) * s_uW,
                        mask=p < l_end, other=0.0)
            gamma = low + spread * u.to(tl.float32)
        keep = ((xv.to(tl.float32) > gamma * v).to(tl.uint8) | (v <= 0.0).to(tl.uint8)
                | (on == 0).to(tl.uint8))
        tl.store(mask_ptr + n * L + p, keep, mask=p < L)
    tl.store(scale_ptr + n, 1.0)


@op("focused_dropout_plan", lambda x, mean, u, low, spread, per_position, applied=None: (
    x.new_empty((x.shape[0], *x.shape[2:]), dtype=torch.uint8),
    torch.empty(x.shape[:1], device=x.device)))
def _focused_plan(x: torch.Tensor, mean: torch.Tensor, u: torch.Tensor, low: torch.Tensor,
                  spread: torch.Tensor, per_position: bool,
                  applied: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W), mean: (N, C) float32, u: (N,) or (N, H, W) (per_position) of any
    float dtype -> (mask (N, H, W) uint8, scale (N,) of ones in the default dtype).
    low, spread: floats in eager mode, 0-dim float32 tensors while traced. applied: None,
    or a 0-d bool on x's device (False: mask all ones; x and mean are not read)."""
    n, c, h, w = x.shape
    mask = torch.empty((n, h, w), dtype=torch.uint8, device=x.device)
    scale = torch.empty(n, device=x.device)  # torch.ones(n)'s dtype, filled by the kernel
    if mask.numel() == 0 or c == 0:
        return mask, scale
    su = u.stride() if per_position else (u.stride(0), 0, 0)
    block = min(pow2(h * w), BLOCK_MAX)
    launch(_focused_plan_kernel)[(n,)](
        x, mean, u, x if applied is None else applied, mask, scale, low, spread, c, w, h * w,
        *x.stride(), *su,
        PER_POSITION=per_position, RATE_PTR=isinstance(low, torch.Tensor),
        BLOCK_C=min(pow2(c), BLOCK_MAX), BLOCK=block, HW_FLAT=hw_flat(x),
        IDX64=needs_int64(x, mask), HAS_APPLIED=applied is not None, enable_fp_fusion=False)
    return mask, scale


def plan_focused_dropout(x, low, high, *, per_position, noise=None, generator=None,
                         applied=None):
    """``layers.focused_dropout`` fused: the same Plan, bit for bit, in 2 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16, any strides; noise: None, or (N,) ((N, H, W)
    with per_position) of any float dtype; applied: None, or a 0-d bool on x's device
    (False: both kernels skip x and the mask is all ones). Returns Plan("block", (1,),
    (mask, scale)): mask (N, H, W) uint8, scale (N,) ones.
    """
    n, _, h, w = x.shape
    u = noise if noise is not None else rand((n, h, w) if per_position else (n,), generator,
                                             x.device)
    _, mean = channel_stats(x, applied)
    if torch.compiler.is_compiling():  # runtime values of the traced graph (SPEC §8)
        low, spread = _rate(low, x), _rate(rate64(high, x.device) - low, x)
    else:
        low, spread = as_float32(low), as_float32(float(high) - float(low))
    mask, scale = _focused_plan(x, mean, u, low, spread, per_position, applied)
    return Plan("block", (1,), (mask, scale))


__all__ = ["plan_focused_dropout"]
