"""The layers of SPEC.md, written once over a backend's hot-path primitives.

Each layer function takes a backend module ``B`` (see ``backend_contract.md``), an
already validated input ``x: (N, C, H, W)`` and its parameters, and returns a
:class:`Plan`: the small state from which ``w`` is rebuilt by one of the backend's apply
kernels, in the forward (on x) and in the backward (on grad_y). ``None`` means the
layer is the identity for this input. The arithmetic between the primitives works on
(N,)-, (N, C)- or (N, H', W')-sized tensors only, and is the same for every backend,
so backends whose primitives agree produce the same masks.

Functions here do no validation and no autograd: see :mod:`guidedrop.functional`.

Plan kernels. The torch code of each layer below is the reference plan: the oracle and the
contract. A kernel backend may fuse a layer's arithmetic between the primitives into its
own plan kernel, exposed as ``B.plan_<layer>(x, ...)`` with the layer's signature less
``B``; the layer function then calls it instead of its torch code (:func:`fusable`). A
plan kernel returns the same :class:`Plan` as the torch code on the reference backend, for
the same ``noise``, bit for bit (tests/test_plans_*.py), in at most the launch budget of
tests/test_launches.py, with no host synchronisation and with every rate a runtime
argument (SPEC §8).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import torch

from . import _validation, reference


class Plan(NamedTuple):
    kind: str  # "channel" | "block" | "seeds" | "attention": which apply kernel
    meta: tuple  # python ints / strings the apply kernel needs
    state: tuple  # small tensors kept for backward


def _readable(v):
    """A floating tensor argument (noise, CamDrop's weight) of a dtype the kernels do not
    read (float8: Triton's launcher has no type for float8_e8m0fnu, the CUDA ops refuse
    every float8) as float32: exact, and every layer rounds it to float32 (or float64)
    anyway (SPEC §1: noise of any floating dtype; CamDrop's weights rounded to float32)."""
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype not in _validation.FLOATS:
        return v.float()
    return v


def fusable(layer):
    """Decorator: run ``B.plan_<layer>`` (the backend's plan kernel) when B has one, else
    the torch code of the layer (the reference plan); float8 arguments first as float32
    (``_readable``), for every backend alike."""
    name = f"plan_{layer.__name__}"

    @functools.wraps(layer)
    def run(B, *args, **kwargs):
        args = tuple(_readable(a) for a in args)
        kwargs = {k: _readable(v) for k, v in kwargs.items()}
        fused = getattr(B, name, None)
        return layer(B, *args, **kwargs) if fused is None else fused(*args, **kwargs)

    run.reference = layer  # the torch code itself, whatever the backend
    return run


def apply(B, plan: Plan, t: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """t * w, w rebuilt from ``plan`` (x is needed only by AttentionDrop's soft mask)."""
    kind, meta, s = plan
    if kind == "channel":
        return B.apply_channel(t, s[0])
    if kind == "block":
        return B.apply_block(t, s[0], meta[0], s[1])
    if kind == "seeds":
        return B.apply_seeds(t, s[0], meta[0], meta[1], s[1])
    return B.apply_attention(t, x, s[0], s[1], meta[0])


def rand(shape, generator, device) -> torch.Tensor:
    """Uniforms in [0, 1) from ``generator`` (None: torch's default for ``device``)."""
    if generator is None:  # torch.rand(..., generator=None) fails on symbolic shapes
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=device)


def _uniform(noise, shape, generator, x):
    """The op's uniforms: ``noise`` or a fresh draw, rounded to the compute dtype of x
    (SPEC §1: ``bernoulli(q)`` is ``u < q`` with u and q both in the compute dtype)."""
    u = noise if noise is not None else rand(shape, generator, x.device)
    return u.to(reference.compute_dtype(x))


def _rate(q, x) -> torch.Tensor:
    """A rate q (python float, symbolic under torch.compile, or :func:`rate64`'s tensor) as
    a 0-dim tensor in the compute dtype of x: rounded like the uniforms it is compared with
    (SPEC §1), and a runtime value for the kernels (SPEC §8: a python float argument of a
    kernel op would be a compile-time constant, one recompile per rate). ones * q, not
    full((), q): a tensor fill value would freeze q under torch.compile; no host-to-device
    copy (no sync). A float64 q promotes the product: .to rounds it as the float's."""
    dtype = reference.compute_dtype(x)
    return (torch.ones((), dtype=dtype, device=x.device) * q).to(dtype)


def rate64(q, device):
    """A rate for arithmetic (1 - keep, p * HW / k², ...): q itself in eager mode; while
    torch.compile traces, q in a 0-dim float64 tensor on ``device``, so that the
    arithmetic is tensor ops. Dynamo of torch 2.11 (the GPU machine's) specialises a graph
    on python arithmetic of a symbolic float, one recompile per rate (SPEC §8), but not on
    a tensor's; float64 tensor ops round each step as python's floats do."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float64, device=device) * q
    return q


def beta_count(beta: float, h: int, w: int) -> int:
    """AttentionDrop's n_β = max(1, ceil(beta * H * W / 100)) in Python floats, left to
    right (SPEC §1, §4). With dynamic shapes under torch.compile, H and W are symbolic and
    so would be the product, which sympy re-associates (16.1 * W * H: 161 on a 100 x 10 map,
    where ((16.1 * 100) * 10) / 100 gives 162; the kernel backends then failed a guard in
    the frame that made it). operator.index makes each size a concrete int, with a guard:
    the count specialises on the map size (one graph per size, as without dynamic shapes);
    beta is a python float (functional.attentiondrop converts it)."""
    return max(1, math.ceil(beta * operator.index(h) * operator.index(w) / 100))


def top_count(rate, n: int, device):
    """max(1, round(rate * n)), the size of a top-k (SPEC §1: Python's round, half to even):
    an int in eager mode; while torch.compile traces, that value in a 0-dim float64 tensor
    (torch.round also rounds half to even), so that a new rate is a runtime value of the
    graph, not a recompile: an int computed from a symbolic float is specialised on, one
    recompile per rate (SPEC §8)."""
    if not torch.compiler.is_compiling():
        return max(1, round(rate * n))
    return (torch.ones((), dtype=torch.float64, device=device) * rate * n).round().clamp(min=1)


def drop_count(keep, n: int, device) -> torch.Tensor:
    """round((1 - keep) * n), Selectout's n_d (SPEC §3), as a 0-dim float64 tensor (torch.round
    rounds half to even, like round()), so that torch.compile does not recompile for every
    keep a schedule sets. In tensor ops, (1 - ones * keep) * n: the python product of a
    symbolic keep is rewritten by inductor as n - n * keep, which rounds otherwise (n = 15,
    keep = 0.9: 1.5 for 1.4999999999999996, two channels dropped), and torch 2.11
    specialises on 1 - keep (:func:`rate64`)."""
    return ((1 - torch.ones((), dtype=torch.float64, device=device) * keep) * n).round()


def _scale(kept: torch.Tensor, units: int, normalize: str, dtype) -> torch.Tensor:
    """(N,) multiplier of SPEC §1 from the kept weight per sample; 0 where nothing is kept."""
    n = kept.shape[0]
    if normalize == "none":
        return torch.ones(n, dtype=dtype, device=kept.device)
    kept = kept.to(torch.float64)
    if normalize == "batch":
        kept, units = kept.sum().expand(n), units * n
    return torch.where(kept > 0, units / kept.clamp_min(1e-300), 0).to(dtype)


def _top(B, v: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Rows of v (R, L): the top k (an int, or top_count's 0-dim tensor while torch.compile
    traces, on the reference backend: the kernel backends' plans take the rate) by value,
    ties kept (SPEC §1) -> bool (R, L). In the order kth_largest ranks by: a NaN above
    every number, so a NaN is always in the top k (also where the k-th largest is NaN);
    -0.0 and +0.0 tie (compared by value)."""
    if v.shape[1] == 0:  # C = 0: no candidates (kth_largest needs k <= L)
        return torch.zeros_like(v, dtype=torch.bool)
    vf = v.float() if v.dtype != torch.float64 else v
    if isinstance(k, torch.Tensor):  # top_count's runtime k: kth_largest's value by a sort
        keys = reference.order_key(vf).sort(dim=1, descending=True).values
        t = reference.key_value(keys.gather(1, (k.long() - 1).expand(v.shape[0], 1)), vf.dtype)
    else:
        t = B.kth_largest(vf, k)[:, None]
    return (v >= t) | v.isnan()


# --------------------------------------------------------------------------- CorrDrop


@fusable
def corrdrop(B, x, p, block_size, *, normalize, noise=None, generator=None):
    """SPEC §2. State: S (N, H', W') uint8 and scale (N,)."""
    n, c, h, w = x.shape
    # Blocks larger than the map are one block: the pooling, the border arithmetic and the
    # apply take k = max(H, W) (same windows, same indices); only p' reads the real k.
    k = reference.one_window(block_size, h, w)
    hp, wp = reference.pooled_size(h, w, k)
    u = _uniform(noise, (2, n, hp, wp), generator, x).flatten(2)
    f = B.pooled_correlation(x, k).flatten(1)  # (N, N')
    fmin, fmax = f.amin(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)
    rng = fmax - fmin
    kappa = torch.where(rng > 0, (f - fmin) / torch.where(rng > 0, rng, 1), 0)
    m = u[0] < kappa
    # eq. 11 times N' with the real block size
    p_blocks = reference.blocks_dropped(rate64(p, x.device), h, w, block_size)
    z = (~m).sum(dim=1, keepdim=True)
    # eq. 6; z = 0 means every block is kept by M already. In float64, so that 1 - p̂ is
    # rounded to the compute dtype once (SPEC §1: q rounded, not each step of it; float32
    # steps moved q by an ulp for some (p, H, W, k, z), found by fuzzing).
    # (ones * c) / z, not c / z: a python c over a tensor is reciprocal(z) * c (other
    # rounding), and a tensor fill value would freeze p under torch.compile.
    ones = torch.ones_like(f[:, :1], dtype=torch.float64)
    p_hat = (ones * p_blocks / z.clamp_min(1)).clamp(max=1)
    keep = m | (u[1] < (1 - p_hat).to(u.dtype))
    # Units of each pooled block (border blocks are cut): kept units per channel.
    rows = (h - torch.arange(hp, device=x.device) * k).clamp(max=k)
    cols = (w - torch.arange(wp, device=x.device) * k).clamp(max=k)
    kept = (keep * (rows[:, None] * cols[None, :]).flatten()).sum(dim=1)
    scale = _scale(kept, h * w, normalize, f.dtype)
    return Plan("block", (k,), (keep.view(n, hp, wp).to(torch.uint8), scale))


# --------------------------------------------------------------------------- SelectScale


def _channel_candidates(B, x, top_rate):
    amax, _ = B.channel_stats(x)
    return _top(B, amax, top_count(top_rate, x.shape[1], x.device))


@fusable
def selectscale(B, x, top_rate, retain, *, noise=None, generator=None):
    """SPEC §3. State: w (N, C)."""
    u = _uniform(noise, x.shape[:2], generator, x)
    cand = _channel_candidates(B, x, top_rate)
    retain = rate64(retain, x.device)
    w = torch.where(cand, retain + 2 * (1 - retain) * u, 1)
    return Plan("channel", (), (w,))


@fusable
def spatialscale(B, x, retain, *, noise=None, generator=None):
    """SPEC §3, every channel a candidate. State: w (N, C)."""
    u = _uniform(noise, x.shape[:2], generator, x)
    retain = rate64(retain, x.device)
    return Plan("channel", (), (retain + 2 * (1 - retain) * u,))


@fusable
def selectout(B, x, top_rate, keep, *, noise=None, generator=None):
    """SPEC §3. State: w (N, C)."""
    n, c = x.shape[:2]
    u = _uniform(noise, (n, c), generator, x)
    cand = _channel_candidates(B, x, top_rate)
    n_drop = drop_count(keep, c, x.device)
    # The n_drop candidates with the smallest u (NaN the largest); stable sorts take the
    # first index on ties. By u, then candidates first: not where(cand, u, inf), where a
    # candidate's u of +inf or NaN ranked with or after the other channels.
    order = u.argsort(dim=1, stable=True)
    order = order.gather(1, (~cand).gather(1, order).to(torch.uint8).argsort(dim=1, stable=True))
    drop = order.argsort(dim=1) < n_drop  # a channel's rank in that order; no n_drop-sized shape
    # ones * (1/keep): no host-to-device copy (a sync, and an error under CUDA graph
    # capture), and keep stays symbolic under torch.compile.
    w = torch.where(drop, 0.0, torch.ones_like(u) * (1 / rate64(keep, x.device)))
    return Plan("channel", (), (w,))


# --------------------------------------------------------------------------- AttentionDrop


@fusable
def attentiondrop(B, x, alpha, beta, *, mode, normalize, noise=None, generator=None):
    """SPEC §4. State: (N, C, 4) per map thr, min, r = 1 / (max - min) rounded up
    (reference.range_reciprocal) and the sample's scale (reference.attention_state);
    gamma (N, C); and x."""
    n, c, h, w = x.shape
    u = _uniform(noise, (n, c), generator, x)
    active = u < _rate(alpha, x)  # gamma, drawn first: statistics only where it is 1
    n_beta = beta_count(beta, h, w)
    thr, mn, r, msum = B.attention_stats(x, n_beta, active, mode)
    # Inactive maps: 0 (the contract leaves them unspecified; plans compare exactly).
    thr, mn, r = (torch.where(active, s, 0) for s in (thr, mn, r))
    # msum is float64 and exact (backend_contract.md), so are these sums, in any order.
    kept = torch.where(active, msum, h * w).sum(dim=1)
    scale = _scale(kept, c * h * w, normalize, thr.dtype)
    return Plan("attention", (mode,), (reference.attention_state(thr, mn, r, scale), active))


# --------------------------------------------------------------------------- FocusedDropout


@fusable
def focused_dropout(B, x, low, high, *, per_position, noise=None, generator=None, applied=None):
    """SPEC §5. State: the spatial mask (N, H, W) uint8 shared by every channel.

    applied: None, or a 0-d bool tensor on x's device, the module's participation under
    torch.compile / CUDA graphs: where it is False the plan is the identity's (mask all
    ones, scale 1). The plan kernels then read no x (statistics and plan skip it: one read
    of x in all, the apply's, SPEC §5); the torch code here computes and discards.
    """
    n, c, h, w = x.shape
    u = _uniform(noise, (n, h, w) if per_position else (n,), generator, x)
    _, mean = B.channel_stats(x)
    ref = x[torch.arange(n, device=x.device), mean.argmax(dim=1)].to(mean.dtype)  # (N, H, W)
    v = ref.flatten(1).amax(dim=1)
    low, high = rate64(low, x.device), rate64(high, x.device)
    gamma = low + (high - low) * u
    if not per_position:
        gamma = gamma[:, None, None]
    keep = (ref > gamma * v[:, None, None]) | (v <= 0)[:, None, None]
    if applied is not None:
        keep = keep | ~applied
    return Plan("block", (1,), (keep.to(torch.uint8), torch.ones(n, device=x.device)))


# --------------------------------------------------------------------------- CamDrop / DropBlock


def _seed_rate(rate, r, h, w):
    """DropBlock's seed rate g (SPEC §6.4, §7); r <= H and r <= W. rate: a float, or
    rate64's tensor while traced. Not checked (no GPU here): inductor on a GPU lowers a
    division by a constant to a multiplication by its reciprocal, which can move the
    float64 g by an ulp (a float32 g, by an ulp in about 2^-29 of the rates)."""
    return rate / r**2 * (h * w) / ((h - r + 1) * (w - r + 1))


def _seeds_plan(B, bits, r, shape, c, normalize, dtype):
    """shape: (N, Cs, H, W) of the seeds, Cs = 1 (one mask for the C channels) or C.

    The state is the seeds' r x r blocks, packed (``reference.seed_blocks``), not the seeds:
    the apply (``apply_seeds`` with r = 1, meta (1, shared)) then reads one bit per unit
    rather than r rows of seeds, forward and backward; the plan kernels write the blocks
    where they count them."""
    _, cs, h, w = shape
    covered = B.seed_coverage(bits, r, cs, h, w) * (c // cs)  # a shared map covers every channel
    scale = _scale(c * h * w - covered, c * h * w, normalize, dtype)
    return Plan("seeds", (1, cs == 1), (reference.seed_blocks(bits, r, cs, h, w), scale))


@fusable
def camdrop(B, x, weight, target, block_size, keep, *, channel_rate, normalize,
            noise=None, generator=None):
    """SPEC §6. State: the packed blocks of the seeds (N, ceil(C*H*W/8)) uint8 and scale (N,)."""
    n, c, h, w = x.shape
    # SPEC §6 step 0 on the device (a CPU target was checked on the host already): the
    # reference asserts in torch ops; a kernel backend's plan in its first CamDrop kernel.
    target = _validation.assert_target(target, weight.shape[0])
    r = block_size
    if reference.fitted_block(r, h, w) < r:  # no valid centre: nothing is dropped
        return None
    dt = reference.compute_dtype(x)
    alpha = weight.detach()[target].to(dt)  # (N, C_fc)
    # C_fc / C consecutive weights per channel, averaged in float64: the same mean in any
    # order of summation (alpha's top-k is a decision, SPEC §1), then rounded.
    alpha = alpha.to(torch.float64).view(n, c, -1).mean(dim=2).to(dt)
    cam = B.cam(x, alpha)
    cand_s = _top(B, cam.flatten(1), max(1, (h * w) // (r * r))).view(n, h, w)
    cand_c = _top(B, alpha, top_count(channel_rate, c, x.device))
    g = _rate(_seed_rate(1 - rate64(keep, x.device), r, h, w), x)
    bits = B.seed_bits(noise, generator, g, r, cand_s, cand_c, x.shape, x.device)
    return _seeds_plan(B, bits, r, x.shape, c, normalize, dt)


@fusable
def dropblock(B, x, p, block_size, *, shared_channels, normalize, noise=None, generator=None):
    """SPEC §7. State: the packed blocks of the seeds (N, ceil(Cs*H*W/8)) uint8 (Cs = 1 or C)
    and scale (N,)."""
    n, c, h, w = x.shape
    r = reference.fitted_block(block_size, h, w)
    shape = (n, 1 if shared_channels else c, h, w)
    g = _rate(_seed_rate(rate64(p, x.device), r, h, w), x)
    bits = B.seed_bits(noise, generator, g, r, None, None, shape, x.device)
    return _seeds_plan(B, bits, r, shape, c, normalize, reference.compute_dtype(x))
