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
    into it. tests/cuda_emu/build.py refuses to build or load under this variable."""
    if request.node.get_closest_marker("emulated") is None:
        monkeypatch.setenv("GUIDEDROP_EMULATOR", "unmarked")


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from torch.manual_seed(0) (CPU and CUDA generators)."""
    torch.manual_seed(0)
