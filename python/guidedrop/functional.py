"""Functional form of every layer: validate, dispatch to a backend, apply with autograd.

Every op takes ``x: (N, C, H, W)`` (float32/float16/bfloat16, float64 on the reference
path; contiguous, channels_last or strided) and returns a tensor of x's shape, dtype and
memory format. ``training=False`` or a rate of 0 returns ``x`` itself. ``noise`` (uniforms
in [0, 1) of the shape each op names, on x's device) makes the op a deterministic
function of ``(x, noise)`` on every backend; without it the randomness comes from
``generator`` (default: torch's generator for x's device).

Rates are any real number (int, float, numpy scalar, Fraction), block sizes any integral
number; a bool or a tensor is a TypeError. They are converted to python float / int
once, here, so the layers only see those (SPEC §1).

Errors, in eval mode too, each naming the argument: TypeError for a bool or tensor rate, a
non-integral block size, a mode or normalize that is not a str, x or noise not a floating
tensor; ValueError for a rate outside its range, an unknown mode or normalize, x not 4-D,
noise of another shape or device, and a GUIDEDROP_BACKEND naming no backend (RuntimeError
where the backend it names cannot run the input).
"""

from __future__ import annotations

import functools

import torch

from . import _validation as V
from . import autograd, dispatch, layers

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


