"""``python -m guidedrop bench``: time every layer on every available backend.

For each layer x shape x dtype the bench first checks each backend against the eager
reference, given the same ``noise``, on a slice of the input (forward output and
``grad_x``), then times it in each mode. A backend that disagrees is not timed there: its
rows' note says MISMATCH with the max error, the other backends and cases still run, and
the run then raises :class:`MismatchError` (exit status 1). The modes:

- ``forward``: ``y = op(x)`` with ``x.requires_grad`` (what a training forward does);
- ``backward``: ``torch.autograd.grad(y, x, dy)`` of a kept ``y``;
- ``full``: both.

Backends ("providers"): ``reference`` (eager PyTorch), ``compile``
(``torch.compile(reference)``), and ``triton`` / ``cuda`` where
:func:`guidedrop.dispatch.load` has them and they take the device. Timing: on CUDA
``triton.testing.do_bench`` (median, L2 flushed) or CUDA events; on CPU
``time.perf_counter`` over a few repetitions.

The bandwidth floor is measured in the same run: a copy of a large tensor within the
device's memory gives the bandwidth B (bytes read + written per second); the floor of a
mode is the bytes a fused kernel of a layer with statistics moves at least — forward 3
passes over x (statistics read, apply read + write), backward 2 (read grad_y, write
grad_x), full 5 — divided by B. It is one yardstick for every layer (DESIGN.md's), not
each layer's own minimum: SpatialScale reads no statistics, DropBlock draws its seeds
without reading x, and AttentionDrop reads statistics only of the maps it drops, so
these need about 4 passes, not 5, and can run below 1x the floor. ``GB/s`` is the
floor's bytes over the time (an effective bandwidth), not bytes measured.

The library API used by ``benchmarks/``: :class:`Case`, :func:`make_inputs`,
:func:`provider_fn`, :func:`forced_backend`, :func:`check`, :func:`mode_fn`,
:func:`kept_bytes`, :class:`Timer`, :func:`measure_bandwidth`, :func:`default_providers`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import functools
import math
import os
import pickle
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import dispatch, functional, models, reference
from .cli import comma_list

LAYERS = models.LAYERS
PROVIDERS = ("reference", "compile", "triton", "cuda")
MODES = ("forward", "backward", "full")
PASSES = {"forward": 3, "backward": 2, "full": 5}  # passes over x's bytes in the floor

SHAPES: dict[str, tuple[int, int, int, int]] = {
    "r56": (128, 64, 56, 56),  # ResNet-50 after layer1 (25.7M elements)
    "r28": (128, 256, 28, 28),  # after layer2
    "r14": (128, 1024, 14, 14),  # after layer3
    "c32": (128, 16, 32, 32),  # CIFAR ResNet, first group
    "small": (8, 64, 28, 28),  # CPU default
    "tiny": (2, 16, 14, 14),  # CPU --quick (CI)
}
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}

# The goal shapes and dtypes (CUDA), and a small CPU default that finishes in < 1 min.
CUDA_DEFAULT = [("r56", "bf16"), ("r56", "fp32"), ("r28", "bf16"), ("r28", "fp32"),
                ("r14", "bf16"), ("r14", "fp32"), ("c32", "fp32")]
CUDA_QUICK = [("c32", "fp32")]
CPU_DEFAULT = [("small", "fp32")]
CPU_QUICK = [("tiny", "fp32")]

# The functional ops' defaults (the modules' defaults); FocusedDropout's functional form
# always applies (participation 1).
PARAMS: dict[str, dict] = {
    "corrdrop": dict(p=0.1, block_size=7),
    "selectscale": dict(top_rate=0.2, retain=0.1),
    "spatialscale": dict(retain=0.4),
    "selectout": dict(top_rate=0.2, keep=0.9),
    "attentiondrop": dict(alpha=0.1, beta=20.0),
    "focused_dropout": dict(low=0.3, high=0.6),
    "camdrop": dict(block_size=5, keep=0.9),
    "dropblock": dict(p=0.1, block_size=7),
}
CAM_CLASSES = 10  # classifier rows of CamDrop's weight (K, C)

# Comparing a backend with the reference in the same dtype (as tests/testing.py): both
# compute w in float32 and round t * w once, so they differ by at most a rounding flip.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
CHECK_ELEMENTS = 1 << 22  # the correctness check runs on the first samples, up to this size


class MismatchError(RuntimeError):
    """A backend disagrees with the reference. :func:`bench_case` notes it in that
    backend's rows (untimed) and goes on; the run then ends with exit status 1."""


def usage_error(msg: str) -> Exception:
    from .cli import UsageError
    return UsageError(msg)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One layer on one input: x (N, C, H, W) of ``dtype`` on ``device``."""

    layer: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device
    channels_last: bool = False

    @property
    def label(self) -> str:
        return f"{self.layer} {fmt_shape(self.shape)} {DTYPE_NAMES[self.dtype]}"


@dataclass
class Inputs:
    x: torch.Tensor  # (N, C, H, W)
    dy: torch.Tensor  # (N, C, H, W), the incoming gradient
    weight: torch.Tensor  # (K, C) classifier for CamDrop
    target: torch.Tensor  # (N,) classes for CamDrop
    extra: dict = field(default_factory=dict)


def fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Standard-normal x and dy, a random classifier and targets, drawn on the device."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    n, c = case.shape[:2]

    def randn(shape):
        t = torch.randn(shape, generator=gen, device=case.device).to(case.dtype)
        return t.contiguous(memory_format=torch.channels_last) if case.channels_last else t

    x, dy = randn(case.shape), randn(case.shape)
    weight = torch.randn((CAM_CLASSES, c), generator=gen, device=case.device)
    target = torch.randint(0, CAM_CLASSES, (n,), generator=gen, device=case.device)
    return Inputs(x, dy, weight, target)


def noise_shape(layer: str, shape) -> tuple[int, ...]:
    """Shape of the ``noise`` argument of ``layer`` for x of ``shape`` (see functional)."""
    n, c, h, w = shape
    if layer == "corrdrop":
        k = PARAMS[layer]["block_size"]
        return (2, n, *reference.pooled_size(h, w, k))
    if layer == "focused_dropout":
        return (n,)
    if layer in ("camdrop", "dropblock"):
        return (n, c, h, w)
    return (n, c)


def op(layer: str) -> Callable:
    """run(x, weight, target, noise=None) -> y: the functional op with PARAMS."""
    f, params = getattr(functional, layer), PARAMS[layer]
    if layer == "camdrop":
        def run(x, weight, target, noise=None):
            return f(x, weight, target, noise=noise, **params)
    else:
        def run(x, weight, target, noise=None):
            return f(x, noise=noise, **params)
    return run


# --------------------------------------------------------------------------- providers


def _dispatch_name(provider: str) -> str:
    return "reference" if provider in ("reference", "compile") else provider


@contextlib.contextmanager
def forced_backend(provider: str) -> Iterator[None]:
    """Run guidedrop ops on ``provider``'s backend (GUIDEDROP_BACKEND), restored after."""
    old = os.environ.get("GUIDEDROP_BACKEND")
    os.environ["GUIDEDROP_BACKEND"] = _dispatch_name(provider)
    try:
        if provider == "compile":
            with _compile_config():
                yield
        else:
            yield
    finally:
        if old is None:
            os.environ.pop("GUIDEDROP_BACKEND", None)
        else:
            os.environ["GUIDEDROP_BACKEND"] = old


def _compile_config():
    # Donated buffers forbid backward(retain_graph=True), which the "backward" mode uses.
    try:
        import torch._functorch.config as fconfig
        if hasattr(fconfig, "donated_buffer"):
            return fconfig.patch(donated_buffer=False)
    except ImportError:
        pass
    return contextlib.nullcontext()


def provider_fn(provider: str, layer: str, compiler: str = "inductor") -> Callable:
    """The callable run(x, weight, target, noise=None) of ``layer`` on ``provider``.

    Call it inside ``forced_backend(provider)``. ``compile`` is a fresh
    ``torch.compile(..., dynamic=False, backend=compiler)``: call
    ``torch.compiler.reset()`` between cases (dynamo's recompile limit is per code object,
    shared by every layer here). ``compiler="eager"`` traces without generating code (the
    dry run: seconds instead of minutes on a CPU).
    """
    fn = op(layer)
    if provider == "compile":
        return torch.compile(fn, dynamic=False, backend=compiler)
    return fn


