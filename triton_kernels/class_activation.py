"""Class activation map: J[n, h, w] = sum_c alpha[n, c] * x[n, c, h, w] (CamDrop).

Products and sums in float64 (the output float32), so that mathematically equal J (the
same channel terms in another order) are exactly equal: J's top-k decides CamDrop's
candidates (SPEC §1). One pass over x. One grid axis of N x (position blocks) programs; a
program accumulates a (channels x positions) tile over channel chunks and reduces it over the
channels at the end. The tile's contiguous axis follows x's layout (positions for NCHW,
channels for channels_last).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    TILE,
    cdiv,
    hw_flat,
    launch,
    needs_int64,
    op,
    pos_offset,
    pow2,
    walk_channels_last,
    warps,
)


# debug=True compiles the device assertion on the target (Triton drops tl.device_assert
# otherwise; torch.compile's inductor compiles user kernels in debug mode anyway). The
# positions' offsets are pointer additions, which Triton's overflow sanitizer (on in debug
# mode) does not instrument: the per-element work is the same as without debug.
@triton.jit(debug=True)
def _cam_kernel(x_ptr, a_ptr, j_ptr, C, W, L, STEP, Q, TOTAL, sN, sC, sH, sW, a_sN, a_sC,
                w_ptr, t_ptr, ao_ptr, G, K, w_sK, w_sC, t_s,
                BC: tl.constexpr, BP: tl.constexpr, HW_FLAT: tl.constexpr,
                IDX64: tl.constexpr, FROM_W: tl.constexpr, FLAT: tl.constexpr,
                A: tl.constexpr, SHIFT: tl.constexpr):
    """Program n * Q + q: J[n, P0 : P0 + STEP], P0 = q * STEP (STEP = BP unless SHIFT), Q
    programs a sample. One grid axis: axes 1 and 2 hold at most 65535 programs, fewer than
    the position blocks of a map of 4M units (2048 x 2048 in blocks of 64) or the samples of
    a large batch; the quotient is one division per program, not per element.

    FLAT (contiguous NCHW x): channel c's positions start at n * sN + c * L + P0, and its
    row of the tile at that offset rounded down to A elements (16 bytes), s_c before it,
    so that x loads in 16-byte vectors also where L * itemsize is not a multiple of 16
    (14 x 14, 7 x 7 maps). Column t of channel c then holds position P0 + t - s_c; the
    columns outside [s_c, s_c + STEP) or past the map accumulate other positions' (or
    channels') terms, read but never summed into J: no mask per element. SHIFT (L % A !=
    0): the shifts differ between channels, so the columns are realigned once, after the
    channel loop: BC is a multiple of A, so s_c depends on c % A only and the rows are
    first summed per class c % A (BP >= STEP + A - 1 columns hold every shift)."""
    n = tl.program_id(0) // Q
    q = tl.program_id(0) - n * Q
    P0 = q * STEP
    t = tl.arange(0, BP)
    if IDX64:
        n = n.to(tl.int64)
        P0 = P0.to(tl.int64)
    cnt = tl.minimum(L - P0, STEP)  # positions of this program
    if FLAT:
        rows0 = n * sN + tl.arange(0, BC) * L + P0  # chunk c0 adds c0 * L
        shift = rows0 % A  # A is a power of 2: a mask, not a division
        start0 = rows0 - shift
    else:
        p = P0 + t
        poff = pos_offset(p, W, sH, sW, HW_FLAT)
    if FROM_W:  # CamDrop's plan: alpha = weight[target[n]] averaged per channel, here
        # target read by value whatever its integer dtype (uint8 is an index, not a
        # mask); SPEC §6 step 0 checked here, the first CamDrop kernel (no host sync, no
        # extra launch), and the row clamped so that no read goes out of bounds.
        y = tl.load(t_ptr + n.to(tl.int64) * t_s).to(tl.int64)
        tl.device_assert((y >= 0) & (y < K), "target must hold class indices in [0, K)")
        wrow = tl.minimum(tl.maximum(y, 0), K - 1) * w_sK
    acc = tl.zeros([BC, BP], tl.float64)
    x_n = x_ptr + n * sN
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cv = cc < C
        if FROM_W:
            al = _alpha(w_ptr, wrow, cc, cv, G, w_sC, BC)
            if q == 0:
                tl.store(ao_ptr + n * C + cc, al, mask=cv)
        else:
            al = tl.load(a_ptr + n * a_sN + cc * a_sC, mask=cv, other=0.0)
        if FLAT:
            first = c0 * L
            if IDX64:
                first = c0.to(tl.int64) * L
            start = tl.multiple_of(start0 + first, A)
            # in bounds only: a constant over each aligned group of A when TOTAL is a
            # multiple of 16 (Triton's specialisation), so the loads stay 16-byte vectors.
            # Offsets as pointer additions: not instrumented by the overflow sanitizer.
            m = cv[:, None] & (t[None, :] < (TOTAL - start)[:, None])
            v = tl.load((x_ptr + start)[:, None] + t[None, :], mask=m, other=0.0)
            v = v.to(tl.float32)
        else:
            ptrs = x_n + (cc * sC)[:, None] + poff[None, :]
            v = tl.load(ptrs, mask=cv[:, None] & (p < L)[None, :], other=0.0).to(tl.float32)
        acc += al.to(tl.float64)[:, None] * v.to(tl.float64)
    if SHIFT:  # column t + s_c of class c % A holds position P0 + t
        part = tl.sum(tl.reshape(acc, (BC // A, A, BP)), axis=0)
        cls = tl.max(tl.reshape(shift, (BC // A, A)), axis=0)  # every row of a class alike
        idx = tl.minimum(t[None, :] + cls[:, None], BP - 1).to(tl.int32)
        j = tl.sum(tl.gather(part, idx, axis=1), axis=0)
    else:
        j = tl.sum(acc, axis=0)
    tl.store(j_ptr + n * L + P0 + t, j.to(tl.float32), mask=t < cnt)


@triton.jit
def _alpha(w_ptr, wrow, cc, cv, G, w_sC, BC: tl.constexpr):
    """(BC,) float32: the mean of weight[row, c*G .. c*G + G-1], each rounded to float32,
    summed and divided in float64 and then rounded, as ``layers.camdrop``'s reference (the
    same value in any order of summation)."""
    col = (cc * G).to(tl.int64)
    s = tl.zeros([BC], tl.float64)
    for t in range(0, G):
        s += tl.load(w_ptr + wrow + (col + t) * w_sC, mask=cv, other=0.0).to(tl.float32).to(
            tl.float64)
    return (s / G).to(tl.float32)


@op("cam", lambda x, alpha: x.new_empty(x.shape[:1] + x.shape[2:], dtype=torch.float32))
def cam(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W), alpha: (N, C) float32 -> J: (N, H, W) float32."""
    out = torch.zeros(x.shape[:1] + x.shape[2:], dtype=torch.float32, device=x.device)
    if out.numel() == 0 or x.shape[1] == 0:
        return out
    cam_launch(x, out, alpha.to(torch.float32))
    return out


