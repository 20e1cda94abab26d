"""Build csrc/ as a CPU extension, ``guidedrop_emu``, that runs the CUDA kernels emulated.

The kernels of ``csrc/cuda/*.cu`` (and ``csrc/cuda/plans/*.cu``) and the op wrappers of
``csrc/guidedrop.cpp`` are compiled by the host C++ compiler against
``tests/cuda_emu/emu.h`` (one OS thread per CUDA thread, see there), so tests on a
machine without a GPU run the real kernel source:
``torch.ops.guidedrop_emu.<op>`` takes CPU tensors and does what ``torch.ops.guidedrop.<op>``
does on a GPU.

What changes on the way (every rewrite is checked; a source it no longer fits fails with a
:class:`RewriteError` that says what to update, so a test never runs stale code):

- ``*.cu`` -> ``*.cpp``: ``#include "emu.h"`` first; ``extern __shared__ T name[];`` ->
  the launch's dynamic shared memory; ``kernel<<<cfg>>>(args)`` ->
  ``emu::Launcher(cfg)(kernel, args)`` (``__shared__`` itself becomes ``static`` in emu.h).
- ``guidedrop.cpp``: the library is ``guidedrop_emu`` with the kernels registered for CPU
  (instead of CUDA; the CPU error kernels are dropped), the "must be a CUDA tensor" checks
  ask for CPU tensors, and more ops: ``emu_set_philox(int seed, int offset) -> ()`` sets
  the state of the emulated CUDA generator (seed 0, offset 0 at load),
  ``emu_launches() -> int`` counts the kernel launches since the library was loaded, and
  ``emu_record(bool on) -> ()`` turns on (off) a mode where launches are checked and
  recorded, not run (their outputs are left as allocated), ``emu_recorded() -> str[]``
  returning and clearing the records: "<source>:<line> <kernel> <grid> <block>".
- The CUDA runtime headers csrc includes (``c10/cuda/CUDAStream.h``, ``CUDAGuard.h``,
  ``CUDAException.h``, ``ATen/cuda/CUDAGeneratorImpl.h``) are replaced by stubs.

Two checks a CPU would not make on its own: UBSan's alignment check (``ALIGNMENT``) aborts
the process at an access misaligned for its type, a 16-byte vector off a 16-byte boundary
say (a fault on a GPU, a plain load on a CPU), and ``$GUIDEDROP_EMU_MAX_GRID`` (emu.h) lowers
``grid_for``'s cap, so that the grid-stride loops run several passes on small inputs.

The generated sources and the build live in ``<cache>/<hash>/`` (cache: $GUIDEDROP_EMU_CACHE,
default ``~/.cache/guidedrop-emu``; hash of csrc/, this folder, the torch and Python
versions and $CXX), never in the repository, so a rerun with the same sources reuses the
build. Needs a C++20 compiler with UBSan (gcc and clang have it), ninja and
``/usr/local/cuda/include`` (or $CUDA_HOME/include) for ``vector_types.h``; no GPU, no nvcc.

Run ``python tests/cuda_emu/build.py`` to build and print where the library is.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
CUDA_BACKEND = REPO / "python" / "guidedrop" / "cuda_backend.py"
NAME = "guidedrop_emu"
# An access at an address that is not a multiple of its type's alignment (csrc's alignas(16)
# Vec off a 16-byte boundary, say) faults on a GPU; a CPU reads it. UBSan's alignment check
# aborts the process instead.
ALIGNMENT = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
KEEP_BUILDS = 4  # older build folders under the cache are deleted


class RewriteError(RuntimeError):
    """A rewrite of the CUDA sources no longer fits them: update tests/cuda_emu/build.py."""


def _cuda_include_candidates() -> list[Path]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return [Path(h) / "include" for h in homes if h]


def cuda_include() -> Path:
    """The CUDA include folder with vector_types.h (the first of $CUDA_HOME/include,
    $CUDA_PATH/include, /usr/local/cuda/include that has it)."""
    for d in _cuda_include_candidates():
        if (d / "vector_types.h").is_file():
            return d
    return Path("/usr/local/cuda/include")


def unavailable() -> str:
    """Why the emulator cannot be built here (a missing prerequisite); empty when it can."""
    if not (cuda_include() / "vector_types.h").is_file():
        tried = ", ".join(str(d) for d in _cuda_include_candidates())
        return f"no CUDA headers (vector_types.h) in {tried}"
    return ""


def cache_root() -> Path:
    env = os.environ.get("GUIDEDROP_EMU_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guidedrop-emu"


# --------------------------------------------------------------------------- rewrites


def _sub(pattern: str, repl, text: str, where: str, what: str, count: int | None = None,
         flags: int = 0) -> str:
    """re.subn that fails unless it replaced `count` matches (at least one if None)."""
    out, n = re.subn(pattern, repl, text, flags=flags)
    if n == 0 or (count is not None and n != count):
        want = "at least 1" if count is None else str(count)
        raise RewriteError(
            f"{where}: expected {want} match(es) of the {what} pattern {pattern!r}, found {n}; "
            "the CUDA source changed in a way tests/cuda_emu/build.py does not know: update "
            "its rewrites (or emu.h)")
    return out


def _absent(pattern: str, text: str, where: str, what: str) -> None:
    m = re.search(pattern, text)
    if m:
        line = text.count("\n", 0, m.start()) + 1
        raise RewriteError(f"{where}:{line}: {what} left after the rewrites: {m.group(0)!r}; "
                           "update tests/cuda_emu/build.py")


# `name` or `name<args>` (one level of nested <...> in the template arguments).
_KERNEL = r"([A-Za-z_][\w:]*(?:\s*<(?:[^<>;]|<[^<>;]*>)*>)?)"


def _launch(m: re.Match, where: str) -> str:
    kernel, config, rest = m.group(1), m.group(2), m.group(3)
    # the launch site for emu_record: the source's line (the include prepended is line 1)
    line = m.string.count("\n", 0, m.start())
    site = f"{where}:{line} " + " ".join(kernel.split())
    return (f'emu::Launcher({config}).at("{site}")'
            f"({kernel}{')' if rest else ', '}")  # rest: `()`, no args


def rewrite_cuda(text: str, where: str) -> str:
    """A .cu / .cuh source -> C++ for the emulator."""
    out = '#include "emu.h"  // tests/cuda_emu: the SIMT emulator\n' + text
    if re.search(r"\bextern\s+__shared__\b", out):
        out = _sub(r"\bextern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)"
                   r"\s+(\w+)\s*\[\s*\]\s*;",
                   r"\1* \2 = emu::dyn_smem<\1>();", out, where, "extern __shared__")
    _absent(r"\bextern\s+__shared__\b", out, where, "an extern __shared__ declaration")
    launches = out.count("<<<")
    if launches:
        out = _sub(_KERNEL + r"\s*<<<(.*?)>>>\s*\(\s*(\))?", lambda m: _launch(m, where), out,
                   where, "kernel launch <<<...>>>", count=launches, flags=re.S)
    _absent(r"<<<|>>>\s*\(", out, where, "a kernel launch")
    return out


def rewrite_ops(text: str, where: str) -> str:
    """csrc/guidedrop.cpp -> the ops of library guidedrop_emu, CPU tensors in, no CUDA."""
    out = _sub(r"TORCH_LIBRARY\(\s*guidedrop\s*,", f"TORCH_LIBRARY({NAME},", text, where,
               "TORCH_LIBRARY(guidedrop, m)", count=1)
    # The CPU error kernels go (the kernels below take CPU tensors now).
    out = _sub(r"TORCH_LIBRARY_IMPL\(\s*guidedrop\s*,\s*CPU\s*,\s*m\s*\)\s*\{.*?\n\}\n", "", out,
               where, "TORCH_LIBRARY_IMPL(guidedrop, CPU, m) { ... }", count=1, flags=re.S)
    out = _sub(r"TORCH_LIBRARY_IMPL\(\s*guidedrop\s*,\s*CUDA\s*,",
               f"TORCH_LIBRARY_IMPL({NAME}, CPU,", out, where,
               "TORCH_LIBRARY_IMPL(guidedrop, CUDA, m)", count=1)
    _absent(r"TORCH_LIBRARY\w*\(\s*guidedrop\s*,", out, where, "a registration in guidedrop")
    # Inputs must be on the emulated device, the CPU.
    out = _sub(r"\.is_cuda\(\)", ".is_cpu()", out, where, "t.is_cuda() check")
    return out + _EXTRA_OPS


_EXTRA_OPS = f"""
// ---- added by tests/cuda_emu/build.py: the state of the emulated CUDA generator, and the
// launch count
#include "emu.h"
namespace {{
void emu_set_philox(int64_t seed, int64_t offset) {{
  auto& gen = emu::generator();
  std::lock_guard<std::mutex> lock(gen.mutex_);
  gen.seed_ = static_cast<uint64_t>(seed);
  gen.offset_ = static_cast<uint64_t>(offset);
}}
int64_t emu_launches() {{ return emu::launch_count().load(); }}
void emu_record(bool on) {{ emu::recording().store(on); }}
std::vector<std::string> emu_recorded() {{
  std::lock_guard<std::mutex> lock(emu::launch_mutex());
  return std::exchange(emu::records(), {{}});
}}
}}  // namespace
TORCH_LIBRARY_FRAGMENT({NAME}, m) {{
  m.def("emu_set_philox(int seed, int offset) -> ()", &emu_set_philox);
  m.def("emu_launches() -> int", &emu_launches);
  m.def("emu_record(bool on) -> ()", &emu_record);
  m.def("emu_recorded() -> str[]", &emu_recorded);
}}
"""

# Stand-ins for the CUDA runtime headers csrc/ includes: no device, no stream, a generator
# whose philox_cuda_state advances like CUDAGeneratorImpl's.
_STUBS = {
    "c10/cuda/CUDAException.h": """\
