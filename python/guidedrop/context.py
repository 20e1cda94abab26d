"""How CamDrop layers get the classifier weights and the targets of the current step.

    with guidedrop.cam_targets(model.fc, labels):
        loss = criterion(model(images), labels)

Every CamDrop module that runs inside the block reads them; the model's ``forward``
signature does not change. A plain stack (not a ContextVar) so that the threads of
``nn.DataParallel`` see it too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_stack: list[tuple[torch.Tensor, torch.Tensor]] = []


@contextlib.contextmanager
def cam_targets(classifier: nn.Module | torch.Tensor, target: torch.Tensor):
    """classifier: the linear layer after global pooling (or its weight (K, C_fc));
    target: (N,) ground-truth classes of the batch."""
    weight = classifier.weight if isinstance(classifier, nn.Module) else classifier
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("cam_targets needs an nn.Linear-like module or a (K, C_fc) weight")
    _stack.append((weight, target))
    try:
        yield
    finally:
        _stack.pop()


def current() -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, target) of the innermost :func:`cam_targets` block."""
    if not _stack:
        raise RuntimeError(
            "CamDrop ran in training mode without classifier weights and targets: wrap the "
            "training step in `with guidedrop.cam_targets(model.fc, labels): ...`")
    return _stack[-1]
