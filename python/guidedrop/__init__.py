"""guidedrop: fused kernels for guided structured dropout in CNNs.

Layers: CorrDrop, SelectScale, SpatialScale, Selectout, AttentionDrop, FocusedDropout,
CamDrop and the DropBlock2d baseline; see ``guidedrop.functional`` for the ops and
SPEC.md for their exact behaviour.
"""

from . import functional, models, primitives, reference
from .context import cam_targets
from .dispatch import available as available_backends
from .modules import (
    AttentionDrop,
    CamDrop,
    CorrDrop,
    DropBlock2d,
    FocusedDropout,
    GuidedDropout,
    SelectScale,
    Selectout,
    SpatialScale,
)
from .schedule import LinearRamp

__version__ = "0.1.0"

__all__ = [
    "AttentionDrop", "CamDrop", "CorrDrop", "DropBlock2d", "FocusedDropout", "GuidedDropout",
    "LinearRamp", "SelectScale", "Selectout", "SpatialScale", "available_backends",
    "cam_targets", "functional", "models", "primitives", "reference",
]