#pragma once
#include "emu.h"
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)(expr))
""",
    "c10/cuda/CUDAStream.h": """\
#pragma once
#include <c10/core/Device.h>
#include "emu.h"
namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
""",
    "c10/cuda/CUDAGuard.h": """\
#pragma once
#include <c10/core/Device.h>
#include <optional>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace c10::cuda
""",
    "ATen/cuda/CUDAGeneratorImpl.h": """\
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/cuda/PhiloxCudaState.h>
#include <c10/util/Exception.h>
#include <cstdint>
#include <mutex>
namespace at {
// philox_cuda_state as CUDAGeneratorImpl's (outside graph capture): the current (seed,
// offset), then offset += increment rounded up to a multiple of 4.
struct CUDAGeneratorImpl {
  std::mutex mutex_;
  uint64_t seed_ = 0, offset_ = 0;
  PhiloxCudaState philox_cuda_state(uint64_t increment) {
    increment = ((increment + 3) / 4) * 4;
    const PhiloxCudaState state(seed_, offset_);
    offset_ += increment;
    return state;
  }
};
template <>
inline CUDAGeneratorImpl* get_generator_or_default<CUDAGeneratorImpl>(
    const std::optional<Generator>& gen, const Generator&) {
  static CUDAGeneratorImpl impl;  // one per process: the emulated default generator
  TORCH_CHECK(!(gen.has_value() && gen->defined()),
              "guidedrop_emu: only the default (emulated) CUDA generator is supported");
  return &impl;
}
namespace cuda::detail {
inline const Generator& getDefaultCUDAGenerator(c10::DeviceIndex = -1) {
  static const Generator none;
  return none;
}
}  // namespace cuda::detail
}  // namespace at
namespace emu {
inline at::CUDAGeneratorImpl& generator() {
  return *at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt, at::Generator());
}
}  // namespace emu
""",
}


def _inputs() -> list[tuple[str, bytes]]:
    files = sorted(p for p in CSRC.rglob("*") if p.is_file())
    files += sorted(p for p in HERE.iterdir() if p.is_file() and p.suffix in (".h", ".py"))
    return [(str(p.relative_to(REPO)), p.read_bytes()) for p in files]


def source_hash() -> str:
    import torch

    h = hashlib.sha256()
    for rel, data in _inputs():
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    for extra in (torch.__version__, sys.version, os.environ.get("CXX", ""), str(cuda_include())):
        h.update(extra.encode() + b"\0")
    return h.hexdigest()[:16]


def _write(path: Path, text: str) -> None:
    """Write text to path unless it is there already (atomically: runs may share the dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def generate(src: Path) -> list[Path]:
    """Write the emulated sources under src; returns the translation units."""
    unknown = [p.name for p in CSRC.glob("*.c*") if p.name != "guidedrop.cpp"]
    if unknown:
        raise RewriteError(f"csrc/ has sources tests/cuda_emu/build.py does not know: {unknown}; "
                           "add them to its generate()")
    units = []
    # csrc/cuda and its subfolders (csrc/cuda/plans/), the tree kept, so that relative
    # includes ("../common.cuh") resolve as they do for nvcc.
    for path in sorted(p for p in (CSRC / "cuda").rglob("*") if p.is_file()):
        rel = path.relative_to(CSRC)
        text = path.read_text()
        if path.suffix == ".cu":
            out = src / rel.with_suffix(".cpp")
            _write(out, rewrite_cuda(text, f"csrc/{rel}"))
            units.append(out)
        elif path.suffix == ".cuh":
            _write(src / rel, rewrite_cuda(text, f"csrc/{rel}"))
        elif path.suffix in (".h", ".hpp"):
            _write(src / rel, text)
    if not units:
        raise RewriteError("csrc/cuda has no .cu sources")
    stems = [u.stem for u in units]
    clash = sorted({s for s in stems if stems.count(s) > 1} | ({"guidedrop"} & set(stems)))
    if clash:  # torch's ninja build names each object file after its source's base name
        raise RewriteError(f"csrc/cuda has sources of the same base name in two folders: {clash}")
    ops = src / "guidedrop.cpp"
    _write(ops, rewrite_ops((CSRC / "guidedrop.cpp").read_text(), "csrc/guidedrop.cpp"))
    _write(src / "include" / "emu.h", (HERE / "emu.h").read_text())
    for rel, text in _STUBS.items():
        _write(src / "include" / rel, text)
    return [ops, *units]


def _prune(root: Path, keep: Path) -> None:
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and d != keep),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[KEEP_BUILDS - 1:]:
        if time.time() - d.stat().st_mtime > 3600:  # not one that another run is using
            shutil.rmtree(d, ignore_errors=True)


