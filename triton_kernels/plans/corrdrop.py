"""CorrDrop's plan on Triton (``layers.corrdrop``, SPEC §2) in 2 launches.

1. statistics (``pooled_correlation._pooled_correlation_kernel``): F (N, N') float32, the
   pooling and the correlation of a sample in one program;
2. plan (``_corrdrop_plan_kernel``, one program over the batch): per sample, kappa from F's
   min and max, M = u0 < kappa, z = #not M, p_hat = min(1, p_blocks / max(z, 1)),
   keep = M | (u1 < 1 - p_hat) (p_hat and 1 - p_hat in float64), the kept units (border
   blocks cut) and the scale of ``normalize`` in float64: the reference's float32 / float64
   operations in its order, so S and the scale are bit for bit the torch code's on the
   same F.

The apply (``apply_block``) is the third launch; with ``noise=None`` the uniforms are one
more (``torch.rand``, as the reference draws them). p_blocks is a runtime argument, a
float64: its bits as two int32 in eager mode (a python float argument is a float32, and
torch 2.11's inductor refuses int arguments past int32), a 0-dim float64 tensor while
torch.compile traces.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from guidedrop.layers import Plan, rand, rate64
from guidedrop.reference import blocks_dropped, one_window, pooled_size

from .._common import launch, mask_buffer, op, pow2
from ..block_mask import NORMALIZE
from ..pooled_correlation import _pooled_correlation_launch


@triton.jit(do_not_specialize=["p_blocks", "p_low"])  # a rate: never a specialisation key
def _corrdrop_plan_kernel(f_ptr, u_ptr, keep_ptr, sc_ptr, p_blocks, p_low, N, HP, WP, H, W, k,
                          units, su0, suN, suH, suW, P_PTR: tl.constexpr, NORM: tl.constexpr,
                          BN: tl.constexpr, BP: tl.constexpr):
    # BN samples x BP pooled positions per tile; a sample longer than BP is read in chunks,
    # three passes: (min, max, NaN of F), z, then keep and the kept units.
    if P_PTR:
        p_blocks = tl.load(p_blocks)
    else:  # a float64's high and low 32 bits
        bits = (p_blocks.to(tl.int64) << 32) | (p_low.to(tl.int64) & 0xFFFFFFFF)
        p_blocks = bits.to(tl.float64, bitcast=True)
    NP = HP * WP
    total = tl.zeros([BN], tl.int64)  # kept units of the tile's rows over the batch
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        nv = n < N
        fmin = tl.full([BN], float("inf"), tl.float32)
        fmax = tl.full([BN], float("-inf"), tl.float32)
        nan = tl.zeros([BN], tl.int32)
        for i0 in range(0, NP, BP):
            i = i0 + tl.arange(0, BP)
            m = nv[:, None] & (i < NP)[None, :]
            f = tl.load(f_ptr + n[:, None] * NP + i[None, :], mask=m, other=0.0)
            fmin = tl.minimum(fmin, tl.min(tl.where(m & (f == f), f, float("inf")), axis=1))
            fmax = tl.maximum(fmax, tl.max(tl.where(m & (f == f), f, float("-inf")), axis=1))
            nan = tl.maximum(nan, tl.max(tl.where(m & (f != f), 1, 0), axis=1))
        # torch's amin / amax are NaN with a NaN F, then range > 0 is false: kappa = 0.
        ok = (fmax - fmin > 0) & (nan == 0)
        rng = tl.where(ok, fmax - fmin, 1.0)
        z = tl.zeros([BN], tl.int32)
        for i0 in range(0, NP, BP):
            i = i0 + tl.arange(0, BP)
            m = nv[:, None] & (i < NP)[None, :]
            f = tl.load(f_ptr + n[:, None] * NP + i[None, :], mask=m, other=0.0)
            uoff = n[:, None] * suN + ((i // WP) * suH + (i % WP) * suW)[None, :]
            u0 = tl.load(u_ptr + uoff, mask=m, other=0.0).to(tl.float32)
            kappa = tl.where(ok[:, None],
                             tl.math.div_rn(f - fmin[:, None], rng[:, None]), 0.0)
            z += tl.sum(tl.where(m & ~(u0 < kappa), 1, 0), axis=1)
        # (ones * p_blocks) / clamp_min(z, 1), clamped to 1, and 1 - p_hat: float64, as
        # the reference, so that q is rounded to float32 once
        p_hat = (tl.zeros([BN], tl.float64) + p_blocks) / tl.maximum(z, 1).to(tl.float64)
        q = (1.0 - tl.minimum(p_hat, 1.0, propagate_nan=tl.PropagateNan.ALL)).to(tl.float32)
        kept = tl.zeros([BN], tl.int64)
        for i0 in range(0, NP, BP):
            i = i0 + tl.arange(0, BP)
            m = nv[:, None] & (i < NP)[None, :]
            f = tl.load(f_ptr + n[:, None] * NP + i[None, :], mask=m, other=0.0)
            hi, wi = i // WP, i % WP
            uoff = n[:, None] * suN + (hi * suH + wi * suW)[None, :]
            u0 = tl.load(u_ptr + uoff, mask=m, other=0.0).to(tl.float32)
            u1 = tl.load(u_ptr + su0 + uoff, mask=m, other=0.0).to(tl.float32)
            kappa = tl.where(ok[:, None],
                             tl.math.div_rn(f - fmin[:, None], rng[:, None]), 0.0)
            keep = (u0 < kappa) | (u1 < q[:, None])
            tl.store(keep_ptr + n[:, None] * NP + i[None, :], keep.to(tl.uint8), mask=m)
            # units of each pooled block: border blocks are cut
            area = (tl.minimum(H - hi.to(tl.int64) * k, k) *
                    tl.minimum(W - wi.to(tl.int64) * k, k))
            kept += tl.sum(tl.where(m & keep, area[None, :], 0), axis=1)
        if NORM == 0:
            tl.store(sc_ptr + n, tl.full([BN], 1.0, tl.float32), mask=nv)
        elif NORM == 1:
            # units / kept in torch is reciprocal(kept) * units, in float64 (tl.cast, not
            # .to: Triton makes an int argument of 1, one unit, a constant)
            kd = tl.where(kept > 0, kept.to(tl.float64), 1.0)
            sc = tl.where(kept > 0, (1.0 / kd) * tl.cast(units, tl.float64), 0.0)
            tl.store(sc_ptr + n, sc.to(tl.float32), mask=nv)
        else:
            total += kept
    if NORM == 2:
        kept_all = tl.sum(total, axis=0)  # exact in float64 below 2**53, as torch's sum
        kd = tl.where(kept_all > 0, kept_all.to(tl.float64), 1.0)
        sc = tl.where(kept_all > 0, (1.0 / kd) * tl.cast(units, tl.float64), 0.0)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            tl.store(sc_ptr + n, tl.zeros([BN], tl.float32) + sc.to(tl.float32), mask=n < N)


@op("corrdrop_plan", lambda x, u, p_blocks, k, normalize: (
    mask_buffer((x.shape[0], *pooled_size(x.shape[2], x.shape[3], k)), x.device),
    x.new_empty(x.shape[:1], dtype=torch.float32)))
def _plan(x: torch.Tensor, u: torch.Tensor, p_blocks: torch.Tensor, k: int,
          normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (N, H', W') uint8, scale (N,) float32) of x with block extent k <= max(H, W)."""
    n, c, h, w = x.shape
    hp, wp = pooled_size(h, w, k)
    f = torch.empty((n, hp * wp), dtype=torch.float32, device=x.device)
    _pooled_correlation_launch(x, k, f)
    keep = mask_buffer((n, hp, wp), x.device)  # slack: apply_block reads it unmasked
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    bp = min(pow2(hp * wp), 1024)
    bn = max(1, min(pow2(n), 4096 // bp))
    units = h * w * (n if normalize == "batch" else 1)
    p_ptr = isinstance(p_blocks, torch.Tensor)
    # else its float64 bits as two int32
    p_high, p_low = (p_blocks, 0) if p_ptr else struct.unpack(
        "<ii", struct.pack("<d", p_blocks))[::-1]
    launch(_corrdrop_plan_kernel)[(1,)](
        f, u, keep, scale, p_high, p_low, n, hp, wp, h, w, k, units, *u.stride(),
        P_PTR=p_ptr, NORM=NORMALIZE[normalize], BN=bn, BP=bp)
    return keep, scale


def plan_corrdrop(x, p, block_size, *, normalize, noise=None, generator=None):
    """``layers.corrdrop`` fused: the same Plan, bit for bit, in 2 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16, C >= 1 and H, W >= 1 (functional returns
    empty inputs unchanged); noise: (2, N, H', W') of any float dtype (rounded to float32),
    or None: one ``torch.rand`` from ``generator``. Returns Plan("block", (k,), (S, scale)).
    """
    n, c, h, w = x.shape
    k = one_window(block_size, h, w)
    hp, wp = pooled_size(h, w, k)
    u = noise if noise is not None else rand((2, n, hp, wp), generator, x.device)
    # eq. 11 times N' with the real block size, float64 as the reference's. A kernel
    # argument in eager mode; a 0-dim tensor while torch.compile traces, so that a new p
    # is a new input, not a recompile (SPEC §8).
    p_blocks = blocks_dropped(rate64(p, x.device), h, w, block_size)
    keep, scale = _plan(x, u, p_blocks, k, normalize)
    return Plan("block", (k,), (keep, scale))


__all__ = ["plan_corrdrop"]
