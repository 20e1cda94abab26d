"""Argument and input checks of SPEC §1, run before any kernel.

Each check raises ValueError (TypeError for a wrong type) naming the argument.
"""

from __future__ import annotations

import decimal
import math
import numbers
import operator

import torch
from torch._functorch import pyfunctorch

NORMALIZE = ("batch", "sample", "none")
NO_VMAP = ("guidedrop's layers do not support torch.func.vmap (a batch of output gradients "
           "is supported: torch.autograd.grad(..., is_grads_batched=True))")
MODES = ("am", "sm", "ad")


def real(name: str, v, lo: float | None = None, hi: float | None = None, *,
         open_lo: bool = False) -> float:
    """A real number in [lo, hi] ((lo, hi] with open_lo; lo 0 and hi 1 unless given),
    returned as a python float.

    Any ``numbers.Real`` is accepted (int, float, numpy scalars, Fraction), and a
    ``decimal.Decimal`` (a real number that numbers.Real leaves out); a bool or a tensor is
    a TypeError. A value that float() cannot take (an int beyond the float range, a
    signalling NaN) is out of range: a ValueError naming the argument, like any other.
    The layers only ever see the returned float.
    """
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, decimal.Decimal)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    # 0.0 and 1.0 here, not as defaults: Dynamo (torch 2.14) made float defaults symbolic
    # with dynamic=True, then specialised them on these comparisons, leaving their names in
    # a record that later compiles pinned a user's float by (see functional._clear_stale_pins)
    lo = 0.0 if lo is None else lo
    hi = 1.0 if hi is None else hi
    try:
        f = float(v)
    except (OverflowError, ValueError):
        f = math.nan
    if f != f or f > hi or f < lo or (open_lo and f == lo):
        left = "(" if open_lo else "["
        # a value above an open lo that rounds to it (Decimal("1e-999999") -> 0.0)
        why = f" (as a float: {f!r})" if open_lo and f == lo and v > lo else ""
        raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {_short(v)}{why}")
    return f + 0.0  # -0.0 as 0.0 (a repr of p=-0.0; the same rate)


def _short(v) -> str:
    """v for an error message, at most 60 characters (Fraction(1, 10**400) is long)."""
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def integer(name: str, v, lo: int = 1) -> int:
    """An integral number >= lo (any ``numbers.Integral`` but bool), returned as a python int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    i = int(v)  # before comparing: numpy's small ints wrap around in arithmetic
    if i < lo:
        raise ValueError(f"{name} must be >= {lo}, got {_short(i)}")
    return i


def block_size(v, name: str = "block_size") -> int:
    return integer(name, v, 1)


def _listed(options: tuple[str, ...]) -> str:
    return ", ".join(map(repr, options))  # 'am', 'sm', 'ad': not a tuple's repr


def choice(name: str, v, options: tuple[str, ...]) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {_listed(options)}, got "
                        f"{type(v).__name__}")
    if v not in options:
        raise ValueError(f"{name} must be one of {_listed(options)}, got {v!r}")
    return str(v)


def flag(name: str, v) -> bool:
    """A bool, numpy's too (an int, a tensor or a str is a TypeError), as a python bool."""
    t = type(v)
    if t is bool or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_")):
        return bool(v)
    shown = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    raise TypeError(f"{name} must be a bool, got {shown}")


def low_high(low, high) -> tuple[float, float]:
    low, high = real("low", low), real("high", high)
    if low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    return low, high


# The floating dtypes the library reads: x's (SPEC §1: float32, float16 or bfloat16;
# float64 on the reference path), and those the kernels read noise and weights in (a
# float8 one is converted first: layers.fusable)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dense(name: str, t: torch.Tensor) -> None:
    """t: a dense (strided) tensor. The kernels read a tensor's storage, and the reference's
    ops have no sparse forms (a sparse x failed deep inside torch, or passed through)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.is_nested:  # strided too (torch.nested.nested_tensor's default), but no sizes
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")


def resolved(t):
    """t, or for a tensor with its negative bit set (a lazy negation: z.conj().imag of a
    complex z) a copy with the negation applied: the kernels read storage, which holds
    -t. Other values as given."""
    return t.resolve_neg() if isinstance(t, torch.Tensor) else t


def feature_map(x) -> None:
    """x: a 4-D floating tensor (N, C, H, W) of a dtype of FLOATS (float8 is a TypeError:
    the reference returned a float8 output, the kernel backends refused it), dense."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dense("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise TypeError(f"x must be a floating tensor of float32, float16, bfloat16 or "
                        f"float64, got dtype {x.dtype}")


