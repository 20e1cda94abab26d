"""CUDA graph capture of a training step, the part a CPU can check (issue 12 item 6).

A captured step replays its kernels with the same arguments: fresh masks at each replay
need every layer's randomness to come from torch's generator in a graph-safe way, i.e. a
draw made on the device by an op that capture registers for Philox offset updates
(torch.rand / torch.randint on x's device), never a host read of the generator or of a
tensor (either would freeze the masks into the graph, or fail the capture). Here, with
``noise=None``, on both kernel backends (Triton under the interpreter, the CUDA sources on
the emulator; the real ones with a GPU), for every layer:

- the randomness comes from one random aten op on x's device, or, for the CUDA backend's
  DropBlock / CamDrop, from the seed op itself (it takes the CUDA generator's Philox state
  with ``philox_cuda_state``, which capture registers as ATen's own dropout does);
- nothing syncs, nothing reads the generator state through torch's Python API;
- two calls give different masks and ``torch.manual_seed`` reproduces them.

The capture itself runs on a GPU: tests/test_training.py::test_cuda_graph_whole_step
(every layer in one SmallResNet step, replayed) and test_cuda_graph_fresh_masks_and_seeded
(one layer at a time).
"""

from __future__ import annotations

import pytest
import torch
from test_launches import backend  # noqa: F401  (fixture: Triton, the CUDA emulator)
from test_training import SHAPE, _ops
from testing import HAS_CUDA

from guidedrop.launches import LaunchCounter

DEV = "cuda" if HAS_CUDA else "cpu"
LAYERS = list(_ops("cpu"))
# aten ops that draw from a generator
RANDOM = {"rand", "rand_like", "randint", "randint_like", "randn", "randn_like", "randperm",
          "uniform", "uniform_", "normal", "normal_", "bernoulli", "bernoulli_", "random_",
          "exponential_", "geometric_", "cauchy_", "log_normal_", "multinomial",
          "native_dropout"}
# (backend, layer) whose seed op draws Philox from the device generator itself
DRAWS_IN_OP = {("cuda", "dropblock"): "seeds_plan", ("cuda", "camdrop"): "camdrop_plan"}


class RandomOps(LaunchCounter):
    """LaunchCounter that also records the random aten ops and the devices of their
    outputs: ``draws`` [(name, device)]."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = func._schema.name.split("::")[-1]
        if func.namespace == "aten" and name in RANDOM:
            self.draws.append((name, out.device))
        return out


def manual_seed(backend: str, seed: int) -> None:  # noqa: F811 (a name, not the fixture)
    """torch.manual_seed; on the emulator also its own CUDA generator (a stand-in for the
    device's default generator, which torch.manual_seed seeds on a GPU)."""
    torch.manual_seed(seed)
    if backend == "cuda" and not HAS_CUDA:
        torch.ops.guidedrop_emu.emu_set_philox(seed, 0)


@pytest.fixture
def no_host_generator_reads(monkeypatch):
    """torch's Python entry points to the generator state raise (a host read)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a host read of the generator state")
    for mod, name in ((torch, "get_rng_state"), (torch.random, "get_rng_state"),
                      (torch, "initial_seed"), (torch.random, "initial_seed"),
                      (torch.cuda, "get_rng_state"), (torch.cuda, "get_rng_state_all"),
                      (torch.cuda, "initial_seed")):
        monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize("layer", LAYERS)
def test_noise_none_draws_on_device_graph_safe(backend, layer,  # noqa: F811 (the fixture)
                                               no_host_generator_reads):
    call, _ = _ops(DEV)[layer]
    x = torch.randn(SHAPE, device=DEV)
    manual_seed(backend, 3)
    with RandomOps() as c:
        a = call(x, None)
    # SPEC §6 step 0: a CPU target is range-checked on the host through numpy (no op); on a
    # GPU by an asynchronous device assertion in the CAM kernel: no sync either way.
    assert not c.syncs, c.syncs
    if (backend, layer) in DRAWS_IN_OP:
        assert not c.draws, c.draws
        assert f"cuda:{DRAWS_IN_OP[backend, layer]}" in c.names, c.names
    else:
        assert len(c.draws) == 1, c.draws
        assert c.draws[0][1] == x.device, c.draws
    b = call(x, None)
    assert not torch.equal(a, b), "two calls drew the same mask"
    manual_seed(backend, 3)
    assert torch.equal(call(x, None), a), "torch.manual_seed does not reproduce the mask"
