"""Host time of one forward + backward per backend, and where the Triton backend spends it.

On a GPU (what benchmarks/RESULTS.md's host-overhead figures came from)::

    python benchmarks/host_overhead.py [PROFILE.txt]

For each layer and backend: the mean wall time of 50 calls of ``bench.mode_fn(..., "full")``
at (128, 64, 56, 56) bf16 before the device is synchronised ("host") and after ("host +
device"). When host is about host + device, the layer is host-bound: the GPU waits for
the launches. With a file name, cProfile's top functions of 20 Triton calls go there.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

from guidedrop import bench

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


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
