"""nn.Module wrappers with the spec's defaults. They hold parameters only; the work is
in :mod:`guidedrop.functional`. Eval mode is the identity (the input itself).

Every module has ``drop_rate``: the strength that schedules ramp from 0 to its target
(p, alpha, participation, or 1 - keep / 1 - retain).

Every parameter is validated and converted (to a python float / int / str / bool) when it
is assigned, in ``__init__`` and later (``m.p = ...``, ``m.drop_rate = ...``), so a bad
value is refused where it is set and ``forward`` reads only valid values (SPEC §1);
constraints between parameters (``low <= high``, Selectout's drop count) are checked at
forward, and also in ``__init__`` where the constructor's arguments alone break one
(``FocusedDropout(low=0.7, high=0.6)``: one may be set before the other later). Under
``torch.fx`` tracing (``symbolic_trace``, torchvision's ``create_feature_extractor``) every
module is one leaf node, like ``nn.Dropout``; a module traced by itself
(``symbolic_trace(layer)``) is, like ``nn.Dropout``, its functional op.
"""

from __future__ import annotations

import operator
import types

import torch
from torch import nn

from . import _validation as V
from . import context, dispatch
from . import functional as F


def _checked(name: str, check):
    """A property holding parameter ``name``, set to ``check(name, value)`` at every
    assignment (the check raises, naming ``name``, or returns the converted value)."""
    key = "_" + name

    def fset(self, value):
        object.__setattr__(self, key, check(name, value))

    return property(lambda self: getattr(self, key), fset)


# The checks, check(name, value) -> converted value. A rate is in [0, 1] (V.real's default).
_REAL = V.real


def _BLOCK(name, v):
    return V.block_size(v, name)


def _NORMALIZE(name, v):
    return V.choice(name, v, V.NORMALIZE)


def _MODE(name, v):
    return V.choice(name, v, V.MODES)


def _open_rate(name, v):
    return V.real(name, v, open_lo=True)


def _beta(name, v):
    return V.real(name, v, 0, 100, open_lo=True)


def _is_replica(m: nn.Module) -> bool:
    """Whether m is a copy made by nn.DataParallel for one device (torch marks them)."""
    return getattr(m, "_is_replica", False)