def unsupported(provider: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why ``provider`` cannot run ``dtype`` tensors on ``device`` ("" when it can)."""
    if provider not in PROVIDERS:
        return f"unknown backend {provider!r}; choose from {', '.join(PROVIDERS)}"
    if provider in ("reference", "compile"):
        return ""
    mod, why = dispatch.load(provider)
    if mod is None:
        return why
    if device.type != "cuda":
        if provider == "cuda":
            return "the CUDA extension runs on CUDA tensors only"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)"
    if hasattr(mod, "unsupported"):
        return mod.unsupported(torch.empty((1, 1, 1, 1), device=device, dtype=dtype))
    return ""


def default_providers(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """Every provider that can run here; Triton under TRITON_INTERPRET on CPU is left out
    (it works, but times the interpreter)."""
    out = []
    for p in PROVIDERS:
        if (p == "triton" and device.type == "cpu"
                and os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        if not unsupported(p, device, dtype):
            out.append(p)
    return out


# --------------------------------------------------------------------------- correctness


def check_slice(case: Case, inputs: Inputs) -> Inputs:
    """The first samples of the inputs (at most CHECK_ELEMENTS elements, at least one
    sample) with fixed noise for ``case.layer``."""
    n, c, h, w = case.shape
    k = max(1, min(n, CHECK_ELEMENTS // max(1, c * h * w)))
    gen = torch.Generator(device=case.device).manual_seed(1234)
    shape = (k, c, h, w)
    noise = torch.rand(noise_shape(case.layer, shape), generator=gen, device=case.device)
    return Inputs(inputs.x[:k], inputs.dy[:k], inputs.weight, inputs.target[:k],
                  {"noise": noise})


def run_with_grad(fn: Callable, s: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, grad_x) of fn on the slice s with its noise."""
    x = s.x.detach().clone().requires_grad_()
    y = fn(x, s.weight, s.target, noise=s.extra["noise"])
    (g,) = torch.autograd.grad(y, x, s.dy)
    return y.detach(), g


def _max_error(actual: torch.Tensor, expected: torch.Tensor, dtype) -> tuple[float, int]:
    """(max |actual - expected|, count of elements beyond the dtype's tolerance)."""
    atol, rtol = TOL[dtype]
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    nan_mismatch = a.isnan() != e.isnan()
    bad = ((diff > atol + rtol * e.abs()) & ~(a.isnan() & e.isnan())) | nan_mismatch
    err = diff.nan_to_num(nan=math.inf).max().item() if diff.numel() else 0.0
    if nan_mismatch.any():
        err = math.inf
    return err, int(bad.sum().item())


def check(case: Case, provider: str, fn: Callable, s: Inputs,
          expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Raise MismatchError when ``fn`` (run inside forced_backend(provider)) disagrees
    with the reference ``expected = (y, grad_x)`` on the slice ``s``."""
    try:
        got = run_with_grad(fn, s)
    except Exception as e:  # a crash is a disagreement too
        raise MismatchError(f"{case.label}: backend {provider} failed on the correctness "
                            f"check: {_first_line_of(e)}") from e
    for what, a, b in (("output", got[0], expected[0]), ("grad_x", got[1], expected[1])):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise MismatchError(f"{case.label}: backend {provider} returns {what} of shape "
                                f"{tuple(a.shape)} {a.dtype}, the reference "
                                f"{tuple(b.shape)} {b.dtype}")
        err, bad = _max_error(a, b, case.dtype)
        if bad:
            atol, rtol = TOL[case.dtype]
            raise MismatchError(
                f"{case.label}: backend {provider} disagrees with the reference on {what} "
                f"(same noise, first {s.x.shape[0]} samples): max abs error {err:.3g}, "
                f"{bad} of {a.numel()} elements beyond atol={atol:g}, rtol={rtol:g}")


# --------------------------------------------------------------------------- timing


def mode_fn(fn: Callable, inputs: Inputs, mode: str) -> Callable[[], object]:
    """The closure timed for ``mode`` (forward / backward / full)."""
    x = inputs.x.detach().requires_grad_()
    w, t, dy = inputs.weight, inputs.target, inputs.dy
    if mode == "forward":
        return lambda: fn(x, w, t)
    if mode == "backward":
        y = fn(x, w, t)
        return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(fn(x, w, t), x, dy)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def graph_fn(fn: Callable, inputs: Inputs) -> Callable[[], object]:
    """The replay of one forward + backward of fn (``noise=None``) captured in a CUDA graph.

    Warmed up first on a side stream, as torch.cuda.graphs asks (lazy initialisation,
    compilation, the allocator's first blocks stay out of the graph). Each replay draws
    fresh noise through the layers' graph-safe seeding. A host sync or another
    uncapturable op inside fn raises here (RuntimeError)."""
    step = mode_fn(fn, inputs, "full")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out  # keeps the graph's output alive with the closure

    return replay


def _elapsed_ms(fn: Callable[[], object], gpu: bool) -> float:
    """Milliseconds of one call of fn: CUDA events on the GPU, perf_counter on the CPU."""
    if not gpu:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


class Timer:
    """t(fn) -> (median, 20th, 80th percentile) milliseconds per call of fn."""

    def __init__(self, device: torch.device, quick: bool = False):
        self.device, self.quick = device, quick
        self.method = "perf_counter"
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
                self._do_bench, self.method = do_bench, "triton.testing.do_bench"
            except ImportError:
                self._do_bench, self.method = None, "torch.cuda.Event"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        if self.device.type == "cuda":
            if self._do_bench is not None:
                q = self._do_bench(fn, warmup=5 if self.quick else 25,
                                   rep=20 if self.quick else 100, quantiles=[0.5, 0.2, 0.8])
                return float(q[0]), float(q[1]), float(q[2])
            return self._events(fn)
        return self._cpu(fn)

    def _events(self, fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return _quantiles([_elapsed_ms(fn, True) for _ in range(5 if self.quick else 30)])

    def _cpu(self, fn):
        fn()  # warm-up
        budget, times = (0.05 if self.quick else 0.3), []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
            times.append(_elapsed_ms(fn, False))
        return _quantiles(times)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def measure_bandwidth(device: torch.device, timer: Timer) -> tuple[float, int]:
    """(bytes per second read + written by a copy within the device's memory, bytes copied)."""
    if device.type == "cuda":
        nbytes = (256 if timer.quick else 1024) << 20
    else:  # larger than the last-level cache
        nbytes = (64 if timer.quick else 256) << 20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    return 2 * nbytes / (ms * 1e-3), nbytes


def kept_bytes(fn: Callable, inputs: Inputs) -> int:
    """Bytes that the forward of fn saves for backward, x itself (or views of it) left out."""
    x = inputs.x.detach().requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, inputs.weight, inputs.target)
    x_storage = x.untyped_storage().data_ptr()
    seen, total = set(), 0
    for t in saved:
        if t.untyped_storage().data_ptr() == x_storage and t.numel() > 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- progress


class Progress:
    """rich's progress bar on stderr when it is a terminal; otherwise (a CI log) one line
    per unit of work."""

    def __init__(self, total: int, label: str = "bench"):
        from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        from .cli import console
        self.total, self.done = max(total, 1), 0
        err = console(stderr=True)
        self.tty = err.is_terminal
        self._rich = RichProgress("{task.description:<40}", BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=err, transient=True,
                                  disable=not self.tty)
        self._task = self._rich.add_task(label, total=self.total)
        self._rich.start()

    def step(self, label: str) -> None:
        """Start the next unit of work, called ``label``."""
        self._rich.update(self._task, description=label)
        if not self.tty:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def note(self, label: str) -> None:
        """Relabel the current unit (on a terminal only)."""
        self._rich.update(self._task, description=label)

    def advance(self) -> None:
        self.done += 1
        self._rich.update(self._task, completed=self.done)

    def close(self) -> None:
        self._rich.stop()


# --------------------------------------------------------------------------- the run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU {model} ({n} thread{'' if n == 1 else 's'})"


def _versions() -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"torch {torch.__version__}, triton {tv}"


def _row(case: Case, provider: str, mode: str, note: str = "", **measured) -> dict:
    """A result row. A timing cell that was not measured holds None (printed "not
    measured", an empty CSV field): never a number that was not seen."""
    row = dict(bench="op", layer=case.layer, shape=fmt_shape(case.shape),
               dtype=DTYPE_NAMES[case.dtype], mode=mode, backend=provider, ms=None,
               ms_p20=None, ms_p80=None, gbps=None, x_floor=None, floor_ms=None,
               kept_fraction=math.nan, note=note)
    row.update(measured)
    return row


def _first_line_of(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def bench_case(case: Case, providers: list[str], modes: list[str], timer: Timer | None,
               bandwidth: float | None, progress: Progress | None = None, *,
               graph: bool = False, deadline: float | None = None,
               compiler: str = "inductor", kernels: bool = False) -> list[dict]:
    """Check, then time ``case`` on each provider; one row per provider and mode.

    ``timer=None`` (a dry run): check and count the kept bytes, time nothing.
    ``kernels``: the last row of a kernel backend (triton, cuda) also gets ``kernels``,
    :func:`kernel_times` of a forward + backward (a profile that fails gives one entry
    with the reason).
    ``graph``: the ``full`` row also gets the time of its replay in a CUDA graph
    (:func:`graph_fn`; CUDA only); a capture that fails leaves that cell unmeasured, with
    the reason in ``note``. ``deadline`` (a ``time.monotonic()`` value): a provider reached
    after it is neither checked nor timed. A provider whose check fails is not timed: its
    rows' ``note`` starts with ``MISMATCH`` (see :func:`mismatches`), and the other
    providers still run, so that one bad kernel does not cost a GPU run its table."""
    if "compile" in providers:
        torch.compiler.reset()  # a fresh recompile budget for this case
    inputs = make_inputs(case)
    s = check_slice(case, inputs)
    with forced_backend("reference"):
        expected = run_with_grad(op(case.layer), s)
    x_bytes = inputs.x.numel() * inputs.x.element_size()
    rows = []
    for p in providers:
        if deadline is not None and time.monotonic() > deadline:
            rows += [_row(case, p, mode, "time budget spent") for mode in modes]
            continue
        if progress:
            progress.step(f"{case.label} {p}")
        with forced_backend(p):
            fn = provider_fn(p, case.layer, compiler)
            if p != "reference":
                try:
                    check(case, p, fn, s, expected)
                except MismatchError as e:
                    print(f"MISMATCH {e}", file=sys.stderr)
                    rows += [_row(case, p, mode, f"MISMATCH {e}") for mode in modes]
                    if progress:
                        progress.advance()
                    continue
            try:  # a compiled graph saves its tensors unseen by the hooks: not a 0
                kept = math.nan if p == "compile" else kept_bytes(fn, inputs) / x_bytes
            except Exception:  # saved-tensor hooks unsupported on this path
                kept = math.nan
            for mode in modes:
                rows.append(_time_mode(case, p, fn, inputs, mode, timer, bandwidth, graph,
                                       kept_fraction=kept))
            if kernels and p in KERNEL_BACKENDS:
                try:
                    rows[-1]["kernels"] = kernel_times(fn, inputs)
                except Exception as e:  # the profiler's failure costs this cell only
                    why = f"profile failed: {_first_line_of(e)}"
                    print(f"{case.label} {p}: {why}", file=sys.stderr)
                    rows[-1]["kernels"] = [dict(kernel=why)]
        if progress:
            progress.advance()
    if "compile" in providers:
        torch.compiler.reset()
    return rows


# --------------------------------------------------------------------------- warm-up

# The providers whose first call of a case compiles: torch.compile (dynamo, AOTAutograd,
# inductor, and Triton for inductor's kernels) and the Triton backend (its JIT). Both keep
# what they compile in on-disk caches (inductor's FX graph cache, Triton's cache) that
# another process of the same user reads.
COMPILING = ("compile", "triton")
WARM_LIMIT = 900.0  # seconds: the warm-up's bound without --budget


def warm_case(case: Case, providers: list[str], modes: list[str], compiler: str) -> str:
    """Run ``case`` once on each of ``providers`` as :func:`bench_case` will, untimed and
    unchecked: the check on the slice with its noise, then each mode at the full shape
    (``noise=None``). Its compilations land in the on-disk caches. Returns "" or what
    failed (the timed run then meets the failure itself and reports it)."""
    try:
        torch.compiler.reset()
        inputs = make_inputs(case)
        s = check_slice(case, inputs)
        for p in providers:
            with forced_backend(p):
                fn = provider_fn(p, case.layer, compiler)
                run_with_grad(fn, s)
                for mode in modes:
                    mode_fn(fn, inputs, mode)()
        if case.device.type == "cuda":
            torch.cuda.synchronize(case.device)
        return ""
    except Exception as e:
        return f"{case.label}: {_first_line_of(e)}"
    finally:
        torch.compiler.reset()


def warm_caches(plan: list[tuple[Case, list[str]]], modes: list[str], compiler: str,
                workers: int, deadline: float | None) -> None:
    """Run every case of ``plan`` once on its :data:`COMPILING` providers in ``workers``
    processes at once, before anything is timed, to fill the compile caches.

    torch.compile takes seconds to a minute per case, one after another in the timed
    process (2-20 s cold and about 1 s warm for a layer's forward + backward on the
    development CPU). With the caches filled here, the timed run loads the compiled
    kernels (it still traces: AOTAutograd's cache does not take the layers' autograd
    Functions). Stops at ``deadline`` (``time.monotonic()``; at most :data:`WARM_LIMIT`
    seconds): the workers and their children (ptxas, a C++ compiler) are killed, so that
    nothing compiles or runs on the device while the timed run measures; a case not run
    here is compiled by the timed run. Never raises for a worker: a worker that cannot
    start, crashes or fails a case is reported, and the timed run meets the failure
    itself."""
    tasks = [(case, [p for p in ok if p in COMPILING]) for case, ok in plan]
    tasks = [(case, ps, modes, compiler) for case, ps in tasks if ps]
    t0 = time.monotonic()
    # A worker that hangs must not hold the run: always a bound.
    stop = t0 + WARM_LIMIT if deadline is None else min(deadline, t0 + WARM_LIMIT)
    if not tasks or workers < 1 or stop <= t0:
        return
    workers = min(workers, len(tasks))
    print(f"warm-up: running {len(tasks)} cases once in {workers} processes "
          f"({', '.join(sorted({p for t in tasks for p in t[1]}))}), untimed, to fill the "
          "compile caches", flush=True)
    # Python processes of their own (not multiprocessing's spawn, which imports the
    # caller's main script again), each given every workers-th case in a pickle file, in
    # a session of their own so that a kill reaches their compilers too. They run in the
    # temporary folder with this process's import path (the current folder resolved):
    # they import what this process imported, not a module of the folder they start in.
    # One compile thread each: the workers are the parallelism (inductor would otherwise
    # start one compile process per CPU in each; compile_threads is not in its cache key).
    path = [p or os.getcwd() for p in sys.path]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(path)}
    chunks = [tasks[i::workers] for i in range(workers)]
    ran, failures, problems = 0, [], []
    procs: list[subprocess.Popen] = []

    def kill(proc: subprocess.Popen) -> bool:
        """Kill a worker that still runs, with its children; whether it ran. (Not one
        already reaped: its pid may be another process's by now.)"""
        if proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if hasattr(os, "killpg"):
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        return True

    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, chunk in enumerate(chunks):
                file = Path(tmp, f"cases{i}.pickle")
                # The CPU code inductor makes depends on torch's thread count: the parent's.
                file.write_bytes(pickle.dumps((os.getpid(), torch.get_num_threads(), chunk)))
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", "import sys; from guidedrop import bench; "
                     "bench._warm_worker(sys.argv[1])", str(file)],
                    cwd=tmp, env=env, stdout=subprocess.PIPE, text=True,
                    start_new_session=True))
            for i, proc in enumerate(procs):
                stopped = False
                try:
                    out = proc.communicate(timeout=max(0.0, stop - time.monotonic()))[0]
                except subprocess.TimeoutExpired:
                    stopped = kill(proc)  # not one that ended as time ran out
                    try:
                        out = proc.communicate(timeout=10)[0]
                    except subprocess.TimeoutExpired:  # a child still holds the pipe
                        out = ""
                lines = out.splitlines()
                oks = sum(line.startswith("ok ") for line in lines)
                fails = [line.removeprefix("failed ") for line in lines
                         if line.startswith("failed ")]
                ran += oks
                failures += fails
                left = len(chunks[i]) - oks - len(fails)
                if stopped:
                    problems.append(f"worker {i} stopped at the warm-up's bound (half of "
                                    f"--budget, at most {WARM_LIMIT:.0f} s), {left} of its "
                                    "cases not run")
                elif proc.returncode:
                    problems.append(f"worker {i} {_exit_status(proc.returncode)}, {left} of "
                                    "its cases not run")
        except OSError as e:  # a worker could not start: the timed run compiles
            problems.append(f"a worker could not start: {e}")
        finally:  # also on Ctrl-C: no worker outlives the warm-up
            for proc in procs:
                kill(proc)
                proc.wait()
    print(f"warm-up: {ran} of {len(tasks)} cases ran in {time.monotonic() - t0:.0f} s"
          + (f", {len(failures)} failed" if failures else ""), flush=True)
    for why in [f"failed: {f}" for f in failures] + problems:
        print(f"warm-up: {why}", file=sys.stderr)


