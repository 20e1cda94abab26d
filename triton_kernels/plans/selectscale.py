"""The SelectScale family's plans on Triton (``layers.selectscale`` / ``selectout``, SPEC §3).

SelectScale and Selectout: the statistics (``channel_stats``: max |x| per channel) and ONE
plan kernel (``_select_plan_kernel``, one program per sample) that finds the candidates
(the top ``k`` of the sample's max |x|, ties kept: ``v >= k-th largest``, the k-th largest
by torch.topk's order, NaN largest, so a NaN is a candidate: ``in_top``) and writes ``w``
(N, C) float32:

- SelectScale: ``retain + spread * u`` on the candidates, 1 elsewhere, with
  ``spread = 2 * (1 - retain)`` (python float math), each rounded to float32, then a float32
  multiply and a float32 add, as torch computes ``retain + 2 * (1 - retain) * u`` (no fma:
  the kernel is compiled with ``enable_fp_fusion=False``);
- Selectout: 0 on the ``n_drop`` candidates with the smallest u (first index on ties, NaN
  last: the reference's stable sorts, by u then candidates first), ``float32(1 / keep)``
  elsewhere.

Every selection is an exact bisection on the order-preserving int32 key of the float32
value (``_common.float_key``), re-reading the (N, C) row (L1/L2-resident) at each pass.
u is read in its own dtype and strides and rounded to float32 in the kernel (SPEC §1).
The apply (``apply_channel``) is the third launch; with ``noise=None`` one ``torch.rand``
draws u exactly as the reference does. The rates are runtime arguments: python floats /
ints in eager mode, 0-dim tensors while torch.compile traces (a float argument of an op
is specialised on; SPEC §8).

SpatialScale keeps the reference plan (no selection: one elementwise op on (N, C), within
the budget).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop.layers import Plan, _rate, drop_count, rand, rate64, top_count

from .._common import as_float32, float_key, in_top, key_float, launch, op, pow2, warps
from ..channel_ranking import channel_stats

BLOCK_MAX = 4096  # channels per chunk of a row


@triton.jit
def rate_arg(v, PTR: tl.constexpr):
    """A runtime rate: the scalar itself, or read from a 0-dim tensor (PTR)."""
    if PTR:
        v = tl.load(v)
    return v


@triton.jit
def _row_keys(amax_ptr, u_ptr, row, c0, C, s_uN, s_uC, thr,
              DROP: tl.constexpr, BLOCK: tl.constexpr):
    """Keys of channels c0 + [0, BLOCK) of a row: of max |x|, or (DROP) of Selectout's
    order (layers.selectout): the candidates (in_top) by u, NaN last, then the others. -0
    is +0 (torch compares values)."""
    c = c0 + tl.arange(0, BLOCK)
    valid = c < C
    v = tl.load(amax_ptr + row * C + c, mask=valid, other=0.0)
    if DROP:
        u = tl.load(u_ptr + row * s_uN + c * s_uC, mask=valid, other=0.0).to(tl.float32)
        cand, v = in_top(v, thr), u
    key = float_key(tl.where(v == 0.0, 0.0, v))
    if DROP:  # the others above every candidate's key, a NaN's (0x7FC00000) too
        key = tl.where(cand, key, 2147483647)
    return key, valid, c


@triton.jit
def _count_le(amax_ptr, u_ptr, row, C, s_uN, s_uC, thr, key_hi,
              DROP: tl.constexpr, BLOCK: tl.constexpr):
    """#{keys <= key_hi} of the row."""
    key, valid, _ = _row_keys(amax_ptr, u_ptr, row, 0, C, s_uN, s_uC, thr, DROP, BLOCK)
    cnt = tl.sum((valid & (key <= key_hi)).to(tl.int32), axis=0)
    for c0 in range(BLOCK, C, BLOCK):
        key, valid, _ = _row_keys(amax_ptr, u_ptr, row, c0, C, s_uN, s_uC, thr, DROP, BLOCK)
        cnt += tl.sum((valid & (key <= key_hi)).to(tl.int32), axis=0)
    return cnt


