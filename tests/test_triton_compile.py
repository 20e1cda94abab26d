"""Every Triton kernel compiles for the GPU (sm_90: the H100 and H200), on a machine without
one.

The interpreter runs the kernels' logic, not Triton's compiler: a type error, an operation
the compiler does not support or a tile too large for it shows only when a kernel is
compiled. So the Triton backend's launches are recorded (the kernels are not run: their
outputs are left uninitialised) for every layer, forward and backward, with and without
noise, on benchmark-sized maps (N = 2) and small odd ones, every dtype, both layouts and
the int64 offset path; then every distinct specialisation is compiled through Triton's
whole pipeline, ptxas included, in a child process without TRITON_INTERPRET
(``tests/triton_compile.py``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import test_backends as TB
import torch

from guidedrop import dispatch, sass

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (shape, dtype): the largest tiles (56 x 56 maps), many channels (14 x 14 maps, C = 1024),
# small odd tiles; float16 compiles as bfloat16 but for its cast, so once is enough; 1 x 1
# maps, where Triton makes the int arguments of 1 (H, W, H * W, a sample's units) constants
# (x.to(...) of one failed to compile).
INPUTS = [(shape, dtype) for shape in [(2, 64, 56, 56), (2, 1024, 14, 14), (3, 5, 7, 9)]
          for dtype in (torch.float32, torch.bfloat16)] + [((3, 5, 7, 9), torch.float16),
                                                           ((2, 3, 1, 1), torch.float32)]
BIG_BLOCKS = {"corrdrop": dict(block_size=7), "camdrop": dict(block_size=7),
              "dropblock": dict(block_size=7), "dropblock-shared": dict(block_size=53)}


class _Recorder:
    """Stands in for ``_common.launch``: ``launch(kernel)[grid](*args, **kwargs)`` records
    one spec per distinct (kernel, argument types, keyword arguments) and runs nothing."""

    def __init__(self):
        self.specs = {}

    def __call__(self, kernel):
        fn = kernel.fn  # the Python function, interpreted or not

        def run(grid, *args, **kwargs):
            spec = {"module": fn.__module__, "kernel": fn.__name__,
                    "args": [sass.describe(a) for a in args], "kwargs": kwargs}
            # launches that differ only in values Triton does not specialise on compile to
            # the same kernel
            self.specs.setdefault(sass.spec_key(spec), spec)
        return _Grid(run)


class _Grid:
    """``launch(kernel)[grid](*args, **kwargs)`` calls ``run(grid, *args, **kwargs)``."""

    def __init__(self, run):
        self.run = run

    def __getitem__(self, grid):
        return functools.partial(self.run, grid)


def _kernel_modules(mod):
    return [m for name, m in sorted(sys.modules.items())
            if name.startswith(mod.__name__ + ".") and hasattr(m, "launch")]


def _drive(inputs, dense_grad=False):
    """Every layer of test_backends.LAYERS, forward and backward, on each (shape, dtype) in
    both layouts: with and without noise, and with blocks of 7 (53 for the shared mask).
    The backward gets the stride-0 gradient of ``y.sum()`` (the strided paths), or with
    ``dense_grad`` a dense one in y's layout, as the layer after it in a network gives."""
    for shape, dtype in inputs:
        for layout in ("contiguous", "channels_last"):
            x = TB.make_x(shape, dtype, "cpu", layout)
            for case, (op, noise_shape, params, _) in TB.LAYERS.items():
                base = case.split("-")[0] if case != "dropblock-shared" else case
                # the noise shape of corrdrop follows block_size: big blocks draw theirs
                runs = [(None, params), (torch.rand(noise_shape(shape)), params)]
                if base in BIG_BLOCKS:
                    runs.append((None, {**params, **BIG_BLOCKS[base]}))
                for noise, kw in runs:
                    xg = x.detach().requires_grad_()
                    y = op(xg, noise=noise, **kw)
                    if dense_grad:  # the kernels are recorded, not run: values don't matter
                        y.backward(torch.ones_like(y))  # (randn_like: 40 s of 50 here)
                    else:
                        y.sum().backward()


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_triton_kernels_compile_for_sm90(monkeypatch, tmp_path):
    mod, why = dispatch.load("triton")
    if mod is None:
        pytest.skip(f"no Triton backend: {why}")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton's NVIDIA backend is not installed: {e}")
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    recorder = _Recorder()
    modules = _kernel_modules(mod)
    for m in modules:
        monkeypatch.setattr(m, "launch", recorder)
    with sass.gpu_tiles():  # the tiles a GPU launches, not the interpreter's larger ones
        _drive(INPUTS)
        for m in modules:  # the int64 offset path of tensors of 2**31 elements or more
            if hasattr(m, "needs_int64"):
                monkeypatch.setattr(m, "needs_int64", lambda *ts: True)
        _drive(INPUTS[1:2])

    defined = {(m.__name__, k) for m in modules for k in vars(m)
               if k.startswith("_") and k.endswith("_kernel")}
    launched = {(s["module"], s["kernel"]) for s in recorder.specs.values()}
    assert defined <= launched, f"kernels never launched here: {sorted(defined - launched)}"

    print(_compile(list(recorder.specs.values()), tmp_path))


