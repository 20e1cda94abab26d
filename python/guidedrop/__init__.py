"""guidedrop: fused kernels for guided structured dropout in CNNs.

Layers: CorrDrop, SelectScale, SpatialScale, Selectout, AttentionDrop, FocusedDropout,
CamDrop and the DropBlock2d baseline; see ``guidedrop.functional`` for the ops and their
exact behaviour. The README's "The papers, and what SPEC.md settles" summarises the
project's specification (SPEC.md, cited as "SPEC §N" in the docstrings), which is not
shipped with the package.

Every public submodule is an attribute of the package: ``guidedrop.functional``,
``guidedrop.models``, ``guidedrop.primitives``, ``guidedrop.reference``, ``guidedrop.layers``,
``guidedrop.modules``, ``guidedrop.schedule``, ``guidedrop.context``, ``guidedrop.dispatch``
are imported with it; the kernel backends ``guidedrop.triton_kernels`` and
``guidedrop.cuda_backend`` (they need Triton or the built extension), the command line's
``guidedrop.bench`` / ``demo`` / ``show`` / ``cli`` and the performance accounting
``guidedrop.launches`` (launches and bytes counted) / ``sass`` (sm_90 SASS counted) are
imported on first access.
"""

import importlib as _importlib

# The submodules are attributes of the package, not names of __all__ (below): re-exported.
# ruff: noqa: F401
from . import (
    context,
    dispatch,
    functional,
    layers,
    models,
    modules,
    primitives,
    reference,
    schedule,
)
from .context import cam_targets
from .dispatch import available as available_backends
from .modules import (
    AttentionDrop,
    CamDrop,
    CorrDrop,
    DropBlock2d,
    FocusedDropout,
    GuidedDropout,
    Selectout,
    SelectScale,
    SpatialScale,
)
from .schedule import LinearRamp

__version__ = "0.1.0"

# Imported on first access: the kernel backends need Triton or the built extension, and the
# command line's modules are not needed to train with the layers.
_LAZY = ("triton_kernels", "cuda_backend", "bench", "demo", "show", "cli", "launches", "sass")

# What ``from guidedrop import *`` binds: the layers and helpers, no submodule (a star import
# imports every module named here, and the kernel backends raise ImportError where Triton or
# the extension is missing; ``models`` or ``functional`` would replace a user's own names).
__all__ = [
    "AttentionDrop", "CamDrop", "CorrDrop", "DropBlock2d", "FocusedDropout", "GuidedDropout",
    "LinearRamp", "SelectScale", "Selectout", "SpatialScale", "available_backends",
    "cam_targets",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'guidedrop' has no attribute {name!r}")
    try:
        return _importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        raise AttributeError(f"guidedrop.{name} is not available here: {e}") from e


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
