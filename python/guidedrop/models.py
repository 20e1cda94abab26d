"""Put guidedrop layers where their papers put them, in torchvision / timm ResNets.

The ResNets of torchvision and timm keep their residual groups as ``nn.Sequential``
attributes ``layer1 .. layer4`` and the classifier as ``fc``. :func:`insert` appends a
layer to the end of the chosen groups, so the existing parameter names (and pretrained
checkpoints) are unchanged and ``model.train()/eval()`` reaches the new layers.

    model = torchvision.models.resnet50()
    guidedrop.models.insert(model, "corrdrop")      # after layer1..layer3, blocks 9/7/5
    sched = guidedrop.LinearRamp(model, steps=5000)

CamDrop layers need ``with guidedrop.cam_targets(model.fc, labels):`` around the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import modules as M

# Where each paper puts its layer: (groups counted from the end of a 3- or 4-group
# ResNet, factory per position). Groups are addressed by index into the model's
# residual groups, so the same table serves CIFAR (3 groups) and ImageNet (4) ResNets.
PLACEMENTS: dict[str, tuple[str, Callable[[int, int], nn.Module]]] = {
    # CorrDrop: after the residual groups but the last, block sizes 9/7/5 (paper §4.1).
    "corrdrop": ("all_but_last_of_4", lambda i, n: M.CorrDrop(p=0.1, block_size=(9, 7, 5)[i])),
    # SelectScale: after the convolutions of the last groups.
    "selectscale": ("last_two", lambda i, n: M.SelectScale()),
    "selectout": ("last_two", lambda i, n: M.Selectout()),
    "spatialscale": ("last_two", lambda i, n: M.SpatialScale()),
    # AttentionDrop: after the first two groups.
    "attentiondrop": ("first_two", lambda i, n: M.AttentionDrop()),
    # FocusedDropout: after the penultimate group.
    "focused_dropout": ("penultimate", lambda i, n: M.FocusedDropout()),
    # CamDrop: the last groups, reading model.fc through cam_targets.
    "camdrop": ("last_two", lambda i, n: M.CamDrop()),
    # DropBlock: groups 3 and 4 (Ghiasi et al.), block 7 (5 on small maps).
    "dropblock": ("last_two", lambda i, n: M.DropBlock2d(p=0.1, block_size=7)),
}
LAYERS = tuple(PLACEMENTS)


def residual_groups(model: nn.Module) -> list[str]:
    """Names of the model's residual groups (``layer1``, ``layer2``, ...)."""
    names = [f"layer{i}" for i in range(1, 9) if isinstance(getattr(model, f"layer{i}", None),
                                                             nn.Sequential)]
    if not names:
        raise ValueError("model has no residual groups layer1, layer2, ... (nn.Sequential)")
    return names


def _chosen(where: str, groups: list[str]) -> list[str]:
    n = len(groups)
    return {
        "all_but_last_of_4": groups[:3] if n >= 4 else groups,
        "last_two": groups[-2:],
        "first_two": groups[:2],
        "penultimate": groups[-2:-1] or groups,
    }[where]


def insert(model: nn.Module, layer: str, factory: Callable[[int, int], nn.Module] | None = None
           ) -> list[nn.Module]:
    """Append guidedrop ``layer`` to the groups its paper uses; returns the new modules.

    factory(i, n) -> module overrides the paper's settings for the i-th of n positions.
    """
    if layer not in PLACEMENTS:
        raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    where, default = PLACEMENTS[layer]
    chosen = _chosen(where, residual_groups(model))
    added = []
    for i, name in enumerate(chosen):
        mod = (factory or default)(i, len(chosen))
        getattr(model, name).append(mod)
        added.append(mod)
    return added


def swap_timm_dropblock(model: nn.Module,
                        factory: Callable[[nn.Module], nn.Module] | None = None) -> int:
    """Replace every ``timm.layers.DropBlock2d`` in ``model`` by a guidedrop layer.

    The default factory keeps timm's settings: ``DropBlock2d(p=drop_prob * gamma_scale,
    block_size=block_size, shared_channels=couple_channels)`` (timm scales its seed rate
    by gamma_scale, e.g. 0.25 in a ResNet's layer3). Returns the count.
    """
    def default(old):
        p = min(1.0, float(old.drop_prob) * float(getattr(old, "gamma_scale", 1.0)))
        return M.DropBlock2d(p=p, block_size=int(old.block_size),
                             shared_channels=bool(getattr(old, "couple_channels", True)))

    factory = factory or default
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == "DropBlock2d" and type(child).__module__.startswith("timm"):
                setattr(parent, child_name, factory(child))
                count += 1
    return count


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet with three groups (32x32 input -> 32, 16, 8 maps).

    x: (N, in_channels, 32, 32) -> logits (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1,
                 blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        chans = [width, 2 * width, 4 * width]
        groups, cin = [], width
        for i, c in enumerate(chans):
            groups.append(nn.Sequential(*[_Block(cin if b == 0 else c, c,
                                                 2 if (i > 0 and b == 0) else 1)
                                          for b in range(blocks)]))
            cin = c
        self.layer1, self.layer2, self.layer3 = groups
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))