@functools.cache
def build(verbose: bool = False) -> str:
    """Build (or reuse) and load the emulated library; returns the path of the .so.

    Raises RewriteError when csrc/ no longer fits the rewrites, and RuntimeError (with the
    compiler's output) when the generated sources do not compile.
    """
    from torch.utils.cpp_extension import load

    if os.environ.get("GUIDEDROP_EMULATOR") == "unmarked":
        raise RuntimeError("this test loads the CUDA emulator but is not marked `emulated` "
                           "(tests/testing.py: CUDA, emulated); the default run leaves "
                           "the emulator out")
    reason = unavailable()
    if reason:
        raise RuntimeError(f"cannot build the CUDA emulator: {reason}")
    root = cache_root()
    work = root / source_hash()
    src, out = work / "src", work / "build"
    units = generate(src)
    out.mkdir(parents=True, exist_ok=True)
    os.utime(work)
    _prune(root, work)
    path = load(
        NAME,
        [str(u) for u in units],
        extra_include_paths=[str(src / "include"), str(src), str(cuda_include())],
        extra_cflags=["-O1", "-std=c++20", "-pthread", "-ffp-contract=off", "-Wno-unknown-pragmas",
                      "-Wno-unused-function", "-Wno-attributes", *ALIGNMENT],
        extra_ldflags=["-pthread", *ALIGNMENT],
        build_directory=str(out),
        is_python_module=False,  # loads the library: registers torch.ops.guidedrop_emu.*
        verbose=verbose,
    )
    return path