class GuidedDropout(nn.Module):
    """Base class. Subclasses name their parameters in ``_fields`` (each a :func:`_checked`
    property) and the one that ``drop_rate`` maps to in ``_rate`` (``_rate_inverted``:
    drop_rate = 1 - it), and implement ``_forward``."""

    _fields: tuple[str, ...] = ()
    _rate: str = "p"
    _rate_inverted = False
    # drop_rate == 0, set with the rate (a python bool; computed in __setstate__ for a
    # module pickled before it). Under torch.compile with dynamic=True
    # a rate is a symbolic float from the first graph on, and a graph that reads it without
    # using it in a tensor op (the identity: eval mode, or a ramp's first step at 0) makes
    # Dynamo pin it, in every later graph too: a recompile per value. So the identity is
    # decided from bools, without reading a rate (``_identity``).
    _zero_rate = False

    def __init__(self) -> None:
        """The parameters, each checked as it is set (guidedrop.modules' docstring); a
        subclass's docstring lists its own."""
        super().__init__()  # (help() showed nn.Module's "Initialize internal Module state")

    def __init_subclass__(cls, **kwargs) -> None:
        # torch.compile keeps a frame's compiled versions on its code object, at most
        # torch._dynamo.config.recompile_limit (8) of them: with one forward shared by
        # every layer, the layers' variants (training, eval, channels_last, an x that
        # requires grad, ...) used up that budget together (compiling SelectScale,
        # SpatialScale and Selectout one by one, Selectout's hit the limit:
        # FailOnRecompileLimitHit with fullgraph=True, else eager). Each subclass that
        # inherits GuidedDropout's forward, or a copy of it (an equal code object), gets a
        # copy with a code object of its own; one that inherits another forward (a user's
        # override, a mixin's) keeps it.
        super().__init_subclass__(**kwargs)
        f = GuidedDropout.forward
        if cls.forward.__code__ == f.__code__ and "forward" not in cls.__dict__:
            copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__,
                                      f.__defaults__, f.__closure__)
            copy.__doc__, copy.__annotations__ = f.__doc__, dict(f.__annotations__)
            copy.__module__, copy.__qualname__ = cls.__module__, f"{cls.__qualname__}.forward"
            cls.forward = copy

    @property
    def drop_rate(self) -> float:
        """The layer's strength, a float in [0, 1], 0 the identity: the parameter a schedule
        (:class:`guidedrop.LinearRamp`) ramps from 0 to its target. ``p`` (CorrDrop,
        DropBlock2d), ``alpha`` (AttentionDrop), ``participation`` (FocusedDropout), or
        1 - ``keep`` (Selectout, CamDrop) / 1 - ``retain`` (SelectScale, SpatialScale).
        Setting it sets that parameter: a ValueError outside [0, 1], or naming the
        parameter where it refuses the value (Selectout's ``keep`` must be > 0)."""
        v = getattr(self, self._rate)
        return 1 - v if self._rate_inverted else v

    @drop_rate.setter
    def drop_rate(self, rate: float) -> None:
        rate = V.real("drop_rate", rate)
        setattr(self, self._rate, 1 - rate if self._rate_inverted else rate)

    def __setattr__(self, name: str, value) -> None:
        # nn.Module.__setattr__ registers a Parameter or a Module value itself, before
        # the property's check could refuse it (m.p = nn.Parameter(...) raised KeyError,
        # m.p = nn.Identity() became a child while p kept its value): the checked
        # parameters go to their property.
        if name in self._fields or name == "drop_rate":
            object.__setattr__(self, name, value)
            if name in (self._rate, "drop_rate"):  # a new target for a later ramp: forget
                self.__dict__.pop("_ramp", None)  # the last one's (schedule._target)
                self.__dict__["_zero_rate"] = self.drop_rate == 0
            F._forget_float_pins()  # any parameter: top_rate, channel_rate, ... too
        else:
            super().__setattr__(name, value)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_zero_rate" not in self.__dict__:  # pickled before _zero_rate (2026-12)
            self.__dict__["_zero_rate"] = self.drop_rate == 0
        # A ramp mark pickled before 2026-12-06, "_ramped": (target, rate set, parameter),
        # or (target, rate set) before 2026-12-05; the rate set was always the current one.
        old = self.__dict__.pop("_ramped", None)
        if old is not None:
            self.__dict__["_ramp"] = (old[0], old[2] if len(old) == 3 else None)

    def _params(self) -> dict:
        return {f: getattr(self, f) for f in self._fields}

    def _identity(self, x) -> bool:
        """Whether forward returns x (a tensor, or an FX proxy): eval mode or a zero
        drop_rate, from python bools (``_zero_rate``). A GUIDEDROP_BACKEND naming no
        backend raises here too, as in the functional ops, and a subclass checks its
        constraints between parameters here."""
        if self.training and not self._zero_rate:
            return False
        dispatch.requested()
        return True

    def extra_repr(self) -> str:
        # floats to 12 significant digits: a ramped p of 6e-05 reads so, not as
        # 5.9999999999999995e-05, and a p of 0.1234567 as 0.1234567
        return ", ".join(f"{k}={float(f'{v:.12g}')!r}" if isinstance(v, float) else f"{k}={v!r}"
                         for k, v in self._params().items())

    def __prepare_scriptable__(self):
        # torch.jit.script calls it on every submodule before compiling: a message, not
        # TorchScript's "Expected a single top-level function" from deep in this module
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__} (it runs Python code at "
            f"every call to choose its mask). For deployment, export the model in eval mode with "
            f"torch.export or torch.jit.trace (the layer is the identity there), or replace "
            f"the layer with nn.Identity before scripting; to train, use torch.compile.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend), any
        memory format -> the layer's output, of x's shape, dtype and memory format; x itself
        in eval mode or at a zero ``drop_rate``. A ValueError / TypeError for another x; the
        layer's definition and errors: its functional op in :mod:`guidedrop.functional`."""
        if isinstance(x, torch.fx.Proxy):
            tracer = x.tracer
            if getattr(tracer, "root", None) is not self:
                # One leaf node under any FX tracer (as nn.Dropout): the traced module calls
                # this module, so train()/eval() and the rates keep working on it.
                return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
            # The layer traced itself (symbolic_trace(layer)) has no path to call: as
            # nn.Dropout's, its graph is the functional op with today's mode and rates
            # (call_function nodes: the checks and draws run with the graph).
        else:
            # Here, not only in the functional ops: FocusedDropout (eval, or a step it does
            # not take part in) and the identity (eval, a zero rate) return x before one.
            V.feature_map(x)
        return x if self._identity(x) else self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no layer of its own: GuidedDropout is the base class "
            "of guidedrop's layers (CorrDrop, SelectScale, SpatialScale, Selectout, "
            "AttentionDrop, FocusedDropout, CamDrop, DropBlock2d); a subclass defines _forward")


