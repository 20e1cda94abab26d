"""Compile recorded Triton launches for a GPU target, with no GPU: ``python triton_compile.py
SPECS.json [CC ...]`` (default CC: 90, i.e. sm_90, the H100 and H200).

Run WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives interpreted
functions, which the compiler cannot take). Each spec is one launch as recorded by
``tests/test_triton_compile.py``: the kernel's module and name, its positional arguments as
``guidedrop.sass.describe`` gives them (specialised as Triton's JIT specialises them:
ints equal to 1, multiples of 16 and 16-byte aligned pointers) and its keyword arguments
(constexprs, and launch options such as num_warps); ``guidedrop.sass.compile_spec``
compiles it. Every spec goes through Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX,
ptxas); the first failure is printed with its spec and the exit status is 1.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys


def compile_one(job):
    """"" when (cc, spec) compiles, else what failed."""
    from guidedrop.sass import compile_spec

    cc, spec = job
    try:
        compile_spec(spec, cc)
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
