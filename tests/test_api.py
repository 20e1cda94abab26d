"""Public API: argument validation (SPEC §1), modules, CamDrop wiring, schedules."""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import math
import pickle
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import guidedrop
import guidedrop.functional as F
from guidedrop import context, dispatch

X = (2, 4, 6, 6)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests pin the reference path (issue 2); kernel backends have their own tests."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")


def _x(shape=X):
    return torch.randn(shape)


def _cam(shape=X, c_fc=None):
    return torch.randn(5, c_fc or shape[1]), torch.zeros(shape[0], dtype=torch.long)


# Every op with arguments that make it valid; each bad case overrides one keyword.
OPS = {
    "corrdrop": (F.corrdrop, dict(p=0.3, block_size=3)),
    "selectscale": (F.selectscale, dict(top_rate=0.5, retain=0.2)),
    "spatialscale": (F.spatialscale, dict(retain=0.2)),
    "selectout": (F.selectout, dict(top_rate=0.5, keep=0.8)),
    "attentiondrop": (F.attentiondrop, dict(alpha=0.5, beta=30.0)),
    "focused_dropout": (F.focused_dropout, dict(low=0.3, high=0.6)),
    "camdrop": (F.camdrop, dict(block_size=3, keep=0.5)),
    "dropblock": (F.dropblock, dict(p=0.3, block_size=3)),
}


def call(name, x=None, **override):
    op, kw = OPS[name]
    x = _x() if x is None else x
    kw = {**kw, **override}
    if name == "camdrop":
        ok = isinstance(x, torch.Tensor) and x.dim() == 4
        weight, target = _cam(tuple(x.shape) if ok else X)
        weight = kw.pop("weight", weight)
        target = kw.pop("target", target)
        return op(x, weight, target, **kw)
    return op(x, **kw)