class CorrDrop(GuidedDropout):
    """CorrDrop (Zeng et al.): drop k x k blocks (k = ``block_size``) at the pooled
    positions whose channel vectors correlate least with the others, to a dropped fraction
    ``p``, then rescale by ``normalize``. ``drop_rate`` is ``p``. The definition, noise and
    errors: :func:`guidedrop.functional.corrdrop`.

    Args:
        p: the target dropped fraction, a real number in [0, 1].
        block_size: k, an integer >= 1, in units of x.
        normalize: ``"batch"`` (multiply by numel(w) / sum(w) over the batch), ``"sample"``
            (per sample) or ``"none"``.

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    Paper: Zeng et al., "CorrDrop: Correlation Based Dropout for Convolutional Neural
    Networks", ICASSP 2020.
    """

    _fields = ("p", "block_size", "normalize")
    p, block_size = _checked("p", _REAL), _checked("block_size", _BLOCK)
    normalize = _checked("normalize", _NORMALIZE)

    def __init__(self, p: float = 0.1, block_size: int = 7, normalize: str = "batch"):
        super().__init__()
        self.p, self.block_size, self.normalize = p, block_size, normalize

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.corrdrop(x, **self._params())


class SelectScale(GuidedDropout):
    """SelectScale (Chen et al.): scale the top ``top_rate`` of the channels (by max |x|)
    by a uniform factor in [``retain``, 2 - ``retain``]. ``drop_rate`` is 1 - ``retain``.
    The definition, noise and errors: :func:`guidedrop.functional.selectscale`.

    Args:
        top_rate: the share of channels scaled, a real number in [0, 1].
        retain: the scale's lower end, a real number in [0, 1].

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    Paper: Chen et al., "SelectScale: Mining More Patterns from Images via Selective and
    Soft Dropout".
    """

    _fields, _rate, _rate_inverted = ("top_rate", "retain"), "retain", True
    top_rate, retain = _checked("top_rate", _REAL), _checked("retain", _REAL)

    def __init__(self, top_rate: float = 0.2, retain: float = 0.1):
        super().__init__()
        self.top_rate, self.retain = top_rate, retain

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.selectscale(x, **self._params())


class SpatialScale(GuidedDropout):
    """SpatialScale (Chen et al.): scale every channel by a uniform factor in
    [``retain``, 2 - ``retain``]. ``drop_rate`` is 1 - ``retain``. The definition, noise
    and errors: :func:`guidedrop.functional.spatialscale`.

    Args:
        retain: the scale's lower end, a real number in [0, 1].

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    Paper: Chen et al., "SelectScale: Mining More Patterns from Images via Selective and
    Soft Dropout".
    """

    _fields, _rate, _rate_inverted = ("retain",), "retain", True
    retain = _checked("retain", _REAL)

    def __init__(self, retain: float = 0.4):
        super().__init__()
        self.retain = retain

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.spatialscale(x, **self._params())