def ops():
    """torch.ops.guidedrop_emu, after :func:`build`."""
    import torch

    build()
    return torch.ops.guidedrop_emu


@functools.cache
def backend() -> types.ModuleType:
    """python/guidedrop/cuda_backend.py on the emulated ops: a backend module whose
    primitives (and fake kernels) are the CUDA backend's, calling torch.ops.guidedrop_emu."""
    build()
    text = CUDA_BACKEND.read_text()
    where = "python/guidedrop/cuda_backend.py"
    text = _sub(r"^( *)from \. import _C\b.*$", r"\1_C = None  # (emulated: no guidedrop._C)",
                text, where, "from . import _C", count=1, flags=re.M)
    text = _sub(r"\btorch\.ops\.guidedrop\b", f"torch.ops.{NAME}", text, where,
                "torch.ops.guidedrop")
    text = _sub(r"([\"'])guidedrop::", rf"\1{NAME}::", text, where, '"guidedrop::<op>" (fakes)')
    mod = types.ModuleType("guidedrop_emu_backend")
    mod.__file__ = str(CUDA_BACKEND)
    exec(compile(text, f"{CUDA_BACKEND} (emulated)", "exec"), mod.__dict__)
    mod.unsupported = lambda x: ""  # the emulated ops take CPU tensors (the real ones: CUDA)
    return mod


if __name__ == "__main__":
    t0 = time.perf_counter()
    print(build(verbose="-v" in sys.argv))
    print(f"built / loaded in {time.perf_counter() - t0:.1f} s")
