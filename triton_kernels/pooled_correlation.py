"""Pooled Gram-matrix correlation (CorrDrop, SPEC §2 step 2).

F[n, i] = (1/N') sum_j |â_i · â_j − δ_ij|, â_i the L2-normalised channel vector of pooled
position i (k x k average pooling, ceil mode: a window cut by the border averages its
valid units). F decides CorrDrop's blocks, so mathematically equal F are exactly equal
(SPEC §1), as in ``guidedrop.reference.pooled_correlation``:
- the window sums and averages a in float64: a sum of k² values of x is exact in float64
  where the window's nonzero values lie within a factor 2^(53 - p - log2 k²) of its
  largest (p = 24 mantissa bits for float32: 2^23 at k = 7; bfloat16 2^39; float16 always),
  so a is the reference's whatever the order of the additions (Triton's tl.sum orders them
  by the tile's layout, which differs between a GPU and the interpreter; in float32 the
  order of the column sums gave the reference's F but for the last bit in most float32
  samples at k > 1, and sums past 3.4e38 overflowed to a NaN F). Where a sum is inexact
  (values cancelling across more than that factor: 2^60, 1, -2^60), a can still differ;
- â_i = b_i / ‖b_i‖ with b_i = a_i / max|a_i| (no overflow: F is scale invariant), in
  float64 as the reference;
- P_ij = |â_i · â_j| in float64, summed over the channels in one fixed order of fmas
  whatever the tile position of (i, j) (``_gram``; an outer-product loop, not tl.dot,
  whose order is the hardware's): the same for (j, i);
- each term is rounded to a multiple of 2^-32 and the row sums are int64: exact, so
  independent of the order of the terms. The float64 errors (about C ulp of 1) are far
  below that grid, so P is 1 exactly for equal, opposite and parallel rows (0 with a zero
  row), rows of the same values in another channel order get the same terms, and F is
  the reference's, but where a value lies within that error of a rounding boundary of
  the grid (a float32 Gram's errors, about C ulp of float32, were not: such rows' F
  differed in the last bit, and CorrDrop's kappa by up to 1);
- a NaN or an Inf in a pooled row makes every F of the sample NaN (the zero rows' too).
k is clamped to max(H, W) first (a block >= the map is one window).

One kernel (one launch: CorrDrop's statistics, issue 12), grid (N,): a program pools its
sample, then correlates it; the N' x N' matrix never leaves the chip. Its phases each read
what the program's other threads wrote in the one before, after a block-wide barrier:

1. pooling, for a chunk of channels at a time: contiguous NCHW x (``_pool_band``) a
   window row at a time, its rows read in 16-byte vectors from 16 bytes before them and
   realigned in registers (rows of 28, 14 or 7 units do not start on 16 bytes); other
   layouts (``_pool_positions``) BP pooled positions at a time, a (channels x positions x
   window-columns) tile, contiguous along c for channels_last. Both write the pooled
   values transposed, aT (N, C, N') float64 (x.numel() / k² values: small, L2-resident for
   the usual k = 7), and per position the max |a|;
2. the unit rows (``_normalise``): â = (a / max|a|) / ‖a / max|a|‖ of every row, once,
   into hat (N, N', C rounded up to 4 G) float64, each row zero-padded;
3. correlation (``_corr_block``), BM rows at a time: the tiles (i, j) with j from the
   block's own on (the upper triangle of tiles: P is symmetric bit for bit), each over
   the channels 4 G at a time (``_gram``: G groups of 32 bytes of each row, one fma per
   product and channel); each tile's rounded P is added to the sums of its rows and of its
   columns in cs (N, N') int64 (atomics: integers, so in any order), from which a last
   pass takes F. At N' = 361 (k = 3 at 56 x 56) 21 of the 36 tiles of 64 x 64; at N' = 9
   (14 x 14, k = 5) one tile of 16 x 16 in 8 channel groups.
With one window (N' = 1: k >= H and W), F = P_00 follows from the pooling alone: 1 for a
zero row, NaN for a row with a NaN, else 0; phases 2 and 3 are skipped.

The parallelism is the batch (N programs, each looping over its sample's tiles): the
pooling and the correlation of one sample in one launch, without a launch in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop.reference import one_window, pooled_size

from ._common import INTERPRET, TILE, cdiv, launch, needs_int64, op, pow2, warps

QUANTUM_INV = tl.constexpr(4294967296.0)  # 2^32: P_ij is rounded to a multiple of 2^-32
QUANTUM = tl.constexpr(2.0**-32)
# Longest padded row of a contiguous map (and window-column tile) that ``_pool_band``
# holds per channel, in elements: a GPU tile's; longer rows take ``_pool_positions``.
MAX_BAND = 4096


@triton.jit
def _pool_positions(x_ptr, at_ptr, s_ptr, n, i, C, H, W, WP, NP, k, KH, KW,
                    sN, sC, sH, sW, BC: tl.constexpr, BP: tl.constexpr, KP: tl.constexpr):
    """Pools positions i (BP,) of sample n: aT and max |a|."""
    iv = i < NP
    dx = tl.arange(0, KP)
    xb = x_ptr + n * sN
    h0 = (i // WP) * k
    w0 = (i % WP) * k
    nrows = tl.minimum(H - h0, k)
    ncols = tl.minimum(W - w0, k)
    cnt = tl.where(iv, nrows * ncols, 1).to(tl.float64)  # valid units per window
    smax = tl.zeros([BP], tl.float64)  # max |a| over the channels so far
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cv = cc < C
        acc = tl.zeros([BC, BP], tl.float64)
        for dy in range(0, KH):
            rv = iv & (dy < nrows)
            roff = (h0 + dy) * sH
            for dx0 in range(0, KW, KP):
                d = dx0 + dx
                colv = rv[:, None] & (d[None, :] < ncols[:, None])
                pos = roff[:, None] + (w0[:, None] + d[None, :]) * sW  # (BP, KP)
                off = (cc * sC)[:, None, None] + pos[None, :, :]
                v = tl.load(xb + off, mask=cv[:, None, None] & colv[None, :, :], other=0.0)
                acc += tl.sum(v.to(tl.float64), axis=2)
        smax = _add_channels(acc / cnt[None, :], at_ptr, n, C, cc, cv, i, iv, NP, smax)
    tl.store(s_ptr + n * NP + i, smax, mask=iv)


@triton.jit
def _pool_band(x_ptr, at_ptr, s_ptr, n, r, C, H, W, WP, NP, k, KW, L, TOTAL, SPAN,
               BC: tl.constexpr, RB: tl.constexpr, RW: tl.constexpr, WPAD: tl.constexpr,
               WPP: tl.constexpr, KP: tl.constexpr, A: tl.constexpr, ALIGNED: tl.constexpr,
               IDX64: tl.constexpr):
    """Pools window row r (positions r * WP ... r * WP + WP - 1) of sample n of a contiguous
    NCHW x, like ``_pool_positions``.

    Each of its k rows of W units is read from its start rounded down to A elements (16
    bytes), so that x loads in 16-byte vectors at every W (a row of 28, 14 or 7 elements
    does not start on 16 bytes): SPAN (a multiple of 16 >= W + A - 1) elements at most,
    and past x's end nothing. Each row is realigned in registers (tl.gather; not needed
    when every row starts on 16 bytes: ALIGNED) and added to the float64 column sums;
    then each window's columns are gathered and summed (exact, so in any order: see the
    module's docstring)."""
    t = tl.arange(0, RW)
    col = tl.arange(0, WPAD)
    h0 = r * k
    nrows = tl.minimum(H - h0, k)
    if IDX64:
        h0 = h0.to(tl.int64)
    # the windows' columns: column dx of window wp is wp * k + dx
    wp = tl.arange(0, WPP * KP) // KP  # constexpr divisors: shifts and masks
    dx = tl.arange(0, WPP * KP) % KP
    in2 = (dx < KW) & (wp * k + dx < W)
    idx2 = tl.where(in2, wp * k + dx, 0)
    i = r * WP + tl.arange(0, WPP)
    iv = tl.arange(0, WPP) < WP
    ncols = tl.minimum(W - tl.arange(0, WPP) * k, k)
    cnt = tl.where(iv, nrows * ncols, 1).to(tl.float64)  # valid units per window
    smax = tl.zeros([WPP], tl.float64)  # max |a| over the channels so far
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cv = cc < C
        row0 = (n * C + cc) * L + h0 * W
        colsum = tl.zeros([BC, WPAD], tl.float64)
        for dy0 in range(0, nrows, RB):  # RB rows at a time
            dy = dy0 + tl.arange(0, RB)
            first = row0[:, None] + (dy * W)[None, :]  # (BC, RB)
            shift = first % A  # A is a power of 2: a mask, not a division
            base = tl.multiple_of(first - shift, [A, A])
            # in bounds only, and the row: constants over each aligned group of A when
            # TOTAL is a multiple of 16 (Triton's specialisation): 16-byte vectors
            m = (cv[:, None] & (dy < nrows)[None, :])[:, :, None] & (t < SPAN)[None, None, :] \
                & (t[None, None, :] < (TOTAL - base)[:, :, None])
            v = tl.load(x_ptr + base[:, :, None] + t[None, None, :], mask=m, other=0.0)
            v = v.to(tl.float32)
            if not ALIGNED:
                idx = tl.where(col < W, shift.to(tl.int32)[:, :, None] + col[None, None, :], 0)
                v = tl.gather(v, idx, axis=2)
            colsum += tl.sum(v.to(tl.float64), axis=1)
        # columns past W hold other rows' units, which no window reads; zeroed all the same
        # (without it ptxas spills at bf16 32 x 32, k = 7)
        colsum = tl.where(col[None, :] < W, colsum, 0.0)
        cols = tl.gather(colsum, tl.broadcast_to(idx2[None, :], (BC, WPP * KP)), axis=1)
        cols = tl.where(in2[None, :], cols, 0.0)
        acc = tl.sum(tl.reshape(cols, (BC, WPP, KP)), axis=2)
        smax = _add_channels(acc / cnt[None, :], at_ptr, n, C, cc, cv, i, iv, NP, smax)
    tl.store(s_ptr + n * NP + i, smax, mask=iv)


