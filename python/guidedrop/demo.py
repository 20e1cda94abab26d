"""``python -m guidedrop demo``: a small ResNet trained on scikit-learn's digits
(1,797 real 8x8 scans, upsampled to 32x32, fixed train/test split) with no regulariser
and with each guidedrop layer placed as its paper does (:mod:`guidedrop.models`)."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from . import models
from .context import cam_targets
from .schedule import LinearRamp


def load_digits(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (N, 1, 32, 32), y_train (N,), x_test, y_test), standardised, fixed split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        from .cli import UsageError
        raise UsageError("the demo needs scikit-learn: pip install 'guidedrop[demo]'") from e
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:450], perm[450:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def _bar(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        filled = int(30 * done / total)
        print(f"\r{label:16s} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}",
              end="" if done < total else "\n", file=sys.stderr, flush=True)


def train_one(layer: str, data, *, epochs: int, steps: int | None, device, seed: int) -> dict:
    """Train SmallResNet with ``layer`` ('none' = no regulariser); accuracy and timing."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = models.SmallResNet(num_classes=10, width=16).to(device)
    if layer != "none":
        models.insert(model, layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batch = 64
    per_epoch = steps or -(-len(ytr) // batch)
    ramp = LinearRamp(model, steps=max(1, per_epoch * epochs // 2))
    total, t_train = per_epoch * epochs, 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(ytr), device=device)
        t0 = time.perf_counter()
        for i in range(per_epoch):
            idx = order[(i * batch) % len(ytr):][:batch]
            xb, yb = xtr[idx], ytr[idx]
            with cam_targets(model.fc, yb):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ramp.step()
            _bar(layer, epoch * per_epoch + i + 1, total)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
    return {"layer": layer, "loss": loss.item(), "train_acc": _accuracy(model, xtr, ytr),
            "test_acc": _accuracy(model, xte, yte), "s_per_epoch": t_train / epochs}


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return sum((model(xb).argmax(1) == yb).sum().item()
               for xb, yb in zip(x.split(256), y.split(256))) / len(y)


def run(args) -> list[dict]:
    from .cli import UsageError
    layers = ["none", *models.LAYERS] if args.layers == "all" else args.layers.split(",")
    bad = [name for name in layers if name != "none" and name not in models.LAYERS]
    if bad:
        raise UsageError(f"unknown layer {bad[0]!r}; choose from none, {', '.join(models.LAYERS)}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"device {args.device!r} is not available here ({e})") from None
    epochs = args.epochs or (2 if args.quick else 8)
    steps = 10 if args.quick else None
    data = load_digits(device)
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, 32x32; device {device}; "
          f"{epochs} epoch(s){' of 10 steps (--quick)' if args.quick else ''}")
    rows = [train_one(name, data, epochs=epochs, steps=steps, device=device, seed=args.seed)
            for name in layers]
    print(f"{'layer':16s} {'loss':>7s} {'train acc':>9s} {'test acc':>9s} {'s/epoch':>8s}")
    for r in rows:
        print(f"{r['layer']:16s} {r['loss']:7.3f} {r['train_acc']:9.3f} {r['test_acc']:9.3f} "
              f"{r['s_per_epoch']:8.2f}")
    return rows
