"""Pure-PyTorch backend: the hot-path primitives of ``backend_contract.md``.

This is the test oracle and the path that runs everywhere (CPU, float64, GPUs without
Triton). The layer logic lives in :mod:`guidedrop.layers`; ``guidedrop.reference.<layer>``
(e.g. :func:`corrdrop`) runs a layer on this backend, without autograd.

Statistics are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

name = "reference"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _maps(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*W) in the compute dtype."""
    return x.to(compute_dtype(x)).flatten(2)


# --------------------------------------------------------------------------- statistics


QUANTUM = 2.0**-32  # the grid each P_ij is rounded to before F's row sums (exact in int64)
# Elements of one block of the Gram matrix (N, rows, columns) that pooled_correlation holds
# at a time in eager mode (32 MB of float64; it makes several of that size).
GRAM_BLOCK = 2**22


def pooled_size(h: int, w: int, k: int) -> tuple[int, int]:
    """(H', W') = (ceil(H/k), ceil(W/k)), CorrDrop's pooled map (SPEC §2), as
    (h + k - 1) // k: with symbolic sizes Dynamo failed on -(-h // k) (a view of F back to
    (N, H', W'): "Guard failed on the same frame it was created"). A symbolic k known to
    cover the map (one_window's max(H, W)) is one window, (1, 1), which the compiler cannot
    prove from the ceilings (each size 1 was a guard, k a constant of the graph); any other
    (a block size compiled as a symbolic argument) takes the ceilings."""
    if isinstance(k, torch.SymInt) and all(
            statically_known_true(k >= s) and statically_known_true(s >= 1) for s in (h, w)):
        return 1, 1
    return (h + k - 1) // k, (w + k - 1) // k


def one_window(k: int, h: int, w: int) -> int:
    """k clamped to max(H, W): a block at least as large as the map is one window (the
    same pooling, the same indices), so no work or memory grows with k beyond the map (any
    int k >= 1, however large, SPEC §1; or a k this function returned for the map).

    One guard under torch.compile and torch.export, the map within the block or not: k
    stays a constant of the graph where the map is larger than the block, and max(H, W), a
    symbolic k, within it (one window: pooled_size is (1, 1)). Symbolic H or W (torch.export's
    dynamic shapes): torch.sym_max, where Python's max guarded on which of H and W is larger
    (torch 2.11's Dynamo cannot trace it on ints; under Dynamo the sizes are not SymInts
    here)."""
    k = k if isinstance(k, torch.SymInt) else int(k)
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
        m = torch.sym_max(torch.sym_max(h, w), 1)
        return k if m > k else m
    return k if max(h, w) > k else max(h, w, 1)


def fitted_block(k: int, h: int, w: int) -> int:
    """DropBlock's block side r = min(k, H, W) (SPEC §7). One guard under torch.compile and
    torch.export, the map at least the block or not: r stays k, a constant of the graph,
    where it is, and min(H, W) below it (torch.sym_min with symbolic sizes, where Python's
    min guarded on which of H and W is smaller)."""
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
        m = torch.sym_min(h, w)
        return k if m >= k else m
    return min(k, h, w)


def blocks_dropped(p, h: int, w: int, k: int):
    """p'·N' of CorrDrop's eq. 11 and 6 (SPEC §2 step 4): p·H·W/(k²·H'·W') · H'·W', the
    blocks a sample drops on average, with the real block size k (H' = ceil(H/k)), for
    every backend. In SPEC's order in python floats (SPEC §1: host arithmetic as written;
    float64 tensor ops while torch.compile traces, p then rate64's tensor), so that
    p̂ = p'N'/z and q = 1 - p̂, in float64 on the device, are the spec's to the bit (the
    naive oracle's; another order, p·(H·W/k²), gave q = 0 where the spec's is 1.1e-16).
    From k = 2^31 on, k² overflows the int64 of torch.compile's symbolic ints
    (dynamic=True): p·H·W/k/k there (H' = W' = 1), eager too, and k >= 2^62 as 2^62: then
    p̂ <= (H·W)²·2^-124 < 2^-54 for any map under 2^35 units, and q rounds to 1 as with
    the real k; nor is a symbolic k past int64 in the graph."""
    if k < 2**31:
        hp, wp = pooled_size(h, w, k)
        return p * h * w / (k * k * hp * wp) * (hp * wp)
    kf = float(k) if k < 2**62 else 2.0**62
    return p * h * w / kf / kf


