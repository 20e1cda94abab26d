"""The hot paths the kernels fuse, as public ops on the dispatched backend.

They are what the layers are built from (see :mod:`guidedrop.layers`); exposed for
users who build their own guided regularisers and for the tests and benchmarks.

They are not differentiable: on every backend their outputs carry no gradient (no
``grad_fn``, ``requires_grad`` False, whatever x's), as the layers use them only to choose
what to drop. Where a statistic must be differentiated, compute it with torch's ops.
"""

from __future__ import annotations

import torch

from . import _validation as V
from . import dispatch, layers, reference
from .functional import fx_leaf, no_autocast


def _backend(x: torch.Tensor):
    """The backend that runs a primitive on x (validated), and x as the kernels read it
    (V.resolved), detached: no primitive is differentiable (the module docstring), also
    while torch.compile traces the kernel ops, whose statistics have no autograd formula."""
    V.feature_map(x)
    return dispatch.backend_for(x), V.resolved(x.detach())


@fx_leaf
def pooled_correlation(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, ceil(H/k), ceil(W/k)) float32 (float64 for float64 x, which
    only the reference backend takes): CorrDrop's F (SPEC §2 step 2).

    Mean over pooled positions j of |â_i·â_j − δ_ij|, â the L2-normalised channel vectors
    of the k x k average-pooled map. Mathematically equal F are exactly equal (each
    |â_i·â_j| rounded to a multiple of 2^-32, exact row sums), F does not change when x is
    scaled by a positive factor, and a k >= max(H, W) is one window (no work grows with
    k). NaN or Inf in a sample: that sample's F are NaN. Empty x (N, H or W = 0): an
    empty F of that shape; C = 0 (zero rows): F = 1 / N'.
    Raises TypeError / ValueError for an x that is not a 4-D floating tensor, or a k that
    is not an integer >= 1.
    """
    B, x = _backend(x)  # x validated first: the autocast context reads x.device
    k = V.block_size(k, "k")
    with no_autocast(x.device):
        return B.pooled_correlation(x, k)


@fx_leaf
def channel_max(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C) float32 (float64 for float64 x): max over H, W of |x| (0
    for empty maps, NaN for a map with a NaN). Raises TypeError / ValueError for an x that
    is not a 4-D floating tensor."""
    B, x = _backend(x)
    return B.channel_stats(x)[0]


@fx_leaf
def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C) float32 (float64 for float64 x): mean over H, W (summed
    in float64, so equal values in any order give exactly equal means; NaN for empty maps,
    as torch.mean).
    Raises TypeError / ValueError for an x that is not a 4-D floating tensor."""
    B, x = _backend(x)
    return B.channel_stats(x)[1]


@fx_leaf
def top_percentile_threshold(x: torch.Tensor, beta: float) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C) float32 (float64 for float64 x): the n_β-th largest value
    of each map.

    n_β = max(1, math.ceil(beta * H * W / 100)) in Python floats, left to right (SPEC §4);
    the top beta % of a map are the units >= it.
    Exact (a value of the map; NaN counts as the largest). Empty maps (H * W = 0): NaN.
    Raises TypeError / ValueError for an x that is not a 4-D floating tensor, ValueError
    for beta outside (0, 100].
    """
    B, x = _backend(x)  # x validated first: n_β reads x.shape
    beta = V.real("beta", beta, 0, 100, open_lo=True)
    h, w = x.shape[-2:]
    return B.map_threshold(x, layers.beta_count(beta, h, w))


@fx_leaf
def block_upsample(mask: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    """mask: (N, H', W') of any dtype (bool, integer or floating) -> (N, H, W) of that dtype:
    nearest upsampling by k, cropped to H x W.

    out[n, i, j] = mask[n, i // k, j // k]. Any k >= 1 is valid: a k of at least max(H, W)
    makes the map one block (out = mask[n, 0, 0] everywhere); neither work nor memory grows
    with k. An empty mask or H, W = 0 gives an empty output. The layers never materialise
    this: their apply kernels read the small mask at (i // k, j // k); so it is torch code
    on every backend (torch indexing), which ``GUIDEDROP_BACKEND`` does not change.

    Raises TypeError / ValueError for a k that is not an int >= 1 or an H, W that is not an
    int >= 0 (SPEC §1 argument types), TypeError for a mask that is not a tensor,
    ValueError for a mask that is not 3-D or does not cover H x W, and for a
    GUIDEDROP_BACKEND naming no backend (as every op).
    """
    dispatch.requested()  # a typo in it is an error at every call, as for the other ops
    k = V.block_size(k, "k")
    h, w = V.integer("h", h, 0), V.integer("w", w, 0)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    V.dense("mask", mask)
    if mask.dim() != 3 or mask.shape[1] * k < h or mask.shape[2] * k < w:
        raise ValueError(f"mask must be (N, >= ceil(H/k), >= ceil(W/k)), got {tuple(mask.shape)}")
    return reference.upsample(mask.detach(), k, h, w)


__all__ = [
    "pooled_correlation", "channel_max", "channel_mean", "top_percentile_threshold",
    "block_upsample",
]