BAD = [
    # (op, override, exception, what the message starts with: the argument's name)
    ("corrdrop", dict(p=-0.1), ValueError, "p"),
    ("corrdrop", dict(p=1.5), ValueError, "p"),
    ("corrdrop", dict(p=float("nan")), ValueError, "p"),
    ("corrdrop", dict(p="0.1"), TypeError, "p"),
    ("corrdrop", dict(block_size=0), ValueError, "block_size"),
    ("corrdrop", dict(block_size=-3), ValueError, "block_size"),
    ("corrdrop", dict(block_size=2.5), TypeError, "block_size"),
    ("corrdrop", dict(block_size="7"), TypeError, "block_size"),
    ("corrdrop", dict(normalize="batchwise"), ValueError, "normalize"),
    ("selectscale", dict(top_rate=1.2), ValueError, "top_rate"),
    ("selectscale", dict(top_rate=-0.2), ValueError, "top_rate"),
    ("selectscale", dict(retain=-0.1), ValueError, "retain"),
    ("selectscale", dict(retain=1.1), ValueError, "retain"),
    ("spatialscale", dict(retain=2.0), ValueError, "retain"),
    ("spatialscale", dict(retain=[0.1]), TypeError, "retain"),
    ("selectout", dict(keep=0.0), ValueError, "keep"),
    ("selectout", dict(keep=1.2), ValueError, "keep"),
    ("selectout", dict(top_rate=1.5), ValueError, "top_rate"),
    # n_d = round(0.5 * 4) = 2 > n_t = max(1, round(0.1 * 4)) = 1
    ("selectout", dict(top_rate=0.1, keep=0.5), ValueError,
     r"selectout drops round\(\(1 - keep\) \* C\) = 2 channels, more than the 1 candidates of "
     r"top_rate=0.1"),
    ("attentiondrop", dict(alpha=1.5), ValueError, "alpha"),
    ("attentiondrop", dict(alpha=-1e-3), ValueError, "alpha"),
    ("attentiondrop", dict(beta=0.0), ValueError, "beta"),
    ("attentiondrop", dict(beta=100.5), ValueError, "beta"),
    ("attentiondrop", dict(beta=-5.0), ValueError, "beta"),
    ("attentiondrop", dict(mode="bd"), ValueError, "mode"),
    ("attentiondrop", dict(mode=1), TypeError, "mode"),  # a wrong type: TypeError (SPEC §1)
    ("corrdrop", dict(normalize=None), TypeError, "normalize"),
    ("attentiondrop", dict(normalize="per-sample"), ValueError, "normalize"),
    ("focused_dropout", dict(low=-0.1), ValueError, "low"),
    ("focused_dropout", dict(high=1.5), ValueError, "high"),
    ("focused_dropout", dict(low=0.7, high=0.3), ValueError, "low|high"),
    ("camdrop", dict(block_size=0), ValueError, "block_size"),
    ("camdrop", dict(block_size=2.0), TypeError, "block_size"),
    ("camdrop", dict(keep=1.5), ValueError, "keep"),
    ("camdrop", dict(keep=-0.5), ValueError, "keep"),
    ("camdrop", dict(channel_rate=1.5), ValueError, "channel_rate"),
    ("camdrop", dict(normalize="bad"), ValueError, "normalize"),
    # C_fc = 6 is not a multiple of C = 4
    ("camdrop", dict(weight=torch.randn(5, 6)), ValueError, "weight has C_fc=6 columns"),
    ("camdrop", dict(target=None), ValueError, "camdrop needs the classifier weight and the"),
    ("camdrop", dict(weight=None), ValueError, "camdrop needs the classifier weight and the"),
    ("dropblock", dict(p=2.0), ValueError, "p"),
    ("dropblock", dict(block_size=0), ValueError, "block_size"),
    ("dropblock", dict(block_size=3.0), TypeError, "block_size"),
    ("dropblock", dict(normalize="all"), ValueError, "normalize"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD,
                         ids=[f"{b[0]}-{list(b[1])[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments(name, override, exc, match):
    # the message starts with it ("p must be ..."), not merely holds it: "x" or "p" is in
    # many a message (Python's "expected 4" of an unpacking)
    with pytest.raises(exc, match=rf"^(?:{match})\b"):
        call(name, **override)


@pytest.mark.parametrize("name", ["corrdrop", "camdrop", "dropblock"])
def test_block_size_one_is_allowed(name):
    """block_size is an integer >= 1 (SPEC §1): the lowest value, 1 (single-unit blocks),
    is valid in the functional op and the module, and 0 is not."""
    assert call(name, block_size=1).shape == X
    assert call(name, block_size=np.int64(1)).shape == X
    with pytest.raises(ValueError, match="^block_size must be >= 1"):
        call(name, block_size=0)
    cls = {"corrdrop": guidedrop.CorrDrop, "camdrop": guidedrop.CamDrop,
           "dropblock": guidedrop.DropBlock2d}[name]
    m = cls(block_size=1)
    x = _x()
    if name == "camdrop":
        with guidedrop.cam_targets(*_cam(tuple(x.shape))):
            assert m(x).shape == x.shape
    else:
        assert m(x).shape == x.shape


@pytest.mark.parametrize("name", list(OPS))
def test_bad_x(name):
    with pytest.raises(ValueError, match="^x must be 4-D"):
        call(name, x=torch.randn(4, 6, 6))          # 3-D
    with pytest.raises(ValueError, match="^x must be 4-D"):
        call(name, x=torch.randn(1, 2, 4, 6, 6))    # 5-D
    with pytest.raises(TypeError, match="^x must be a floating tensor"):
        call(name, x=torch.ones(X, dtype=torch.int64))
    with pytest.raises(TypeError, match="^x must be a floating tensor"):
        call(name, x=torch.ones(X, dtype=torch.bool))
    with pytest.raises(TypeError, match="^x must be a torch.Tensor"):
        call(name, x=[[1.0]])


NOISE_SHAPES = {
    "corrdrop": (2, 2, 2, 2),        # x (2, 4, 6, 6), block 3 -> (2, N, 2, 2)
    "selectscale": (2, 4),
    "spatialscale": (2, 4),
    "selectout": (2, 4),
    "attentiondrop": (2, 4),
    "focused_dropout": (2,),
    "camdrop": X,
    "dropblock": X,
}


@pytest.mark.parametrize("name", list(OPS))
def test_noise_checks(name):
    good = NOISE_SHAPES[name]
    call(name, noise=torch.rand(good))                 # the right shape works
    wrong = (good[0] + 1,) + tuple(good[1:])
    with pytest.raises(ValueError, match="noise"):
        call(name, noise=torch.rand(wrong))
    with pytest.raises(ValueError, match="noise"):
        call(name, noise=torch.rand(good + (1,)))
    with pytest.raises(ValueError, match="noise"):
        call(name, noise=torch.rand(good, device="meta"))
    with pytest.raises(TypeError, match="noise"):
        call(name, noise=torch.zeros(good, dtype=torch.int64))
    with pytest.raises(TypeError, match="^noise must be a torch.Tensor or None, got list"):
        call(name, noise=torch.rand(good).tolist())


def test_noise_shape_variants():
    x = _x()
    with pytest.raises(ValueError, match="noise"):   # per_position wants (N, H, W)
        F.focused_dropout(x, per_position=True, noise=torch.rand(2))
    F.focused_dropout(x, per_position=True, noise=torch.rand(2, 6, 6))
    with pytest.raises(ValueError, match="noise"):   # shared channels want (N, 1, H, W)
        F.dropblock(x, 0.3, 3, shared_channels=True, noise=torch.rand(X))
    F.dropblock(x, 0.3, 3, shared_channels=True, noise=torch.rand(2, 1, 6, 6))
    # CorrDrop's pooled grid uses ceil: 7 x 5 with block 3 -> (2, N, 3, 2)
    F.corrdrop(torch.randn(2, 4, 7, 5), 0.3, 3, noise=torch.rand(2, 2, 3, 2))
    with pytest.raises(ValueError, match="noise"):
        F.corrdrop(torch.randn(2, 4, 7, 5), 0.3, 3, noise=torch.rand(2, 2, 2, 1))


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_meta_device(name, memory_format, monkeypatch):
    """Training mode on a meta tensor (shape inference, deferred initialisation) gives
    x's shape, device and memory format and a gradient of that shape, as
    nn.functional.dropout does, with the default backend choice (found by a helper: the
    ops turned torch.autocast off on the meta device, which has none: RuntimeError)."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "auto")
    x = torch.empty(2, 8, 7, 7, device="meta").to(memory_format=memory_format)
    x.requires_grad_()
    if name == "camdrop":
        weight, target = (t.to("meta") for t in _cam(tuple(x.shape)))
        y = call(name, x, weight=weight, target=target)
    else:
        y = call(name, x)
    assert y.shape == x.shape and y.device == x.device
    assert y.is_contiguous(memory_format=memory_format)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape and g.device == x.device


def test_meta_device_primitives(monkeypatch):
    from guidedrop import primitives as P
    monkeypatch.setenv("GUIDEDROP_BACKEND", "auto")  # the README: auto takes the reference
    x = torch.empty(2, 8, 7, 7, device="meta")
    assert P.pooled_correlation(x, 3).shape == (2, 3, 3)
    for f in (P.channel_max, P.channel_mean, lambda x: P.top_percentile_threshold(x, 20.0)):
        assert f(x).shape == (2, 8) and f(x).device == x.device


def test_rates_checked_in_eval_too():
    """Like torch.nn.functional.dropout, a bad rate is an error in eval mode as well."""
    with pytest.raises(ValueError, match="p"):
        F.corrdrop(_x(), p=1.5, training=False)
    with pytest.raises(ValueError, match="beta"):
        F.attentiondrop(_x(), beta=0.0, training=False)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("training", ["False", 0.5, None, 1, torch.tensor(True)])
def test_training_must_be_a_bool(name, training):
    """As for F.dropout, training is a bool (numpy's too): "False", 0.5 or None used to be
    taken by truth value, so the string "False" trained."""
    with pytest.raises(TypeError, match="^training must be a bool"):
        call(name, training=training)
    call(name, training=np.bool_(False))


def test_selectout_idle_compiles_to_nothing():
    """Compiled, Selectout in eval mode or with keep = 1 is x itself, as eager (SPEC §1: no
    kernel): the drop-count assertion was traced before the identity check (8 ops, one
    an asynchronous assertion, each eval forward)."""
    graphs = []

    def backend(gm, inputs):
        graphs.append([n for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    for kw in (dict(training=False), dict(keep=1.0)):
        torch._dynamo.reset()
        x = _x()
        y = torch.compile(functools.partial(F.selectout, **kw), backend=backend,
                          fullgraph=True)(x)
        assert y is x or torch.equal(y, x)
    torch._dynamo.reset()
    assert not any(graphs), graphs  # no graph, or graphs without a call


@pytest.mark.parametrize("name", OPS)
def test_backend_typo_is_an_error_where_nothing_runs(name, monkeypatch):
    """GUIDEDROP_BACKEND naming no backend is a ValueError also in eval mode, at a zero rate
    and on an empty x, where the op returns x without dispatching (it went unnoticed)."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "refernce")
    for x, kw in ((_x(), dict(training=False)), (_x((0, 4, 6, 6)), {})):
        with pytest.raises(ValueError, match="GUIDEDROP_BACKEND must be one of"):
            call(name, x, **kw)
    with pytest.raises(ValueError, match="GUIDEDROP_BACKEND must be one of"):
        F.attentiondrop(_x(), alpha=0.0)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    assert call(name, training=False).shape == X


def test_backend_typo_is_an_error_in_every_primitive(monkeypatch):
    """Every public primitive refuses a GUIDEDROP_BACKEND naming no backend, block_upsample
    too (torch code on every backend: it ignored the variable)."""
    from guidedrop import primitives as P
    monkeypatch.setenv("GUIDEDROP_BACKEND", "refernce")
    x = _x()
    for run in (lambda: P.pooled_correlation(x, 3), lambda: P.channel_max(x),
                lambda: P.channel_mean(x), lambda: P.top_percentile_threshold(x, 20),
                lambda: P.block_upsample(torch.ones(2, 2, 2, dtype=torch.bool), 3, 6, 6)):
        with pytest.raises(ValueError, match="GUIDEDROP_BACKEND must be one of"):
            run()


def test_backend_env_is_read_leniently(monkeypatch):
    """GUIDEDROP_BACKEND is read case-blind and stripped, and an empty value (``VAR= cmd``)
    is ``auto``: none of them is a typo's ValueError."""
    for value, name in (("", "auto"), ("  ", "auto"), ("AUTO", "auto"),
                        (" Reference ", "reference"), ("TRITON", "triton"), ("Cuda", "cuda")):
        monkeypatch.setenv("GUIDEDROP_BACKEND", value)
        assert dispatch.requested() == name, value
    monkeypatch.delenv("GUIDEDROP_BACKEND")
    assert dispatch.requested() == "auto"


def test_auto_takes_the_first_backend_that_takes_x(monkeypatch):
    """``auto`` goes through AUTO_ORDER (CUDA, then Triton: README) and takes the first
    backend that loads and does not refuse x, and the reference where none does. Fake
    backends, so that the rule is checked on a CPU machine too (there the CUDA one never
    loads)."""
    cuda = fake_backend("cuda", unsupported=lambda x: (
        "no float16" if x.dtype == torch.float16 else ""))
    triton = fake_backend("triton", unsupported=lambda x: (
        "no float64" if x.dtype == torch.float64 else ""))
    monkeypatch.setitem(dispatch._loaded, "cuda", (cuda, ""))
    monkeypatch.setitem(dispatch._loaded, "triton", (triton, ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", "auto")
    x = torch.zeros(1, 1, 1, 1)
    assert dispatch.backend_for(x) is cuda  # both take it: CUDA first
    assert dispatch.backend_for(x.half()) is triton  # CUDA refuses it
    cuda.unsupported = lambda x: "no float64"
    assert dispatch.backend_for(x.double()) is dispatch.reference  # neither takes it
    monkeypatch.setitem(dispatch._loaded, "cuda", (None, "not built"))
    assert dispatch.backend_for(x) is triton  # an unavailable one is passed over
    monkeypatch.setitem(dispatch._loaded, "triton", (None, "no GPU"))
    assert dispatch.backend_for(x) is dispatch.reference


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_forced_backend_fails_loudly_with_its_reason(name, monkeypatch):
    """GUIDEDROP_BACKEND=triton|cuda runs that backend or raises RuntimeError with the reason
    (it does not load here, or it refuses this x): never a silent fall back to another
    backend, as ``auto`` makes."""
    mod = fake_backend(name, unsupported=lambda x: (
        "x has dtype float64" if x.dtype == torch.float64 else ""))
    monkeypatch.setitem(dispatch._loaded, name, (mod, ""))
    monkeypatch.setenv("GUIDEDROP_BACKEND", name)
    x = torch.zeros(1, 1, 1, 1)
    assert dispatch.backend_for(x) is mod
    with pytest.raises(RuntimeError, match=f"GUIDEDROP_BACKEND={name}, but it cannot run here: "
                                           "x has dtype float64"):
        dispatch.backend_for(x.double())
    monkeypatch.setitem(dispatch._loaded, name, (None, "the reason it did not load"))
    with pytest.raises(RuntimeError, match="cannot run here: the reason it did not load"):
        dispatch.backend_for(x)


def test_available_backends_lists_those_that_load(monkeypatch):
    """guidedrop.available_backends(): the reference, then each kernel backend that loads,
    in dispatch's order; one that does not load (its reason given) is left out."""
    monkeypatch.setitem(dispatch._loaded, "triton", (fake_backend("triton"), ""))
    monkeypatch.setitem(dispatch._loaded, "cuda", (None, "guidedrop._C is not built"))
    assert guidedrop.available_backends() == ["reference", "triton"]
    monkeypatch.setitem(dispatch._loaded, "cuda", (fake_backend("cuda"), ""))
    assert guidedrop.available_backends() == ["reference", "triton", "cuda"]
    monkeypatch.setitem(dispatch._loaded, "triton", (None, "no GPU"))
    monkeypatch.setitem(dispatch._loaded, "cuda", (None, "no GPU"))
    assert guidedrop.available_backends() == ["reference"]


def test_load_reports_unavailable_and_broken_backends(monkeypatch):
    """dispatch.load: a backend module whose ``unavailable()`` gives a reason is (None, that
    reason), silently (no GPU is no fault); one that fails to import, also with a
    ModuleNotFoundError for a module other than its optional dependency (a broken install),
    is (None, why) with a RuntimeWarning, once, as ``auto`` would otherwise pass over it
    unseen."""
    monkeypatch.setattr(dispatch, "_loaded", dict(dispatch._loaded))  # restored whole
    idle = types.ModuleType("guidedrop_test_idle")
    idle.unavailable = lambda: "no GPU is visible"
    monkeypatch.setitem(sys.modules, "guidedrop_test_idle", idle)
    monkeypatch.setitem(dispatch.MODULES, "triton", "guidedrop_test_idle")
    dispatch._loaded.pop("triton", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.load("triton") == (None, "no GPU is visible")
    monkeypatch.setitem(dispatch.MODULES, "triton", "guidedrop_test_missing_dependency")
    del dispatch._loaded["triton"]
    with pytest.warns(RuntimeWarning, match=r"the triton backend is unavailable: "
                                            r"guidedrop_test_missing_dependency does not "
                                            r"import \(ModuleNotFoundError"):
        mod, why = dispatch.load("triton")
    assert mod is None and "ModuleNotFoundError" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.load("triton") == (None, why)  # once: the result is kept


# ------------------------------------------------------------------------ modules

MODULES = {
    guidedrop.CorrDrop: dict(p=0.1, block_size=7, normalize="batch"),
    guidedrop.SelectScale: dict(top_rate=0.2, retain=0.1),
    guidedrop.SpatialScale: dict(retain=0.4),
    guidedrop.Selectout: dict(top_rate=0.2, keep=0.9),
    guidedrop.AttentionDrop: dict(alpha=0.1, beta=20.0, mode="ad", normalize="batch"),
    guidedrop.FocusedDropout: dict(participation=0.1, low=0.3, high=0.6, per_position=False),
    guidedrop.CamDrop: dict(block_size=5, keep=0.9, channel_rate=0.125, normalize="batch"),
    guidedrop.DropBlock2d: dict(p=0.1, block_size=7, shared_channels=False, normalize="batch"),
}

# module -> (attribute, whether drop_rate = 1 - attribute)
RATE = {
    guidedrop.CorrDrop: ("p", False),
    guidedrop.DropBlock2d: ("p", False),
    guidedrop.AttentionDrop: ("alpha", False),
    guidedrop.FocusedDropout: ("participation", False),
    guidedrop.CamDrop: ("keep", True),
    guidedrop.SelectScale: ("retain", True),
    guidedrop.SpatialScale: ("retain", True),
    guidedrop.Selectout: ("keep", True),
}


@pytest.mark.parametrize("cls", list(MODULES), ids=lambda c: c.__name__)
def test_module_defaults_and_repr(cls):
    m = cls()
    for k, v in MODULES[cls].items():
        assert getattr(m, k) == pytest.approx(v) if isinstance(v, float) else getattr(m, k) == v
    r = repr(m)
    assert r.startswith(cls.__name__)
    for k in MODULES[cls]:
        assert k in r, f"extra_repr of {cls.__name__} does not mention {k}: {r}"
    assert isinstance(m, nn.Module)
    assert m.training
    m.drop_rate = 0.1 * 6e-4  # a ramped rate: 6e-05, not 5.9999999999999995e-05
    assert not re.search(r"\d{13}", repr(m)), repr(m)
    m.drop_rate = 0.1234567  # other rates as given
    assert re.search(r"=0\.(1234567|8765433)\b", repr(m)), repr(m)


@pytest.mark.parametrize("cls", list(MODULES), ids=lambda c: c.__name__)
def test_module_drop_rate(cls):
    attr, inverted = RATE[cls]
    m = cls()
    base = getattr(m, attr)
    assert m.drop_rate == pytest.approx(1 - base if inverted else base)
    m.drop_rate = 0.25
    assert getattr(m, attr) == pytest.approx(0.75 if inverted else 0.25)
    assert m.drop_rate == pytest.approx(0.25)
    with pytest.raises(ValueError, match="drop_rate"):
        m.drop_rate = 1.5


@pytest.mark.parametrize("cls", list(MODULES), ids=lambda c: c.__name__)
def test_module_eval_identity(cls):
    m = cls().eval()
    x = _x((2, 8, 9, 9))
    assert m(x) is x       # CamDrop needs no cam_targets in eval mode


@pytest.mark.parametrize("cls", list(MODULES))
@pytest.mark.parametrize("training", [False, True])
def test_module_checks_x_where_it_returns_x(cls, training):
    """A bad x is an error in eval mode too, and whatever FocusedDropout's participation
    draw: FocusedDropout and CamDrop returned x unchecked (a 3-D, an integer, a list)."""
    m = cls(participation=0.0) if cls is guidedrop.FocusedDropout else cls()
    m.train(training)
    with pytest.raises(ValueError, match="4-D"):
        m(_x((8, 9, 9)))
    with pytest.raises(TypeError, match="floating"):
        m(torch.zeros(2, 8, 9, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        m(torch.zeros(2, 8, 9, 9, dtype=torch.float8_e4m3fn))  # the reference returned float8
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[1.0]])


@pytest.mark.parametrize("cls", list(MODULES))
@pytest.mark.parametrize("training", [False, True])
def test_module_backend_typo_where_it_returns_x(cls, training, monkeypatch):
    """GUIDEDROP_BACKEND naming no backend is a ValueError where a module returns x too:
    eval mode, a zero drop_rate (FocusedDropout's participation 0; its step that the draw
    leaves out: test_focused_dropout_step_left_out_checks_the_backend)."""
    m = cls(participation=0.0) if cls is guidedrop.FocusedDropout else cls()
    m.train(training)
    m.drop_rate = 0.0
    x = _x()
    monkeypatch.setenv("GUIDEDROP_BACKEND", "refernce")
    with pytest.raises(ValueError, match="GUIDEDROP_BACKEND must be one of"):
        m(x)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    assert m(x) is x


@pytest.mark.parametrize("name", OPS)
def test_generator_of_another_type(name):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        call(name, generator=123)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="^p must"):
        guidedrop.CorrDrop(p=1.5)
    with pytest.raises(TypeError, match="^block_size must"):
        guidedrop.DropBlock2d(block_size=2.5)
    with pytest.raises(ValueError, match="^mode must be one of 'am', 'sm', 'ad', got 'xx'$"):
        guidedrop.AttentionDrop(mode="xx")  # the options listed, not a tuple's repr
    with pytest.raises(TypeError, match="^normalize must be a str, one of 'batch', 'sample', "
                                        "'none', got NoneType$"):
        guidedrop.CorrDrop(normalize=None)
    with pytest.raises(ValueError, match="^beta must"):
        guidedrop.AttentionDrop(beta=0.0)
    with pytest.raises(ValueError, match="^low must be <= high"):
        guidedrop.FocusedDropout(low=0.8, high=0.2)
    with pytest.raises(ValueError, match="^keep must"):
        guidedrop.Selectout(keep=0.0)
    with pytest.raises(ValueError, match="^normalize must"):
        guidedrop.CamDrop(normalize="x")


MODULE_VS_FUNCTIONAL = [
    (guidedrop.CorrDrop(p=0.3, block_size=3, normalize="sample"),
     lambda x: F.corrdrop(x, 0.3, 3, normalize="sample")),
    (guidedrop.SelectScale(0.5, 0.2), lambda x: F.selectscale(x, 0.5, 0.2)),
    (guidedrop.SpatialScale(0.3), lambda x: F.spatialscale(x, 0.3)),
    (guidedrop.Selectout(0.5, 0.75), lambda x: F.selectout(x, 0.5, 0.75)),
    (guidedrop.AttentionDrop(0.5, 30.0, mode="am"),
     lambda x: F.attentiondrop(x, 0.5, 30.0, mode="am")),
    (guidedrop.DropBlock2d(0.3, 3, shared_channels=True),
     lambda x: F.dropblock(x, 0.3, 3, shared_channels=True)),
]


@pytest.mark.parametrize("m,fn", MODULE_VS_FUNCTIONAL, ids=lambda v: type(v).__name__)
def test_module_matches_functional(m, fn):
    x = _x((2, 8, 9, 9))
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)
    assert torch.equal(y, fn(x))
    assert not torch.equal(y, x)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    assert xg.grad.shape == x.shape


# ------------------------------------------------------------------ CamDrop wiring


class TinyNet(nn.Module):
    def __init__(self, c=4, fc_in=8, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.drop = guidedrop.CamDrop(block_size=3, keep=0.5, channel_rate=0.5)
        self.head = nn.Conv2d(c, fc_in, 1)
        self.fc = nn.Linear(fc_in, classes)

    def forward(self, x):
        h = self.drop(self.conv(x))
        return self.fc(self.head(h).mean((2, 3)))


def test_cam_targets_context():
    torch.manual_seed(0)
    net = TinyNet(c=8, fc_in=8)
    x = torch.randn(3, 3, 10, 10)
    labels = torch.tensor([0, 3, 4])
    with guidedrop.cam_targets(net.fc, labels):
        out = net(x)
    out.sum().backward()
    assert out.shape == (3, 5)
    # the module reads W and y: same draw as the functional op on the conv features
    feats = net.conv(x).detach()
    torch.manual_seed(11)
    with guidedrop.cam_targets(net.fc, labels):
        y_mod = net.drop(feats)
    torch.manual_seed(11)
    y_fn = F.camdrop(feats, net.fc.weight, labels, 3, 0.5, channel_rate=0.5)
    assert torch.equal(y_mod, y_fn)
    assert not torch.equal(y_mod, feats)
    # a weight tensor works as well as the module
    torch.manual_seed(11)
    with guidedrop.cam_targets(net.fc.weight, labels):
        assert torch.equal(net.drop(feats), y_fn)


def test_cam_targets_group_average():
    """C_fc = 8 = 2 * C: the module accepts the wider classifier (α averaged in pairs)."""
    torch.manual_seed(0)
    net = TinyNet(c=4, fc_in=8)
    fc = nn.Linear(8, 5)
    feats = torch.randn(2, 4, 9, 9)
    with guidedrop.cam_targets(fc, torch.tensor([1, 2])):
        y = net.drop(feats)
    assert y.shape == feats.shape
    with guidedrop.cam_targets(nn.Linear(6, 5), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="C_fc|weight"):
            net.drop(feats)


def test_camdrop_without_context_raises():
    m = guidedrop.CamDrop()
    x = torch.randn(2, 4, 9, 9)
    with pytest.raises(RuntimeError, match="cam_targets"):
        m(x)
    # leaving the block clears it
    with guidedrop.cam_targets(torch.randn(3, 4), torch.tensor([0, 1])):
        m(x)
    with pytest.raises(RuntimeError, match="cam_targets"):
        m(x)
    # an exception inside the block clears it too
    with pytest.raises(KeyError):
        with guidedrop.cam_targets(torch.randn(3, 4), torch.tensor([0, 1])):
            raise KeyError
    with pytest.raises(RuntimeError, match="cam_targets"):
        m(x)
    m.eval()
    assert m(x) is x


def test_cam_targets_nested_inner_wins():
    m = guidedrop.CamDrop(block_size=3, keep=0.3, channel_rate=1.0)
    x = torch.randn(2, 4, 9, 9)
    w_outer, w_inner = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0, 2])
    with guidedrop.cam_targets(w_outer, t):
        with guidedrop.cam_targets(w_inner, t):
            torch.manual_seed(1)
            y = m(x)
    torch.manual_seed(1)
    assert torch.equal(y, F.camdrop(x, w_inner, t, 3, 0.3, channel_rate=1.0))


def test_cam_targets_left_out_of_order():
    """Blocks left in another order than entered (generators, each inside a block, closed
    first to last): each takes its own targets away. The first block's targets came back
    after both were left, and a CamDrop outside any block used them."""
    w1, w2, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 2])

    def step(w):
        with guidedrop.cam_targets(w, t):
            yield

    g1, g2 = step(w1), step(w2)
    next(g1)
    next(g2)
    g1.close()
    assert context.current()[0] is w2
    g2.close()
    with pytest.raises(RuntimeError, match="no cam_targets block is open"):
        context.current()


# ----------------------------------------------------------------- FocusedDropout


def test_focused_dropout_participation():
    x = torch.randn(2, 4, 6, 6).abs() + 0.1
    m = guidedrop.FocusedDropout(participation=1.0, low=0.5, high=0.5)
    y = m(x)
    assert m.last_applied is True
    assert not torch.equal(y, x)
    m = guidedrop.FocusedDropout(participation=0.0)
    state = torch.get_rng_state()
    assert m(x) is x and m.last_applied is False
    assert torch.equal(torch.get_rng_state(), state)  # no draw, as by nn.Dropout(0)
    m = guidedrop.FocusedDropout(participation=0.5)
    torch.manual_seed(0)
    applied = 0
    for _ in range(200):
        m(x)
        applied += m.last_applied
    assert 70 <= applied <= 130    # Binomial(200, 0.5): sd 7.1, bounds at ~4.2 sd
    torch.manual_seed(0)
    again = 0
    for _ in range(200):
        m(x)
        again += m.last_applied
    assert again == applied
    # away from 1/2, where an inverted draw (u > participation) would look the same
    m = guidedrop.FocusedDropout(participation=0.1)
    small = torch.ones(1, 1, 2, 2)
    torch.manual_seed(1)
    applied = 0
    for _ in range(2000):
        m(small)
        applied += m.last_applied
    assert 146 <= applied <= 254  # Binomial(2000, 0.1): 200, sd 13.4, bounds at ~4 sd
    m.eval()
    assert m(x) is x and m.last_applied is False


def test_focused_dropout_draws_on_the_cpu_whatever_the_default_device():
    """The participation draw comes from torch's CPU generator (the docstring: no device
    sync) also under a default device: it drew on it (a helper's attack: under
    torch.set_default_device("meta") the eager forward failed, "Tensor.item() cannot be
    called on meta tensors"; a CUDA default device would sync every step). The same draws
    and outputs as without one, from the same seed."""
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    m = guidedrop.FocusedDropout(participation=0.5)
    runs = []
    for default in (None, torch.device("meta")):
        torch.manual_seed(4)
        with default or contextlib.nullcontext():
            runs.append([(m(x), m.last_applied) for _ in range(6)])
    for (y, applied), (want, want_applied) in zip(*runs, strict=True):
        assert applied is want_applied and y.device == x.device and torch.equal(y, want)
    assert {applied for _, applied in runs[0]} == {True, False}


def test_focused_dropout_last_applied_reset_where_it_returns_x():
    """last_applied tells whether the last forward applied the op: a forward that returns x
    without a draw (eval mode, participation 0) sets it back to False, so that a training
    loop reading it after an evaluation pass does not raise weight decay for a step that
    masked nothing (from True: a fresh module's False would hide a missing reset)."""
    x = _x()
    m = guidedrop.FocusedDropout(participation=1.0)
    m(x)
    assert m.last_applied is True
    m.eval()
    assert m(x) is x and m.last_applied is False
    m.train()
    m(x)
    assert m.last_applied is True
    m.participation = 0.0
    assert m(x) is x and m.last_applied is False


def test_focused_dropout_step_left_out_checks_the_backend(monkeypatch):
    """A training step that FocusedDropout's draw leaves out (participation > 0, so not
    the identity of a zero rate) returns x after the GUIDEDROP_BACKEND check: a value naming
    no backend is a ValueError at that step too, as at every call."""
    m = guidedrop.FocusedDropout(participation=1e-12)  # a draw below it: never, in practice
    x = _x()
    m.last_applied = True  # as after a step that applied the op
    rng = torch.get_rng_state()
    monkeypatch.setenv("GUIDEDROP_BACKEND", "refernce")
    with pytest.raises(ValueError, match="GUIDEDROP_BACKEND must be one of"):
        m(x)
    # the draw was made, and the step left out, before the check raised
    assert m.last_applied is False and not torch.equal(torch.get_rng_state(), rng)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    assert m(x) is x and m.last_applied is False


def test_focused_dropout_module_applies_the_op():
    x = torch.randn(2, 4, 6, 6)
    m = guidedrop.FocusedDropout(participation=1.0, low=0.3, high=0.6, per_position=True)
    y = m(x)
    keep = y != 0
    # one spatial mask shared by every channel, values unscaled
    assert torch.equal(keep, keep[:, :1].expand_as(keep)) or torch.equal(y, x)
    assert torch.equal(y[keep], x[keep])


# ----------------------------------------------------------------------- schedules


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        guidedrop.CorrDrop(p=0.2, block_size=3),
        guidedrop.DropBlock2d(p=0.1, block_size=3),
        guidedrop.AttentionDrop(alpha=0.3),
        nn.Dropout(0.5),
        nn.Sequential(guidedrop.SelectScale(retain=0.2), guidedrop.Selectout(keep=0.8),
                      guidedrop.SpatialScale(retain=0.6)),
        guidedrop.FocusedDropout(participation=0.4),
        guidedrop.CamDrop(keep=0.7),
    )


def _rates(model):
    return [m.drop_rate for m in model.modules() if isinstance(m, guidedrop.GuidedDropout)]


TARGETS = [0.2, 0.1, 0.3, 0.8, 0.2, 0.4, 0.4, 0.3]


def test_linear_ramp():
    model = _model()
    assert _rates(model) == pytest.approx(TARGETS)
    sched = guidedrop.LinearRamp(model, steps=10)
    assert _rates(model) == pytest.approx([0.0] * 8)
    assert model[1].p == 0 and model[7].keep == pytest.approx(1.0)
    for step in range(1, 21):
        sched.step()
        frac = min(1.0, step / 10)
        assert _rates(model) == pytest.approx([t * frac for t in TARGETS], abs=1e-12), step
    assert model[4].p == 0.5      # a plain nn.Dropout is not touched


def test_linear_ramp_checkpoints_at_0_5_10_20():
    model = _model()
    sched = guidedrop.LinearRamp(model, steps=10)
    seen = {0: _rates(model)}
    for step in range(1, 21):
        sched.step()
        seen[step] = _rates(model)
    assert seen[0] == pytest.approx([0.0] * 8)
    assert seen[5] == pytest.approx([t / 2 for t in TARGETS])
    assert seen[10] == pytest.approx(TARGETS)
    assert seen[20] == pytest.approx(TARGETS)


def _params(model):
    return [getattr(m, m._rate) for m in model.modules() if isinstance(m, guidedrop.GuidedDropout)]


def test_linear_ramp_ends_on_the_parameters_themselves():
    """At its end a ramp sets each layer's parameter to the value it was made with, also
    where drop_rate is 1 - it: keep = 1 - (1 - 0.7) would be 0.7000000000000001 (a new
    user's check, retain == 0.1, was False). Also after a second ramp over the same layers
    and after load_state_dict of the same targets."""
    model = _model()
    want = _params(model)
    sched = guidedrop.LinearRamp(model, steps=3)
    for _ in range(3):
        sched.step()
    assert _params(model) == want
    again = guidedrop.LinearRamp(model, steps=0)
    assert _params(model) == want
    fresh = guidedrop.LinearRamp(model, steps=5)
    assert _params(model) != want  # ramped down to 0
    fresh.load_state_dict(again.state_dict())
    assert _params(model) == want


def test_linear_ramp_state_dict_round_trip():
    model = _model()
    sched = guidedrop.LinearRamp(model, steps=10)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    rates = _rates(model)

    fresh = _model()
    sched2 = guidedrop.LinearRamp(fresh, steps=10)
    assert _rates(fresh) == pytest.approx([0.0] * 8)
    sched2.load_state_dict(state)
    assert _rates(fresh) == pytest.approx(rates)
    sched.step()
    sched2.step()
    assert _rates(fresh) == pytest.approx(_rates(model))
    assert _rates(fresh) == pytest.approx([t * 0.4 for t in TARGETS])


def test_linear_ramp_twice_keeps_the_targets():
    """A second ramp over the same model ramps to the first one's targets (it took the 0
    the first one set: rates frozen at 0); a rate assigned since is the new target."""
    model = _model()
    first = guidedrop.LinearRamp(model, steps=10)
    for _ in range(3):
        first.step()
    second = guidedrop.LinearRamp(model, steps=4)
    assert second.targets == pytest.approx(TARGETS)
    assert _rates(model) == pytest.approx([0.0] * 8)
    for _ in range(4):
        second.step()
    assert _rates(model) == pytest.approx(TARGETS)
    model[1].p = 0.05  # assigned: no ramp set it
    third = guidedrop.LinearRamp(model, steps=0)
    assert third.targets[0] == 0.05 and third.targets[1:] == pytest.approx(TARGETS[1:])
    # a refused state leaves the marks as they were: a later ramp still finds the targets
    with pytest.raises(ValueError):
        # Selectout (the fifth layer) refuses drop_rate 1 (keep 0)
        second.load_state_dict({"step_count": 0, "steps": 4,
                                "targets": [0.5] * 4 + [1.0] + [0.5] * 3})
    assert guidedrop.LinearRamp(model, steps=2).targets == pytest.approx([0.05] + TARGETS[1:])
    # assigned the value a ramp set (a layer disabled at a ramp's step 0): a target too
    guidedrop.LinearRamp(model, steps=10)  # every rate 0
    model[1].p = 0.0
    model[2].drop_rate = 0.0
    assert guidedrop.LinearRamp(model, steps=0).targets == pytest.approx([0.0, 0.0] + TARGETS[2:])


def test_linear_ramp_state_dict_is_a_copy():
    """state_dict() returns the targets as a new list: editing the state (a checkpoint
    changed before it is loaded elsewhere) leaves the ramp's own targets, and its next
    rates, as they were."""
    model = _model()
    sched = guidedrop.LinearRamp(model, steps=2)
    state = sched.state_dict()
    state["targets"][0] = 0.9
    assert sched.targets == pytest.approx(TARGETS)
    sched.step()
    assert _rates(model) == pytest.approx([t / 2 for t in TARGETS])


def test_linear_ramp_refused_load_mid_ramp_keeps_marks_and_parameters():
    """A load_state_dict refused half-way (Selectout, the fifth layer, refuses the target
    1.0, after the four before it took 0.5) in the middle of a ramp (rates at 1/4 of the
    targets) puts back everything it changed: the layers' marks, so that a ramp made next
    ramps to the targets (TARGETS), not to the 1/4 rates put back; and the ramp's
    parameters, so that it still ends on the parameters themselves, bit for bit (without
    them it sets drop_rate = target, and 1 - (1 - keep) may be keep's neighbour)."""
    bad = {"step_count": 0, "steps": 4, "targets": [0.5] * 4 + [1.0] + [0.5] * 3}
    model = _model()
    sched = guidedrop.LinearRamp(model, steps=4)
    sched.step()
    with pytest.raises(ValueError, match=r"targets\[4\]"):
        sched.load_state_dict(bad)
    assert _rates(model) == pytest.approx([t / 4 for t in TARGETS])
    assert guidedrop.LinearRamp(model, steps=4).targets == pytest.approx(TARGETS)

    model = _model()
    want = _params(model)
    sched = guidedrop.LinearRamp(model, steps=4)
    sched.step()
    with pytest.raises(ValueError, match=r"targets\[4\]"):
        sched.load_state_dict(bad)
    for _ in range(3):
        sched.step()
    assert _params(model) == want


def test_linear_ramp_layers_argument():
    model = _model()
    chosen = [model[1], model[3]]
    sched = guidedrop.LinearRamp(layers=chosen, steps=4)
    rates = _rates(model)
    assert rates[0] == 0 and rates[2] == 0
    assert [rates[i] for i in (1, 3, 4, 5, 6, 7)] == pytest.approx(
        [TARGETS[i] for i in (1, 3, 4, 5, 6, 7)])
    sched.step()
    sched.step()
    assert model[1].p == pytest.approx(0.1) and model[3].alpha == pytest.approx(0.15)
    assert model[2].p == pytest.approx(0.1)
    with pytest.raises(ValueError, match="LinearRamp needs a model or layers"):
        guidedrop.LinearRamp(steps=4)


def test_forward_never_changes_rates():
    model = _model()
    sched = guidedrop.LinearRamp(model, steps=10)
    for _ in range(4):
        sched.step()
    before = _rates(model)
    x = torch.randn(2, 3, 9, 9)
    with guidedrop.cam_targets(torch.randn(5, 8), torch.tensor([0, 1])):
        for _ in range(3):
            model(x).sum().backward()
    assert _rates(model) == before
    model.eval()
    model(x)
    assert _rates(model) == before


# ----------------------------------------------------------------- issue 11: fuzzing faults
# These run on every backend (reference; Triton under the interpreter; CUDA with a GPU):
# the values reach the layers, so a backend that specialises on a python type or reads
# an unconverted value fails here.

import threading  # noqa: E402
from decimal import Decimal  # noqa: E402
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402
from testing import DEV, fake_backend, load_backend  # noqa: E402


@pytest.fixture(params=["reference", "triton", "cuda"])
def every_backend(request, monkeypatch):
    """GUIDEDROP_BACKEND forced to each backend that can run here (overrides the pin)."""
    if request.param != "reference":
        load_backend(request.param, emulate=False)
    monkeypatch.setenv("GUIDEDROP_BACKEND", request.param)
    return request.param


SMALL = (2, 4, 6, 6)
# op -> (noise shape, rates given as other number types, the same as python values)
TYPED = {
    "corrdrop": ((2, 2, 2, 2), dict(p=Fraction(3, 10), block_size=np.uint8(3)),
                 dict(p=0.3, block_size=3)),
    "selectscale": ((2, 4), dict(top_rate=np.float32(0.5), retain=Fraction(1, 5)),
                    dict(top_rate=float(np.float32(0.5)), retain=0.2)),
    "spatialscale": ((2, 4), dict(retain=Fraction(1, 5)), dict(retain=0.2)),
    "selectout": ((2, 4), dict(top_rate=Fraction(1, 2), keep=np.float64(0.75)),
                  dict(top_rate=0.5, keep=0.75)),
    "attentiondrop": ((2, 4), dict(alpha=Fraction(1, 2), beta=np.int64(30)),
                      dict(alpha=0.5, beta=30.0)),
    "focused_dropout": ((2,), dict(low=Fraction(1, 4), high=np.float16(0.5)),
                        dict(low=0.25, high=0.5)),
    "camdrop": ((2, 4, 6, 6), dict(block_size=np.int16(3), keep=Fraction(1, 2),
                                   channel_rate=np.float32(0.5)),
                dict(block_size=3, keep=0.5, channel_rate=0.5)),
    "dropblock": ((2, 4, 6, 6), dict(p=Fraction(3, 10), block_size=np.int64(3)),
                  dict(p=0.3, block_size=3)),
}


@pytest.mark.parametrize("name", list(TYPED))
def test_rate_types_every_backend(every_backend, name):
    """SPEC §1: a rate is any real number (float()), a block size any integral number
    (int()): Fraction and numpy scalars give exactly the python values' output."""
    shape, typed, plain = TYPED[name]
    x = torch.randn(SMALL, device=DEV)
    u = torch.rand(shape, device=DEV)
    extra = {}
    if name == "camdrop":
        extra = dict(weight=torch.randn(3, 4, device=DEV),
                     target=torch.tensor([0, 2], device=DEV))
    expected = call(name, x, noise=u, **plain, **extra)
    assert torch.equal(call(name, x, noise=u, **typed, **extra), expected)
    if name != "focused_dropout":  # its module adds the participation draw
        assert not torch.equal(expected, x), "the op must act for this test to mean anything"


@pytest.mark.parametrize("name", list(TYPED))
def test_rate_decimal_every_backend(every_backend, name):
    """A decimal.Decimal rate is a real number too (numbers.Real leaves it out): the same
    output as the float (it was a TypeError)."""
    shape, _, plain = TYPED[name]
    x, u = torch.randn(SMALL, device=DEV), torch.rand(shape, device=DEV)
    extra = {}
    if name == "camdrop":
        extra = dict(weight=torch.randn(3, 4, device=DEV),
                     target=torch.tensor([0, 2], device=DEV))
    dec = {k: Decimal(repr(v)) if isinstance(v, float) else v for k, v in plain.items()}
    assert any(isinstance(v, Decimal) for v in dec.values())
    assert torch.equal(call(name, x, noise=u, **dec, **extra),
                       call(name, x, noise=u, **plain, **extra))


@pytest.mark.parametrize("bad", [10**400, -10**400, Fraction(10**400, 3), Decimal("sNaN"),
                                 Decimal("1e400"), Decimal("NaN")])
@pytest.mark.parametrize("name", list(TYPED))
def test_rate_beyond_float_refused(name, bad):
    """A real number that float() cannot take (an int or Fraction beyond the float range, a
    signalling NaN) is out of range: a ValueError naming the rate (it was an OverflowError
    or a decimal error that named nothing), with a message of bounded length."""
    arg = next(k for k, v in TYPED[name][2].items() if isinstance(v, float))
    with pytest.raises(ValueError, match=arg) as info:
        call(name, **{arg: bad})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("tiny", [Decimal("1e-999999"), Fraction(1, 10**400)])
def test_rate_rounding_to_an_open_bound_says_so(tiny):
    """A positive beta that rounds to 0.0, the open bound of (0, 100]: the message gives the
    float it became (a helper's attack: "got 1E-999999" read as a positive value refused)."""
    message = r"beta must be in \(0, 100\], got .* \(as a float: 0\.0\)"
    with pytest.raises(ValueError, match=message):
        F.attentiondrop(torch.ones(1, 1, 2, 2), 0.5, beta=tiny)


def test_huge_negative_block_size_message():
    with pytest.raises(ValueError, match="block_size") as info:
        call("dropblock", block_size=-10**400)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("bad", [True, torch.tensor(0.1), np.bool_(True), "0.1", None])
@pytest.mark.parametrize("name", list(TYPED))
def test_rate_bool_tensor_refused(name, bad):
    """SPEC §1: a bool or a tensor (or anything not a real number) is a TypeError."""
    arg = next(iter(TYPED[name][2]))
    with pytest.raises(TypeError, match=arg):
        call(name, **{arg: bad})


@pytest.mark.parametrize("bad", [2.5, Fraction(5, 2), np.float32(3.0), True, torch.tensor(3)])
def test_block_size_must_be_integral(bad):
    with pytest.raises(TypeError, match="block_size"):
        call("dropblock", block_size=bad)


MODULE_FIELDS = [
    (guidedrop.CorrDrop, "p", 1.5), (guidedrop.CorrDrop, "block_size", 0),
    (guidedrop.CorrDrop, "normalize", "batches"), (guidedrop.SelectScale, "top_rate", -0.1),
    (guidedrop.SelectScale, "retain", 2), (guidedrop.SpatialScale, "retain", float("nan")),
    (guidedrop.Selectout, "keep", 0.0), (guidedrop.Selectout, "top_rate", 1.1),
    (guidedrop.AttentionDrop, "alpha", 7.0), (guidedrop.AttentionDrop, "beta", 0),
    (guidedrop.AttentionDrop, "mode", "xx"), (guidedrop.FocusedDropout, "participation", 7.0),
    (guidedrop.FocusedDropout, "low", -1), (guidedrop.FocusedDropout, "high", 1.5),
    (guidedrop.FocusedDropout, "per_position", 1), (guidedrop.CamDrop, "keep", 1.5),
    (guidedrop.CamDrop, "block_size", 2.0), (guidedrop.CamDrop, "channel_rate", -1),
    (guidedrop.DropBlock2d, "p", True), (guidedrop.DropBlock2d, "shared_channels", "yes"),
    (guidedrop.DropBlock2d, "block_size", np.uint8(0)),
    # nn.Module.__setattr__ registers these itself unless the module routes them to the check
    (guidedrop.CorrDrop, "p", nn.Parameter(torch.tensor(0.5))),
    (guidedrop.DropBlock2d, "p", nn.Identity()),
    (guidedrop.SelectScale, "drop_rate", nn.Parameter(torch.tensor(0.5))),
]


@pytest.mark.parametrize("cls, field, bad", MODULE_FIELDS)
def test_module_assignment_checked(cls, field, bad):
    """Every value forward reads is checked when set (FocusedDropout().participation = 7
    used to pass silently); a refused value leaves the old one."""
    m = cls()
    before = getattr(m, field)
    with pytest.raises((TypeError, ValueError), match=field):
        setattr(m, field, bad)
    assert getattr(m, field) == before
    assert not list(m.children()) and not list(m.parameters())


def test_module_values_converted_once():
    m = guidedrop.DropBlock2d(p=Fraction(1, 10), block_size=np.uint8(3))
    assert type(m.p) is float and m.p == 0.1
    assert type(m.block_size) is int and m.block_size == 3
    m.drop_rate = np.float32(0.25)
    assert type(m.p) is float
    m = guidedrop.FocusedDropout(per_position=np.bool_(True))  # numpy's bool is a bool
    assert type(m.per_position) is bool and m.per_position
    with pytest.raises(TypeError, match="per_position must be a bool, got numpy.int64"):
        m.per_position = np.int64(1)
    s = guidedrop.Selectout()
    s.drop_rate = Fraction(1, 4)
    assert type(s.keep) is float and s.keep == 0.75
    with pytest.raises(ValueError, match="keep"):
        s.drop_rate = 1  # keep = 0 is not in (0, 1]
    assert s.keep == 0.75
    m = guidedrop.CorrDrop(p=-0.0)  # the same rate as 0.0, shown as 0.0 (a new user)
    assert math.copysign(1.0, m.p) == 1.0 and "p=0.0" in repr(m) and "-0.0" not in repr(m)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_focused_dropout_low_above_high_at_forward(compiled, training):
    """The pair is checked where forward reads them: eager (a ValueError) and compiled
    (fullgraph: Dynamo's error, as for any bad value), in eval mode and at participation 0
    too, also after a compile with valid values."""
    m = guidedrop.FocusedDropout(participation=0.0).train(training)
    x = torch.randn(2, 3, 4, 4)
    run = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
    assert run(x) is x
    m.low = 0.9  # each alone is valid
    with pytest.raises(RuntimeError if compiled else ValueError, match="low must be <= high"):
        run(x)  # (compiled: Dynamo's Unsupported, a RuntimeError that quotes the ValueError)
    m.high = 0.95
    assert run(x) is x
    torch._dynamo.reset()


def test_focused_dropout_low_equal_to_high_is_allowed():
    """SPEC §1 allows 0 <= low <= high <= 1: low == high (a fixed threshold ratio) is no
    error, in the functional op, the module's constructor, and a forward after setting the
    two one by one; only low > high is refused."""
    x = torch.randn(2, 3, 4, 4)
    for g in (0.0, 0.5, 1.0):
        assert F.focused_dropout(x, g, g).shape == x.shape
        m = guidedrop.FocusedDropout(participation=1.0, low=g, high=g)
        assert m(x).shape == x.shape
    m = guidedrop.FocusedDropout(participation=1.0)  # low 0.3, high 0.6
    m.low = 0.6  # up to high: equal, not above
    assert m(x).shape == x.shape
    m.high = 0.2  # low > high for a moment: no error until a forward
    m.low = 0.2
    assert m(x).shape == x.shape
    with pytest.raises(ValueError, match="low must be <= high"):
        F.focused_dropout(x, 0.6, 0.5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated in 2.14
@pytest.mark.parametrize("training", [False, True])
def test_selectout_drop_count_at_forward(training):
    """Selectout's drop count against its candidates (SPEC §3) is checked by each eager
    forward, in eval mode too, as F.selectout(training=False) checks it: the module in
    eval mode returned x without, so a model tried in eval mode failed at its first
    training step."""
    x = torch.randn(2, 4, 6, 6)
    m = guidedrop.Selectout(top_rate=0.25, keep=0.5).train(training)  # n_d 2 > n_t 1
    with pytest.raises(ValueError, match="drops round"):
        m(x)
    with pytest.raises(ValueError, match="drops round"):
        F.selectout(x, 0.25, 0.5, training=training)
    if not training:  # traced for deployment (C a 0-d tensor there): as F.selectout
        with pytest.raises(ValueError, match="drops round"):
            torch.jit.trace(m, x, check_trace=False)
    m.top_rate = 0.5
    assert (m(x) is x) is not training


def test_modules_pickled_before_their_bools():
    """A module pickled before _zero_rate and _unordered (the bools that forward reads
    instead of the rates) gets them back when unpickled."""
    m = guidedrop.FocusedDropout(participation=0.0)
    m.__dict__["_low"] = 0.9  # low > high, as a module could be saved
    for key in ("_zero_rate", "_unordered"):
        del m.__dict__[key]
    m = pickle.loads(pickle.dumps(m))
    assert m._zero_rate is True and m._unordered is True


def test_modules_pickled_with_an_old_ramp_mark():
    """A layer pickled mid-ramp before 2026-12-06 (its mark "_ramped": (target, rate set,
    parameter), or (target, rate set) before 2026-12-05) gives a new ramp the old one's
    target, and its parameter where the mark held it."""
    m = guidedrop.Selectout(top_rate=0.5, keep=0.9)
    guidedrop.LinearRamp(layers=[m], steps=4).step()
    target, keep = m._ramp
    for old, want in (((target, m.drop_rate, keep), (target, keep)),
                      ((target, m.drop_rate), (target, None))):
        del m.__dict__["_ramp"]
        m.__dict__["_ramped"] = old
        m = pickle.loads(pickle.dumps(m))
        assert m._ramp == want and "_ramped" not in m.__dict__
        assert guidedrop.LinearRamp(layers=[m], steps=2).targets == [target]


# --- CamDrop targets and weights (SPEC §6 step 0)

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
              torch.uint32]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_camdrop_target_dtypes_every_backend(every_backend, dtype):
    """Any integer dtype is a class index, never a mask: N = K with uint8 targets used to
    pick rows by a boolean mask."""
    n = k = 3
    x = torch.randn(n, 4, 6, 6, device=DEV)
    weight = torch.randn(k, 4, device=DEV)
    u = torch.rand(x.shape, device=DEV)
    t64 = torch.tensor([2, 0, 1], device=DEV)
    # expected: the reference with W[y] computed by hand (rows 2, 0, 1 of W)
    expected = F.camdrop(x, weight, t64, 3, 0.3, channel_rate=0.5, noise=u)
    assert torch.equal(F.camdrop(x, weight, t64.to(dtype), 3, 0.3, channel_rate=0.5, noise=u),
                       expected)
    perm = torch.tensor([2, 0, 1], device=DEV)
    same_rows = F.camdrop(x, weight[perm], torch.arange(3, device=DEV), 3, 0.3,
                          channel_rate=0.5, noise=u)
    assert torch.equal(same_rows, expected)


@pytest.mark.parametrize("target", [[0, 5], [0, 3], [-1, 0], [0, -3]])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.int16])
def test_camdrop_target_out_of_range(target, dtype):
    """A CPU target outside [0, K) is a ValueError naming target (not IndexError, not
    class K + t)."""
    with pytest.raises(ValueError, match="target"):
        F.camdrop(torch.randn(2, 4, 6, 6), torch.randn(3, 4), torch.tensor(target, dtype=dtype),
                  3, 0.5)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_camdrop_cpu_target_checked_without_device_ops(dtype):
    """SPEC §6 step 0 for a CPU target: read on the host (numpy), no aten op and no sync
    (issue 12's launch budget counts CPU ops too), the same ValueError naming target; the
    target comes back unconverted (the backends read it by value)."""
    from guidedrop import _validation as V
    from guidedrop.launches import LaunchCounter
    x, w = torch.randn(4, 2, 5, 5), torch.randn(3, 4)
    t = torch.tensor([2, 0, 1, 1, 0, 2, 0, 1], dtype=dtype)[::2]  # sliced
    with LaunchCounter() as c:
        assert V.cam_inputs(w, t, x) is t
    assert c.launches == [] and c.syncs == [], (c.launches, c.syncs)
    bad = torch.tensor([2, 0, 3, 1], dtype=dtype)
    with LaunchCounter() as c, pytest.raises(ValueError, match=r"target .*\[0, 3\), got 3"):
        V.cam_inputs(w, bad, x)
    assert c.launches == [] and c.syncs == [], (c.launches, c.syncs)


