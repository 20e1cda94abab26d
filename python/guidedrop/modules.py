"""nn.Module wrappers with the spec's defaults. They hold parameters only; the work is
in :mod:`guidedrop.functional`. Eval mode is the identity (the input itself).

Every module has ``drop_rate``: the strength that schedules ramp from 0 to its target
(p, alpha, participation, or 1 - keep / 1 - retain).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as V
from . import context
from . import functional as F


class GuidedDropout(nn.Module):
    """Base class. Subclasses name their parameters in ``_fields`` and the one that
    ``drop_rate`` maps to in ``_rate`` (``_rate_inverted``: drop_rate = 1 - it)."""

    _fields: tuple[str, ...] = ()
    _rate: str = "p"
    _rate_inverted = False

    @property
    def drop_rate(self) -> float:
        v = getattr(self, self._rate)
        return 1 - v if self._rate_inverted else v

    @drop_rate.setter
    def drop_rate(self, rate: float) -> None:
        V.real("drop_rate", rate)
        setattr(self, self._rate, 1 - rate if self._rate_inverted else rate)

    def _params(self) -> dict:
        return {f: getattr(self, f) for f in self._fields}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._params().items())


class CorrDrop(GuidedDropout):
    """CorrDrop (SPEC §2). x: (N, C, H, W) -> same."""

    _fields = ("p", "block_size", "normalize")

    def __init__(self, p: float = 0.1, block_size: int = 7, normalize: str = "batch"):
        super().__init__()
        V.real("p", p), V.block_size(block_size), V.choice("normalize", normalize, V.NORMALIZE)
        self.p, self.block_size, self.normalize = p, block_size, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.corrdrop(x, **self._params(), training=self.training)


class SelectScale(GuidedDropout):
    """SelectScale (SPEC §3). x: (N, C, H, W) -> same."""

    _fields, _rate, _rate_inverted = ("top_rate", "retain"), "retain", True

    def __init__(self, top_rate: float = 0.2, retain: float = 0.1):
        super().__init__()
        V.real("top_rate", top_rate), V.real("retain", retain)
        self.top_rate, self.retain = top_rate, retain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.selectscale(x, **self._params(), training=self.training)


class SpatialScale(GuidedDropout):
    """SpatialScale (SPEC §3). x: (N, C, H, W) -> same."""

    _fields, _rate, _rate_inverted = ("retain",), "retain", True

    def __init__(self, retain: float = 0.4):
        super().__init__()
        V.real("retain", retain)
        self.retain = retain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.spatialscale(x, **self._params(), training=self.training)


class Selectout(GuidedDropout):
    """Selectout (SPEC §3). x: (N, C, H, W) -> same."""

    _fields, _rate, _rate_inverted = ("top_rate", "keep"), "keep", True

    def __init__(self, top_rate: float = 0.2, keep: float = 0.9):
        super().__init__()
        V.real("top_rate", top_rate), V.real("keep", keep, open_lo=True)
        self.top_rate, self.keep = top_rate, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.selectout(x, **self._params(), training=self.training)


class AttentionDrop(GuidedDropout):
    """AttentionDrop (SPEC §4). x: (N, C, H, W) -> same."""

    _fields, _rate = ("alpha", "beta", "mode", "normalize"), "alpha"

    def __init__(self, alpha: float = 0.1, beta: float = 20.0, mode: str = "ad",
                 normalize: str = "batch"):
        super().__init__()
        V.real("alpha", alpha), V.real("beta", beta, 0, 100, open_lo=True)
        V.choice("mode", mode, V.MODES), V.choice("normalize", normalize, V.NORMALIZE)
        self.alpha, self.beta, self.mode, self.normalize = alpha, beta, mode, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.attentiondrop(x, **self._params(), training=self.training)


class FocusedDropout(GuidedDropout):
    """FocusedDropout (SPEC §5). x: (N, C, H, W) -> same.

    Applies to a whole batch with probability ``participation`` (one draw per training
    forward from torch's CPU generator: no device sync) and is the identity otherwise.
    ``last_applied`` tells whether the last forward applied it, so a training loop can
    raise weight decay on those steps (the paper's MWD). Under torch.compile or CUDA graph
    capture the draw is made on x's device and ``last_applied`` is a 0-d bool tensor.
    """

    _fields, _rate = ("participation", "low", "high", "per_position"), "participation"

    def __init__(self, participation: float = 0.1, low: float = 0.3, high: float = 0.6,
                 per_position: bool = False):
        super().__init__()
        V.real("participation", participation), V.low_high(low, high)
        V.flag("per_position", per_position)
        self.participation, self.low, self.high = participation, low, high
        self.per_position = per_position
        self.last_applied = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _traced(x):
            # A Python branch on a random draw would be a graph break under torch.compile
            # and frozen by CUDA graph capture: draw on x's device and select instead.
            applied = torch.rand((), device=x.device) < self.participation
            self.last_applied = applied  # a 0-d bool tensor here
            y = F.focused_dropout(x, self.low, self.high, per_position=self.per_position)
            return torch.where(applied, y, x)
        self.last_applied = self.training and bool(torch.rand(()) < self.participation)
        if not self.last_applied:
            return x
        return F.focused_dropout(x, self.low, self.high, per_position=self.per_position)


def _traced(x: torch.Tensor) -> bool:
    """Whether this forward runs under torch.compile or CUDA graph capture."""
    return torch.compiler.is_compiling() or (
        x.is_cuda and torch.cuda.is_current_stream_capturing())


class CamDrop(GuidedDropout):
    """CamDrop (SPEC §6). x: (N, C, H, W) -> same. In training it reads the classifier
    weight and the targets from the enclosing :func:`guidedrop.cam_targets` block."""

    _fields = ("block_size", "keep", "channel_rate", "normalize")
    _rate, _rate_inverted = "keep", True

    def __init__(self, block_size: int = 5, keep: float = 0.9, channel_rate: float = 0.125,
                 normalize: str = "batch"):
        super().__init__()
        V.block_size(block_size), V.real("keep", keep), V.real("channel_rate", channel_rate)
        V.choice("normalize", normalize, V.NORMALIZE)
        self.block_size, self.keep, self.channel_rate = block_size, keep, channel_rate
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep == 1:
            return x
        weight, target = context.current()
        return F.camdrop(x, weight, target, **self._params())


class DropBlock2d(GuidedDropout):
    """DropBlock (SPEC §7), the baseline. x: (N, C, H, W) -> same."""

    _fields = ("p", "block_size", "shared_channels", "normalize")

    def __init__(self, p: float = 0.1, block_size: int = 7, shared_channels: bool = False,
                 normalize: str = "batch"):
        super().__init__()
        V.real("p", p), V.block_size(block_size), V.flag("shared_channels", shared_channels)
        V.choice("normalize", normalize, V.NORMALIZE)
        self.p, self.block_size = p, block_size
        self.shared_channels, self.normalize = shared_channels, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropblock(x, **self._params(), training=self.training)
