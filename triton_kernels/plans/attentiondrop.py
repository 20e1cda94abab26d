"""AttentionDrop's plan on Triton (``layers.attentiondrop``, SPEC §4) in 2 launches.

1. statistics (``percentile_threshold._select_kernel``): gamma = u < alpha per map, drawn
   first, and for the active maps only the threshold, min, max and the soft mask's sum;
2. plan (``_attention_scale_kernel``, one program): the kept weight of each sample,
   sum_c (gamma ? msum : H*W) in float64, and the scale of ``normalize``, written into
   every map's state (``reference.attention_state``: thr, scale, min, r, the statistics
   kernel writing the others).

The apply (``apply_attention``) is the third launch; with ``noise=None`` the uniforms are
one more (``torch.rand``, as the reference draws them). alpha is a runtime argument.
The scale is the reference's bit for bit: the soft mask's per-map sums (``msum``) are
exact float64 sums (backend_contract.md), and so are the sums of them here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop.layers import Plan, _rate, beta_count, rand

from .._common import as_float32, launch, op, pow2
from ..block_mask import NORMALIZE
from ..percentile_threshold import _select


@triton.jit
def _store_scale(st_ptr, n, sc, N, C, BN: tl.constexpr, BC: tl.constexpr):
    """state[n, c, 1] = sc (BN,) for the samples n (BN,), every channel."""
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m = (n < N)[:, None] & (c < C)[None, :]
        v = tl.zeros([BN, BC], tl.float32) + sc[:, None]
        tl.store(st_ptr + (n[:, None] * C + c[None, :]).to(tl.int64) * 4 + 1, v, mask=m)


@triton.jit
def _attention_scale_kernel(msum_ptr, act_ptr, st_ptr, N, C, HW, units,
                            NORM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    # kept[n] = sum_c (active ? msum : HW) in float64 (exact, any order: backend_contract.md),
    # then SPEC §1's multiplier: units / kept, over the batch for "batch", into the state,
    # rounded as the reference's: torch's int / tensor is reciprocal(kept) * units, two
    # roundings (one division differs in the last bit for some kept, and so the scale).
    # tl.cast, not .to: Triton makes an int argument of 1 a constant (1 x 1 maps, one unit)
    total = tl.zeros([BN], tl.float64)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        kept = tl.zeros([BN], tl.float64)
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            m = (n < N)[:, None] & (c < C)[None, :]
            off = n[:, None] * C + c[None, :]
            act = tl.load(act_ptr + off, mask=m, other=0) != 0
            s = tl.load(msum_ptr + off, mask=m, other=0.0)
            kept += tl.sum(tl.where(m, tl.where(act, s, tl.cast(HW, tl.float64)), 0.0), axis=1)
        if NORM == 0:
            _store_scale(st_ptr, n, tl.full([BN], 1.0, tl.float32), N, C, BN, BC)
        elif NORM == 1:
            sc = tl.where(kept > 0, (1.0 / tl.maximum(kept, 1e-300)) * tl.cast(units, tl.float64),
                          0.0)
            _store_scale(st_ptr, n, sc.to(tl.float32), N, C, BN, BC)
        else:
            total += kept
    if NORM == 2:
        kept_all = tl.sum(total, axis=0)
        units_all = tl.cast(units, tl.float64) * N
        sc = tl.where(kept_all > 0, (1.0 / tl.maximum(kept_all, 1e-300)) * units_all, 0.0)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            _store_scale(st_ptr, n, tl.zeros([BN], tl.float32) + sc.to(tl.float32), N, C, BN,
                         BC)


@op("attentiondrop_plan", lambda x, u, alpha, n_beta, mode, normalize: (
    x.new_empty((*x.shape[:2], 4), dtype=torch.float32),
    x.new_empty(x.shape[:2], dtype=torch.bool)))
def _plan(x: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor, n_beta: int, mode: str,
          normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(state (N, C, 4) float32: thr, scale[n], mn, r (reference.attention_state);
    active (N, C) bool)."""
    n, c, h, w = x.shape
    active = torch.empty((n, c), dtype=torch.bool, device=x.device)
    state, msum = _select(x, n_beta, mode=mode, u=u, alpha=alpha, active_out=active)
    bc = min(pow2(c), 1024)
    bn = max(1, min(pow2(n), 4096 // bc))
    launch(_attention_scale_kernel)[(1,)](
        msum, active.view(torch.uint8), state, n, c, h * w, c * h * w,
        NORM=NORMALIZE[normalize], BN=bn, BC=bc)
    return state, active


def plan_attentiondrop(x, alpha, beta, *, mode, normalize, noise=None, generator=None):
    """``layers.attentiondrop`` fused: the same Plan, bit for bit, in 2 launches (+1 draw)."""
    n, c, h, w = x.shape
    u = noise if noise is not None else rand((n, c), generator, x.device)
    n_beta = beta_count(beta, h, w)
    # alpha: a kernel argument in eager mode (the launcher is called directly); a 0-dim
    # tensor while torch.compile traces the op, so that a new alpha is a new input, not a
    # recompile (a float argument of an op is specialised on, SPEC §8).
    alpha = _rate(alpha, x) if torch.compiler.is_compiling() else as_float32(alpha)
    state, active = _plan(x, u, alpha, n_beta, mode, normalize)
    return Plan("attention", (mode,), (state, active))


__all__ = ["plan_attentiondrop"]