@pytest.mark.parametrize("target", [torch.tensor([True, False]), torch.tensor([0.0, 1.0]),
                                    [0, 1]])
def test_camdrop_target_not_integer(target):
    with pytest.raises(TypeError, match="target"):
        F.camdrop(torch.randn(2, 4, 6, 6), torch.randn(3, 4), target, 3, 0.5)


@pytest.mark.parametrize("weight, error, match", [
    (torch.randn(0, 4), ValueError, "K"), (torch.randn(3, 0), ValueError, "C_fc"),
    (torch.randn(3, 6), ValueError, "C_fc"), (torch.randn(12), ValueError, "weight"),
    (torch.randn(3, 4, dtype=torch.float64).long(), TypeError, "weight"),
    ([[0.5] * 4] * 3, TypeError, "^weight must be a torch.Tensor, got list")])
def test_camdrop_weight_checked(weight, error, match):
    """A wrong shape is a ValueError, a wrong dtype a TypeError (SPEC §1), as cam_targets."""
    with pytest.raises(error, match=match):
        F.camdrop(torch.randn(2, 4, 6, 6), weight, torch.tensor([0, 0]), 3, 0.5)


@pytest.mark.parametrize("target", [torch.tensor([0]), torch.tensor([0, 0, 0]),
                                    torch.zeros(2, 1, dtype=torch.long)], ids=str)
