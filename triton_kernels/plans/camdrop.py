"""CamDrop's plan on Triton (``layers.camdrop``, SPEC §6) in 4 launches.

1. CAM (``class_activation._cam_kernel`` with FROM_W): alpha = weight[target] averaged
   over the C_fc / C columns of each channel, in float64 as the reference, and
   J = sum_c alpha * x; it also checks the target's range (SPEC §6 step 0: a device
   assertion naming ``target``, compiled in debug mode) and clamps the row it reads;
2. candidates (``_candidates_kernel``): the spatial top-k of J and the channel top-k of
   alpha, ties kept (``layers._top``);
3. seeds (``block_mask._seed_bits_kernel``), which also zeroes the coverage ticket;
4. coverage + scale (``block_mask._seed_coverage_kernel``: the packed r x r blocks, the
   plan's state, and the scale in its last program).

The apply (``apply_seeds``) is the fifth launch; with ``noise=None`` the Philox seed is one
more. The seed rate is a runtime float32 argument (``dropblock.rate_args``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop import _validation
from guidedrop.layers import Plan, _seed_rate, rate64, top_count
from guidedrop.reference import fitted_block

from .._common import (
    INTERPRET,
    MAX_ROW,
    TILE,
    cdiv,
    float_key,
    in_top,
    key_float,
    launch,
    op,
    pow2,
    traced,
    warps,
)
from ..block_mask import draw_seed, packed_bits, seed_launch, seeds_fake, seeds_scale
from ..class_activation import cam_launch
from .dropblock import rate_args

CHUNK = 4096  # elements of a row per step when it does not fit in registers


@triton.jit
def _row_keys(v_ptr, rows, live, p0, L, BLOCK: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK)
    valid = live[:, None] & (p < L)[None, :]
    v = tl.load(v_ptr + rows[:, None] * L + p[None, :], mask=valid, other=0.0)
    return float_key(v), valid


@triton.jit
def _top_rows(v_ptr, o_ptr, R, L, k, ROWS: tl.constexpr, BLOCK: tl.constexpr,
              SINGLE: tl.constexpr):
    """o[r, i] = v[r, i] >= the k-th largest of row r of v (R, L) float32 contiguous, as
    uint8, for this program's ROWS rows: the k-th largest as kth_largest finds it (NaN
    largest, and a candidate: ``in_top``; a bisection on the order-preserving key, every
    row of the program at once; SINGLE: a row fits in BLOCK and stays in registers)."""
    KMAX: tl.constexpr = 2147483647
    KMIN: tl.constexpr = -2147483647 - 1
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    live = rows < R
    if SINGLE:
        key, valid = _row_keys(v_ptr, rows, live, 0, L, BLOCK)
        kmin = tl.min(tl.where(valid, key, KMAX), axis=1)
        kmax = tl.max(tl.where(valid, key, KMIN), axis=1)
    else:
        kmin = tl.full([ROWS], KMAX, tl.int32)
        kmax = tl.full([ROWS], KMIN, tl.int32)
        for p0 in range(0, L, BLOCK):
            key, valid = _row_keys(v_ptr, rows, live, p0, L, BLOCK)
            kmin = tl.minimum(kmin, tl.min(tl.where(valid, key, KMAX), axis=1))
            kmax = tl.maximum(kmax, tl.max(tl.where(valid, key, KMIN), axis=1))
    # invariant: #{key >= lo} >= k and #{key > hi} < k (dead rows: lo > hi, idle)
    lo = kmin.to(tl.int64)
    hi = kmax.to(tl.int64)
    while tl.max((hi > lo).to(tl.int32), axis=0) > 0:
        mid = lo + (hi - lo + 1) // 2
        mid32 = mid.to(tl.int32)[:, None]
        if SINGLE:
            cnt = tl.sum((valid & (key >= mid32)).to(tl.int32), axis=1)
        else:
            cnt = tl.zeros([ROWS], tl.int32)
            for p0 in range(0, L, BLOCK):
                key, valid = _row_keys(v_ptr, rows, live, p0, L, BLOCK)
                cnt += tl.sum((valid & (key >= mid32)).to(tl.int32), axis=1)
        busy = hi > lo
        lo = tl.where(busy & (cnt >= k), mid, lo)
        hi = tl.where(busy & (cnt < k), mid - 1, hi)
    thr = key_float(lo.to(tl.int32))[:, None]
    for p0 in range(0, L, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        valid = live[:, None] & (p < L)[None, :]
        off = rows[:, None] * L + p[None, :]
        v = tl.load(v_ptr + off, mask=valid, other=0.0)
        tl.store(o_ptr + off, in_top(v, thr).to(tl.uint8), mask=valid)


@triton.jit(do_not_specialize=["k_c"])  # a rate's count: never a specialisation key
def _candidates_kernel(j_ptr, cs_ptr, a_ptr, cc_ptr, N, L, C, k_s, k_c,
                       ROWS_S: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE_S: tl.constexpr,
                       ROWS_C: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr,
                       K_PTR: tl.constexpr):
    """Grid (programs, 2): axis 1 = 0, the spatial candidates (top k_s of J's rows (N, L));
    1, the channel candidates (top k_c of alpha's rows (N, C); K_PTR: k_c a 0-dim float64
    tensor, layers.top_count's while traced). Programs past their rows do nothing."""
    if tl.program_id(1) == 0:
        _top_rows(j_ptr, cs_ptr, N, L, k_s, ROWS_S, BLOCK_S, SINGLE_S)
    else:
        if K_PTR:
            k_c = tl.load(k_c).to(tl.int32)
        _top_rows(a_ptr, cc_ptr, N, C, k_c, ROWS_C, BLOCK_C, SINGLE_C)


def _rows_geometry(n: int, length: int):
    """(ROWS, BLOCK, SINGLE) of _top_rows for n rows of ``length`` (as _select)."""
    if length <= MAX_ROW:
        block = pow2(length)
        return max(1, min(TILE // block, pow2(n))), block, True
    return 1, CHUNK, False


@op("camdrop_plan", lambda x, weight, target, noise, seed, g_t, g_val, r, k_s, k_c,
    normalize: seeds_fake(x.shape, x.device))
def _plan(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
          noise: torch.Tensor | None, seed: torch.Tensor, g_t: torch.Tensor | None,
          g_val: float, r: int, k_s: int, k_c: torch.Tensor,
          normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (N, ceil(C*H*W/8)) uint8: the seeds' packed r x r blocks, scale (N,) float32)."""
    n, c, h, w = x.shape
    dev = x.device
    if INTERPRET and not traced():  # CPU tensors: the interpreter does not run the CAM's
        # tl.device_assert, and under torch.compile cam_inputs leaves the range to the
        # kernel (SPEC §6 step 0); the fake run while tracing has no values to check
        _validation.check_target_range(target, weight.shape[0])
    j = torch.empty((n, h, w), dtype=torch.float32, device=dev)
    alpha = torch.empty((n, c), dtype=torch.float32, device=dev)
    cand_s = torch.empty((n, h, w), dtype=torch.bool, device=dev)
    cand_c = torch.empty((n, c), dtype=torch.bool, device=dev)
    bits = packed_bits(x.shape, dev)
    ticket = torch.empty((1,), dtype=torch.int32, device=dev)
    if n > 0:
        cam_launch(x, j, weight=weight, target=target, alpha_out=alpha)
        rs, bs, ss = _rows_geometry(n, h * w)
        rc, bc, sc = _rows_geometry(n, c)
        launch(_candidates_kernel)[(max(cdiv(n, rs), cdiv(n, rc)), 2)](
            j, cand_s.view(torch.uint8), alpha, cand_c.view(torch.uint8), n, h * w, c, k_s, k_c,
            ROWS_S=rs, BLOCK_S=bs, SINGLE_S=ss, ROWS_C=rc, BLOCK_C=bc, SINGLE_C=sc,
            K_PTR=isinstance(k_c, torch.Tensor),
            num_warps=warps(max(rs * bs, rc * bc)))
    seed_launch(bits, noise, seed, g_t, g_val, r, cand_s, cand_c, [n, c, h, w], ticket)
    return seeds_scale(bits, ticket, r, c, c, h, w, normalize)


def plan_camdrop(x, weight, target, block_size, keep, *, channel_rate, normalize,
                 noise=None, generator=None):
    """``layers.camdrop`` fused: the same Plan, bit for bit, in 4 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16 (C, H, W >= 1); weight: (K, C_fc), C_fc a
    multiple of C, any float dtype; target: (N,) of any integer dtype and stride, read by
    value; noise: (N, C, H, W) or None. Returns None when the block does not fit the map,
    else Plan("seeds", (1, C == 1), (blocks (N, ceil(C*H*W/8)) uint8, scale (N,) float32)),
    blocks the seeds' packed r x r blocks (``layers._seeds_plan``).
    A target outside [0, K) not checked on the host (``guidedrop.functional`` checks a
    CPU one) fails the CAM kernel's device assertion, whose message names ``target``
    (backend_contract.md); the kernel clamps the row, so nothing is read out of bounds.
    """
    n, c, h, w = x.shape
    r = block_size
    if fitted_block(r, h, w) < r:  # no valid centre: none dropped, and no kernel checks target
        if not _validation.target_checked_on_host(target):
            _validation.assert_target(target, weight.shape[0])
        return None
    k_s = max(1, (h * w) // (r * r))
    k_c = top_count(channel_rate, c, x.device)  # int, or a tensor while traced (SPEC §8)
    g_t, g_val = rate_args(_seed_rate(1 - rate64(keep, x.device), r, h, w), x)
    seed = draw_seed(noise, generator, x.device)
    blocks, scale = _plan(x, weight.detach(), target, noise, seed, g_t, g_val, r, k_s, k_c,
                          normalize)
    return Plan("seeds", (1, c == 1), (blocks, scale))  # as _seeds_plan: Cs = C


__all__ = ["plan_camdrop"]
