"""``python -m guidedrop show --out masks.png``: what each layer drops, on a photograph.

The photograph is scikit-learn's ``china.jpg`` (shipped inside the installed package,
``sklearn.datasets.load_sample_images``), downscaled to ~128 px, converted to float and
passed through a fixed bank of 16 simple filters (oriented edges, centre-surround blobs,
colour opponents, brightness; then ReLU) so that the feature map ``(1, 16, H, W)`` has
the structure of the image. Each layer runs on it with ``training=True`` and a fixed
seed, at rates high enough to see; a panel per layer shows the multiplier ``w``
(``y = x * w``, recovered exactly as ``grad_x`` of ``y.sum()``) over the grey image.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import functional, models

NAMES = {"corrdrop": "CorrDrop", "selectscale": "SelectScale", "spatialscale": "SpatialScale",
         "selectout": "Selectout", "attentiondrop": "AttentionDrop",
         "focused_dropout": "FocusedDropout", "camdrop": "CamDrop", "dropblock": "DropBlock"}

# Rates high enough to see the masks (not the papers' training defaults).
SHOW_PARAMS: dict[str, dict] = {
    "corrdrop": dict(p=0.3, block_size=8),
    "selectscale": dict(top_rate=0.3, retain=0.1),
    "spatialscale": dict(retain=0.1),
    "selectout": dict(top_rate=0.3, keep=0.7),
    "attentiondrop": dict(alpha=1.0, beta=20.0),
    "focused_dropout": dict(low=0.3, high=0.6),
    "camdrop": dict(block_size=7, keep=0.3, channel_rate=0.5),
    "dropblock": dict(p=0.3, block_size=7),
}


def _usage(msg: str) -> Exception:
    from .cli import UsageError
    return UsageError(msg)


def load_photo(name: str = "china.jpg", size: int = 128) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1], the shorter side ``size`` pixels."""
    try:
        from sklearn.datasets import load_sample_images
        data = load_sample_images()
    except ImportError as e:
        from .cli import needs
        raise needs(f"show needs scikit-learn and pillow ({e})", "demo") from None
    for fname, img in zip(data.filenames, data.images, strict=True):
        if Path(fname).name == name:
            photo = img
            break
    else:
        names = ", ".join(Path(f).name for f in data.filenames)
        raise _usage(f"unknown image {name!r}; choose from {names}")
    x = torch.tensor(photo, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    h, w = x.shape[-2:]
    s = size / min(h, w)
    return F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear",
                         antialias=True, align_corners=False).clamp(0, 1)


