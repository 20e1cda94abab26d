"""guidedrop.models with real torchvision and timm ResNets, and SmallResNet.

- ``insert`` puts each layer where its paper does (the placement table below), leaves the
  state_dict keys (pretrained checkpoints) unchanged, trains (forward + backward) and is
  the identity in eval mode;
- ``swap_timm_dropblock`` replaces timm's DropBlock2d, keeping its seed rate and block size.

Runs on the reference backend (as tests/test_training.py does).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import timm  # installed by [test], as torchvision
import torch
import torchvision
from torch import nn

import guidedrop
from guidedrop import models, primitives
from guidedrop.modules import GuidedDropout

LAYERS = models.LAYERS

# What the papers say (issue 5): groups of a 4-group ResNet -> block size (or None).
PLACEMENT_4 = {
    "corrdrop": {"layer1": 9, "layer2": 7, "layer3": 5},  # after the groups, 9/7/5
    "selectscale": {"layer3": None, "layer4": None},  # after the convs of the last groups
    "selectout": {"layer3": None, "layer4": None},
    "spatialscale": {"layer3": None, "layer4": None},
    "attentiondrop": {"layer1": None, "layer2": None},  # after layer1 and layer2
    "focused_dropout": {"layer3": None},  # after the penultimate group
    "camdrop": {"layer3": 5, "layer4": 5},  # the last groups, reading model.fc
    "dropblock": {"layer3": 7, "layer4": 7},  # groups 3-4
}
# A CIFAR ResNet has three groups: the same rules on layer1..layer3.
PLACEMENT_3 = {
    "corrdrop": {"layer1": 9, "layer2": 7, "layer3": 5},
    "selectscale": {"layer2": None, "layer3": None},
    "selectout": {"layer2": None, "layer3": None},
    "spatialscale": {"layer2": None, "layer3": None},
    "attentiondrop": {"layer1": None, "layer2": None},
    "focused_dropout": {"layer2": None},
    "camdrop": {"layer2": 5, "layer3": 5},
    "dropblock": {"layer2": 7, "layer3": 7},
}
CLASSES = {
    "corrdrop": guidedrop.CorrDrop, "selectscale": guidedrop.SelectScale,
    "selectout": guidedrop.Selectout, "spatialscale": guidedrop.SpatialScale,
    "attentiondrop": guidedrop.AttentionDrop, "focused_dropout": guidedrop.FocusedDropout,
    "camdrop": guidedrop.CamDrop, "dropblock": guidedrop.DropBlock2d,
}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")


def _timm():
    return timm


def resnet18(lib: str, **kw) -> nn.Module:
    if lib == "torchvision":
        return torchvision.models.resnet18(weights=None, num_classes=10)
    return _timm().create_model("resnet18", pretrained=False, num_classes=10, **kw)


def guided(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GuidedDropout)]


def placement(model) -> dict[str, list[tuple[type, int | None]]]:
    """group -> [(class, block_size or None)] of the guidedrop layers at its end."""
    out = {}
    for group in models.residual_groups(model):
        found = [(type(m), getattr(m, "block_size", None)) for m in getattr(model, group)
                 if isinstance(m, GuidedDropout)]
        if found:
            out[group] = found
    return out


def train_step(model, x, y):
    model.train()
    with guidedrop.cam_targets(model.fc, y):
        out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return out, loss


def data(n=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------- insert


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_insert_resnet18_placement(lib, layer):
    model = resnet18(lib)
    keys = list(model.state_dict())
    added = models.insert(model, layer)
    expected = {g: [(CLASSES[layer], b if b is not None else getattr(m, "block_size", None))]
                for (g, b), m in zip(PLACEMENT_4[layer].items(), added, strict=True)}
    assert placement(model) == expected
    assert all(getattr(model, g)[-1] is m for g, m in zip(PLACEMENT_4[layer], added, strict=True))
    assert list(model.state_dict()) == keys  # pretrained checkpoints still load


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_every_layer_in_one_resnet18_trains(lib):
    """Every layer inserted: a training step (forward + backward) runs, eval mode is the
    identity (the same output as the model without the layers)."""
    model = resnet18(lib)
    plain = copy.deepcopy(model)
    for layer in LAYERS:
        models.insert(model, layer)
    assert len(guided(model)) == sum(len(v) for v in PLACEMENT_4.values())
    for _, m in guided(model):
        if isinstance(m, guidedrop.FocusedDropout):
            m.participation = 1.0
    seen = []
    for _, m in guided(model):
        m.register_forward_hook(lambda mod, args, out: seen.append((mod, out is not args[0])))

    x, y = data()
    out, loss = train_step(model, x, y)
    assert out.shape == (2, 10) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # every layer acted, but CamDrop: its block 5 does not fit the 4 x 4 and 2 x 2 maps of
    # layer3 / layer4 at this input size (see test_camdrop_reads_fc)
    assert all(acted != isinstance(mod, guidedrop.CamDrop) for mod, acted in seen)

    model.eval()
    plain.eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    model.train()
    with pytest.raises(RuntimeError, match="cam_targets"):  # CamDrop needs its targets
        model(x)


def test_camdrop_reads_fc():
    """CamDrop in layer3 / layer4 of a torchvision ResNet reads model.fc (512 weights per
    class, averaged in pairs for layer3's 256 channels) through cam_targets. Block 1 so
    that it acts on the small maps of a 64 x 64 input."""
    model = resnet18("torchvision")
    added = models.insert(model, "camdrop", lambda i, n: guidedrop.CamDrop(1, keep=0.5))
    seen = []
    for m in added:
        m.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    x, y = data()
    train_step(model, x, y)
    assert [inp.shape[1] for inp, _ in seen] == [256, 512]
    for inp, out in seen:
        assert ((out == 0) & (inp != 0)).any()


def test_small_resnet_placement():
    """3-group CIFAR ResNet: CorrDrop after every group with blocks 9/7/5."""
    for layer in LAYERS:
        model = models.SmallResNet()
        models.insert(model, layer)
        got = placement(model)
        assert set(got) == set(PLACEMENT_3[layer]), layer
        for g, block in PLACEMENT_3[layer].items():
            assert got[g][0][0] is CLASSES[layer]
            if block is not None:
                assert got[g][0][1] == block


def test_insert_factory_and_errors():
    model = resnet18("torchvision")
    added = models.insert(model, "dropblock", lambda i, n: guidedrop.DropBlock2d(0.2, 3))
    assert [(m.p, m.block_size) for m in added] == [(0.2, 3), (0.2, 3)]
    with pytest.raises(ValueError, match="layer must be one of"):
        models.insert(model, "dropout")
    with pytest.raises(ValueError, match="residual groups"):
        models.insert(nn.Sequential(nn.Conv2d(3, 3, 1)), "corrdrop")
    # the same insert again would stack a second layer after the first: refused
    with pytest.raises(ValueError, match="layer3 already holds a DropBlock2d"):
        models.insert(model, "dropblock")
    # also with another layer after it (it stacked: DropBlock2d, CamDrop, DropBlock2d)
    models.insert(model, "camdrop")
    with pytest.raises(ValueError, match="layer3 already holds a DropBlock2d"):
        models.insert(model, "dropblock")
    # (swap_timm_dropblock makes DropBlock2d only: named for it alone)
    with pytest.raises(ValueError, match=r"layer3 already holds a CamDrop: .*\(the same "
                                         r"insert twice\?\)$"):
        models.insert(model, "camdrop")
    with pytest.raises(TypeError, match="layer must be a str"):
        models.insert(model, ["dropblock"])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        models.insert("resnet18", "dropblock")
    # a factory failing at the second position leaves the first group as it was
    model = resnet18("torchvision")
    lengths = [len(model.layer3), len(model.layer4)]

    def second_fails(i, n):
        if i == 1:
            raise RuntimeError("no second layer")
        return guidedrop.DropBlock2d()
    with pytest.raises(RuntimeError, match="no second layer"):
        models.insert(model, "dropblock", second_fails)
    assert [len(model.layer3), len(model.layer4)] == lengths
    # a factory returning no module: refused before any group changes (layer3 took the
    # first, a str was refused by nn.Sequential at the second; None went in unnoticed)
    for bad in ("x", None):
        with pytest.raises(TypeError, match=f"factory must return an nn.Module, got "
                                            f"{type(bad).__name__} for layer4"):
            models.insert(model, "dropblock",
                          lambda i, n, bad=bad: guidedrop.DropBlock2d() if i == 0 else bad)
        assert [len(model.layer3), len(model.layer4)] == lengths


@pytest.mark.parametrize("training", [True, False])
def test_insert_keeps_the_model_mode(training):
    """Layers added to a model in eval mode are in eval mode (they were in training mode:
    a pretrained model's inference became random)."""
    model = resnet18("torchvision").train(training)
    assert all(m.training is training for m in models.insert(model, "dropblock"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) is not training


# --------------------------------------------------------------------------- timm


def test_insert_dropblock_refuses_timms_dropblock():
    """insert(model, "dropblock") into a timm model built with drop_block_rate stacked a
    second DropBlock on timm's (a new user's finding): a ValueError that points to
    swap_timm_dropblock, the model unchanged; other layers, or a factory, still insert."""
    model = resnet18("timm", drop_block_rate=0.1)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="timm's DropBlock2d .*swap_timm_dropblock"):
        models.insert(model, "dropblock")
    assert [type(m) for m in model.modules()] == before
    assert models.insert(model, "corrdrop")
    assert models.insert(model, "dropblock", factory=lambda i, n: guidedrop.DropBlock2d(p=0.05))
    swapped = resnet18("timm", drop_block_rate=0.1)
    models.swap_timm_dropblock(swapped)
    with pytest.raises(ValueError, match=r"already holds a DropBlock2d.*\(the same insert "
                                         r"twice, or after swap_timm_dropblock\?\)"):
        models.insert(swapped, "dropblock")  # layer3 and layer4 hold guidedrop's now
    # other modules are checked among the group's own children only (the blocks hold ReLUs),
    # and never against the group itself
    for make in (nn.ReLU, lambda: nn.Sequential(guidedrop.CorrDrop())):
        assert models.insert(resnet18("timm"), "corrdrop", factory=lambda i, n, make=make: make())


def test_swap_timm_dropblock():
    timm = _timm()
    model = resnet18("timm", drop_block_rate=0.1)
    olds = {name: m for name, m in model.named_modules()
            if isinstance(m, timm.layers.DropBlock2d)}
    assert olds  # timm puts DropBlock in the blocks of layer3 and layer4
    keys = list(model.state_dict())
    x, y = data()
    model.eval()
    with torch.no_grad():
        before = model(x)

    assert models.swap_timm_dropblock(model) == len(olds)
    modules = dict(model.named_modules())
    for name, old in olds.items():
        new = modules[name]
        assert type(new) is guidedrop.DropBlock2d
        # timm multiplies its seed rate by gamma_scale (0.25 in layer3): the same seeds
        assert (new.p, new.block_size, new.shared_channels) == (
            min(1.0, old.drop_prob * old.gamma_scale), old.block_size, old.couple_channels)
    assert any(old.gamma_scale != 1 for old in olds.values())
    assert not any(isinstance(m, timm.layers.DropBlock2d) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert models.swap_timm_dropblock(model) == 0

    with torch.no_grad():
        assert torch.equal(model(x), before)  # eval: the identity, before and after
    out, loss = train_step(model, x, y)
    assert torch.isfinite(loss)


TIMM_CASES = [
    # timm settings -> (p, block_size, shared_channels, normalize) of guidedrop's layer
    (dict(), (0.1, 7, True, "batch")),
    (dict(scale_by_keep=False), (0.1, 7, True, "none")),
    (dict(couple_channels=False, drop_prob=0.2, gamma_scale=0.25, block_size=5),
     (0.05, 5, False, "batch")),
    (dict(inplace=True, block_size=3), (0.1, 3, True, "batch")),
]


@pytest.mark.parametrize("settings, expected", TIMM_CASES)
def test_swap_timm_dropblock_maps_every_setting(settings, expected):
    """Each timm setting is mapped: scale_by_keep=False used to become a normalising layer."""
    timm = _timm()
    old = timm.layers.DropBlock2d(**settings)
    model = nn.Sequential(nn.Identity(), old).eval()
    assert models.swap_timm_dropblock(model) == 1
    new = model[1]
    assert (new.p, new.block_size, new.shared_channels, new.normalize) == expected
    assert not new.training  # the model's mode is kept
    if not settings.get("scale_by_keep", True):
        # timm's scale_by_keep=False: every unit is 0 or x itself, never rescaled
        new.train()
        x = torch.rand(2, 3, 8, 8) + 1
        y = new(x)
        assert ((y == 0) | (y == x)).all() and (y == 0).any()


@pytest.mark.parametrize("settings, setting", [
    (dict(with_noise=True), "with_noise"), (dict(drop_prob=0.9, gamma_scale=2.0), "gamma_scale"),
    ("unknown", "new_setting")])
def test_swap_timm_dropblock_refuses_what_it_cannot_map(settings, setting):
    timm = _timm()
    if settings == "unknown":  # a setting of a later timm
        old = timm.layers.DropBlock2d()
        old.new_setting = 3
    else:
        old = timm.layers.DropBlock2d(**settings)
    kept = timm.layers.DropBlock2d()
    model = nn.Sequential(kept, old)
    with pytest.raises(ValueError, match=setting):
        models.swap_timm_dropblock(model)
    assert model[0] is kept and model[1] is old  # nothing replaced
    assert models.swap_timm_dropblock(model, factory=lambda m: nn.Identity()) == 2


# --------------------------------------------------------------------------- torch.fx

from test_api import every_backend  # noqa: E402, F401, F811 (a fixture)
from test_block_faults import layer_case  # noqa: E402
from testing import CUDA, DEV, TRITON_SLOW, force_backend  # noqa: E402


def test_symbolic_trace_leaf():
    """Like nn.Dropout, each layer is one call_module node under torch.fx."""
    for layer in models.LAYERS:
        mod = models.PLACEMENTS[layer][1](0, 1)
        gm = torch.fx.symbolic_trace(nn.Sequential(mod))
        ops = [(n.op, n.target) for n in gm.graph.nodes]
        assert ops[1] == ("call_module", "0") and len(ops) == 3, (layer, ops)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated in 2.14
@pytest.mark.parametrize("layer", models.LAYERS)
def test_eval_model_exports(layer):
    """Deployment: a model in eval mode exports with torch.export and torch.jit.trace, the
    layer gone from the graph (it is the identity), as nn.Dropout does."""
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), models.PLACEMENTS[layer][1](0, 1))
    model.eval()
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(0))
    exported = torch.export.export(model, (x,))
    ops = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.aten.conv2d.default], (layer, ops)
    assert torch.equal(exported.module()(x), model(x))
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("layer", [name for name in models.LAYERS if name != "camdrop"])
def test_train_model_exports_with_dynamic_sizes(layer):
    """In train mode torch.export keeps the layer, drawing fresh masks at each call, equal
    to eager's from the same seed, for every N, H and W of the export's ranges (both sides
    symbolic; H and W from the largest block up: maps smaller than the block are the other
    side of a guard, test_train_export_below_the_block; AttentionDrop's n_β is one per map
    size, so its H and W
    stay static). A helper's attack: Python's max of H and W guarded W <= H (FocusedDropout,
    CorrDrop), and CorrDrop's ceil_mode pooling guarded a relation export could not prove."""
    mod = models.PLACEMENTS[layer][1](0, 1).train()  # CorrDrop's block 9, DropBlock's 7
    # FocusedDropout at every step (its mask is x's own: only whether it applies is drawn)
    mod.drop_rate = {"selectout": 0.1, "focused_dropout": 1.0}.get(layer, 0.3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), mod)  # Selectout: 2 of 3 drawn
    dims = {0: torch.export.Dim("n", min=2, max=16)}
    shapes = [(2, 11, 11), (3, 11, 11)]
    if layer != "attentiondrop":  # from 10: one window of 9 has a side of 1 (Dynamo's guard)
        dims |= {2: torch.export.Dim("h", min=10, max=64),
                 3: torch.export.Dim("w", min=10, max=64)}
        shapes += [(2, 10, 17), (4, 17, 10), (2, 11, 63), (3, 30, 31)]
    exported = torch.export.export(model, (torch.randn(2, 3, 11, 11),),
                                   dynamic_shapes={"input": dims})
    for seed, (n, h, w) in enumerate(shapes):
        x = torch.randn(n, 3, h, w)
        torch.manual_seed(seed)
        y = exported.module()(x)
        torch.manual_seed(seed)
        assert torch.equal(y, model(x)), (layer, n, h, w)
    if layer != "focused_dropout":
        torch.manual_seed(2)
        assert not torch.equal(exported.module()(x), exported.module()(x))  # fresh masks


