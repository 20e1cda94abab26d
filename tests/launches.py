"""Counting the device work of a region of code on the CPU: the launch budget of issue 12.

:class:`LaunchCounter` records, while active:

- every aten op that computes (a kernel launch on a GPU): everything but allocations
  (``empty``, ``empty_like``, ...), views and other metadata-only ops;
- every Triton kernel launch (``JITFunction.run`` and, under ``TRITON_INTERPRET=1``,
  ``InterpretedFunction.run``), by kernel name;
- every kernel launch of the emulated CUDA extension (``torch.ops.guidedrop_emu``, counted
  by tests/cuda_emu/emu.h); the emulated op itself is not a launch, its kernels are;
- host synchronisations (``.item()``, ``nonzero``, ``equal``, ...), which must be none.

The Triton backend's launchers are also ``torch.library`` custom ops
(``guidedrop_triton::<name>``, called while torch.compile traces); a dispatch mode sees such
an op, not the aten ops inside it, so the counter runs the op's Python body under the mode.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE = {  # allocations and metadata: not launches
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
    "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "record_stream",
}
SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "_assert_async"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: list[str] = []  # one name per device launch, in order
        self.syncs: list[str] = []
        self._in_kernel = False

    # ---------------------------------------------------------------- aten ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_kernel:
            return func(*args, **kwargs)
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns == "guidedrop_triton":
            from torch._library.custom_ops import OPDEFS
            with self:  # the op's own aten ops and launches, counted one by one
                return OPDEFS[f"{ns}::{name}"]._init_fn(*args, **kwargs)
        if ns == "guidedrop_emu":
            ops = torch.ops.guidedrop_emu
            before = ops.emu_launches()
            out = func(*args, **kwargs)
            self.launches += [f"cuda:{name}"] * (ops.emu_launches() - before)
            return out
        if name in SYNCS:
            self.syncs.append(name)
        elif name not in FREE and not func.is_view:
            self.launches.append(f"aten:{name}")
        return func(*args, **kwargs)

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
                self.launches.append(f"triton:{getattr(fn, '__name__', '?')}")
                # The interpreter's own copies of the arguments are not the op's launches.
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
        self._depth = getattr(self, "_depth", 0) + 1
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

    def counts(self) -> collections.Counter:
        return collections.Counter(self.launches)
