"""Per-channel ranking: max |x| and mean of every (n, c) map, and the per-channel apply.

- ``channel_stats``: one pass over x, sums in float64 (equal values in any order give
  exactly equal means). A program owns ROWS maps x BLOCK positions (a 2-D
  tile, several small maps per program; maps longer than BLOCK are looped over), rows are
  consecutive (n, c), so in channels_last the tile's rows are the contiguous axis.
- ``apply_channel``: ``t * w[n, c]``, a 2-D streaming tile (see ``_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    TILE,
    apply_launch,
    apply_tile,
    cdiv,
    fake_like,
    flat_launch,
    group_tile,
    hw_flat,
    launch,
    needs_int64,
    op,
    out_like,
    out_offset,
    pos_offset,
    pow2,
    tile_offset,
    walk_channels_last,
    warps,
)


@triton.jit
def _channel_stats_kernel(x_ptr, applied_ptr, amax_ptr, mean_ptr, R, C, W, L, SPAN, TOTAL,
                          sN, sC, sH, sW,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, HW_FLAT: tl.constexpr,
                          IDX64: tl.constexpr, HAS_APPLIED: tl.constexpr,
                          FLAT: tl.constexpr, A: tl.constexpr):
    """FLAT (contiguous NCHW x): map r is x[r * L : (r + 1) * L]. Its row of the tile starts
    at r * L rounded down to A elements (16 bytes): where L * itemsize is not a multiple
    of 16 (14 x 14, 7 x 7 maps) the maps' own starts are not aligned and their loads would
    go one element at a time. The row reads SPAN = L + A - 1 positions (L when L % A ==
    0) from there, and those outside its map are zeroed by value (a mask per element
    would split the 16-byte loads)."""
    # FocusedDropout's participation (SPEC §5), a device flag: when it is False no position
    # of x is read (the loop is empty) and the statistics are those of a zero map.
    end = SPAN
    if HAS_APPLIED:
        end = tl.where(tl.load(applied_ptr) != 0, SPAN, 0)
    rows = (tl.program_id(0).to(tl.int64) if IDX64 else tl.program_id(0)) * ROWS \
        + tl.arange(0, ROWS)  # maps past 2**31 (1 x 1 maps): in 64 bits from the product
    rv = rows < R
    if FLAT:
        first = rows * L
        shift = first % A  # A is a power of 2: a mask, not a division
        base = tl.multiple_of(first - shift, A)
    else:
        base = (rows // C) * sN + (rows % C) * sC
    acc_max = tl.zeros([ROWS, BLOCK], tl.float32)
    # float64 sums: mathematically equal means are exactly equal (FocusedDropout's argmax)
    acc_sum = tl.zeros([ROWS, BLOCK], tl.float64)
    for p0 in range(0, end, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        if IDX64:
            p = p.to(tl.int64)
        if FLAT:
            off = base[:, None] + p[None, :]
            # in bounds only: a constant over each aligned group of A when TOTAL is a
            # multiple of 16 (Triton's specialisation), so the loads stay 16-byte vectors
            v = tl.load(x_ptr + off, mask=off < TOTAL, other=0.0).to(tl.float32)
            q = p[None, :] - shift[:, None]
            v = tl.where((q >= 0) & (q < L), v, 0.0)
        else:
            off = base[:, None] + pos_offset(p, W, sH, sW, HW_FLAT)[None, :]
            m = rv[:, None] & (p < L)[None, :]
            v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        acc_max = tl.maximum(acc_max, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        acc_sum += v.to(tl.float64)
    # tl.max drops NaNs on a GPU: add 0, or NaN where a map has one (torch.amax propagates)
    amax = tl.max(acc_max, axis=1) + tl.sum(tl.where(acc_max != acc_max, acc_max, 0.0), axis=1)
    total = tl.sum(acc_sum, axis=1)
    tl.store(amax_ptr + rows, amax, mask=rv)
    tl.store(mean_ptr + rows, (total / L).to(tl.float32), mask=rv)


def row_tile(x: torch.Tensor, length: int, rows: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of a (maps x positions) tile: channels_last puts more maps per tile.
    length: the positions a row reads (a contiguous map's SPAN)."""
    if walk_channels_last(x):
        # at most 32 maps: with 64, a (128, 64, 56, 56) x took 128 programs, one a sample,
        # too few loads in flight for a GPU's memory
        r = min(pow2(x.shape[1]), 32, pow2(rows))
        return r, max(1, min(TILE // r, pow2(length)))
    block = min(pow2(length), max(TILE // 2, 1))
    return max(1, min(TILE // block, pow2(rows))), block


@op("channel_stats", lambda x, applied=None: (
    x.new_empty(x.shape[:2], dtype=torch.float32),
    x.new_empty(x.shape[:2], dtype=torch.float32)))
def channel_stats(x: torch.Tensor, applied: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) -> (max |x|, mean over H, W), each (N, C) float32.

    applied: None, or a 0-d bool tensor on x's device read by the kernel: where it holds
    False, x is not read and both outputs are 0 (FocusedDropout's participation, SPEC §5).
    """
    n, c, h, w = x.shape
    amax = torch.empty((n, c), dtype=torch.float32, device=x.device)
    mean = torch.empty((n, c), dtype=torch.float32, device=x.device)
    if amax.numel() == 0 or h * w == 0:  # empty maps: max |x| = 0, mean = NaN (torch.mean)
        return amax.fill_(0.0), mean.fill_(float("nan"))
    flat = x.is_contiguous()
    # no data_ptr() here (FakeTensors under torch.compile): where x itself is not 16-byte
    # aligned the loads are narrower, the result the same
    a = 16 // x.element_size() if flat else 1
    span = h * w if h * w % a == 0 else h * w + a - 1
    rows, block = row_tile(x, span, n * c)
    launch(_channel_stats_kernel)[(cdiv(n * c, rows),)](
        x, x if applied is None else applied, amax, mean, n * c, c, w, h * w, span,
        x.numel(), *x.stride(),
        ROWS=rows, BLOCK=block, HW_FLAT=hw_flat(x), IDX64=needs_int64(x),
        HAS_APPLIED=applied is not None, FLAT=flat, A=a, num_warps=warps(rows * block))
    return amax, mean


@triton.jit
def _apply_channel_kernel(t_ptr, o_ptr, w_ptr, OUTER, INNER, C, H, W,
                          t_sN, t_sC, t_sH, t_sW, o_sN, o_sC, o_sH, o_sW, w_sN, w_sC,
                          MAGW, CL: tl.constexpr, GRID3: tl.constexpr, BO: tl.constexpr,
                          BI: tl.constexpr,
                          IDX64: tl.constexpr,
                          SAME: tl.constexpr):
    ov, m, n, c, h, w, _ = apply_tile(OUTER, INNER, C, H, W, MAGW, CL, GRID3, BO, BI, IDX64)
    t_off = tile_offset(n, c, h, w, t_sN, t_sC, t_sH, t_sW, CL)
    o_off = out_offset(t_off, n, c, h, w, o_sN, o_sC, o_sH, o_sW, CL, SAME)
    if CL:  # rows (n, h, w), inner c
        wt = tl.load(w_ptr + (n * w_sN)[:, None] + (c * w_sC)[None, :], mask=m, other=0.0)
    else:  # rows (n, c, h), inner w
        wt = tl.load(w_ptr + n * w_sN + c * w_sC, mask=ov, other=0.0)[:, None]
    tv = tl.load(t_ptr + t_off, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + o_off, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _apply_channel_flat_kernel(t_ptr, o_ptr, w_ptr, TOTAL, HW, MAG1, C, MAG2, HW_M, HW_S,
                               C_M, C_S, NC,
                               BIG1: tl.constexpr, BIG2: tl.constexpr, BLOCK: tl.constexpr,
                               V: tl.constexpr, EVEN: tl.constexpr, IDX64: tl.constexpr):
    """Contiguous NCHW t and out, w (N, C) contiguous: groups of V elements
    (``_common.group_tile``), V <= HW + 1 so that a group spans at most one map end. The
    multiplier is loaded per group for its map and the next one (not gathered per element);
    per element, which of the two."""
    e, m, n, c, pos = group_tile(TOTAL, HW, MAG1, C, MAG2, HW_M, HW_S, C_M, C_S, BIG1, BIG2,
                                  BLOCK, V, IDX64, EVEN)
    mp = n * C + c
    w0 = tl.load(w_ptr + mp, mask=mp < NC, other=0.0)  # groups past the end: unused
    w1 = tl.load(w_ptr + mp + 1, mask=mp + 1 < NC, other=0.0)
    wrap = (pos[:, None] + tl.arange(0, V)[None, :]) >= HW
    wt = tl.where(wrap, w1[:, None], w0[:, None])
    tv = tl.load(t_ptr + e, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + e, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


@op("apply_channel", fake_like)
def apply_channel(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """t: (N, C, H, W), w: (N, C) float32 -> t * w[n, c] in t's dtype and memory format."""
    out = out_like(t)
    if out.numel() == 0:
        return out
    n, c, h, wd = t.shape
    w = w.to(torch.float32)
    # groups of 8 elements (16 bytes of bf16, 32 of float32): the two multiplier loads per
    # group stay within one 4-byte access per 16 bytes of x in float32 (issue 13)
    v = 8
    flat = flat_launch(t, out) if h * wd >= v - 1 else None
    if flat is not None:
        grid, meta = flat
        launch(_apply_channel_flat_kernel)[grid](
            t, out, w.contiguous(), out.numel(), NC=n * c, V=min(v, meta["BLOCK"]), **meta)
        return out
    grid, outer, inner, meta = apply_launch(t, out)
    launch(_apply_channel_kernel)[grid](
        t, out, w, outer, inner, c, h, wd, *t.stride(), *out.stride(), *w.stride(), **meta)
    return out


__all__ = ["channel_stats", "apply_channel"]