def test_camdrop_target_shape_checked(target):
    """target holds one class index per sample, shape (N,): a target for another batch size
    (or an (N, 1) column) is a ValueError naming ``target``, before it could broadcast
    against the batch or fail on an index deep in the op."""
    with pytest.raises(ValueError, match=r"^target must have shape \(2,\)"):
        F.camdrop(torch.randn(2, 4, 6, 6), torch.randn(3, 4), target, 3, 0.5)


@pytest.mark.parametrize("which", ["weight", "target"])
def test_camdrop_weight_and_target_on_x_device(which):
    """CamDrop's weight and target must be on x's device (functional.camdrop's docstring):
    checked with a meta x (shape inference, no GPU needed) and a CPU weight or target, a
    ValueError naming it."""
    x = torch.empty(2, 4, 6, 6, device="meta")
    on_cpu = dict(zip(("weight", "target"), _cam((2, 4, 6, 6)), strict=True))
    on_meta = {k: t.to("meta") for k, t in on_cpu.items()}
    with pytest.raises(ValueError, match=f"^{which} must be on x's device meta, got cpu"):
        F.camdrop(x, **{**on_meta, which: on_cpu[which]}, block_size=3, keep=0.5)
    assert F.camdrop(x, **on_meta, block_size=3, keep=0.5).shape == x.shape