class Selectout(GuidedDropout):
    """Selectout (Chen et al.): drop round((1 - ``keep``) C) channels chosen among the top
    ``top_rate`` (by max |x|) and scale the others by 1 / ``keep``. ``drop_rate`` is
    1 - ``keep``. The definition, noise and errors: :func:`guidedrop.functional.selectout`.
    Under a :class:`guidedrop.LinearRamp`, a target ``keep`` with more channels to drop
    than candidates is that ValueError at the first training step the ramp makes non-zero,
    or at a forward in eval mode (in eager mode; compiled, where the ramped ``keep`` gets
    there). Eval mode checks the drop count too, as the functional op does.

    Args:
        top_rate: the share of channels that are candidates, a real number in [0, 1].
        keep: the share of channels kept, a real number in (0, 1].

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    Paper: Chen et al., "SelectScale: Mining More Patterns from Images via Selective and
    Soft Dropout".
    """

    _fields, _rate, _rate_inverted = ("top_rate", "keep"), "keep", True
    top_rate, keep = _checked("top_rate", _REAL), _checked("keep", _open_rate)

    def __init__(self, top_rate: float = 0.2, keep: float = 0.9):
        super().__init__()
        self.top_rate, self.keep = top_rate, keep

    def _identity(self, x) -> bool:
        identity = super()._identity(x)
        if (identity and not self.training and isinstance(x, torch.Tensor)
                and not torch.compiler.is_compiling()
                and not isinstance(x.shape[1], torch.SymInt)):
            # what a training forward checks, as F.selectout(training=False) does: a model
            # tried in eval mode would otherwise fail at its first training step (C an int,
            # or under jit.trace a 0-d tensor; compiled, the op's own rule, SPEC §8)
            self._check_counts(operator.index(x.shape[1]), keep_now=True)
        return identity

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager only: compiled, reading the rates as python floats would pin them (SPEC §8);
        # traced (FX, jit.trace), C is no int (and jit.trace refuses a training forward).
        c = x.shape[1]
        if type(c) is int and not torch.compiler.is_compiling():
            self._check_counts(c, keep_now=False)  # (F.selectout checks keep itself)
        return F.selectout(x, **self._params())

    def _check_counts(self, c: int, keep_now: bool) -> None:
        """The drop count on C channels of ``keep`` (``keep_now``) and of a LinearRamp's
        target keep (ramped: (target, keep at the end or None), schedule.py): the target's
        from the ramp's first non-zero rate, not once the ramp reaches it, late in a run."""
        if keep_now:
            F.selectout_counts(self.top_rate, self.keep, c)
        ramped = getattr(self, "_ramp", None)
        if ramped is not None:
            keep = 1 - ramped[0] if ramped[1] is None else ramped[1]
            F.selectout_counts(self.top_rate, keep, c,
                               f" at the end of its LinearRamp (keep={keep:.12g})")


class AttentionDrop(GuidedDropout):
    """AttentionDrop (Ouyang et al.). ``drop_rate`` is ``alpha``.

    In training, masks a share ``alpha`` of the (sample, channel) maps, each with a soft
    mask (``mode``: ``"ad"`` ``1 - f̂·[x >= t]``, ``"am"`` ``[x < t]``, ``"sm"``
    ``1 - f̂``; t the map's top-``beta`` % threshold, f̂ the map min-max normalised), then
    rescales by
    ``normalize``; the identity in eval mode. See :func:`guidedrop.functional.attentiondrop`
    for the exact definition, dtypes and errors.

    Args:
        alpha: the share of maps masked, a real number in [0, 1].
        beta: the top share of a map's units that the threshold t marks, in percent, a
            real number in (0, 100].
        mode: ``"ad"``, ``"am"`` or ``"sm"``.
        normalize: ``"batch"`` (multiply by numel(w) / sum(w) over the batch), ``"sample"``
            (per sample) or ``"none"``.

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    In training it keeps x for the backward (the one layer that does: w is rebuilt from
    each map's threshold and x), so x must not be changed in place before the backward
    (autograd's "modified by an inplace operation" RuntimeError).

    Paper: Ouyang et al., "AttenDrop for Convolutional Neural Networks".
    """

    _fields, _rate = ("alpha", "beta", "mode", "normalize"), "alpha"
    alpha, beta = _checked("alpha", _REAL), _checked("beta", _beta)
    mode, normalize = _checked("mode", _MODE), _checked("normalize", _NORMALIZE)

    def __init__(self, alpha: float = 0.1, beta: float = 20.0, mode: str = "ad",
                 normalize: str = "batch"):
        super().__init__()
        self.alpha, self.beta, self.mode, self.normalize = alpha, beta, mode, normalize

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.attentiondrop(x, **self._params())


