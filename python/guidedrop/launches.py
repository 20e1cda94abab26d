"""Launch accounting: the device work of a region of code, counted on any machine.

:class:`LaunchCounter` records, while active (a ``TorchDispatchMode``):

- every aten op that computes (one kernel launch on a GPU): everything but allocations
  (``empty``, ``empty_like``, ...), views and other metadata-only ops;
- every Triton kernel launch (``JITFunction.run``, and ``InterpretedFunction.run`` under
  ``TRITON_INTERPRET=1``), by kernel name;
- the CUDA extension's ops: each ``guidedrop::<op>`` counts the kernels it launches, from
  :data:`KERNELS` (its launches are not visible from Python; exact for the layers' calls
  with x under 2³¹ elements, past which an apply op launches once per 2³¹; an op given a
  non-contiguous or misaligned small tensor copies it first, one kernel more), and the
  emulated extension of the tests (``guidedrop_emu``) counts the kernels it actually
  launched (which tests/test_launches.py holds to :data:`KERNELS`);
- host synchronisations (``.item()``, ``nonzero``, ``equal``, ...).

Each launch carries the bytes of the tensors it takes and returns (an upper bound on what a
kernel moves: a kernel may read part of a tensor). :func:`count_layer` measures one forward
and one backward of each layer with it: ``python -m guidedrop bench --model`` prints it,
and tests/test_launches.py holds every layer to its launch budget (issue 12).

The Triton backend's launchers are also ``torch.library`` ops (called while torch.compile
traces); a dispatch mode sees such an op, not the aten ops inside it, so the counter runs
the op's Python body under the mode.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE = {  # allocations and metadata: not launches
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
    "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "record_stream",
}
SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item"}
# The kernels each op of csrc/ launches where it is not one (csrc/guidedrop.cpp): a plan op
# is its statistics and plan kernels in one call. seed_coverage, which no layer calls,
# zeroes its output first: 2 on a GPU (the emulator counts its kernel only; not tested).
KERNELS = {"attentiondrop_plan": 2, "corrdrop_plan": 2, "seeds_plan": 2, "camdrop_plan": 4,
           "seed_coverage": 2}


class Launch(NamedTuple):
    name: str  # "aten:<op>", "triton:<kernel>", "cuda:<op>"
    nbytes: int  # bytes of the tensors it takes plus those it returns (see _nbytes)
    spec: dict | None = None  # a Triton launch as guidedrop.sass compiles it


def _spec(fn, args, kwargs) -> dict | None:
    from .sass import describe
    try:
        return {"module": fn.__module__, "kernel": fn.__name__,
                "args": [describe(a) for a in args],
                "kwargs": {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}}
    except (TypeError, AttributeError):  # an argument sass does not describe
        return None


def _nbytes(*trees) -> int:
    """The bytes of the distinct tensors in ``trees``. A launch's are _nbytes(its inputs)
    + _nbytes(its outputs): a tensor an in-place op reads and writes counts twice, so the
    sum bounds what the launch moves from above."""
    seen, total = set(), 0
    for tree in trees:
        for t in torch.utils._pytree.tree_leaves(tree):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, t.shape)
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
    return total


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: ...`` -> ``c.launches`` (list of :class:`Launch`, in
    order) and ``c.syncs`` (names of the host synchronisations)."""

    # A Triton launch made while traced (guidedrop.triton_kernels._common.traced, e.g. the
    # counter inside make_fx) is wrap_triton's higher-order op: without this, torch
    # refuses it (seen on an H200 when every dispatch mode counted as tracing).
    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.launches: list[Launch] = []
        self.syncs: list[str] = []
        self._in_kernel = False
        self._depth = 0

    @property
    def names(self) -> list[str]:
        return [launch.name for launch in self.launches]

    @property
    def nbytes(self) -> int:
        return sum(launch.nbytes for launch in self.launches)

    # ---------------------------------------------------------------- aten and custom ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_kernel or isinstance(func, torch._ops.HigherOrderOperator):
            # the interpreter's own copies of a kernel's arguments; or wrap_triton's op,
            # whose launch the patched JITFunction.run counts
            return func(*args, **kwargs)
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns == "guidedrop_triton":
            from torch._library.custom_ops import OPDEFS
            with self:  # the op's own aten ops and launches, counted one by one
                return OPDEFS[f"{ns}::{name}"]._init_fn(*args, **kwargs)
        if ns == "guidedrop_emu":  # the kernels the emulator launched
            before = torch.ops.guidedrop_emu.emu_launches()
            out = func(*args, **kwargs)
            kernels = torch.ops.guidedrop_emu.emu_launches() - before
        else:
            out = func(*args, **kwargs)
            kernels = KERNELS.get(name, 1) if ns == "guidedrop" else 0
        if kernels:
            nbytes = _nbytes(args, kwargs) + _nbytes(out)
            self.launches += [Launch(f"cuda:{name}", nbytes if i == 0 else 0)
                              for i in range(kernels)]
        elif name in SYNCS:
            self.syncs.append(name)
        elif name not in FREE and not func.is_view and not ns.startswith("guidedrop"):
            self.launches.append(Launch(f"aten:{name}", _nbytes(args, kwargs) + _nbytes(out)))
        return out

    # ---------------------------------------------------------------- Triton kernels
    @contextlib.contextmanager
    def _triton(self):
        patched = []
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
            classes = [JITFunction, InterpretedFunction]
        except ImportError:
            classes = []
        for cls in classes:
            original = cls.run

            def run(kernel, *args, _original=original, **kwargs):
                if kwargs.get("warmup", False) or self._in_kernel:
                    return _original(kernel, *args, **kwargs)
                fn = getattr(kernel, "fn", kernel)
                self.launches.append(Launch(f"triton:{getattr(fn, '__name__', '?')}",
                                            _nbytes(args, kwargs), _spec(fn, args, kwargs)))
                self._in_kernel = True
                try:
                    return _original(kernel, *args, **kwargs)
                finally:
                    self._in_kernel = False

            cls.run = run
            patched.append((cls, original))
        try:
            yield
        finally:
            for cls, original in patched:
                cls.run = original

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:  # re-entered from __torch_dispatch__: patched already
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(self._triton())
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            self._stack.close()
        return out


# --------------------------------------------------------------------------- the report


class LayerCount(NamedTuple):
    forward: LaunchCounter  # with noise given
    fresh: LaunchCounter  # forward with noise=None
    backward: LaunchCounter
    floor_bytes: int  # 3 reads + 2 writes of x: the forward + backward floor


def count_layer(call, x: torch.Tensor, noise: torch.Tensor) -> LayerCount:
    """Counts ``call(x, noise)`` (a layer's functional form on the forced backend): one
    forward with noise and its backward, and one forward with noise=None."""
    x = x.detach().requires_grad_()
    grad = torch.ones_like(x)
    with LaunchCounter() as fwd:
        y = call(x, noise)
    with LaunchCounter() as bwd:
        y.backward(grad)
    with LaunchCounter() as fresh:
        call(x.detach(), None)
    return LayerCount(fwd, fresh, bwd, 5 * x.numel() * x.element_size())