def pooled_correlation(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> F: (N, ceil(H/k), ceil(W/k)), SPEC §2 step 2.

    F decides CorrDrop's blocks (F_min = F_max, the order of the F_i), so mathematically
    equal F must be exactly equal (SPEC §1):
    - the window averages a in float64: a window's sum is then exact (but for values
      spanning over 2^23 in a float32 window of 7 x 7), so the kernels get the same a
      whatever order they add in (where it is not, as with 2^60, 1 and -2^60, Triton's
      order may give another a), and no sum overflows (float32 sums past 3.4e38 made F
      NaN, and F changed with the scale of x; a float64 sample from 2^960 up is first
      scaled down by a power of two);
    - â_i = b_i / ‖b_i‖, b_i = a_i / max|a_i| (0 for a zero row): no overflow or underflow
      of the norm, F is invariant to positive scaling of x; float64, so that equal or
      parallel rows give P_ij = 1 exactly once rounded to the grid;
    - P is symmetric to the last bit (the upper triangle mirrored);
    - each P_ij is rounded to a multiple of QUANTUM and the row sums are int64: exact, so
      independent of the order of the terms (the diagonal P_ii, 0 for a nonzero row and 1
      for a zero row, included as an exact term);
    - a NaN in P_i. makes F_i NaN (a NaN or Inf in a sample's x: every F of that sample,
      the zero rows' too: 0 · NaN in the Gram product).
    Empty x (N, H or W = 0): an empty F; C = 0: zero rows, F = 1 / N'.
    """
    n, c, h, w = x.shape
    k = one_window(k, h, w)
    hp, wp = pooled_size(h, w, k)
    ct = compute_dtype(x)
    if n * hp * wp == 0 or c == 0:
        return torch.full((n, hp, wp), 1.0 / max(hp * wp, 1), dtype=ct, device=x.device)
    x = x.double()
    if ct == torch.float64:
        # A sample whose largest |x| is 2^960 or more scaled down by a power of two (exact
        # but for values under 2^-1011 there) to under 2^961, where window sums of up to
        # 2^62 units cannot overflow: float64 sums of float64 x did from about 2^1017 (F NaN,
        # SPEC §2's invariance to scaling broken). Others as they are (scaled up to a
        # common size, a sample spanning 2^100 to 2^-1000 lost its small values); float32,
        # float16 and bfloat16 sums cannot overflow.
        big = x.abs().amax(dim=(1, 2, 3), keepdim=True)
        e = torch.frexp(torch.where(big.isfinite(), big, 0)).exponent
        x = torch.ldexp(x, -(e - 961).clamp(min=0))
    a = window_means(x, k, hp, wp)
    rows = a.flatten(2).transpose(1, 2)  # (N, N', C)
    s = rows.abs().amax(dim=2, keepdim=True)
    b = rows / s
    # float64: |â_i·â_j| within ~1e-16 (1 for equal rows once rounded to the grid)
    hat = torch.where(s == 0, 0, b / b.norm(dim=2, keepdim=True))
    m = hp * wp
    # P in square blocks of GRAM_BLOCK elements at most, those on and above the diagonal
    # (the whole (N, N', N') P was several GB at block_size 1 on 56 x 56 maps and a batch of
    # 128); compiled, one block (a loop over a symbolic N' makes it a constant of the graph).
    if torch.compiler.is_compiling():
        step, blocks = m, [(0, 0)]
    else:
        step = max(1, math.isqrt(GRAM_BLOCK // n))
        blocks = [(i, j) for i in range(0, m, step) for j in range(i, m, step)]
    total = torch.zeros(n, m, dtype=torch.long, device=x.device)
    nan = torch.zeros(n, m, dtype=torch.bool, device=x.device)
    for i, j in blocks:
        g = (hat[:, i:i + step] @ hat[:, j:j + step].transpose(1, 2)).abs()
        if i == j:  # each |â_i·â_j| once, for rows i and j; P_ii exactly
            g = g.triu() + g.triu(1).transpose(1, 2)
        bad = g.isnan()
        q = torch.where(bad, 0, g / QUANTUM + 0.5).floor().long()
        if i == j:
            eye = torch.eye(q.shape[1], dtype=torch.bool, device=x.device)
            q = torch.where(eye, (s[:, i:i + step] == 0).long() * int(1 / QUANTUM), q)
        total[:, i:i + step] += q.sum(dim=2)
        nan[:, i:i + step] |= bad.any(dim=2)
        if i != j:  # the block below the diagonal: this one mirrored
            total[:, j:j + step] += q.sum(dim=1)
            nan[:, j:j + step] |= bad.any(dim=1)
    f = total.double() * QUANTUM / m
    return torch.where(nan, math.nan, f).to(ct).view(n, hp, wp)


def window_means(x: torch.Tensor, k: int, hp: int, wp: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H', W'): the mean of each k x k window, k apart; a window cut by
    the border averages its valid units (avg_pool2d's ceil_mode without padding). The
    windows' sums (avg_pool2d with divisor 1, in its order) over x zero-padded to whole
    windows, divided by their unit counts: with symbolic H and W, ceil_mode added a guard
    that torch.export could not prove (and a reshape of the padded x into windows, one that
    Dynamo failed on where H <= k < W)."""
    h, w = x.shape[-2:]
    if not torch.compiler.is_compiling():
        # Eager: windows no taller or wider than the map (the same sums), so that the zero
        # padding stays under twice the map: a 1 x W map in one window of k = W (any larger
        # block) was padded to W x W.
        kh, kw = min(k, h), min(k, w)
        s = F.avg_pool2d(F.pad(x, (0, wp * kw - w, 0, hp * kh - h)), (kh, kw),
                         stride=(kh, kw), divisor_override=1)
    elif hp == 1 and wp == 1:
        # Compiled or exported, one window (the map within the block: k = max(H, W) is
        # symbolic, a SymInt under torch.export): its sum, since avg_pool2d would make k a
        # constant of the graph, a graph per map size. The same sum wherever the window's
        # sum is exact (pooled_correlation).
        s = x.sum(dim=(-2, -1), keepdim=True)
    else:
        s = F.avg_pool2d(F.pad(x, (0, wp * k - w, 0, hp * k - h)), k, stride=k,
                         divisor_override=1)
    rows = (h - torch.arange(hp, device=x.device) * k).clamp(max=k)  # valid units per window
    cols = (w - torch.arange(wp, device=x.device) * k).clamp(max=k)
    return s / (rows[:, None] * cols[None, :])


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) -> (max |x|, mean), each (N, C); empty maps: 0 and NaN.

    The sums are float64, so that mathematically equal means (the same values in another
    order) are exactly equal: FocusedDropout's argmax decides on them (SPEC §1). That
    holds while every partial sum is exact: for float32 values, while their magnitudes span
    less than about 2^(29 - log2(H*W)) (2^17 on a 56 x 56 map); beyond, e.g. 2^60, 1 and
    -2^60 in one map, another order (another backend or layout) can give another mean.
    """
    m = _maps(x)
    if m.shape[2] == 0:
        return m.new_zeros(m.shape[:2]), m.new_full(m.shape[:2], float("nan"))
    mean = (m.sum(dim=2, dtype=torch.float64) / m.shape[2]).to(m.dtype)
    return m.abs().amax(dim=2), mean


_KEY = {torch.float32: (torch.int32, 0x7FC00000), torch.float64: (torch.int64, 0x7FF8 << 48)}


def order_key(v: torch.Tensor) -> torch.Tensor:
    """float32 / float64 v -> int32 / int64 keys in the order that ranks every selection:
    the float order, with -0.0 below +0.0 and every NaN one key (the canonical NaN's)
    above +Inf, as the kernels' keys (triton_kernels._common.float_key). torch.topk and
    amin rank ±0 as ties, and which zero they return depends on the elements' order."""
    itype, nan = _KEY[v.dtype]
    b = torch.where(v.isnan(), nan, v.resolve_neg().view(itype))  # (a lazy negation)
    return torch.where(b < 0, b ^ torch.iinfo(itype).max, b)


def key_value(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of order_key (a NaN comes back as the canonical NaN)."""
    return torch.where(key < 0, key ^ torch.iinfo(key.dtype).max, key).view(dtype)


def kth_largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """v: (R, L) float32 or float64 -> (R,), the k-th largest value of each row (order_key:
    ties by value, -0.0 below +0.0, NaN largest)."""
    # clone: a view would keep the whole (R, k) topk buffer alive
    return key_value(order_key(v).topk(k, dim=1).values[:, -1].clone(), v.dtype)


def map_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C), the k-th largest value of each map (NaN: empty maps)."""
    n, c = x.shape[:2]
    m = _maps(x).flatten(0, 1)
    if m.shape[1] == 0:  # no k-th largest in an empty map
        return m.new_full((n, c), float("nan"))
    return kth_largest(m, k).view(n, c)


def range_reciprocal(mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """r = 1 / (mx − mn) rounded up (toward +Inf), elementwise: the per-map factor of
    AttentionDrop's f̂ (SPEC §4 step 2), computed once per map so that no kernel divides per
    unit. Rounded up, (mx − mn)·r ≥ 1, so f̂ = min((x − mn)·r, 1) is exactly 1 at the map's
    maximum. IEEE's 1/d rounded up, as CUDA's ``__frcp_ru`` and PTX's ``rcp.rp.f32``:
    the nearest quotient, one float up where it lies below 1/d (for float32 the product d·r
    is exact in float64; for float64 stats, the reference's alone, it is rounded).
    d = ±0 gives ±Inf, d = ±Inf gives ±0, NaN gives NaN. A known deviation from SPEC §4's
    quotient: float32 d of at most 2^-128 (a map of subnormal differences) also gives +Inf, so
    every unit above the minimum gets f̂ = 1 (tests/test_numerics.py, a strict xfail).

    mn, mx: float32 or float64 tensors of one shape; returns that shape and dtype."""
    d = mx - mn
    r = 1 / d
    p = d.double() * r.double() if d.dtype == torch.float32 else d * r
    low = torch.where(d > 0, p < 1, p > 1)  # r < 1/d; False where p is NaN (0, Inf, NaN)
    return torch.where(low, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _soft_mask(xf, thr, mn, r, mode):
    """SPEC §4 step 3 on maps xf (..., L) or (..., H, W) with per-map stats broadcast to
    them, r = range_reciprocal of the map's min and max."""
    if mode == "am":
        return (xf < thr).to(xf.dtype)
    # f̂ = 0 wherever (x − min)·r is not a number (max = min: 0·Inf; ±Inf in the map or
    # max − min overflowing: Inf·0): every S is then finite and in [0, 1] (SPEC §1, §4).
    q = (xf - mn) * r
    fhat = torch.where(q >= 0, q.clamp(max=1), 0)
    if mode == "sm":
        return 1 - fhat
    return 1 - fhat * (xf >= thr)


def attention_stats(x, k, active, mode):
    """x: (N, C, H, W), active: (N, C) bool -> (thr, mn, r, msum), each (N, C): the k-th
    largest value, the minimum, r = range_reciprocal(min, max) (in order_key's order: -0.0
    below +0.0; a NaN in the map makes all three NaN) and the soft mask's sum, in float64
    (see backend_contract.md: exact in any order of summation)."""
    m = _maps(x)
    key = order_key(m)  # -0.0 below +0.0 (amin and amax return either zero)
    thr = key_value(key.topk(k, dim=2).values[..., -1].clone(), m.dtype)  # not a view
    mx = key_value(key.amax(dim=2), m.dtype)
    mn = torch.where(mx.isnan(), mx, key_value(key.amin(dim=2), m.dtype))  # NaN propagates
    r = range_reciprocal(mn, mx)
    s = _soft_mask(m, thr[..., None], mn[..., None], r[..., None], mode)
    return thr, mn, r, s.sum(dim=2, dtype=torch.float64)


def cam(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W), alpha: (N, C) -> J: (N, H, W) = sum_c alpha[n, c] x[n, c].

    Summed in float64, so that mathematically equal J (the same channel terms in another
    order: another position, backend or layout) are equal once rounded to float32: J's
    top-k decides CamDrop's candidates (SPEC §1). The products are exact in float64 (48
    bits at most), their sum is not always: it holds unless terms cancel across magnitudes
    (2^100, 1 and -2^100 at one position: J is 0 or 1 by the order) or, rarely, a sum lies
    within its float64 rounding of a float32 rounding boundary. A zero J is
    +0.0, as a sum that starts at +0.0 gives it (the kernels'), also where every term is
    -0.0 (with C = 1 einsum is a product): -0.0 ranks below +0.0 in the top-k.
    """
    f64 = torch.float64
    j = torch.einsum("nchw,nc->nhw", x.to(f64), alpha.to(f64)) + 0.0  # -0.0 + 0.0 = +0.0
    return j.to(compute_dtype(x))


# --------------------------------------------------------------------------- seed masks

def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """bool (..., L) -> uint8 (..., ceil(L/8)); bit j of byte q holds element 8q + j."""
    length = b.shape[-1]
    b = F.pad(b.to(torch.uint8), (0, -length % 8)).unflatten(-1, (-1, 8))
    weights = torch.arange(8, dtype=torch.uint8, device=b.device)
    return (b << weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(p: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 (..., ceil(L/8)) -> bool (..., L), L = length; inverse of :func:`pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=p.device)
    return ((p.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :length].bool()


def unpack_seeds(bits: torch.Tensor, cs: int, h: int, w: int) -> torch.Tensor:
    """Packed seeds uint8 (N, ceil(Cs*H*W/8)) -> bool (N, Cs, H, W)."""
    return unpack_bits(bits, cs * h * w).unflatten(-1, (cs, h, w))


def valid_centres(h: int, w: int, r: int, device) -> torch.Tensor:
    """(H, W) bool: centres whose r x r block (offset r//2 before the centre) fits."""
    def axis(n):
        i = torch.arange(n, device=device)
        return (i >= r // 2) & (i <= n - r + r // 2)
    return axis(h)[:, None] & axis(w)[None, :]


def expand_seeds(seeds: torch.Tensor, r: int) -> torch.Tensor:
    """bool (N, C, H, W) seeds -> bool: units inside the r x r block of some seed."""
    h, w = seeds.shape[-2:]
    lo, hi = r - 1 - r // 2, r // 2  # unit h is covered by seeds at h - lo .. h + hi
    if torch.compiler.is_compiling() or isinstance(r, torch.SymInt):
        # Compiled: the seeds in each r x r window counted by prefix sums, so that a
        # symbolic r (dynamic shapes, a map smaller than the block) stays symbolic; the loops
        # below would make it a constant of the graph, a graph per map size. Eager, the
        # loops: about 10x faster on a CPU.
        c = F.pad(seeds.to(torch.int32), (lo + 1, hi, lo + 1, hi)).cumsum(-2).cumsum(-1)
        box = (c[..., r:r + h, r:r + w] - c[..., :h, r:r + w]
               - c[..., r:r + h, :w] + c[..., :h, :w])
        return box > 0
    s = F.pad(seeds.to(torch.uint8), (lo, hi, lo, hi))
    # A separable OR of r shifted views: far cheaper on CPU than max_pool2d.
    rows = s[..., :h, :].clone()
    for d in range(1, r):
        rows |= s[..., d:d + h, :]
    out = rows[..., :w].clone()
    for d in range(1, r):
        out |= rows[..., d:d + w]
    return out.bool()


def rate_tensor(g, device) -> torch.Tensor:
    """A rate as a 0-dim tensor: g itself when it is one (the layers pass the compute
    dtype), a python float as float32 (backend_contract.md)."""
    if isinstance(g, torch.Tensor):
        return g.reshape(())
    # ones * g, not torch.tensor(g, device=...): no host-to-device copy (graph capture)
    return torch.ones((), dtype=torch.float32, device=device) * float(g)


def seed_bits(noise, generator, g, r, cand_s, cand_c, shape, device):
    """Packed seeds uint8 (N, ceil(Cs*H*W/8)): one bit string per sample, the units in
    (cs, h, w) order; see backend_contract.md. g: 0-dim tensor in the compute dtype."""
    n, cs, h, w = shape
    g = rate_tensor(g, device)
    if noise is None:
        from .layers import rand
        noise = rand(shape, generator, device)
    # u < g with u rounded to g's dtype (the compute dtype) whatever noise's dtype (SPEC §1).
    seeds = (noise.to(g.dtype) < g) & valid_centres(h, w, r, noise.device)
    if cand_s is not None:
        seeds &= cand_s[:, None]
    if cand_c is not None:
        seeds &= cand_c[:, :, None, None]
    return pack_bits(seeds.flatten(1))


def seed_coverage(bits: torch.Tensor, r: int, cs: int, h: int, w: int) -> torch.Tensor:
    """(N,) int64: units covered by the r x r expansion of the seeds of the Cs maps."""
    return expand_seeds(unpack_seeds(bits, cs, h, w), r).sum(dim=(1, 2, 3))


def seed_blocks(bits: torch.Tensor, r: int, cs: int, h: int, w: int) -> torch.Tensor:
    """The r x r expansion of packed seeds, packed like them: uint8 (N, ceil(Cs*H*W/8)),
    bit set where a unit is covered (the bits after the last unit 0). The seeds plans keep
    it as their state, so that the applies read one bit per unit (``apply_seeds`` with
    r = 1), not r rows of seeds."""
    return pack_bits(expand_seeds(unpack_seeds(bits, cs, h, w), r).flatten(1))


# --------------------------------------------------------------------------- apply


def _mul(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """t * w in the compute dtype, cast back, with t's strides (``empty_like``), as the
    kernels' outputs."""
    ct = compute_dtype(t)
    prod = t.to(ct) * w.to(ct)
    if torch.compiler.is_compiling():
        # No copy_ into empty_like(t), and no output that is another tensor's alias
        # (prod.to(prod.dtype) is prod): torch 2.11 traced either, as this autograd
        # Function's output, with a backward of zeros (grad_x = 0 on every layer under
        # torch.compile; seen on an H200 and on the CPU, not on torch 2.14).
        return prod if prod.dtype == t.dtype else prod.to(t.dtype)
    return torch.empty_like(t).copy_(prod)


def apply_channel(t, w):
    """t: (N, C, H, W), w: (N, C) -> t * w[n, c]."""
    return _mul(t, w[:, :, None, None])


def upsample(mask: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    """(N, Hs, Ws) -> (N, H, W): mask[n, i // k, j // k]. Indexed, so that neither work nor
    memory grows with k (any k >= 1; k >= max(H, W) reads mask[n, 0, 0])."""
    k = one_window(k, h, w)
    i = torch.arange(h, device=mask.device) // k
    j = torch.arange(w, device=mask.device) // k
    return mask[:, i[:, None], j[None, :]]


def apply_block(t, mask, k, scale):
    """t * (mask[n, h//k, w//k] * scale[n]); mask: (N, Hs, Ws) uint8, scale: (N,)."""
    h, w = t.shape[-2:]
    m = upsample(mask.to(scale.dtype) * scale[:, None, None], k, h, w)
    return _mul(t, m[:, None])


def apply_seeds(t, bits, r, shared, scale):
    """t * ((1 - dropped) * scale[n]), dropped = r x r expansion of the packed seeds of
    1 map (``shared``: one mask for every channel) or C maps per sample."""
    n, c, h, w = t.shape
    keep = ~expand_seeds(unpack_seeds(bits, 1 if shared else c, h, w), r)
    return _mul(t, keep.to(scale.dtype) * scale[:, None, None, None])


def attention_state(thr, mn, r, scale):
    """The per-map state of AttentionDrop's apply: (N, C, 4) = (thr, scale[n], mn, r) of
    each map, from thr, mn, r (N, C) (``attention_stats``) and scale (N,), in their dtype
    (float32 but for float64 x): a map's whole state is one 16-byte load ("am", which
    reads thr and the scale only: one 8-byte load)."""
    return torch.stack([thr, scale[:, None].expand_as(thr), mn, r], dim=-1)


def apply_attention(t, x, state, active, mode):
    """t * (S * scale[n]) where active, t * scale[n] elsewhere; S from x and the map's
    statistics, state = attention_state(thr, mn, r, scale) (SPEC §4)."""
    # On x's (N, C, H, W) itself, not its (N, C, H * W) view: under torch.compile(dynamic=
    # True) the view of a channels_last x, saved for the backward, has strides torch
    # 2.14's inductor cannot order (C·H·W against C: "cannot determine truth value of
    # Relational", AttentionDrop after a ResNet's stride-2 stage).
    thr, scale, mn, r = (v[..., None, None] for v in state.unbind(-1))
    s = _soft_mask(x.to(compute_dtype(x)), thr, mn, r, mode)
    return _mul(t, torch.where(active[..., None, None], s, 1) * scale)


# --------------------------------------------------------------------------- layers


def _layer(layer: str):
    def run(x: torch.Tensor, *args, noise=None, generator=None, **params) -> torch.Tensor:
        from . import layers, reference
        if x.numel() == 0:  # as guidedrop.functional: x itself (layers.* take a non-empty x)
            return x
        with torch.no_grad():
            plan = getattr(layers, layer)(reference, x, *args, noise=noise, generator=generator,
                                          **params)
            # no plan: nothing is dropped (CamDrop's block larger than the map), x itself
            return x if plan is None else layers.apply(reference, plan, x, x)
    run.__name__ = run.__qualname__ = layer
    run.__doc__ = (f"``{layer}`` on the reference backend, without autograd: the arguments of "
                   f"guidedrop.functional.{layer}, all given and unchecked (the tests' "
                   "oracle; the functional op checks them).")
    return run


corrdrop, selectscale, spatialscale, selectout = map(
    _layer, ["corrdrop", "selectscale", "spatialscale", "selectout"])
attentiondrop, focused_dropout, camdrop, dropblock = map(
    _layer, ["attentiondrop", "focused_dropout", "camdrop", "dropblock"])