class FocusedDropout(GuidedDropout):
    """FocusedDropout (Xie et al.): keep only the positions where the most active channel
    is high, in every channel. ``drop_rate`` is ``participation``. The definition, noise
    and errors: :func:`guidedrop.functional.focused_dropout` (which has no
    ``participation``: the module's draw).

    Applies to a whole batch with probability ``participation`` (one draw per training
    forward from torch's CPU generator: no device sync) and is the identity otherwise.
    ``last_applied`` tells whether the last forward applied it, so a training loop can
    raise weight decay on those steps (the paper's MWD). Under torch.compile or CUDA graph
    capture the draw is made on x's device and ``last_applied`` is a 0-d bool tensor; a
    program made by torch.export draws in its graph and does not set it. There the op's
    noise is drawn on every step, applied or not (eager draws none on a step that is
    not), so a compiled run's draws after such a step differ from eager's from the same
    seed; each reproduces itself. Inside torch.utils.checkpoint compiled with
    fullgraph=True, Dynamo refuses the write of ``last_applied`` (``Unsupported``) unless
    ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`` is True.
    In training inside ``nn.DataParallel`` replicas it raises RuntimeError (each replica
    would draw for its own part of the batch and write ``last_applied`` to its own copy):
    use DistributedDataParallel.

    Args:
        participation: the probability that a training batch is masked, in [0, 1].
        low, high: the range of the threshold ratio γ, real numbers with
            0 <= low <= high <= 1. Each is checked when set; their order, low <= high, by
            the constructor and then by each forward (so that the two can be
            set one after the other: ``m.low = 0.7; m.high = 0.9`` from 0.3, 0.6).
        per_position: one γ per position, not per sample.

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set (low >
    high: at the next forward).

    Paper: Xie et al., "FocusedDropout for Convolutional Neural Network".
    """

    _fields, _rate = ("participation", "low", "high", "per_position"), "participation"
    participation = _checked("participation", _REAL)
    low, high = _checked("low", _REAL), _checked("high", _REAL)
    per_position = _checked("per_position", V.flag)

    _unordered = False  # low > high, set with them (see _identity)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("low", "high"):
            self.__dict__["_unordered"] = self.__dict__.get("_low", 0.0) > self.__dict__.get(
                "_high", 1.0)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_unordered", self.low > self.high)  # pickled before it

    def __init__(self, participation: float = 0.1, low: float = 0.3, high: float = 0.6,
                 per_position: bool = False):
        super().__init__()
        V.low_high(low, high)
        self.participation, self.low, self.high = participation, low, high
        self.per_position = per_position
        self.last_applied = False

    def _identity(self, x) -> bool:
        # Eval mode or participation 0, from bools (GuidedDropout._identity): x itself and
        # no draw (torch's generator untouched, as by nn.Dropout(0)), compiled too, where
        # _forward draws on the device (it did at participation 0, found by fuzzing).
        if self.training and _is_replica(self):
            raise RuntimeError(
                "FocusedDropout does not support nn.DataParallel in training: each replica "
                "would draw its own participation and set last_applied on its own copy, so "
                "the training loop would read a stale value. Use "
                "torch.nn.parallel.DistributedDataParallel (one process per GPU).")
        # Each is checked when set; their order only here (setting low then high passes
        # through a state low > high), from a bool as _zero_rate (traced with dynamic=True,
        # a comparison of the rates cost a compiled frame of its own)
        if self._unordered:
            V.low_high(self.low, self.high)  # raises
        identity = super()._identity(x)
        if identity and not V.exporting():  # (an exported program sets no attribute)
            self.last_applied = False
        return identity

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # training, participation > 0
        if _traced(x):
            # A Python branch on a random draw would be a graph break under torch.compile
            # and frozen by CUDA graph capture: draw on x's device and hand the flag to the
            # kernels, which skip x when it is False (one read of x for the whole step, the
            # apply's y = x; no select after the whole op, SPEC §5).
            applied = torch.rand((), device=x.device) < self.participation
            # FX: a node, drawn when the graph runs; torch.export: an exported program does
            # not set attributes (torch warned of the assignment), its draw is in the graph
            if not isinstance(x, torch.fx.Proxy) and not V.exporting():
                self.last_applied = applied  # a 0-d bool tensor here
            return F.focused_dropout(x, self.low, self.high, per_position=self.per_position,
                                     applied=applied)
        V.not_jit_traced()  # before the draw, which a trace would bake in
        V.not_vmapped(x)  # before the draw too
        # the CPU generator whatever torch's default device (a CUDA one: a sync per step)
        self.last_applied = bool(torch.rand((), device="cpu") < self.participation)
        if not self.last_applied:
            dispatch.requested()  # a GUIDEDROP_BACKEND naming no backend raises, as _identity
            return x
        return F.focused_dropout(x, self.low, self.high, per_position=self.per_position)


def _traced(x: torch.Tensor) -> bool:
    """Whether this forward runs under torch.compile, CUDA graph capture or FX tracing, or
    infers shapes (a meta x, FakeTensors): no host read of a draw."""
    return isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or x.is_meta \
        or V.fake(x) or (x.is_cuda and torch.cuda.is_current_stream_capturing())