def test_assert_target_device_check(monkeypatch):
    """_validation.assert_target, the device-side check of a target (a GPU target, or any
    under torch.compile): an index outside [0, K), K itself included, is an assertion naming
    ``target`` (on the CPU at once); the target comes back as int64, clamped into [0, K) so
    that where the assertion is asynchronous the indexing after it stays in range."""
    from guidedrop import _validation as V
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(RuntimeError, match=r"target must hold class indices in \[0, 4\)"):
            V.assert_target(torch.tensor(bad), 4)
    ok = V.assert_target(torch.tensor([0, 3], dtype=torch.uint8), 4)
    assert ok.dtype == torch.int64 and ok.tolist() == [0, 3]
    monkeypatch.setattr(torch, "_assert_async", lambda *args: None)  # as on a GPU, later
    assert V.assert_target(torch.tensor([-2, 4, 9]), 4).tolist() == [0, 3, 3]


@pytest.mark.parametrize("name", list(OPS))
def test_float64_x_on_the_reference(name):
    """float64 x is valid on the reference path (SPEC §1), which ``auto`` takes for it: the
    op returns x's shape and dtype."""
    x = _x().double()
    y = call(name, x)
    assert y.shape == x.shape and y.dtype == torch.float64


def test_camdrop_targets_checked_in_eval_too():
    x = torch.randn(2, 4, 6, 6)
    assert F.camdrop(x, torch.randn(3, 4), torch.tensor([0, 1]), training=False) is x
    with pytest.raises(ValueError, match="target"):
        F.camdrop(x, torch.randn(3, 4), torch.tensor([0, 3]), training=False)