def generator(g) -> None:
    """g: None or a torch.Generator (torch's own error for another type names no argument)."""
    if g is not None and not isinstance(g, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(g).__name__}")


def noise(u, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """u: None or a float tensor of uniforms of exactly ``shape`` on x's device."""
    if u is None:
        return
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(u).__name__}")
    dense("noise", u)
    if not u.is_floating_point():
        raise TypeError(f"noise must be a floating tensor, got dtype {u.dtype}")
    if tuple(u.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(u.shape)}")
    if u.device != x.device:
        raise ValueError(f"noise must be on x's device {x.device}, got {u.device}")


def applied(a, x: torch.Tensor) -> None:
    """a: None or a 0-d bool tensor on x's device (FocusedDropout's participation flag)."""
    if a is None:
        return
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"applied must be a torch.Tensor or None, got {type(a).__name__}")
    dense("applied", a)
    if a.dtype != torch.bool:
        raise TypeError(f"applied must be a bool tensor, got dtype {a.dtype}")
    if a.dim() != 0:
        raise ValueError(f"applied must be a 0-d tensor, got shape {tuple(a.shape)}")
    if a.device != x.device:
        raise ValueError(f"applied must be on x's device {x.device}, got {a.device}")


def cam_inputs(weight, target, x: torch.Tensor, required: bool = True) -> torch.Tensor:
    """CamDrop's classifier weight and targets (SPEC §6 step 0); returns target as given.
    ``required``: a missing (None) weight or target is a ValueError; else (an op that does
    nothing) each is checked where given, target's range where weight is given too.

    weight: a floating (K, C_fc) tensor on x's device, K >= 1, C_fc >= 1 a multiple of
    x's C. target: (N,) class indices in [0, K), any integer dtype (bool is a TypeError;
    uint8 is an index, never a mask), on x's device, any strides; it is returned unchanged
    (no conversion: every backend reads it by value). An index out of range is a
    ValueError naming ``target`` for a CPU target, checked here on the host without any
    op on the device. A GPU target (and any target while torch.compile traces, where a
    host check would be a data-dependent graph break) is checked by the backend, without
    a host sync: an asynchronous device assertion naming ``target`` (``assert_target`` on
    the reference; in the first CamDrop kernel of a kernel backend, see
    backend_contract.md).
    """
    if required and (weight is None or target is None):
        raise ValueError("camdrop needs the classifier weight and the targets "
                         "(use guidedrop.cam_targets(model.fc, labels) with the module)")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        dense("weight", weight)
        if not weight.is_floating_point():  # a wrong type: TypeError (SPEC §1), as cam_targets
            raise TypeError(f"weight must be a floating tensor (K, C_fc), got dtype "
                            f"{weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D floating tensor (K, C_fc), got shape "
                             f"{tuple(weight.shape)}")
        k, c_fc = weight.shape
        if k < 1 or c_fc < 1:
            raise ValueError(f"weight (K, C_fc) needs K >= 1 classes and C_fc >= 1 columns, "
                             f"got shape {tuple(weight.shape)}")
        c = x.shape[1]
        if c > 0 and c_fc % c != 0:
            raise ValueError(f"weight has C_fc={c_fc} columns, not a multiple of x's C={c}")
        if weight.device != x.device:
            raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if target is None:
        return target
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    dense("target", target)
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class indices, got dtype "
                        f"{target.dtype}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"target must be on x's device {x.device}, got {target.device}")
    if weight is None:
        return target
    if target_checked_on_host(target):
        check_target_range(target, operator.index(k))  # torch.jit.trace: k a 0-d tensor
    return target


