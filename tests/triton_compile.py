"""Compile recorded Triton launches for a GPU target, with no GPU: ``python triton_compile.py
SPECS.json [CC ...]`` (default CC: 90, i.e. sm_90, the H100 and H200).

Run WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives interpreted
functions, which the compiler cannot take). Each spec is one launch as recorded by
``tests/test_triton_compile.py``: the kernel's module and name, its positional arguments as
``["ptr", dtype] | ["int", bits] | ["float"] | ["bool"] | ["none"]`` and its keyword
arguments (constexprs, and launch options such as num_warps). Every spec goes through
Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas); the first failure is printed with
its spec and the exit status is 1.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys

PTR = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
       "uint8": "u8", "int8": "i8", "int32": "i32", "int64": "i64", "bool": "i1"}


def source(spec):
    """(ASTSource, options) of one recorded launch."""
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature, constexprs, options = {}, {}, {}
    for param, arg in zip(kernel.params, spec["args"], strict=False):
        kind = arg[0]
        if param.is_constexpr or kind == "none":
            signature[param.name] = "constexpr"
            constexprs[param.name] = arg[1] if len(arg) > 1 else None
        elif kind == "ptr":
            signature[param.name] = "*" + PTR[arg[1]]
        elif kind == "int":
            signature[param.name] = f"i{arg[1]}"
        elif kind == "float":
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i1"
    names = {p.name for p in kernel.params}
    for name, value in spec["kwargs"].items():
        if name in names:
            signature[name] = "constexpr"
            # the interpreter-only bf16 rounding: the GPU casts natively
            constexprs[name] = False if name == "BF16_FIX" else value
        else:
            options[name] = value
    if getattr(kernel, "debug", None):  # @triton.jit(debug=True), as JITFunction.run reads it
        options.setdefault("debug", True)
    return ASTSource(kernel, signature, constexprs=constexprs), options


def compile_one(job):
    """"" when (cc, spec) compiles, else what failed."""
    import triton
    from triton.backends.compiler import GPUTarget

    cc, spec = job
    src, options = source(spec)
    try:
        triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # noqa: BLE001 - report the spec
        return f"FAILED sm_{cc}: {json.dumps(spec)}\n{type(e).__name__}: {e}"
    return ""


def main(path, ccs):
    specs = json.load(open(path))
    jobs = [(cc, spec) for cc in ccs for spec in specs]
    # one process per core: compiling (LLVM, ptxas) is single-threaded
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        failures = [f for f in pool.imap_unordered(compile_one, jobs) if f]
    if failures:
        print(f"{len(failures)} of {len(jobs)} failed; the first:\n{failures[0]}")
        return 1
    print(f"compiled {len(specs)} kernel specialisations for "
          + ", ".join(f"sm_{cc}" for cc in ccs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], [int(c) for c in sys.argv[2:]] or [90]))