@pytest.mark.parametrize("idle", [dict(training=False), dict(keep=1.0), dict(x=slice(0))])
def test_camdrop_idle_needs_no_weight_or_target(idle):
    """Where the op does nothing (eval mode, keep = 1, an empty x) a missing weight or target
    is no error (the docstring: "missing (where the op acts ...)"; it raised with one of
    them given); the one given is still checked, the target's range against the weight's
    classes only with both."""
    x, w, t = torch.randn(2, 4, 6, 6), torch.randn(3, 4), torch.tensor([0, 1])
    kw = {k: v for k, v in idle.items() if k != "x"}
    if "x" in idle:
        x, t = x[idle["x"]], t[idle["x"]]
    for weight, target in [(w, None), (None, t), (None, None)]:
        assert F.camdrop(x, weight, target, **kw) is x
    with pytest.raises(ValueError, match="not a multiple of x's C=4"):
        F.camdrop(x, torch.randn(3, 5), None, **kw)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        F.camdrop(x, None, t.float(), **kw)
    with pytest.raises(ValueError, match=r"target must have shape"):
        F.camdrop(x, None, torch.tensor([0, 1, 2]), **kw)
    assert F.camdrop(x, None, t + 7, **kw) is x  # no K to check the range against
    if "x" not in idle:
        with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 3\)"):
            F.camdrop(x, w, t + 7, **kw)
    for weight, target in [(w, None), (None, t)]:  # where it acts, both are needed
        with pytest.raises(ValueError, match="camdrop needs the classifier weight"):
            F.camdrop(torch.randn(2, 4, 6, 6), weight, target)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_camdrop_target_out_of_range_compiled(backend, monkeypatch):
    """Under torch.compile a CPU target is not checked on the host before the op (a
    data-dependent graph break); the backend checks it. Triton on CPU tensors (the
    interpreter, which does not run the kernel's device assertion) raises the ValueError
    naming target in its plan op (it clamped the class and dropped by another one's CAM);
    the reference's asynchronous assertion raises on the CPU at once."""
    if backend == "triton" and dispatch.load("triton")[0] is None:
        pytest.skip("no Triton backend")
    monkeypatch.setenv("GUIDEDROP_BACKEND", backend)
    torch._dynamo.reset()
    x, w, u = torch.randn(2, 4, 6, 6), torch.randn(5, 4), torch.rand(2, 4, 6, 6)
    f = torch.compile(lambda x, w, t, u: F.camdrop(x, w, t, 3, 0.3, noise=u),
                      backend="aot_eager", fullgraph=True)
    with pytest.raises((ValueError, RuntimeError), match="target") as err:
        f(x, w, torch.tensor([7, 1]), u)
    if backend == "triton":
        assert err.type is ValueError
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_camdrop_cuda_target_check_has_no_sync():
    """On a GPU target's range check is a device assertion: no host sync (a target out of
    range would poison the CUDA context; the assertion names target on the emulator:
    test_plans_cuda_camdrop)."""
    x = torch.randn(2, 4, 6, 6, device="cuda")
    w = torch.randn(3, 4, device="cuda")
    target = torch.tensor([0, 1], device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # a host sync raises
    try:
        F.camdrop(x, w, target, 3, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("classifier,error", [
    (nn.ReLU(), TypeError), (nn.Conv2d(4, 3, 1), TypeError), ("fc", TypeError),
    (torch.randn(3), ValueError), (torch.randn(2, 3, 4), ValueError),
    (torch.ones(3, 4, dtype=torch.int64), TypeError)])
def test_cam_targets_bad_classifier(classifier, error):
    """cam_targets(nn.ReLU(), t) used to raise AttributeError; a weight tensor of the wrong
    shape is a ValueError (SPEC §1), as F.camdrop's (it was a TypeError)."""
    with pytest.raises(error, match="cam_targets|weight"):
        with guidedrop.cam_targets(classifier, torch.tensor([0, 1])):
            pass


def test_cam_targets_lazy_classifier():
    """A lazy classifier before its first forward (its weight uninitialised): guidedrop's
    ValueError, not torch's from deep in the check ("Attempted to use an uninitialized
    parameter in <method 'dim' ...>")."""
    for classifier in (nn.LazyLinear(3), nn.LazyLinear(3).weight):
        with pytest.raises(ValueError, match="cam_targets got a weight not initialised yet"):
            with guidedrop.cam_targets(classifier, torch.tensor([0, 1])):
                pass


@pytest.mark.parametrize("target", [torch.tensor([0.0, 1.0]), torch.tensor([True, False]),
                                    [0, 1]])
def test_cam_targets_bad_target(target):
    with pytest.raises(TypeError, match="target"):
        with guidedrop.cam_targets(nn.Linear(4, 3), target):
            pass


# --- threads and replicas (SPEC §5, §8)


def test_cam_targets_per_thread():
    """Two threads, each inside its own block at the same time, read only their own
    weight and targets; the first to leave does not pop the other's."""
    m = guidedrop.CamDrop(block_size=3, keep=0.3, channel_rate=1.0)
    x = torch.randn(2, 4, 9, 9)
    u = torch.rand(x.shape)
    blocks = {0: (torch.randn(3, 4), torch.tensor([0, 2])),
              1: (torch.randn(5, 4), torch.tensor([4, 1]))}
    both_inside, first_left = threading.Barrier(2), threading.Event()
    seen, errors = {}, []

    def worker(i):
        try:
            weight, target = blocks[i]
            with guidedrop.cam_targets(weight, target):
                both_inside.wait(timeout=30)
                if i == 1:
                    first_left.wait(timeout=30)  # thread 0 has left its block
                w, t = guidedrop.context.current()
                seen[i] = (w is weight and t is target,
                           torch.equal(F.camdrop(x, w, t, 3, 0.3, channel_rate=1.0, noise=u),
                                       F.camdrop(x, weight, target, 3, 0.3, channel_rate=1.0,
                                                 noise=u)))
            if i == 0:
                first_left.set()
            with pytest.raises(RuntimeError, match="cam_targets"):
                m(x)  # outside its block: nothing, whatever the other thread holds
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            first_left.set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert seen == {0: (True, True), 1: (True, True)}


def test_cam_targets_compiled_in_a_copied_context():
    """Compiled CamDrop sees the block of a context copied into another thread, as eager
    does (asyncio.to_thread; the per-thread copy that torch 2.11 needs did not: a
    helper's attack). torch 2.11's Dynamo cannot trace ContextVar.get: a documented limit
    there (guidedrop.context)."""
    if not guidedrop.context._TRACES_CONTEXTVAR:
        pytest.skip("this torch's Dynamo cannot trace ContextVar.get (guidedrop.context)")
    torch._dynamo.reset()
    m = guidedrop.CamDrop(block_size=3, keep=0.3, channel_rate=1.0)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x, weight, target = torch.randn(2, 4, 9, 9), torch.randn(3, 4), torch.tensor([0, 2])

    def step(layer):
        with guidedrop.cam_targets(weight, target):
            context = contextvars.copy_context()  # the block, into a pool's thread
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            torch.manual_seed(3)
            return pool.submit(context.run, layer, x).result()

    assert torch.equal(step(compiled), step(m)) and not torch.equal(step(m), x)
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [guidedrop.CamDrop, guidedrop.FocusedDropout])
def test_data_parallel_replicas_refused(cls):
    """SPEC §5/§8: in nn.DataParallel replicas (made by Module._replicate_for_data_parallel,
    as torch.nn.parallel.replicate does) CamDrop and FocusedDropout refuse to train with an
    error pointing to DistributedDataParallel; eval mode stays the identity."""
    m = cls(**({"participation": 1.0} if cls is guidedrop.FocusedDropout else {}))
    replica = m._replicate_for_data_parallel()
    x = torch.randn(2, 4, 9, 9)
    with guidedrop.cam_targets(torch.randn(3, 4), torch.tensor([0, 1])):
        with pytest.raises(RuntimeError, match="DistributedDataParallel"):
            replica(x)
        m(x)  # the module itself still trains
    replica.eval()
    assert replica(x) is x
    if cls is guidedrop.FocusedDropout:  # refused at participation 0 too (the loop's
        replica.train()  # last_applied would be the replica's), as in a ramp's first step
        replica.participation = 0.0
        with pytest.raises(RuntimeError, match="DistributedDataParallel"):
            replica(x)


# --- LinearRamp (schedule)


def test_linear_ramp_integral_steps():
    model = _model()
    sched = guidedrop.LinearRamp(model, steps=np.int64(4))
    assert type(sched.steps) is int and sched.steps == 4
    for bad, exc in [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("5", TypeError)]:
        with pytest.raises(exc, match="steps"):
            guidedrop.LinearRamp(_model(), steps=bad)


def test_linear_ramp_refuses_nothing_to_ramp():
    """A ramp over no layer is a ValueError (a new user made it before
    guidedrop.models.insert: the rates then never ramped, silently), as torch's optimizers
    refuse an empty parameter list."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no guidedrop layer to ramp in the Sequential: "
                                         "insert the layers"):
        guidedrop.LinearRamp(model, steps=5)
    with pytest.raises(ValueError, match="no guidedrop layer to ramp$"):
        guidedrop.LinearRamp(layers=[], steps=5)
    with pytest.raises(ValueError, match="no guidedrop layer to ramp$"):  # layers= chosen
        guidedrop.LinearRamp(_model(), layers=[], steps=5)
    sched = guidedrop.LinearRamp(_model(), steps=5)
    sched.step()
    assert repr(sched) == f"LinearRamp(step_count=1, steps=5, layers={len(sched.layers)})"


def test_linear_ramp_layers_must_be_in_the_model():
    """LinearRamp(model, layers=...) ramps layers of that model: one outside it (which
    the ramp used to take silently, leaving the model's own layers alone) is a ValueError."""
    model = _model()
    ours = [m for m in model.modules() if isinstance(m, guidedrop.CorrDrop)][:1]
    assert guidedrop.LinearRamp(model, layers=ours, steps=3).layers == ours
    with pytest.raises(ValueError, match="layers must be modules of the model; not in it: "
                                         "CorrDrop"):
        guidedrop.LinearRamp(model, layers=[guidedrop.CorrDrop()], steps=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        guidedrop.LinearRamp("model", layers=ours)


def test_linear_ramp_layers_in_a_module_container():
    """``layers`` may be an nn.ModuleList or nn.Sequential of guidedrop layers, the usual
    way to keep them (both were refused as "a module", as a single layer is)."""
    held = nn.ModuleList([guidedrop.DropBlock2d(p=0.2), guidedrop.CorrDrop(p=0.1)])
    model = nn.Sequential(nn.Conv2d(4, 4, 1), *held)
    for layers in (held, nn.Sequential(*held)):
        assert guidedrop.LinearRamp(model, steps=10, layers=layers).layers == list(held)


@pytest.mark.parametrize("layers", [guidedrop.DropBlock2d(), 3, nn.Sequential(nn.ReLU()),
                                    nn.ModuleDict({"d": guidedrop.DropBlock2d()}),
                                    {"d": guidedrop.DropBlock2d()}])
def test_linear_ramp_layers_must_be_an_iterable_of_layers(layers):
    """A single layer (or a module, or a number) for ``layers`` is a TypeError naming
    ``layers`` (one layer gave "'DropBlock2d' object is not iterable"); a dict or
    ModuleDict too (it iterates its keys: "got str"), and a model given as layers says to
    pass it as the model."""
    with pytest.raises(TypeError, match="layers") as e:
        guidedrop.LinearRamp(layers=layers)
    assert "got str" not in str(e.value)
    if isinstance(layers, nn.Sequential):
        assert "LinearRamp(model)" in str(e.value)


@pytest.mark.parametrize("state, exc, match", [
    ([1, 2], TypeError, "dict"),
    ({}, ValueError, "step_count"),
    ({"step_count": 1, "steps": 10}, ValueError, "targets"),
    ({"step_count": 1, "steps": -1, "targets": None}, ValueError, "steps"),
    ({"step_count": -2, "steps": 10, "targets": None}, ValueError, "step_count"),
    ({"step_count": 1.5, "steps": 10, "targets": None}, TypeError, "step_count"),
    ({"step_count": 1, "steps": 10, "targets": 0.1}, TypeError, "targets"),
    ({"step_count": 1, "steps": 10, "targets": {0: 0.1, 1: 0.1, 2: 0.1}}, TypeError, "targets"),
    ({"step_count": 1, "steps": 10, "targets": {0.1, 0.2, 0.3}}, TypeError, "targets"),
    ({"step_count": 1, "steps": 10, "targets": [0.1]}, ValueError, "targets"),
    # a key load_state_dict would ignore (a typo, another object's state): refused
    ({"step_count": 1, "steps": 10, "targets": None, "extra": 1}, ValueError,
     "unexpected keys 'extra'"),
    ({"step_count": 1, "steps": 10, "targets": "high"}, ValueError, "targets"),
    ({"step_count": 1, "steps": 10, "targets": "above"}, ValueError, "targets"),
    ({"step_count": 10, "steps": 10, "targets": "selectout_one"}, ValueError,
     r"targets\[1\] = 1.0 is refused by Selectout: keep must be in"),
    # a target the layer refuses, not reached yet: a later step() would raise
    ({"step_count": 2, "steps": 10, "targets": "selectout_one"}, ValueError, r"targets\[1\]"),
])
def test_linear_ramp_refused_load_leaves_it_unchanged(state, exc, match):
    model = nn.Sequential(guidedrop.CorrDrop(p=0.2), guidedrop.Selectout(keep=0.8),
                          guidedrop.AttentionDrop(alpha=0.3))
    sched = guidedrop.LinearRamp(model, steps=4)
    sched.step()
    if isinstance(state, dict) and isinstance(state.get("targets"), str):
        state = {**state, "targets": {"high": [0.1, 0.1, 1.5], "above": [0.1, 0.1, 7],
                                      "selectout_one": [0.1, 1.0, 0.1]}[state["targets"]]}
    if isinstance(state, dict) and "targets" in state and state["targets"] is None:
        state = {**state, "targets": [0.1, 0.1, 0.1]}
    model[1].keep = 0.3  # 1 - (1 - 0.3) is 0.30000000000000004: restored as it was

    def params():
        return model[0].p, model[1].keep, model[2].alpha
    before, rates = sched.state_dict(), params()
    with pytest.raises(exc, match=match):
        sched.load_state_dict(state)
    assert sched.state_dict() == before
    assert params() == rates


@pytest.mark.parametrize("step_count, steps", [(2**1024, 1), (2**1024, 2**1030), (5, 0)],
                         ids=["past-the-end", "below-the-end", "no-steps"])
def test_linear_ramp_loads_huge_step_counts(step_count, steps):
    """A step count past the end is the end (the targets), whatever its size: a float
    division of 2**1024 overflowed, half-way through a load that then left the layers
    changed, and every later step() raised OverflowError. Below the end, the exact
    fraction (2**1024 / 2**1030 = 1/64)."""
    model = nn.Sequential(guidedrop.DropBlock2d(p=0.2), guidedrop.Selectout(keep=0.8))
    sched = guidedrop.LinearRamp(model, steps=10)
    sched.step()
    sched.load_state_dict({"step_count": step_count, "steps": steps, "targets": [0.3, 0.5]})
    assert model[0].p == (0.3 / 64 if step_count < steps else 0.3)
    sched.step()
    assert sched.state_dict()["step_count"] == step_count + 1


def test_linear_ramp_one_step_before_the_end():
    """One step before the end of a long ramp (999 of 1000) the rates are 0.999 of their
    targets (DropBlock's p 0.2 -> 0.1998; Selectout's drop_rate 0.2 -> 0.1998, keep 0.8002),
    not the targets yet; the next step reaches the parameters themselves."""
    model = nn.Sequential(guidedrop.DropBlock2d(p=0.2), guidedrop.Selectout(keep=0.8))
    sched = guidedrop.LinearRamp(model, steps=1000)
    for _ in range(999):
        sched.step()
    assert model[0].p == pytest.approx(0.1998, abs=1e-12)
    assert model[1].keep == pytest.approx(0.8002, abs=1e-12)
    sched.step()
    assert (model[0].p, model[1].keep) == (0.2, 0.8)


def test_primitives_convert_their_arguments():
    """The primitives follow SPEC §1's argument types too: numpy and Fraction values give
    the python values' results; bool is refused."""
    x = torch.randn(2, 3, 7, 7)
    P = guidedrop.primitives
    assert torch.equal(P.pooled_correlation(x, np.uint8(3)), P.pooled_correlation(x, 3))
    assert torch.equal(P.top_percentile_threshold(x, Fraction(50)),
                       P.top_percentile_threshold(x, 50.0))
    mask = torch.rand(2, 3, 3) < 0.5
    assert torch.equal(P.block_upsample(mask, np.int8(3), 7, 7), P.block_upsample(mask, 3, 7, 7))
    with pytest.raises(TypeError, match="k"):
        P.pooled_correlation(x, True)


def test_star_import_without_the_kernel_backends():
    """``from guidedrop import *`` binds the layers and helpers on a machine with neither
    Triton nor the CUDA extension: __all__ named the lazy backends, which a star import
    imports (an ImportError on every CPU-only install), and the submodules (``models``
    replaced torchvision's). Backends that are not installed are no fault: no warning."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # None in sys.modules: any import of it fails
        "sys.modules['guidedrop._C'] = None\n"
        "models = 'mine'\n"
        "from guidedrop import *\n"
        "import guidedrop\n"
        "assert DropBlock2d is guidedrop.DropBlock2d and cam_targets is guidedrop.cam_targets\n"
        "assert models == 'mine'\n"  # no submodule bound: a user's names are kept
        "assert not hasattr(guidedrop, 'triton_kernels')\n"
    )
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_every_public_submodule_is_an_attribute():
    """As the package docstring says: each public module of python/guidedrop is an
    attribute of ``guidedrop`` in a fresh interpreter, before anything imports it by name
    (``guidedrop.launches`` raised AttributeError until then); a backend that cannot load
    here says so."""
    import subprocess
    import sys
    code = (
        "import pathlib, guidedrop\n"
        "names = sorted(f.stem for f in pathlib.Path(guidedrop.__file__).parent.glob('*.py')"
        " if not f.stem.startswith('_'))\n"
        "assert 'launches' in names and set(names) <= set(dir(guidedrop)), names\n"
        "for name in names:\n"
        "    try:\n"
        "        getattr(guidedrop, name)\n"
        "    except AttributeError as e:\n"
        "        assert 'is not available here' in str(e), e\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_base_class_says_what_it_is():
    """guidedrop.GuidedDropout (exported for isinstance checks) called directly: a message
    naming the layers, not a bare NotImplementedError."""
    with pytest.raises(NotImplementedError, match="base class of guidedrop's layers"):
        guidedrop.GuidedDropout()(torch.randn(1, 2, 3, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated in 2.14
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_selectout_ramp_target_checked_at_its_first_step():
    """Selectout under a LinearRamp whose target keep drops more channels than there are
    candidates (keep = 0.5 of 16 channels: 8 > 3): the ValueError at the ramp's first
    training step, naming the target, not halfway through the run when the ramped keep gets
    there (a new user's run died late). A rate set by hand after the ramp is not its target."""
    layer = guidedrop.Selectout(top_rate=0.2, keep=0.5)
    x = torch.randn(2, 16, 5, 5)
    sched = guidedrop.LinearRamp(layers=[layer], steps=100)
    layer(x)  # step 0: keep = 1, the identity
    with pytest.raises(ValueError, match=r"end of its LinearRamp \(keep=0.5\)"):
        layer.eval()(x)  # eval mode checks what training will (it returned x)
    layer.train()
    sched.step()
    with pytest.raises(ValueError, match=r"end of its LinearRamp \(keep=0.5\) drops .* 8 "
                                         r"channels, more than the 3 candidates"):
        layer(x)  # keep = 0.995: 0 channels dropped now
    # traced, C is not an int: no check there (jit.trace's own refusal, FX's graph)
    with pytest.raises(RuntimeError, match="cannot record"):
        torch.jit.trace(layer, x)
    assert isinstance(torch.fx.symbolic_trace(layer), torch.fx.GraphModule)
    layer.keep = 0.9
    layer(x)
    guidedrop.LinearRamp(layers=[layer], steps=100).step()
    layer(x)


@pytest.mark.parametrize("name", list(OPS))
def test_sparse_tensors_are_refused(name):
    """x, noise, CamDrop's weight and target must be dense: a sparse one is a TypeError
    naming it (it failed deep inside torch, or the reference returned a sparse output)."""
    with pytest.raises(TypeError, match="x must be a dense"):
        call(name, x=_x().to_sparse())
    with pytest.raises(TypeError, match="noise must be a dense"):
        call(name, noise=torch.rand(NOISE_SHAPES[name]).to_sparse())
    if name == "camdrop":
        weight, target = _cam()
        with pytest.raises(TypeError, match="weight must be a dense"):
            call(name, weight=weight.to_sparse())
        with pytest.raises(TypeError, match="target must be a dense"):
            call(name, target=target.to_sparse())


def test_nested_tensors_are_refused():
    """A nested tensor (torch.nested.nested_tensor: strided, 4-D here, floating) is a
    TypeError naming x, also in eval mode; it passed the checks and failed inside torch
    ("NestedTensorImpl doesn't support sizes"), or came back from an eval module."""
    with pytest.warns(UserWarning, match="nested tensors is in prototype stage"):
        x = torch.nested.nested_tensor([torch.randn(3, 4, 4), torch.randn(3, 5, 5)])
    assert x.layout == torch.strided and x.dim() == 4
    for name, (op, kw) in OPS.items():
        args = _cam((2, 3, 4, 4)) if name == "camdrop" else ()  # (call() reads x.shape)
        for training in (True, False):
            with pytest.raises(TypeError, match="x must be a dense .* got a nested tensor"):
                op(x, *args, **kw, training=training)
    with pytest.raises(TypeError, match="x must be a dense .* got a nested tensor"):
        guidedrop.DropBlock2d().eval()(x)


def test_sparse_tensors_are_refused_by_the_primitives():
    from guidedrop import primitives as P
    with pytest.raises(TypeError, match="x must be a dense"):
        P.channel_max(_x().to_sparse())
    with pytest.raises(TypeError, match="mask must be a dense"):
        P.block_upsample(torch.ones(2, 2, 2).to_sparse(), 3, 6, 6)


def test_each_layer_names_its_paper():
    """Each layer's docstring names its paper (authors and title, as the README's list
    does; SPEC.md, which the functional docstrings cite, is not shipped)."""
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    for cls in MODULES:
        paper = " ".join(cls.__doc__.split("Paper: ", 1)[1].split())
        authors, title = paper.split(", ", 1)[0], paper.split('"')[1]
        assert f"({authors}, *{title}*" in readme, (cls.__name__, paper)


def test_each_layer_compiles_its_own_forward():
    """torch.compile keeps at most recompile_limit (8) compiled versions per code object:
    each layer's forward has its own, so that the variants of one layer (training, eval,
    channels_last, an x that requires grad) do not use up the others' (compiled one by one,
    SelectScale, SpatialScale and Selectout shared one forward, and Selectout's hit the
    limit: FailOnRecompileLimitHit)."""
    codes = {id(cls.forward.__code__) for cls in MODULES}  # (equal code objects compare equal)
    assert len(codes) == len(MODULES)
    assert guidedrop.Selectout.forward.__qualname__ == "Selectout.forward"
    assert guidedrop.Selectout.forward.__doc__ == guidedrop.GuidedDropout.forward.__doc__
    torch._dynamo.reset()
    x = torch.randn(2, 4, 6, 6)
    for cls in (guidedrop.SelectScale, guidedrop.SpatialScale, guidedrop.Selectout):
        m = cls()
        cm = torch.compile(m, fullgraph=True, backend="eager")
        cm(x)
        cm(x.to(memory_format=torch.channels_last))
        cm(x.clone().requires_grad_())
        m.eval()
        assert torch.equal(cm(x), x)  # the identity


def test_layers_compiled_one_by_one_share_their_class_budget():
    """The README: compiled one by one, instances of a class with other fixed arguments add
    2 graphs each to their forward's (the first non-zero rate, then the rate symbolic):
    four DropBlock2d of four block sizes ramped from 0 take 9 (1 identity + 4 + 4), so
    the default recompile_limit of 8 fails the ninth with fullgraph=True; a limit of 9
    runs them, then nothing recompiles."""
    from torch._dynamo.exc import FailOnRecompileLimitHit
    from torch._dynamo.testing import CompileCounter

    def train():
        torch._dynamo.reset()
        counter = CompileCounter()
        layers = [guidedrop.DropBlock2d(0.1, b) for b in (3, 5, 7, 9)]
        compiled = [torch.compile(m, backend=counter, fullgraph=True) for m in layers]
        ramp = guidedrop.LinearRamp(layers=layers, steps=3)
        for _ in range(5):
            x = torch.randn(2, 4, 12, 12)
            for cm in compiled:
                x = cm(x)
            ramp.step()
        return counter.frame_count

    # config.patch, not monkeypatch: the config module's attributes are not plain, and
    # monkeypatch's undo deleted the option (every later compile test in that worker failed)
    with torch._dynamo.config.patch(recompile_limit=8), pytest.raises(FailOnRecompileLimitHit):
        train()
    with torch._dynamo.config.patch(recompile_limit=9):
        assert train() == 9


class _MyCorrDrop(guidedrop.CorrDrop):
    """A user's layer (module level: pickled by reference)."""


def test_subclasses_keep_an_inherited_forward_and_pickle():
    """A subclass of a layer gets a forward of its own (pickled by reference, as any
    method); one that inherits a user's forward, from a base or a mixin, keeps it."""
    assert pickle.loads(pickle.dumps(_MyCorrDrop.forward)) is _MyCorrDrop.forward
    assert id(_MyCorrDrop.forward.__code__) != id(guidedrop.CorrDrop.forward.__code__)

    class Base(guidedrop.SelectScale):
        def forward(self, x):
            return "base"

    class Child(Base):
        pass

    class Mixin:
        def forward(self, x):
            return "mixin"

    class Mixed(Mixin, guidedrop.SpatialScale):
        pass

    x = _x()
    assert Child()(x) == "base" and Mixed()(x) == "mixin"
