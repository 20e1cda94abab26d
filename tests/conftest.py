"""pytest configuration shared by every test.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET is read when
``@triton.jit`` decorates a kernel, so it is set here, before anything imports
``guidedrop`` (and through it ``guidedrop.triton_kernels``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (pyproject's addopts: one worker per core), one intra-op thread per
# worker: the workers already fill the cores, and more threads only contend.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _emulator_only_where_marked(request, monkeypatch):
    """A test that loads the CUDA emulator (tests/cuda_emu) must be marked `emulated`: the
    default run leaves those out, and an unmarked one would put the emulator's build back
    into it. tests/cuda_emu/build.py refuses to build or load under this variable.

    Under pytest-xdist an emulated test runs on one core of its own (worker gw<i> on the
    i-th allowed CPU), restored after it; the emulator's threads, started from it, stay
    there. The emulator runs a block's CUDA threads as OS threads that meet at every
    __syncthreads and warp intrinsic: spread over both cores with another worker's, each
    meeting woke threads across cores, and two thirds of the emulated tests' CPU time was
    the kernel's (futex, sched_yield). On one core the meetings hand over there: on 2
    cores, -n 2, 217 emulated tests of test_backend_properties, test_plans_adversarial and
    test_block_faults took 102 s instead of 169 s, the 42 of
    test_emulated_map_select_warp_and_block_sizes 50 s instead of 79 s. Threads still
    interleave (at every barrier, yield and preemption); without xdist a test keeps every
    core."""
    if request.node.get_closest_marker("emulated") is None:
        monkeypatch.setenv("GUIDEDROP_EMULATOR", "unmarked")
        yield
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    before = None
    if worker[2:].isdigit() and hasattr(os, "sched_setaffinity"):  # (Linux)
        before = os.sched_getaffinity(0)  # this thread's: Linux's affinity is per thread
        try:
            os.sched_setaffinity(0, {sorted(before)[int(worker[2:]) % len(before)]})
        except OSError:  # (a cpuset changed under us: run unpinned)
            before = None
    yield
    if before is not None:
        os.sched_setaffinity(0, before)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from torch.manual_seed(0) (CPU and CUDA generators)."""
    torch.manual_seed(0)