def _exit_status(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"died of {signal.Signals(-returncode).name}"
    except ValueError:
        return f"died of signal {-returncode}"


def _warm_worker(path: str) -> None:
    """A warm-up process: :func:`warm_case` on each task of the pickle file ``path``, a
    line "ok LABEL" or "failed WHY" each on stdout."""
    parent, threads, tasks = pickle.loads(Path(path).read_bytes())
    if sys.platform.startswith("linux"):  # die with the bench, even when it is killed
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before that
            return
    torch.set_num_threads(threads)
    for case, providers, modes, compiler in tasks:
        why = warm_case(case, providers, modes, compiler)
        print(f"failed {why}" if why else f"ok {case.label}", flush=True)


def mismatched(row: dict) -> bool:
    """Whether the row's backend failed its check against the reference (not timed)."""
    return row["note"].startswith("MISMATCH")


def mismatches(rows: list[dict]) -> list[str]:
    """The notes of the rows whose backend failed its check, one per (case, backend)."""
    return list(dict.fromkeys(r["note"] for r in rows if mismatched(r)))


def _time_mode(case: Case, p: str, fn: Callable, inputs: Inputs, mode: str,
               timer: Timer | None, bandwidth: float | None, graph: bool,
               **fields) -> dict:
    """The row of ``mode``: eager time and, for ``full`` with ``graph``, the replay time."""
    if timer is None:
        return _row(case, p, mode, "dry run: not timed", **fields)
    x_bytes = inputs.x.numel() * inputs.x.element_size()
    floor_bytes = PASSES[mode] * x_bytes
    floor_ms = floor_bytes / bandwidth * 1e3
    ms, lo, hi = timer(mode_fn(fn, inputs, mode))
    row = _row(case, p, mode, ms=ms, ms_p20=lo, ms_p80=hi,
               gbps=floor_bytes / (ms * 1e-3) / 1e9, x_floor=ms / floor_ms,
               floor_ms=floor_ms, **fields)
    if graph and mode == "full":
        if case.device.type != "cuda":
            row["note"] = "CUDA graphs need a CUDA device"
            return row
        try:
            replay = graph_fn(fn, inputs)
            row["graph_ms"] = timer(replay)[0]
            row["graph_x_floor"] = row["graph_ms"] / floor_ms
        except Exception as e:  # an uncapturable op: that cell only, the run goes on
            row["note"] = f"graph capture failed: {_first_line_of(e)}"
            print(f"{case.label} {p}: {row['note']}", file=sys.stderr)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    return row


def kernel_times(fn: Callable, inputs: Inputs, steps: int = 3) -> list[dict]:
    """Where a forward + backward of fn spends its device time: torch.profiler over
    ``steps`` steps (after one untimed), per kernel (on a CPU, per op: its self time) the
    calls and µs per step and the share of the kernels' (ops') total, longest first; one
    entry saying so when nothing was recorded."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = mode_fn(fn, inputs, "full")
    step()
    gpu = inputs.x.is_cuda
    if gpu:  # the untimed step's kernels done before the profile starts
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
    found = []
    for e in prof.key_averages():
        if gpu:  # the device's events only: kernels, copies, fills (a host op's self
            # device time is its kernels', counted twice)
            if e.device_type != DeviceType.CUDA:
                continue
            t = e.self_device_time_total
        else:
            t = e.self_cpu_time_total
        if t > 0:
            found.append(dict(kernel=e.key, calls=e.count / steps, us=t / steps))
    if not found:
        return [dict(kernel="nothing recorded by the profiler")]
    total = sum(k["us"] for k in found)
    for k in found:
        k["share"] = k["us"] / total
    return sorted(found, key=lambda k: -k["us"])


KERNEL_BACKENDS = ("triton", "cuda")  # profiled by --kernels: ours, a few seconds in all
KERNEL_FIELDS = ["date", "device", "versions", "layer", "shape", "dtype", "backend", "kernel",
                 "calls", "us", "share"]


def write_kernels(path: str, rows: list[dict], meta: dict) -> int:
    """--kernels: one CSV line per (case, backend, kernel) of :func:`kernel_times`; returns
    the number of profiles written."""
    profiled = [r for r in rows if "kernels" in r]
    with _open_out(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=KERNEL_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in profiled:
            for k in r["kernels"]:
                w.writerow({key: _csv_value(v) for key, v in {**meta, **r, **k}.items()})
    return len(profiled)


def _add_speedups(rows: list[dict]) -> None:
    """speedup_eager, speedup_compile (eager times) and graph_speedup_compile (replay
    times): NaN where the run has no such baseline, None where it was not measured."""
    by_key = {(r["layer"], r["shape"], r["dtype"], r["mode"], r["backend"]): r for r in rows}

    def ratio(base_row, r, key):
        if base_row is None or key not in r:
            return math.nan
        if base_row.get(key) is None or r.get(key) is None:
            return None
        return base_row[key] / r[key]

    for r in rows:
        k = (r["layer"], r["shape"], r["dtype"], r["mode"])
        eager, comp = by_key.get((*k, "reference")), by_key.get((*k, "compile"))
        r["speedup_eager"] = ratio(eager, r, "ms")
        r["speedup_compile"] = ratio(comp, r, "ms")
        r["graph_speedup_compile"] = ratio(comp, r, "graph_ms")


# --------------------------------------------------------------------------- ResNet-50 step


def _resnet_setup(device: torch.device, quick: bool):
    try:
        import torchvision
    except ImportError as e:
        from .cli import needs
        raise needs(f"--resnet needs torchvision ({e})", "bench") from None
    gpu = device.type == "cuda"
    batch, px = ((32 if quick else 128), 224) if gpu else ((2, 32) if quick else (4, 96))
    # channels_last, except for the CPU smoke test (--quick): oneDNN's first
    # channels_last step on CPU costs seconds of kernel generation.
    fmt = torch.contiguous_format if (quick and not gpu) else torch.channels_last
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)  # never downloads
    model = model.to(device).to(memory_format=fmt).train()
    images = torch.randn(batch, 3, px, px, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, images, labels, opt


def _resnet_step(model, images, labels, opt, device):
    from .context import cam_targets
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with cam_targets(model.fc, labels):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _time_steps(step: Callable[[], None], device: torch.device, quick: bool) -> float:
    """Median milliseconds of a training step."""
    gpu = device.type == "cuda"
    if quick:
        warm, reps = (2, 5) if gpu else (1, 1)
    else:
        warm, reps = (5, 20) if gpu else (1, 3)
    for _ in range(warm):
        step()
    return statistics.median(_elapsed_ms(step, gpu) for _ in range(reps))


def _resnet_layer(layer: str, i: int) -> torch.nn.Module:
    mod = models.PLACEMENTS[layer][1](i, 3)  # the paper's settings for position i
    if layer == "focused_dropout":
        mod.participation = 1.0  # apply on every step when timing
    return mod


def resnet_rows(layers: list[str], providers: list[str], device: torch.device, quick: bool,
                progress: Progress | None = None, deadline: float | None = None,
                failed: dict[tuple[str, str], str] | None = None) -> list[dict]:
    """Step time of torchvision ResNet-50 (bf16 autocast on CUDA, channels_last) with
    ``layer`` appended to layer1, layer2 and layer3, per layer and provider.

    Batch 128 at 224 px on CUDA (32 with ``quick``); on CPU a tiny batch (4 at 96 px;
    ``quick``: 2 at 32 px, contiguous, one timed step: a smoke test, not a measurement).
    Past ``deadline`` (time.monotonic()), the steps left are not timed: rows with ms None,
    noted "time budget spent". ``failed``: {(layer, provider): note} of the backends that
    failed a check against the reference; their steps are not timed either (noted so).
    """
    failed = failed or {}
    def spent() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    model, images, labels, opt = _resnet_setup(device, quick)
    shape = fmt_shape(images.shape)
    dtype = "bf16-autocast" if device.type == "cuda" else "fp32"

    def step():
        _resnet_step(model, images, labels, opt, device)

    if progress:
        progress.step("resnet50 plain")
    plain = None if spent() else _time_steps(step, device, quick)
    if progress:
        progress.advance()
    groups = [model.layer1, model.layer2, model.layer3]
    timed = []
    for layer in layers:
        for p in providers:
            if progress:
                progress.step(f"resnet50 {layer} {p}")
            if plain is None or spent() or (layer, p) in failed:
                timed.append((layer, p, None, failed.get((layer, p), "time budget spent")))
            else:
                for i, g in enumerate(groups):
                    g.append(_resnet_layer(layer, i).to(device))
                try:
                    with forced_backend(p):
                        timed.append((layer, p, _time_steps(step, device, quick), ""))
                finally:
                    for g in groups:
                        del g[-1]
            if progress:
                progress.advance()
    if any(ms is not None for _, _, ms, _ in timed) and not (quick and device.type != "cuda"):
        # The plain model again, now that every cache is warm: the baseline is the faster
        # of the two (the overheads err on the high side, never hide a cost).
        plain = min(plain, _time_steps(step, device, quick))

    def row(layer, p, ms, note):
        return dict(bench="resnet50-step", layer=layer, shape=shape, dtype=dtype, mode="train",
                    backend=p, ms=ms, note=note,
                    overhead_pct=None if ms is None else 100 * (ms - plain) / plain)

    return [row("none", "-", plain, "" if plain is not None else "time budget spent")] + \
        [row(*t) for t in timed]


# --------------------------------------------------------------------------- output

OP_COLUMNS = [("layer", "layer", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"),
              ("mode", "mode", "{}"), ("backend", "backend", "{}"), ("ms", "ms", "{:.4g}"),
              ("gbps", "GB/s", "{:.1f}"), ("x_floor", "x floor", "{:.2f}"),
              ("speedup_eager", "vs eager", "{:.2f}"),
              ("speedup_compile", "vs compile", "{:.2f}"),
              ("kept_fraction", "kept/x", "{:.4f}")]
# With --graph: the full mode's forward + backward replayed in a CUDA graph.
GRAPH_COLUMNS = [("graph_ms", "graph ms", "{:.4g}"), ("graph_x_floor", "graph x floor", "{:.2f}"),
                 ("graph_speedup_compile", "graph vs compile", "{:.2f}")]
NOTE_COLUMN = ("note", "note", "{}")
RESNET_COLUMNS = [("layer", "layer", "{}"), ("backend", "backend", "{}"),
                  ("shape", "batch", "{}"), ("dtype", "dtype", "{}"),
                  ("ms", "step ms", "{:.2f}"), ("overhead_pct", "overhead %", "{:+.1f}")]
CSV_FIELDS = ["date", "device", "versions", "copy_gbps", "bench", "layer", "shape", "dtype",
              "mode", "backend", "ms", "ms_p20", "ms_p80", "gbps", "x_floor", "floor_ms",
              "speedup_eager", "speedup_compile", "kept_fraction", "graph_ms", "graph_x_floor",
              "graph_speedup_compile", "note", "overhead_pct", "contention"]


MODEL_COLUMNS = [("layer", "layer", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"),
                 ("backend", "backend", "{}"), ("fwd", "launches fwd", "{}"),
                 ("fresh", "fwd noise=None", "{}"), ("bwd", "bwd", "{}"),
                 ("mb", "MB moved train step", "{:.2f}"), ("x_floor", "× floor", "{:.2f}"),
                 ("syncs", "host syncs", "{}"), ("sass", "SASS/elem", "{:.1f}"),
                 ("worst", "of kernel (kind)", "{}"),
                 ("access", "x load B", "{}"), ("div", "int div/16 B of x", "{:.2f}"),
                 ("budget", "static budgets", "{}")]


def model_report(layers, cases, providers, explicit, device, channels_last,
                 static=True) -> list[dict]:
    """``bench --model``: per layer and backend, the launches of one forward (with noise,
    and with noise=None) and one backward, the bytes their tensors hold (an upper bound on
    what they move) in a training step (the forward with noise=None, which draws its
    randomness, and the backward) against the floor of 3 reads + 2 writes of x, and the
    host syncs.
    Counted, not timed (guidedrop.launches): the same on any machine, the interpreter
    included, so Triton runs here under TRITON_INTERPRET=1 too.

    From the kernels' sm_90 SASS (guidedrop.sass, the figures tests/test_static_perf.py
    holds to its static budgets), the worst of the layer's streaming kernels: SASS
    instructions per element of x in the steady state, with that kernel's name and kind
    (apply or statistics: each kind has its budget; the seed kernels, held to the division
    budget only, where a layer has no other), the bytes per load of x (16: 16-byte vectors;
    else the widest load of the least vectorised kernel), the runtime integer divisions
    per 16 bytes of x of all its kernels, and whether all of them meet the static
    budgets (``guidedrop.sass.budget_violations``; "missed:" names those that do not).
    Triton: every launch compiled for sm_90
    (under the interpreter with the tiles a GPU gets; minutes when Triton's cache is cold);
    CUDA: the built extension's kernels. ``static=False`` (``--no-sass``) leaves them out."""
    from .cli import console
    from .launches import count_layer

    rows, pending = [], []
    for shape, dtype in cases:
        # Every backend that runs here, Triton under the interpreter included: nothing is
        # timed.
        ok = [p for p in (providers if explicit else PROVIDERS)
              if p != "compile" and not unsupported(p, device, dtype)]
        for layer in layers:
            inputs = make_inputs(Case(layer, shape, dtype, device, channels_last))
            noise = torch.rand(noise_shape(layer, shape), device=device)
            run = functools.partial(
                lambda x, u, run, w, t: run(x, w, t, noise=u),
                run=op(layer), w=inputs.weight, t=inputs.target)
            for p in ok:
                tiles = _gpu_tiles() if static and p == "triton" else contextlib.nullcontext()
                with forced_backend(p), tiles:
                    c = count_layer(run, inputs.x, noise)
                # a training step's: the forward that draws its noise (a given noise is
                # one more tensor to read, the size of x for DropBlock's and CamDrop's)
                moved = c.fresh.nbytes + c.backward.nbytes
                rows.append(dict(layer=layer, shape=fmt_shape(shape), dtype=DTYPE_NAMES[dtype],
                                 backend=p, fwd=len(c.forward.launches),
                                 fresh=len(c.fresh.launches), bwd=len(c.backward.launches),
                                 mb=moved / 1e6, x_floor=moved / c.floor_bytes,
                                 syncs=len(c.forward.syncs + c.fresh.syncs + c.backward.syncs)))
                pending.append((rows[-1], str(dtype).removeprefix("torch."),
                                c.forward.launches + c.fresh.launches + c.backward.launches))
    if static:
        _static_counts(pending)
    out = console()
    out.print(f"launches and bytes of one forward + backward on {device_name(device)}, "
              "counted, not timed.\n"
              "- launches: the kernels' budget is 3 forward (CamDrop 5), +1 without noise, "
              "1 backward (no budget for the reference, the oracle); MB moved: the bytes the "
              "tensors of a training step's launches hold (the forward with noise=None and "
              "the backward; an upper bound); × floor: over those of 3 reads + 2 writes of x "
              "(layers with no statistics pass need about 4)."
              + ("\n- SASS for sm_90 of the worst streaming kernel (static budgets): per "
                 "element of x 15 bf16 / 30 fp32 for apply kernels, 20 bf16 for statistics, "
                 "none for fp16, fp32 statistics or seeds; for every dtype, x read in 16-byte "
                 "loads (x load B: 16) and at most 2 runtime integer divisions per 16 bytes "
                 "of x." if static else ""),
              highlight=False)
    # --no-sass: without the SASS columns (MODEL_COLUMNS' last five)
    out.print(format_table(rows, MODEL_COLUMNS if static else MODEL_COLUMNS[:-5]))
    from . import sass
    calibrated = True  # the Triton whose SASS the budgets hold (or no Triton row)
    if static and any(r["backend"] == "triton" and "sass" in r for r in rows):
        import triton
        calibrated = triton.__version__.startswith(sass.CALIBRATED_TRITON + ".")
        if not calibrated:
            out.print(f"Triton {triton.__version__} compiled these. The budgets and the "
                      "figures in tests/test_static_perf.py are of Triton "
                      f"{sass.CALIBRATED_TRITON} (CI's, with torch 2.14.1); other versions "
                      "emit other code, several instructions per element apart for some "
                      "kernels, so a kernel within budget there may miss it here",
                      highlight=False)
    if any(r.get("budget", "met") != "met" for r in rows):
        out.print("missed: kernels over a budget (still to be brought within it; "
                  "tests/test_static_perf.py's OVER_BUDGET has their figures"
                  + (")" if calibrated else f", for Triton {sass.CALIBRATED_TRITON})"),
                  highlight=False)
    for p in (providers if explicit else PROVIDERS):  # say why a backend has no rows
        why = p != "compile" and cases and unsupported(p, device, cases[0][1])
        if why:
            hint = ("; tests/test_launches.py counts the CUDA sources on a CPU emulator"
                    if p == "cuda" else "")
            out.print(f"{p}: no rows here ({why}){hint}", highlight=False)
    return rows


def op_columns(rows: list[dict]) -> list:
    """OP_COLUMNS, then the graph columns when a row has replay cells (--graph), then the
    notes when a row has one."""
    cols = list(OP_COLUMNS)
    if any("graph_ms" in r for r in rows):
        cols += GRAPH_COLUMNS
    return cols + _notes(rows)


def resnet_columns(rows: list[dict]) -> list:
    """RESNET_COLUMNS, then the notes when a row has one (--budget spent)."""
    return RESNET_COLUMNS + _notes(rows)


def _notes(rows: list[dict]) -> list:
    return [NOTE_COLUMN] if any(r.get("note") for r in rows) else []


def _gpu_tiles():
    """Triton under the interpreter: record the tiles a GPU gets (guidedrop.sass)."""
    from .sass import gpu_tiles
    if os.environ.get("TRITON_INTERPRET") == "1":
        return gpu_tiles()
    return contextlib.nullcontext()


def _static_counts(pending) -> None:
    """Fills ``sass`` and ``access`` of each (row, x dtype, launches) from the SASS of its
    streaming kernels (the worst of them); left out ("-") where the kernels cannot be read
    here (no cuobjdump, Triton without its NVIDIA backend, the extension not built)."""
    from . import sass

    def fill(row, dtype, counts):
        """counts: [(Counts, kind)] of the row's streaming kernels."""
        if not counts:
            return
        size = sass.ITEMSIZE.get(dtype, 4)
        # the worst kernel of those with a SASS budget (the seed kernels have none: their
        # figures per element are of the seeds, not of x), else of all; of those that miss
        # a budget where some do, so that the row shows the figures behind "missed:"
        why = {id(c): sass.budget_violations(c, k, dtype) for c, k in counts}
        budgeted = [ck for ck in counts if ck[1] != "seeds"] or counts
        over = [ck for ck in budgeted if why[id(ck[0])]]
        worst, kind = max(over or budgeted, key=lambda ck: ck[0].per_element)
        row["sass"] = worst.per_element
        row["worst"] = f"{_kernel_name(worst.kernel)} ({kind})"
        # the widest load of the least vectorised kernel: 16 where every kernel reads in
        # 16-byte vectors (the budget's test). Not the narrowest load of all: a kernel's
        # 1-byte mask or 4-byte scale loads are not loads of x.
        row["access"] = min(max(c.loads, default=8 * size) // 8 for c, _ in budgeted)
        # per 16 bytes of x, the unit of the division budget (at most 2)
        row["div"] = max(c.divisions_per_element for c, _ in counts) * 16 / size
        # each kernel that misses with what it misses first (its worst case)
        missed = {}
        for c, _ in sorted(counts, key=lambda ck: -ck[0].per_element):
            if why[id(c)]:
                missed.setdefault(_kernel_name(c.kernel), why[id(c)][0])
        row["budget"] = ("missed: " + "; ".join(f"{n} ({w})" for n, w in sorted(missed.items()))
                         if missed else "met")

    specs, owners = {}, []
    for row, dtype, launches in pending:
        if row["backend"] == "cuda":
            ops = {ln.name.removeprefix("cuda:") for ln in launches if ln.name.startswith("cuda:")}
            try:
                fill(row, dtype, [(c, sass.CUDA_STREAMING[fam]) for op in sorted(ops)
                                  for fam in sass.CUDA_OP_KERNELS.get(op, ())
                                  for c in sass.cuda_kernels(fam, dtype)])
            except RuntimeError:  # not built here, or no cuobjdump
                pass
        elif row["backend"] == "triton":
            keys = []
            for ln in launches:
                if ln.spec and ln.spec["kernel"] in sass.TRITON_STREAMING:
                    key = sass.spec_key(ln.spec) + dtype
                    specs.setdefault(key, (ln.spec, dtype))
                    keys.append(key)
            owners.append((row, dtype, keys))
    if not specs or sass.tool("cuobjdump") is None:
        return
    try:
        results = dict(zip(specs, sass.triton_counts_batch(*zip(*specs.values(), strict=True)),
                           strict=True))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"(SASS counts left out: {str(e).splitlines()[0]})", file=sys.stderr)
        return
    for row, dtype, keys in owners:
        fill(row, dtype, [(sass.counts_from_dict(results[k]),
                           sass.TRITON_STREAMING[specs[k][0]["kernel"]]) for k in keys
                          if "error" not in results[k]])


def _kernel_name(kernel: str) -> str:
    """A kernel's name without namespaces and parameters (CUDA's are demangled)."""
    head = kernel.replace("(anonymous namespace)::", "").split("(")[0]
    return re.search(r"(\w+)(<.*>)?$", head).group(0)


def _cell(row: dict, key: str, fmt: str) -> str:
    """A table cell: "not measured" for None (a timing not taken), "-" for NaN or absent
    (no such quantity here)."""
    v = row.get(key, "")
    if v is None:
        return "not measured"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return fmt.format(v) if v != "" else "-"


def format_table(rows: list[dict], columns, markdown: bool = False):
    """The rows as a markdown table (a string), or else as a rich Table to print."""
    cells = [[_cell(r, k, f) for k, _, f in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    numeric = [k not in ("layer", "shape", "dtype", "mode", "backend", "note")
               for k, _, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |",
                 "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
        # a note may hold "|" (an error message): escaped, it stays in its cell
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in c) + " |" for c in cells]
        return "\n".join(lines)
    from rich.table import Table
    table = Table()
    for (key, _, _), head, num in zip(columns, heads, numeric, strict=True):
        # Notes wrap; every other column keeps its cells on one line.
        table.add_column(head, justify="right" if num else "left", no_wrap=key != "note",
                         min_width=24 if key == "note" else None)
    for c in cells:
        table.add_row(*c)
    return table


def _open_out(path: str, **kw):
    """``path`` opened for writing text. Where it is stdout's file (/dev/stdout, whether a
    terminal, a pipe or a redirected file), sys.stdout itself, after what was printed: a
    file of its own would truncate a redirected stdout, or write over it from offset 0."""
    try:
        same = os.path.samefile(path, "/dev/stdout")
    except OSError:  # not there yet, or no /dev/stdout
        same = False
    if same:
        return contextlib.nullcontext(sys.stdout)
    return open(path, "w", **kw)


def write_csv(path: str, rows: list[dict], meta: dict) -> None:
    with _open_out(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(v) for k, v in {**meta, **r}.items()})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_plot(path: str, rows: list[dict], meta: dict) -> bool:
    """A PNG bar chart of the timed rows; False (nothing written) when none was timed."""
    if all(r["ms"] is None for r in rows):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r for r in rows if r["bench"] == "op" and r["ms"] is not None]
    res = [r for r in rows if r["bench"] == "resnet50-step" and r["layer"] != "none"]
    configs = list(dict.fromkeys((r["shape"], r["dtype"], r["mode"]) for r in ops))
    panels = len(configs) + (1 if res else 0)
    ncols = 1 if panels == 1 else 2
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 3.4 * nrows + 0.8),
                             squeeze=False, layout="constrained")
    colours = {"reference": "#9e9e9e", "compile": "#5c6bc0", "triton": "#ef6c00",
               "cuda": "#2e7d32"}
    legend: dict = {}
    for ax, (shape, dtype, mode) in zip(list(axes.flat)[:len(configs)], configs, strict=True):
        sel = [r for r in ops if (r["shape"], r["dtype"], r["mode"]) == (shape, dtype, mode)]
        layers = list(dict.fromkeys(r["layer"] for r in sel))
        provs = list(dict.fromkeys(r["backend"] for r in sel))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            xs, ys = [], []
            for i, layer in enumerate(layers):
                for r in sel:
                    if r["layer"] == layer and r["backend"] == p:
                        xs.append(i + (j - (len(provs) - 1) / 2) * width)
                        ys.append(r["ms"])
            ax.bar(xs, ys, width, label=p, color=colours.get(p))
        floor = sel[0]["floor_ms"]
        ax.axhline(floor, color="k", ls="--", lw=1, label="bandwidth floor")
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=25, ha="right", fontsize=8)
        # the CUDA graph's replay of the full mode (--graph), where it was timed
        graph = [(i + (j - (len(provs) - 1) / 2) * width, r["graph_ms"])
                 for j, p in enumerate(provs) for i, layer in enumerate(layers) for r in sel
                 if r["layer"] == layer and r["backend"] == p and r.get("graph_ms") is not None]
        if graph:
            ax.scatter(*zip(*graph, strict=True), marker="D", s=14, color="k", zorder=3,
                       label="CUDA graph replay")
        ax.set_ylabel("ms (log): bars eager")
        ax.set_title(f"{shape} {dtype}, {mode}: floor {floor:.3g} ms", fontsize=10)
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    if res:
        ax = axes.flat[len(configs)]
        layers = list(dict.fromkeys(r["layer"] for r in res))
        provs = list(dict.fromkeys(r["backend"] for r in res))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            pts = [(i + (j - (len(provs) - 1) / 2) * width, r["overhead_pct"])
                   for i, layer in enumerate(layers) for r in res
                   if r["layer"] == layer and r["backend"] == p
                   and r["overhead_pct"] is not None]  # None: not timed (--budget)
            ax.bar([a for a, _ in pts], [b for _, b in pts], width, label=p,
                   color=colours.get(p))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("overhead % per step")
        ax.set_title(f"ResNet-50 training step ({res[0]['shape']}, {res[0]['dtype']})",
                     fontsize=10)
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    busy = meta.get("contention")
    fig.suptitle(f"guidedrop bench — {meta['device']}, {meta['date']}, "
                 f"memory copy {meta['copy_gbps']:.0f} GB/s"
                 + (f"\nnot to be trusted: {busy} (other work shared the CPU)" if busy else ""),
                 fontsize=11)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center",
               ncol=len(legend), fontsize=9, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def op_legend(ops: list[dict], modes: list[str]) -> str:
    """What the op table's columns mean (printed under it, and in the markdown report)."""
    graph = ("graph ms, graph x floor, graph vs compile: the same for the forward + "
             "backward replayed in a CUDA graph." if any("graph_ms" in r for r in ops) else "")
    return ("ms: the median time of a call. Floor: passes over x's bytes at the measured "
            "memory copy bandwidth, " + ", ".join(f"{m} {PASSES[m]}" for m in modes)
            + " (one yardstick for every layer: SpatialScale, DropBlock and AttentionDrop "
            "need about 4 passes, not 5, and can run below 1x); x floor: ms / the floor's. "
            "GB/s: the floor's bytes / ms. vs eager, vs compile: the reference's eager ms, "
            "torch.compile(reference)'s ms, over this row's (above 1: this row is faster; "
            "-: that baseline was not run). kept/x: bytes saved for backward (x itself "
            "excluded) / bytes of x. " + graph).rstrip()


