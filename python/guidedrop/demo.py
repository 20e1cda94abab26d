"""``python -m guidedrop demo``: a small ResNet trained on scikit-learn's digits (1,797 real
8x8 scans, upsampled to 32x32; a fixed split: 450 test images, the training images drawn
from the rest) with no regulariser and with each guidedrop layer placed as its paper does
(guidedrop.models), its rates ramped in over the first half of training.

- ``--quick``: every training image (1,347), 2 epochs, one seed: about a minute on 2 CPU cores,
  and the baseline reaches about 0.95 test accuracy; it shows that every layer trains.
- the full run: 150 training images and 30 epochs, so that the model overfits (train
  accuracy 1.0, test well below), 3 seeds, mean ± std; it shows each layer's effect on the
  train-test gap, and writes a PNG (test accuracy per epoch per layer, and the gap).

Seconds per epoch are training steps only (no evaluation), timed after an untimed warm-up
step of each model, so that no row pays for start-up; overhead is against the baseline.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import dispatch, models
from .cli import (
    UsageError,
    _first_line,
    comma_list,
    console,
    int_in,
    needs,
    parse_device,
    seed_arg,
    threads_arg,
)
from .context import cam_targets
from .schedule import LinearRamp

TEST_IMAGES = 450
BATCH = 32
LR = 0.1
QUICK = dict(train=1347, epochs=2, seeds=1)
FULL = dict(train=150, epochs=30, seeds=3)


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="train a small ResNet on digits with each layer",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    d.add_argument("--quick", action="store_true",
                   help=f"all training images, {QUICK['epochs']} epochs, 1 seed")
    d.add_argument("--epochs", type=int_in(1, 1000), default=None,
                   help=f"epochs per run, 1 to 1000 (default {FULL['epochs']}, --quick "
                        f"{QUICK['epochs']})")
    most = 1797 - TEST_IMAGES  # sklearn's digits: 1,797 images
    d.add_argument("--train-images", type=int_in(BATCH, most), default=None,
                   help=f"training images, {BATCH} to {most} (default {FULL['train']}, --quick "
                        f"{QUICK['train']})")
    d.add_argument("--seeds", type=int_in(1, 100), default=None,
                   help=f"runs per layer (seeds seed, seed + 1, ...), 1 to 100 (default "
                        f"{FULL['seeds']}, --quick 1)")
    seed_arg(d)
    threads_arg(d)
    d.add_argument("--layers", default="all", help="comma list of none, "
                   + ", ".join(models.LAYERS) + " ('none' = no regulariser; default all)")
    d.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when present)")
    d.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG of test accuracy and train-test gap per epoch (default demo.png; "
                        "--quick: none)")
    d.add_argument("--md", default=None, metavar="PATH",
                   help="also write the table as markdown (default: none)")


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cpu_contention(device, peak: float = 0.0) -> str | None:
    """Why the timings of a CPU run are not to be trusted, or None: the highest 1-minute load
    average seen (``peak``: sampled during the run, and now) over the cores + 0.5 (this
    process alone accounts for up to one per core; half a core of other work is enough:
    bench's reference CorrDrop read 24 ms instead of 0.65 ms at load 2.6 on 2 cores, with
    torch's 2 threads, and was not flagged at the cores + 1 of before)."""
    if device.type != "cpu":
        return None
    load, cores = max(peak, load_average()), os.cpu_count() or 1
    return f"load average up to {load:.2f} on {cores} cores" if load > cores + 0.5 else None


def load_digits(device, train_images: int):
    """(x_train (n, 1, 32, 32), y_train (n,), x_test (450, ...), y_test), standardised;
    the split is fixed, the training images are the first ``train_images`` of the rest."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:TEST_IMAGES], perm[TEST_IMAGES:TEST_IMAGES + train_images]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def _step(model, opt, xb, yb) -> None:
    with cam_targets(model.fc, yb):
        loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(layer: str, data, *, epochs: int, device, seed: int, curves: bool,
              advance=lambda: None) -> dict:
    """Train SmallResNet with ``layer`` ('none' = no regulariser).

    Returns train_acc, test_acc, s_per_epoch (training steps only, after a warm-up step)
    and, with ``curves``, per-epoch lists test_curve and gap_curve (train - test accuracy).
    """
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = models.SmallResNet(num_classes=10, width=16).to(device)
    if layer != "none":
        models.insert(model, layer)
    steps_per_epoch = -(-len(ytr) // BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch)
    ramp = (LinearRamp(model, steps=max(1, steps_per_epoch * epochs // 2))
            if layer != "none" else None)

    # Untimed warm-up on a copy (the trained model and its random stream are untouched):
    # the first step pays for allocations, kernel selection and lazy initialisation.
    warm = copy.deepcopy(model).train()
    rng = torch.get_rng_state()
    with cam_targets(warm.fc, ytr[:BATCH]):
        F.cross_entropy(warm(xtr[:BATCH]), ytr[:BATCH]).backward()
    torch.set_rng_state(rng)
    del warm
    _sync(device)

    t_train, test_curve, gap_curve = 0.0, [], []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for idx in torch.randperm(len(ytr), device=device).split(BATCH):
            _step(model, opt, xtr[idx], ytr[idx])
            sched.step()
            if ramp is not None:
                ramp.step()
        _sync(device)
        t_train += time.perf_counter() - t0
        if curves:
            test_acc, train_acc = _accuracy(model, xte, yte), _accuracy(model, xtr, ytr)
            test_curve.append(test_acc)
            gap_curve.append(train_acc - test_acc)
        advance()
    return {"layer": layer, "train_acc": _accuracy(model, xtr, ytr),
            "test_acc": _accuracy(model, xte, yte), "s_per_epoch": t_train / epochs,
            "test_curve": test_curve, "gap_curve": gap_curve}


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return sum((model(xb).argmax(1) == yb).sum().item()
               for xb, yb in zip(x.split(256), y.split(256), strict=True)) / len(y)


def _parse_layers(s: str) -> list[str]:
    if s.strip() == "all":
        return ["none", *models.LAYERS]
    names = comma_list(s, "--layers")
    for name in names:
        if name != "none" and name not in models.LAYERS:
            raise UsageError(f"unknown layer {name!r}; choose from none, "
                             + ", ".join(models.LAYERS))
    return names


def summarise(runs: list[dict], layers: list[str]) -> list[dict]:
    """One row per layer: mean and std over seeds of each number, overhead % vs 'none'."""
    rows = []
    for layer in layers:
        mine = [r for r in runs if r["layer"] == layer]
        row = {"layer": layer, "runs": len(mine)}
        for key in ("train_acc", "test_acc", "s_per_epoch"):
            vals = [r[key] for r in mine]
            row[key] = statistics.fmean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        gaps = [r["train_acc"] - r["test_acc"] for r in mine]
        row["gap"], row["gap_std"] = statistics.fmean(gaps), (
            statistics.stdev(gaps) if len(gaps) > 1 else 0.0)
        rows.append(row)
    base = next((r for r in rows if r["layer"] == "none"), None)
    for r in rows:
        r["overhead_pct"] = (100 * (r["s_per_epoch"] / base["s_per_epoch"] - 1)
                             if base is not None else float("nan"))
    return rows


COLUMNS = [("layer", "layer"), ("train_acc", "train acc"), ("test_acc", "test acc"),
           ("gap", "train − test"), ("s_per_epoch", "s/epoch"), ("overhead_pct", "overhead %")]


def cells(row: dict, seeds: int) -> list[str]:
    def pm(key, fmt):
        v = format(row[key], fmt)
        return f"{v} ± {format(row[key + '_std'], fmt.lstrip('+'))}" if seeds > 1 else v

    over = "" if row["layer"] == "none" else (
        "-" if row["overhead_pct"] != row["overhead_pct"]
        else f"{round(row['overhead_pct']):+d}")  # an int: -0.4 reads +0, not -0
    return [row["layer"], pm("train_acc", ".3f"), pm("test_acc", ".3f"), pm("gap", "+.3f"),
            pm("s_per_epoch", ".2f"), over]


def table(rows: list[dict], seeds: int, title: str):
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for i, (_, head) in enumerate(COLUMNS):
        t.add_column(head, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*cells(r, seeds))
    return t


def markdown(rows: list[dict], seeds: int) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cells(r, seeds)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_plot(path: str, runs: list[dict], layers: list[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_test, ax_gap) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, layer in enumerate(layers):
        mine = [r for r in runs if r["layer"] == layer]
        for ax, key in ((ax_test, "test_curve"), (ax_gap, "gap_curve")):
            curves = torch.tensor([r[key] for r in mine], dtype=torch.float64)
            mean = curves.mean(0)
            epochs = range(1, len(mean) + 1)
            style = dict(color="black", lw=2.2) if layer == "none" else dict(
                color=colours(i % 10), lw=1.3)
            ax.plot(epochs, mean, label=layer, **style)
            if len(mine) > 1:
                std = curves.std(0)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.12, color=style["color"])
    ax_test.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean ± std)")
    ax_test.set_ylim(bottom=max(0.0, ax_test.get_ylim()[0]), top=1.0)
    ax_gap.set(xlabel="epoch", ylabel="train − test accuracy", title="train − test gap")
    ax_gap.axhline(0, color="grey", lw=0.8)
    ax_gap.legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> list[dict]:
    """The ``demo`` command; returns one summary row per layer."""
    preset = QUICK if args.quick else FULL
    epochs = args.epochs or preset["epochs"]
    seeds = args.seeds or preset["seeds"]
    train_images = args.train_images or preset["train"]
    layers = _parse_layers(args.layers)
    device = parse_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:  # a forced backend that cannot run fails now, not mid-run after the baseline trained
        # (one naming no backend: cli.main, for every command)
        if dispatch.requested() != "auto":
            dispatch.backend_for(torch.empty(0, device=device))
    except RuntimeError as e:
        raise UsageError(_first_line(e)) from None
    plot = args.plot if args.plot is not None else (None if args.quick else "demo.png")
    from .bench import distinct, writable  # opens the file: /proc fails
    writable(plot, "--plot", ".png")  # now, not after the training
    writable(args.md, "--md")
    distinct(plot=plot, md=args.md)
    try:
        import sklearn  # noqa: F401
        if plot:
            import matplotlib  # noqa: F401
    except ImportError as e:
        raise needs(f"the demo needs {e.name}", "demo") from None

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    data = load_digits(device, train_images)
    what = (f"SmallResNet on digits 32x32: {len(data[1])} train / {len(data[3])} test images, "
            f"{epochs} epoch{'s' if epochs > 1 else ''}, {seeds} seed{'s' if seeds > 1 else ''} "
            f"from {args.seed}, device {device}")
    out = console()
    out.print(what, highlight=False)
    runs, peak = [], 0.0
    err = console(stderr=True)
    with Progress("{task.description:<16}", BarColumn(), MofNCompleteColumn(), "epochs",
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("", total=len(layers) * seeds * epochs)

        def advance():  # after each epoch: the load during the run, not only at its end
            nonlocal peak
            peak = max(peak, load_average())
            bar.advance(task)

        for i, layer in enumerate(layers, 1):
            bar.update(task, description=layer)
            t0 = time.perf_counter()
            for s in range(seeds):
                runs.append(train_one(layer, data, epochs=epochs, device=device,
                                      seed=args.seed + s, curves=bool(plot), advance=advance))
            if bar.disable:  # no bar in a log or pipe: a line per layer shows the progress
                err.print(f"[{i}/{len(layers)}] {layer}: trained in "
                          f"{time.perf_counter() - t0:.1f} s", highlight=False)
    rows = summarise(runs, layers)
    note = "mean ± std over seeds; " if seeds > 1 else ""
    out.print(table(rows, seeds, "accuracy after the last epoch"))
    out.print(f"({note}s/epoch: training steps only, after a warm-up step; "
                  "overhead: s/epoch against none)", highlight=False)
    busy = cpu_contention(device, peak)
    again = "" if torch.get_num_threads() == 1 else ", or with --threads 1,"
    busy_note = busy and (f"(note: {busy}: other work shared the CPU, so s/epoch and "
                          f"overhead % say little; rerun on an idle machine{again} to "
                          "compare them)")
    if busy_note:
        out.print(busy_note, highlight=False)
    try:  # probed before the training, but a disk can fill up since (as bench says it)
        if args.md:  # the note too: a table copied from the file keeps it
            Path(args.md).write_text(markdown(rows, seeds)
                                     + (f"\n{busy_note}\n" if busy_note else ""))
            out.print(f"wrote {args.md}", highlight=False)
        if plot:
            write_plot(plot, runs, layers, what)
            out.print(f"wrote {plot}", highlight=False)
    except OSError as e:
        raise UsageError(f"cannot write the results: {e}") from None
    sys.stdout.flush()
    return rows