@triton.jit
def _add_channels(avg, at_ptr, n, C, cc, cv, i, iv, NP, smax):
    """Stores the pooled avg (channels cc x positions i; the float64 window sums divided by
    their units, an IEEE division in float64) to aT; returns max |a| of positions
    i over the channels so far, these included: Inf for a row with an Inf or a NaN (tl.max
    drops NaNs), whose F are then NaN (``_normalise``: Inf / Inf, NaN / Inf)."""
    tl.store(at_ptr + (n * C + cc)[:, None] * NP + i[None, :], avg,
             mask=cv[:, None] & iv[None, :])
    m = tl.abs(avg)
    cmax = tl.max(tl.where(cv[:, None], tl.where(m == m, m, float("inf")), 0.0), axis=0)
    return tl.maximum(smax, cmax)


@triton.jit
def _scaled(at_ptr, n, C, cc, cv, i, iv, NP, s):
    """b = a / max|a| in float64 (channels cc x positions i, transposed: (BP, BC)), 0 in
    the channels past C and in a zero row (s = 0)."""
    a = tl.load(at_ptr + (n * C + cc)[None, :] * NP + i[:, None],
                mask=iv[:, None] & cv[None, :], other=0.0).to(tl.float64)
    return a / tl.where(s == 0, 1.0, s)[:, None]  # float64: IEEE division and square root