def write_markdown(path: str, rows: list[dict], meta: dict, modes: list[str],
                   note: str | None = None) -> None:
    ops = [r for r in rows if r["bench"] == "op"]
    res = [r for r in rows if r["bench"] == "resnet50-step"]
    bandwidth = ("not measured (dry run)" if meta["copy_gbps"] is None
                 else f"{meta['copy_gbps']:.1f} GB/s (read + write)")
    parts = [f"Device: {meta['device']}; {meta['versions']}; {meta['date']}.",
             f"Measured memory copy bandwidth: {bandwidth}. " + op_legend(ops, modes), ""]
    if ops:
        parts += [format_table(ops, op_columns(ops), markdown=True), ""]
    if res:
        parts += ["ResNet-50 training step, layer appended to layer1, layer2 and layer3:", "",
                  format_table(res, resnet_columns(res), markdown=True), ""]
    if note:  # under the tables, as printed
        parts += [note, ""]
    with _open_out(path) as f:
        f.write("\n".join(parts))


# --------------------------------------------------------------------------- CLI


def parse_shape(s: str) -> tuple[int, int, int, int]:
    s = s.strip()
    if s in SHAPES:
        return SHAPES[s]
    parts = s.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise usage_error(f"unknown shape {s!r}: give a name ({', '.join(SHAPES)}) or "
                          "NxCxHxW, e.g. 8x64x28x28") from None
    if len(dims) != 4:
        raise usage_error(f"shape {s!r} has {len(dims)} dimensions; layers take 4: NxCxHxW")
    if min(dims) < 1:
        raise usage_error(f"shape {s!r}: every dimension of NxCxHxW must be >= 1")
    return dims  # type: ignore[return-value]