def _compile(specs: list[dict], tmp_path) -> str:
    """Compiles the specs for sm_90 in a child process without TRITON_INTERPRET
    (triton_compile.py); its output."""
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    script = Path(__file__).with_name("triton_compile.py")
    done = subprocess.run([sys.executable, str(script), str(path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _ptx(specs, tmp_path, stage="ptx") -> list[str]:
    """The sm_90 PTX (or another stage's code: "ttir", ...) of each recorded spec, compiled
    in one child process without TRITON_INTERPRET (spaces removed)."""
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    child = (
        "import json, sys\n"
        "from guidedrop.sass import compile_spec\n"
        f"print(json.dumps([compile_spec(s).asm[{stage!r}].replace(' ', '')\n"
        "                  for s in json.load(open(sys.argv[1]))]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent)]
                                        + [p for p in sys.path if p])
    done = subprocess.run([sys.executable, "-c", child, str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def _record_launches(monkeypatch, run) -> dict:
    """The specs of the Triton launches of run() (nothing runs); skips without the Triton
    backend or its NVIDIA compiler."""
    mod, why = dispatch.load("triton")
    if mod is None:
        pytest.skip(f"no Triton backend: {why}")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton's NVIDIA backend is not installed: {e}")
    monkeypatch.setenv("GUIDEDROP_BACKEND", "triton")
    recorder = _Recorder()
    for m in _kernel_modules(mod):
        monkeypatch.setattr(m, "launch", recorder)
    run()
    return recorder.specs


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_tiles_start_in_64_bits_for_sm90(monkeypatch, tmp_path):
    """The flat tiles of tensors of 2**31 elements or more (IDX64) compute their first element,
    program_id(0) * BLOCK, in 64 bits: in 32 bits it wrapped past 2**31 before the last
    programs ((64, 256, 384, 384) bfloat16: 589,824 programs of 4096, from program 524,288
    on), which then read and wrote out of bounds; likewise the word loads of AttentionDrop's
    bfloat16 apply, the statistics' first map (past 2**31 maps of 1 x 1) and the seeds' row
    tile. The interpreter, in 64 bits, cannot show it: read in the TTIR, where no 32-bit
    arithmetic may take program_id(0)."""
    def run():  # the forwards of contiguous x, whose applies take the flat tiles
        B = dispatch.load("triton")[0]
        for m in _kernel_modules(B):
            if hasattr(m, "needs_int64"):
                monkeypatch.setattr(m, "needs_int64", lambda *ts: True)
        for shape in ((2, 64, 56, 56), (2, 64, 14, 14)):
            x = torch.randn(shape, dtype=torch.bfloat16)
            for case in ("selectscale", "corrdrop", "dropblock", "attentiondrop-sm"):
                op, _, params, _ = TB.LAYERS[case]
                op(x, noise=None, **params)
        bits = torch.zeros((2, 64 * 14 * 14 // 8), dtype=torch.uint8)  # seeds of r = 3: rows
        B.apply_seeds(x, bits, 3, False, torch.ones(2))

    with sass.gpu_tiles():
        recorded = _record_launches(monkeypatch, run)
    kernels = {"_apply_channel_flat_kernel", "_apply_block_flat_kernel",
               "_apply_bits_flat_kernel", "_apply_attention_flat_kernel",
               "_channel_stats_kernel", "_select_kernel",  # the maps of the statistics
               "_apply_seeds_rows_kernel"}  # rows (n, c, h)
    specs = [s for s in recorded.values() if s["kernel"] in kernels and s["kwargs"]["IDX64"]]
    assert {s["kernel"] for s in specs} == kernels, specs
    assert any(s["kwargs"].get("WORDS") for s in specs)  # bfloat16 read as words (14 x 14)
    for spec, ttir in zip(specs, _ptx(specs, tmp_path, "ttir"), strict=True):
        pids = re.findall(r"(%\w+)=tt.get_program_idx:i32", ttir)
        assert pids, spec["kernel"]
        in32 = [ln for ln in ttir.splitlines() for p in pids
                if re.search(rf"=arith\.\w+.*{p}\b.*:i32(loc|$)", ln) and "extsi" not in ln]
        assert not in32, (spec["kernel"], spec["kwargs"], in32)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_plan_scales_round_each_operation_for_sm90(monkeypatch, tmp_path):
    """The plans' float32 arithmetic rounds each operation, as the reference: SelectScale's
    w = retain + 2 (1 - retain) u and FocusedDropout's threshold low + (high - low) u (SPEC
    §3, §5) with no fma.rn.f32 (their kernels are compiled with enable_fp_fusion=False:
    Triton fuses a * b + c by default, which moved w by an ulp, u = 0.6069953: 1.1925915
    for 1.1925917, and flipped keep bits), and CorrDrop's plan with IEEE division only
    (div.rn: Triton's float32 "/" is the approximate div.full.f32). The interpreter rounds
    each operation whatever the flags: only the PTX shows it."""
    x = torch.randn(2, 8, 7, 7)

    def run():
        for case in ("selectscale", "selectout", "focused_dropout", "focused_dropout-pp",
                     "corrdrop"):
            op, _, params, _ = TB.LAYERS[case]
            op(x, noise=None, **params)

    recorded = _record_launches(monkeypatch, run)
    kernels = {"_select_plan_kernel", "_focused_plan_kernel", "_corrdrop_plan_kernel"}
    specs = [s for s in recorded.values() if s["kernel"] in kernels]
    assert {s["kernel"] for s in specs} == kernels, specs
    for spec, ptx in zip(specs, _ptx(specs, tmp_path), strict=True):
        wrong = [ln for ln in ptx.splitlines()
                 if "fma.rn.f32" in ln or "div.full" in ln or "div.approx" in ln]
        assert not wrong, (spec["kernel"], wrong[:5])


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_camdrop_target_assertion_compiled_for_sm90(monkeypatch, tmp_path):
    """SPEC §6 step 0 on a GPU: the first CamDrop kernel (the CAM from W[y]) keeps its
    device assertion on the target in the sm_90 code (Triton drops tl.device_assert
    unless the kernel is compiled in debug mode), with a message naming target."""
    import guidedrop.functional as F
    x = torch.randn(2, 4, 6, 6)
    recorded = _record_launches(monkeypatch, lambda: F.camdrop(
        x, torch.randn(3, 8), torch.tensor([2, 0], dtype=torch.int8), 3, 0.5,
        noise=torch.rand(x.shape)))
    specs = [s for s in recorded.values() if s["kernel"] == "_cam_kernel"]
    assert len(specs) == 1, specs
    ptx, = _ptx(specs, tmp_path)
    assert "__assertfail" in ptx
    # the message, as PTX spells a string constant: its bytes in decimal
    assert ",".join(str(b) for b in b"target must hold class indices") in ptx


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_attention_range_reciprocal_keeps_subnormals_for_sm90(monkeypatch, tmp_path):
    """AttentionDrop's range reciprocal (SPEC §4 step 2) compiles to PTX's IEEE rcp.rp.f32 in
    the statistics kernel, the one that computes it (the applies read it), not to
    libdevice's flush-to-zero rcp.rp.ftz.f32 (Triton links libdevice for flush-to-zero): a
    range over 2^126, whose reciprocal is subnormal, or a subnormal range must round as the
    reference does. No other operation of these kernels flushes subnormals either."""
    import guidedrop.functional as F
    x = torch.randn(2, 8, 4, 6)
    recorded = _record_launches(monkeypatch, lambda: [F.attentiondrop(
        t, 0.5, 20.0, mode="sm", noise=torch.rand(2, 8))
        for t in (x, x.contiguous(memory_format=torch.channels_last), x[..., 1:])])
    kernels = ("_select_kernel", "_apply_attention_flat_kernel", "_apply_attention_cl_kernel",
               "_apply_attention_kernel")  # contiguous, channels_last, sliced x
    specs = [s for s in recorded.values() if s["kernel"] in kernels]
    assert sorted({s["kernel"] for s in specs}) == sorted(kernels), specs
    for spec, ptx in zip(specs, _ptx(specs, tmp_path), strict=True):
        # the applies read r from the statistics: no reciprocal (nor its slow path) per group
        assert ("rcp." in ptx) == (spec["kernel"] == "_select_kernel"), spec["kernel"]
        if spec["kernel"] == "_select_kernel":
            assert "rcp.rp.f32" in ptx
        assert ".ftz" not in ptx, (spec["kernel"], [ln for ln in ptx.splitlines() if ".ftz" in ln])


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_pooled_correlation_averages_round_as_ieee_for_sm90(monkeypatch, tmp_path):
    """CorrDrop's pooling (SPEC §2 step 1) divides each window sum by its units with an
    IEEE division, as the reference's float64 avg_pool2d does, in both pooling paths
    (contiguous NCHW: window rows; channels_last: positions): float64 sums and division
    (div.rn.f64). A float32 "/" in Triton is PTX's approximate div.full.f32 (up to 2 ulp),
    which the interpreter, dividing exactly, cannot show: none in the kernel."""
    from guidedrop import primitives as P
    x = torch.randn(2, 16, 14, 14)
    xs = (x, x.contiguous(memory_format=torch.channels_last))
    with sass.gpu_tiles():
        recorded = _record_launches(monkeypatch, lambda: [P.pooled_correlation(t, 3) for t in xs])
    specs = [s for s in recorded.values() if s["kernel"] == "_pooled_correlation_kernel"]
    assert sorted(s["kwargs"]["FLAT"] for s in specs) == [False, True], specs
    for spec, ptx in zip(specs, _ptx(specs, tmp_path), strict=True):
        assert "div.rn.f64" in ptx
        assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx, spec["kwargs"]


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile every kernel")
def test_pooled_correlation_few_channels_compile_for_sm90(monkeypatch, tmp_path):
    """pooled_correlation with 1 to 3 channels compiles for sm_90: Triton specialises an int
    argument of 1 to a constant (C = 1: ``(C + 16).to`` failed on an int), and its gather
    layout pass asserted on window-row tiles of few channels (C = 2 to 8 at 7 x 7, 14 x 14
    and 28 x 28), which now take the positions path. INPUTS' maps have 5 channels or more,
    and only the 7 x 9 one few."""
    from guidedrop import primitives as P
    shapes = [((2, 1, 7, 7), 3), ((2, 2, 28, 28), 3), ((2, 3, 7, 7), 3), ((2, 3, 14, 14), 5)]
    with sass.gpu_tiles():
        recorded = _record_launches(monkeypatch, lambda: [
            P.pooled_correlation(torch.randn(shape, dtype=dtype), k)
            for shape, k in shapes for dtype in (torch.float32, torch.bfloat16)])
    specs = [s for s in recorded.values() if s["kernel"] == "_pooled_correlation_kernel"]
    assert len(specs) == 8, specs
    _compile(specs, tmp_path)