@triton.jit
def _normalise(at_ptr, s_ptr, hat_ptr, cs_ptr, n, C, CQ, NP, BP: tl.constexpr,
               BC: tl.constexpr):
    """Writes the unit rows of sample n, hat[n, i, c] = â_i[c] = b_i[c] / ‖b_i‖, b = a /
    max|a| (N, N', 4 CQ) float64 as in the reference (0 for a zero row, and in the
    channels C ... 4 CQ - 1 that pad a row to whole steps of ``_gram``), from aT (N, C,
    N'): each â divided once here, not once per tile of the Gram loop that reads it; and
    zeroes the row sums cs[n] (``_corr_block``). ‖b‖² sums the squares in float64, so
    rows that hold the same values in another channel order get the same norm but for a
    float64 rounding (SPEC §1). Returns the number of rows whose norm is NaN: a NaN or an
    Inf (Inf / Inf) in the pooled row, which makes every F of the sample NaN, as in the
    reference, whose Gram product gives 0 · NaN = NaN also in the zero rows."""
    CP = CQ * 4  # a multiple of 4 the compiler sees: rows of hat start on 32 bytes
    bad = 0
    for p0 in range(0, NP, BP):
        i = p0 + tl.arange(0, BP)
        iv = i < NP
        s = tl.load(s_ptr + n * NP + i, mask=iv, other=1.0).to(tl.float64)
        tl.store(cs_ptr + n * NP + i, tl.zeros([BP], tl.int64), mask=iv)
        ssq = tl.zeros([BP], tl.float64)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            b = _scaled(at_ptr, n, C, cc, cc < C, i, iv, NP, s)
            ssq += tl.sum(b * b, axis=1)
        norm = tl.sqrt(ssq)
        bad += tl.sum((norm != norm).to(tl.int32))
        norm = tl.where(ssq == 0, 1.0, norm)  # a zero row: b = 0
        for c0 in range(0, CP, BC):
            cc = c0 + tl.arange(0, BC)
            h = _scaled(at_ptr, n, C, cc, cc < C, i, iv, NP, s) / norm[:, None]
            tl.store(hat_ptr + (n * NP + i)[:, None] * CP + cc[None, :], h,
                     mask=iv[:, None] & (cc < CP)[None, :])
    return bad