@triton.jit
def _kth_smallest_key(amax_ptr, u_ptr, row, C, s_uN, s_uC, thr, rank,
                      DROP: tl.constexpr, BLOCK: tl.constexpr):
    """The rank-th smallest key of the row (1 <= rank <= C; rank 0 gives the smallest)."""
    key, valid, _ = _row_keys(amax_ptr, u_ptr, row, 0, C, s_uN, s_uC, thr, DROP, BLOCK)
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(tl.where(valid, key, -2147483647 - 1), axis=0).to(tl.int64)
    for c0 in range(BLOCK, C, BLOCK):
        key, valid, _ = _row_keys(amax_ptr, u_ptr, row, c0, C, s_uN, s_uC, thr, DROP, BLOCK)
        lo = tl.minimum(lo, tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64))
        hi = tl.maximum(hi, tl.max(tl.where(valid, key, -2147483647 - 1), axis=0).to(tl.int64))
    # invariant: #{key <= hi} >= rank > #{key <= lo - 1}
    while hi > lo:
        mid = lo + (hi - lo) // 2
        enough = _count_le(amax_ptr, u_ptr, row, C, s_uN, s_uC, thr, mid.to(tl.int32),
                           DROP, BLOCK) >= rank
        lo = tl.where(enough, lo, mid + 1)
        hi = tl.where(enough, mid, hi)
    return lo.to(tl.int32)


