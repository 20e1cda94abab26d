"""Functional form of every layer: validate, dispatch to a backend, apply with autograd.

Every op takes ``x: (N, C, H, W)`` (float32/float16/bfloat16, float64 on the reference
path; contiguous, channels_last or strided) and returns a tensor of x's shape, dtype and
memory format. ``training=False`` or a rate of 0 returns ``x`` itself. ``noise`` (uniforms
in [0, 1) of the shape each op names, on x's device) makes the op a deterministic
function of ``(x, noise)`` on every backend; without it the randomness comes from
``generator`` (default: torch's generator for x's device): the same seed gives the same
output on one backend and device, not across backends (the Triton and CUDA backends draw
DropBlock's and CamDrop's seeds with Philox in their kernels). Compare backends with
``noise``.

Rates are any real number (int, float, numpy scalar, Fraction), block sizes any integral
number; a bool or a tensor is a TypeError. They are converted to python float / int
once, here, so the layers only see those (SPEC §1).

Errors, in eval mode too, each naming the argument: TypeError for a bool or tensor rate, a
non-integral block size, a mode or normalize that is not a str, a training that is not a
bool, x or noise not a floating tensor or not dense (sparse); ValueError for a rate
outside its range, an unknown mode or normalize, x not 4-D, noise of another shape or
device, and a GUIDEDROP_BACKEND naming no backend. Where the op acts (training mode, a
non-zero rate, a non-empty x): a GUIDEDROP_BACKEND that cannot run the input is a
RuntimeError, a ``generator`` that is not a torch.Generator a TypeError,
``torch.func.vmap`` over x or noise a NotImplementedError, and ``torch.jit.trace`` a
RuntimeError (trace in eval mode, or use torch.compile / torch.export). Each op's Raises
lists its own checks; these common ones hold for every op.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys

import torch
from torch._dynamo.comptime import comptime
from torch._guards import CompileContext

from . import _validation as V
from . import autograd, dispatch, layers, reference

# Import every backend now, not at the first call: a first call inside a torch.compile
# trace cannot import a module (Dynamo skips importlib), which is a graph break.
dispatch.available()


def fx_leaf(op):
    """Decorator: under ``torch.fx`` tracing (the first argument a Proxy: ``symbolic_trace``,
    torchvision's ``create_feature_extractor``) the op is one ``call_function`` node, as
    ``torch.fx.wrap`` would make it, however it was imported: the checks and the
    data-dependent work run when the traced module runs, on tensors."""
    @functools.wraps(op)
    def run(x, *args, **kwargs):
        if isinstance(x, torch.fx.Proxy):
            return x.tracer.create_proxy("call_function", run, (x, *args), kwargs)
        return op(x, *args, **kwargs)
    return run


def no_autocast(device: torch.device):
    """Statistics in float32 also under torch.autocast (SPEC §1), which would run the
    reference's matmuls (pooled correlation, CAM) in bfloat16 / float16. A device without
    autocast (meta: shape inference, deferred initialisation) has none to turn off, nor does
    one where autocast is off (entering torch.autocast costs a few µs of host time a call).
    Not asked while torch.compile traces: Dynamo of torch 2.11 cannot trace those checks
    (and a compiled x is on a device with autocast)."""
    if not torch.compiler.is_compiling() and not (
            torch.amp.is_autocast_available(device.type)
            and torch.is_autocast_enabled(device.type)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _run(layer: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    V.generator(kwargs["generator"])
    V.not_vmapped(x, *args, *kwargs.values())
    # x, noise and weight with their negations applied (V.resolved): no copy of the others
    x, args = V.resolved(x), tuple(map(V.resolved, args))
    kwargs = {k: V.resolved(v) for k, v in kwargs.items()}
    backend = dispatch.backend_for(x)
    with torch.no_grad(), no_autocast(x.device):
        plan = getattr(layers, layer)(backend, x.detach(), *args, **kwargs)
    return x if plan is None else autograd.apply(backend, plan, x)


# A torch bug (2.11-2.15 at least) made a rate schedule recompile at every step under
# torch.compile(dynamic=True) (SPEC §8: never). Dynamo records, by symbol name, the floats
# it had to specialise (TensorifyState); the record is meant for the restarts of one
# compile, but torch keeps it after the compile, so a later compile pins whatever float
# takes one of those names. The identity (a ramp's first step at rate 0, or eval mode)
# reads the rate without using it in a tensor op, so the rate is specialised there and
# then pinned in every later graph: a recompile per value, until Dynamo's recompile limit
# (an error with fullgraph=True); any float of a later compile whose name is in a stale
# record is pinned so (a user's, a BatchNorm's momentum). The record is stale wherever a
# compile makes its first attempt (only the restarts of one compile may use it), so an op
# that acts clears it there while Dynamo traces it (comptime: nothing in the graph; in
# eager mode, nothing): the graph being traced may still have a float pinned, the next
# one not. A module's parameter set between steps clears it too (_forget_float_pins).

def _tensorify_state():
    """torch's TensorifyState, or None in a torch without it."""
    return getattr(sys.modules.get("torch._dynamo.symbolic_convert"), "TensorifyState", None)


def _clear_stale_pins(ctx) -> None:
    state, compile_context = _tensorify_state(), CompileContext.try_get()
    if state is not None and compile_context is not None and compile_context.attempt == 0:
        state.clear()


def _forget_float_pins() -> None:
    """Clear the record of specialised floats now, as a layer's parameter is set, between
    the steps of a schedule, where it is stale. Not while any thread compiles (it is then
    that compile's: cleared between its restarts, from a thread ramping another model's
    rates, it was rebuilt a name a restart, hundreds of restarts)."""
    if torch.compiler.is_compiling():  # first: Dynamo does not trace sys.modules
        return
    state = _tensorify_state()
    lock = getattr(sys.modules.get("torch._dynamo.convert_frame"), "compile_lock", None)
    if state is not None and lock is not None and lock.acquire(blocking=False):
        try:  # Dynamo holds the lock for a whole compile, its restarts included
            state.clear()
        finally:
            lock.release()


def _idle(x: torch.Tensor, training: bool, *rates: float) -> bool:
    """Whether the op is the identity: eval mode, a zero rate, or an empty tensor.
    ``training`` must be a bool (as for F.dropout: a str "False" is true). A
    GUIDEDROP_BACKEND naming no backend is a ValueError here too, so that a typo in it
    does not go unnoticed where nothing runs (eval mode)."""
    training = V.flag("training", training)
    dispatch.requested()
    if not training or any(r == 0 for r in rates) or x.numel() == 0:
        return True
    V.not_jit_traced()
    comptime(_clear_stale_pins)
    return False


@fx_leaf
def corrdrop(x, p=0.1, block_size=7, *, normalize="batch", training=True, noise=None,
             generator=None):
    """CorrDrop (Zeng et al., SPEC §2): drop k x k blocks of weakly correlated pooled
    positions.

    With k = block_size: x is average-pooled k x k (ceil mode) to N' = H'·W' positions,
    H' = ceil(H/k), W' = ceil(W/k); position i's correlation F_i = (1/N') Σ_j |â_i·â_j − δ_ij|
    over its unit channel vectors â (eq. 3), each term rounded to a multiple of 2⁻³² (so
    F is equal in any order on every backend; it resolves correlations to about 2⁻³³,
    see the README's "CorrDrop norms and symmetry"); it is kept with probability
    κ_i = (F_i − F_min) / (F_max − F_min) (eq. 4-5: kept where ``noise[0]`` < κ_i), and the
    z positions not kept drop at p̂ = min(1, p'·N'/z) (eq. 6: kept where ``noise[1]`` <
    1 − p̂, 1 − p̂ rounded once to the compute dtype), p' = p·H·W / (k²·H'·W')
    (eq. 11); w is the kept positions (S = M ∨ B, eq. 7-8) upsampled to k x k blocks,
    shared by the channels, then normalised. p' takes k = block_size itself: the
    expected dropped fraction is p where the blocks are whole, and falls as H·W / k² for
    one block larger than the map (DropBlock instead clamps its block to the map).
    Where p'·N' > z every candidate drops and the fraction stays below p, at about
    z / N' = 1 − mean(κ) (about 0.5 when κ spreads evenly over [0, 1]).

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        p: the target dropped fraction, a real number in [0, 1]; 0 returns ``x``.
        block_size: k, an integer >= 1 (in units of x; any size, one block past the map).
        normalize: ``"batch"``, ``"sample"`` or ``"none"``.
        training: False returns ``x`` itself.
        noise: (2, N, H', W') uniforms in [0, 1) on x's device, any floating dtype; None
            draws them from ``generator``.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, a non-integral block size, a non-string
            normalize, x or noise not a floating tensor.
        ValueError: x not 4-D, p outside [0, 1], block_size < 1, an unknown normalize,
            noise of the wrong shape or device.
    """
    V.feature_map(x)
    p, block_size = V.real("p", p), V.block_size(block_size)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    n, _, h, w = x.shape
    V.noise(noise, (2, n, *reference.pooled_size(h, w, block_size)), x)  # exact for any int
    if _idle(x, training, p):
        return x
    return _run("corrdrop", x, p, block_size, normalize=normalize, noise=noise,
                generator=generator)


@fx_leaf
def selectscale(x, top_rate=0.2, retain=0.1, *, training=True, noise=None, generator=None):
    """SelectScale (Chen et al., SPEC §3): scale the top channels by U[retain, 2 - retain].

    Channels are ranked by s[n, c] = max |x[n, c]| over the map; the top
    n_t = max(1, round(top_rate * C)) of each sample (ties kept) get
    w = retain + 2 (1 − retain) u (uniform on [retain, 2 − retain], eq. 6 with
    q = 1 − retain, u = ``noise``), the others 1. No normalisation.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        top_rate: the share of channels selected, a real number in [0, 1].
        retain: the scale's lower end ρ, a real number in [0, 1]; 1 returns ``x``.
        training: False returns ``x`` itself.
        noise: (N, C) uniforms in [0, 1) on x's device, any floating dtype; None draws
            them from ``generator``.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, x or noise not a floating tensor.
        ValueError: x not 4-D, a rate outside its range, noise of the wrong shape or
            device.
    """
    V.feature_map(x)
    top_rate, retain = V.real("top_rate", top_rate), V.real("retain", retain)
    V.noise(noise, x.shape[:2], x)
    if _idle(x, training, 1 - retain):
        return x
    return _run("selectscale", x, top_rate, retain, noise=noise, generator=generator)


@fx_leaf
def spatialscale(x, retain=0.4, *, training=True, noise=None, generator=None):
    """SpatialScale (Chen et al., SPEC §3): scale every channel by U[retain, 2 - retain].

    w[n, c] = retain + 2 (1 − retain) u[n, c] (u = ``noise``) for every channel: SelectScale
    without the selection. No normalisation.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        retain: the scale's lower end ρ, a real number in [0, 1]; 1 returns ``x``.
        training: False returns ``x`` itself.
        noise: (N, C) uniforms in [0, 1) on x's device, any floating dtype; None draws
            them from ``generator``.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, x or noise not a floating tensor.
        ValueError: x not 4-D, a rate outside its range, noise of the wrong shape or
            device.
    """
    V.feature_map(x)
    retain = V.real("retain", retain)
    V.noise(noise, x.shape[:2], x)
    if _idle(x, training, 1 - retain):
        return x
    return _run("spatialscale", x, retain, noise=noise, generator=generator)


@fx_leaf
def selectout(x, top_rate=0.2, keep=0.9, *, training=True, noise=None, generator=None):
    """Selectout (Chen et al., SPEC §3): drop round((1-keep) C) of the top channels, scale
    the rest 1/keep.

    Candidates are the top n_t = max(1, round(top_rate * C)) channels by max |x| (ties
    kept); the n_d = round((1 − keep) * C) candidates with the smallest u (``noise``;
    first index on ties, a NaN u the largest) are dropped (w = 0) and every other channel
    scaled by 1 / keep (eq. 4): only candidates, whatever their u.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        top_rate: the share of channels that are candidates, a real number in [0, 1].
        keep: the share of channels kept, a real number in (0, 1]; 1 returns ``x``.
        training: False returns ``x`` itself.
        noise: (N, C) uniforms in [0, 1) on x's device, any floating dtype; None draws
            them from ``generator``.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, x or noise not a floating tensor.
        ValueError: x not 4-D, a rate outside its range, noise of the wrong shape or
            device, n_d > n_t (more channels to drop than candidates; under torch.compile
            an asynchronous assertion where the op runs, training with keep < 1: a
            RuntimeError, at once on the CPU).
    """
    V.feature_map(x)
    top_rate, keep = V.real("top_rate", top_rate), V.real("keep", keep, open_lo=True)
    V.noise(noise, x.shape[:2], x)
    c = x.shape[1]
    idle = _idle(x, training, 1 - keep)
    if torch.compiler.is_compiling():
        # the rates are symbolic: python's round() of them would specialise the graph on
        # each value (SPEC §8); the same counts as tensors, an asynchronous assertion (a
        # RuntimeError, at once on the CPU), only where the op runs: an idle graph is x
        # itself, no kernel (SPEC §1)
        if not idle:
            n_drop = layers.drop_count(keep, c, x.device)
            torch._assert_async(n_drop <= layers.top_count(top_rate, c, x.device),
                                "selectout drops round((1 - keep) * C) channels, more than "
                                "the candidates of top_rate: raise top_rate or keep")
    else:
        selectout_counts(top_rate, keep, operator.index(c))  # jit.trace: c is a 0-d tensor
    if idle:
        return x
    return _run("selectout", x, top_rate, keep, noise=noise, generator=generator)


def selectout_counts(top_rate: float, keep: float, c: int, where: str = "") -> None:
    """Selectout's counts on C channels (SPEC §3): a ValueError where n_d > n_t."""
    n_drop, n_top = round((1 - keep) * c), max(1, round(top_rate * c))
    if c > 0 and n_drop > n_top:
        raise ValueError(f"selectout{where} drops round((1 - keep) * C) = {n_drop} channels, "
                         f"more than the {n_top} candidates of top_rate={top_rate}: raise "
                         "top_rate or keep")


@fx_leaf
def attentiondrop(x, alpha=0.1, beta=20.0, *, mode="ad", normalize="batch", training=True,
                  noise=None, generator=None):
    """AttentionDrop (Ouyang et al., SPEC §4): soft-mask an alpha share of the maps, each
    by its top-beta % threshold and its min-max range.

    Per (sample, channel) map of H·W units: the threshold ``t`` is the exact
    ``n_β``-th largest value of the map, ``n_β = max(1, math.ceil(beta * H * W / 100))``
    (computed in Python floats left to right, so it can depend on H and W, not only on
    H·W: beta = 16.1 gives 162 on 100 x 10, 161 on 10 x 100), ties kept
    (every unit with ``x >= t`` is a top unit); ``f̂ = (x - min) / (max - min)`` over the
    map (0 where max = min, and wherever it is not a number or not in [0, 1]), computed as
    ``min((x - min)·r, 1)`` with ``r = 1/(max - min)`` rounded up, once per map (the last
    bits differ from the quotient: a unit an ulp below the maximum can take f̂ = 1; r
    overflows where max - min is under about 2^-128, see the README's "AttentionDrop's
    f̂"). The map's
    mask ``S`` by ``mode``: ``"ad"`` ``1 - f̂·[x >= t]`` (Algorithm 1), ``"am"`` ``[x < t]``
    (eq. 4), ``"sm"`` ``1 - f̂`` (eq. 7). A map is masked where ``noise[n, c] < alpha``
    (``gamma ~ Bernoulli(alpha)``, the whole map at once) and kept (``w = 1``) elsewhere;
    then ``w`` is scaled by ``normalize``: ``"batch"`` ``numel(w) / sum(w)`` over the
    batch, ``"sample"`` per sample, ``"none"`` not at all. Returns ``x * w`` rounded once
    to x's dtype; backward is ``grad_y * w``.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        alpha: the share of maps masked, a real number in [0, 1]; 0 returns ``x``.
        beta: the top share of a map's units, in percent, a real number in (0, 100].
        mode: ``"ad"``, ``"am"`` or ``"sm"``.
        normalize: ``"batch"``, ``"sample"`` or ``"none"``.
        training: False returns ``x`` itself.
        noise: (N, C) uniforms in [0, 1) on x's device, any floating dtype; None draws
            them from ``generator``.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, a non-string mode or normalize, x not a floating
            tensor, noise not a floating tensor.
        ValueError: x not 4-D, alpha outside [0, 1], beta outside (0, 100], an unknown
            mode or normalize, noise of the wrong shape or device.
    """
    V.feature_map(x)
    alpha, beta = V.real("alpha", alpha), V.real("beta", beta, 0, 100, open_lo=True)
    mode = V.choice("mode", mode, V.MODES)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    V.noise(noise, x.shape[:2], x)
    if _idle(x, training, alpha):
        return x
    return _run("attentiondrop", x, alpha, beta, mode=mode, normalize=normalize, noise=noise,
                generator=generator)


@fx_leaf
def focused_dropout(x, low=0.3, high=0.6, *, per_position=False, training=True, noise=None,
                    generator=None, applied=None):
    """FocusedDropout (Xie et al., SPEC §5): keep the positions where the most active
    channel is high.

    Per sample, the reference channel r = argmax_c mean(x[n, c]) (first on ties),
    v = max x[n, r] and γ = low + (high − low) u (u = ``noise``); every channel keeps the
    positions where x[n, r] > γ·v (w = 1) and drops the others (w = 0); a sample with
    v <= 0 is unchanged (the paper's Algorithm 1). No normalisation. The module
    :class:`guidedrop.FocusedDropout` adds the per-batch participation draw.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        low, high: γ's range, real numbers with 0 <= low <= high <= 1.
        per_position: one γ per position (``noise`` (N, H, W)), not per sample.
        training: False returns ``x`` itself.
        noise: (N,), or (N, H, W) with per_position=True, uniforms in [0, 1) on x's
            device, any floating dtype; None draws them from ``generator``.
        applied: None (the op applies), or a 0-d bool tensor on x's device read by the
            kernels (how the module passes its participation under torch.compile or CUDA
            graph capture, where a Python branch on it is impossible): where it holds
            False the result equals x (a new tensor, x * 1: a NaN may come back with
            another payload; its gradient is grad_y), computed with one read of x on
            the kernel backends.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, a non-bool per_position, x or noise not a
            floating tensor, applied not a bool tensor.
        ValueError: x not 4-D, low or high outside [0, 1] or low > high, noise of the
            wrong shape or device, applied not 0-d or not on x's device.
    """
    V.feature_map(x)
    low, high = V.low_high(low, high)
    per_position = V.flag("per_position", per_position)
    n, _, h, w = x.shape
    V.noise(noise, (n, h, w) if per_position else (n,), x)
    V.applied(applied, x)
    if _idle(x, training):
        return x
    return _run("focused_dropout", x, low, high, per_position=per_position, noise=noise,
                generator=generator, applied=applied)


@fx_leaf
def camdrop(x, weight, target, block_size=5, keep=0.9, *, channel_rate=0.125,
            normalize="batch", training=True, noise=None, generator=None):
    """CamDrop (Wang et al., SPEC §6): DropBlock seeded only where the class activation
    map is high.

    With r = block_size: α = weight[target] (N, C_fc), averaged over groups of C_fc / C
    consecutive columns to (N, C) (eq. 7); the class activation map J[n] = Σ_c α[n, c]
    x[n, c] (eq. 5, float64 sums); seeds (eq. 9) are drawn at DropBlock's rate
    g = (1 − keep) / r² · H·W / ((H − r + 1)(W − r + 1)) (``noise`` < g), only at the
    top max(1, (H·W) // r²) positions of J and in the top max(1, round(channel_rate * C))
    channels of α (ties kept), at centres whose r x r block lies inside the map (none
    where r > H or r > W); w = 1 − the r x r expansion of the seeds, then normalised.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        weight: (K, C_fc) the classifier after global average pooling, floating, on x's
            device, K >= 1, C_fc >= 1 a multiple of C.
        target: (N,) class indices in [0, K), any integer dtype (uint8 is an index, not a
            mask), on x's device.
        block_size: r, an integer >= 1, in units of x.
        keep: 1 − keep is DropBlock's rate in g (the paper's keep_prob), a real number
            in [0, 1]; 1 returns ``x``. Not the share of units kept: seeds fall only
            among the top positions and channels, so far fewer units drop than 1 − keep
            (about 0.05% at the defaults on 14 x 14 maps of 64 channels or more; more
            with few channels, where max(1, ...) lets more than channel_rate drop).
        channel_rate: the share of channels that may drop, a real number in [0, 1].
        normalize: ``"batch"``, ``"sample"`` or ``"none"``.
        training: False returns ``x`` itself (weight and target checked where given).
        noise: (N, C, H, W) uniforms in [0, 1) on x's device, any floating dtype; None
            draws them from ``generator`` (on the Triton and CUDA backends, with Philox in
            the kernel: not the reference's draws).

    Returns:
        A tensor of x's shape, dtype and memory format: ``x`` itself where nothing can
        drop (eval mode, keep = 1, block_size > H or W: no valid centre), as
        ``torch.nn.functional.dropout`` returns its input at p = 0.

    Raises:
        TypeError: a bool or tensor rate, a non-integral block size, a non-string
            normalize, x, noise or weight not a floating tensor, target not an integer
            tensor.
        ValueError: x not 4-D, a rate outside [0, 1], block_size < 1, an unknown
            normalize, noise of the wrong shape or device, weight or target missing (where
            the op acts: training, keep < 1, a non-empty x), of the wrong shape or device,
            C_fc not a multiple of C, a CPU target out of range. A GPU target out of range,
            or a CPU one while torch.compile traces, is an asynchronous device assertion
            naming ``target`` (a RuntimeError when it fires).
    """
    V.feature_map(x)
    block_size, keep = V.block_size(block_size), V.real("keep", keep)
    channel_rate = V.real("channel_rate", channel_rate)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    V.noise(noise, x.shape, x)
    # Checked where given (also in eval mode); required only when the op runs.
    idle = _idle(x, training, 1 - keep)
    target = V.cam_inputs(weight, target, x, required=not idle)
    if idle:
        if weight is not None and target is not None and not V.target_checked_on_host(target):
            V.assert_target(target, weight.shape[0])  # no CamDrop kernel runs to check it
        return x
    return _run("camdrop", x, weight, target, block_size, keep, channel_rate=channel_rate,
                normalize=normalize, noise=noise, generator=generator)


@fx_leaf
def dropblock(x, p=0.1, block_size=7, *, shared_channels=False, normalize="batch",
              training=True, noise=None, generator=None):
    """DropBlock (Ghiasi et al., SPEC §7): drop r x r blocks around Bernoulli seeds,
    r = min(block_size, H, W).

    Seeds where ``noise`` < g = p / r² · H·W / ((H − r + 1)(W − r + 1)) (eq. 1), at
    centres whose r x r block (offset r // 2 before the centre) lies inside the map;
    w = 1 − the r x r expansion of the seeds, then normalised.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
            any memory format.
        p: the target dropped fraction, a real number in [0, 1]; 0 returns ``x``. The
            expected fraction is about p for small p; overlapping blocks drop less above
            (p = 0.5, block 7 on 28 x 28 maps: about 0.37; the paper's eq. 1).
        block_size: an integer >= 1, in units of x (clamped to the map).
        shared_channels: one mask for every channel of a sample.
        normalize: ``"batch"``, ``"sample"`` or ``"none"``.
        training: False returns ``x`` itself.
        noise: (N, C, H, W), or (N, 1, H, W) with shared_channels=True, uniforms in
            [0, 1) on x's device, any floating dtype; None draws them from ``generator``
            (on the Triton and CUDA backends, with Philox in the kernel: not the
            reference's draws).

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        TypeError: a bool or tensor rate, a non-integral block size, a non-bool
            shared_channels, a non-string normalize, x or noise not a floating tensor.
        ValueError: x not 4-D, p outside [0, 1], block_size < 1, an unknown normalize,
            noise of the wrong shape or device.
    """
    V.feature_map(x)
    p, block_size = V.real("p", p), V.block_size(block_size)
    shared_channels = V.flag("shared_channels", shared_channels)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    n, c, h, w = x.shape
    V.noise(noise, (n, 1 if shared_channels else c, h, w), x)
    if _idle(x, training, p):
        return x
    return _run("dropblock", x, p, block_size, shared_channels=shared_channels,
                normalize=normalize, noise=noise, generator=generator)


# The errors every op raises (the module docstring), at the end of each op's Raises.
_COMMON_RAISES = """
        TypeError (every op): training not a bool, x or noise not dense (sparse); where
            the op acts, a generator that is not a torch.Generator.
        ValueError (every op): GUIDEDROP_BACKEND naming no backend.
        NotImplementedError: torch.func.vmap over the op where it acts.
        RuntimeError: torch.jit.trace of the op where it acts (trace in eval mode, or use
            torch.compile), or a GUIDEDROP_BACKEND backend that cannot run the input.
    """
for _op in (corrdrop, selectscale, spatialscale, selectout, attentiondrop, focused_dropout,
            camdrop, dropblock):
    _op.__doc__ = _op.__doc__.rstrip() + _COMMON_RAISES


__all__ = [
    "corrdrop", "selectscale", "spatialscale", "selectout", "attentiondrop", "focused_dropout",
    "camdrop", "dropblock",
]