@triton.jit
def _channels(t):
    """The 4 channels of t (..., 4): 4 tensors (...)."""
    c01, c23 = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))
    c0, c1 = tl.split(c01)
    c2, c3 = tl.split(c23)
    return c0, c1, c2, c3


@triton.jit
def _rows(hat_ptr, row, rv, c0, CP, G: tl.constexpr):
    """hat[row, c0 + 4 g + t] (len(row), G, 4): channel group g's 32 bytes of each row."""
    g = tl.arange(0, G)[None, :, None]
    t = tl.arange(0, 4)[None, None, :]
    return tl.load(hat_ptr + (row * CP)[:, None, None] + c0 + 4 * g + t,
                   mask=rv[:, None, None], other=0.0)


@triton.jit
def _add_channel(acc, ai, aj):
    """One channel of the (i, j) tile's dots (``_gram``), ai (BI, G), aj (BJ, G)."""
    return tl.fma(ai[:, None, :], aj[None, :, :], acc)


@triton.jit
def _gram(hat_ptr, i, iv, j, jv, CP, G: tl.constexpr):
    """Over the (i, j) tile, rows of hat_ptr: g_ij = â_i · â_j in float64. Channel
    c0 + 4 g + t goes to group g, whose sums run in channel order from 0, one fma a
    product; then the G groups are added. Every (i, j) of every tile is this one
    arithmetic in one layout, so the same for (j, i) (a·b = b·a). The groups give the
    threads G times more products than a (BM, BM) tile of a few rows has (N' = 9 at
    14 x 14, k = 5: without them the threads computed copies of its products, 1024
    channels one after another)."""
    BI: tl.constexpr = i.shape[0]
    BJ: tl.constexpr = j.shape[0]
    acc = tl.zeros([BI, BJ, G], tl.float64)
    for c0 in range(0, CP, 4 * G):
        i0, i1, i2, i3 = _channels(_rows(hat_ptr, i, iv, c0, CP, G))
        j0, j1, j2, j3 = _channels(_rows(hat_ptr, j, jv, c0, CP, G))
        acc = _add_channel(acc, i0, j0)
        acc = _add_channel(acc, i1, j1)
        acc = _add_channel(acc, i2, j2)
        acc = _add_channel(acc, i3, j3)
    return tl.sum(acc, axis=2)