class _CamDropOp(nn.Module):
    """CamDrop for torch.export: the functional op, the targets an input (the module refuses
    export in train mode, test_camdrop_module_export_refused_functional_exports)."""

    def __init__(self, block_size):
        super().__init__()
        self.fc, self.block_size = nn.Linear(16, 5), block_size

    def forward(self, x, target):
        return guidedrop.functional.camdrop(x, self.fc.weight, target, self.block_size, 0.5)


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA])
@pytest.mark.parametrize("layer", models.LAYERS)
def test_train_export_backward_matches_eager(layer, backend, monkeypatch):
    """A program exported in train mode trains on every backend (CUDA's sources on the
    emulator without a GPU): each functional op with its noise an input of the program,
    its output, the gradients of the input and of the conv's weight, and a second-order
    gradient equal eager's. A helper's attack: the exported graph holds the bare apply op
    (torch.export inlines the layer's autograd Function), which had no autograd formula
    on the kernel backends ("no autograd formula was registered" at backward)."""
    force_backend(backend, monkeypatch)
    n, c, h, w = 2, 8, 7, 9
    params, kw, noise_shape = layer_case(layer, n, c, h, w)  # tensors on DEV
    op = getattr(guidedrop.functional, layer)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)

        def forward(self, input, noise):
            return op(self.conv(input), *params, noise=noise, **kw)

    model = Model().to(DEV)
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(n, 3, h, w, generator=gen).to(DEV),
            torch.rand(noise_shape, generator=gen).to(DEV))
    program = torch.export.export(model, args)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert backend == "reference" or any(".apply_" in t for t in targets), targets
    results = []
    # cuDNN's weight gradients may differ run to run (atomics): one algorithm, as eager's
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for run in (program.module(), model):
            x = args[0].clone().requires_grad_()
            y = run(x, args[1])
            gx, gw = torch.autograd.grad(y.square().sum(), (x, model.conv.weight),
                                         create_graph=True)
            (ggx,) = torch.autograd.grad(gw.square().sum(), x)  # through the backward's apply
            results.append((y, gx, gw, ggx))
    for got, want, what in zip(*results, ("y", "grad x", "grad weight", "grad^2 x"), strict=True):
        assert torch.equal(got, want), (layer, what)
    assert not torch.equal(results[1][0], model.conv(args[0]))  # the layer acted