# Position blocks a map is split into (blocks of at least 64 positions, tiles of TILE
# elements where the channels allow): with one program a sample, a (128, 1024, 14, 14) or
# (128, 256, 28, 28) x took 128 programs of 4 warps, each looping over every channel, far
# too few to keep a GPU's memory busy. From the map only, not N: the tiles of a streaming
# kernel do not depend on N.
MAP_SPLIT = 8


def cam_launch(x, out, alpha=None, weight=None, target=None, alpha_out=None):
    """J of x (N, C, H, W) into out (N, H, W) float32, C >= 1: from alpha (N, C) float32,
    or (CamDrop's plan) from alpha = weight[target].view(N, C, -1).mean(2), which is then
    also written to alpha_out (N, C) float32. target: (N,) of any integer dtype and
    stride; an index outside [0, K) fails the kernel's device assertion (on a GPU; the
    interpreter skips it) and reads row 0 or K - 1, never out of bounds."""
    n, c, h, w = x.shape
    length = h * w
    flat = x.is_contiguous()
    # 16 bytes of x; no data_ptr() here (FakeTensors under torch.compile): where x itself
    # is not 16-byte aligned the loads are narrower, the result the same
    a = 16 // x.element_size() if flat else 1
    shift = length % a != 0
    if walk_channels_last(x):
        bc = min(pow2(c), 64)
        bp = max(1, min(TILE // bc, pow2(length)))
    else:  # NCHW; with shift, columns for every shift of a row start, BC a multiple of A
        full = pow2(length + a - 1) if shift else pow2(length)
        bp = min(full, TILE // a if shift else max(1, TILE // 4),
                 max(full // MAP_SPLIT, 64, TILE // pow2(c)))
        bc = max(a if shift else 1, min(TILE // bp, pow2(c)))
    step = min(length, bp - a + 1) if shift else bp
    # 4 warps, 32 elements per thread, over which the per-chunk work (the alpha of each
    # channel, from W in CamDrop's plan; in contiguous x the rows' starts) is spread: with 8
    # warps, channels_last bf16 cost 19.1-20.4 SASS per element on sm_90, with 4 10.5-12.1
    nw = min(4, warps(bc * bp))
    from_w = weight is not None
    if from_w:
        # target read at its stride (sliced or expanded: no copy, no launch)
        a_args = (weight, 0, 0, weight, target, alpha_out, weight.shape[1] // c,
                  weight.shape[0], *weight.stride(), target.stride(0))
    else:
        a_args = (alpha, *alpha.stride(), alpha, alpha, alpha, 1, 1, 0, 0, 0)
    q = cdiv(length, step)
    launch(_cam_kernel)[(n * q,)](
        x, a_args[0], out, c, w, length, step, q, x.numel(), *x.stride(), *a_args[1:],
        BC=bc, BP=bp, HW_FLAT=hw_flat(x), IDX64=needs_int64(x), FROM_W=from_w,
        FLAT=flat, A=a, SHIFT=shift, num_warps=nw)


__all__ = ["cam"]
