"""How CamDrop layers get the classifier weights and the targets of the current step.

    with guidedrop.cam_targets(model.fc, labels):
        loss = criterion(model(images), labels)

Every CamDrop module that runs inside the block reads them; the model's ``forward``
signature does not change. The blocks live in a ``contextvars.ContextVar`` (SPEC §8):
each thread (and each asyncio task) sees only its own blocks, so two threads training
at once never read or pop each other's targets. ``nn.DataParallel`` runs its replicas
in threads that do not see the caller's block: CamDrop refuses to run there (use
DistributedDataParallel). Dynamo of torch 2.11 cannot trace ``ContextVar.get``: there,
code compiled by torch.compile reads a per-thread copy of the blocks, made where a block
is entered or left, so it does not see a context copied into another thread
(``asyncio.to_thread``, ``contextvars.copy_context().run``) nor the blocks of asyncio
tasks interleaved in one thread; eager mode and newer torch read the ContextVar.

A backward on a GPU runs on autograd's device threads, which do not see the caller's
ContextVar; an activation checkpoint's recompute runs there. torch 2.14 hands them a copy
of the context of the thread (or task) that called ``backward()`` (its C++ thread-local
state, key "context"): there, CamDrop reads that context's blocks. torch 2.11 does not,
nor does a backward started on a device thread (a nested reentrant checkpoint's, whose copy
is of that thread's empty context): there the recompute finds no block (``current``'s
error says what to do).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import torch
import torch._dynamo.source
from torch import nn

# A tuple (immutable), so that a context copied by another thread or task never shares
# a mutable stack with this one.
_blocks: contextvars.ContextVar[tuple[tuple[torch.Tensor, torch.Tensor], ...]] = (
    contextvars.ContextVar("guidedrop_cam_targets", default=()))
# Whether Dynamo traces ContextVar.get (torch 2.14 does; 2.11 does not). Else compiled
# code reads _thread.blocks, this thread's _blocks as cam_targets last set them.
_TRACES_CONTEXTVAR = hasattr(torch._dynamo.source, "ContextVarGetSource")
_thread = threading.local()


@contextlib.contextmanager
def cam_targets(classifier: nn.Module | torch.Tensor, target: torch.Tensor):
    """Make ``(weight, target)`` visible to the CamDrop layers run inside the block.

    classifier: the linear layer after global pooling (a module whose ``weight`` is a 2-D
    tensor, e.g. ``nn.Linear``; its weight is read here, when the block is entered: under
    ``torch.func.functional_call`` pass the weight), or that weight itself, a floating
    (K, C_fc) tensor.
    target: (N,) ground-truth class indices of the batch, any integer dtype but bool.
    Raises TypeError for anything else (ValueError for a weight tensor that is not
    2-D, or a lazy module's weight not yet initialised). Shapes against x (N, C_fc a multiple of C),
    devices and the range [0, K) are checked by the layer (SPEC §6 step 0).
    """
    module = isinstance(classifier, nn.Module)
    weight = getattr(classifier, "weight", None) if module else classifier
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError("cam_targets got a weight not initialised yet (a lazy module's before "
                         "its first forward): run the module once first")
    if module:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"cam_targets needs the classifier after global pooling (a module "
                            f"with a 2-D weight, like nn.Linear) or its (K, C_fc) weight; "
                            f"got {type(classifier).__name__}")
    elif isinstance(classifier, torch.Tensor):
        if weight.dim() != 2:  # a tensor of the wrong shape: ValueError (SPEC §1)
            raise ValueError(f"cam_targets needs a (K, C_fc) weight, got shape "
                             f"{tuple(weight.shape)}")
    else:
        raise TypeError(f"cam_targets needs an nn.Linear-like module or a (K, C_fc) weight, "
                        f"got {type(classifier).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"the classifier weight must be floating, got dtype {weight.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got "
                        f"{type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class indices, got dtype "
                        f"{target.dtype}")
    entry = (weight, target)  # this block's own, left by identity
    _blocks.set(_blocks.get() + (entry,))
    _thread.blocks = _blocks.get()
    try:
        yield
    finally:
        # Not ContextVar.reset (back to the blocks before this one): blocks left out of order
        # (two generators, each inside a block, closed first to last) brought the first
        # one's targets back after both had been left.
        _blocks.set(tuple(b for b in _blocks.get() if b is not entry))
        _thread.blocks = _blocks.get()


def current() -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, target) of the innermost :func:`cam_targets` block of this thread.
    Raises RuntimeError outside every block (CamDrop in training mode calls it: the
    message says how to give CamDrop its targets)."""
    if torch.compiler.is_compiling() and not _TRACES_CONTEXTVAR:
        blocks = getattr(_thread, "blocks", ())
    else:
        blocks = _blocks.get()
    backward = False  # (set in statements: Dynamo cannot trace `not` of a tuple as a value)
    if not blocks and not torch.compiler.is_compiling():
        backward = torch._C._current_graph_task_id() != -1
        if backward and torch._C._is_key_in_tls("context"):
            # a recompute on one of autograd's device threads: the blocks of the context
            # that called backward(), which torch passes them (module docstring)
            blocks = torch._C._get_obj_in_tls("context").get(_blocks, ())
    if not blocks:
        hint = (" In a backward (an activation checkpoint's recompute): call backward() "
                "inside the block too. On a GPU the recompute runs on autograd's device "
                "threads, which see the block only where torch passes them the caller's "
                "context (torch 2.14 does, 2.11 does not) and not in a backward started "
                "inside another one (nested reentrant checkpoints): run the backward under "
                "torch.autograd.set_multithreading_enabled(False), or give "
                "checkpoint(..., use_reentrant=False) a context_fn that enters cam_targets."
                if backward else "")
        raise RuntimeError(
            "no cam_targets block is open in this thread (CamDrop in training mode needs the "
            "classifier weights and targets): wrap the training step in "
            "`with guidedrop.cam_targets(model.fc, labels): ...` (in the thread that runs "
            "the model)." + hint)
    return blocks[-1]
