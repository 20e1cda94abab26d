"""Static performance counts of compiled kernels, read from their SASS (no GPU needed).

For one kernel's SASS (sm_90, from ``cuobjdump -sass``) :func:`count` gives:

- ``per_element``: SASS instructions per element of x in the steady state: the
  instructions of the loop that streams x (the loop whose own body, without the loops
  nested in it, loads the most global bytes, if more than the code outside every loop
  does; a CALL in it adds the routine it calls)
  divided by the elements of x one thread handles per iteration of that loop; for a kernel
  without such a loop, the whole kernel divided by the elements of x per thread. How the
  elements per thread are derived is the caller's (see :func:`triton_elements` and
  :func:`cuda_elements`): this module only reads instructions.
- ``loads`` / ``stores``: the widths in bits of the global loads and stores (LDG / STG) of
  that steady state: 128 for .128, 64 for .64, 16 for .U16/.S16, 8 for .U8/.S8, else 32.
- ``divisions``: integer divisions / remainders by a runtime value in that steady state.
  ptxas computes the divisor's reciprocal once (``I2F[.U32].RP`` + ``MUFU.RCP``, hoisted
  and shared by every division by that value), then per division a quotient estimate
  ``IMAD.HI.U32 q, rcp, a, RZ`` and a correction; a 64-bit division CALLs a routine that
  holds ``I2F.U64.RP``. So a division counts as that IMAD.HI.U32 (all registers: a division
  by a constant multiplies by an immediate magic number) or that CALL. Checked on kernels
  that divide int32, uint32 and int64 by an argument, and by constants (tests/
  test_static_perf.py); nvcc's inline 32-bit fast path of a 64-bit division counts too, so
  such a division counts twice.
- ``spills``: local-memory stores and loads (STL / LDL) anywhere in the kernel: register
  spills (or a local array, as costly).

Tools: ``cuobjdump`` from Triton's package (triton/backends/nvidia/bin), else the CUDA
toolkit's. Triton kernels are compiled for sm_90 from a recorded launch (:func:`compile_spec`,
the machinery of tests/triton_compile.py); the CUDA extension's kernels are read from the
built ``guidedrop._C`` (:func:`cuda_kernels`).

``python -m guidedrop.sass SPECS.json [DTYPE...]`` (run WITHOUT ``TRITON_INTERPRET``):
compiles each recorded launch and prints one JSON object per spec with its counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

SM = 90  # the H100 / H200

# --------------------------------------------------------------------------- SASS text

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
_RCP_IDIOM = re.compile(r"^I2F(\.U32|\.U64|\.S64)?\.RP\b")
_REG = re.compile(r"^R\d+(\.reuse)?$")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "@P0", "@!P1" or ""
    op: str  # opcode with modifiers, e.g. "LDG.E.128.CONSTANT"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse(text: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` output -> {mangled kernel name: instructions}. The padding
    after the last EXIT (``BRA`` to itself, NOPs) is dropped."""
    out = {}
    parts = _FUNC.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        instrs = []
        for addr, code in _LINE.findall(body):
            pred = ""
            if code.startswith("@"):
                pred, code = code.split(None, 1)
            op, _, args = code.partition(" ")
            instrs.append(Instr(int(addr, 16), pred, op, args.strip()))
        while instrs and (instrs[-1].op == "NOP" or _target(instrs[-1]) == instrs[-1].addr):
            instrs.pop()
        out[name] = instrs
    return out


def _target(i: Instr) -> int | None:
    if i.base in ("BRA", "CALL") and (m := re.search(r"0x([0-9a-f]+)", i.args)):
        return int(m.group(1), 16)
    return None


def width(i: Instr) -> int:
    """Bits moved per thread by one LDG / STG."""
    mods = set(i.op.split(".")[1:])
    for bits in (128, 64):
        if str(bits) in mods:
            return bits
    if mods & {"U16", "S16"}:
        return 16
    if mods & {"U8", "S8"}:
        return 8
    return 32


# --------------------------------------------------------------------------- counts