def parse_dtype(s: str) -> torch.dtype:
    if s.strip().lower() not in DTYPES:
        raise usage_error(f"unknown dtype {s!r}; choose from fp32, bf16, fp16, fp64")
    return DTYPES[s.strip().lower()]


def parse_layers(s: str) -> list[str]:
    if s.strip() == "all":
        return list(LAYERS)
    names = comma_list(s, "--layers")  # a layer named twice is benched once
    for name in names:
        if name not in LAYERS:
            raise usage_error(f"unknown layer {name!r}; choose from {', '.join(LAYERS)}")
    return names


def parse_device(s: str | None) -> torch.device:
    from .cli import parse_device
    return parse_device(s)


def writable(path: str | None, option: str, suffix: str | None = None) -> None:
    """Raise UsageError unless ``path`` can be written (created and removed again), and,
    with ``suffix`` (".png"), ends with it; before any work, so that a bad path fails now
    rather than after a long run."""
    if path is None:
        return
    if not path.strip():  # Path("") is ".", which would be reported as a directory
        raise usage_error(f"{option} is empty, give a file name")
    p = Path(path)
    # os.path's tests, not Path's: Path.is_dir() raises on a name too long for the file
    # system (ENAMETOOLONG, before Python 3.14); os.path says False, and open() names it.
    if os.path.isdir(p):
        raise usage_error(f"{option} {path}: is a directory, give a file name")
    if suffix and p.suffix.lower() != suffix:
        raise usage_error(f"{option} {path}: give a {suffix} file name")
    if not os.path.isdir(p.parent):
        raise usage_error(f"{option} {path}: folder {p.parent} does not exist")
    real = os.path.realpath(p)  # a symbolic link to a file not yet there: probe the file,
    existed = os.path.exists(real)  # and remove that file again, not the link
    if not existed and os.path.exists(p):  # /dev/stdout on a pipe: realpath names no file
        real, existed = path, True
    try:
        # O_NONBLOCK: a FIFO with no reader fails at once (ENXIO) instead of blocking forever
        os.close(os.open(real, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666))
    except OSError as e:
        why = "a FIFO with no reader" if e.errno == errno.ENXIO else e.strerror
        raise usage_error(f"{option} {path}: cannot write there ({why})") from None
    if not existed:
        os.unlink(real)