@torch.compiler.disable  # a host check: Dynamo cannot trace torch.func's unwrapping
def check_target_range(target: torch.Tensor, k: int) -> None:
    """ValueError naming ``target`` where a CPU target holds an index outside [0, k). Through
    numpy, which torch's dispatcher does not see: no op on the device, no launch (issue
    12's budget counts every aten op, a CPU one too)."""
    if torch._C._are_functorch_transforms_active():  # torch.func: data outside its transforms
        with pyfunctorch.temporarily_clear_interpreter_stack():
            return check_target_range(func_unwrapped(target), k)
    t = target.numpy()
    bad = t[(t < 0) | (t >= k)]
    if bad.size:
        raise ValueError(f"target must hold class indices in [0, {k}), got {bad[0]}")


def func_unwrapped(v):
    """v, or the plain tensor that a tensor of torch.func's grad / jvp transforms wraps: a
    wrapper has no storage that numpy or a kernel could read; the plain one shares the
    wrapper's, so a kernel's writes show through it. The layers read and launch on
    constants (a detached x under no_grad; w constant, whose tangent the autograd Function
    gives). vmap's batched tensors hold a batch dimension the kernels would take for N:
    NotImplementedError."""
    if isinstance(v, torch.Tensor):
        while torch._C._functorch.is_functorch_wrapped_tensor(v):
            if torch._C._functorch.is_batchedtensor(v):
                raise NotImplementedError(NO_VMAP)
            v = torch._C._functorch.get_unwrapped(v)
    return v


def target_checked_on_host(target: torch.Tensor) -> bool:
    """Whether ``cam_inputs`` checked target's range on the host: a CPU target outside
    torch.compile (and not a FakeTensor: shape inference). Otherwise the backend checks it
    on the device."""
    return target.device.type == "cpu" and not torch.compiler.is_compiling() \
        and not fake(target)


def fake(t: torch.Tensor) -> bool:
    """Whether t is a FakeTensor, or a FakeTensorMode is active (its factories make them):
    shape inference, no data to read on the host."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t) or torch._C._get_dispatch_mode(
        torch._C._TorchDispatchModeKey.FAKE) is not None


def assert_target(target: torch.Tensor, k: int) -> torch.Tensor:
    """The device check of a target (N,) of any integer dtype against K = k classes, in
    torch ops: an asynchronous assertion naming ``target`` (no host sync; on the CPU it
    raises RuntimeError at once), and the target as int64 clamped into [0, k), so that
    the indexing after it never raises a second, anonymous device assertion. The
    reference's check, and every backend's where no CamDrop kernel runs."""
    target = target.long()  # by value: uint8 is an index, never a mask
    torch._assert_async(((target >= 0) & (target < k)).all(),
                        f"target must hold class indices in [0, {k})")
    return target.clamp(0, k - 1)


def not_vmapped(*args) -> None:
    """NotImplementedError (NO_VMAP) where a tensor among args (x, CamDrop's weight and
    target, noise; the others are skipped) is batched by torch.func.vmap: checked before a
    draw, which vmap's default randomness="error" refuses with torch's error, whose advice
    (randomness="different") only led to this one."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        for a in args:
            func_unwrapped(a)


def exporting() -> bool:
    """Whether torch.export traces this call outside Dynamo (non-strict, torch's default).
    Not asked under Dynamo (torch.compile, strict export): torch 2.11's Dynamo folds
    torch.compiler.is_exporting() to True there, under torch.compile too."""
    return not torch.compiler.is_dynamo_compiling() and torch.compiler.is_exporting()


def not_jit_traced() -> None:
    """RuntimeError where torch.jit.trace records a layer that acts (training mode, a
    non-zero rate, a non-empty x): its plan is Python run at every call, which a trace
    freezes or fails on (it failed with errors such as ``unordered_map::at``), and
    FocusedDropout's module would bake in its one participation draw."""
    if not torch.compiler.is_compiling() and torch.jit.is_tracing():
        raise RuntimeError(
            "torch.jit.trace cannot record a guidedrop layer in training mode (the layer "
            "runs Python code at every call to choose its mask, which a trace would "
            "freeze). Trace the model in eval mode, where the layers are the identity and "
            "leave no node, or use torch.compile, which keeps the layers and draws fresh "
            "masks at each call (torch.export too, but for CamDrop's module: see the "
            "README).")
