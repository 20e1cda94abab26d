"""Backend registry: which implementation of the hot paths runs an op.

``GUIDEDROP_BACKEND=reference|triton|cuda`` forces one (read at every call, also where the
op is the identity: a value naming no backend is then a ValueError) and fails loudly, with
the reason, when it is unavailable or cannot take the input; ``auto`` (the
default) takes the first available kernel backend that supports the input, in the
order of :data:`AUTO_ORDER`, and the reference otherwise (float64, and CPU tensors but
under TRITON_INTERPRET=1, where the Triton kernels take them).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from . import reference

MODULES = {
    "reference": "guidedrop.reference",
    "triton": "guidedrop.triton_kernels",
    "cuda": "guidedrop.cuda_backend",
}
# CUDA first: on an H200 (torch 2.11, 2026-12-04; benchmarks/RESULTS.md) its forward +
# backward was faster than Triton's in eager mode in every cell but one of two runs (3-11x
# before Triton's eager launch fix, median 2.1x after it: Triton is host-bound), and
# replayed in a CUDA graph Triton took 0.56-2.4x its time (median 1.03 and 1.05).
AUTO_ORDER = ("cuda", "triton")

# What a kernel backend needs that an install may lack: its absence is no fault.
OPTIONAL = {"triton": "triton", "cuda": "guidedrop._C"}

_loaded: dict[str, tuple[ModuleType | None, str]] = {"reference": (reference, "")}


def load(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") when backend ``name`` is usable here, else (None, why not).

    Raises nothing of its own. A backend that is installed but does not import
    (guidedrop._C built against another torch, a broken Triton) warns once (RuntimeWarning,
    an exception under a warnings filter of "error"): ``auto`` would otherwise pass over it
    unseen."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(MODULES[name])
            why = mod.unavailable() if hasattr(mod, "unavailable") else ""
            _loaded[name] = (None, why) if why else (mod, "")
        except Exception as e:
            why = f"{MODULES[name]} does not import ({type(e).__name__}: {e})"
            _loaded[name] = (None, why)
            if not (isinstance(e, ModuleNotFoundError) and e.name == OPTIONAL.get(name)):
                warnings.warn(f"guidedrop: the {name} backend is unavailable: {why}",
                              RuntimeWarning, stacklevel=2)
    return _loaded[name]


def available() -> list[str]:
    """The names of the backends that load here (``guidedrop.available_backends()``), of
    "reference", "triton" and "cuda": the reference always; Triton where a GPU is visible
    or TRITON_INTERPRET=1 (then on CPU tensors); CUDA where the extension ``guidedrop._C``
    is built and a GPU is visible. Whether a backend can take a given x
    is decided per call (``GUIDEDROP_BACKEND``, README)."""
    return [name for name in MODULES if load(name)[0] is not None]


def requested() -> str:
    """``GUIDEDROP_BACKEND`` as a backend name or "auto", read case-blind and stripped; unset
    or empty (``GUIDEDROP_BACKEND= cmd``) is "auto". Raises ValueError for any other value."""
    name = os.environ.get("GUIDEDROP_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in MODULES:
        raise ValueError(
            f"GUIDEDROP_BACKEND must be one of auto, {', '.join(MODULES)}; got {name!r}")
    return name


def _unsupported(mod: ModuleType, x: torch.Tensor) -> str:
    return mod.unsupported(x) if hasattr(mod, "unsupported") else ""


def backend_for(x: torch.Tensor) -> ModuleType:
    """The backend module that runs an op on ``x``."""
    name = requested()
    if name != "auto":
        mod, why = load(name)
        why = why or _unsupported(mod, x)
        if why:
            raise RuntimeError(f"GUIDEDROP_BACKEND={name}, but it cannot run here: {why}")
        return mod
    for name in AUTO_ORDER:
        mod, _ = load(name)
        if mod is not None and not _unsupported(mod, x):
            return mod
    return reference
