"""The README's code blocks, as a newcomer uses them.

- "Set up and run": exactly two commands; the extras they install exist, and ``[test]``
  installs every third-party package that a test imports (``.ci/run`` runs the commands
  themselves, verbatim, in a fresh venv).
- "Use": the example runs as written on a smaller torchvision ResNet and a two-batch loader,
  for every layer, and every ``guidedrop.<name>`` the README mentions is an attribute of
  ``import guidedrop``.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import guidedrop
from guidedrop import models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def block(title: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)```", section(title), re.S).group(1)


def setup_commands() -> list[str]:
    return [line.split("#")[0].strip() for line in block("Set up and run", "bash").splitlines()
            if line.strip()]


def extras() -> dict[str, list[str]]:
    """The installed guidedrop's requirements: "" (always) and per extra."""
    out: dict[str, list[str]] = {"": []}
    for req in metadata.requires("guidedrop") or []:
        m = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", req)
        out.setdefault(m.group(1) if m else "", []).append(req.split(";")[0].strip())
    return out


def test_setup_block_is_the_two_commands():
    assert setup_commands() == [
        'pip install ".[demo]" && python -m guidedrop demo --quick',
        'pip install -e ".[test]" && python -m pytest -q',
    ]
    run = (ROOT / ".ci" / "run").read_text()
    assert "## Set up and run" in run  # CI reads and runs this very block


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` install, with their dependencies (installed ones)."""
    seen, todo = set(), [_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _third_party_imports() -> set[str]:
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"guidedrop", "cuda_emu"}
    names = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value.split(".")[0])
    return {n for n in names - local if n not in sys.stdlib_module_names}


def test_test_extra_installs_every_package_a_test_imports():
    """A newcomer's `pip install -e ".[test]"` must be enough: no test may skip or fail for
    a package the extra forgot (as for matplotlib, once)."""
    provided = _closure(extras()[""] + extras()["test"])
    dists = metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports()):
        owners = {_name(d) for d in dists.get(module, [])}
        if module == "triton" or not owners & provided:  # triton comes with torch (CUDA)
            if module != "triton":
                missing[module] = sorted(owners) or "not installed here"
    assert not missing, f"tests import these, which [test] does not install: {missing}"


def test_extras_named_in_the_readme_exist():
    names = set(re.findall(r"guidedrop\[(\w+)\]", README)) | {"demo", "test"}
    assert names <= set(extras()), names - set(extras())


def test_every_submodule_the_readme_names_is_an_attribute():
    named = set(re.findall(r"\bguidedrop\.([a-z][a-z_]*)", README))
    assert {"models", "functional", "primitives", "reference"} <= named
    optional = {"triton_kernels": "triton", "cuda_backend": "cuda"}
    for name in sorted(named):
        if name in optional and guidedrop.dispatch.load(optional[name])[0] is None:
            continue  # the backend cannot load here; its attribute says why
        assert hasattr(guidedrop, name), f"guidedrop.{name}"


def test_public_names_are_the_readmes():
    """``__all__`` of guidedrop.functional and guidedrop.primitives (``from ... import *``,
    ``dir()`` tools) is what the README documents: its table's functional ops, its list of
    hot paths (a new user saw V, dispatch, torch, ... among the primitives)."""
    ops = re.findall(r"^\| `\w+\([^|]*\| `(\w+)[`(]", README, flags=re.M)
    assert guidedrop.functional.__all__ == ops, ops
    hot = README.split("Hot paths, exposed in `guidedrop.primitives`:", 1)[1].split("none is", 1)[0]
    assert guidedrop.primitives.__all__ == re.findall(r"`(\w+)\(", hot)


# The README's own layer and CamDrop (the one that reads cam_targets) in the default run;
# the others (~5 s each) in .ci/run's slow stage.
@pytest.mark.parametrize("layer", [
    layer if layer in ("corrdrop", "camdrop") else pytest.param(layer, marks=pytest.mark.slow)
    for layer in models.LAYERS])
def test_use_example_runs(layer):
    torchvision = pytest.importorskip("torchvision")
    code = block("Use", "python")
    assert "torchvision.models.resnet50()" in code and '"corrdrop"' in code
    code = code.replace("torchvision.models.resnet50()",
                        "torchvision.models.resnet18(num_classes=10)")
    code = code.replace('"corrdrop"', repr(layer))
    readme_loader = "[(torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,)))]"
    assert readme_loader in code  # runs as pasted; here smaller, two batches
    code = code.replace(readme_loader, "given_loader")
    images = torch.randn(4, 3, 32, 32)
    loader = [(images, torch.tensor([0, 1, 2, 3])), (images.flip(0), torch.tensor([3, 2, 1, 0]))]
    before = torchvision.models.resnet18(num_classes=10)
    scope = {"given_loader": loader}
    exec(compile(code, "README.md (Use)", "exec"), scope)
    model, sched = scope["model"], scope["sched"]
    added = [m for m in model.modules() if isinstance(m, guidedrop.GuidedDropout)]
    assert added and sched.step_count == len(loader)
    assert all(p.grad is None for p in model.parameters())  # zero_grad after each step
    assert len(list(model.parameters())) == len(list(before.parameters()))