@pytest.mark.parametrize("layer", ["corrdrop", "dropblock", "camdrop"])
def test_train_export_below_the_block(layer, every_backend):  # noqa: F811 (the fixture)
    """Exported from a map smaller than the block, the program serves every map smaller than
    it, equal to eager from the same seed: one guard, the map within the block or not, as
    under torch.compile (a larger map is its other side). A helper's attack:
    CorrDrop's export pinned max(H, W) to the example's (avg_pool2d's symbolic window,
    apply_block's int(k)), DropBlock's and CamDrop's which of H and W is smaller (Python's
    min, r > H or r > W)."""
    auto = torch.export.Dim.AUTO
    dims = {"input": {0: auto, 2: auto, 3: auto}}
    if layer == "camdrop":  # block 5 (the identity below it)
        mod, dims["target"] = _CamDropOp(5), {0: auto}
    else:
        mod = models.PLACEMENTS[layer][1](0, 1).train()  # CorrDrop's block 9, DropBlock's 7
        mod.drop_rate = 0.3

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mod = nn.Conv2d(3, 16, 3, padding=1), mod

        def forward(self, input, target=None):
            x = self.conv(input)
            return self.mod(x) if target is None else self.mod(x, target)

    def args(n, h, w):
        x = torch.randn(n, 3, h, w)
        return (x, torch.arange(n) % 5) if layer == "camdrop" else (x,)

    model = Model()
    exported = torch.export.export(model, args(2, 5, 4), dynamic_shapes=dims)
    for seed, (n, h, w) in enumerate([(3, 5, 4), (2, 4, 4), (2, 4, 3), (4, 2, 5)]):
        a = args(n, h, w)
        torch.manual_seed(seed)
        y = exported.module()(*a)
        torch.manual_seed(seed)
        assert torch.equal(y, model(*a)), (layer, n, h, w)
    with pytest.raises(AssertionError, match="Guard failed"):
        exported.module()(*args(2, 11, 11))