def _gauss(sigma: float, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    g = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return g / g.sum(), yy, xx


def filter_bank(k: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (16, 3, k, k), bias (16,)): a fixed, deterministic bank of simple filters.

    0-7: derivative of a Gaussian along 8 directions (45 degrees apart, so both
    polarities of 4 orientations) on the luminance; 8, 9: on- and off-centre difference
    of Gaussians; 10-13: colour opponents R-G, G-R, B-Y, Y-B (Y = (R+G)/2), smoothed;
    14: brightness; 15: darkness (1 - brightness).
    """
    lum = torch.tensor([0.299, 0.587, 0.114])
    g1, yy, xx = _gauss(1.5, k)
    g2, _, _ = _gauss(2.0, k)
    g_in, _, _ = _gauss(1.0, k)
    g_out, _, _ = _gauss(3.0, k)
    kernels, bias = [], []
    for i in range(8):
        t = i * math.pi / 4
        d = -(math.cos(t) * xx + math.sin(t) * yy) / 1.5**2 * g1  # directional derivative
        kernels.append(lum[:, None, None] * d[None] * 4)
        bias.append(0.0)
    dog = g_in - g_out
    kernels += [lum[:, None, None] * dog[None] * 4, -lum[:, None, None] * dog[None] * 4]
    bias += [0.0, 0.0]
    for c in ([1, -1, 0], [-1, 1, 0], [-0.5, -0.5, 1], [0.5, 0.5, -1]):
        kernels.append(torch.tensor(c, dtype=torch.float32)[:, None, None] * g2[None])
        bias.append(0.0)
    kernels += [lum[:, None, None] * g2[None], -lum[:, None, None] * g2[None]]
    bias += [0.0, 1.0]
    return torch.stack(kernels), torch.tensor(bias)


def features(photo: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) photo -> (1, 16, H, W) feature map, ReLU of the filter bank."""
    w, b = filter_bank()
    pad = w.shape[-1] // 2
    x = F.conv2d(F.pad(photo, (pad,) * 4, mode="replicate"), w, b)
    return F.relu(x)


def mask_of(layer: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """w (N, C, H, W) of ``layer`` on x (training, fixed seed): y = x * w, so w = grad_x
    of y.sum() (w is constant in backward)."""
    params = dict(SHOW_PARAMS[layer])
    gen = torch.Generator().manual_seed(seed)
    xr = x.detach().clone().requires_grad_()
    f = getattr(functional, layer)
    if layer == "camdrop":
        cg = torch.Generator().manual_seed(seed + 1)
        weight = torch.randn((10, x.shape[1]), generator=cg)  # a fixed random classifier
        target = torch.tensor([3] * x.shape[0])
        y = f(xr, weight, target, **params, training=True, generator=gen)
    else:
        y = f(xr, **params, training=True, generator=gen)
    (w,) = torch.autograd.grad(y.sum(), xr)
    return w


def _mosaic(t, cols: int = 4, gap: int = 3):
    """(C, H, W) -> (rows*(H+gap)-gap, cols*(W+gap)-gap) numpy tiles, NaN between them."""
    import numpy as np
    c, h, w = t.shape
    rows = -(-c // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan, dtype=np.float32)
    for i in range(c):
        r, q = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = t[i].numpy()
    return out


def _shared(w: torch.Tensor) -> bool:
    """Whether every channel has the same mask."""
    return bool((w == w[:, :1]).all())


def summary(w: torch.Tensor) -> tuple[float, float]:
    """(fraction of units dropped (w = 0), fraction scaled down (0 < w < 1))."""
    return float((w == 0).float().mean()), float(((w > 0) & (w < 1)).float().mean())


def pct(f: float) -> str:
    """A share in % to one decimal; one that rounds to 0.0 but is not 0 (a few units, as
    AttentionDrop's map maxima, dropped): "<0.1"."""
    return "<0.1" if 0 < f < 0.0005 else f"{100 * f:.1f}"


def render(photo: torch.Tensor, x: torch.Tensor, masks: dict[str, torch.Tensor], out: str,
           seed: int, dpi: int = 110) -> None:
    """Panels: the photo, the 16 feature maps, then per layer the 16 channels' w over the
    grey image (dark blue = dropped, clear = 1, orange = amplified)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    c = x.shape[1]
    grey = (photo[0] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    grey_tiles = _mosaic(grey.expand(c, *grey.shape))
    gray = plt.get_cmap("gray").with_extremes(bad="white")
    wmap = LinearSegmentedColormap.from_list(
        "w", [(0.0, (0.02, 0.05, 0.35, 0.92)), (0.5, (1, 1, 1, 0)), (1.0, (1.0, 0.45, 0.0, 0.75))]
    ).with_extremes(bad=(1, 1, 1, 0))

    n = len(masks) + 2
    ncols = 4 if n > 4 else n
    nrows = -(-(n + 1) // ncols)  # one more slot for the colour scale
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.75 * nrows), squeeze=False,
                             layout="constrained")
    axes = list(axes.flat)
    axes[0].imshow(photo[0].permute(1, 2, 0).numpy())
    axes[0].set_title("china.jpg (from scikit-learn)", fontsize=10)
    feat = x[0] / x[0].flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
    axes[1].imshow(_mosaic(feat), cmap=gray, vmin=0, vmax=1)
    axes[1].set_title(f"x: {c} filter responses (ReLU),\neach scaled to its max", fontsize=10)
    im = None
    for ax, (layer, w) in zip(axes[2:n], masks.items(), strict=True):
        ax.imshow(grey_tiles, cmap=gray, vmin=0, vmax=1)
        im = ax.imshow(_mosaic(w[0]), cmap=wmap, vmin=0, vmax=2, interpolation="nearest")
        dropped, down = summary(w)
        shared = ", same mask in every channel" if _shared(w) else ""
        ax.set_title(f"{NAMES[layer]}{shared}\n{pct(dropped)}% dropped, "
                     f"{pct(down)}% scaled down, max w {float(w.max()):.2f}", fontsize=9.5)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for ax in axes[n:]:
        ax.axis("off")
    if im is not None and len(axes) > n:
        cax = axes[n].inset_axes((0.08, 0.55, 0.84, 0.09))
        fig.colorbar(im, cax=cax, orientation="horizontal")
        axes[n].text(0.5, 0.38, "multiplier w, y = x * w, per channel of x\n"
                     "dark blue: dropped (w = 0)\nclear: unchanged (w = 1)\n"
                     "orange: amplified (w > 1, e.g. the\nnormalisation of the kept units)",
                     ha="center", va="top", fontsize=9, transform=axes[n].transAxes)
    fig.suptitle(f"guidedrop: what each layer drops from x (training mode, seed {seed})",
                 fontsize=12)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def run(args) -> dict[str, torch.Tensor]:
    from .bench import forced_backend, parse_layers, writable
    layers = parse_layers(args.layers)
    writable(args.out, "--out", ".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from .cli import needs
        raise needs("show needs matplotlib and scikit-learn", "demo") from None
    # an explicit --size wins over --quick's (as demo's options win over its presets)
    photo = load_photo(args.image, args.size or (96 if args.quick else 128))
    x = features(photo)
    # The masks are the same on every backend (given the same randomness): draw them on
    # the reference, whatever GUIDEDROP_BACKEND or TRITON_INTERPRET say.
    with forced_backend("reference"):
        masks = {layer: mask_of(layer, x, args.seed) for layer in layers}
    from rich.table import Table

    from .cli import console
    out = console()
    out.print(f"{args.image}: {tuple(photo.shape[-2:])} px -> feature map {tuple(x.shape)}",
              highlight=False)
    table = Table()
    for head in ("layer", "dropped %", "scaled down %", "min w", "max w", "mask"):
        table.add_column(head, justify="left" if head in ("layer", "mask") else "right")
    for layer, w in masks.items():
        dropped, down = summary(w)
        table.add_row(layer, pct(dropped), pct(down), f"{float(w.min()):.3f}",
                      f"{float(w.max()):.3f}",
                      "same in every channel" if _shared(w) else "per channel")
    out.print(table)
    try:
        render(photo, x, masks, args.out, args.seed, dpi=60 if args.quick else 110)
    except OSError as e:
        raise _usage(f"--out {args.out}: cannot write ({e})") from None
    print(f"wrote {args.out}")
    return masks


def add_parser(sub) -> None:
    from .cli import int_in, seed_arg
    s = sub.add_parser("show", help="draw what each layer drops on a photograph",
                       description="Apply each layer (training mode, fixed seed) to filter "
                       "responses of a photograph shipped with scikit-learn and draw its "
                       "mask over the image. The masks are drawn on the reference backend "
                       "(the same on every backend), whatever GUIDEDROP_BACKEND says.")
    s.add_argument("--out", default="masks.png", metavar="PATH",
                   help="PNG file to write (default masks.png)")
    s.add_argument("--layers", default="all",
                   help=f"comma list of {', '.join(models.LAYERS)} (default: all)")
    s.add_argument("--image", default="china.jpg",
                   help="china.jpg or flower.jpg (default china.jpg)")
    # At most 512: a panel draws its 16 tiles ~120 px wide, so more is not seen, and it
    # costs: 512 took 48 s and 2.4 GB for every layer on 2 CPU cores; 2048, over 120 s and
    # 13.5 GB for one layer.
    s.add_argument("--size", type=int_in(16, 512), default=None,
                   help="shorter side in pixels, 16 to 512 (default 128, --quick 96)")
    seed_arg(s)
    s.add_argument("--quick", action="store_true", help="a smaller image and PNG (CI)")