def distinct(**paths: str | None) -> None:
    """UsageError when two output options name the same file: the later write would
    replace the earlier one without a word (a stream, /dev/stdout, takes both)."""
    seen: dict[str, str] = {}
    for option, path in paths.items():
        key = os.path.realpath(path) if path else ""
        if key and (os.path.isfile(key) or not os.path.exists(key)):
            if key in seen:
                raise usage_error(f"--{seen[key]} and --{option} both name {path}: give each "
                                  "its own file")
            seen[key] = option


def configs(args, device: torch.device) -> list[tuple[tuple[int, int, int, int], torch.dtype]]:
    gpu = device.type == "cuda"
    if args.shapes is None and args.dtype is None:
        named = (CUDA_QUICK if args.quick else CUDA_DEFAULT) if gpu else \
            (CPU_QUICK if args.quick else CPU_DEFAULT)
        return [(SHAPES[s], DTYPES[d]) for s, d in named]
    if args.shapes is None:
        shapes = list(dict.fromkeys(s for s, _ in (CUDA_DEFAULT if gpu else CPU_DEFAULT)))
        if args.quick:
            shapes = [s for s, _ in (CUDA_QUICK if gpu else CPU_QUICK)]
        shapes = [SHAPES[s] for s in shapes]
    else:
        shapes = list(dict.fromkeys(parse_shape(s) for s in comma_list(args.shapes, "--shapes")))
    if args.dtype is None:
        dtypes = [torch.bfloat16, torch.float32] if gpu else [torch.float32]
    else:
        dtypes = list(dict.fromkeys(parse_dtype(d) for d in comma_list(args.dtype, "--dtype")))
    return [(s, d) for s in shapes for d in dtypes]