def test_compiled_block_size_argument(every_backend):  # noqa: F811 (the fixture)
    """A block size that torch.compile makes symbolic (an argument of the compiled function,
    dynamic=True) is not taken for one window: the pooled map stays (ceil(H/k), ceil(W/k))
    (a review's find: the Triton fakes said (1, 1), "shape '[2, 1]' is invalid for input of
    size 40"), and a map within the block is still one window."""
    def f(x, k, noise):  # F's rows summed: a view of the pooled map the graph traced
        return (primitives.pooled_correlation(x, k).flatten(1).sum(1),
                guidedrop.functional.corrdrop(x, 0.3, k, noise=noise))

    x = torch.randn(2, 3, 9, 8)
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for k in (2, 3, 9, 20):
        noise = torch.rand(2, 2, -(-9 // k), -(-8 // k))
        for got, want in zip(compiled(x, k, noise), f(x, k, noise), strict=True):
            assert torch.equal(got, want), k


def test_camdrop_module_export_refused_functional_exports():
    """CamDrop's module reads its targets from cam_targets at each call: an exported program
    kept the export's labels as a constant (and ran outside any block), so torch.export of
    it in train mode is a RuntimeError that says what to do instead. The functional op, the
    targets an input of the model, exports and follows them."""
    fc = nn.Linear(6, 5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), guidedrop.CamDrop(3, 0.5)).train()
    x = torch.randn(2, 3, 8, 8)
    with guidedrop.cam_targets(fc, torch.tensor([0, 0])), \
            pytest.raises(RuntimeError, match="torch.export cannot keep CamDrop's targets"):
        torch.export.export(model, (x,))

    class Functional(nn.Module):
        def forward(self, x, target):
            return guidedrop.functional.camdrop(model[0](x), fc.weight, target, 3, 0.5)

    exported = torch.export.export(Functional(), (x, torch.tensor([0, 0])))
    for target in ([2, 4], [1, 3]):
        target = torch.tensor(target)
        torch.manual_seed(1)
        y = exported.module()(x, target)
        torch.manual_seed(1)
        assert torch.equal(y, Functional()(x, target))
    torch.manual_seed(1)
    assert not torch.equal(y, exported.module()(x, torch.tensor([0, 0])))  # not baked in


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("layer", models.LAYERS)
def test_jit_trace_in_training_mode_says_why(layer):
    """torch.jit.trace of a layer that acts (training mode) is a RuntimeError that says to
    trace in eval mode or to use torch.export / torch.compile: it failed with
    ``unordered_map::at`` or a TypeError, and FocusedDropout's module would have baked its
    participation draw into the trace. In eval mode the functional op traces as the
    identity (CamDrop's and Selectout's checks read sizes, which a trace makes tensors:
    they raised TypeError)."""
    mod = models.PLACEMENTS[layer][1](0, 1)
    mod.drop_rate = {"camdrop": 0.9, "selectout": 0.1}.get(layer, 0.5)
    fc = nn.Linear(6, 4)
    x = torch.randn(2, 6, 9, 9)
    with guidedrop.cam_targets(fc, torch.tensor([1, 3])), \
            pytest.raises(RuntimeError, match="torch.jit.trace cannot record .* eval mode"):
        torch.jit.trace(mod.train(), x)
    # CamDrop outside a cam_targets block too (it said only that no block was open)
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record .* eval mode"):
        torch.jit.trace(mod.train(), x)
    op = getattr(guidedrop.functional, layer)
    cam = (fc.weight.detach(), torch.tensor([1, 3])) if layer == "camdrop" else ()
    traced = torch.jit.trace(lambda t: op(t, *cam, training=False) * 2, x)
    assert torch.equal(traced(x + 1), (x + 1) * 2)
    # where the layer is the identity in training mode too, it traces as one: a zero rate
    # (FocusedDropout's participation 0 raised here once), an empty batch
    mod.drop_rate = 0
    assert torch.equal(torch.jit.trace(mod.train(), x)(x + 1), x + 1)
    if layer != "camdrop":  # (its target's length is N)
        empty = x[:0]
        assert torch.jit.trace(lambda t: op(t) * 2, empty)(empty).shape == empty.shape


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("layer", models.LAYERS)
def test_jit_script_says_why(layer):
    """torch.jit.script of a model holding a layer (either mode) is a RuntimeError that says
    what to do instead: it was TorchScript's "Expected a single top-level function"."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), models.PLACEMENTS[layer][1](0, 1))
    for mode in (True, False):
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile .* eval mode"):
            torch.jit.script(model.train(mode))


@pytest.mark.parametrize("layer", models.LAYERS)
def test_symbolic_trace_root(layer):
    """A layer traced by itself (symbolic_trace(layer)) has no module path to call (it
    raised AttributeError: no attribute ''): like nn.Dropout's, its graph is the functional
    op with the mode and rates of the trace, whose checks and draws run with the graph:
    FocusedDropout's participation, CamDrop's cam_targets read when the graph runs."""
    mod = models.PLACEMENTS[layer][1](0, 1)
    # rates that drop within 6 seeds (Selectout's under its top rate), FocusedDropout both ways
    mod.drop_rate = {"camdrop": 0.9, "selectout": 0.1}.get(layer, 0.5)
    fc = nn.Linear(6, 4)
    for train in (True, False):
        mod.train(train)
        gm = torch.fx.symbolic_trace(mod)
        assert all(n.op != "call_module" for n in gm.graph.nodes), (layer, gm.graph)
        # pickling traces gm's code again: CamDrop's block read stays a node (it was read
        # then: outside a block a RuntimeError, inside one its tensors baked in)
        gm = pickle.loads(pickle.dumps(gm))
        applied = 0
        for seed in range(6):
            x = torch.randn(2, 6, 13, 13, generator=torch.Generator().manual_seed(seed))
            with guidedrop.cam_targets(fc, torch.tensor([seed % 4, 3])):
                torch.manual_seed(seed)
                eager = mod(x)
                torch.manual_seed(seed)
                out = gm(x)
            assert torch.equal(out, eager), (layer, train, seed)
            applied += not torch.equal(out, x)
        assert (applied > 0) == train, (layer, train)  # it runs in training only


@pytest.mark.parametrize("every_backend", ["reference", TRITON_SLOW, CUDA], indirect=True)
@pytest.mark.parametrize("layer", models.LAYERS)
def test_create_feature_extractor(every_backend, layer):  # noqa: F811 (the fixture)
    """torchvision's create_feature_extractor on a ResNet holding each layer (it used to
    raise on x being a Proxy): the layers are leaf nodes, and the traced model computes
    what the eager one computes, in train and in eval mode."""
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    model = resnet18("torchvision")
    added = models.insert(model, layer)
    traced = fe.create_feature_extractor(model, {"fc": "out", "layer3": "l3"})
    names = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    paths = {name for name, m in model.named_modules() if any(m is a for a in added)}
    assert paths <= names  # each guidedrop layer is one call_module node
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    for train in (True, False):
        model.train(train), traced.train(train)
        with torch.no_grad(), guidedrop.cam_targets(model.fc, y):
            torch.manual_seed(5)
            eager = model(x)
            torch.manual_seed(5)
            out = traced(x)["out"]
        assert torch.equal(out, eager), (layer, train)


def test_swap_timm_dropblock_refuses_bad_arguments():
    """A model that is not a module, or a factory that makes no module: TypeError naming
    it, nothing replaced (as insert)."""
    timm = _timm()
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        models.swap_timm_dropblock(3)
    old = timm.layers.DropBlock2d()
    model = nn.Sequential(old)
    with pytest.raises(TypeError, match="factory must return an nn.Module, got float"):
        models.swap_timm_dropblock(model, factory=lambda m: 0.5)
    assert model[0] is old