@dataclasses.dataclass
class Counts:
    kernel: str
    instructions: int  # the whole kernel, static
    steady: int  # the steady state's instructions (the streaming loop's, or the kernel's)
    loop: bool  # whether the steady state is a loop
    elements: float  # elements of x per thread in that steady state
    loads: dict[int, int]  # LDG width in bits -> count, in the steady state
    stores: dict[int, int]  # STG likewise
    divisions: int  # runtime integer divisions / remainders in the steady state
    spills: int  # STL + LDL in the whole kernel

    @property
    def per_element(self) -> float:
        return self.steady / self.elements

    @property
    def divisions_per_element(self) -> float:
        return self.divisions / self.elements

    def narrow(self, itemsize: int) -> int:
        """Global loads and stores of exactly one element of x (``itemsize`` bytes)."""
        return self.loads.get(8 * itemsize, 0) + self.stores.get(8 * itemsize, 0)

    def widths(self) -> str:
        """e.g. "ld 128,32 st 128": the widths of the steady state's loads and stores."""
        def w(c):
            return ",".join(str(b) for b in sorted(c, reverse=True)) or "-"
        return f"ld {w(self.loads)} st {w(self.stores)}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(per_element=self.per_element, divisions_per_element=self.divisions_per_element,
                 widths=self.widths())
        return d


def _routines(instrs: list[Instr]) -> dict[int, list[Instr]]:
    """{entry address: instructions up to its RET} of every CALLed routine."""
    out = {}
    for t in {_target(i) for i in instrs if i.base == "CALL"} - {None}:
        body = []
        for i in instrs:
            if i.addr >= t:
                body.append(i)
                if i.base == "RET":
                    break
        out[t] = body
    return out


def _is_division(i: Instr, routines: dict[int, list[Instr]]) -> bool:
    """One integer division or remainder by a runtime value: the quotient estimate
    ``IMAD.HI.U32 q, rcp, a, RZ`` (all registers: a constant divisor multiplies by an
    immediate), or a CALL of the 64-bit routine (it holds ``I2F.U64.RP``)."""
    if i.op == "IMAD.HI.U32":
        ops = [o.strip() for o in i.args.split(",")]
        return len(ops) == 4 and ops[3] == "RZ" and all(_REG.match(o) for o in ops[1:3])
    if i.base == "CALL":
        return any(_RCP_IDIOM.match(j.op) for j in routines.get(_target(i), []))
    return False


def count(kernel: str, instrs: list[Instr], elements: float) -> Counts:
    """The counts of one kernel, ``elements`` of x per thread (per iteration of the loop
    that streams x when the kernel has one, else per thread in all)."""
    routines = _routines(instrs)
    in_routine = {i.addr for body in routines.values() for i in body}
    main = [i for i in instrs if i.addr not in in_routine]
    # loops: a backward branch closes [target, branch]
    loops = [(_target(i), i.addr) for i in main if i.base == "BRA"
             and _target(i) is not None and _target(i) < i.addr]

    def own(lo, hi):
        inner = [(a, b) for a, b in loops if lo <= a and b <= hi and (a, b) != (lo, hi)]
        return [i for i in main if lo <= i.addr <= hi
                and not any(a <= i.addr <= b for a, b in inner)]

    def loaded(body):
        return sum(width(i) for i in body if i.base == "LDG")

    def widest(body):
        return max((width(i) for i in body if i.base == "LDG"), default=0)

    # the loop that loads the most bits; of loops that load as many, the one with the
    # widest loads (x's 16-byte vectors, not a loop over a few float64 statistics), then
    # the shortest
    best = max(loops, key=lambda lh: (loaded(own(*lh)), widest(own(*lh)), -(lh[1] - lh[0])),
               default=None)
    # x streams through that loop only if it loads more than the code outside every loop
    # (an apply kernel that loads x once and loops over a few mask rows is loop-free here)
    outside = loaded([i for i in main if not any(a <= i.addr <= b for a, b in loops)])
    body = main if best is None or loaded(own(*best)) <= outside else own(*best)
    steady = list(body)
    for i in body:  # a CALLed routine runs once per call
        if i.base == "CALL":
            steady += routines.get(_target(i), [])
    return Counts(
        kernel=kernel,
        instructions=len(instrs),
        steady=len(steady),
        loop=body is not main,
        elements=elements,
        loads=dict(Counter(width(i) for i in steady if i.base == "LDG")),
        stores=dict(Counter(width(i) for i in steady if i.base == "STG")),
        divisions=sum(1 for i in body if _is_division(i, routines)),
        spills=sum(1 for i in instrs if i.base in ("STL", "LDL")),
    )


