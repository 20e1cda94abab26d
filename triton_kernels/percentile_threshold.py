"""Top-percentile thresholding: the exact k-th largest value of rows / maps, without sorting.

Selection is a radix select on the order-preserving int32 key of the float32 value
(``_common.float_key``), read as unsigned (sign bit flipped): 4 passes of 8 bits (rows
under ``SMALL_ROW``: 8 passes of 4 bits), most significant digit first. Only the key's top
``KEY_BITS`` can differ between the elements of a bfloat16 (16) or float16 (19) x, so those
take the passes that cover them (bfloat16: 2 of 8 bits, or 4 of 4) and fill the bits below
from the sign (``_low_fill``). Each pass is a
histogram (``tl.histogram``, 256 or 16 bins) of the digit among the keys matching the
digits found so far; the bin holding the k-th largest (counted from the top) is the next
digit, and k becomes the rank within that bin. The digits are the k-th largest key, the
key of an element of the row (exact, ties by value as torch.topk; NaN is one canonical
key above +Inf, -0.0 sorts below +0.0 as in float_key). Rows of 1024 to 4096 slots, one or
two a program of 1 or 2 warps, count their 8-bit digits in bins permuted so that each thread
holds 8 or 4 consecutive digits, scanned in its registers (``_pass_wide``).

Rows of up to ``MAX_ROW`` elements are read once into registers and the passes run on
chip (short rows several per program, one histogram of ROWS * bins, at most HIST_BINS; 64
elements a thread; from Triton 3.8, rows of up to 64 elements a lane's each:
``_load_rows``, ON_LANES). Their
tile, a power of 2, is padded with copies of the row's first
element, so that min and max need no mask, and every pass counts every key without one
(``_pass``: a mask costs a branch around each shared-memory atomic): the keys off the
prefix go to the last bin, and the padding's and those counts are subtracted from their
known bins; the padding's soft mask is subtracted from the sum. Before Triton 3.8, whose
tl.histogram costs a ballot per bin bit, these rows take one bit a step instead, by counts
of the keys at or above a candidate (``_select_by_bits``, ``HISTOGRAM_BALLOTS``).
Longer rows (one per program) cannot stay in registers; rather than re-reading x at every
pass they read it twice: once for the top digit's histogram (and min/max), once to pack
the keys in the chosen top bin, in order, into an int32 workspace (R * L, allocated only
for long rows). The 3 lower passes read only those candidates, usually a small part of
the row (all of it only when every key shares the top 8 bits: sign and 7 exponent bits).
Exact, with no data-dependent launch or host synchronisation. The soft mask's sum reads x
once more (it needs the threshold).

- ``kth_largest(v, k)``: rows of v (R, L).
- ``map_threshold(x, k)``: rows = the (n, c) maps of x.
- ``attention_stats(x, k, active, mode)``: for the active maps only (a program whose maps
  are all inactive exits before loading anything): the threshold, min, max and the sum
  of AttentionDrop's soft mask (SPEC §4).
- ``apply_attention``: ``t * S * scale[n]``, S rebuilt from x and the per-map stats; x is
  read only for active maps (masked loads), and not at all again when t is x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    CL_CHANNELS,
    CL_PER_THREAD,
    CL_TILE,
    INTERPRETED,
    MAX_ROW,
    TRITON_VERSION,
    aligned,
    apply_flags,
    apply_launch,
    apply_tile,
    cdiv,
    fake_like,
    flat_launch,
    float_key,
    hw_flat,
    key_float,
    launch,
    map_tile,
    needs_int64,
    op,
    out_like,
    out_offset,
    pos_offset,
    pow2,
    tile_offset,
    tile_offsets,
    walk_channels_last,
    warps,
)

MODES = {"am": 0, "sm": 1, "ad": 2}
CHUNK = 4096  # elements per step when a row does not fit in registers
RADIX = tl.constexpr(256)  # bins of one 8-bit digit (the long rows' digits)
# Digit width of short rows: 8 bits (4 passes) from SMALL_ROW elements on; below, 4 bits
# (8 passes of 16 bins): a histogram and pick cost per map and bin, and a map of 49 or 196
# elements would spend more on 4 x 256 bins than on its elements.
SMALL_ROW = 1024
# The key bits that can differ between the values of a dtype, from the top: a bfloat16's
# float32 has 16 zero low bits, a float16's 13 (float_key turns them into ones where the
# value is negative).
KEY_BITS = {torch.bfloat16: 16, torch.float16: 19}
# Bins of a program's histogram of short rows, ROWS * (256 or 16): 16 KiB of shared memory.
HIST_BINS = 4096
# Rows in registers (but those of _pass_wide): SELECT_TILE elements per program (several
# short rows), a warp per WARP_ELEMENTS (64 a thread). The picks of the digits cost per
# row and per thread that holds it, not per element: at 16 a thread they were most of
# the kernel's instructions (bf16 56 x 56: 84 SASS per element; 64 a thread: 30), and past
# 64 registers spill.
SELECT_TILE = 16384 if INTERPRETED else 2048
WARP_ELEMENTS = 2048
# Triton 3.6 (the GPU machine's) lowers tl.histogram to a warp ballot per bit of the bin
# index and a popcount per bin a lane owns, 3.8 to a shared-memory atomic per key: the
# select's sm_90 SASS per element, bf16, 130-237 against 30-60. Before 3.8 (3.7 not
# measured) the rows in registers are selected without histograms (_select_by_bits: 16
# compares and adds a bf16 key, 32 a float32 one): with 3.6, bf16 56 x 56 73-79 (130-138
# with histograms), 28 x 28 74-79 (180-188), 14 x 14 102-103 (150-153), 7 x 7 110 in
# channels_last and 199 in NCHW (237, 230).
HISTOGRAM_BALLOTS = TRITON_VERSION < (3, 8)
# The apply_attention tiles of three axes: which strided axis comes first. Triton's
# coalescing puts a warp's lanes along the 16-byte vectors' axis and then along the tile's
# other axes, those of equal contiguity in an order that changed: 3.8 takes the last first,
# 3.6 the first. So the axis the lanes must run along comes last before 3.8's order and first
# before it (LANES_FIRST): in channels_last the channels' vectors (not the positions: every
# thread would hold the tile's 64 channels of a position and read their maps' states from
# shared memory per element), in the flat tile the groups of U vectors (not the U vectors:
# a thread would hold 4 groups' index and state work, not one). Triton 3.6, bf16 sm_90 SASS
# per element: channels_last 17.0-18.3 -> 12.7-14.3, flat 14 x 14 13.4-15.8 -> 10.6-12.0,
# 7 x 7 16.7-21.9 -> 12.9-15.0 (with _below); Triton 3.8 with the lanes' axis first:
# channels_last 16.5-20.0 (11.0-14.1 last).
LANES_FIRST = TRITON_VERSION < (3, 8)


@triton.jit
def range_reciprocal(mn, mx):
    """r = 1 / (mx - mn) rounded up (toward +Inf), once per map (SPEC §4 step 2;
    reference.range_reciprocal): f̂ = min((x - mn) * r, 1) is then exactly 1 at the map's
    maximum, and no unit needs a division."""
    d = mx - mn
    if INTERPRETED:  # numpy has no directed rounding: the nearest quotient, moved up where
        r = tl.math.div_rn(1.0, d)  # it lies below 1/d (d * r is exact in float64)
        p = d.to(tl.float64) * r.to(tl.float64)
        low = tl.where(d > 0.0, p < 1.0, p > 1.0)
        bits = r.to(tl.int32, bitcast=True)
        up = tl.where(r > 0.0, bits + 1, bits - 1).to(tl.float32, bitcast=True)
        r = tl.where(low, up, r)
    else:  # PTX's IEEE reciprocal rounded up: libdevice's rcp_ru flushes subnormals (Triton
        # links libdevice for flush-to-zero), and both a range over 2^126 (1/d subnormal)
        # and a subnormal range must round as the reference does
        r = tl.inline_asm_elementwise("rcp.rp.f32 $0, $1;", "=r,r", [d], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return r


@triton.jit
def saturated_product(a, b):
    """min(max(a * b, 0), 1) with NaN -> 0, the product rounded to nearest first: PTX's
    mul.sat.f32 (one FMUL.SAT on sm_90). Not tl.minimum / tl.maximum: whether they return a
    NaN operand depends on the Triton version (3.6's interpreter does)."""
    if INTERPRETED:
        q = a * b
        f = tl.where(q >= 0.0, tl.minimum(q, 1.0), 0.0)
    else:
        f = tl.inline_asm_elementwise("mul.sat.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                      dtype=tl.float32, is_pure=True, pack=1)
    return f


@triton.jit
def one_minus_gated(f, xv, thr):
    """1 - f * [x >= thr] for a finite f >= 0 (f̂): f * [x >= thr] is f or 0, exact, so one
    rounding either way. On a GPU one FSET.BF (1.0 where x >= thr, NaN not) and one FFMA
    with f's sign flipped in its operand: no predicate per unit to hold (a tile's 64 were
    spilled to registers), and no integer XOR for that sign (LLVM's fma(-f, b, 1) of an
    inline asm result took one)."""
    if INTERPRETED:
        s = 1.0 - tl.where(xv >= thr, f, 0.0)
    else:
        s = tl.inline_asm_elementwise(
            "{ .reg .f32 b, n; set.ge.f32.f32 b, $2, $3; neg.f32 n, $1; "
            "fma.rn.f32 $0, n, b, 0f3F800000; }", "=r,r,r,r",
            [f, xv, thr], dtype=tl.float32, is_pure=True, pack=1)
    return s


@triton.jit
def _below(xv, thr):
    """1.0 where xv < thr, else 0.0 (NaN: 0.0), float32: one FSET on sm_90 (PTX's set). From
    (xv < thr).to(tl.float32) Triton 3.6 made a predicate, packed the group's 32 into
    integers and unpacked them (bf16 7 x 7 "am": 18.2 SASS per element, 3.8: 12.8)."""
    if INTERPRETED:
        b = (xv < thr).to(tl.float32)
    else:
        b = tl.inline_asm_elementwise("set.lt.f32.f32 $0, $1, $2;", "=r,r,r", [xv, thr],
                                      dtype=tl.float32, is_pure=True, pack=1)
    return b


@triton.jit
def soft_mask(xv, thr, mn, r, MODE: tl.constexpr):
    """AttentionDrop's S (SPEC §4) in float32, the reference's operations in its order; r =
    range_reciprocal(mn, mx) of the map (0 gives S = 1: f̂ = 0)."""
    if MODE == 0:  # "am"
        s = (xv < thr).to(tl.float32)
    else:
        # f̂ = 0 wherever it is not a number (max = min, ±Inf, an overflow: a NaN or a
        # 0 * Inf): the reference's where(q >= 0, min(q, 1), 0) but for the sign of a zero,
        # which 1 - f̂ drops.
        fhat = saturated_product(xv - mn, r)
        if MODE == 1:  # "sm"
            s = 1.0 - fhat
        else:  # "ad"
            s = one_minus_gated(fhat, xv, thr)
    return s


@triton.jit
def _load(x_ptr, base, live, p0, L, W, sH, sW, other,
          BLOCK: tl.constexpr, HW_FLAT: tl.constexpr, IDX64: tl.constexpr):
    """(ROWS, BLOCK) float32 values of positions p0 ... p0 + BLOCK - 1 of the rows at
    ``base`` (``other`` where not valid), and which are valid."""
    p = p0 + tl.arange(0, BLOCK)
    if IDX64:
        p = p.to(tl.int64)
    valid = live[:, None] & (p < L)[None, :]
    off = base[:, None] + pos_offset(p, W, sH, sW, HW_FLAT)[None, :]
    return tl.load(x_ptr + off, mask=valid, other=other).to(tl.float32), valid


@triton.jit
def _load_rows(x_ptr, base, live, W, sH, sW, first, L: tl.constexpr, BLOCK: tl.constexpr,
               HW_FLAT: tl.constexpr, UNIT_SW: tl.constexpr, IDX64: tl.constexpr,
               ON_LANES: tl.constexpr):
    """The (ROWS, BLOCK) float32 values of whole rows of L units (``first`` of each row
    past L, as _load's with other=first, no mask returned). L is a constant (a kernel per
    row length): the padding is known per register, so no compare or fill a unit (bf16
    56 x 56 in channels_last: 34.2 SASS per element before, 26.9). UNIT_SW (HW_FLAT, sW =
    1): the rows' pointers first, so that the units' offsets, constants, fold into the
    loads' addresses (x_ptr + (base + p) took a 64-bit add and a sign extension a unit).

    ON_LANES: the rows laid out on the lanes (ROW_LANES, rows of at most 64 units and at
    least 32 a warp). Triton lays a tile out along the axis its loads find contiguous: the
    positions, in NCHW, so that every thread held every row of a program and computed each
    row's picks and scalars itself (bf16 7 x 7: 108 SASS per element). Loaded as (BLOCK,
    ROWS) with its contiguity hidden, the tile takes Triton's default layout, rows on the
    lanes, which Triton 3.8 keeps through the transpose (54.5). Its loads are not 16-byte
    vectors either way (a 7 x 7 map is 98 bytes). In NCHW each warp-wide load now reaches
    32 maps, about 25 cache lines, where it reached 1 or 2; the map's later loads hit those
    lines in L1."""
    p = tl.arange(0, BLOCK)
    if IDX64:
        p = p.to(tl.int64)
    if ON_LANES:
        row, unit = base[None, :], pos_offset(p, W, sH, sW, HW_FLAT)[:, None]
        inside, fill, alive = (p < L)[:, None], first[None, :], live[None, :]
    else:
        row, unit = base[:, None], pos_offset(p, W, sH, sW, HW_FLAT)[None, :]
        inside, fill, alive = (p < L)[None, :], first[:, None], live[:, None]
    if UNIT_SW:
        ptr = (x_ptr + row) + unit
    else:
        ptr = x_ptr + (row + unit)
    if ON_LANES:
        ptr = tl.max_contiguous(ptr, [1, 1])
    v = tl.where(inside, tl.load(ptr, mask=alive & inside), fill).to(tl.float32)
    if ON_LANES:
        v = tl.trans(v)
    return v


@triton.jit
def _histogram(digit, m, ROWS: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """(ROWS, BLOCK) digits in [0, BINS) where m (all of them where m is None) -> (BINS,
    ROWS) int32: each row's counts, one ``tl.histogram`` over ROWS * BINS bins (row r's
    digit d in bin d * ROWS + r: a thread's registers then hold a row's bins, and the
    picks' sums and scans over them take no shuffles; with r * BINS + d they took most of
    the kernel's instructions at 7 x 7). Unmasked, each digit is one shared-memory atomic;
    masked, a branch around it (7 SASS instead of 1)."""
    r = tl.arange(0, ROWS)[:, None]
    flat = tl.reshape(digit * ROWS + r, [ROWS * BLOCK])
    if m is None:
        h = tl.histogram(flat, ROWS * BINS)
    else:
        h = tl.histogram(flat, ROWS * BINS, mask=tl.reshape(m, [ROWS * BLOCK]))
    return tl.reshape(h, [BINS, ROWS])


@triton.jit
def _pick(hist, k, BINS: tl.constexpr):
    """hist (BINS, ROWS): the counts of the current digit among the keys matching the prefix;
    k (ROWS,): the rank of the wanted key among them (1 = largest) -> (the digit of the
    k-th largest, its rank among the keys with that digit, their count). Rows with fewer
    than k keys (dead rows) get digit -1 (never stored)."""
    b = tl.arange(0, BINS)[:, None]
    atleast = tl.sum(hist, axis=0)[None, :] - tl.cumsum(hist, axis=0) + hist  # #{digit >= b}
    d = tl.sum((atleast >= k[None, :]).to(tl.int32), axis=0) - 1  # atleast: non-increasing
    # from atleast, not hist: a fourth use of hist made Triton compute it twice
    above = tl.sum(tl.where(b == d[None, :] + 1, atleast, 0), axis=0)  # #{digit > d}
    count = tl.sum(tl.where(b == d[None, :], atleast, 0), axis=0) - above
    return d, k - above, count


@triton.jit
def _select_by_bits(ukey, pkey, pad, k, ROWS: tl.constexpr, KEY_BITS: tl.constexpr):
    """The top KEY_BITS bits of the k-th largest of each row's unsigned keys (ROWS, BLOCK),
    a bit a step from the top: the largest t with #{keys >= t} >= k (bits below KEY_BITS
    0, so a key is >= t exactly when its top bits are), the ``pad`` copies of ``pkey``
    taken out of the counts. A compare and an add per key and bit, with no histogram."""
    t = tl.zeros([ROWS], tl.uint32)
    one = tl.full([ROWS], 1, tl.uint32)
    for i in tl.static_range(KEY_BITS):
        cand = t | (one << (31 - i))
        n = tl.sum((ukey >= _col(cand, ROWS)).to(tl.int32), axis=1) \
            - tl.where(pkey >= cand, pad, 0)
        t = tl.where(n >= k, cand, t)
    return t


@triton.jit
def _col(v, ROWS: tl.constexpr):
    """Per-row values v (ROWS,) to apply to a (ROWS, BLOCK) tile. One row: a scalar,
    uniform in every layout (to broadcast a (1,) tensor, Triton recomputed the whole
    histogram pass that gave it in the tile's layout)."""
    if ROWS == 1:
        c = tl.max(v, axis=0)
    else:
        c = v[:, None]
    return c


@triton.jit
def _pass(ukey, uprefix, count, n_valid, pad, pkey, ROWS: tl.constexpr, BLOCK: tl.constexpr,
          BITS: tl.constexpr, SHIFT: tl.constexpr):
    """The (BINS, ROWS) histogram of a row's valid unsigned keys (ROWS, BLOCK) that match
    the prefix ``uprefix`` above SHIFT + BITS (``count`` of them), by their BITS-bit digit
    at SHIFT. Every key is counted unmasked (a mask costs a branch per atomic); the ``pad``
    padding keys (copies of ``pkey``) and the keys off the prefix land in known bins, whose
    counts are subtracted after."""
    BINS: tl.constexpr = 1 << BITS
    b = tl.arange(0, BINS)[:, None]
    if SHIFT + BITS == 32:  # no prefix yet
        digit = ukey >> SHIFT
        junk = tl.where(b == (pkey >> SHIFT)[None, :], pad[None, :], 0)
    else:  # keys off the prefix fall outside [0, BINS): the last bin holds them
        digit = tl.minimum((ukey - _col(uprefix, ROWS)) >> SHIFT, BINS - 1)
        on = (pkey >> (SHIFT + BITS)) == (uprefix >> (SHIFT + BITS))  # padding on it
        pbin = tl.where(on, (pkey >> SHIFT) & (BINS - 1), BINS - 1)
        junk = tl.where(b == BINS - 1, (n_valid - count)[None, :], 0) \
            + tl.where(b == pbin[None, :], pad[None, :], 0)
    return _histogram(digit.to(tl.int32), None, ROWS, BLOCK, BINS) - junk


@triton.jit
def _byte_twice(v, BYTE: tl.constexpr):
    """(b << 8) | b for the byte b of v at BYTE (0 = lowest), uint32: one PRMT on sm_90."""
    if INTERPRETED:
        b = (v >> (8 * BYTE)) & 0xFF
        w = (b << 8) | b
    else:
        w = tl.inline_asm_elementwise(f"prmt.b32 $0, $1, 0, {0x4400 + BYTE * 0x11};", "=r,r",
                                      [v], dtype=tl.uint32, is_pure=True, pack=1)
    return w


@triton.jit
def _pass_wide(ukey, uprefix, count, n_valid, pad, pkey, ROWS: tl.constexpr,
               BLOCK: tl.constexpr, SHIFT: tl.constexpr, J: tl.constexpr):
    """_pass by the 8-bit digit at SHIFT, on T = 256 / J threads (J = 4 or 8), as J
    (ROWS, T) histograms h0 ... h(J-1), hj[r, t] counting row r's digit J t + j (J = 4:
    h4 ... h7 are 0). tl.histogram's bins are permuted (digit d in bin (d % J) * T + d / J)
    so that its layout puts digits J t to J t + J - 1 on thread t, which _pick_wide then
    scans in registers; in tl.histogram's order (digit d on thread d % T) the scans and sums
    of _pick took 8 to 16 SASS per element (bf16 56 x 56 to 28 x 28). The permutation costs
    a PRMT per key or none: the digit twice, shifted and masked as the digit alone was."""
    T: tl.constexpr = 256 // J
    r = tl.arange(0, ROWS)[:, None]
    if SHIFT == 24:  # no prefix yet
        twice = _byte_twice(ukey, 3)
    else:  # keys off the prefix clamped to digit 255: the last bin holds them
        twice = _byte_twice(tl.minimum(ukey - _col(uprefix, ROWS), (1 << (SHIFT + 8)) - 1),
                            SHIFT // 8)
    shift: tl.constexpr = 2 if J == 4 else 3
    flat = tl.reshape(((twice >> shift) & 0xFF).to(tl.int32) + r * 256, [ROWS * BLOCK])
    h = tl.histogram(flat, ROWS * 256)
    # tl.split splits the last axis, in registers: the bin's bits of j from the top
    if J == 4:  # [r, j1, j0, t] -> [r, t, j0, j1]
        h = tl.permute(tl.reshape(h, [ROWS, 2, 2, T]), [0, 3, 2, 1])
        h0, h1, h2, h3 = _split4(h)
        h4 = tl.zeros_like(h0)
        h5, h6, h7 = h4, h4, h4
    else:  # [r, j2, j1, j0, t] -> [r, t, j0, j1, j2]
        h = tl.permute(tl.reshape(h, [ROWS, 2, 2, 2, T]), [0, 4, 3, 2, 1])
        lo, hi = tl.split(h)
        h0, h1, h2, h3 = _split4(lo)
        h4, h5, h6, h7 = _split4(hi)
    # the padding and the keys off the prefix, in known bins, taken out
    if SHIFT == 24:
        pbin = (pkey >> SHIFT).to(tl.int32)[:, None]
        off = tl.zeros_like(pbin)
    else:
        on = (pkey >> (SHIFT + 8)) == (uprefix >> (SHIFT + 8))  # the padding on the prefix
        pbin = tl.where(on, (pkey >> SHIFT) & 0xFF, 0xFF).to(tl.int32)[:, None]
        off = (n_valid - count)[:, None]
    # digit - J t: j on the thread whose bin holds it
    j = pbin - tl.arange(0, T)[None, :] * J
    pd = pad[:, None]
    h0 -= tl.where(j == 0, pd, 0)
    h1 -= tl.where(j == 1, pd, 0)
    h2 -= tl.where(j == 2, pd, 0)
    h3 -= tl.where(j == 3, pd, 0)
    if J == 8:
        h4 -= tl.where(j == 4, pd, 0)
        h5 -= tl.where(j == 5, pd, 0)
        h6 -= tl.where(j == 6, pd, 0)
        h7 -= tl.where(j == 7, pd, 0)
        h7 -= tl.where(tl.arange(0, T)[None, :] == T - 1, off, 0)
    else:
        h3 -= tl.where(tl.arange(0, T)[None, :] == T - 1, off, 0)
    return h0, h1, h2, h3, h4, h5, h6, h7


@triton.jit
def _split4(h):
    """(..., 2, 2) -> its four (...) parts, [..., j0, j1] in the order of j = 2 j1 + j0."""
    h01, h23 = tl.split(h)
    h0, h1 = tl.split(h01)
    h2, h3 = tl.split(h23)
    return h0, h1, h2, h3


@triton.jit
def _pick_wide(h0, h1, h2, h3, h4, h5, h6, h7, k, total, J: tl.constexpr):
    """_pick of _pass_wide's histograms, ``total`` (ROWS,) keys in them (at most 4096): a
    scan of the threads' sums, then each thread's J bins in registers."""
    T: tl.constexpr = 256 // J
    s = h0 + h1 + h2 + h3
    if J == 8:
        s += h4 + h5 + h6 + h7
    a0 = total[:, None] - tl.cumsum(s, axis=1) + s  # #{digit >= J t}
    a1 = a0 - h0  # #{digit >= J t + 1}
    a2 = a1 - h1
    a3 = a2 - h2
    a4 = a3 - h3
    kc = k[:, None]
    hits = (a0 >= kc).to(tl.int32) + (a1 >= kc).to(tl.int32) + (a2 >= kc).to(tl.int32) \
        + (a3 >= kc).to(tl.int32)
    if J == 8:
        a5 = a4 - h4
        a6 = a5 - h5
        a7 = a6 - h6
        a8 = a7 - h7
        hits += (a4 >= kc).to(tl.int32) + (a5 >= kc).to(tl.int32) \
            + (a6 >= kc).to(tl.int32) + (a7 >= kc).to(tl.int32)
    d = tl.sum(hits, axis=1) - 1  # the a: non-increasing
    # #{digit >= d} and #{digit > d}, 16 bits each, in one sum: d = J t + j on thread t
    j = d[:, None] - tl.arange(0, T)[None, :] * J
    both = tl.where(j == 0, (a0 << 16) | a1, 0) + tl.where(j == 1, (a1 << 16) | a2, 0) \
        + tl.where(j == 2, (a2 << 16) | a3, 0) + tl.where(j == 3, (a3 << 16) | a4, 0)
    if J == 8:
        both += tl.where(j == 4, (a4 << 16) | a5, 0) + tl.where(j == 5, (a5 << 16) | a6, 0) \
            + tl.where(j == 6, (a6 << 16) | a7, 0) + tl.where(j == 7, (a7 << 16) | a8, 0)
    both = tl.sum(both, axis=1)
    above = both & 0xFFFF
    return d, k - above, (both >> 16) - above


@triton.jit
def _digit(ukey, prefix, valid, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit digit at SHIFT of the unsigned keys, and which keys match the prefix
    (the digits above SHIFT found so far)."""
    digit = (ukey >> SHIFT) & ((1 << BITS) - 1)
    if SHIFT + BITS == 32:
        m = valid
    else:  # arithmetic shifts of both sides: equal iff the bits above SHIFT + BITS are
        m = valid & ((ukey >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS))[:, None])
    return digit, m


@triton.jit
def _ukey(v):
    """float_key(v) read as unsigned (its sign bit flipped): b ^ 0x80000000 for a value
    with the sign bit clear, ~b for one with it set (a SHF and a LOP3 on sm_90)."""
    b = v.to(tl.int32, bitcast=True)
    b = tl.where(v != v, 0x7FC00000, b)
    return (b ^ ((b >> 31) | (-2147483647 - 1))).to(tl.uint32, bitcast=True)


@triton.jit
def _low_fill(prefix, SHIFT: tl.constexpr):
    """The signed key of the unsigned digits ``prefix`` found down to bit SHIFT, the bits
    below filled as every key of the dtype has them (KEY_BITS): zeros where the value is
    non-negative or NaN (its key 0x7FC00000), ones where it is negative."""
    key = prefix ^ (-2147483647 - 1)
    if SHIFT > 0:
        key = tl.where(key < 0, key | ((1 << SHIFT) - 1), key)
    return key


@triton.jit
def _select_kernel(x_ptr, act_ptr, st_ptr, msum_ptr, u_ptr, aout_ptr, ws_ptr,
                   alpha, R, C, W, L, k, sN, sC, sH, sW,
                   HAS_ACT: tl.constexpr, U_ACT: tl.constexpr, ALPHA_PTR: tl.constexpr,
                   STATS: tl.constexpr, OS: tl.constexpr,
                   MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                   SINGLE: tl.constexpr, BITS: tl.constexpr, KEY_BITS: tl.constexpr,
                   ROW_LANES: tl.constexpr, ROW_L: tl.constexpr, COUNT_BITS: tl.constexpr,
                   WIDE: tl.constexpr,
                   HW_FLAT: tl.constexpr, UNIT_SW: tl.constexpr, IDX64: tl.constexpr):
    KMAX: tl.constexpr = 2147483647
    KMIN: tl.constexpr = -2147483647 - 1
    rows = (tl.program_id(0).to(tl.int64) if IDX64 else tl.program_id(0)) * ROWS \
        + tl.arange(0, ROWS)  # maps past 2**31 / OS (small maps): in 64 bits, as rows * OS
    live = rows < R
    if U_ACT:  # AttentionDrop's gamma = u < alpha, u and alpha in float32 (SPEC §1, §4)
        u = tl.load(u_ptr + rows, mask=live, other=1.0).to(tl.float32)
        if ALPHA_PTR:  # a 0-dim float32 tensor (traced by torch.compile), else a float
            alpha = tl.load(alpha)
        act = u < alpha
        tl.store(aout_ptr + rows, act.to(tl.int8), mask=live)
        live = live & act
    elif HAS_ACT:
        live = live & (tl.load(act_ptr + rows, mask=live, other=0) != 0)
    if HAS_ACT or U_ACT:  # inactive maps: 0 (outputs are not zero-filled: no extra launch)
        dead = (rows < R) & ~live
        tl.store(st_ptr + rows * OS, 0.0, mask=dead)
        if STATS:
            tl.store(st_ptr + rows * OS + 2, 0.0, mask=dead)
            tl.store(st_ptr + rows * OS + 3, 0.0, mask=dead)
            tl.store(msum_ptr + rows, 0.0, mask=dead)
    if OS == 4:  # the state's scale slot: 0 here (AttentionDrop's plan writes the scale)
        tl.store(st_ptr + rows * OS + 1, 0.0, mask=rows < R)
    base = (rows // C) * sN + (rows % C) * sC
    # any layout: an inactive map is never loaded (masked), a program of them exits here
    if tl.max(live.to(tl.int32), axis=0) > 0:
        kk = tl.zeros([ROWS], tl.int32) + k  # the rank sought among the matching keys
        if SINGLE:  # the rows in registers: read once, the passes on chip
            PASSES: tl.constexpr = (KEY_BITS + BITS - 1) // BITS
            BINS: tl.constexpr = 1 << BITS
            # Padding (past L) reads copies of the row's first unit: no mask for min and max
            # (nor, in _pass, for the histograms); its S is subtracted from the sum.
            first = tl.load(x_ptr + base, mask=live, other=0.0).to(tl.float32)
            v = _load_rows(x_ptr, base, live, W, sH, sW, first, ROW_L, BLOCK, HW_FLAT,
                           UNIT_SW, IDX64, ROW_LANES)
            ukey = _ukey(v)
            pkey = _ukey(first)
            n_valid = tl.where(live, ROW_L, 0)
            pad = BLOCK - n_valid
            count = n_valid  # the valid keys matching the prefix
            uprefix = tl.zeros([ROWS], tl.uint32)  # the digits found so far
            if COUNT_BITS:  # no tl.histogram (HISTOGRAM_BALLOTS): a bit a step
                uprefix = _select_by_bits(ukey, pkey, pad, kk, ROWS, KEY_BITS)
                thr = key_float(_low_fill(uprefix.to(tl.int32, bitcast=True), 32 - KEY_BITS))
            else:
                for i in tl.static_range(PASSES):
                    if WIDE:
                        h0, h1, h2, h3, h4, h5, h6, h7 = _pass_wide(
                            ukey, uprefix, count, n_valid, pad, pkey, ROWS, BLOCK, 24 - 8 * i,
                            WIDE)
                        d, kk, count = _pick_wide(h0, h1, h2, h3, h4, h5, h6, h7, kk, count,
                                                  WIDE)
                    else:
                        d, kk, count = _pick(_pass(ukey, uprefix, count, n_valid, pad, pkey,
                                                   ROWS, BLOCK, BITS, 32 - BITS * (i + 1)),
                                             kk, BINS)
                    uprefix = uprefix | (d.to(tl.uint32, bitcast=True) << (32 - BITS * (i + 1)))
                thr = key_float(_low_fill(uprefix.to(tl.int32, bitcast=True),
                                          32 - BITS * PASSES))
            if STATS:
                kmin = tl.min(ukey, axis=1).to(tl.int32, bitcast=True) ^ KMIN
                kmax = tl.max(ukey, axis=1).to(tl.int32, bitcast=True) ^ KMIN
        else:  # one row: read twice (top digit; then its keys to the workspace)
            prefix = tl.zeros([ROWS], tl.int32)  # the digits found so far, unsigned key bits
            kmin = tl.full([ROWS], KMAX, tl.int32)
            kmax = tl.full([ROWS], KMIN, tl.int32)
            hist = tl.zeros([RADIX, ROWS], tl.int32)
            for p0 in range(0, L, BLOCK):
                v, valid = _load(x_ptr, base, live, p0, L, W, sH, sW, 0.0, BLOCK, HW_FLAT,
                                 IDX64)
                key = float_key(v)
                digit, m = _digit(key ^ KMIN, prefix, valid, 24, 8)
                hist += _histogram(digit, m, ROWS, BLOCK, RADIX)
                if STATS:
                    kmin = tl.minimum(kmin, tl.min(tl.where(valid, key, KMAX), axis=1))
                    kmax = tl.maximum(kmax, tl.max(tl.where(valid, key, KMIN), axis=1))
            d, kk, _ = _pick(hist, kk, RADIX)
            prefix = d << 24
            # the keys whose top digit is d, packed in order at ws[row * L:], n of them
            wbase = rows.to(tl.int64) * L
            n = tl.zeros([ROWS], tl.int32)
            for p0 in range(0, L, BLOCK):
                v, valid = _load(x_ptr, base, live, p0, L, W, sH, sW, 0.0, BLOCK, HW_FLAT,
                                 IDX64)
                key = float_key(v)
                digit, m = _digit(key ^ KMIN, prefix, valid, 24, 8)
                m = m & (digit == d[:, None])
                mi = m.to(tl.int32)
                pos = n[:, None] + tl.cumsum(mi, axis=1) - mi
                tl.store(ws_ptr + wbase[:, None] + pos, key, mask=m)
                n += tl.sum(mi, axis=1)
            tl.debug_barrier()  # the workspace, written by other threads of this program
            q = tl.arange(0, BLOCK)[None, :]
            PASSES8: tl.constexpr = (KEY_BITS + 7) // 8
            for i in tl.static_range(1, PASSES8):  # the lower digits over the candidates only
                hist = tl.zeros([RADIX, ROWS], tl.int32)
                for p0 in range(0, tl.max(n, axis=0), BLOCK):
                    valid = (p0 + q) < n[:, None]
                    key = tl.load(ws_ptr + wbase[:, None] + p0 + q, mask=valid, other=0)
                    digit, m = _digit(key ^ KMIN, prefix, valid, 24 - 8 * i, 8)
                    hist += _histogram(digit, m, ROWS, BLOCK, RADIX)
                d, kk, _ = _pick(hist, kk, RADIX)
                prefix = prefix | (d << (24 - 8 * i))
            thr = key_float(_low_fill(prefix, 32 - 8 * PASSES8))
        tl.store(st_ptr + rows * OS, thr, mask=live)
        if STATS:
            mx = key_float(kmax)
            mn = tl.where(kmax == 0x7FC00000, mx, key_float(kmin))  # a NaN: amin is NaN too
            # msum in float64: every S is a multiple of 2^-24 in [0, 1], so the sum is exact
            # (backend_contract.md) and equal to the reference's in any order.
            r = range_reciprocal(mn, mx)
            if SINGLE and MODE == 0:  # "am": S is 0 or 1, a count (an int32 add a unit, not
                # a float64 one), the padding's taken out
                below = tl.sum((v < _col(thr, ROWS)).to(tl.int32), axis=1)
                msum = (below - tl.where(first < thr, pad, 0)).to(tl.float64)
            elif SINGLE:  # the padding's S subtracted: exact, as both sums are
                s = soft_mask(v, _col(thr, ROWS), _col(mn, ROWS), _col(r, ROWS), MODE)
                spad = soft_mask(first, thr, mn, r, MODE)
                msum = tl.sum(s.to(tl.float64), axis=1) \
                    - pad.to(tl.float64) * spad.to(tl.float64)
            else:
                acc = tl.zeros([ROWS, BLOCK], tl.float64)
                for p0 in range(0, L, BLOCK):
                    v, valid = _load(x_ptr, base, live, p0, L, W, sH, sW, 0.0, BLOCK, HW_FLAT,
                                     IDX64)
                    s = soft_mask(v, thr[:, None], mn[:, None], r[:, None], MODE)
                    acc += tl.where(valid, s, 0.0).to(tl.float64)
                msum = tl.sum(acc, axis=1)
            tl.store(st_ptr + rows * OS + 2, mn, mask=live)
            tl.store(st_ptr + rows * OS + 3, r, mask=live)
            tl.store(msum_ptr + rows, msum, mask=live)


def _select(x4: torch.Tensor, k: int, active=None, mode=None, u=None, alpha=0.0,
            active_out=None):
    """x4: (N, C, H, W), any strides -> (N, C, 1) float32: thr; or, given ``mode``, the
    pair ((N, C, 4) float32: thr, 0 (AttentionDrop's plan writes the scale there:
    reference.attention_state), min, r = range_reciprocal(min, max); (N, C) float64:
    msum).

    The maps are those where ``active`` (N, C) bool, or, given ``u`` (N, C) (any float
    dtype; it takes precedence over ``active``), where u < alpha in float32, written to
    ``active_out`` (N, C) bool; the entries of the other maps are 0. Every entry is written
    by the kernel (no zero fill), but for empty maps (H * W = 0): out NaN, msum
    0, filled here. alpha: a float, or a 0-dim float32 tensor (read on the device).
    Raises ValueError for k outside [1, H * W] (maps not empty) and a mode not in MODES.
    """
    n, c, h, w = x4.shape
    stats = mode is not None
    if stats and mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    out = torch.empty((n, c, 4 if stats else 1), dtype=torch.float32, device=x4.device)
    msum = torch.empty((n, c) if stats else (0,), dtype=torch.float64, device=x4.device)
    result = (out, msum) if stats else out
    rcount, length = n * c, h * w
    if rcount == 0:
        return result
    if length == 0:  # no k-th largest (nor min, max) in an empty map; nothing to sum
        out.fill_(float("nan"))
        msum.zero_()
        if u is not None:
            active_out.copy_(u.to(torch.float32) < alpha)
        return result
    if not 1 <= k <= length:
        raise ValueError(f"k must be in [1, {length}], got {k}")
    if length <= MAX_ROW:
        single, block = True, pow2(length)
        bits = 8 if block >= SMALL_ROW else 4
        # _pass_wide's rows on 1 or 2 warps, J = 8 or 4 bins a thread (the GPU's tiles
        # under the interpreter too: the code tested is the code compiled)
        wide = SMALL_ROW <= block <= 2 * WARP_ELEMENTS
        tile = WARP_ELEMENTS if wide else SELECT_TILE
        rows = max(1, min(tile // block, pow2(rcount), HIST_BINS >> bits))
        ws = x4  # (unused)
    else:
        single, block, rows, bits, wide = False, CHUNK, 1, 8, False
        ws = torch.empty(rcount * length, dtype=torch.int32, device=x4.device)
    nw = max(1, rows * block // WARP_ELEMENTS) if single else warps(block)
    act = x4 if active is None else active.to(torch.bool).contiguous().view(torch.uint8)
    u_act = u is not None
    u = u.contiguous() if u_act else x4  # (x4: an unused pointer)
    aout = active_out.view(torch.uint8) if u_act else x4
    sn, sc, sh, sw = x4.stride()
    if c == 1 or sn == c * sc:  # maps one stride apart (contiguous NCHW): C = 1, a constexpr
        # (Triton's specialisation), so no division per map (with 32 maps a program, each
        # thread divided all 32: 20 SASS per element at 7 x 7)
        c, sn, sc = 1, (sn if c == 1 else sc), 0
    # a lane a row or more (rows of <= 64): not before Triton 3.8, whose layouts do not
    # keep the rows on the lanes through the transpose (bf16 7 x 7 in channels_last: 203
    # SASS per element, 110 without)
    row_lanes = single and rows >= 32 * nw and not HISTOGRAM_BALLOTS
    launch(_select_kernel)[(cdiv(rcount, rows),)](
        x4, act, out, msum if stats else out, u, aout, ws, alpha,
        rcount, c, w, length, int(k), sn, sc, sh, sw,
        HAS_ACT=active is not None, U_ACT=u_act, ALPHA_PTR=isinstance(alpha, torch.Tensor),
        STATS=stats, OS=out.shape[2], MODE=MODES[mode] if stats else 0,
        ROWS=rows, BLOCK=block, SINGLE=single, BITS=bits,
        KEY_BITS=KEY_BITS.get(x4.dtype, 32),
        ROW_LANES=row_lanes, ROW_L=length if single else 0,  # (a kernel per row length)
        COUNT_BITS=single and HISTOGRAM_BALLOTS, WIDE=256 // (32 * nw) if wide else 0,
        HW_FLAT=hw_flat(x4), UNIT_SW=hw_flat(x4) and sw == 1, IDX64=needs_int64(x4, out),
        num_warps=nw)
    return result


@op("kth_largest", lambda v, k: v.new_empty(v.shape[:1], dtype=torch.float32))
def kth_largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """v: (R, L) float32, 1 <= k <= L -> (R,) float32: the k-th largest value of each row."""
    return _select(v.to(torch.float32)[:, None, None, :], k)[:, 0, 0]


@op("map_threshold", lambda x, k: x.new_empty(x.shape[:2], dtype=torch.float32))
def map_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C) float32: the k-th largest value of each map."""
    return _select(x, k)[..., 0]


def attention_stats(x: torch.Tensor, k: int, active: torch.Tensor, mode: str):
    """x: (N, C, H, W), active: (N, C) bool -> (thr, mn, r, msum), each (N, C): float32,
    msum float64 (exact: backend_contract.md); r = 1 / (max - min) rounded up.

    Entries of inactive maps are 0 (the contract leaves them unspecified).
    """
    out, msum = _attention_stats(x, k, active, mode)
    return out[..., 0], out[..., 2], out[..., 3], msum


@op("attention_stats", lambda x, k, active, mode: (
    x.new_empty((*x.shape[:2], 4), dtype=torch.float32),
    x.new_empty(x.shape[:2], dtype=torch.float64)))
def _attention_stats(x: torch.Tensor, k: int, active: torch.Tensor,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, C, 4) float32: thr, 0, mn, r; (N, C) float64: msum) (outputs may not alias)."""
    return _select(x, k, active, mode)


@triton.jit
def _map_state(st_ptr, mp, valid, act, MODE: tl.constexpr,
               ONE_LOAD: tl.constexpr = True):
    """The state of maps mp (G,) (reference.attention_state: thr, scale, mn, r; one 16-byte
    load, also for "am") where valid (None: all), as what a unit's w needs: (thr, mn, r, sc,
    sd). r is 0 where the map is inactive ("sm", "ad": f̂ = 0, S = 1). "am": w = sc where
    x < thr, else sd = (0 if active else 1) * sc (0 * sc, not 0: the reference's S * scale,
    NaN for an infinite scale): two values per map, a compare and a select per unit.
    Nothing is loaded where not valid (no zero fill): those groups store nothing.
    ONE_LOAD=False: a load per field (a (G, 4) tile of long rows G costs registers)."""
    if ONE_LOAD:
        st = tl.load(st_ptr + mp[:, None] * 4 + tl.arange(0, 4)[None, :],
                     mask=None if valid is None else valid[:, None])
        even, odd = tl.split(tl.reshape(st, (st.shape[0], 2, 2)))  # (thr, mn), (sc, r)
        thr, mn = tl.split(even)
        sc, r = tl.split(odd)
    else:
        thr = tl.load(st_ptr + mp * 4, mask=valid)
        sc = tl.load(st_ptr + mp * 4 + 1, mask=valid)
        mn = tl.load(st_ptr + mp * 4 + 2, mask=valid)
        r = tl.load(st_ptr + mp * 4 + 3, mask=valid)
    return thr, mn, tl.where(act, r, 0.0), sc, tl.where(act, 0.0 * sc, sc)


@triton.jit
def _attention_w(xv, thr, mn, r, sc, sd, MODE: tl.constexpr):
    """A unit's multiplier S * scale from its map's ``_map_state``."""
    if MODE == 0:
        w = tl.where(xv < thr, sc, sd)
    else:
        w = soft_mask(xv, thr, mn, r, MODE) * sc
    return w


@triton.jit
def _apply_attention_kernel(t_ptr, x_ptr, o_ptr, st_ptr, act_ptr,
                            OUTER, INNER, C, H, W,
                            t_sN, t_sC, t_sH, t_sW, x_sN, x_sC, x_sH, x_sW,
                            o_sN, o_sC, o_sH, o_sW,
                            MAGW, MODE: tl.constexpr, X_IS_T: tl.constexpr, CL: tl.constexpr,
                            GRID3: tl.constexpr,
                            BO: tl.constexpr, BI: tl.constexpr, IDX64: tl.constexpr,
                            SAME: tl.constexpr):
    """The row tile (channels_last, and NCHW that the flat tile does not take): the maps'
    state (``_map_state``) per row (NCHW), per channel of the tile's one sample (GRID3), or
    per element (channels_last without GRID3)."""
    ov, m, n, c, h, w, map0 = apply_tile(OUTER, INNER, C, H, W, MAGW, CL, GRID3, BO, BI, IDX64)
    t_off = tile_offset(n, c, h, w, t_sN, t_sC, t_sH, t_sW, CL)
    x_off = tile_offset(n, c, h, w, x_sN, x_sC, x_sH, x_sW, CL)
    o_off = out_offset(t_off, n, c, h, w, o_sN, o_sC, o_sH, o_sW, CL, SAME)
    if CL and GRID3:  # one sample: the state per channel, (BI,), for every row
        mp = tl.program_id(2) * C + c
        cv = c < INNER
        act1 = tl.load(act_ptr + mp, mask=cv) != 0
        thr, mn, r, sc, sd = _map_state(st_ptr, mp, cv, act1, MODE, ONE_LOAD=False)
        act = act1[None, :]
        thr, mn, r, sc, sd = thr[None, :], mn[None, :], r[None, :], sc[None, :], sd[None, :]
    elif CL:  # per element, contiguous along c
        mp = tl.reshape(map0[:, None] + c[None, :], (BO * BI,))
        act1 = tl.load(act_ptr + mp, mask=tl.reshape(m, (BO * BI,))) != 0
        thr, mn, r, sc, sd = _map_state(st_ptr, mp, tl.reshape(m, (BO * BI,)), act1, MODE,
                                        ONE_LOAD=False)
        act = tl.reshape(act1, (BO, BI))
        thr, mn, r = tl.reshape(thr, (BO, BI)), tl.reshape(mn, (BO, BI)), tl.reshape(r, (BO, BI))
        sc, sd = tl.reshape(sc, (BO, BI)), tl.reshape(sd, (BO, BI))
    else:  # rows (n, c, h): per row
        act1 = tl.load(act_ptr + map0, mask=ov) != 0
        thr, mn, r, sc, sd = _map_state(st_ptr, map0, ov, act1, MODE)
        act = act1[:, None]
        thr, mn, r, sc, sd = thr[:, None], mn[:, None], r[:, None], sc[:, None], sd[:, None]
    tv = tl.load(t_ptr + t_off, mask=m, other=0.0).to(tl.float32)
    if X_IS_T:
        xv = tv
    else:  # x is read only where the map is active (elsewhere its value is never used)
        xv = tl.load(x_ptr + x_off, mask=m & act).to(tl.float32)
    tl.store(o_ptr + o_off, (tv * _attention_w(xv, thr, mn, r, sc, sd, MODE)).to(
        o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _apply_attention_cl_kernel(t_ptr, x_ptr, o_ptr, st_ptr, act_ptr, HWP, C, W, MAGW,
                               t_sN, t_sH, t_sW, x_sN, x_sH, x_sW, o_sN, o_sH, o_sW,
                               MODE: tl.constexpr, X_IS_T: tl.constexpr, BO: tl.constexpr,
                               BI: tl.constexpr, VEC: tl.constexpr, LANES_FIRST: tl.constexpr,
                               IDX64: tl.constexpr, SAME: tl.constexpr):
    """t, x and out with contiguous channels (channels_last): a (BO positions, BI channels)
    tile of sample program_id(2), as (BO, BI // VEC, VEC), VEC channels a 16-byte vector,
    or as (BI // VEC, BO, VEC) (``LANES_FIRST``).
    The maps' state per channel, once per tile for its BO positions; x read per vector
    where one of its VEC maps is active (DRAM reads whole 32-byte sectors: per element it
    would save no traffic, and cost 16-byte loads)."""
    p = tl.program_id(0) * BO + tl.arange(0, BO)
    h = tl.umulhi(p * 4, MAGW)
    w = p - h * W
    n = tl.program_id(2)
    groups = tl.program_id(1) * BI + tl.arange(0, BI // VEC) * VEC
    if LANES_FIRST:  # (BI // VEC, BO, VEC)
        c = groups[:, None, None] + tl.arange(0, VEC)[None, None, :]
    else:  # (BO, BI // VEC, VEC)
        c = groups[None, :, None] + tl.arange(0, VEC)[None, None, :]
    if IDX64:
        n = n.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
        c = c.to(tl.int64)
    cv = c < C
    mp = n * C + c
    act = tl.load(act_ptr + mp, mask=cv) != 0
    # the state (thr, scale, mn, r) of each channel's map: a 16-byte load (as _map_state)
    st = tl.load(st_ptr + mp[:, :, :, None] * 4 + tl.arange(0, 4)[None, None, None, :],
                 mask=cv[:, :, :, None])
    even, odd = tl.split(tl.reshape(st, (c.shape[0], c.shape[1], VEC, 2, 2)))
    thr, mn = tl.split(even)  # (thr, mn), (sc, r)
    sc, r = tl.split(odd)
    r = tl.where(act, r, 0.0)
    sd = tl.where(act, 0.0 * sc, sc)
    t_off = _on_axis(n * t_sN + h * t_sH + w * t_sW, not LANES_FIRST) + c
    m = _on_axis(p < HWP, not LANES_FIRST) & cv
    tv = tl.load(t_ptr + t_off, mask=m).to(tl.float32)
    if X_IS_T:
        xv = tv
    else:
        live = tl.max(act.to(tl.int32), axis=2)[:, :, None] != 0  # a flag per vector
        x_off = _on_axis(n * x_sN + h * x_sH + w * x_sW, not LANES_FIRST) + c
        xv = tl.load(x_ptr + x_off, mask=m & live).to(tl.float32)
    if SAME:
        o_off = t_off
    else:
        o_off = _on_axis(n * o_sN + h * o_sH + w * o_sW, not LANES_FIRST) + c
    tl.store(o_ptr + o_off, (tv * _attention_w(xv, thr, mn, r, sc, sd, MODE)).to(
        o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _on_axis(v, FIRST: tl.constexpr):
    """A vector against a tile of three axes whose last is the vectors': v along the
    first axis (FIRST) or the second."""
    if FIRST:
        out = v[:, None, None]
    else:
        out = v[None, :, None]
    return out


@triton.jit
def _per_group(v, U: tl.constexpr, LANES_FIRST: tl.constexpr):
    """A per-group value (groups,) against map_tile's element tile."""
    if U == 1:
        out = v[:, None]
    else:
        out = _on_axis(v, LANES_FIRST)
    return out


@triton.jit
def _of_map(wrap, v1, v0, U: tl.constexpr, LANES_FIRST: tl.constexpr):
    """Per element, the next map's value v1 where wrap, else its group's map's v0."""
    return tl.where(wrap, _per_group(v1, U, LANES_FIRST), _per_group(v0, U, LANES_FIRST))


@triton.jit
def _load_f32(ptr, e, m, live, BLOCK: tl.constexpr, V: tl.constexpr, U: tl.constexpr,
              LANES_FIRST: tl.constexpr, IDX64: tl.constexpr, WORDS: tl.constexpr):
    """ptr[e] as float32 where m, (e, m) from ``map_tile``; live (groups,): the groups to
    read (None: all). WORDS (U > 1, bfloat16 starting on 4 bytes): read as int32 words,
    each unpacked in one instruction per element, the low element w << 16, the high one
    w & 0xffff0000 (a bfloat16 is the high half of its float32); Triton's conversion of a
    high half takes two (PRMT, IMAD.U32)."""
    if live is not None:
        m = m & _per_group(live, U, LANES_FIRST)
    if WORDS:  # m is per group: the words' mask too
        start = (tl.program_id(0).to(tl.int64) if IDX64 else tl.program_id(0)) * (BLOCK // 2)
        # the words of e, in e's layout
        ew = tile_offsets(start, BLOCK // 2, V // 2, U, LANES_FIRST)
        w = tl.load(ptr.to(tl.pointer_type(tl.int32)) + ew, mask=m)
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
        v = tl.reshape(tl.join(lo, hi), e.shape)
    else:
        v = tl.load(ptr + e, mask=m).to(tl.float32)
    return v


@triton.jit
def _apply_attention_flat_kernel(t_ptr, x_ptr, o_ptr, st_ptr, act_ptr,
                                 TOTAL, HW, MAG1, HW_M, HW_S, NC,
                                 MODE: tl.constexpr, X_IS_T: tl.constexpr,
                                 ONE_MAP: tl.constexpr, G: tl.constexpr, BIG1: tl.constexpr,
                                 BLOCK: tl.constexpr, V: tl.constexpr, EVEN: tl.constexpr,
                                 IDX64: tl.constexpr, U: tl.constexpr,
                                 LANES_FIRST: tl.constexpr, WORDS: tl.constexpr):
    """Contiguous NCHW t, x and out: groups of U * V elements (``_common.map_tile``: the
    map index n * C + c is all the state needs, no sample or channel), U * V <= HW + 1 so
    that a group spans at most one map end. Per group the state of its map (``_map_state``:
    its activity byte and one 16-byte load) and, unless ONE_MAP (HW a multiple of V: no
    group spans a map end), of the next one; per element (per G elements where HW is a
    multiple of G = 4), which of the two. U = 4 (a thread's four vectors, one group: the
    index and state work shared) where groups of V would span map ends, and each group lies
    in one sample (C * HW a multiple of 4 V): one scale, scale[n] in every map's state, not
    selected; there bfloat16 t and x load as words (WORDS, ``_load_f32``) in "sm" and
    "ad" (in "am", whose x only meets a compare, LLVM then packs the per-element predicates
    into integers: 17.1 SASS per element against 12.8)."""
    e, m, mp0, dmp, pos = map_tile(TOTAL, HW, MAG1, HW_M, HW_S, BIG1, BLOCK, V, IDX64, EVEN, U,
                                   LANES_FIRST)
    # groups past the end (the last tile's, unless EVEN) store nothing: the last map's
    # state stands in for theirs (no masked loads, no zero fill)
    mp = mp0 + dmp if EVEN else tl.minimum(mp0 + dmp, NC - 1)
    act0 = tl.load(act_ptr + mp) != 0
    thr0, mn0, r0, sc0, sd0 = _map_state(st_ptr, mp, None, act0, MODE)
    if ONE_MAP:  # the next map's state is never taken: this map's, the selects fold
        act1, thr1, mn1, r1, sc1, sd1 = act0, thr0, mn0, r0, sc0, sd0
        wrap = tl.zeros(e.shape, tl.int1)
    else:
        # the next map, where the group reaches it (not past the last map)
        v1 = (mp + 1 < NC) & (pos > HW - U * V)
        act1 = tl.load(act_ptr + mp + 1, mask=v1, other=0) != 0
        thr1, mn1, r1, sc1, sd1 = _map_state(st_ptr, mp + 1, v1, act1, MODE)
        # HW - pos is a multiple of G (HW is): element j takes its group of G's map, the
        # same compare and selects for the G elements of a group (folded into one)
        j = tile_offsets(0, U * V, V, U, LANES_FIRST)  # a group's elements, in e's layout
        wrap = j // G * G >= _per_group(HW - pos, U, LANES_FIRST)
    if U == 1:
        sc = _of_map(wrap, sc1, sc0, U, LANES_FIRST)
    else:  # the group lies in one sample (C * HW % (U * V) == 0): one scale
        sc = _per_group(sc0, U, LANES_FIRST)
    tv = _load_f32(t_ptr, e, m, None, BLOCK, V, U, LANES_FIRST, IDX64, WORDS)
    if X_IS_T:
        xv = tv
    else:  # x is read only where the group's maps are active (per group: 16-byte vectors);
        # elsewhere its value is never used (r = 0 or sd = sc: w = sc): no zero fill
        xv = _load_f32(x_ptr, e, m, act0 | act1, BLOCK, V, U, LANES_FIRST, IDX64,
                       WORDS)
    if MODE == 1:  # "sm" has no threshold
        thr = 0.0
    else:
        thr = _of_map(wrap, thr1, thr0, U, LANES_FIRST)
    if MODE == 0 and U > 1:  # S where active, else 1: max(S, 1 - active), no predicate
        # per unit held across the group's 32 (the selects of sd did: P2R and back)
        off0, off1 = (~act0).to(tl.float32), (~act1).to(tl.float32)
        off = _of_map(wrap, off1, off0, U, LANES_FIRST)
        w = tl.maximum(_below(xv, thr), off) * sc
    elif MODE == 0:
        sd = _of_map(wrap, sd1, sd0, U, LANES_FIRST)
        w = _attention_w(xv, thr, 0.0, 0.0, sc, sd, MODE)
    else:
        mn = _of_map(wrap, mn1, mn0, U, LANES_FIRST)
        r = _of_map(wrap, r1, r0, U, LANES_FIRST)
        w = _attention_w(xv, thr, mn, r, sc, sc, MODE)
    tl.store(o_ptr + e, (tv * w).to(o_ptr.dtype.element_ty), mask=m)


@op("apply_attention", fake_like)
def apply_attention(t: torch.Tensor, x: torch.Tensor, state: torch.Tensor,
                    active: torch.Tensor, mode: str) -> torch.Tensor:
    """t * (S * scale[n]) where active, t * scale[n] elsewhere; S from x (SPEC §4).

    t, x: (N, C, H, W) (any strides, not necessarily alike); state: (N, C, 4) float32,
    reference.attention_state (thr, scale[n], mn, r); active: (N, C) bool.
    Raises ValueError for other shapes or an unknown mode (the kernels index by them).
    """
    n, c, h, w = t.shape
    if x.shape != t.shape or state.shape != (n, c, 4) or active.shape != (n, c):
        raise ValueError(f"apply_attention: x {tuple(x.shape)}, state {tuple(state.shape)} "
                         f"and active {tuple(active.shape)} must be {tuple(t.shape)}, "
                         f"{(n, c, 4)} and {(n, c)}")
    if mode not in MODES:
        raise ValueError(f"apply_attention: mode must be one of {sorted(MODES)}, got {mode!r}")
    out = out_like(t)
    if out.numel() == 0:
        return out
    state = state.to(torch.float32).contiguous()
    act = active.to(torch.bool).contiguous().view(torch.uint8)
    x_is_t = t is x  # the forward (t = x); traceable, unlike data_ptr
    v = 16 // t.element_size()
    flat = flat_launch(t, out, x) if h * w >= v - 1 else None
    if flat is not None:
        grid, meta = flat
        meta["IDX64"] |= needs_int64(state)  # 4 floats a map: past x's size at 1 x 3 maps
        vv = min(v, meta["BLOCK"])
        one_map = h * w % vv == 0
        quads = h * w >= 4 * vv and c * h * w % (4 * vv) == 0 and meta["BLOCK"] >= 4 * vv
        u = 4 if quads and not one_map else 1
        # int32 words: t and x bfloat16 on 4-byte boundaries (a word load of a 2-byte
        # aligned address faults on a GPU)
        words = (u > 1 and mode != "am" and t.dtype == x.dtype == torch.bfloat16
                 and aligned(t, 4) and aligned(x, 4))
        for k in ("C", "MAG2", "C_M", "C_S", "BIG2"):  # no sample or channel needed
            del meta[k]
        launch(_apply_attention_flat_kernel)[grid](
            t, x, out, state, act, out.numel(), NC=n * c, MODE=MODES[mode],
            X_IS_T=x_is_t, ONE_MAP=one_map,
            G=4 if h * w % 4 == 0 else 1, V=vv, U=u, LANES_FIRST=LANES_FIRST, WORDS=words,
            **meta)
        return out
    if all(walk_channels_last(a) for a in (t, x, out)) and n <= 65535 and h * w * w <= 2**30:
        bi = min(pow2(c), CL_CHANNELS)
        bo = max(1, min(CL_TILE // bi, pow2(h * w)))
        launch(_apply_attention_cl_kernel)[(cdiv(h * w, bo), cdiv(c, bi), n)](
            t, x, out, state, act, h * w, c, w, -(-2**30 // w), t.stride(0), *t.stride()[2:],
            x.stride(0), *x.stride()[2:], out.stride(0), *out.stride()[2:], MODE=MODES[mode],
            X_IS_T=x_is_t, BO=bo, BI=bi, VEC=min(v, bi), LANES_FIRST=LANES_FIRST,
            num_warps=max(1, bo * bi // (32 * CL_PER_THREAD)),
            **apply_flags(t, out, x, state))
        return out
    grid, outer, inner, meta = apply_launch(t, out, x, state)
    launch(_apply_attention_kernel)[grid](
        t, x, out, state, act, outer, inner, c, h, w,
        *t.stride(), *x.stride(), *out.stride(), MODE=MODES[mode], X_IS_T=x_is_t, **meta)
    return out


__all__ = ["kth_largest", "map_threshold", "attention_stats", "apply_attention"]
