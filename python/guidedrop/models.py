"""Put guidedrop layers where their papers put them, in torchvision / timm ResNets.

The ResNets of torchvision and timm keep their residual groups as ``nn.Sequential``
attributes ``layer1 .. layer4`` and the classifier as ``fc``. :func:`insert` appends a
layer to the end of the chosen groups, so the existing parameter names (and pretrained
checkpoints) are unchanged and ``model.train()/eval()`` reaches the new layers.

    model = torchvision.models.resnet50()
    guidedrop.models.insert(model, "corrdrop")      # after layer1..layer3, block sizes 9/7/5
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
    # CorrDrop: after the first three residual groups, block sizes 9/7/5 (paper §4.1): all
    # but the last of a 4-group ResNet, every group of a 3-group (CIFAR) one.
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
    # DropBlock: groups 3 and 4 (Ghiasi et al.), block 7 (clamped to smaller maps, SPEC §7).
    "dropblock": ("last_two", lambda i, n: M.DropBlock2d(p=0.1, block_size=7)),
}
LAYERS = tuple(PLACEMENTS)


def residual_groups(model: nn.Module) -> list[str]:
    """Names of the model's residual groups (``layer1``, ``layer2``, ...): its
    ``nn.Sequential`` attributes ``layer1`` to ``layer8``. ValueError where it has none."""
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
    The new modules take the model's train/eval mode. Raises TypeError for a model that is
    not an nn.Module, a layer name that is not a str or a factory that returns no
    nn.Module; ValueError for an unknown layer, a model without residual groups, a group
    that already holds a layer of the new one's class (a guidedrop layer anywhere in it:
    the same insert twice, or one after swap_timm_dropblock, would stack them; different
    layers may follow one another), or "dropblock" (without a factory) into a model that
    holds timm's DropBlock2d (swap_timm_dropblock replaces those). Every module is made and checked
    before any group changes, so an error leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a str, one of {', '.join(LAYERS)}, got "
                        f"{type(layer).__name__}")
    if layer not in PLACEMENTS:
        raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    where, default = PLACEMENTS[layer]
    chosen = _chosen(where, residual_groups(model))
    if layer == "dropblock" and factory is None and _timm_dropblocks(model):
        raise ValueError("model already drops blocks with timm's DropBlock2d "
                         "(drop_block_rate): guidedrop's would drop more on top of it; "
                         "guidedrop.models.swap_timm_dropblock(model) replaces timm's instead")
    added = [(factory or default)(i, len(chosen)) for i in range(len(chosen))]
    for name, mod in zip(chosen, added, strict=True):
        if not isinstance(mod, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(mod).__name__} "
                            f"for {name}")
        group = getattr(model, name)
        # a guidedrop layer anywhere in the group (inside its blocks too: swap_timm_dropblock
        # puts DropBlock2d there); any other module among the group's own children
        inside = group.modules() if isinstance(mod, M.GuidedDropout) else iter(group)
        if any(type(m) is type(mod) for m in inside if m is not group):
            after = ", or after swap_timm_dropblock" if type(mod) is M.DropBlock2d else ""
            raise ValueError(f"{name} already holds a {type(mod).__name__}: a second one "
                             f"would stack on it (the same insert twice{after}?)")
    for name, mod in zip(chosen, added, strict=True):
        getattr(model, name).append(mod.train(model.training))
    return added


# timm.layers.DropBlock2d's settings (timm 0.9 to 1.0.x) and how each maps; any other
# public attribute (a newer timm setting) refuses the swap rather than being dropped.
_TIMM_SETTINGS = ("drop_prob", "block_size", "gamma_scale", "with_noise", "inplace",
                  "couple_channels", "scale_by_keep", "batchwise", "fast")


def _from_timm(old: nn.Module) -> M.DropBlock2d:
    """guidedrop's DropBlock2d with the settings of ``old`` (a timm DropBlock2d).

    drop_prob * gamma_scale -> p (timm scales its seed rate by gamma_scale; the seed rate
    formula is SPEC §7's); block_size -> block_size; couple_channels -> shared_channels
    (timm < 1.0.23 had no such setting and drew one mask per channel); scale_by_keep ->
    normalize="batch" (timm divides by the kept fraction of the whole batch tensor) or
    "none"; inplace: the values are the same (guidedrop never writes into x); fast and
    batchwise=False: no setting. with_noise=True (Gaussian noise in the dropped blocks),
    batchwise=True (one mask for the whole batch, timm < 1.0.23), an unknown setting or a
    rate above 1: ValueError naming the setting. Keeps train/eval mode.

    The seeds are SPEC §7's, at valid block centres only (the paper; timm's drop_block_2d
    before 1.0.23). timm 1.0.23 and later, and older timm's fast=True, seed every position
    and clip the blocks at the border: they drop more, most on small maps (drop_prob 0.1,
    block 5, 7 x 7 maps: 31 % of the units in timm 1.0.31, 10 % here).
    """
    def refuse(setting, why):
        raise ValueError(f"swap_timm_dropblock cannot map timm DropBlock2d({setting}): {why}; "
                         f"pass factory= to choose the replacement yourself")

    unknown = sorted(k for k in vars(old) if not k.startswith("_") and k != "training"
                     and k not in _TIMM_SETTINGS)
    if unknown:
        refuse(f"{unknown[0]}={getattr(old, unknown[0])!r}", "a setting guidedrop does not know")
    if getattr(old, "with_noise", False):
        refuse("with_noise=True", "guidedrop drops blocks to zero, never adds noise")
    if getattr(old, "batchwise", False):
        refuse("batchwise=True", "that timm draws one mask for the whole batch")
    p = float(old.drop_prob) * float(getattr(old, "gamma_scale", 1.0))
    if not 0 <= p <= 1:
        refuse(f"drop_prob * gamma_scale = {p}", "guidedrop's p must be in [0, 1]")
    new = M.DropBlock2d(
        p=p, block_size=old.block_size,
        shared_channels=bool(getattr(old, "couple_channels", False)),
        normalize="batch" if getattr(old, "scale_by_keep", True) else "none")
    return new.train(old.training)


def _timm_dropblocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of every timm.layers.DropBlock2d in model."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children()
            if type(child).__name__ == "DropBlock2d"
            and type(child).__module__.startswith("timm")]


def swap_timm_dropblock(model: nn.Module,
                        factory: Callable[[nn.Module], nn.Module] | None = None) -> int:
    """Replace every ``timm.layers.DropBlock2d`` in ``model`` by a guidedrop layer.

    The default factory maps every timm setting (see :func:`_from_timm`: its seeds are
    SPEC §7's, at valid centres only, where timm 1.0.23 and later seed everywhere) or raises
    ValueError naming the one it cannot map; every layer is checked before any is
    replaced. ``factory(old) -> module`` overrides it. Returns the count. TypeError for a
    model that is not an nn.Module or a factory that returns no nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = _timm_dropblocks(model)
    new = [(factory or _from_timm)(child) for _, _, child in found]
    for mod in new:
        if not isinstance(mod, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(mod).__name__}")
    for (parent, name, _), mod in zip(found, new, strict=True):
        setattr(parent, name, mod)
    return len(found)


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

    x: (N, in_channels, 32, 32) -> logits (N, num_classes). The groups ``layer1`` to
    ``layer3`` have ``width``, 2 ``width`` and 4 ``width`` channels and ``blocks`` basic
    residual blocks each (two 3 x 3 convolutions; the first block of layer2 and layer3
    halves the map), then global average pooling and the classifier ``fc``.
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
