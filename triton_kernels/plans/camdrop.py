"""CamDrop's plan on Triton (``layers.camdrop``, SPEC §6) in 4 launches.

1. CAM (``class_activation._cam_kernel`` with FROM_W): alpha = weight[target] averaged
   over the C_fc / C columns of each channel, in the reference's order of summation, and
   J = sum_c alpha * x;
2. candidates (``_candidates_kernel``): the spatial top-k of J and the channel top-k of
   alpha, ties kept (``layers._top``);
3. seeds (``block_mask._seed_bits_kernel``), which also zeroes the coverage ticket;
4. coverage + scale (``block_mask._seed_coverage_kernel``, the scale in its last program).

The apply (``apply_seeds``) is the fifth launch; with ``noise=None`` the Philox seed is one
more. The seed rate is a runtime float32 argument (``dropblock.rate_args``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop.layers import Plan, _seed_rate

from .._common import cdiv, float_key, key_float, launch, op, pow2, warps
from ..block_mask import draw_seed, seed_launch, seeds_scale
from ..class_activation import cam_launch
from .dropblock import rate_args

CHUNK = 4096  # elements of a row per step of the selection


@triton.jit
def _top_row(v_ptr, o_ptr, base, L, k, BLOCK: tl.constexpr):
    """o[base + i] = v[base + i] >= the k-th largest of v[base .. base + L) (float32,
    NaN largest, as kth_largest: a bisection on the order-preserving key), as uint8."""
    KMAX: tl.constexpr = 2147483647
    KMIN: tl.constexpr = -2147483647 - 1
    kmin = tl.full([], KMAX, tl.int32)
    kmax = tl.full([], KMIN, tl.int32)
    for p0 in range(0, L, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        valid = p < L
        key = float_key(tl.load(v_ptr + base + p, mask=valid, other=0.0))
        kmin = tl.minimum(kmin, tl.min(tl.where(valid, key, KMAX), axis=0))
        kmax = tl.maximum(kmax, tl.max(tl.where(valid, key, KMIN), axis=0))
    # invariant: #{key >= lo} >= k and #{key > hi} < k
    lo = kmin.to(tl.int64)
    hi = kmax.to(tl.int64)
    while hi > lo:
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.zeros([], tl.int32)
        for p0 in range(0, L, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            valid = p < L
            key = float_key(tl.load(v_ptr + base + p, mask=valid, other=0.0))
            cnt += tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
        if cnt >= k:
            lo = mid
        else:
            hi = mid - 1
    thr = key_float(lo.to(tl.int32))
    for p0 in range(0, L, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        valid = p < L
        v = tl.load(v_ptr + base + p, mask=valid, other=0.0)
        tl.store(o_ptr + base + p, (v >= thr).to(tl.uint8), mask=valid)


@triton.jit
def _candidates_kernel(j_ptr, cs_ptr, a_ptr, cc_ptr, L, C, k_s, k_c, BLOCK: tl.constexpr):
    """Grid (N, 2): program (n, 0) the spatial candidates of sample n (top k_s of J's row),
    (n, 1) its channel candidates (top k_c of alpha's row)."""
    n = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _top_row(j_ptr, cs_ptr, n * L, L, k_s, BLOCK)
    else:
        _top_row(a_ptr, cc_ptr, n * C, C, k_c, BLOCK)


@op("camdrop_plan")
def _plan(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
          noise: torch.Tensor | None, seed: torch.Tensor, g_t: torch.Tensor | None,
          g_val: float, r: int, k_s: int, k_c: int,
          normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits (N, ceil(C*H*W/8)) uint8, scale (N,) float32)."""
    n, c, h, w = x.shape
    dev = x.device
    j = torch.empty((n, h, w), dtype=torch.float32, device=dev)
    alpha = torch.empty((n, c), dtype=torch.float32, device=dev)
    cand_s = torch.empty((n, h, w), dtype=torch.bool, device=dev)
    cand_c = torch.empty((n, c), dtype=torch.bool, device=dev)
    bits = torch.empty((n, cdiv(c * h * w, 8)), dtype=torch.uint8, device=dev)
    ticket = torch.empty((1,), dtype=torch.int32, device=dev)
    if n > 0:
        cam_launch(x, j, weight=weight, target=target, alpha_out=alpha)
        block = min(pow2(max(h * w, c)), CHUNK)
        launch(_candidates_kernel)[(n, 2)](
            j, cand_s.view(torch.uint8), alpha, cand_c.view(torch.uint8), h * w, c, k_s, k_c,
            BLOCK=block, num_warps=warps(block))
    seed_launch(bits, noise, seed, g_t, g_val, r, cand_s, cand_c, [n, c, h, w], ticket)
    return bits, seeds_scale(bits, ticket, r, c, c, h, w, normalize)


def plan_camdrop(x, weight, target, block_size, keep, *, channel_rate, normalize,
                 noise=None, generator=None):
    """``layers.camdrop`` fused: the same Plan, bit for bit, in 4 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16 (C, H, W >= 1); weight: (K, C_fc), C_fc a
    multiple of C, any float dtype; target: (N,) int64 in [0, K) (checked by
    ``guidedrop.functional``); noise: (N, C, H, W) or None. Returns None when the block
    does not fit the map, else Plan("seeds", (r, C == 1), (bits (N, ceil(C*H*W/8)) uint8,
    scale (N,) float32)).
    """
    n, c, h, w = x.shape
    r = block_size
    if r > h or r > w:  # no valid centre: nothing is dropped
        return None
    k_s = max(1, (h * w) // (r * r))
    k_c = max(1, round(channel_rate * c))
    g_t, g_val = rate_args(_seed_rate(1 - keep, r, h, w), x)
    seed = draw_seed(noise, generator, x.device)
    bits, scale = _plan(x, weight.detach(), target, noise, seed, g_t, g_val, r, k_s, k_c,
                        normalize)
    return Plan("seeds", (r, c == 1), (bits, scale))  # as _seeds_plan: Cs = C


__all__ = ["plan_camdrop"]