# --------------------------------------------------------------------------- tools


def tool(name: str) -> str | None:
    """Path of ``cuobjdump`` / ``nvdisasm`` / ``ptxas``: Triton's package, then CUDA_HOME,
    then PATH; None when none has it."""
    dirs = []
    with contextlib.suppress(ImportError):
        import triton
        dirs.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    dirs.append(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin")
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return shutil.which(name)


def disassemble(binary: str | bytes, arch: int = SM) -> dict[str, list[Instr]]:
    """SASS of a cubin (bytes or a path) or of a host binary with embedded cubins (the
    CUDA extension's .so), for ``sm_<arch>``: {mangled kernel name: instructions}.
    Raises RuntimeError when no cuobjdump is found or it fails."""
    exe = tool("cuobjdump")
    if exe is None:
        raise RuntimeError("no cuobjdump (neither Triton's package nor the CUDA toolkit)")
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(binary, bytes):
            path = Path(tmp) / "kernel.cubin"
            path.write_bytes(binary)
            binary = str(path)
        args = [exe, "-sass", binary] if binary.endswith(".cubin") else \
            [exe, "-sass", "-arch", f"sm_{arch}", binary]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return parse(done.stdout)


# --------------------------------------------------------------------------- Triton

PTR = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
       "uint8": "u8", "int8": "i8", "int32": "i32", "int64": "i64", "bool": "i1"}
_TT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "int32": "i32"}
_TTGIR_ACCESS = re.compile(r"tt\.(load|store)\b.*?tensor<([0-9x]+)x!tt\.ptr<(\w+)>")


def describe(a):
    """A positional kernel argument as a spec records it: ``["ptr", dtype, aligned]`` (a
    tensor; aligned: its data at a multiple of 16 bytes), ``["int", bits, value]``,
    ``["float", value]``, ``["bool", value]`` or ``["none"]``."""
    import torch
    if isinstance(a, torch.Tensor):
        return ["ptr", str(a.dtype).removeprefix("torch."), a.data_ptr() % 16 == 0]
    if a is None:
        return ["none"]
    if isinstance(a, bool):
        return ["bool", a]
    if isinstance(a, int):
        return ["int", 32 if -2**31 <= a < 2**31 else 64, a]
    if isinstance(a, float):
        return ["float", a]
    raise TypeError(f"unexpected kernel argument {a!r}")


def specialisation(arg) -> str:
    """What Triton's JIT specialises a launch on, for one described argument: "1" (an int
    equal to 1 becomes a constexpr), "D" (an int that is a multiple of 16, or a pointer
    aligned to 16 bytes: ``tt.divisibility = 16``, what lets it emit 16-byte accesses) or
    "". Launches that differ only elsewhere compile to the same kernel."""
    if arg[0] == "int" and len(arg) > 2:
        return "1" if arg[2] == 1 else "D" if arg[2] % 16 == 0 else ""
    if arg[0] == "ptr" and len(arg) > 2:
        return "D" if arg[2] else ""
    return ""


def _runtime_kwargs(spec) -> set[str]:
    """The keyword arguments of a recorded launch that are runtime parameters of its kernel
    (not constexpr): Triton passes them like positional ones, specialised the same way."""
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    # from the Python function's annotations: the recording runs under TRITON_INTERPRET=1,
    # where the kernel is an InterpretedFunction (no .params)
    params = inspect.signature(kernel.fn).parameters
    return {n for n, p in params.items() if "constexpr" not in str(p.annotation)} \
        & set(spec["kwargs"])


def spec_key(spec) -> str:
    """The launches that compile to one kernel share this key."""
    args = [a[:2] + [specialisation(a)] for a in spec["args"]]
    runtime = _runtime_kwargs(spec)
    kwargs = {k: (describe(v)[:2] + [specialisation(describe(v))] if k in runtime else v)
              for k, v in spec["kwargs"].items()}
    return json.dumps({**spec, "args": args, "kwargs": kwargs}, sort_keys=True)


