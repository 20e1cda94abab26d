"""pytest-benchmark suite: every layer x provider x mode, through ``guidedrop.bench``.

    python -m pytest benchmarks/ --benchmark-only                 # time
    python -m pytest benchmarks/ --benchmark-disable -q           # one call each (smoke)
    python -m pytest benchmarks/ --benchmark-only --benchmark-json=out.json

The same code as ``python -m guidedrop bench`` (checks each provider against the
reference with the same noise before timing it); on CUDA the goal shapes, on CPU a
small one. ``GUIDEDROP_BENCH_QUICK=1`` uses the ``--quick`` shapes and only the full
mode. Each result's ``extra_info`` holds the floor (passes over x at the copy bandwidth
measured once per session) and the ratio of the median to it. The command line is the
main tool (it also measures bytes kept for backward and the ResNet-50 step); this suite is
for pytest-benchmark's comparisons between runs (``--benchmark-compare``).
"""

from __future__ import annotations

import os

import pytest
import torch

from guidedrop import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("GUIDEDROP_BENCH_QUICK") == "1"
if DEVICE.type == "cuda":
    CONFIGS = bench.CUDA_QUICK if QUICK else bench.CUDA_DEFAULT
else:
    CONFIGS = bench.CPU_QUICK if QUICK else bench.CPU_DEFAULT
MODES = ["full"] if QUICK else ["forward", "full"]


@pytest.fixture(scope="session")
def bandwidth() -> float:
    return bench.measure_bandwidth(DEVICE, bench.Timer(DEVICE, quick=QUICK))[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("layer", bench.LAYERS)
@pytest.mark.parametrize("shape,dtype", CONFIGS, ids=[f"{s}-{d}" for s, d in CONFIGS])
def test_layer(benchmark, bandwidth, shape, dtype, layer, provider, mode):
    case = bench.Case(layer, bench.SHAPES[shape], bench.DTYPES[dtype], DEVICE)
    if provider not in bench.default_providers(DEVICE, case.dtype):
        why = bench.unsupported(provider, DEVICE, case.dtype) or "not run here"
        pytest.skip(f"{provider}: {why}")
    if provider == "compile":
        torch.compiler.reset()
    inputs = bench.make_inputs(case)
    s = bench.check_slice(case, inputs)
    with bench.forced_backend("reference"):
        expected = bench.run_with_grad(bench.op(layer), s)
    with bench.forced_backend(provider):
        fn = bench.provider_fn(provider, layer)
        if provider != "reference":
            bench.check(case, provider, fn, s, expected)  # raises MismatchError
        step = bench.mode_fn(fn, inputs, mode)
        step()  # compile / warm up outside the timing
        if DEVICE.type == "cuda":
            def call():
                step()
                torch.cuda.synchronize()
        else:
            call = step
        benchmark.group = f"{shape} {dtype} {mode}"
        benchmark(call)
    x_bytes = inputs.x.numel() * inputs.x.element_size()
    floor_s = bench.PASSES[mode] * x_bytes / bandwidth
    benchmark.extra_info.update(device=bench.device_name(DEVICE), floor_ms=floor_s * 1e3,
                                copy_gbps=bandwidth / 1e9)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["x_floor"] = stats.stats.median / floor_s