@triton.jit(do_not_specialize=["k", "rate0", "rate1"])  # rates: never specialisation keys
def _select_plan_kernel(amax_ptr, u_ptr, w_ptr, C, k, s_uN, s_uC, rate0, rate1,
                        DROP: tl.constexpr, RATE_PTR: tl.constexpr, BLOCK: tl.constexpr):
    # rate0, rate1: SelectScale's retain and spread; Selectout's 1/keep and n_drop; k the
    # candidates' count (layers.top_count: a float64 tensor while traced, as n_drop).
    row = tl.program_id(0).to(tl.int64)
    k = rate_arg(k, RATE_PTR).to(tl.int32)
    # the candidates: max |x| >= the k-th largest = the (C - k + 1)-th smallest
    kth = _kth_smallest_key(amax_ptr, u_ptr, row, C, s_uN, s_uC, 0.0, C - k + 1, False, BLOCK)
    thr = key_float(kth)
    if DROP:
        inv_keep = rate_arg(rate0, RATE_PTR)
        n_drop = rate_arg(rate1, RATE_PTR).to(tl.int32)
        # dropped: key < t, and the first `need` indices among the keys equal to t
        t = _kth_smallest_key(amax_ptr, u_ptr, row, C, s_uN, s_uC, thr, n_drop, True, BLOCK)
        need = n_drop - _count_le(amax_ptr, u_ptr, row, C, s_uN, s_uC, thr, t - 1, True, BLOCK)
        need = tl.where(n_drop > 0, need, 0)  # n_drop = 0: t is the smallest key, keep it
        # the last index j dropped at t: the smallest j with #{key == t, c <= j} >= need
        lo = tl.full([], -1, tl.int32)
        hi = tl.full([], C - 1, tl.int32)
        while hi > lo:
            mid = lo + (hi - lo) // 2
            cnt = tl.full([], 0, tl.int32)
            for c0 in range(0, C, BLOCK):
                key, valid, c = _row_keys(amax_ptr, u_ptr, row, c0, C, s_uN, s_uC, thr, True,
                                          BLOCK)
                cnt += tl.sum((valid & (key == t) & (c <= mid)).to(tl.int32), axis=0)
            lo = tl.where(cnt >= need, lo, mid + 1)
            hi = tl.where(cnt >= need, mid, hi)
        last = tl.where(n_drop > 0, lo, -1)
        for c0 in range(0, C, BLOCK):
            key, valid, c = _row_keys(amax_ptr, u_ptr, row, c0, C, s_uN, s_uC, thr, True, BLOCK)
            drop = ((key < t) | ((key == t) & (c <= last))) & (n_drop > 0)
            tl.store(w_ptr + row * C + c, tl.where(drop, 0.0, inv_keep), mask=valid)
    else:
        retain = rate_arg(rate0, RATE_PTR)
        spread = rate_arg(rate1, RATE_PTR)
        for c0 in range(0, C, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            valid = c < C
            a = tl.load(amax_ptr + row * C + c, mask=valid, other=0.0)
            u = tl.load(u_ptr + row * s_uN + c * s_uC, mask=valid, other=0.0).to(tl.float32)
            w = tl.where(in_top(a, thr), retain + spread * u, 1.0)
            tl.store(w_ptr + row * C + c, w, mask=valid)


def _launch(amax, u, k, rate0, rate1, drop):
    n, c = amax.shape
    w = torch.empty((n, c), dtype=torch.float32, device=amax.device)
    if w.numel() == 0:
        return w
    block = min(pow2(c), BLOCK_MAX)
    launch(_select_plan_kernel)[(n,)](
        amax, u, w, c, k, *u.stride(), rate0, rate1,
        DROP=drop, RATE_PTR=isinstance(rate0, torch.Tensor), BLOCK=block,
        num_warps=warps(block), enable_fp_fusion=False)
    return w


@op("selectscale_plan", lambda amax, u, k, retain, spread:
    amax.new_empty(amax.shape, dtype=torch.float32))
def _selectscale_plan(amax: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                      retain: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """amax: (N, C) float32, u: (N, C) any float dtype -> w (N, C) float32. k (int), retain,
    spread (floats) in eager mode; 0-dim float64 / float32 tensors while traced."""
    return _launch(amax, u, k, retain, spread, False)


@op("selectout_plan", lambda amax, u, k, inv_keep, n_drop:
    amax.new_empty(amax.shape, dtype=torch.float32))
def _selectout_plan(amax: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                    inv_keep: torch.Tensor, n_drop: torch.Tensor) -> torch.Tensor:
    """amax: (N, C) float32, u: (N, C) any float dtype -> w (N, C) float32. k (int),
    inv_keep (float), n_drop (int) in eager mode; 0-dim float64 / float32 / float64 tensors
    while traced."""
    return _launch(amax, u, k, inv_keep, n_drop, True)


def _noise(noise, x, generator):
    n, c = x.shape[:2]
    return noise if noise is not None else rand((n, c), generator, x.device)


def plan_selectscale(x, top_rate, retain, *, noise=None, generator=None):
    """``layers.selectscale`` fused: the same Plan, bit for bit, in 2 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16, any strides; noise: None or (N, C) of any
    float dtype. Returns Plan("channel", (), (w,)), w (N, C) float32.
    """
    k = top_count(top_rate, x.shape[1], x.device)
    u = _noise(noise, x, generator)
    amax, _ = channel_stats(x)
    if torch.compiler.is_compiling():  # runtime values of the traced graph (SPEC §8)
        retain, spread = _rate(retain, x), _rate(2 * (1 - rate64(retain, x.device)), x)
    else:
        retain, spread = as_float32(retain), as_float32(2 * (1 - float(retain)))
    return Plan("channel", (), (_selectscale_plan(amax, u, k, retain, spread),))


def plan_selectout(x, top_rate, keep, *, noise=None, generator=None):
    """``layers.selectout`` fused: the same Plan, bit for bit, in 2 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16, any strides; noise: None or (N, C) of any
    float dtype. Returns Plan("channel", (), (w,)), w (N, C) float32. The drop count
    ``round((1 - keep) * C)`` must not exceed the candidates (functional.selectout checks).
    """
    c = x.shape[1]
    k = top_count(top_rate, c, x.device)
    u = _noise(noise, x, generator)
    amax, _ = channel_stats(x)
    if torch.compiler.is_compiling():  # as the reference: no recompile per keep (SPEC §8)
        inv_keep = _rate(1 / rate64(keep, x.device), x)
        n_drop = drop_count(keep, c, x.device)
    else:
        inv_keep, n_drop = as_float32(1 / float(keep)), round((1 - float(keep)) * c)
    return Plan("channel", (), (_selectout_plan(amax, u, k, inv_keep, n_drop),))


__all__ = ["plan_selectscale", "plan_selectout"]