def spec_source(spec):
    """(ASTSource, options) of one recorded launch: ``{"module", "kernel", "args",
    "kwargs"}``, args as :func:`describe` gives them, specialised as Triton's JIT does
    (:func:`specialisation`; not where a parameter is marked ``do_not_specialize``)."""
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature, constexprs, attrs, options = {}, {}, {}, {}
    index = {p.name: i for i, p in enumerate(kernel.params)}
    # A runtime parameter passed by keyword is a runtime argument all the same (Triton's JIT
    # binds keywords to parameters): described here as the positional ones are, so that it
    # is not compiled as a constant.
    runtime = _runtime_kwargs(spec)
    bound = [*zip(kernel.params, spec["args"], strict=False),
             *((kernel.params[index[k]], describe(spec["kwargs"][k])) for k in runtime)]
    for param, arg in bound:
        i = index[param.name]
        kind = arg[0]
        special = "" if getattr(param, "do_not_specialize", False) else specialisation(arg)
        if special == "D" and getattr(param, "do_not_specialize_on_alignment", False):
            special = ""
        if param.is_constexpr or kind == "none" or special == "1":
            signature[param.name] = "constexpr"
            constexprs[param.name] = None if kind == "none" else arg[-1]
            continue
        if kind == "ptr":
            signature[param.name] = "*" + PTR[arg[1]]
        elif kind == "int":
            signature[param.name] = f"i{arg[1]}"
        elif kind == "float":
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i1"
        if special == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in spec["kwargs"].items():
        if name in runtime:
            continue
        if name in index:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            options[name] = value
    signature = {p.name: signature[p.name] for p in kernel.params if p.name in signature}
    if getattr(kernel, "debug", None):  # @triton.jit(debug=True), as JITFunction.run reads it
        options.setdefault("debug", True)
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), options


def compile_spec(spec, cc: int = SM):
    """Triton's whole pipeline (TTIR ... ptxas) for ``sm_<cc>``: the CompiledKernel. Must
    run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options = spec_source(spec)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def triton_elements(ttgir: str, num_warps: int, dtype: str) -> float:
    """Elements of x per thread per iteration: the largest tensor of x's dtype that the
    kernel loads (its TTGIR; inside the streaming loop when there is one, as the tile of x
    is what that loop loads) over the 32 * num_warps threads of a program. A kernel that
    loads nothing of x's dtype (the seed kernels) counts its largest load or store."""
    sizes = {}
    for kind, shape, elem in _TTGIR_ACCESS.findall(ttgir):
        n = 1
        for d in shape.split("x"):
            n *= int(d)
        key = "x" if elem == _TT.get(dtype, dtype) and kind == "load" else "other"
        sizes[key] = max(sizes.get(key, 0), n)
    n = sizes.get("x") or sizes.get("other") or 1
    return max(n / (32 * num_warps), 1.0)


def triton_counts(spec, dtype: str, cc: int = SM) -> Counts:
    """Counts of one recorded Triton launch compiled for ``sm_<cc>``; ``dtype`` is x's
    ("bfloat16", "float32", ...). Kept beside Triton's cache (``$TRITON_CACHE_DIR``, else
    ``~/.triton/cache``) under ``guidedrop-sass/``, keyed by the cubin, the elements per
    thread and this module's source: disassembling takes longer than a cached compile."""
    k = compile_spec(spec, cc)
    elements = triton_elements(k.asm["ttgir"], k.metadata.num_warps, dtype)
    h = hashlib.sha256(k.asm["cubin"])
    h.update(f"{spec['kernel']} {elements!r}".encode())
    h.update(Path(__file__).read_bytes())
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    path = cache / "guidedrop-sass" / f"{h.hexdigest()}.json"
    if path.is_file():
        return counts_from_dict(json.loads(path.read_text()))
    (name, instrs), = disassemble(k.asm["cubin"]).items()
    counts = count(spec["kernel"], instrs, elements)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: pool processes share the folder
    tmp.write_text(json.dumps(counts.as_dict()))
    tmp.replace(path)
    return counts


