"""Pooled Gram-matrix correlation (CorrDrop, SPEC §2 step 2).

F[n, i] = (1/N') sum_j |â_i · â_j − δ_ij|, â_i the L2-normalised channel vector of pooled
position i (k x k average pooling, ceil mode: a window cut by the border averages its
valid units). Two kernels, one pass over x, the N' x N' matrix never leaves the chip:

1. ``_pool_kernel``, grid (N, H', W'-blocks): a program sums the k x k windows of one
   row of pooled positions (of every row of the sample under the interpreter), for a
   chunk of channels at a time (a (channels x windows x window-columns) tile, contiguous
   along w for NCHW and along c for channels_last),
   writes the pooled rows a (N, N', C) float32 (x.numel() / k² values: small, L2-resident
   for the usual k = 7) and their norms (N, N').
2. ``_corr_kernel``, grid (N, N'-blocks of BM rows): loops over blocks of BN columns, and
   over channel chunks accumulates Â_I Â_Jᵀ with ``tl.dot`` (IEEE float32), then adds the
   row sums of |G − I| of that tile (the diagonal set exactly). Any N' (tiles of 16..64
   rows, loops beyond).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TILE, cdiv, launch, needs_int64, op, pow2, warps


@triton.jit
def _pool_kernel(x_ptr, a_ptr, nrm_ptr, C, H, W, HP, WP, NP, k, PH_PER, sN, sC, sH, sW,
                 BC: tl.constexpr, BWP: tl.constexpr, KP: tl.constexpr, IDX64: tl.constexpr):
    n = tl.program_id(0)
    pw = tl.program_id(2) * BWP + tl.arange(0, BWP)
    pwv = pw < WP
    dx = tl.arange(0, KP)
    if IDX64:
        n = n.to(tl.int64)
    xb = x_ptr + n * sN
    ph0 = tl.program_id(1) * PH_PER
    for ph in range(ph0, tl.minimum(ph0 + PH_PER, HP)):
        h0 = ph * k
        nrows = tl.minimum(H - h0, k)
        cnt = (nrows * tl.minimum(W - pw * k, k)).to(tl.float32)  # valid units per window
        cnt = tl.where(pwv, cnt, 1.0)
        sq = tl.zeros([BWP], tl.float32)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            cv = cc < C
            acc = tl.zeros([BC, BWP], tl.float32)
            for dy in range(0, nrows):
                roff = (h0 + dy) * sH
                for dx0 in range(0, k, KP):
                    d = dx0 + dx
                    col = pw[:, None] * k + d[None, :]
                    colv = pwv[:, None] & (d < k)[None, :] & (col < W)
                    off = (cc * sC)[:, None, None] + roff + (col * sW)[None, :, :]
                    v = tl.load(xb + off, mask=cv[:, None, None] & colv[None, :, :], other=0.0)
                    acc += tl.sum(v.to(tl.float32), axis=2)
            avg = acc / cnt[None, :]
            rows = n * NP + ph * WP + pw
            tl.store(a_ptr + rows[None, :] * C + cc[:, None], avg,
                     mask=cv[:, None] & pwv[None, :])
            sq += tl.sum(avg * avg, axis=0)
        tl.store(nrm_ptr + n * NP + ph * WP + pw, tl.sqrt_rn(sq), mask=pwv)


@triton.jit
def _corr_kernel(a_ptr, nrm_ptr, f_ptr, C, NP,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IDX64: tl.constexpr):
    n = tl.program_id(0)
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    iv = i < NP
    if IDX64:
        n = n.to(tl.int64)
    ri = tl.load(nrm_ptr + n * NP + i, mask=iv, other=1.0)
    ni = tl.maximum(ri, 1e-12)
    # The diagonal |â_i·â_i − 1| exactly, as the reference: 0 for a unit row, 1 for a zero row.
    d = tl.math.div_rn(tl.minimum(ri, 1e-12), 1e-12)
    diag = 1.0 - d * d
    arow = a_ptr + (n * NP + i) * C
    rowsum = tl.zeros([BM], tl.float32)
    dii = tl.zeros([BM], tl.float32)  # |â_i·â_i| as summed, swapped for diag at the end
    for j0 in range(0, NP, BN):
        j = j0 + tl.arange(0, BN)
        jv = j < NP
        nj = tl.maximum(tl.load(nrm_ptr + n * NP + j, mask=jv, other=1.0), 1e-12)
        brow = a_ptr + (n * NP + j) * C
        acc = tl.zeros([BM, BN], tl.float32)
        for c0 in range(0, C, BK):
            cc = c0 + tl.arange(0, BK)
            cv = cc < C
            ai = tl.load(arow[:, None] + cc[None, :], mask=iv[:, None] & cv[None, :], other=0.0)
            ajt = tl.load(brow[None, :] + cc[:, None], mask=cv[:, None] & jv[None, :], other=0.0)
            ai = tl.math.div_rn(ai, ni[:, None])  # â = a / max(|a|, 1e-12), as the reference
            ajt = tl.math.div_rn(ajt, nj[None, :])
            acc = tl.dot(ai, ajt, acc, input_precision="ieee")
        # Every |â_i·â_j| in the same order for all rows (equal rows -> equal sums), the
        # diagonal term swapped afterwards, as in the reference.
        p = tl.abs(acc)
        rowsum += tl.sum(tl.where(jv[None, :], p, 0.0), axis=1)
        dii += tl.sum(tl.where(i[:, None] == j[None, :], p, 0.0), axis=1)
    tl.store(f_ptr + n * NP + i, (rowsum - dii + diag) / NP, mask=iv)


@op("pooled_correlation")
def pooled_correlation(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> F: (N, ceil(H/k), ceil(W/k)) float32 (SPEC §2 step 2)."""
    n, c, h, w = x.shape
    hp, wp = cdiv(h, k), cdiv(w, k)
    np_ = hp * wp
    f = torch.empty((n, hp, wp), dtype=torch.float32, device=x.device)
    if f.numel() == 0:
        return f
    if c == 0:  # zero rows: P = I, F = 1 / N'
        return f.fill_(1.0 / np_)
    dev = x.device
    a = torch.empty((n, np_, c), dtype=torch.float32, device=dev)
    nrm = torch.empty((n, np_), dtype=torch.float32, device=dev)
    kp = min(pow2(k), 256)
    bwp = max(1, min(pow2(wp), 512 // kp))
    bc = max(1, min(pow2(c), TILE // (bwp * kp)))
    idx64 = needs_int64(x, a)
    ph_per = hp if INTERPRET else 1  # a program per pooled row (the interpreter: per sample)
    launch(_pool_kernel)[(n, cdiv(hp, ph_per), cdiv(wp, bwp))](
        x, a, nrm, c, h, w, hp, wp, np_, k, ph_per, *x.stride(),
        BC=bc, BWP=bwp, KP=kp, IDX64=idx64, num_warps=warps(bc * bwp * kp))
    # 64 x 64 Gram tiles on a GPU; the interpreter pays per operation, not per element
    bm = min(256 if INTERPRET else 64, max(16, pow2(np_)))
    bk = min(256 if INTERPRET else 32, max(16, pow2(c)))
    launch(_corr_kernel)[(n, cdiv(np_, bm))](
        a, nrm, f, c, np_, BM=bm, BN=bm, BK=bk, IDX64=idx64, num_warps=4)
    return f


__all__ = ["pooled_correlation"]