# Bytes a case holds at once, per element of x: x, dy, y, grad_x, the forward's x copy with
# requires_grad, in x's dtype, and float32 noise / multipliers / statistics.
_TENSORS_PER_CASE, _FLOAT32_PER_CASE = 5, 3


def free_bytes(device: torch.device) -> int:
    """Memory free for tensors on ``device`` (CUDA: the driver's count; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: do not refuse


def fits(shape, dtype: torch.dtype, device: torch.device) -> None:
    """UsageError unless a case of ``shape`` x ``dtype`` fits in the device's free memory."""
    numel = math.prod(shape)
    need = numel * (_TENSORS_PER_CASE * dtype.itemsize + _FLOAT32_PER_CASE * 4)
    free = free_bytes(device)
    if need > free:
        raise usage_error(f"shape {fmt_shape(shape)} ({numel:.3g} elements, "
                          f"{DTYPE_NAMES[dtype]}) needs about {need / 2**30:.3g} GiB; "
                          f"{device} has {free / 2**30:.3g} GiB free")


def choose_providers(arg: str | None, device: torch.device,
                     dtypes: list[torch.dtype]) -> tuple[list[str], str]:
    """(providers, how): how is "default" (every available one, Triton under the
    interpreter left out), "named" (each must exist and take every dtype on the device) or
    "all" (every backend; those that cannot run get rows that say why)."""
    if arg is None:
        return [p for p in PROVIDERS if any(p in default_providers(device, d) for d in dtypes)
                ], "default"
    if arg.strip() == "all":
        return list(PROVIDERS), "all"
    names = comma_list(arg, "--backends")
    for p in names:
        if p == "all":
            raise usage_error("--backends all stands alone, not in a list")
        if p not in PROVIDERS:
            raise usage_error(f"unknown backend {p!r}; choose from {', '.join(PROVIDERS)}, all")
        for d in dtypes:
            why = unsupported(p, device, d)
            if why:
                raise usage_error(f"backend {p} is not available for {DTYPE_NAMES[d]} on "
                                  f"{device}: {why}")
    return names, "named"