@contextlib.contextmanager
def gpu_tiles():
    """While active, the Triton launchers choose the tiles they choose on a GPU, also under
    TRITON_INTERPRET=1 (where ``_common`` gives the interpreter larger tiles): every
    module-level int constant that differs between the two modes, read from a child process
    without TRITON_INTERPRET, is set to its GPU value (``_common.INTERPRET`` itself stays)."""
    import guidedrop.triton_kernels as tk
    mods = {n: m for n, m in sys.modules.items()
            if n == tk.__name__ or n.startswith(tk.__name__ + ".")}
    gpu = _gpu_constants(tuple(sorted(mods)))
    saved = []
    try:
        for name, consts in gpu.items():
            m = mods[name]
            for k, v in consts.items():
                keep = k == "INTERPRET" and name.endswith("._common")  # the launch mode
                if hasattr(m, k) and getattr(m, k) != v and not keep:
                    saved.append((m, k, getattr(m, k)))
                    setattr(m, k, v)
        yield
    finally:
        for m, k, v in reversed(saved):
            setattr(m, k, v)


@functools.cache
def _gpu_constants(modules: tuple[str, ...]) -> dict[str, dict]:
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    m = importlib.import_module(n)\n"
            "    out[n] = {k: v for k, v in vars(m).items() if k.isupper()\n"
            "              and isinstance(v, (int, bool))}\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def triton_counts_batch(specs, dtypes, timeout=None) -> list[dict]:
    """Counts (``Counts.as_dict()``, or ``{"error": ...}``) of recorded launches, compiled in
    a child process without TRITON_INTERPRET (one process per core), within ``timeout``
    seconds (None: no bound; a cold compile of every streaming kernel takes many minutes
    on 2 cores, the callers' own bounds apply)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "specs.json"
        path.write_text(json.dumps([{"spec": s, "dtype": d}
                                    for s, d in zip(specs, dtypes, strict=True)]))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        done = subprocess.run([sys.executable, "-m", "guidedrop.sass", str(path)], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError("python -m guidedrop.sass failed:\n"
                           + done.stdout[-3000:] + done.stderr[-3000:])
    return json.loads(done.stdout)


def counts_from_dict(d: dict) -> Counts:
    """The inverse of ``Counts.as_dict`` (after a JSON round trip)."""
    fields = {f.name for f in dataclasses.fields(Counts)}
    return Counts(**{k: ({int(b): n for b, n in v.items()} if k in ("loads", "stores") else v)
                     for k, v in d.items() if k in fields})


def _count_job(job):
    try:
        return triton_counts(job["spec"], job["dtype"]).as_dict()
    except Exception as e:  # noqa: BLE001 - reported per spec
        return {"kernel": job["spec"]["kernel"], "error": f"{type(e).__name__}: {e}"}


def main(path: str) -> int:
    import multiprocessing
    jobs = json.load(open(path))
    # one process per core: LLVM and ptxas are single-threaded
    with multiprocessing.get_context("spawn").Pool(min(os.cpu_count() or 1, len(jobs) or 1)) as p:
        print(json.dumps(p.map(_count_job, jobs)))
    return 0


# --------------------------------------------------------------------------- the kernels

# The streaming kernels and their kind (which budgets of issue 13 item 1 they meet:
# tests/test_static_perf.py): Triton by kernel name, CUDA by op (CUDA_KERNELS).
TRITON_STREAMING = {
    "_apply_channel_kernel": "apply", "_apply_block_kernel": "apply",
    # contiguous NCHW x (triton_kernels/_common.py flat_launch): flat tiles
    "_apply_channel_flat_kernel": "apply", "_apply_block_flat_kernel": "apply",
    "_apply_attention_flat_kernel": "apply", "_apply_bits_flat_kernel": "apply",
    # channels_last AttentionDrop (triton_kernels/percentile_threshold.py) and apply_seeds
    # with r = 1 (block_mask.py): a tile per sample
    "_apply_attention_cl_kernel": "apply", "_apply_bits_cl_kernel": "apply",
    "_channel_stats_kernel": "statistics", "_pooled_correlation_kernel": "statistics",
    "_cam_kernel": "statistics", "_select_kernel": "statistics",
    "_seed_bits_kernel": "seeds", "_seed_coverage_kernel": "seeds",
}
CUDA_STREAMING = {
    "apply_channel": "apply", "apply_block": "apply", "apply_seeds": "apply",
    "apply_attention": "apply", "channel_stats": "statistics",
    "pooled_correlation": "statistics", "cam": "statistics", "select": "statistics",
    "seed_bits": "seeds", "seed_coverage": "seeds",
}

# Issue 13 item 1's budgets (tests/test_static_perf.py holds every streaming kernel to them;
# ``bench --model`` marks the kernels that miss them): SASS instructions per element of x in
# the steady state, by kind and x's dtype.
SASS_BUDGET = {("apply", "bfloat16"): 15, ("apply", "float32"): 30,
               ("statistics", "bfloat16"): 20}
# The Triton whose compiled code the budgets and tests/test_static_perf.py's figures were
# read from: CI's pair (.ci/run's REQUIREMENTS, torch 2.14.1). Others emit other SASS, and
# some kernels take another form for them (triton_kernels' TRITON_VERSION); on 2026-12-03
# tests/test_static_perf.py's Triton half, run with Triton 3.6 (the GPU machine's) and 3.9
# (CALIBRATED_TRITON set to theirs), gave the same results as with 3.8: every kernel within
# budget but those over it (OVER_BUDGET).
CALIBRATED_TRITON = "3.8"


def budget_violations(c: Counts, kind: str, dtype: str) -> list[str]:
    """What of the budgets ``c`` (one compiled kernel of ``kind``, x of ``dtype``) misses:
    spills; more than 2 runtime divisions (one index's quotient and remainder) per 16 bytes
    of x; then, but for the seed kernels (held to the division budget only), more SASS per
    element than SASS_BUDGET, no 16-byte loads (and stores for the apply kernels), or more
    than one access of a single element of x per 16 bytes of x."""
    size = ITEMSIZE[dtype]
    per16 = 16 / size / c.elements  # "per 16 bytes of x" as a factor on per-thread counts
    out = []
    if c.spills:
        out.append(f"{c.spills} spill instructions")
    if c.divisions * per16 > 2:
        out.append(f"{c.divisions_per_element:.2f} runtime divisions per element")
    if kind == "seeds":
        return out
    limit = SASS_BUDGET.get((kind, dtype))
    if limit is not None and c.per_element > limit:
        out.append(f"{c.per_element:.1f} SASS per element > {limit}")
    if 128 not in c.loads or (kind == "apply" and 128 not in c.stores):
        out.append(f"no 16-byte {'loads' if 128 not in c.loads else 'stores'} ({c.widths()})")
    elif c.narrow(size) * per16 > 1:
        out.append(f"{c.narrow(size) / c.elements:.2f} single-element accesses per element "
                   f"({c.widths()})")
    return out


# --------------------------------------------------------------------------- CUDA

# The CUDA extension's streaming kernels by op (as guidedrop.launches names them,
# "cuda:<op>"): a regex on the demangled name, {T} standing for x's C++ type.
CUDA_KERNELS = {
    "apply_channel": r"apply_channel_(maps|pixels)_kernel<{T}>",
    "apply_block": r"apply_block_(rows|pixels)_kernel<{T}[,>]",
    "apply_seeds": r"apply_bits_(maps|pixels)_kernel<{T},",
    "apply_attention": r"apply_attention_(maps|pixels)_kernel<{T},",
    "channel_stats": r"channel_stats_(warp|lane)_kernel<{T}>",
    "pooled_correlation": r"pooled_correlation_kernel<{T}>",
    "cam": r"\bcam_kernel<{T},",  # the op's, and CamDrop's plan's
    "select": r"map_select_(regs_)?kernel<{T}[,>]",
    "seed_bits": r"seed_bits_kernel<{T}>",
    "seed_coverage": r"seed_coverage_kernel\(",
}
# The CUDA ops a layer launches ("cuda:<op>" in guidedrop.launches) -> the kernels above.
CUDA_OP_KERNELS = {
    **{op: (op,) for op in CUDA_KERNELS},
    "attention_stats": ("select",), "map_threshold": ("select",),
    "attentiondrop_plan": ("select",), "seeds_plan": ("seed_bits", "seed_coverage"),
    "camdrop_plan": ("cam", "seed_bits"),
}
CPP_TYPES = {"bfloat16": "c10::BFloat16", "float16": "c10::Half", "float32": "float"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


# The apply kernels whose streaming loop handles one 16-byte chunk of x per iteration.
_CHUNK_KERNEL = re.compile(
    r"\bapply_(channel_(maps|pixels)_|block_(rows|pixels)_|attention_(maps|pixels)_"
    r"|bits_(maps|pixels)_)?kernel<")
# The kernels whose streaming loop reads x only as pairs of aligned 16-byte vectors, each
# pair realigned in registers to 16 bytes of x (the second vector skipped at run time where
# x's rows start on 16 bytes), its other loads per-row scalars (alpha[n, c], whose 4 bytes
# are not float32 x's): the NCHW vector loop of the CAM (csrc/cuda/class_activation.cu).
_PAIR_KERNEL = re.compile(r"\bcam_kernel<[^,]+, false>")


def cuda_elements(name: str, instrs: list[Instr], dtype: str) -> float:
    """Elements of x per thread per iteration of a CUDA kernel's streaming loop:
    ``apply_kernel`` (csrc/cuda/common.cuh) and the flat kernels of apply_channel
    (csrc/cuda/channel_ranking.cu), apply_block and apply_seeds (csrc/cuda/block_mask.cu)
    and apply_attention (csrc/cuda/percentile_threshold.cu) write one 16-byte chunk of out
    (16 / sizeof(T) elements) per iteration of their grid-stride loops, or several (the
    AttentionDrop kernel for maps of H * W % 4 != 0: four; its channels_last kernel: one
    per pixel, four pixels an iteration), each a 16-byte store; the
    others read x one element or one 16-byte vector (16 / sizeof(T) elements) per access,
    so the loop's loads of exactly sizeof(T) bytes plus 16 / sizeof(T) per 16-byte load
    (more than one where nvcc unrolled it), or per pair of 16-byte loads in the kernels that
    read x only as the two aligned vectors that cover each 16 bytes (``_PAIR_KERNEL``)."""
    c = count(name, instrs, 1.0)
    vec = 16 // ITEMSIZE[dtype]
    if _CHUNK_KERNEL.search(name):
        return float(vec * max(1, c.stores.get(128, 0)))
    if _PAIR_KERNEL.search(name):
        return float(vec * max(1, c.loads.get(128, 0) // 2))
    return float(max(1, c.loads.get(8 * ITEMSIZE[dtype], 0) + c.loads.get(128, 0) * vec))


def _demangle(names):
    exe = shutil.which("c++filt")
    if exe is None:
        return dict(zip(names, names, strict=True))
    done = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True,
                          check=True)
    return dict(zip(names, done.stdout.splitlines(), strict=True))


def extension_path() -> str | None:
    """The built guidedrop._C (.so) next to this package, or None."""
    found = sorted(Path(__file__).parent.glob("_C*.so"))
    return str(found[0]) if found else None


@functools.cache
def _extension_sass(path: str) -> dict[str, list[Instr]]:
    sass = disassemble(path)
    names = _demangle(list(sass))
    return {names[k]: v for k, v in sass.items()}


def cuda_kernels(op: str, dtype: str, path: str | None = None) -> list[Counts]:
    """Counts of the CUDA extension's kernels of ``op`` (a key of CUDA_KERNELS) for x of
    ``dtype``, read from the built extension. Raises RuntimeError when it is not built."""
    path = path or extension_path()
    if path is None:
        raise RuntimeError("guidedrop._C is not built")
    pattern = re.compile(CUDA_KERNELS[op].replace("{T}", re.escape(CPP_TYPES[dtype])))
    return [count(name, instrs, cuda_elements(name, instrs, dtype))
            for name, instrs in sorted(_extension_sass(path).items()) if pattern.search(name)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