@triton.jit
def _terms(hat_ptr, i, iv, j, jv, CP, G: tl.constexpr):
    """The (i, j) tile's P_ij = |â_i·â_j|, i != j, rounded to multiples of 2^-32 (int64),
    as the reference: the float64 dot's error, about C ulp of 1, is far below the grid, so
    equal, opposite and parallel rows give 1 exactly, and rows of the same values in
    another channel order the same P, but where a value lies within that error of a
    rounding boundary of the grid (SPEC §1: equal F exactly equal). 0 with a zero row
    (g = 0). A NaN P_ij would come only from a NaN row, whose sample does not get here;
    p == p keeps it from the int64 conversion all the same."""
    p = tl.abs(_gram(hat_ptr, i, iv, j, jv, CP, G))
    term = iv[:, None] & jv[None, :] & (p == p) & (i[:, None] != j[None, :])
    return (tl.where(term, p, 0.0) * QUANTUM_INV + 0.5).to(tl.int64)  # rounds


@triton.jit
def _corr_block(hat_ptr, cs_ptr, n, r0, CP, NP, BM: tl.constexpr, G: tl.constexpr):
    """Rows i = r0 ... r0 + BM - 1 of sample n: the tiles (i, j) with j from r0 on (the
    upper triangle of tiles: P is symmetric bit for bit, each tile off the diagonal
    computed once for both of its blocks, SPEC §2), their P added to the row sums of rows
    i and of rows j in cs (N, N') int64 (atomics: integers, so in any order)."""
    i = r0 + tl.arange(0, BM)
    iv = i < NP
    rowsum = tl.zeros([BM], tl.int64)
    for j0 in range(r0, NP, BM):
        j = j0 + tl.arange(0, BM)
        jv = j < NP
        q = _terms(hat_ptr, i, iv, j, jv, CP, G)
        rowsum += tl.sum(q, axis=1)
        if j0 != r0:  # (j, i): the later rows' sums
            tl.atomic_add(cs_ptr + n * NP + j, tl.sum(q, axis=0), mask=jv, sem="relaxed")
    tl.atomic_add(cs_ptr + n * NP + i, rowsum, mask=iv, sem="relaxed")