def _run(layer: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    backend = dispatch.backend_for(x)
    # Statistics in float32 also under torch.autocast (SPEC §1), which would run the
    # reference's matmuls (pooled correlation, CAM) in bfloat16 / float16.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        plan = getattr(layers, layer)(backend, x.detach(), *args, **kwargs)
    return x if plan is None else autograd.apply(backend, plan, x)


def _idle(x: torch.Tensor, training: bool, *rates: float) -> bool:
    """Whether the op is the identity: eval mode, a zero rate, or an empty tensor. A
    GUIDEDROP_BACKEND naming no backend is a ValueError here too, so that a typo in it
    does not go unnoticed where nothing runs (eval mode)."""
    dispatch.requested()
    return not training or any(r == 0 for r in rates) or x.numel() == 0


@fx_leaf
def corrdrop(x, p=0.1, block_size=7, *, normalize="batch", training=True, noise=None,
             generator=None):
    """CorrDrop (SPEC §2): drop k x k blocks of weakly correlated pooled positions.

    x: (N, C, H, W); noise: (2, N, ceil(H/k), ceil(W/k)) with k = block_size. The rate of
    eq. 11, p' = p·H·W / (k²·H'·W'), takes k = block_size itself: the expected dropped
    fraction is p where the blocks are whole, and falls as H·W / k² for one block larger
    than the map (DropBlock instead clamps its block to the map). Only the z blocks not
    kept by their correlation (M_i = 0) can drop, at the rate p̂ = min(1, p'·N'/z) of
    eq. 6: where p'·N' > z every one of them drops and the fraction stays below p, at
    about z / N' = 1 − mean(κ) (about 0.5 when κ spreads evenly over [0, 1]).
    """
    V.feature_map(x)
    p, block_size = V.real("p", p), V.block_size(block_size)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    n, _, h, w = x.shape
    V.noise(noise, (2, n, -(-h // block_size), -(-w // block_size)), x)  # exact for any int size
    if _idle(x, training, p):
        return x
    return _run("corrdrop", x, p, block_size, normalize=normalize, noise=noise,
                generator=generator)


@fx_leaf
def selectscale(x, top_rate=0.2, retain=0.1, *, training=True, noise=None, generator=None):
    """SelectScale (SPEC §3): scale the top channels by max |x| by U[retain, 2 - retain].

    x: (N, C, H, W); noise: (N, C).
    """
    V.feature_map(x)
    top_rate, retain = V.real("top_rate", top_rate), V.real("retain", retain)
    V.noise(noise, x.shape[:2], x)
    if _idle(x, training, 1 - retain):
        return x
    return _run("selectscale", x, top_rate, retain, noise=noise, generator=generator)


@fx_leaf
def spatialscale(x, retain=0.4, *, training=True, noise=None, generator=None):
    """SpatialScale (SPEC §3): scale every channel by U[retain, 2 - retain].

    x: (N, C, H, W); noise: (N, C).
    """
    V.feature_map(x)
    retain = V.real("retain", retain)
    V.noise(noise, x.shape[:2], x)
    if _idle(x, training, 1 - retain):
        return x
    return _run("spatialscale", x, retain, noise=noise, generator=generator)


@fx_leaf
def selectout(x, top_rate=0.2, keep=0.9, *, training=True, noise=None, generator=None):
    """Selectout (SPEC §3): drop round((1-keep) C) of the top channels, scale the rest 1/keep.

    x: (N, C, H, W); noise: (N, C).
    """
    V.feature_map(x)
    top_rate, keep = V.real("top_rate", top_rate), V.real("keep", keep, open_lo=True)
    V.noise(noise, x.shape[:2], x)
    c = x.shape[1]
    n_drop, n_top = round((1 - keep) * c), max(1, round(top_rate * c))
    if c > 0 and n_drop > n_top:
        raise ValueError(f"selectout drops round((1 - keep) * C) = {n_drop} channels, more than "
                         f"the {n_top} candidates of top_rate={top_rate}: raise top_rate or keep")
    if _idle(x, training, 1 - keep):
        return x
    return _run("selectout", x, top_rate, keep, noise=noise, generator=generator)


@fx_leaf
def attentiondrop(x, alpha=0.1, beta=20.0, *, mode="ad", normalize="batch", training=True,
                  noise=None, generator=None):
    """AttentionDrop (Ouyang et al., SPEC §4): soft-mask the top beta % of a map, in an
    alpha share of maps.

    Per (sample, channel) map of H·W units: the threshold ``t`` is the exact
    ``n_β``-th largest value of the map, ``n_β = max(1, math.ceil(beta * H * W / 100))``
    (computed in Python floats left to right, so it can depend on H and W, not only on
    H·W: beta = 16.1 gives 162 on 100 x 10, 161 on 10 x 100), ties kept
    (every unit with ``x >= t`` is a top unit); ``f̂ = (x - min) / (max - min)`` over the
    map (0 where max = min, and wherever it is not a number or not in [0, 1]). The map's
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
    """FocusedDropout (SPEC §5): keep the positions where the most active channel is high.

    x: (N, C, H, W); noise: (N,), or (N, H, W) with per_position=True. The module
    :class:`guidedrop.FocusedDropout` adds the per-batch participation draw.

    applied: None (the op applies), or a 0-d bool tensor on x's device read by the kernels
    (how the module passes its participation under torch.compile or CUDA graph capture,
    where a Python branch on it is impossible): where it holds False the result is x bit
    for bit (a new tensor; its gradient is grad_y), computed with one read of x on the
    kernel backends. A tensor of another shape, dtype or device is a ValueError / TypeError.
    """
    V.feature_map(x)
    low, high = V.low_high(low, high)
    V.flag("per_position", per_position)
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
    """CamDrop (SPEC §6): DropBlock seeded only where the class activation map is high.

    x: (N, C, H, W); weight: (K, C_fc) classifier after global pooling, C_fc a multiple
    of C, K >= 1, floating, on x's device; target: (N,) class indices in [0, K) of any
    integer dtype, on x's device; noise: (N, C, H, W). Raises ValueError / TypeError
    naming the argument (SPEC §6 step 0; a target out of range on a GPU is an
    asynchronous device assertion naming ``target``, RuntimeError when it fires).
    """
    V.feature_map(x)
    block_size, keep = V.block_size(block_size), V.real("keep", keep)
    channel_rate = V.real("channel_rate", channel_rate)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    V.noise(noise, x.shape, x)
    # Checked whenever given (also in eval mode); required only when the op runs.
    idle = _idle(x, training, 1 - keep)
    if weight is not None or target is not None or not idle:
        target = V.cam_inputs(weight, target, x)
    if idle:
        if target is not None and not V.target_checked_on_host(target):
            V.assert_target(target, weight.shape[0])  # no CamDrop kernel runs to check it
        return x
    return _run("camdrop", x, weight, target, block_size, keep, channel_rate=channel_rate,
                normalize=normalize, noise=noise, generator=generator)


@fx_leaf
def dropblock(x, p=0.1, block_size=7, *, shared_channels=False, normalize="batch",
              training=True, noise=None, generator=None):
    """DropBlock (SPEC §7): drop r x r blocks around Bernoulli seeds, r = min(block_size, H, W).

    x: (N, C, H, W); noise: (N, C, H, W), or (N, 1, H, W) with shared_channels=True.
    """
    V.feature_map(x)
    p, block_size = V.real("p", p), V.block_size(block_size)
    V.flag("shared_channels", shared_channels)
    normalize = V.choice("normalize", normalize, V.NORMALIZE)
    n, c, h, w = x.shape
    V.noise(noise, (n, 1 if shared_channels else c, h, w), x)
    if _idle(x, training, p):
        return x
    return _run("dropblock", x, p, block_size, shared_channels=shared_channels,
                normalize=normalize, noise=noise, generator=generator)
