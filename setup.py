"""Build script for guidedrop.

Metadata lives in pyproject.toml; this file maps the packages and decides whether to
build the CUDA extension ``guidedrop._C``:

- packages: ``guidedrop`` from ``python/guidedrop`` and ``guidedrop.triton_kernels``
  from ``triton_kernels/``;
- ``guidedrop._C`` from ``csrc/*.cpp``, ``csrc/cuda/*.cu`` and ``csrc/cuda/plans/*.cu``,
  built only when torch is importable, CUDA is wanted (a GPU is visible or ``FORCE_CUDA=1``),
  nvcc is found (``CUDA_HOME``, default ``/usr/local/cuda``) and there is at least one
  source.
  Otherwise the install is pure Python and ``guidedrop`` still imports; but with
  ``FORCE_CUDA=1`` the build stops with the reason (pip shows setup.py's log only with -v,
  so a pure-Python fallback there would pass unseen).
- ``guidedrop._C.torch_version``: the torch it was built against, which
  ``guidedrop.cuda_backend`` compares with the torch it runs with.

Build the extension against the installed torch, without build isolation::

    CUDA_HOME=/usr/local/cuda FORCE_CUDA=1 python setup.py build_ext --inplace
    pip install --no-build-isolation -e .

``build_ext --inplace`` writes ``python/guidedrop/_C.*.so`` (the package_dir of
``guidedrop``), which is where an editable install imports ``guidedrop`` from.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = {"guidedrop": "python/guidedrop", "guidedrop.triton_kernels": "triton_kernels"}


def _packages() -> list[str]:
    """Every package under the two roots of PACKAGE_DIR, named as installed."""
    packages = []
    for name, path in PACKAGE_DIR.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(os.path.join(ROOT, path))]
    return sorted(set(packages))


def _rel(pattern: str) -> list[str]:
    # Relative paths keep object files under build_temp/csrc/... whatever the checkout path.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _log(msg: str) -> None:
    print(f"guidedrop setup: {msg}", file=sys.stderr)


def _nvidia_include_dirs() -> list[str]:
    """``<site-packages>/nvidia/cu13/include`` of the installed ``nvidia`` packages.

    torch's CUDA headers include cusparse.h, cublas_v2.h, ...; a bare CUDA toolkit lacks
    them, the pip-installed CUDA libraries that come with torch have them.
    """
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = [os.path.join(p, "cu13", "include") for p in getattr(nvidia, "__path__", [])]
    return [d for d in dirs if os.path.isdir(d)]


def _shared_libstdcxx() -> list[str]:
    """The link argument that makes guidedrop._C use libstdc++.so, the C++ runtime torch
    runs with: the file this process loaded (torch is imported), else -lstdc++.

    The H200 machine's compiler (CC/CXX=/opt/gcc/bin/{gcc,g++}) linked libstdc++
    statically (its ldd showed no libstdc++.so). With that second, private libstdc++ in
    the process, every argument check with a number in its message crashed the process
    there (SIGSEGV, 2026-12-04); here a static libstdc++ makes the numbers vanish from
    the message. Given before the driver's own libstdc++, this file supplies every symbol
    and the archive adds nothing, whether the driver asks for -static-libstdc++ or its
    folder has libstdc++.a only (where a plain -lstdc++ would take the archive too)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return [path]
    except OSError:
        pass
    return ["-lstdc++"]


def _chars(text: str) -> str:
    """``text`` as a C initializer list of its character codes: a macro value that survives
    the shell and ninja unquoted and that the preprocessor leaves alone (a version such as
    2.14.1+cu130 stringified from tokens could meet a predefined macro)."""
    return ",".join(str(ord(c)) for c in text)


def _extensions() -> tuple[list, dict]:
    want_cuda = os.environ.get("FORCE_CUDA", "0") == "1"

    def pure_python(why: str) -> tuple[list, dict]:
        if want_cuda:
            sys.exit(f"guidedrop setup: FORCE_CUDA=1, but {why}: guidedrop._C cannot be built")
        _log(f"{why}: pure-Python install")
        return [], {}

    sources = _rel("csrc/*.cpp") + _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/plans/*.cu")
    if not sources:
        return pure_python("there are no sources in csrc/")
    if os.environ.get("CUDA_HOME") is None and os.path.isdir("/usr/local/cuda"):
        # torch.utils.cpp_extension reads CUDA_HOME when imported; the nvcc on PATH may be
        # a wrapper from which torch would guess a wrong root (link fails: -lcudart).
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return pure_python(
            f"torch does not import ({e}; to build guidedrop._C install torch first and use "
            "`pip install --no-build-isolation`)")
    if not (want_cuda or torch.cuda.is_available()):
        return pure_python("no GPU is visible and FORCE_CUDA != 1 (guidedrop._C not built)")
    cuda_home = cpp_extension.CUDA_HOME
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return pure_python(f"nvcc is not found (CUDA_HOME={cuda_home!r})")

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    isystem = [flag for d in _nvidia_include_dirs() for flag in ("-isystem", d)]
    # No -std here: torch adds the standard its headers need (C++20 for torch 2.14, whose
    # ATen.h has `#error` below C++20). No --use_fast_math: kernels must match the
    # reference exactly.
    version = f"-DGUIDEDROP_TORCH_VERSION_CHARS={_chars(torch.__version__)}"
    extra_compile_args = {"cxx": ["-O3", version, *isystem], "nvcc": ["-O3", *isystem]}
    ext = cpp_extension.CUDAExtension(
        name="guidedrop._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=_shared_libstdcxx(),
    )
    _log(
        f"building guidedrop._C from {len(sources)} sources with CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