@triton.jit
def _pooled_correlation_kernel(x_ptr, at_ptr, s_ptr, hat_ptr, cs_ptr, f_ptr, C, CQ, H,
                               W, HP, WP, NP, k, KH, KW, sN, sC, sH, sW, L, TOTAL, SPAN,
                               BC: tl.constexpr, BP: tl.constexpr, KP: tl.constexpr,
                               BM: tl.constexpr, G: tl.constexpr, NBP: tl.constexpr,
                               NBC: tl.constexpr, ONE: tl.constexpr, IDX64: tl.constexpr,
                               FLAT: tl.constexpr, RB: tl.constexpr, RW: tl.constexpr,
                               WPAD: tl.constexpr, WPP: tl.constexpr, A: tl.constexpr,
                               ALIGNED: tl.constexpr):
    n = tl.program_id(0)
    if IDX64:
        n = n.to(tl.int64)
    if FLAT:  # contiguous NCHW x: a window row at a time, 16-byte loads
        for r in range(0, HP):
            _pool_band(x_ptr, at_ptr, s_ptr, n, r, C, H, W, WP, NP, k, KW, L, TOTAL,
                       SPAN, BC, RB, RW, WPAD, WPP, KP, A, ALIGNED, IDX64)
    else:
        for p0 in range(0, NP, BP):
            i = p0 + tl.arange(0, BP)
            if IDX64:
                i = i.to(tl.int64)
            _pool_positions(x_ptr, at_ptr, s_ptr, n, i, C, H, W, WP, NP, k, KH, KW,
                            sN, sC, sH, sW, BC, BP, KP)
    # Each phase reads what the other threads of this program wrote in the one before: a
    # block-wide barrier orders those global stores before these loads.
    tl.debug_barrier()
    if ONE:
        # one window (k >= H and W): F = P_00 as the Gram path gives it, NaN for a NaN row
        # (``_normalise``), else 1 for a zero row, 0 for any other
        s = tl.load(s_ptr + n)
        f = tl.where(s == 0, 1.0, 0.0)
        tl.store(f_ptr + n, tl.where(s == float("inf"), float("nan"), f))
    else:
        nan = _normalise(at_ptr, s_ptr, hat_ptr, cs_ptr, n, C, CQ, NP, NBP, NBC) > 0
        tl.debug_barrier()
        if nan:  # every F of the sample (``_normalise``)
            for r0 in range(0, NP, BM):
                i = r0 + tl.arange(0, BM)
                tl.store(f_ptr + n * NP + i, tl.full([BM], float("nan"), tl.float32),
                         mask=i < NP)
        else:
            hbase = hat_ptr + n * NP * CQ * 4
            for r0 in range(0, NP, BM):
                _corr_block(hbase, cs_ptr, n, r0, CQ * 4, NP, BM, G)
            tl.debug_barrier()  # every tile's sums in cs
            for r0 in range(0, NP, BM):
                i = r0 + tl.arange(0, BM)
                iv = i < NP
                rowsum = tl.load(cs_ptr + n * NP + i, mask=iv, other=0, cache_modifier=".cg")
                # P_ii: 1 for a zero row, else 0
                zero = tl.load(s_ptr + n * NP + i, mask=iv, other=1.0) == 0
                rowsum += tl.where(zero, 4294967296, 0).to(tl.int64)
                f = rowsum.to(tl.float64) * QUANTUM / NP
                tl.store(f_ptr + n * NP + i, f.to(tl.float32), mask=iv)