class CamDrop(GuidedDropout):
    """CamDrop (Wang et al.): DropBlock whose seeds fall only on the top positions of the
    class activation map of each sample's target and on the top ``channel_rate`` of the
    channels by that class's weights. ``drop_rate`` is 1 - ``keep``. The definition, noise
    and errors: :func:`guidedrop.functional.camdrop`.

    In training it reads the classifier weight and the targets from the enclosing
    :func:`guidedrop.cam_targets` block of the current thread (RuntimeError without one).
    In training inside ``nn.DataParallel`` replicas it raises RuntimeError pointing to
    DistributedDataParallel.

    Args:
        block_size: the blocks' side, an integer >= 1, in units of x.
        keep: DropBlock's keep_prob in CamDrop's g, a real number in [0, 1] (not the
            share of units kept: far fewer drop, see the functional op).
        channel_rate: the share of channels that may drop, a real number in [0, 1].
        normalize: ``"batch"`` (multiply by numel(w) / sum(w) over the batch), ``"sample"``
            (per sample) or ``"none"``.

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    Paper: Wang et al., "CamDrop: A New Explanation of Dropout and A Guided
    Regularization Method for Deep Neural Networks", CIKM 2019.
    """

    _fields = ("block_size", "keep", "channel_rate", "normalize")
    _rate, _rate_inverted = "keep", True
    block_size, keep = _checked("block_size", _BLOCK), _checked("keep", _REAL)
    channel_rate, normalize = _checked("channel_rate", _REAL), _checked("normalize", _NORMALIZE)

    def __init__(self, block_size: int = 5, keep: float = 0.9, channel_rate: float = 0.125,
                 normalize: str = "batch"):
        super().__init__()
        self.block_size, self.keep, self.channel_rate = block_size, keep, channel_rate
        self.normalize = normalize

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_replica(self):
            # The replicas run in threads that do not see the caller's cam_targets
            # (a per-thread context variable), and the batch is split across them.
            raise RuntimeError(
                "CamDrop does not support nn.DataParallel in training: the replicas cannot "
                "read the step's cam_targets. Use torch.nn.parallel.DistributedDataParallel "
                "(one process per GPU, each with its own `with guidedrop.cam_targets(...)`).")
        if V.exporting():  # (non-strict export; strict export traces with Dynamo)
            # The targets are read from the context, not passed to forward: an exported
            # program would keep the export's labels as a constant (and run outside any
            # cam_targets block).
            raise RuntimeError(
                "torch.export cannot keep CamDrop's targets in training mode: the module "
                "reads them from `guidedrop.cam_targets` at each call, and the exported "
                "program would keep the labels of the export. Export in eval mode (CamDrop "
                "is the identity there), or call guidedrop.functional.camdrop(x, weight, "
                "target, ...) in your forward, with the targets an input of the model.")
        V.not_jit_traced()  # its message, before the one of a missing cam_targets block
        weight, target = _cam_block(x)
        return F.camdrop(x, weight, target, **self._params())


@F.fx_leaf
def _cam_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """context.current(); under FX one node, read when the traced graph runs, also when
    its code is traced again (pickle, symbolic_trace of the GraphModule). x only carries
    the trace."""
    return context.current()


class DropBlock2d(GuidedDropout):
    """DropBlock (Ghiasi et al.), the baseline: drop ``block_size`` x ``block_size``
    squares around Bernoulli seeds, to a dropped fraction ``p``, then rescale by
    ``normalize``. ``drop_rate`` is ``p``. The definition, noise and errors:
    :func:`guidedrop.functional.dropblock`.

    Args:
        p: the target dropped fraction, a real number in [0, 1].
        block_size: the blocks' side, an integer >= 1, in units of x (clamped to the map).
        shared_channels: one mask for every channel of a sample.
        normalize: ``"batch"`` (multiply by numel(w) / sum(w) over the batch), ``"sample"``
            (per sample) or ``"none"``.

    Shape: x (N, C, H, W) float32, float16 or bfloat16 (float64 on the reference backend),
    any memory format -> x's shape, dtype and memory format; x itself in eval mode or at a
    zero ``drop_rate``. A bad parameter is a ValueError / TypeError where it is set.

    Paper: Ghiasi et al., "DropBlock: A regularization method for convolutional
    networks", NeurIPS 2018.
    """

    _fields = ("p", "block_size", "shared_channels", "normalize")
    p, block_size = _checked("p", _REAL), _checked("block_size", _BLOCK)
    shared_channels = _checked("shared_channels", V.flag)
    normalize = _checked("normalize", _NORMALIZE)

    def __init__(self, p: float = 0.1, block_size: int = 7, shared_channels: bool = False,
                 normalize: str = "batch"):
        super().__init__()
        self.p, self.block_size = p, block_size
        self.shared_channels, self.normalize = shared_channels, normalize

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropblock(x, **self._params())
