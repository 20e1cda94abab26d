"""Host time of one forward + backward per backend, and where the Triton backend spends it.

On a GPU (what benchmarks/RESULTS.md's host-overhead figures came from)::

    python benchmarks/host_overhead.py [PROFILE.txt]

For each layer and backend: the mean wall time of 50 calls of ``bench.mode_fn(..., "full")``
at (128, 64, 56, 56) bf16 before the device is synchronised ("host") and after ("host +
device"). When host is about host + device, the layer is host-bound: the GPU waits for
the launches. With a file name, cProfile's top functions of 20 Triton calls go there.

Without a GPU::

    python benchmarks/host_overhead.py --cpu

the same step on the CPU, every layer, (2, 16, 14, 14) float32, with the kernels stubbed:
the host work of the layers' Python and torch ops alone (validation, dispatch, the plan's
torch ops, the autograd Function, the launchers' arguments), without the kernels' time or
their launch (Triton's own launch path and CUDA's are not run). The Triton backend takes
its GPU launcher (``_common._Launcher``) with the launch a no-op; the CUDA backend is
the extension's Python glue (cuda_backend.py) on ops that only allocate their outputs
(their fake kernels; it needs the CPU emulator's build, tests/cuda_emu). Reference: its
torch ops run, on small tensors. Not a GPU figure: it shows how the host path changes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

if "--cpu" in sys.argv:  # before guidedrop imports Triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from guidedrop import bench, dispatch
from guidedrop.cli import quiet_torch_logs

LAYERS = ("spatialscale", "corrdrop", "attentiondrop")
BACKENDS = ("triton", "cuda", "reference")


def main(profile_path: str | None = None) -> None:
    profile = open(profile_path, "w") if profile_path else None  # noqa: SIM115
    for layer in LAYERS:
        case = bench.Case(layer, (128, 64, 56, 56), torch.bfloat16, torch.device("cuda"))
        inputs = bench.make_inputs(case)
        for p in BACKENDS:
            with bench.forced_backend(p):
                step = bench.mode_fn(bench.provider_fn(p, layer), inputs, "full")
                for _ in range(5):  # compilation and the allocator's first blocks
                    step()
                torch.cuda.synchronize()
                n = 50
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                print(f"{layer:14s} {p:9s} host {1e3 * (t1 - t0) / n:7.3f} ms/call, "
                      f"host+device {1e3 * (t2 - t0) / n:7.3f} ms/call", flush=True)
                if profile and p == "triton":
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(20):
                        step()
                    pr.disable()
                    torch.cuda.synchronize()
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
                    print(f"# {layer} triton, 20 calls\n{s.getvalue()}", file=profile)
    if profile:
        profile.close()


def stub_kernels() -> None:
    """Replace the kernel backends' launches by no-ops (see the module's docstring)."""
    from torch._library.simple_registry import singleton

    import guidedrop.triton_kernels._common as tc
    tc._Interpreted = tc._Launcher  # the launcher a GPU takes
    tc._eager = lambda *args, **kwargs: None  # kernel[grid](...)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_cuda_emulated as emulated
    if emulated.emu.unavailable():
        print(f"cuda: not run ({emulated.emu.unavailable()})")
        return
    cuda = emulated.emu.backend()

    class FakeOps:  # torch.ops.<emulated library>.<op>, shapes only
        def __getattr__(self, op):
            return singleton.find(f"{emulated.emu.NAME}::{op}").fake_impl.kernel

    cuda._ops = FakeOps()
    dispatch._loaded["cuda"] = (cuda, "")


def main_cpu(calls: int = 300) -> None:
    torch.set_num_threads(1)
    stub_kernels()
    print(f"host time of a forward + backward, µs (mean of {calls}; kernels stubbed)")
    print(f"{'layer':16s}" + "".join(f"{p:>11s}" for p in BACKENDS))
    for layer in bench.LAYERS:
        case = bench.Case(layer, (2, 16, 14, 14), torch.float32, torch.device("cpu"))
        inputs = bench.make_inputs(case)
        row = f"{layer:16s}"
        for p in BACKENDS:
            if p != "reference" and dispatch.load(p)[0] is None:
                row += f"{'-':>11s}"
                continue
            with bench.forced_backend(p):
                step = bench.mode_fn(bench.provider_fn(p, layer), inputs, "full")
                for _ in range(10):
                    step()
                t0 = time.perf_counter()
                for _ in range(calls):
                    step()
                row += f"{1e6 * (time.perf_counter() - t0) / calls:11.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Host time of one forward + backward per layer and backend (see the "
                    "module's docstring).")
    parser.add_argument("profile", nargs="?", help="with a GPU: write cProfile's top "
                        "functions of 20 Triton calls to this file")
    parser.add_argument("--cpu", action="store_true", help="no GPU: on the CPU, every layer, "
                        "the kernels stubbed (the Python and torch-op host work alone)")
    args = parser.parse_args()
    quiet_torch_logs()
    if args.cpu:
        main_cpu()
    else:
        main(args.profile)
