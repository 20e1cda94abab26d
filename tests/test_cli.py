"""``python -m guidedrop bench`` and ``show``: the quick forms run and write their files,
bad input gives one line and exit status 2, and the bench's correctness pre-check stops
the run (exit status 1) when a backend disagrees with the reference.

The bench tests pin ``--device cpu`` and name their backends (torch.compile on CPU is
slow: it is timed once, on one layer); one test runs the default device, so on a GPU
machine the CUDA timing path runs too.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from testing import fake_backend

import guidedrop
from guidedrop import bench, cli, demo, dispatch, models, reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["bench", "--quick", "--device", "cpu"]


def _env() -> dict:
    """This process's environment, with the folder of the guidedrop imported here first."""
    env = dict(os.environ)
    here = str(Path(guidedrop.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    return env


def run_module(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidedrop", *args], cwd=cwd,
                          env={**_env(), **env}, capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- bench


@pytest.mark.slow  # a Python process: ~5 s (the in-process bench tests run by default)
def test_bench_quick_every_layer_subprocess(tmp_path):
    out = tmp_path / "bench.csv"
    r = run_module(*QUICK, "--backends", "reference", "--csv", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert [row["layer"] for row in rows] == list(models.LAYERS)
    for row in rows:
        assert row["device"].startswith("CPU") and row["date"]
        assert row["backend"] == "reference" and row["mode"] == "full"
        assert float(row["ms"]) > 0 and float(row["x_floor"]) > 0 and float(row["gbps"]) > 0
        assert float(row["speedup_eager"]) == pytest.approx(1.0)
        assert 0 <= float(row["kept_fraction"]) < 1
    assert "x floor" in r.stdout and "memory copy" in r.stdout
    for layer in models.LAYERS:
        assert layer in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.slow  # torch.compile in a Python process: ~25 s
def test_bench_compile_subprocess_logs_nothing(tmp_path):
    """stderr holds bench's progress lines only: torch.compile on a CPU logged torch's "No
    CUDA runtime is found, using CUDA_HOME=..." there (where a CUDA toolkit is installed)."""
    r = run_module("bench", "--quick", "--device", "cpu", "--layers", "dropblock", "--dtype",
                   "fp32", "--backends", "reference,compile", cwd=tmp_path, TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("[")] == [], r.stderr


@pytest.mark.slow  # torch.compile of two layers, twice (once in worker processes): ~40 s
def test_bench_compile_workers_fill_the_caches(tmp_path, monkeypatch, capsys):
    """--compile-workers: the timed run loads every graph torch.compile makes from the
    caches its worker processes filled. Each case compiles 4 graphs (forward and backward
    of the check on a slice with noise, and of the timed calls): 8 hits and no miss, in a
    fresh inductor cache. (Without workers there is none: test_bench_no_warm_up_without_workers.)"""
    from torch._dynamo.utils import counters

    argv = [*QUICK, "--layers", "spatialscale,selectout", "--dtype", "fp32", "--backends",
            "compile", "--compile-workers", "2"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    counters.clear()
    rows = bench.run(cli.build_parser().parse_args(argv))
    assert all(r["ms"] > 0 for r in rows), rows
    graphs = dict(counters["inductor"])
    out = capsys.readouterr().out
    assert "warm-up: running 2 cases once in 2 processes (compile)" in out, out
    assert "warm-up: 2 of 2 cases ran in" in out, out
    assert graphs.get("fxgraph_cache_hit") == 8 and "fxgraph_cache_miss" not in graphs


def test_bench_no_warm_up_without_workers(capsys):
    """--compile-workers 0 (the default on a CPU): no warm-up, nothing run before the
    timing (the case would fail there: its layer does not exist)."""
    case = bench.Case("no_such_layer", (1, 1, 2, 2), torch.float32, torch.device("cpu"), False)
    bench.warm_caches([(case, ["compile"])], ["full"], "eager", 0, deadline=None)
    assert capsys.readouterr() == ("", "")


class _DiesWhenLoaded:
    """A warm-up task whose unpickling in the worker runs ``call(*args)`` (pickle calls
    what __reduce__ returns): a worker that crashes, hangs or fails, on demand."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("task,expected", [
    ((_DiesWhenLoaded(os.abort), ["compile"]), "warm-up: worker 0 died of SIGABRT, 1 of its "
                                               "cases not run"),
    ((_DiesWhenLoaded(time.sleep, 600), ["compile"]), "warm-up: worker 0 stopped at the "
                                                      "warm-up's bound"),
    ((bench.Case("no_such_layer", (1, 1, 2, 2), torch.float32, torch.device("cpu"), False),
      ["compile"]), "warm-up: failed: no_such_layer 1x1x2x2 fp32:"),
], ids=["crash", "hang", "failed-case"])
def test_bench_warm_up_reports_its_workers(task, expected, capsys):
    """A worker that crashes, hangs past the deadline or fails a case is reported (never
    as a case that ran), stopped, and does not stop the bench. The hanging one is stopped
    at its deadline whether it started or not: a short one there."""
    t0 = time.monotonic()
    bound = 4 if "stopped" in expected else 15  # the others: time to start and crash or fail
    bench.warm_caches([task], ["full"], "eager", 2, deadline=t0 + bound)
    assert time.monotonic() - t0 < 30
    out, err = capsys.readouterr()
    assert "warm-up: running 1 cases once in 1 processes (compile)" in out, out
    assert "warm-up: 0 of 1 cases ran in" in out, out
    assert expected in err, err
    if "failed" in expected:
        assert ", 1 failed" in out, out


def test_bench_model_counts_launches(capsys):
    """``bench --model``: launches, bytes against the floor and syncs per layer and backend,
    the same counts as tests/test_launches.py. The bytes are a training step's (the forward
    with noise=None): SpatialScale (no statistics) and DropBlock (seeds drawn in the kernel)
    move less than the 5 passes of the floor on the kernel backends (DropBlock counted its
    given noise, a float32 tensor the size of x, before: 1.04x the floor here)."""
    args = cli.build_parser().parse_args(
        ["bench", "--model", "--no-sass", "--device", "cpu", "--shapes", "2x4x6x6",
         "--layers", "attentiondrop,spatialscale,dropblock"])
    rows = bench.run(args)
    by = {(r["layer"], r["backend"]): r for r in rows}
    assert {"reference"} <= {b for _, b in by}
    for (layer, backend), r in by.items():
        assert r["syncs"] == 0 and r["fwd"] >= 1 and r["x_floor"] > 0, r
        if backend != "reference":
            assert r["bwd"] == 1 and r["fwd"] <= 3 and r["fresh"] <= 4, r
            if layer != "attentiondrop":
                assert r["x_floor"] < 1, r
    out = capsys.readouterr().out
    assert "launches fwd" in out and "× floor" in out
    assert "SASS" not in out  # --no-sass: no empty SASS columns, no word on them
    # the options --model does not use are refused, not silently ignored
    rc = cli.main(["bench", "--model", "--no-sass", "--csv", "m.csv", "--graph"])
    assert rc == 2
    assert "--model prints counts, not timings or files: it takes no --csv, --graph" in \
        capsys.readouterr().err


def test_bench_model_row_arithmetic(monkeypatch, capsys):
    """``bench --model``'s row from count_layer's counts (stand-in counters, so that every
    figure is distinct): launches fwd = the forward's (3), fwd noise=None = the fresh
    forward's (2), bwd = the backward's (1, its sync no launch); MB moved = a training
    step's bytes, the fresh forward's 3e6 + 1e6 and the backward's 2e6 (not the forward
    with noise, 3 x 1e6) = 6e6 bytes, in MB of 1e6: 6.00; × floor = 6e6 / floor 4e6 = 1.50
    (not floored); host syncs: those of all three passes, 3. The table shows MB and ×
    floor to 2 decimals."""
    from guidedrop import launches
    from guidedrop.launches import Launch, LaunchCounter, LayerCount

    def counter(nbytes, syncs):
        c = LaunchCounter()
        c.launches = [Launch(f"aten:op{i}", n) for i, n in enumerate(nbytes)]
        c.syncs = syncs
        return c

    def fake(call, x, noise):
        return LayerCount(forward=counter([10**6] * 3, ["nonzero"]),
                          fresh=counter([3 * 10**6, 10**6], ["item"]),
                          backward=counter([2 * 10**6], ["equal"]), floor_bytes=4 * 10**6)

    monkeypatch.setattr(launches, "count_layer", fake)
    row, = bench.model_report(["spatialscale"], [((2, 4, 6, 6), torch.float32)],
                              ["reference"], True, torch.device("cpu"), False, static=False)
    capsys.readouterr()
    assert (row["fwd"], row["fresh"], row["bwd"], row["syncs"]) == (3, 2, 1, 3), row
    assert row["mb"] == pytest.approx(6.0) and row["x_floor"] == pytest.approx(1.5), row
    assert "| 6.00 | 1.50 | 3 |" in bench.format_table([row], bench.MODEL_COLUMNS[:-5],
                                                        markdown=True)


class _StubTimer:
    """A Timer that times nothing: each call returns the next (median, p20, p80) ms."""

    def __init__(self, *times, quick=True):
        self.times, self.quick = list(times), quick

    def __call__(self, fn):
        return self.times.pop(0)


@pytest.mark.parametrize("mode, floor_ms", [("forward", 0.6), ("backward", 0.4),
                                            ("full", 1.0)])
def test_bench_floor_figures(mode, floor_ms, monkeypatch):
    """A timed row's floor figures, from a stub timer (2 ms, p20 1.5, p80 3) and a copy
    bandwidth of 1.2e6 B/s: x bf16 (2, 3, 4, 5) holds 120 x 2 = 240 bytes (its itemsize,
    not 4); the floor moves PASSES[mode] x 240 bytes (3 forward, 2 backward, 5 full), in
    720 / 1.2e6 s = 0.6 ms forward, 0.4 backward, 1.0 full; x floor = 2 ms over that; GB/s
    = the floor's bytes over 2 ms, in 1e9 B/s. With --graph on a CUDA device (the capture
    stubbed), the full row's replay (0.5 ms) is 0.5 / 1.0 = 0.5x the floor."""
    cpu = bench.Case("spatialscale", (2, 3, 4, 5), torch.bfloat16, torch.device("cpu"))
    inputs = bench.make_inputs(cpu)
    case = bench.Case("spatialscale", (2, 3, 4, 5), torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(bench, "graph_fn", lambda fn, inputs: lambda: None)
    timer = _StubTimer((2.0, 1.5, 3.0), (0.5, 0.4, 0.6))
    row = bench._time_mode(case, "reference", lambda x, w, t: x * 2, inputs, mode, timer,
                           1.2e6, True)
    passes = {"forward": 3, "backward": 2, "full": 5}[mode]
    assert row["floor_ms"] == pytest.approx(floor_ms)
    assert row["x_floor"] == pytest.approx(2.0 / floor_ms)
    assert row["gbps"] == pytest.approx(passes * 240 / 2e-3 / 1e9)
    assert (row["ms"], row["ms_p20"], row["ms_p80"]) == (2.0, 1.5, 3.0)
    if mode == "full":
        assert row["graph_ms"] == 0.5 and row["graph_x_floor"] == pytest.approx(0.5), row
    else:
        assert "graph_ms" not in row


def test_bench_copy_bandwidth_counts_read_and_write():
    """The copy bandwidth is the bytes read plus those written per second: a --quick copy
    of 64 MiB on a CPU timed (stub) at 1 ms moves 2 x 64 MiB in 1e-3 s."""
    nbytes = 64 * 2**20
    assert bench.measure_bandwidth(torch.device("cpu"), _StubTimer((1.0, 1.0, 1.0))) == (
        2 * nbytes / 1e-3, nbytes)


def test_bench_kept_bytes_counts_saved_tensors_once_without_x():
    """kept_bytes: the bytes of the tensors a forward saves for backward, each once, x
    left out, in their own itemsize. y = x * m + x * m + x * x, x bf16 (2, 3, 4, 5) and m
    a bf16 (2, 3, 1, 1) constant: both muls by m save m (6 x 2 = 12 bytes, once), x * x
    saves x twice (left out): 12."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16)
    m = torch.rand(2, 3, 1, 1, dtype=torch.bfloat16)
    inputs = bench.Inputs(x=x, dy=torch.ones_like(x), weight=torch.zeros(1, 3),
                          target=torch.zeros(2, dtype=torch.long))
    assert bench.kept_bytes(lambda x, w, t: x * m + x * m + x * x, inputs) == 6 * 2


def test_bench_markdown_to_redirected_stdout(tmp_path):
    """--md /dev/stdout with stdout redirected to a file appends the table to what the run
    printed (opened with "w", the file was truncated: the header lost, NULs in its place)."""
    out = tmp_path / "o.txt"
    with open(out, "w") as f:
        done = subprocess.run([sys.executable, "-m", "guidedrop", "bench", "--dry-run",
                               "--quick", "--layers", "dropblock", "--backends", "reference",
                               "--md", "/dev/stdout"], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "\0" not in text and text.startswith("guidedrop bench on "), text[:200]
    assert "| dropblock | 2x16x14x14 |" in text and text.rstrip().endswith("wrote /dev/stdout")
    # and through a pipe (/dev/stdout's realpath then names no file)
    done = subprocess.run([sys.executable, "-m", "guidedrop", "bench", "--dry-run", "--quick",
                           "--layers", "dropblock", "--backends", "reference", "--csv",
                           "/dev/stdout"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\ndate,device,versions," in done.stdout, done.stdout[-500:]


def test_bench_writes_csv_plot_markdown(tmp_path, capsys):
    paths = {k: tmp_path / f"b.{k}" for k in ("csv", "png", "md")}
    rc = cli.main([*QUICK, "--backends", "reference", "--layers", "selectscale,dropblock",
                   "--shapes", "2x3x9x11,tiny", "--dtype", "fp32,bf16", "--mode",
                   "forward,backward", "--csv", str(paths["csv"]), "--plot", str(paths["png"]),
                   "--md", str(paths["md"])])
    assert rc == 0, capsys.readouterr().err
    rows = read_csv(paths["csv"])
    assert len(rows) == 2 * 2 * 2 * 2  # layers x shapes x dtypes x modes
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    assert {r["shape"] for r in rows} == {"2x3x9x11", "2x16x14x14"}
    fwd = next(r for r in rows if r["mode"] == "forward")
    bwd = next(r for r in rows if r["mode"] == "backward" and r["layer"] == fwd["layer"]
               and r["shape"] == fwd["shape"] and r["dtype"] == fwd["dtype"])
    # floors: 3 passes over x forward, 2 backward, at the same measured bandwidth
    assert float(fwd["floor_ms"]) / float(bwd["floor_ms"]) == pytest.approx(1.5, rel=1e-3)
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    md = paths["md"].read_text()
    assert "| layer | shape |" in md and "selectscale" in md and "Device: CPU" in md


def test_bench_compile_and_kept_bytes(tmp_path, capsys):
    out = tmp_path / "c.csv"
    rc = cli.main([*QUICK, "--backends", "reference,compile", "--layers", "spatialscale",
                   "--mode", "forward,full", "--csv", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {(r["backend"], r["mode"]): r for r in read_csv(out)}
    assert set(rows) == {(b, m) for b in ("reference", "compile") for m in ("forward", "full")}
    for (b, m), r in rows.items():
        other = rows[("compile" if b == "reference" else "reference", m)]
        assert float(r["speedup_compile"]) == pytest.approx(
            float(rows[("compile", m)]["ms"]) / float(r["ms"]), rel=1e-3)
        assert float(r["speedup_eager"]) == pytest.approx(
            float(rows[("reference", m)]["ms"]) / float(r["ms"]), rel=1e-3)
        assert other
    # SpatialScale keeps w (N, C) in float32 for backward: N*C*4 bytes of x's N*C*H*W*4.
    assert float(rows[("reference", "full")]["kept_fraction"]) == pytest.approx(1 / (14 * 14),
                                                                               rel=1e-3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("busy", [False, True])
def test_bench_notes_a_busy_cpu(busy, threads, tmp_path, monkeypatch, capsys):
    """CPU timings on a machine that other work shares carry a note (as the demo's): a new
    user's compiled rows read 0.01x eager there, the OpenMP threads of Inductor's CPU
    kernels waiting for each other; OMP_NUM_THREADS=1 is advised only where torch runs
    more threads than that (a new user read the advice already followed). The load is
    sampled after each case (busy during the first only, idle at the end: flagged), and the
    note is in every file written (a new user's --md, --table and --csv carried none)."""
    cores = os.cpu_count()
    loads = iter([cores + 1.5 if busy else 0.5])
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads, 0.5), 0.0, 0.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    files = {k: tmp_path / f"b.{k}" for k in ("md", "table", "csv")}
    files["plot"] = tmp_path / "b.png"  # the note in its title
    rc = cli.main([*QUICK, "--backends", "reference", "--layers", "spatialscale,dropblock",
                   "--mode", "forward", *(a for k, f in files.items() for a in (f"--{k}", str(f)))])
    assert rc == 0
    printed = capsys.readouterr().out
    note = f"load average up to {cores + 1.5:.2f} on {cores} cores"
    assert ("OMP_NUM_THREADS=1" in printed) == (busy and threads > 1)
    assert (f"(note: {note}: other work shared the CPU" in printed) == busy
    for text in (files["md"].read_text(), files["table"].read_text()):  # whole, one line
        assert [line for line in text.splitlines() if "note" in line] == (
            [f"(note: {note}: other work shared the CPU, so these times are not to be "
             "trusted; torch.compile's rows least: the OpenMP threads of its CPU kernels wait "
             "for each other, 100x eager's time where one is descheduled"
             + (".)" if threads == 1 else "; OMP_NUM_THREADS=1 avoids that.)")]
            if busy else [])
    if busy:  # under the table, as printed
        assert files["md"].read_text().rstrip().splitlines()[-1].startswith("(note: ")
    with open(files["csv"], newline="") as f:
        assert {r["contention"] for r in csv.DictReader(f)} == {note if busy else ""}
    assert files["plot"].read_bytes()[:8] == PNG_MAGIC


def test_bench_dry_run_times_nothing(tmp_path, capsys):
    """--dry-run (the GPU script's CI run): checks every backend, prints every timing cell
    as "not measured" and writes no number it did not see; --backends all lists a backend
    that cannot run here with its reason."""
    out, table = tmp_path / "d.csv", tmp_path / "d.txt"
    rc = cli.main(["bench", "--dry-run", "--device", "cpu", "--shapes", "tiny", "--layers",
                   "spatialscale", "--mode", "full", "--graph", "--backends", "all",
                   "--csv", str(out), "--table", str(table)])
    assert rc == 0, capsys.readouterr().err
    rows = {r["backend"]: r for r in read_csv(out)}
    assert set(rows) == set(bench.PROVIDERS)
    for r in rows.values():
        for key in ("ms", "gbps", "x_floor", "floor_ms", "graph_ms", "graph_x_floor",
                    "speedup_compile", "graph_speedup_compile"):
            assert r[key] == "", (r["backend"], key, r[key])
        assert r["note"]
    assert rows["reference"]["note"] == "dry run: not timed"
    assert rows["cuda"]["note"].startswith("unavailable: ")
    printed = capsys.readouterr().out
    assert "not measured" in printed and "graph ms" in printed
    assert "not measured" in table.read_text() and "GB/s (read" not in printed


def test_bench_kernels_profile(tmp_path, capsys):
    """--kernels (the GPU script's): after each case on a kernel backend, the time per step
    of each kernel (here, on a CPU, of each op) and its share, as CSV; a profile that fails
    is a line saying so, and the bench goes on."""
    out = tmp_path / "k.csv"
    rc = cli.main(["bench", "--dry-run", "--device", "cpu", "--shapes", "tiny", "--layers",
                   "spatialscale,dropblock", "--backends", "reference,triton",
                   "--kernels", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = read_csv(out)
    cases = {(r["layer"], r["backend"]) for r in rows}
    assert cases == {(layer, "triton") for layer in ("spatialscale", "dropblock")}
    for case in cases:
        mine = [r for r in rows if (r["layer"], r["backend"]) == case]
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1.0, rel=1e-3), case
        us = [float(r["us"]) for r in mine]
        assert us == sorted(us, reverse=True) and us[-1] > 0, case
        assert all(float(r["calls"]) > 0 and r["shape"] == "2x16x14x14" for r in mine)


def test_bench_kernels_profile_failure_is_a_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "k.csv"

    def broken(*args, **kwargs):
        raise RuntimeError("no profiler here\nsecond line")
    monkeypatch.setattr(bench, "kernel_times", broken)
    rc = cli.main(["bench", "--dry-run", "--device", "cpu", "--shapes", "tiny", "--layers",
                   "spatialscale", "--backends", "reference,triton", "--kernels", str(out)])
    assert rc == 0, capsys.readouterr().err
    (row,) = read_csv(out)
    assert row["backend"] == "triton"
    assert row["kernel"] == "profile failed: RuntimeError: no profiler here" and row["us"] == ""
    assert "spatialscale" in capsys.readouterr().err  # said, as a failed graph capture is


def test_bench_kernels_nothing_profiled(tmp_path, monkeypatch, capsys):
    """No kernel backend in the run: a header-only file, said as such; a profile that
    records nothing: a line saying so (the case does not vanish from the file)."""
    out = tmp_path / "k.csv"
    rc = cli.main(["bench", "--dry-run", "--device", "cpu", "--shapes", "tiny", "--layers",
                   "spatialscale", "--backends", "reference", "--kernels", str(out)])
    assert rc == 0 and read_csv(out) == []
    assert "header only" in capsys.readouterr().out

    class Empty:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return []
    monkeypatch.setattr(torch.profiler, "profile", Empty)
    rc = cli.main(["bench", "--dry-run", "--device", "cpu", "--shapes", "tiny", "--layers",
                   "spatialscale", "--backends", "triton", "--kernels", str(out)])
    assert rc == 0
    (row,) = read_csv(out)
    assert row["kernel"] == "nothing recorded by the profiler" and row["share"] == ""


def test_bench_budget_spent_measures_nothing(tmp_path, capsys):
    out = tmp_path / "b.csv"
    rc = cli.main([*QUICK, "--backends", "reference", "--layers", "selectscale,dropblock",
                   "--budget", "0", "--csv", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = read_csv(out)
    assert [r["layer"] for r in rows] == ["selectscale", "dropblock"]
    assert all(r["ms"] == "" and r["note"] == "time budget spent" for r in rows)


def test_bench_budget_spent_stops_resnet_too(tmp_path, capsys):
    """--budget covers --resnet's steps (they ran whatever the budget)."""
    out, md, png = tmp_path / "b.csv", tmp_path / "b.md", tmp_path / "b.png"
    rc = cli.main([*QUICK, "--backends", "reference", "--layers", "dropblock", "--resnet",
                   "--budget", "0", "--csv", str(out), "--md", str(md), "--plot", str(png)])
    assert rc == 0, capsys.readouterr().err
    rows = [r for r in read_csv(out) if r["bench"] == "resnet50-step"]
    assert [(r["layer"], r["backend"]) for r in rows] == [("none", "-"),
                                                          ("dropblock", "reference")]
    assert all(r["ms"] == r["overhead_pct"] == "" and r["note"] == "time budget spent"
               for r in rows)
    assert "| dropblock | reference | " in md.read_text()
    assert md.read_text().count("time budget spent") == 3
    assert not png.exists() and "not written: nothing was timed" in capsys.readouterr().out


def test_bench_graph_on_cpu_is_not_measured(tmp_path, capsys):
    out = tmp_path / "g.csv"
    rc = cli.main([*QUICK, "--backends", "reference", "--layers", "selectscale", "--mode",
                   "forward,full", "--graph", "--csv", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {r["mode"]: r for r in read_csv(out)}
    assert float(rows["full"]["ms"]) > 0 and rows["full"]["graph_ms"] == ""
    assert rows["full"]["note"] == "CUDA graphs need a CUDA device"
    assert rows["forward"]["graph_ms"] == "" and rows["forward"]["note"] == ""


def test_bench_resnet_step_quick(tmp_path, capsys):
    out = tmp_path / "r.csv"
    rc = cli.main([*QUICK, "--backends", "reference", "--layers", "camdrop",
                   "--resnet", "--csv", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = [r for r in read_csv(out) if r["bench"] == "resnet50-step"]
    assert [(r["layer"], r["backend"]) for r in rows] == [("none", "-"), ("camdrop", "reference")]
    assert all(float(r["ms"]) > 0 for r in rows) and rows[1]["overhead_pct"] != ""
    assert "ResNet-50 training step" in capsys.readouterr().out


def test_bench_default_device(tmp_path, capsys):
    """The default device (cuda when present) with the reference backend."""
    rc = cli.main(["bench", "--quick", "--backends", "reference", "--layers", "dropblock",
                   "--csv", str(tmp_path / "d.csv")])
    assert rc == 0, capsys.readouterr().err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert read_csv(tmp_path / "d.csv")[0]["device"].startswith(
        "CPU" if device == "cpu" else torch.cuda.get_device_name())


# --------------------------------------------------------------------------- show


def test_show_writes_masks_png(tmp_path, capsys):
    out = tmp_path / "masks.png"
    assert cli.main(["show", "--quick", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    stdout = capsys.readouterr().out
    for layer in models.LAYERS:
        assert layer in stdout


def test_show_quick_keeps_an_explicit_size(tmp_path, capsys):
    """--quick's 96 px is a default: --size 16 with it draws 16 px (it drew 96)."""
    argv = ["show", "--quick", "--size", "16", "--layers", "dropblock,dropblock"]
    assert cli.main([*argv, "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "china.jpg: (16, 24) px" in out
    assert out.count("dropblock") == 1  # a layer named twice is drawn once


def test_layers_named_twice_run_once():
    assert bench.parse_layers("dropblock, corrdrop,dropblock") == ["dropblock", "corrdrop"]
    assert bench.parse_layers(" all ") == bench.parse_layers("all")  # spaces, as in lists
    assert demo._parse_layers(" all ") == demo._parse_layers("all")
    args = types.SimpleNamespace(shapes="tiny,2x16x14x14, 1x2x3x4", dtype="fp32,FP32", quick=False)
    assert bench.configs(args, torch.device("cpu")) == [((2, 16, 14, 14), torch.float32),
                                                        ((1, 2, 3, 4), torch.float32)]


def test_show_masks_are_the_layers_multipliers():
    from guidedrop import show
    x = show.features(show.load_photo(size=48))
    assert x.shape[:2] == (1, 16) and (x >= 0).all() and x.std() > 0
    with bench.forced_backend("reference"):
        masks = {layer: show.mask_of(layer, x, seed=0) for layer in models.LAYERS}
        again = show.mask_of("dropblock", x, seed=0)
        y = guidedrop.functional.corrdrop(x, **show.SHOW_PARAMS["corrdrop"],
                                          generator=torch.Generator().manual_seed(0))
    for w in masks.values():
        assert w.shape == x.shape and (w >= 0).all()
    assert torch.equal(masks["dropblock"], again)  # the same seed, the same mask
    dropped, _ = show.summary(masks["dropblock"])
    assert 0.05 < dropped < 0.6
    assert torch.equal(y, x * masks["corrdrop"])  # w is the multiplier: y = x * w


# --------------------------------------------------------------------------- bad input

BAD = [
    (["bench", "--layers", "nosuch"], "unknown layer 'nosuch'"),
    (["bench", "--layers", "corrdrop,bogus"], "unknown layer 'bogus'"),
    (["bench", "--shapes", "huge"], "unknown shape 'huge'"),
    (["bench", "--shapes", "0x3x4x4"], "every dimension of NxCxHxW must be >= 1"),
    (["bench", "--shapes", "1x2x3"], "3 dimensions"),
    (["bench", "--shapes", "2x-1x4x4"], "every dimension of NxCxHxW must be >= 1"),
    (["bench", "--dtype", "int8"], "unknown dtype"),
    (["bench", "--mode", "sideways"], "unknown mode"),
    (["bench", "--backends", "nosuch"], "unknown backend 'nosuch'"),
    (["bench", "--backends", "all,reference"], "--backends all stands alone"),
    (["bench", "--device", "nosuchdevice"], "not a device name"),
    (["bench", "--device", ""], "not a device name"),
    (["demo", "--device", ""], "not a device name"),
    (["demo", "--threads", "0"], "--threads: 0 is out of range"),
    (["bench", "--threads", "0"], "--threads: 0 is out of range"),
    (["bench", "--threads", "many"], "--threads: 'many' is not an integer"),
    (["bench", "--device", "meta"], "guidedrop runs on cpu or cuda, not meta"),
    (["bench", "--device", "cpu:3"], "one CPU device"),
    (["bench", "--device", "cuda:99"], "not available"),
    (["bench", "--shapes", "100000000000x1x1x1"], "needs about"),
    (["bench", "--shapes", "tiny,4096x4096x4096x4096"], "needs about"),
    (["bench", "--nosuch"], "unrecognized arguments: --nosuch"),
    (["bench", "--budget", "-1"], "--budget: -1 is out of range"),
    (["bench", "--budget", "nan"], "--budget: nan is out of range"),
    (["bench", "--budget", "inf"], "--budget: inf is out of range"),
    (["bench", "--budget", "soon"], "--budget: 'soon' is not a number"),
    (["bench", "--csv", ""], "--csv is empty"),
    (["bench", "--table", " "], "--table is empty"),
    (["show", "--layers", "nosuch"], "unknown layer 'nosuch'"),
    (["show", "--image", "nosuch.jpg"], "unknown image"),
    (["show", "--size", "0"], "--size: 0 is out of range"),
    (["show", "--size", "100000"], "--size: 100000 is out of range"),
    (["show", "--size", "513"], "--size: 513 is out of range: give 16 to 512"),  # 2048: 13 GB
    (["show", "--seed", "100000000000000000000000"], "--seed: 100000000000000000000000 is out"),
    (["show", "--seed", "-1"], "--seed: -1 is out of range"),
    (["demo", "--seed", "100000000000000000000000"], "--seed: 100000000000000000000000 is out"),
    (["demo", "--seed", "-1"], "--seed: -1 is out of range"),
    (["demo", "--epochs", "-1"], "--epochs: -1 is out of range"),
    (["demo", "--epochs", "0"], "--epochs: 0 is out of range"),
    (["demo", "--epochs", "1.5"], "--epochs: '1.5' is not an integer"),
    (["demo", "--seeds", "0"], "--seeds: 0 is out of range"),
    (["demo", "--train-images", "0"], "--train-images: 0 is out of range"),
    (["demo", "--train-images", "5000"], "--train-images: 5000 is out of range"),
    (["demo", "--device", "meta"], "guidedrop runs on cpu or cuda, not meta"),
    (["demo", "--device", "cuda:99"], "not available"),
    (["demo", "--device", "nosuchdevice"], "not a device name"),
    (["demo", "--layers", "none,bogus"], "unknown layer 'bogus'"),
    (["demo", "--layers", ","], "--layers ',' has an empty entry"),
    (["demo", "--layers", "none,,corrdrop"], "--layers 'none,,corrdrop' has an empty entry"),
    (["bench", "--layers", "corrdrop,"], "--layers 'corrdrop,' has an empty entry"),
    (["bench", "--shapes", ""], "--shapes '' has an empty entry"),
    (["bench", "--dtype", "bf16,,fp32"], "--dtype 'bf16,,fp32' has an empty entry"),
    (["bench", "--mode", " "], "--mode ' ' has an empty entry"),
    (["bench", "--backends", "reference,"], "--backends 'reference,' has an empty entry"),
    (["demo", "--plot", "nodir/demo.png"], "does not exist"),
    (["demo", "--plot", "demo.jpg"], ".png"),
    (["bench", "--quick", "--plot", "bench.jpg"], "--plot bench.jpg: give a .png file name"),
    (["demo", "--md", ""], "--md is empty"),
    # root writes anywhere but in /proc: a path that exists as a folder and cannot be written
    (["demo", "--md", "/proc/demo.md"], "cannot write there"),
    (["demo", "--plot", "/proc/demo.png"], "cannot write there"),
    (["demo", "--epochs"], "expected one argument"),
    # a value that starts with a minus and a digit is a value, not an unknown option (it was
    # "expected one argument")
    (["bench", "--budget", "-1e3"], "--budget: -1e3 is out of range: give 0 to 1e+06"),
    (["bench", "--shapes", "-1x1x1x1"], "every dimension of NxCxHxW must be >= 1"),
    # two outputs in one file: the later write replaced the earlier one
    (["bench", "--csv", "r.txt", "--md", "./r.txt"], "--csv and --md both name ./r.txt"),
    (["bench", "--quick", "--table", "r.txt", "--csv", "r.txt"], "--csv and --table both"),
    (["demo", "--plot", "d.png", "--md", "d.png"], "--plot and --md both name d.png"),
    # a file name longer than the file system takes (NAME_MAX 255): Path.is_dir() raised
    (["bench", "--csv", "a" * 256 + ".csv"], "cannot write there (File name too long)"),
    (["demo", "--plot", "a" * 256 + ".png"], "cannot write there (File name too long)"),
    ([], "give a command: demo, bench or show"),
]


def _one_line_error(capsys, rc: int, expected: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    return lines[0]


def test_help_gives_every_numeric_range():
    """Each option parsed by int_in / float_in states its range in --help."""
    import argparse
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    ranged = [(name, a) for name, p in sub.choices.items() for a in p._actions
              if hasattr(a.type, "span")]
    assert len(ranged) >= 8  # --seed of bench, show and demo, --epochs, --size, ...
    for name, a in ranged:
        assert a.type.span in a.help, (name, a.option_strings, a.help)
    # and every option that takes a value says what it is without one
    valued = [(name, a) for name, p in sub.choices.items() for a in p._actions if a.nargs != 0]
    assert len(valued) >= 25
    for name, a in valued:
        assert "default" in a.help, (name, a.option_strings, a.help)


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    if argv[:1] == ["bench"] and "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    if argv[:1] == ["show"]:
        argv = [*argv, "--out", str(tmp_path / "m.png")]
    monkeypatch.chdir(tmp_path)  # demo's default --plot is demo.png in the working folder
    # CPU seconds of this process, not wall time (the README's test command on a busy
    # machine took 11.7 s of it here): refused before any training, benchmark or plot
    # (show --image decodes scikit-learn's sample photos to list their names)
    t0 = time.process_time()
    _one_line_error(capsys, cli.main(argv), expected)
    assert time.process_time() - t0 < 10
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("argv, missing, expected", [
    (["show"], "matplotlib", "show needs matplotlib and scikit-learn"),
    (["show"], "sklearn", "show needs scikit-learn and pillow ("),
    (["demo", "--layers", "none"], "sklearn", "the demo needs sklearn"),
    (["demo", "--layers", "none"], "matplotlib", "the demo needs matplotlib"),
    (["bench", "--quick", "--plot", "b.png"], "matplotlib", "--plot needs matplotlib"),
    (["bench", "--quick", "--resnet"], "torchvision", "--resnet needs torchvision"),
])
def test_missing_extra_says_how_to_install_it(argv, missing, expected, capsys, tmp_path,
                                              monkeypatch):
    """A missing optional dependency names the extra that installs it as the README
    installs (from the clone: pip install ".[demo]"); 'guidedrop[demo]' sent a new user
    to the package index."""
    monkeypatch.chdir(tmp_path)
    for name in [missing] + [m for m in sys.modules if m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # its import raises ImportError
    if argv[0] == "show":
        argv = [*argv, "--out", str(tmp_path / "m.png")]
    extra = "bench" if argv[0] == "bench" else "demo"
    rc = cli.main([*argv, "--device", "cpu"] if argv[0] != "show" else argv)
    err = _one_line_error(capsys, rc, expected)
    assert err.endswith(f': pip install ".[{extra}]" in the guidedrop repository'), err


@pytest.mark.parametrize("option", ["--csv", "--plot", "--md", "--kernels"])
def test_bench_unwritable_paths(option, tmp_path, capsys):
    rc = cli.main([*QUICK, option, str(tmp_path / "missing" / "out.png")])
    _one_line_error(capsys, rc, "does not exist")
    rc = cli.main([*QUICK, option, str(tmp_path)])
    _one_line_error(capsys, rc, "is a directory")


def test_two_outputs_to_one_stream():
    bench.distinct(csv="/dev/null", md="/dev/null")  # a stream takes both: no error


def test_output_fifo_and_dangling_link(tmp_path, capsys):
    """The write probe neither blocks on a FIFO nobody reads (it did, forever) nor deletes a
    symbolic link to a file not yet there (it did, leaving an empty file at the target)."""
    fifo = tmp_path / "f.csv"
    os.mkfifo(fifo)
    _one_line_error(capsys, cli.main([*QUICK, "--csv", str(fifo)]), "a FIFO with no reader")
    link, target = tmp_path / "l.md", tmp_path / "t.md"
    link.symlink_to(target)
    bench.writable(str(link), "--md")
    assert link.is_symlink() and not target.exists()


def test_show_unwritable_out(tmp_path, capsys):
    _one_line_error(capsys, cli.main(["show", "--out", str(tmp_path / "no" / "m.png")]),
                    "does not exist")
    _one_line_error(capsys, cli.main(["show", "--out", str(tmp_path / "m.txt")]), ".png")


def test_unavailable_backend(capsys):
    why = bench.unsupported("cuda", torch.device("cpu"), torch.float32)
    assert why  # the CUDA extension never takes CPU tensors
    _one_line_error(capsys, cli.main([*QUICK, "--backends", "reference,cuda"]),
                    "backend cuda is not available")


SUBPROCESS_BAD = [["bench", "--shapes", "0x3x4x4"], ["bench", "--device", "meta"],
                  ["bench", "--shapes", "100000000000x1x1x1"], ["demo", "--epochs", "0"],
                  ["demo", "--device", "meta"], ["demo", "--seed", "1" + "0" * 23],
                  ["show", "--seed", "1" + "0" * 23], ["demo", "--epochs", "-1"]]


@pytest.mark.parametrize("argv", [a if i < 2 else pytest.param(a, marks=pytest.mark.slow)
                                  for i, a in enumerate(SUBPROCESS_BAD)], ids=" ".join)
def test_bad_input_subprocess_has_no_traceback(argv, tmp_path):
    """What a user sees: one line on stderr, exit status 2, nothing on stdout."""
    r = run_module(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == "" and not list(tmp_path.iterdir())


@pytest.mark.slow  # a Python process: ~10 s
def test_stdout_closed_early_is_quiet(tmp_path):
    """`bench ... | head -1`: the reader goes away; exit status 1 and no traceback (it was a
    BrokenPipeError traceback from a print)."""
    p = subprocess.Popen([sys.executable, "-m", "guidedrop", *QUICK, "--backends", "reference",
                          "--layers", "dropblock", "--budget", "0"], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the first line
    err = p.stderr.read()
    assert p.wait(timeout=300) == 1 and "Traceback" not in err and "Error" not in err, err


def test_shape_error_names_the_shape(tmp_path):
    r = run_module("bench", "--shapes", "0x3x4x4", cwd=tmp_path)
    assert r.stderr.strip().splitlines() == [
        "error: shape '0x3x4x4': every dimension of NxCxHxW must be >= 1"]


# --------------------------------------------------------------------------- pre-check


def _wrong_apply_channel(t, w):
    return reference.apply_channel(t, w * 1.01)  # 1 % off: far beyond float32 tolerance


def _wrong_seed_bits(*args, **kwargs):
    bits = reference.seed_bits(*args, **kwargs).clone()
    bits.view(-1)[0] ^= 1  # one extra (or missing) seed: one block differs
    return bits


WRONG = [("selectscale", {"apply_channel": _wrong_apply_channel}),
         ("dropblock", {"seed_bits": _wrong_seed_bits})]


@pytest.mark.parametrize("layer,override", WRONG, ids=[layer for layer, _ in WRONG])
def test_precheck_fails_loudly_when_a_backend_disagrees(layer, override, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets "triton" take CPU tensors
    monkeypatch.setitem(dispatch._loaded, "triton", (fake_backend(**override), ""))
    out = tmp_path / "r.csv"
    rc = cli.main([*QUICK, "--backends", "reference,triton", "--layers", layer,
                   "--csv", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-2] == "error: 1 backend check(s) failed:"
    assert err[-1].startswith(f"MISMATCH {layer} 2x16x14x14 fp32: backend triton disagrees "
                              "with the reference on output")
    assert "max abs error" in err[-1]
    rows = {r["backend"]: r for r in read_csv(out)}
    assert rows["triton"]["ms"] == "" and rows["triton"]["note"] == err[-1]  # never timed


def test_precheck_passes_for_an_agreeing_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch._loaded, "triton", (fake_backend(), ""))
    out = tmp_path / "ok.csv"
    rc = cli.main([*QUICK, "--backends", "reference,triton", "--layers", "corrdrop",
                   "--csv", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [r["backend"] for r in read_csv(out)] == ["reference", "triton"]


def test_precheck_reports_a_crashing_backend(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch._loaded, "triton", (fake_backend(channel_stats=boom), ""))
    case = bench.Case("selectout", (2, 4, 5, 5), torch.float32, torch.device("cpu"))
    s = bench.check_slice(case, bench.make_inputs(case))
    with bench.forced_backend("reference"):
        expected = bench.run_with_grad(bench.op("selectout"), s)
    with bench.forced_backend("triton"), pytest.raises(bench.MismatchError,
                                                       match="backend triton failed.*launch"):
        bench.check(case, "triton", bench.provider_fn("triton", "selectout"), s, expected)


def test_bench_notes_a_mismatch_and_goes_on(tmp_path, monkeypatch, capsys):
    """A backend that fails its check is not timed, its rows say MISMATCH, the other
    layers and backends still run, the files are written, and the exit status is 1."""
    def boom(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch._loaded, "triton", (fake_backend(channel_stats=boom), ""))
    out = tmp_path / "r.csv"
    rc = cli.main([*QUICK, "--backends", "reference,triton", "--layers",
                   "selectout,dropblock", "--csv", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 backend check(s) failed" in err and "launch failed" in err
    rows = {(r["layer"], r["backend"]): r for r in read_csv(out)}
    assert rows["selectout", "triton"]["note"].startswith("MISMATCH")
    assert rows["selectout", "triton"]["ms"] == ""
    assert rows["dropblock", "triton"]["ms"] != ""  # timed after the mismatch
    assert rows["selectout", "reference"]["ms"] != ""


def test_bench_mismatch_with_resnet_and_markdown(tmp_path, monkeypatch, capsys):
    """A backend that failed its check is not run in the ResNet step either (it crashed
    there, losing every file), and a note holding "|" stays in its markdown cell."""
    def boom(*args, **kwargs):
        raise RuntimeError("\nexpected Tensor | None")  # empty first line, a "|"

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch._loaded, "triton", (fake_backend(channel_stats=boom), ""))
    out, md = tmp_path / "r.csv", tmp_path / "r.md"
    rc = cli.main([*QUICK, "--backends", "reference,triton", "--layers", "selectout",
                   "--resnet", "--csv", str(out), "--md", str(md)])
    assert rc == 1, capsys.readouterr().err
    rows = {(r["bench"], r["backend"]): r for r in read_csv(out)}
    assert rows["op", "triton"]["note"].endswith("RuntimeError: expected Tensor | None")
    step = rows["resnet50-step", "triton"]
    assert step["ms"] == "" and step["note"].startswith("not timed")
    assert rows["resnet50-step", "reference"]["ms"] != ""
    lines = md.read_text().splitlines()
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines
             if line.startswith(("| layer | shape", "| selectout | 2x16x14x14"))]
    assert len(cells) == 3 and len(set(cells)) == 1, lines  # the header's cell count


# --------------------------------------------------------------------------- demo

# Two epochs of one step each: the rates ramp in over the first step, so the second step
# runs every layer at its full rate (with one step every layer stayed at rate 0: no kernel ran).
TINY_DEMO = ["demo", "--layers", "none,corrdrop,camdrop", "--epochs", "2",
             "--train-images", "32", "--seeds", "1", "--device", "cpu"]


def test_demo_table_plot_markdown(tmp_path, capsys, monkeypatch):
    png, md = tmp_path / "d.png", tmp_path / "d.md"
    # the backend a CPU user's demo runs (the tests' TRITON_INTERPRET=1 would make Triton's
    # interpreter run every layer: two minutes instead of seconds)
    monkeypatch.setenv("GUIDEDROP_BACKEND", "reference")
    # busy during the first run only, idle at the end: the note names the peak
    loads = iter([os.cpu_count() + 1.5])
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads, 0.5), 0.0, 0.0))
    argv = [a if a != "1" or i != TINY_DEMO.index("--seeds") + 1 else "2"
            for i, a in enumerate(TINY_DEMO)]  # two seeds: the table shows mean ± std
    from guidedrop import functional
    ran, run = [], functional._run
    monkeypatch.setattr(functional, "_run", lambda layer, *a, **k: ran.append(layer) or run(
        layer, *a, **k))
    threads = []  # --threads sets torch's (recorded, not set: it is process-wide)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # so --threads 1 is advised
    rows = demo_run([*argv, "--plot", str(png), "--md", str(md), "--threads", "1"])
    out = capsys.readouterr().out
    assert threads == [1]
    assert [r["layer"] for r in rows] == ["none", "corrdrop", "camdrop"]
    assert {"corrdrop", "camdrop"} <= set(ran), ran  # each layer's op ran, at a rate > 0
    for r in rows:
        assert r["runs"] == 2
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["s_per_epoch"] > 0
        assert r["gap"] == pytest.approx(r["train_acc"] - r["test_acc"])
    assert rows[0]["overhead_pct"] == 0
    assert rows[1]["overhead_pct"] == pytest.approx(
        100 * (rows[1]["s_per_epoch"] / rows[0]["s_per_epoch"] - 1))
    for head in ("train acc", "test acc", "s/epoch", "overhead %", "±"):
        assert head in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    # a busy machine (load average over cores + 0.5) is named under the table
    assert f"note: load average up to {os.cpu_count() + 1.5:.2f} on {os.cpu_count()} cores" \
        in out
    assert "--threads 1" in out  # and how to steady the timings
    lines = md.read_text().splitlines()
    assert lines[0] == "| layer | train acc | test acc | train − test | s/epoch | overhead % |"
    assert lines[3].startswith("| corrdrop | ")
    # and in the file, under its table (a new user's --md carried none)
    assert lines[5:] == ["", f"(note: load average up to {os.cpu_count() + 1.5:.2f} on "
                         f"{os.cpu_count()} cores: other work shared the CPU, so s/epoch and "
                         "overhead % say little; rerun on an idle machine, or with --threads 1, to "
                         "compare them)"]


@pytest.mark.parametrize("backend,expected", [
    ("nosuch", "GUIDEDROP_BACKEND must be one of auto, reference"),
    ("cuda", "GUIDEDROP_BACKEND=cuda, but it cannot run here"),  # --device cpu: never
])
def test_demo_refuses_a_forced_backend_that_cannot_run(backend, expected, monkeypatch, capsys,
                                                       tmp_path):
    """Before any training: it was a traceback after the baseline had trained (and none
    with one training step: the ramp kept every layer at rate 0, so nothing dispatched)."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", backend)
    monkeypatch.chdir(tmp_path)
    t0 = time.process_time()  # CPU seconds, whatever else the machine runs
    _one_line_error(capsys, cli.main([*TINY_DEMO, "--plot", "never.png"]), expected)
    assert time.process_time() - t0 < 10


@pytest.mark.parametrize("argv", [[*QUICK, "--layers", "selectscale"],
                                  ["bench", "--model", "--no-sass", "--device", "cpu"],
                                  ["show", "--quick", "--out", "never.png"]], ids=str)
def test_every_command_refuses_a_backend_that_names_none(argv, monkeypatch, capsys, tmp_path):
    """bench and show choose their own backends, but a typo in GUIDEDROP_BACKEND is still an
    error (README: "a ValueError at every call"); they ran and exited 0."""
    monkeypatch.setenv("GUIDEDROP_BACKEND", "refrence")
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, cli.main(argv), "GUIDEDROP_BACKEND must be one of auto")
    assert not list(tmp_path.iterdir())  # before anything ran


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_demo_full_disk_is_one_line(capsys):
    """A write that fails after the training (a full disk: /dev/full) is one error line,
    as in bench; it was an OSError traceback."""
    rc = cli.main([*TINY_DEMO, "--layers", "none", "--md", "/dev/full"])  # the last --layers
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: cannot write the results: [Errno 28] No space left on device")


def test_demo_cpu_contention(monkeypatch):
    """Only a CPU run on a machine loaded beyond its cores + 0.5 is flagged."""
    from guidedrop import demo
    cores = os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    assert demo.cpu_contention(torch.device("cpu")) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.51, 0.0, 0.0))
    # two decimals: "2.5" would read as not over 2 + 0.5
    assert demo.cpu_contention(torch.device("cpu")) == f"load average up to {cores + 0.51:.2f} " \
        f"on {cores} cores"
    assert demo.cpu_contention(torch.device("cuda")) is None
    # idle now, busy during the run (peak): flagged with the peak
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    assert demo.cpu_contention(torch.device("cpu")) is None
    assert demo.cpu_contention(torch.device("cpu"), cores + 3) == f"load average up to " \
        f"{cores + 3:.2f} on {cores} cores"


def demo_run(argv):
    from guidedrop import demo
    parser = cli._Parser()
    demo.add_parser(parser.add_subparsers(dest="command"))
    return demo.run(parser.parse_args(argv))


@pytest.mark.slow  # a Python process running the demo: ~15 s (in-process demo tests: default)
def test_demo_subprocess_output_is_clean(tmp_path):
    """No warning or traceback in what a user sees; the table goes to stdout."""
    r = run_module(*TINY_DEMO, "--plot", "demo.png", cwd=tmp_path, TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "camdrop" in r.stdout and "wrote demo.png" in r.stdout
    assert "camdrop: trained in" in r.stderr, r.stderr  # no bar in a pipe: a line per layer
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # about a minute: run by .ci/run's slow stage
def test_demo_quick_baseline_learns():
    """--quick's setting: the model without a regulariser reaches >= 0.90 test accuracy
    (it was 0.09, chance, when --quick ran 20 SGD steps), and trains on its data."""
    from guidedrop import demo
    data = demo.load_digits(torch.device("cpu"), demo.QUICK["train"])
    assert len(data[1]) == 1347 and len(data[3]) == 450
    r = demo.train_one("none", data, epochs=demo.QUICK["epochs"], device=torch.device("cpu"),
                       seed=0, curves=False)
    assert r["test_acc"] >= 0.90 and r["train_acc"] >= 0.90, r


def test_version(capsys):
    """--version names guidedrop's version and torch's (a new user found none)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.split() == ["guidedrop", guidedrop.__version__,
                                                 "(torch", f"{torch.__version__})"], out


def test_tables_round_small_numbers_readably():
    """The demo's overhead of -0.4 % reads +0, not -0; show's share of a few units that
    are dropped (AttentionDrop's map maxima) reads <0.1, not 0.0 beside a min w of 0."""
    from guidedrop import demo, show
    row = {"layer": "selectout", "train_acc": 0.9, "train_acc_std": 0.0, "test_acc": 0.9,
           "test_acc_std": 0.0, "gap": 0.0, "gap_std": 0.0, "s_per_epoch": 1.0,
           "s_per_epoch_std": 0.0, "overhead_pct": -0.4}
    assert demo.cells(row, 1)[-1] == "+0"
    assert demo.cells({**row, "overhead_pct": -2.6}, 1)[-1] == "-3"
    w = torch.ones(4000)
    w[0] = 0
    assert show.pct(show.summary(w)[0]) == "<0.1"
    assert show.pct(0.0) == "0.0" and show.pct(0.25) == "25.0"
