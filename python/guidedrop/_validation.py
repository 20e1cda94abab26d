"""Argument and input checks of SPEC §1, run before any kernel.

Each check raises ValueError (TypeError for a wrong type) naming the argument.
"""

from __future__ import annotations

import numbers

import torch

NORMALIZE = ("batch", "sample", "none")
MODES = ("am", "sm", "ad")


def real(name: str, v, lo: float = 0.0, hi: float = 1.0, *, open_lo: bool = False) -> None:
    """A number in [lo, hi] ((lo, hi] with open_lo)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if v != v or v > hi or v < lo or (open_lo and v == lo):
        left = "(" if open_lo else "["
        raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {v}")


def block_size(v, name: str = "block_size") -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


def choice(name: str, v, options: tuple[str, ...]) -> None:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {options}, got {type(v).__name__}")
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")


def flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def low_high(low, high) -> None:
    real("low", low)
    real("high", high)
    if low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")


def feature_map(x) -> None:
    """x: a 4-D floating tensor (N, C, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")


def noise(u, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """u: None or a float tensor of uniforms of exactly ``shape`` on x's device."""
    if u is None:
        return
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"noise must be a floating tensor, got dtype {u.dtype}")
    if tuple(u.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(u.shape)}")
    if u.device != x.device:
        raise ValueError(f"noise must be on x's device {x.device}, got {u.device}")


def cam_inputs(weight, target, x: torch.Tensor) -> None:
    """weight: (K, C_fc) with C_fc a multiple of C; target: (N,) integer class indices."""
    if weight is None or target is None:
        raise ValueError("camdrop needs the classifier weight and the targets "
                         "(use guidedrop.cam_targets(model.fc, labels) with the module)")
    if not isinstance(weight, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("weight and target must be torch.Tensors")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor (K, C_fc), got {tuple(weight.shape)}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}")
    c, c_fc = x.shape[1], weight.shape[1]
    if c > 0 and c_fc % c != 0:
        raise ValueError(f"weight has C_fc={c_fc} columns, not a multiple of x's C={c}")
    if weight.device != x.device or target.device != x.device:
        raise ValueError(f"weight and target must be on x's device {x.device}")