def pooled_correlation(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> F: (N, ceil(H/k), ceil(W/k)) float32 (SPEC §2 step 2).

    Any int k >= 1: a block at least as large as the map is one window, so k is clamped to
    max(H, W) here, before the op (whose int64 schema would refuse k >= 2**63).
    Empty x (N, H or W = 0): an empty F; C = 0: zero rows, F = 1 / N'.
    """
    return _pooled_correlation(x, one_window(k, x.shape[-2], x.shape[-1]))


@op("pooled_correlation", lambda x, k: x.new_empty(
    (x.shape[0], *pooled_size(x.shape[2], x.shape[3], k)), dtype=torch.float32))
def _pooled_correlation(x: torch.Tensor, k: int) -> torch.Tensor:
    n, c, h, w = x.shape
    hp, wp = cdiv(h, k), cdiv(w, k)
    np_ = hp * wp
    f = torch.empty((n, hp, wp), dtype=torch.float32, device=x.device)
    if f.numel() == 0:
        return f
    if c == 0:  # zero rows: P = I, F = 1 / N'
        return f.fill_(1.0 / np_)
    _pooled_correlation_launch(x, k, f.view(n, np_))
    return f


def _pooled_correlation_launch(x: torch.Tensor, k: int, f: torch.Tensor) -> None:
    """F of x (N, C, H, W), C > 0, k <= max(H, W), into f (N, N') float32: one launch."""
    n, c, h, w = x.shape
    hp, wp, np_ = cdiv(h, k), cdiv(w, k), f.shape[1]
    dev = x.device
    at = torch.empty((n, c, np_), dtype=torch.float64, device=dev)
    smax = torch.empty((n, np_), dtype=torch.float64, device=dev)
    kh, kw = min(k, h), min(k, w)
    # contiguous x: the k rows of a window row of every channel, each read from 16 bytes
    # before it at most (``_pool_band``), where they fit in MAX_BAND elements; no
    # data_ptr() here (FakeTensors under torch.compile): where x itself is not 16-byte
    # aligned the loads are narrower, the result the same
    a = 16 // x.element_size()
    aligned = w % a == 0  # every row starts on 16 bytes: no realignment
    span = pow2(w) if aligned else cdiv(w + a - 1, 16) * 16  # multiples of 16: specialised
    rw = pow2(span)
    # rows under 8 bytes (W = 1, 2, 3) by positions: their 16-byte reads would be mostly
    # other rows' units, and a tall map's hundreds of window rows one after another
    flat = (x.is_contiguous() and w * x.element_size() >= 8 and rw <= MAX_BAND
            and pow2(wp) * pow2(kw) <= MAX_BAND)
    # TILE / 2 elements a step, any dtype (float32 spilled at TILE, and so did the float64
    # column sums of bfloat16 at 14 x 14 and 7 x 7, k = 3): channels, and rows where C is
    # small. Under 16 channels a step, by positions: Triton's gather
    # layout pass asserts on such tiles for sm_90 (OptimizeThreadLocality, isWarpLocal:
    # C = 2 to 8 at 7 x 7, 14 x 14 and 28 x 28, Triton 3.8)
    tile = TILE // 2
    bc = max(1, min(pow2(c), tile // rw))
    flat = flat and bc >= 16
    if flat:
        kp = pow2(kw)
        bp = 1
        rb = max(1, min(pow2(kh), tile // (bc * rw)))
        nw = warps(bc * rb * rw)
    else:
        kp = min(pow2(kw), 256)
        # the interpreter pays per operation, not per element: large tiles
        bp = max(1, min(pow2(np_), (TILE if INTERPRET else 512) // kp))
        bc = max(1, min(pow2(c), TILE // (bp * kp)))
        rb = 1
        nw = warps(bc * bp * kp)
    # Gram tiles of 64 x 64 on a GPU, 16 x 16 at least, in channel groups (``_gram``):
    # 2048 products a step (8 a thread of 256) where the channels allow. A tile of few rows
    # (N' = 9 at 14 x 14, k = 5) without groups had its 256 threads compute copies of its
    # products, 1024 channels one after another: 34 SASS per element of x, with 4 fmas a
    # product then. Fewer products a step (16 x 16 tiles of 4 groups, C = 16) spilled.
    bm, cg = max(16, pow2(np_)), pow2(cdiv(c, 4))
    while bm < 64 and bm * bm * cg < 2048:
        bm *= 2
    bm = min(256 if INTERPRET else 64, bm)
    grp = max(1, min(TILE // 2 // (bm * bm), cg))
    cq = cdiv(c, 4 * grp) * grp  # unit rows padded to whole steps of 4 G channels
    hat = torch.empty((n, np_, 4 * cq), dtype=torch.float64, device=dev)
    cs = torch.empty((n, np_), dtype=torch.int64, device=dev)  # the Gram's row sums
    # the normalisation's (positions x channels) tiles: x.numel() / k² values, an element
    # per thread on a GPU (its two divisions are per value, not per element of x)
    nbp = min(pow2(np_), 64)
    nbc = max(4, min(pow2(4 * cq), (TILE if INTERPRET else 32 * nw) // nbp))
    launch(_pooled_correlation_kernel)[(n,)](
        x, at, smax, hat, cs, f, c, cq, h, w, hp, wp, np_, k, kh, kw, *x.stride(), h * w,
        x.numel(), span, BC=bc, BP=bp, KP=kp, BM=bm, G=grp, NBP=nbp, NBC=nbc, ONE=np_ == 1,
        IDX64=needs_int64(x, at, hat), FLAT=flat, RB=rb, RW=rw, WPAD=pow2(w), WPP=pow2(wp),
        A=a, ALIGNED=aligned, num_warps=nw)


__all__ = ["pooled_correlation"]
