"""Block masks: nearest-upsampled small masks and r x r expanded seed bits, in the apply.

- ``apply_block(t, mask, k, scale)``: ``t * mask[n, h//k, w//k] * scale[n]``, the small
  mask read inside the streaming tile (CorrDrop, FocusedDropout with k = 1).
- ``seed_bits``: packed seeds (N, ceil(Cs*H*W/8)) uint8, one bit string per sample (1/16
  of a 16-bit x), a program per tile of maps x rows x bytes (``map_grid``): each byte is
  its first bit's row's, the units of its other bits carried into the next rows without
  division (index arithmetic once per program and row, none per unit). Uniforms are the given
  ``noise`` or Philox in the kernel: ``tl.rand4x``
  keyed by (a seed drawn with torch's generator, loaded in the kernel: no host sync,
  CUDA-graph safe) and a counter that is a function of the logical position only (two
  counters per output byte, four uniforms each), never of the program id.
- ``seed_coverage``: units covered by the r x r expansion of the seeds, per sample, a
  program per run of bytes of the sample's bit string (``_dropped_bits``: OR of the r seed
  rows, each a few bytes shifted into one word, then r shifts; no (h, w) per unit, as seeds
  sit at valid centres only); ``seeds_scale`` (the DropBlock / CamDrop plans): the same
  kernel also writes the blocks, packed as the seeds (the plan's state,
  ``reference.seed_blocks``), and the scale of ``layers._seeds_plan`` in its last program
  (an atomic ticket that the seeds kernel zeroes), so that coverage and scale are one
  launch.
- ``apply_seeds(t, bits, r, scale)``: ``t * (1 - dropped) * scale[n]``. r = 1 (the plans'
  blocks): a byte of bits per 8 elements (``_apply_bits_flat_kernel`` for contiguous NCHW,
  ``_apply_bits_cl_kernel`` for channels_last); r > 1 (seeds) and other layouts: the
  dropped bits of 8 consecutive w built inside the row tile (``_apply_seeds_rows_kernel``,
  ``_dropped_bits``), so the x-sized mask never exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from guidedrop.reference import one_window

from ._common import (
    APPLY_TILE,
    CL_CHANNELS,
    CL_PER_THREAD,
    CL_TILE,
    INT32_MAX,
    TILE,
    apply_flags,
    apply_launch,
    apply_tile,
    cdiv,
    fake_like,
    flat_launch,
    group_tile,
    launch,
    needs_int64,
    op,
    out_like,
    out_offset,
    pow2,
    slack_after,
    tile_nchw,
    tile_offset,
    walk_channels_last,
    warps,
)

# --------------------------------------------------------------------------- apply_block


@triton.jit
def _apply_block_kernel(t_ptr, o_ptr, m_ptr, s_ptr, OUTER, INNER, C, H, W,
                        t_sN, t_sC, t_sH, t_sW, o_sN, o_sC, o_sH, o_sW, m_sN, m_sH, m_sW,
                        MAGW, K: tl.constexpr, CL: tl.constexpr, GRID3: tl.constexpr,
                        BO: tl.constexpr,
                        BI: tl.constexpr, IDX64: tl.constexpr,
                        SAME: tl.constexpr):
    ov, m, n, c, h, w, _ = apply_tile(OUTER, INNER, C, H, W, MAGW, CL, GRID3, BO, BI, IDX64)
    t_off = tile_offset(n, c, h, w, t_sN, t_sC, t_sH, t_sW, CL)
    o_off = out_offset(t_off, n, c, h, w, o_sN, o_sC, o_sH, o_sW, CL, SAME)
    if CL:  # rows (n, h, w), inner c: one mask value per row
        mv = tl.load(m_ptr + n * m_sN + (h // K) * m_sH + (w // K) * m_sW, mask=ov, other=0)
        wt = (mv.to(tl.float32) * tl.load(s_ptr + n, mask=ov, other=0.0))[:, None]
    else:  # rows (n, c, h), inner w
        moff = (n * m_sN + (h // K) * m_sH)[:, None] + ((w // K) * m_sW)[None, :]
        mv = tl.load(m_ptr + moff, mask=m, other=0)
        wt = mv.to(tl.float32) * tl.load(s_ptr + n, mask=ov, other=0.0)[:, None]
    tv = tl.load(t_ptr + t_off, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + o_off, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _apply_block_flat_kernel(t_ptr, o_ptr, m_ptr, s_ptr, TOTAL, HW, MAG1, C, MAG2, HW_M, HW_S,
                             C_M, C_S, N, H, W, MAGW, m_sN, m_sH, m_sW, K: tl.constexpr,
                             LINEAR: tl.constexpr, PADDED: tl.constexpr,
                             IN_MAP: tl.constexpr, CROSS_N: tl.constexpr,
                             BIG1: tl.constexpr, BIG2: tl.constexpr, BLOCK: tl.constexpr,
                             V: tl.constexpr, EVEN: tl.constexpr, IDX64: tl.constexpr):
    """Contiguous NCHW t and out: groups of V elements (``_common.group_tile``), V <= W + 1
    so that a group spans at most one row end. Per group: its row (h, w0 by the magic
    multiplier MAGW = ceil(2**30 / W), exact as H * W * W <= 2**30), the mask row offset and
    scale of that row and of the next one (the next map's, and sample's, first row after
    the last); elements j >= W - w0 are the next row's. CROSS_N (C * H * W % V != 0): a
    group can span two samples; otherwise one scale per group.

    LINEAR (K = 1, mask rows contiguous): element j's mask byte is n * m_sN + pos + j, loads
    at constant offsets of one address; IN_MAP (H * W % V == 0): no group leaves its map,
    else the elements past the map's end take the next map's bytes (the same sample's mask
    again, or the next sample's): one address select per element.

    K >= V - 1: the group's part in its row spans at most two mask columns, c0 = w0 // K and
    c0 + 1 (from element K - w0 % K on), its part in the next row column 0 only: three mask
    bytes per group, each times its row's scale, and per element two selects, no gather.

    Other K (and K = 1 with a strided mask): the group's part in its row reads columns c0 + i,
    i < NA = (K + V - 2) // K + 1, its part in the next row columns 0 .. NB - 1: bytes loaded
    per group at constant offsets of two addresses and multiplied by the row's scale, then
    selected per element (no per-element gather, conversion or scale select); the row's
    columns past its last are read unmasked where the mask has slack after it (PADDED: the
    plan kernels' masks, ``_common.mask_buffer``), else masked. Element j's
    column is c0 + j // K + (r >= K - j % K), r = w0 % K, in its row, (j - nxt) // K in the
    next: with j a constant per register (V * itemsize = 16 bytes, one thread's vector),
    the selects fold to compares per group. h // K and w0 // K are multiply-shifts by MK =
    ceil(2**20 / K) in uint32: exact as max(H, W) * K < 2**20, and without overflow as
    max(H, W) * MK < 2**32 (maps of 4096 * K rows or columns and more take the row tile)."""
    e, m, n, c, pos = group_tile(TOTAL, HW, MAG1, C, MAG2, HW_M, HW_S, C_M, C_S, BIG1, BIG2,
                                  BLOCK, V, IDX64, EVEN)
    j = tl.arange(0, V)[None, :]
    if LINEAR:
        if not EVEN:  # past the last sample: read s[N - 1], never used
            n = tl.minimum(n, N - 1)
        s0 = tl.load(s_ptr + n)
        pa = m_ptr + (n * m_sN + pos)[:, None] + j
        if IN_MAP:
            mv = tl.load(pa, mask=m, other=0)
            wt = mv.to(tl.float32) * s0[:, None]
        else:
            # elements j >= HW - pos are the next map's: the same sample's mask from its
            # start (HW bytes back), or the next sample's, jump = m_sN - HW bytes on
            # HW - pos >= 1 told to the compiler: element 0 is never the next map's
            into = j >= tl.maximum(HW - pos, 1)[:, None]
            if CROSS_N:
                step = c == C - 1
                jump = tl.where(step, m_sN - HW, -HW)
                s1 = tl.where(step, tl.load(s_ptr + tl.minimum(n + 1, N - 1)), s0)
            else:
                jump = -HW
                s1 = s0
            # one load per element, its address selected (two loads masked either way
            # cost a zeroing and a masking each)
            mv = tl.load(tl.where(into, pa + jump[:, None] if CROSS_N else pa + jump, pa),
                         mask=m, other=0)
            if CROSS_N:
                wt = mv.to(tl.float32) * tl.where(into, s1[:, None], s0[:, None])
            else:
                wt = mv.to(tl.float32) * s0[:, None]
    else:
        h = tl.umulhi(pos * 4, MAGW)
        w0 = pos - h * W
        last = h == H - 1
        h1 = tl.where(last, 0, h + 1)
        MK: tl.constexpr = (2**20 + K - 1) // K  # x // K = (x * MK) >> 20 for x * K < 2**20
        # clamped, not masked (fewer instructions): groups past the end of the last tile
        # and the sample after the last (n1 = N) read sample N - 1's values, never used
        if not EVEN:
            n = tl.minimum(n, N - 1)
        s0 = tl.load(s_ptr + n)
        if CROSS_N:
            step = last & (c == C - 1)  # the next row is the next sample's
            n1 = tl.minimum(n + step.to(n.dtype), N - 1)
            # s[n + 1] only where the row is the next sample's: past the last, s[n]
            s1 = tl.where(step, tl.load(s_ptr + n1), s0)
        else:
            n1 = n
            s1 = s0
        row0 = n * m_sN + ((h.to(tl.uint32) * MK) >> 20).to(h.dtype) * m_sH
        row1 = n1 * m_sN + ((h1.to(tl.uint32) * MK) >> 20).to(h.dtype) * m_sH
        # the first element of the next row; >= 1 told to the compiler (element 0 is never
        # the next row's), and every "is the next row's" below a compare of j with it, so
        # that the compares of equal constants are one
        nxt = tl.maximum(W - w0, 1)[:, None]
        wrap = j >= nxt
        c0 = ((w0.to(tl.uint32) * MK) >> 20).to(w0.dtype)
        if K >= V - 1:
            b = (c0 + 1) * K - w0  # the first element of column c0 + 1
            c1 = tl.minimum(c0 + 1, (W - 1) // K)  # past the row's last column: unused
            f0 = tl.load(m_ptr + row0 + c0 * m_sW).to(tl.float32) * s0
            f1 = tl.load(m_ptr + row0 + c1 * m_sW).to(tl.float32) * s0
            f2 = tl.load(m_ptr + row1).to(tl.float32) * s1
            # 1 <= b <= K told to the compiler (b is): the compares are known for elements
            # 0 and K .. V - 1 (constants it folds: fewer compares). Not as i1 logic per
            # element, (j > 0) & ((j >= b) | (j >= K)), which Triton 3.9 packs into bits
            b = tl.minimum(tl.maximum(b, 1), K)
            wt = tl.where(wrap, f2[:, None], tl.where(j >= b[:, None], f1[:, None], f0[:, None]))
        else:
            NA: tl.constexpr = (K + V - 2) // K + 1  # the row's columns c0 + i
            NB: tl.constexpr = (V - 2) // K + 1  # the next row's: (j - nxt) // K, nxt >= 1
            r = w0 - c0 * K
            # element j's column in its row is c0 + lo + (r >= K - j % K): constants per
            # element, compares per group only
            lo = j // K
            ia = lo + (r[:, None] >= K - j % K).to(lo.dtype)
            pa = m_ptr + row0 + c0 * m_sW
            wa = tl.broadcast_to((tl.load(pa).to(tl.float32) * s0)[:, None], ia.shape)
            last_col = (W - 1) // K
            for i in tl.static_range(1, NA):
                # past the row's last column no element takes column c0 + i: its byte is
                # read where the mask has slack after it (PADDED), else masked (out of
                # bounds after the mask's last row)
                if PADDED:
                    fa = tl.load(pa + i * m_sW)
                else:
                    fa = tl.load(pa + i * m_sW, mask=c0 + i <= last_col)
                wa = tl.where(ia == i, (fa.to(tl.float32) * s0)[:, None], wa)
            # next row: column i from element nxt + i * K on (the elements below K * i + 1
            # never take column i)
            wb = tl.broadcast_to((tl.load(m_ptr + row1).to(tl.float32) * s1)[:, None], ia.shape)
            for i in tl.static_range(1, NB):
                fb = tl.load(m_ptr + row1 + i * m_sW).to(tl.float32) * s1
                wb = tl.where(j - i * K >= nxt, fb[:, None], wb)
            wt = tl.where(wrap, wb, wa)
    tv = tl.load(t_ptr + e, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + e, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


def apply_block(t: torch.Tensor, mask: torch.Tensor, k: int, scale: torch.Tensor) -> torch.Tensor:
    """t * (mask[n, h//k, w//k] * scale[n]); mask: (N, Hs, Ws) uint8, scale: (N,) float32.

    Any int k >= 1: a block larger than the map is the whole map (the same indices as
    k = max(H, W)), so the op, its int64 schema and the constexpr K stay bounded."""
    return _apply_block(t, mask, one_window(k, t.shape[-2], t.shape[-1]), scale)


@op("apply_block", fake_like)
def _apply_block(t: torch.Tensor, mask: torch.Tensor, k: int, scale: torch.Tensor) -> torch.Tensor:
    """apply_block with 1 <= k <= max(H, W, 1)."""
    out = out_like(t)
    if out.numel() == 0:
        return out
    n, c, h, w = t.shape
    k = min(int(k), max(h, w))
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    scale = scale.to(torch.float32).contiguous()
    # LINEAR: k = 1 with the mask rows one after the other (a single row's stride is any value)
    linear = k == 1 and (mask.stride(1) == w or mask.shape[1] == 1) and mask.stride(2) == 1
    # groups of 16 bytes (8 elements of bf16, 4 of float32: element j of a group is then a
    # constant per register, the mask columns' selects fold); 8 elements where a group can
    # span two samples (its two scale loads stay within one 4-byte access per 16 bytes of
    # x in float32, issue 13) and where LINEAR maps are of 8s (one scale and 8 mask bytes
    # per 32 bytes of float32, not a scale and 4 bytes per 16)
    v = 8 if c * h * w % 4 or (linear and h * w % 8 == 0) else 16 // t.element_size()
    # the flat kernel's magic multipliers are exact, and do not overflow, for these sizes
    # (see its docstring)
    exact = h * w * w <= 2**30 and max(h, w) * k < 2**20 and max(h, w) * -(-2**20 // k) < 2**32
    flat = flat_launch(t, out) if exact and w >= v - 1 else None
    if flat is not None:
        grid, meta = flat
        vv = min(v, meta["BLOCK"])
        # the row's columns c0 + i, i < NA, of K < V - 1: NA - 1 past the last at most
        na = (k + vv - 2) // k + 1
        padded = not linear and k < vv - 1 and slack_after(mask) >= (na - 1) * mask.stride(2)
        launch(_apply_block_flat_kernel)[grid](
            t, out, mask, scale, out.numel(), N=n, H=h, W=w, MAGW=-(-2**30 // w),
            m_sN=mask.stride(0), m_sH=mask.stride(1), m_sW=mask.stride(2), K=k,
            LINEAR=linear, PADDED=padded,
            IN_MAP=h * w % vv == 0, CROSS_N=c * h * w % vv != 0, V=vv, **meta)
        return out
    grid, outer, inner, meta = apply_launch(t, out)
    launch(_apply_block_kernel)[grid](
        t, out, mask, scale, outer, inner, c, h, w, *t.stride(), *out.stride(), *mask.stride(),
        K=k, **meta)
    return out


# --------------------------------------------------------------------------- seeds


@triton.jit
def _map_tile(NCB, BC: tl.constexpr, BH: tl.constexpr, BQ: tl.constexpr, IDX64: tl.constexpr):
    """The tile of program (n * NCB + cb, hb, qb) of a grid over (sample n, block cb of
    BC maps, block hb of BH rows, block qb of BQ byte columns): n, and (cs, h, k) of each of
    its BC * BH * BQ items (maps and rows past the end included: the caller masks them).
    The one runtime division is per program; the tile's are by powers of two (shifts)."""
    pid = tl.program_id(0)
    n = pid // NCB
    cb = pid - n * NCB
    t = tl.arange(0, BC * BH * BQ)
    cs = cb * BC + t // (BH * BQ)
    h = tl.program_id(1) * BH + (t // BQ) % BH
    k = tl.program_id(2) * BQ + t % BQ
    if IDX64:  # one return: the compiler wants one type per returned value
        n, cs, h, k = n.to(tl.int64), cs.to(tl.int64), h.to(tl.int64), k.to(tl.int64)
    return n, cs, h, k


@triton.jit
def _seed_bits_kernel(out_ptr, noise_ptr, seed_ptr, cs_ptr, cc_ptr, g_ptr, g_val, ticket_ptr,
                      NCB, Bn, Cs, H, W, h_lo, h_hi, w_lo, w_hi,
                      u_sN, u_sC, u_sH, u_sW, s_sN, s_sH, s_sW, c_sN, c_sC,
                      HAS_NOISE: tl.constexpr, HAS_CS: tl.constexpr, HAS_CC: tl.constexpr,
                      G_PTR: tl.constexpr, TICKET: tl.constexpr,
                      BC: tl.constexpr, BH: tl.constexpr, BQ: tl.constexpr,
                      WRAPS: tl.constexpr, MAP_WRAPS: tl.constexpr, IDX64: tl.constexpr):
    """Tile (maps cs) x (rows h) x (bytes k of the row): row (cs, h) of sample n owns the
    output bytes whose first bit is one of its units, its k-th such byte being
    q = ceil(p / 8) + k, p = (cs * H + h) * W its first unit. Bit j of byte q is unit
    8q + j: column w + j of the row, w = 8q - p, carried into the next rows (and maps)
    when past W by at most WRAPS (MAP_WRAPS) conditional subtractions: index arithmetic
    once per row, none per unit."""
    n, cs, h, k = _map_tile(NCB, BC, BH, BQ, IDX64)
    p = (cs * H + h) * W
    q = ((p + 7) >> 3) + k
    w = q * 8 - p  # < W + 7 * BQ; the byte is this row's when w < W
    bv = (cs < Cs) & (h < H) & (w < W)
    b = n * Bn + q  # logical byte index into (N, Bn)
    half = tl.arange(0, 2)
    # g: float32, a runtime value, never a specialisation (SPEC §8): loaded from a 0-dim
    # tensor (G_PTR) or the scalar argument g_val (already a float32 value, see seed_launch)
    if G_PTR:
        g = tl.load(g_ptr)
    else:
        g = tl.cast(g_val, tl.float32)
    if TICKET:  # the coverage kernel's ticket (seeds_scale), zeroed before it runs
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            tl.store(ticket_ptr, 0)
    if not HAS_NOISE:
        # counter 2q' + half, q' the byte in the whole batch: four uniforms per call, bit
        # half * 4 + lane takes the lane-th (backend_contract.md)
        seed = tl.load(seed_ptr)
        u0, u1, u2, u3 = tl.rand4x(seed, b[:, None] * 2 + half[None, :])
    byte = tl.zeros(b.shape, tl.int32)
    for lane in tl.static_range(4):
        j = half * 4 + lane  # (2,): bits lane and lane + 4
        uw = w[:, None] + j[None, :]  # < W + 7 for the row's bytes
        uh = h[:, None] + j[None, :] * 0
        uc = cs[:, None] + j[None, :] * 0
        for _ in tl.static_range(WRAPS):  # the bits past the row's end: the next rows'
            wrap = uw >= W
            uw = tl.where(wrap, uw - W, uw)
            uh = uh + wrap.to(uh.dtype)
        for _ in tl.static_range(MAP_WRAPS):  # past the map's last row: the next map's
            wrap = uh >= H
            uh = tl.where(wrap, uh - H, uh)
            uc = uc + wrap.to(uc.dtype)
        okw = (bv[:, None] & (uc < Cs) & (uh >= h_lo) & (uh <= h_hi) & (uw >= w_lo)
               & (uw <= w_hi))
        if HAS_CC:
            okw = okw & (tl.load(cc_ptr + n * c_sN + uc * c_sC, mask=okw, other=0) != 0)
        if HAS_CS:
            okw = okw & (tl.load(cs_ptr + n * s_sN + uh * s_sH + uw * s_sW,
                                 mask=okw, other=0) != 0)
        if HAS_NOISE:
            u = tl.load(noise_ptr + n * u_sN + uc * u_sC + uh * u_sH + uw * u_sW,
                        mask=okw, other=1.0).to(tl.float32)  # u rounded to f32 (SPEC §1)
        elif lane == 0:
            u = u0
        elif lane == 1:
            u = u1
        elif lane == 2:
            u = u2
        else:
            u = u3
        bit = (okw & (u < g)).to(tl.int32)
        byte = byte | tl.sum(bit << j[None, :], axis=1)
    tl.store(out_ptr + b, byte.to(tl.uint8), mask=bv)


def seed_bits(noise, generator, g, r, cand_s, cand_c, shape, device):
    """Packed seeds uint8 (N, ceil(Cs*H*W/8)); see backend_contract.md.

    seed at (n, c, h, w) iff u < g (g: 0-dim float32 tensor; u rounded to float32 whatever
    noise's dtype, SPEC §1), (h, w) a valid centre of an r x r
    block, cand_s[n, h, w] and cand_c[n, c] (each optional). u = noise (N, Cs, H, W) when
    given, else Philox uniforms seeded from ``generator`` (torch's default when None).
    """
    seed = draw_seed(noise, generator, device)
    from guidedrop.reference import rate_tensor
    g = rate_tensor(g, device).to(device=device, dtype=torch.float32)
    return _seed_bits(noise, seed, g, int(r), cand_s, cand_c, list(shape))


def packed_bits(shape, device) -> torch.Tensor:
    """The seeds of ``shape`` (N, Cs, H, W), packed: (N, ceil(Cs*H*W/8)) uint8, uninitialised."""
    return torch.empty((shape[0], cdiv(shape[1] * shape[2] * shape[3], 8)), dtype=torch.uint8,
                       device=device)


def seeds_fake(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a plan that ends in ``seeds_scale`` (its ops' fake kernel): blocks
    (N, ceil(Cs*H*W/8)) uint8 and scale (N,) float32 for seeds of ``shape``."""
    return (packed_bits(shape, device),
            torch.empty((shape[0],), dtype=torch.float32, device=device))


@op("seed_bits", lambda noise, seed, g, r, cand_s, cand_c, shape:
    packed_bits(shape, seed.device))
def _seed_bits(noise: torch.Tensor | None, seed: torch.Tensor, g: torch.Tensor, r: int,
               cand_s: torch.Tensor | None, cand_c: torch.Tensor | None,
               shape: list[int]) -> torch.Tensor:
    """seed_bits with the seed drawn: seed (1,) int64 on the output's device."""
    out = packed_bits(shape, seed.device)
    seed_launch(out, noise, seed, g, 0.0, r, cand_s, cand_c, shape, None)
    return out


def draw_seed(noise, generator, device) -> torch.Tensor:
    """The Philox seed of seed_bits: (1,) int64 drawn with ``generator`` (a launch), or an
    empty tensor when noise is given (it only carries the device). The generator cannot
    enter an op's schema: the seed is drawn outside the op. 63 random bits, the key's
    two words: each call's counters start at 0, so two calls of one shape that draw the
    same seed draw the same seeds (with 31 bits, about M^2 / 2^32 such pairs in M calls:
    ~400 in a long training run)."""
    if noise is not None:
        return torch.empty((0,), dtype=torch.int64, device=device)
    if generator is None:  # as layers.rand: generator=None fails on symbolic shapes
        return torch.randint(0, 2**63 - 1, (1,), device=device)
    return torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device)


def seed_launch(out, noise, seed, g_t, g_val, r, cand_s, cand_c, shape, ticket):
    """Launch _seed_bits_kernel into out (N, ceil(Cs*H*W/8)) uint8 (nothing when empty).

    The rate is g_t (0-dim float32 tensor) when given, else g_val, a python float that
    must hold a float32 value (so that Triton's float32 argument is exact). cand_s, cand_c:
    bool (or uint8 0/1) tensors or None. ticket: (1,) int32 that the kernel sets to 0, or
    None.
    """
    n, cs, h, w = shape
    bn = out.shape[1]
    if out.numel() == 0:
        return
    # unused pointers get an input, never out: no kernel argument aliases the output
    if noise is None:
        dummy, noise_arg, u_strides = seed, seed, (0, 0, 0, 0)
    else:
        dummy, seed, noise_arg, u_strides = noise, noise, noise, noise.stride()

    def as_u8(t):  # bool -> uint8 is a view (no launch); other dtypes are converted
        return dummy if t is None else (t if t.dtype == torch.uint8 else
                                        t.to(torch.bool).view(torch.uint8))
    cs_arg, cc_arg = as_u8(cand_s), as_u8(cand_c)
    s_strides = (0, 0, 0) if cand_s is None else cs_arg.stride()
    c_strides = (0, 0) if cand_c is None else cc_arg.stride()
    # a row owns at most ceil(W / 8) bytes; with noise (a load per unit, besides the
    # candidates'), half the bytes per program: no spills
    grid, tile = map_grid(n, cs, h, cdiv(w, 8), TILE // (16 if noise is not None else 8))
    wraps = (w + 6) // w  # a byte's bits reach at most 7 units past its row's end
    launch(_seed_bits_kernel)[grid](
        out, noise_arg, seed, cs_arg, cc_arg, dummy if g_t is None else g_t, float(g_val),
        dummy if ticket is None else ticket, tile["NCB"], bn, cs, h, w,
        r // 2, h - r + r // 2, r // 2, w - r + r // 2,
        *u_strides, *s_strides, *c_strides,
        HAS_NOISE=noise is not None, HAS_CS=cand_s is not None, HAS_CC=cand_c is not None,
        G_PTR=g_t is not None, TICKET=ticket is not None,
        BC=tile["BC"], BH=tile["BH"], BQ=tile["BQ"], WRAPS=wraps,
        MAP_WRAPS=(h - 1 + wraps) // h,
        IDX64=needs_int64(noise) or 8 * out.numel() >= INT32_MAX - 2 * TILE,
        num_warps=warps(tile["items"] * 2))


MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2


def map_grid(n, cs, h, cols, items):
    """Grid and tile of ``_map_tile`` over n samples x cs maps x h rows x ``cols`` byte
    columns: about ``items`` per program, each dimension of the tile a power of two
    (columns first, then rows, then maps), rows per tile raised when h would exceed the
    grid's limit. Returns (grid, {"NCB", "BC", "BH", "BQ", "items"})."""
    items = max(1, items)
    bq = min(pow2(cols), items)
    bh = max(min(pow2(h), max(1, items // bq)), pow2(cdiv(h, MAX_GRID_YZ)))
    bq = max(min(bq, max(1, items // bh)), pow2(cdiv(cols, MAX_GRID_YZ)))
    bc = max(1, min(pow2(cs), items // (bq * bh)))
    ncb = cdiv(cs, bc)
    return ((n * ncb, cdiv(h, bh), cdiv(cols, bq)),
            {"NCB": ncb, "BC": bc, "BH": bh, "BQ": bq, "items": bc * bh * bq})


@triton.jit
def _dropped_piece(bits_ptr, sample, u0, W, Bn, zero,
                   R: tl.constexpr, LO: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """_dropped_bits for the seed offsets d = w' - w in [DA, DB] (DB - DA < 48)."""
    # bits p0 .. p0 + 7 + DB - DA of the string, p0 % 8 <= 7: in at most NLOAD <= 8 bytes
    NLOAD: tl.constexpr = (DB - DA + 14) // 8 + 1
    acc = zero.to(tl.int64)
    for dh in range(R):  # OR of the seed rows h - LO .. h + R - 1 - LO
        p0 = u0 + ((dh - LO) * W + DA)  # bit of the seed at (h + dh - LO, w + DA); may be < 0
        b0 = p0 >> 3  # floor, also below 0
        word = zero.to(tl.int64)
        for e in tl.static_range(NLOAD):
            bb = b0 + e
            v = tl.load(bits_ptr + sample + bb, mask=(bb >= 0) & (bb < Bn), other=0)
            word = word | (v.to(tl.int64) << (8 * e))
        acc = acc | (word >> (p0 & 7))  # bit i <- the seed at (h + dh - LO, w + DA + i)
    dropped = zero.to(tl.int32)
    for d in tl.static_range(0, DB - DA + 1):  # unit j <- seeds at w + j + DA + d
        dropped = dropped | ((acc >> d) & 0xFF).to(tl.int32)
    return dropped


@triton.jit
def _dropped_bits(bits_ptr, sample, u0, W, Bn, R: tl.constexpr, LO: tl.constexpr):
    """Bits of the units u0 .. u0 + 7 of a sample's string (byte offset ``sample``, unit
    u = (cs * H + h) * W + w, any u0) covered by the r x r expansion of the seeds.

    A unit (h, w) is covered by a seed at (h', w') with h' - h and w' - w in [-LO, HI],
    LO = r - 1 - r // 2, HI = r // 2: the seed's bit is u + (h' - h) * W + (w' - w). For
    each of the r seed rows the bits u0 - LO .. u0 + 7 + HI of that row are read as one
    int64 word (a few byte loads, shifted into place), the rows OR-ed, then the word OR-ed
    with itself shifted by every offset: about 3r byte loads and r shifts per 8 units for
    r <= 17. Seeds sit at valid centres only (backend_contract.md), so a bit reached past
    a row's end (w' < 0 or >= W) or past its map's (h' < 0 or >= H) is a neighbouring row's
    or map's edge, never a seed: no (h, w) is needed, only the string's bounds
    [0, Bn) bytes. Offsets are taken in pieces of at most 48. sample, u0: int tensors that
    broadcast together.
    """
    HI: tl.constexpr = R - 1 - LO
    NPIECE: tl.constexpr = (R + 47) // 48
    zero = sample * 0 + u0 * 0
    dropped = zero.to(tl.int32)
    for piece in tl.static_range(NPIECE):
        # piece p covers d in [48p - LO, min(48p - LO + 47, HI)] (constexpr arguments)
        dropped = dropped | _dropped_piece(
            bits_ptr, sample, u0, W, Bn, zero, R, LO, piece * 48 - LO,
            piece * 48 - LO + 47 - (piece * 48 - LO + 47 - HI) * ((piece + 1) // NPIECE))
    return dropped


@triton.jit
def _seed_coverage_kernel(bits_ptr, blk_ptr, part_ptr, ticket_ptr, sc_ptr, UNITS, W, Bn, P,
                          N, units, mult, R: tl.constexpr, LO: tl.constexpr,
                          BB: tl.constexpr, IDX64: tl.constexpr, BLOCKS: tl.constexpr,
                          NORM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
    """Program pid = n * P + p over bytes p * BB .. of sample n's string (UNITS = Cs * H *
    W units, Bn bytes): part[n, p] = its units covered by the seeds' r x r blocks, and with
    BLOCKS the blocks themselves, packed as the seeds (blk, the bits after the last unit
    0). NORM >= 0 (the plan, ``seeds_scale``): the last program to finish also writes
    scale (N,)."""
    pid = tl.program_id(0)
    n = pid // P
    p = pid - n * P
    b = p * BB + tl.arange(0, BB)
    if IDX64:
        n = n.to(tl.int64)
        b = b.to(tl.int64)
    dropped = _dropped_bits(bits_ptr, n * Bn, b * 8, W, Bn, R, LO)
    j = tl.arange(0, 8)
    hit = (((dropped[:, None] >> j[None, :]) & 1) != 0) & ((b[:, None] * 8 + j[None, :]) < UNITS)
    if BLOCKS:
        packed = tl.sum(hit.to(tl.int32) << j[None, :], axis=1)
        tl.store(blk_ptr + n * Bn + b, packed.to(tl.uint8), mask=b < Bn)
    tl.store(part_ptr + pid, tl.sum(tl.sum(hit.to(tl.int32), axis=1), axis=0))
    if NORM >= 0:
        # The scale of "batch" needs every sample's count: rather than a second launch,
        # the last program to finish (an atomic ticket) reads all the parts and writes the
        # scales. The ticket is zeroed by the seeds kernel launched just before on the same
        # stream (seed_launch's TICKET), not kept in a persistent workspace: nothing to
        # allocate and zero once (a launch), nothing shared between streams or graphs.
        # The barriers order every thread's store before the release, and the acquire
        # before every thread's loads (the classic threadfence-reduction pattern).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            tl.debug_barrier()
            _coverage_scale(part_ptr, sc_ptr, N, P, units, mult, NORM, BN, BP)


@triton.jit
def _coverage_scale(part_ptr, sc_ptr, N, P, units, mult, NORM: tl.constexpr,
                    BN: tl.constexpr, BP: tl.constexpr):
    """scale (N,) float32 of layers._scale from part (N, P) int32 covered-unit counts:
    kept = units - mult * covered per sample, float64 arithmetic rounded to float32."""
    units64 = tl.cast(units, tl.float64)
    total = tl.zeros([BN], tl.float64)  # "batch": kept of the whole batch (exact integers)
    for n0 in range(0, N, BN):
        nn = n0 + tl.arange(0, BN)
        nv = nn < N
        cov = tl.zeros([BN], tl.int64)
        for p0 in range(0, P, BP):
            pp = p0 + tl.arange(0, BP)
            m = nv[:, None] & (pp < P)[None, :]
            v = tl.load(part_ptr + nn[:, None].to(tl.int64) * P + pp[None, :], mask=m,
                        other=0, volatile=True)
            cov += tl.sum(v.to(tl.int64), axis=1)
        kept = (tl.cast(units, tl.int64) - cov * mult).to(tl.float64)
        if NORM == 0:  # "none"
            tl.store(sc_ptr + nn, tl.full([BN], 1.0, tl.float32), mask=nv)
        elif NORM == 1:  # "sample"
            # the reference's units / kept is torch's reciprocal(kept) * units (its
            # __rtruediv__): the same two roundings here, not one division
            sc = tl.where(kept > 0, (1.0 / tl.maximum(kept, 1e-300)) * units64, 0.0)
            tl.store(sc_ptr + nn, sc.to(tl.float32), mask=nv)
        else:
            total += tl.where(nv, kept, 0.0)
    if NORM == 2:  # "batch": units * N / sum(kept), every sample
        kept_all = tl.sum(total, axis=0)
        sc = tl.where(kept_all > 0, (1.0 / tl.maximum(kept_all, 1e-300)) * (units64 * N), 0.0)
        for n0 in range(0, N, BN):
            nn = n0 + tl.arange(0, BN)
            tl.store(sc_ptr + nn, tl.zeros([BN], tl.float32) + sc.to(tl.float32), mask=nn < N)


NORMALIZE = {"none": 0, "sample": 1, "batch": 2}  # every plan kernel's NORM (launchers.h)
# Counts (samples x parts) the scale program reads per step (tests shrink it to take the
# loops of _coverage_scale).
SCALE_TILE = 4096


def coverage_launch(bits, r, cs, h, w, scale=None, ticket=None, units=0, mult=1,
                    normalize="none", blocks=None):
    """Launch _seed_coverage_kernel over bits (N, Bn); returns part (N, P) int32. With
    scale (N,) float32 and ticket (zeroed by the seeds kernel): the plan's scales too; with
    blocks (N, Bn) uint8: the seeds' r x r blocks, packed (``reference.seed_blocks``)."""
    n, bn = bits.shape
    bb = min(pow2(bn), TILE // 8)  # bytes per program
    p = cdiv(bn, bb)  # programs per sample
    part = torch.empty((n, p), dtype=torch.int32, device=bits.device)
    if n == 0 or p == 0:
        return part
    plan = scale is not None
    bp = max(1, min(pow2(p), SCALE_TILE // 16))
    launch(_seed_coverage_kernel)[(n * p,)](
        bits, bits if blocks is None else blocks, part, ticket if plan else part,
        scale if plan else part, cs * h * w, w, bn, p, n, int(units), int(mult),
        R=int(r), LO=int(r) - 1 - int(r) // 2, BB=bb,
        IDX64=needs_int64(bits) or 8 * bits.numel() >= INT32_MAX - 2 * TILE,  # bit offsets
        BLOCKS=blocks is not None, NORM=NORMALIZE[normalize] if plan else -1,
        BN=max(1, min(pow2(n), SCALE_TILE // bp)), BP=bp,
        num_warps=warps(bb * 2))  # 4 bytes per thread
    return part


@op("seed_coverage", lambda bits, r, cs, h, w:
    bits.new_empty(bits.shape[:1], dtype=torch.int64))
def seed_coverage(bits: torch.Tensor, r: int, cs: int, h: int, w: int) -> torch.Tensor:
    """bits: (N, ceil(Cs*H*W/8)) uint8 -> (N,) int64: units covered by the r x r
    expansion of the seeds, summed over the Cs maps."""
    n = bits.shape[0]
    if n == 0 or cs * h * w == 0:
        return torch.zeros((n,), dtype=torch.int64, device=bits.device)
    return coverage_launch(bits.contiguous(), r, cs, h, w).sum(dim=1)


def seeds_scale(bits, ticket, r, c, cs, h, w, normalize):
    """(blocks, scale) of layers._seeds_plan in the coverage launch (bits contiguous, ticket
    zeroed by the seeds kernel that wrote bits): blocks (N, Bn) uint8, the seeds' packed
    r x r blocks; scale (N,) float32."""
    scale = torch.empty(bits.shape[0], dtype=torch.float32, device=bits.device)
    blocks = torch.empty_like(bits)
    coverage_launch(bits, r, cs, h, w, scale, ticket, c * h * w, c // cs, normalize, blocks)
    return blocks, scale


# --------------------------------------------------------------------------- apply_seeds


@triton.jit
def _apply_seeds_rows_kernel(t_ptr, o_ptr, bits_ptr, s_ptr, ROWS, C, H, W, Bn,
                             t_sN, t_sC, t_sH, t_sW, o_sN, o_sC, o_sH, o_sW,
                             R: tl.constexpr, LO: tl.constexpr, SHARED: tl.constexpr,
                             BR: tl.constexpr, BQ: tl.constexpr, IDX64: tl.constexpr,
                             SAME: tl.constexpr):
    """Tile (rows (n, c, h)) x (bytes q) x (bits j): w = 8q + j."""
    r = (tl.program_id(0).to(tl.int64) if IDX64 else tl.program_id(0)) * BR \
        + tl.arange(0, BR)  # rows (n, c, h) past 2**31: in 64 bits from the product
    q = tl.program_id(1) * BQ + tl.arange(0, BQ)
    rv = r < ROWS
    if IDX64:
        q = q.to(tl.int64)
    n, c, h, _, _ = tile_nchw(r, q, C, H, W, False)  # rows (n, c, h)
    if SHARED:  # one mask for every channel: the sample's only map
        plane = c * 0
    else:
        plane = c * H * W
    u0 = (plane + h * W)[:, None] + q[None, :] * 8  # the unit of w = 8q
    dropped = _dropped_bits(bits_ptr, (n * Bn)[:, None], u0, W, Bn, R, LO)
    j = tl.arange(0, 8)
    w = q[:, None] * 8 + j[None, :]  # (BQ, 8)
    m = rv[:, None, None] & (w < W)[None, :, :]
    keep = (1 - ((dropped[:, :, None] >> j[None, None, :]) & 1)).to(tl.float32)
    wt = keep * tl.load(s_ptr + n, mask=rv, other=0.0)[:, None, None]
    t_off = (n * t_sN + c * t_sC + h * t_sH)[:, None, None] + (w * t_sW)[None, :, :]
    if SAME:
        o_off = t_off
    else:
        o_off = (n * o_sN + c * o_sC + h * o_sH)[:, None, None] + (w * o_sW)[None, :, :]
    tv = tl.load(t_ptr + t_off, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + o_off, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _apply_bits_flat_kernel(t_ptr, o_ptr, bits_ptr, s_ptr, TOTAL, HW, MAG1, C, MAG2, HW_M,
                            HW_S, C_M, C_S, N, Bn, SHARED: tl.constexpr,
                            ONE_BYTE: tl.constexpr, BIG1: tl.constexpr, BIG2: tl.constexpr,
                            BLOCK: tl.constexpr, V: tl.constexpr, EVEN: tl.constexpr,
                            IDX64: tl.constexpr):
    """apply_seeds with r = 1 (a packed mask: the seeds plans' blocks) on contiguous NCHW t
    and out: groups of V = 8 elements (``_common.group_tile``; V | 8), one sample's each (C *
    H * W % 8 == 0), whose bits are read per group and selected per element.

    The group's units u0 .. u0 + V - 1 of its sample's string: c * H * W + pos (C maps per
    sample), one byte (ONE_BYTE); SHARED (one map for every channel): pos .. of that map,
    one byte where H * W % 8 == 0 (ONE_BYTE), else two bytes shifted into place, and where
    the group runs past its map's end (HW - pos < V, V <= HW + 1), the next map's first
    bits (the same sample's, as no group spans two samples) shifted in after them."""
    e, m, n, c, pos = group_tile(TOTAL, HW, MAG1, C, MAG2, HW_M, HW_S, C_M, C_S, BIG1, BIG2,
                                  BLOCK, V, IDX64, EVEN)
    if not EVEN:  # past the last sample: read s[N - 1] and its bits, never used
        n = tl.minimum(n, N - 1)
    row = n * Bn  # the sample's bit string
    u0 = pos if SHARED else c * HW + pos  # the group's first unit in it
    b0 = row + (u0 >> 3)
    bits = tl.load(bits_ptr + b0).to(tl.int32)
    if not ONE_BYTE:
        b1 = tl.load(bits_ptr + b0 + 1, mask=(u0 >> 3) + 1 < Bn, other=0).to(tl.int32)
        bits = ((bits | (b1 << 8)) >> (u0 & 7)) & 0xFF
        left = HW - pos  # the group's elements in its map, >= 1
        first = tl.load(bits_ptr + row).to(tl.int32)  # the next map's: the sample's first bits
        bits = tl.where(left < V, (bits & ((1 << left) - 1)) | (first << left), bits)
    else:
        bits = bits >> (u0 & 7)
    s = tl.load(s_ptr + n)
    dropped = ((bits[:, None] >> tl.arange(0, V)[None, :]) & 1) != 0
    # (1 - dropped) * s as the reference: 0 * s where dropped (NaN for an infinite s)
    wt = tl.where(dropped, (0.0 * s)[:, None], s[:, None])
    tv = tl.load(t_ptr + e, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + e, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _apply_bits_cl_kernel(t_ptr, o_ptr, bits_ptr, s_ptr, HW, C, W, MAGW, Bn,
                          t_sN, t_sH, t_sW, o_sN, o_sH, o_sW, SHARED: tl.constexpr,
                          ONE_BYTE: tl.constexpr, BQ: tl.constexpr, BI: tl.constexpr,
                          VEC: tl.constexpr, IDX64: tl.constexpr, SAME: tl.constexpr):
    """apply_seeds with r = 1 on channels_last t and out: a tile of sample program_id(2),
    BQ runs of 8 positions (p = 8q + j, p = h * W + w) x BI channels, as (BQ, 8, BI //
    VEC, VEC). The bits of a run's 8 units, per channel (c * H * W + 8q, C maps) or once
    (8q, SHARED), are one byte (ONE_BYTE: SHARED or H * W % 8 == 0) or two shifted into
    place, read per run and selected per element."""
    q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    j = tl.arange(0, 8)
    p = q[:, None] * 8 + j[None, :]  # (BQ, 8)
    h = tl.umulhi(p * 4, MAGW)
    w = p - h * W
    n = tl.program_id(2)
    c = (tl.program_id(1) * BI + tl.arange(0, BI // VEC) * VEC)[:, None] \
        + tl.arange(0, VEC)[None, :]  # (BI // VEC, VEC)
    if IDX64:
        n = n.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
        c = c.to(tl.int64)
    m = (p < HW)[:, :, None, None] & (c < C)[None, None, :, :]
    if SHARED:
        u0 = (q * 8)[:, None, None]  # (BQ, 1, 1): one byte per run for every channel
    else:
        u0 = (q * 8)[:, None, None] + (c * HW)[None, :, :]  # (BQ, BI // VEC, VEC)
    b0 = n * Bn + (u0 >> 3)
    bits = tl.load(bits_ptr + b0, mask=(u0 >> 3) < Bn, other=0).to(tl.int32)
    if not ONE_BYTE:
        b1 = tl.load(bits_ptr + b0 + 1, mask=(u0 >> 3) + 1 < Bn, other=0).to(tl.int32)
        bits = (bits | (b1 << 8)) >> (u0 & 7)
    dropped = ((bits[:, None, :, :] >> j[None, :, None, None]) & 1) != 0
    s = tl.load(s_ptr + n)
    # (1 - dropped) * s as the reference: 0 * s where dropped (NaN for an infinite s)
    wt = tl.where(dropped, 0.0 * s, s)
    t_off = (n * t_sN + h * t_sH + w * t_sW)[:, :, None, None] + c[None, None, :, :]
    tv = tl.load(t_ptr + t_off, mask=m).to(tl.float32)
    if SAME:
        o_off = t_off
    else:
        o_off = (n * o_sN + h * o_sH + w * o_sW)[:, :, None, None] + c[None, None, :, :]
    tl.store(o_ptr + o_off, (tv * wt).to(o_ptr.dtype.element_ty), mask=m)


@op("apply_seeds", fake_like)
def apply_seeds(t: torch.Tensor, bits: torch.Tensor, r: int, shared: bool,
                scale: torch.Tensor) -> torch.Tensor:
    """t * ((1 - dropped) * scale[n]); dropped = r x r expansion of the packed seeds.

    bits: (N, ceil(Cs*H*W/8)) uint8, Cs = 1 when ``shared`` (one mask for all channels),
    else C.
    """
    out = out_like(t)
    if out.numel() == 0:
        return out
    n, c, h, w = t.shape
    wb = cdiv(w, 8)
    bits = bits.contiguous()
    bn = bits.shape[1]
    scale = scale.to(torch.float32).contiguous()
    r, lo = int(r), int(r) - 1 - int(r) // 2
    # r = 1 (the seeds plans' blocks) on contiguous NCHW, samples of whole bytes: the flat
    # tile, a byte of bits per 8 elements (a shared map: positions of H * W >= 7)
    cs = 1 if shared else c
    flat = (flat_launch(t, out) if r == 1 and c * h * w % 8 == 0 and bn * 8 >= cs * h * w
            and (not shared or h * w >= 7) else None)
    if flat is not None:
        grid, meta = flat
        launch(_apply_bits_flat_kernel)[grid](
            t, out, bits, scale, out.numel(), N=n, Bn=bn, SHARED=bool(shared),
            ONE_BYTE=not shared or h * w % 8 == 0, V=min(8, meta["BLOCK"]), **meta)
        return out
    flags = apply_flags(t, out)
    if (r == 1 and walk_channels_last(t) and walk_channels_last(out)
            and n <= 65535 and h * w * w <= 2**30 and bn * 8 >= cs * h * w):
        bi = min(pow2(c), CL_CHANNELS)
        bq = max(1, min(CL_TILE // (8 * bi), pow2(cdiv(h * w, 8))))
        launch(_apply_bits_cl_kernel)[(cdiv(h * w, 8 * bq), cdiv(c, bi), n)](
            t, out, bits, scale, h * w, c, w, -(-2**30 // w), bn, t.stride(0),
            *t.stride()[2:], out.stride(0), *out.stride()[2:], SHARED=bool(shared),
            ONE_BYTE=bool(shared) or h * w % 8 == 0, BQ=bq, BI=bi,
            VEC=min(16 // t.element_size(), bi),
            num_warps=max(1, bq * 8 * bi // (32 * CL_PER_THREAD)), **flags)
        return out
    # r > 1 (the op called on seeds, not by the layers) and the layouts above decline:
    # the row tile, any strides
    bq = min(pow2(wb), max(1, APPLY_TILE // 8))
    br = max(1, min(APPLY_TILE // (8 * bq), pow2(n * c * h)))
    grid = (cdiv(n * c * h, br), cdiv(wb, bq))
    launch(_apply_seeds_rows_kernel)[grid](
        t, out, bits, scale, n * c * h, c, h, w, bn, *t.stride(), *out.stride(),
        R=r, LO=lo, SHARED=bool(shared), BR=br, BQ=bq,
        num_warps=warps(br * bq * 8), **flags)
    return out


__all__ = ["apply_block", "seed_bits", "seed_coverage", "apply_seeds"]
