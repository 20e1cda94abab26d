"""The packaging: what the source distribution carries, and setup.py's choice to build
guidedrop._C (a packaging audit's findings, 2026-12-07)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import guidedrop

ROOT = Path(__file__).resolve().parents[1]
TREE = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", ".ci", "csrc", "python",
        "triton_kernels", "tests", "benchmarks", "docs")
IGNORED = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.so", "*.egg-info")


def setup_py(*args: str, cwd: Path = ROOT, pre: str = "", **env: str):
    """``python setup.py ARGS`` in ``cwd`` (``pre``: Python run first, e.g. to hide torch),
    FORCE_CUDA unset unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "FORCE_CUDA"} | env
    code = f"{pre}\nimport runpy, sys\nsys.argv = ['setup.py', *{list(args)!r}]\n" \
           "runpy.run_path('setup.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_sdist_carries_what_a_build_needs(tmp_path):
    """Every file of csrc/ (its headers too: setuptools takes only ext_modules' sources,
    and none from a machine without CUDA), the Triton kernels, the contract the docstrings
    cite, the tests."""
    src = tmp_path / "src"
    src.mkdir()
    for name in TREE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=IGNORED)
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    run = setup_py("-q", "sdist", "-d", str(tmp_path / "dist"), cwd=src)
    assert run.returncode == 0, run.stderr
    (sdist,) = (tmp_path / "dist").glob("guidedrop-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    assert want - names == set(), sorted(want - names)
    assert {"csrc/cuda/common.cuh", "python/guidedrop/backend_contract.md"} <= names


@pytest.mark.parametrize("missing", ["nvcc", "torch"])
def test_force_cuda_refuses_a_pure_python_build(missing):
    """FORCE_CUDA=1 asks for guidedrop._C: without nvcc or torch the build stops with the
    reason (it used to log a line that pip shows only with -v, and install pure Python).
    Without FORCE_CUDA the same setup.py still goes on, pure Python."""
    kw = {"CUDA_HOME": "/nonexistent"} if missing == "nvcc" else {}
    pre = "import sys; sys.modules['torch'] = None" if missing == "torch" else ""
    forced = setup_py("--version", pre=pre, FORCE_CUDA="1", **kw)
    assert forced.returncode != 0
    why = {"nvcc": "nvcc is not found", "torch": "torch does not import"}[missing]
    assert f"FORCE_CUDA=1, but {why}" in forced.stderr, forced.stderr
    plain = setup_py("--version", pre=pre, **kw)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split()[-1] == guidedrop.__version__


def test_one_version():
    """pyproject.toml's version is guidedrop.__version__ (a static version: .ci/run builds
    guidedrop._C from a mirror of setup.py, pyproject.toml and csrc/ alone, where a version
    read from the package could not be found)."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == guidedrop.__version__