def run(args) -> list[dict]:
    """The ``bench`` command; returns its rows."""
    layers = parse_layers(args.layers)
    modes = comma_list(args.mode, "--mode")
    for m in modes:
        if m not in MODES:
            raise usage_error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.graph and "full" not in modes:
        raise usage_error("--graph times the full mode in a CUDA graph: add full to --mode")
    if args.dry_run and args.resnet:
        raise usage_error("--dry-run times nothing, and --resnet is a timing: give one")
    if args.model:  # its counts are printed only; these options would be silently unused
        unused = [opt for opt, given in (
            ("--csv", args.csv), ("--plot", args.plot), ("--md", args.md),
            ("--table", args.table), ("--resnet", args.resnet), ("--graph", args.graph),
            ("--kernels", args.kernels),
            ("--budget", args.budget is not None), ("--dry-run", args.dry_run),
            ("--compile-workers", args.compile_workers is not None)) if given]
        if unused:
            raise usage_error(f"--model prints counts, not timings or files: it takes no "
                              f"{', '.join(unused)}")
    device = parse_device(args.device)
    cases = configs(args, device)
    for shape, dtype in cases:
        fits(shape, dtype, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    providers, how = choose_providers(args.backends, device,
                                      list(dict.fromkeys(d for _, d in cases)))
    for path, opt, suffix in ((args.csv, "--csv", None), (args.plot, "--plot", ".png"),
                              (args.md, "--md", None), (args.table, "--table", None),
                              (args.kernels, "--kernels", None)):
        writable(path, opt, suffix)
    distinct(csv=args.csv, plot=args.plot, md=args.md, table=args.table, kernels=args.kernels)
    from .cli import needs
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise needs("--plot needs matplotlib", "bench") from None
    if args.resnet:
        try:
            import torchvision  # noqa: F401
        except ImportError as e:
            raise needs(f"--resnet needs torchvision ({e})", "bench") from None

    if args.model:
        return model_report(layers, cases, providers, how != "default", device,
                            args.channels_last, static=not args.no_sass)
    deadline = None if args.budget is None else time.monotonic() + args.budget
    meta = dict(date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                device=device_name(device), versions=_versions(), copy_gbps=None)
    print(f"guidedrop bench on {meta['device']} ({meta['versions']}), {meta['date']}")
    if args.dry_run:
        # Everything but the timing: inputs, checks against the reference, kept bytes,
        # the table. torch.compile traces with backend="eager" (no code generation).
        timer, bandwidth = None, None
        print("dry run: every check runs, nothing is timed (no bandwidth, no floor); "
              "torch.compile traces with backend=eager")
    else:
        timer = Timer(device, args.quick)
        bandwidth, copied = measure_bandwidth(device, timer)
        meta["copy_gbps"] = bandwidth / 1e9
        print(f"memory copy of {copied >> 20} MiB: {bandwidth / 1e9:.1f} GB/s "
              f"(read + write); floor = passes over x at that rate: "
              + ", ".join(f"{m} {PASSES[m]}" for m in modes) + " (one yardstick for every "
              "layer: those with no statistics pass can run below 1x); GB/s = the floor's "
              f"bytes / time; timing: {timer.method}")

    # Per case: the providers that run, and a row saying why for each one that cannot.
    plan, skipped = [], {}
    for shape, dtype in cases:
        for layer in layers:
            case = Case(layer, shape, dtype, device, args.channels_last)
            ok = []
            for p in providers:
                why = unsupported(p, device, dtype)
                if not why and (how != "default" or args.dry_run
                                or p in default_providers(device, dtype)):
                    ok.append(p)
                elif why and how == "all":
                    note = f"unavailable: {why if len(why) <= 80 else why[:79] + '…'}"
                    skipped[(len(plan), p)] = [_row(case, p, m, note) for m in modes]
            plan.append((case, ok))
    res_providers = [p for p in providers if p != "compile"
                     and not unsupported(p, device, torch.bfloat16 if device.type == "cuda"
                                         else torch.float32)]
    total = sum(len(ok) for _, ok in plan)
    if args.resnet:
        total += 1 + len(layers) * len(res_providers)
    compiler = "eager" if args.dry_run else "inductor"
    workers = args.compile_workers
    if workers is None:  # the GPU machine's CPUs are idle while it times: use them first
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        workers = min(16, cpus) if device.type == "cuda" and not args.dry_run else 0
    # Half the budget at most, so that the timing of every other backend still fits.
    warm_caches(plan, modes, compiler, workers,
                None if deadline is None else time.monotonic() + args.budget / 2)
    progress = Progress(total)
    done: dict[tuple[int, str], list[dict]] = dict(skipped)
    res_rows: list[dict] = []
    from .demo import cpu_contention, load_average
    peak = 0.0  # the load during the run (after each case, the ResNet steps), not only at its end
    try:
        # torch.compile last, after every other backend of every case: its compilations
        # take the longest, so under --budget they are what is left out.
        for first in (True, False):
            for i, (case, ok) in enumerate(plan):
                sel = [p for p in ok if (p != "compile") == first]
                if not sel:
                    continue
                for r in bench_case(case, sel, modes, timer, bandwidth, progress,
                                    graph=args.graph, deadline=deadline, compiler=compiler,
                                    kernels=args.kernels is not None):
                    done.setdefault((i, r["backend"]), []).append(r)
                peak = max(peak, load_average())
        if args.resnet:
            failed = {(r["layer"], r["backend"]): "not timed: this backend failed its check"
                      for rs in done.values() for r in rs if mismatched(r)}
            res_rows = resnet_rows(layers, res_providers, device, args.quick, progress,
                                   deadline, failed)
            peak = max(peak, load_average())
    finally:
        progress.close()
    ops = [r for i in range(len(plan)) for p in providers for r in done.get((i, p), [])]
    if args.graph:  # every full row has replay cells, "not measured" where none was timed
        for r in ops:
            if r["mode"] == "full":
                r.setdefault("graph_ms", None)
                r.setdefault("graph_x_floor", None)
    _add_speedups(ops)
    rows = ops + res_rows

    from .cli import console
    busy = None if args.dry_run else cpu_contention(device, peak)
    # in every output, so that a table copied from a file keeps it (benchmarks/RESULTS.md)
    meta["contention"] = busy
    busy_note = busy and (
        f"(note: {busy}: other work shared the CPU, so these times are not to be trusted; "
        "torch.compile's rows least: the OpenMP threads of its CPU kernels wait for each "
        "other, 100x eager's time where one is descheduled"
        + (".)" if torch.get_num_threads() == 1 else "; OMP_NUM_THREADS=1 avoids that.)"))
    tables = [format_table(ops, op_columns(ops)), *([op_legend(ops, modes)] if ops else [])]
    if args.resnet:
        note = " (torch.compile is not timed here)" if "compile" in providers else ""
        tables += [f"\nResNet-50 training step, layer after layer1, layer2, layer3{note}:",
                   format_table(res_rows, resnet_columns(res_rows))]
    out = console()
    out.print()
    for t in tables:
        out.print(t, highlight=False)
    if busy_note:  # a new user's compiled rows read 0.01x eager on a shared 2-core machine
        out.print(busy_note, highlight=False)
    try:
        if args.table:
            from rich.console import Console
            with _open_out(args.table) as f:
                file_console = Console(file=f, width=250, color_system=None)
                for t in tables:
                    file_console.print(t, highlight=False)
                if busy_note:  # one line, however long
                    file_console.print(busy_note, highlight=False, soft_wrap=True)
            print(f"wrote {args.table}")
        if args.csv:
            write_csv(args.csv, rows, meta)
            print(f"wrote {args.csv}")
        if args.md:
            write_markdown(args.md, rows, meta, modes, busy_note)
            print(f"wrote {args.md}")
        if args.kernels:
            n = write_kernels(args.kernels, ops, meta)
            print(f"wrote {args.kernels}: {n} profiles" if n else
                  f"wrote {args.kernels}: its header only, no case ran on a kernel backend "
                  f"({', '.join(KERNEL_BACKENDS)})")
        if args.plot:
            if write_plot(args.plot, rows, meta):
                print(f"wrote {args.plot}")
            else:
                print(f"{args.plot} not written: nothing was timed")
    except OSError as e:
        raise usage_error(f"cannot write the results: {e}") from None
    bad = mismatches(ops)
    if bad:  # after the tables and files: they show what did run
        raise MismatchError(f"{len(bad)} backend check(s) failed:\n" + "\n".join(bad))
    return rows


def add_parser(sub) -> None:
    from .cli import float_in, int_in, threads_arg
    b = sub.add_parser("bench", help="time every layer on every available backend",
                       description="Check every backend against the reference with the same "
                       "noise, then time it; compare with the bandwidth floor measured in "
                       "the same run. --backends picks the backends, whatever "
                       "GUIDEDROP_BACKEND says.")
    b.add_argument("--layers", default="all",
                   help=f"comma list of {', '.join(LAYERS)} (default: all)")
    b.add_argument("--shapes", default=None,
                   help="comma list of NxCxHxW or names: "
                        + ", ".join(f"{k}={fmt_shape(v)}" for k, v in SHAPES.items())
                        + " (default: on CUDA r56, r28 and r14 in bf16 and fp32 and c32 in "
                          "fp32, with --quick c32; on CPU small, with --quick tiny)")
    b.add_argument("--dtype", default=None, help="comma list of fp32, bf16, fp16, fp64, each "
                   "shape in each (default: bf16,fp32 on CUDA, fp32 on CPU; with neither "
                   "--shapes nor --dtype, the pairs of --shapes's default)")
    b.add_argument("--mode", default="full",
                   help="forward, backward, full, or a comma list (default full)")
    b.add_argument("--backends", default=None,
                   help=f"comma list of {', '.join(PROVIDERS)} (default: every available one), "
                        "or all: every backend, a row saying why for each that cannot run here")
    b.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when present)")
    b.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    threads_arg(b)
    b.add_argument("--csv", default=None, metavar="PATH",
                   help="write the rows as CSV (default: none)")
    b.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG bar chart (default: none)")
    b.add_argument("--md", default=None, metavar="PATH",
                   help="write a markdown table (default: none)")
    b.add_argument("--resnet", action="store_true",
                   help="also time a ResNet-50 training step with each layer")
    b.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CI)")
    b.add_argument("--graph", action="store_true",
                   help="also time the full mode's forward + backward (noise=None) replayed in "
                        "a CUDA graph, captured after a warm-up (CUDA only)")
    b.add_argument("--budget", type=float_in(0, 1e6), default=None, metavar="SECONDS",
                   help="0 to 1e+06; stop checking and timing after this long: the cases left "
                        "get rows marked not measured (torch.compile, the slowest to set up, "
                        "runs last, --resnet's steps after it; default: no limit)")
    b.add_argument("--compile-workers", type=int_in(0, 256), default=None, metavar="N",
                   help="0 to 256; before the timing, run every case once in N processes at "
                        "once on the backends that compile (torch.compile, Triton), so that "
                        "the timed run loads their kernels from the on-disk caches instead "
                        "of compiling them case after case (default: min(16, CPUs) on CUDA, "
                        "0 on CPU and with --dry-run, where nothing is cached)")
    b.add_argument("--dry-run", action="store_true",
                   help="everything but the timing: checks against the reference, kept bytes, "
                        "the table with its timing cells marked not measured (torch.compile "
                        "traced with backend=eager)")
    b.add_argument("--table", default=None, metavar="PATH",
                   help="also write the printed table as plain text (default: none)")
    b.add_argument("--kernels", default=None, metavar="PATH",
                   help="also profile a forward + backward of each case on the kernel "
                        "backends (triton, cuda) after its timing (torch.profiler) and write, "
                        "as CSV, the device time per step of each kernel (on a CPU: the "
                        "self time of each op) and its share of their total (default: none)")
    b.add_argument("--model", action="store_true",
                   help="count instead of time: launches forward/backward, bytes against the "
                        "floor and host syncs per layer and backend (runs on any machine; "
                        "on a CPU, TRITON_INTERPRET=1 counts the Triton backend too), and "
                        "SASS instructions, access widths and divisions per element of the "
                        "streaming kernels compiled for sm_90")
    b.add_argument("--no-sass", action="store_true",
                   help="with --model: leave out the SASS counts (they compile every Triton "
                        "kernel for sm_90: minutes when Triton's cache is cold)")
