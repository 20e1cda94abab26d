"""DropBlock's plan on Triton (``layers.dropblock``, SPEC §7) in 2 launches.

1. seeds (``block_mask._seed_bits_kernel``): u < g at the valid centres, packed; it also
   zeroes the coverage kernel's ticket;
2. coverage + scale (``block_mask._seed_coverage_kernel``): the r x r blocks, packed (the
   plan's state), the units they cover, and in its last program the scale of
   ``normalize`` (float64 arithmetic rounded to float32, as ``layers._scale``).

The apply (``apply_seeds``) is the third launch; with ``noise=None`` the Philox seed is one
more (``torch.randint``). The seed rate g is computed on the host from python numbers and
reaches the kernel as a runtime float32 argument.
"""

from __future__ import annotations

import torch

from guidedrop.layers import Plan, _rate, _seed_rate, rate64
from guidedrop.reference import fitted_block

from .._common import as_float32, op
from ..block_mask import draw_seed, packed_bits, seed_launch, seeds_fake, seeds_scale


def rate_args(q, x):
    """(g_t, g_val): the rate q for the seeds kernel. Eager: a float32-valued python float
    (no launch, no tensor). While torch.compile traces, q may be symbolic (a schedule
    moves it): a python float in an op's schema would then be specialised, one recompile
    per rate, so the traced graph passes ``layers._rate``'s 0-dim tensor instead (one
    small op, in compiled graphs only)."""
    if torch.compiler.is_compiling():
        return _rate(q, x), 0.0
    return None, as_float32(float(q))


@op("dropblock_plan", lambda x, noise, seed, g_t, g_val, r, cs, normalize:
    seeds_fake([x.shape[0], cs, *x.shape[2:]], x.device))
def _plan(x: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor,
          g_t: torch.Tensor | None, g_val: float, r: int, cs: int,
          normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (N, ceil(Cs*H*W/8)) uint8: the seeds' packed r x r blocks, scale (N,)
    float32)."""
    n, c, h, w = x.shape
    shape = [n, cs, h, w]
    bits = packed_bits(shape, x.device)
    ticket = torch.empty((1,), dtype=torch.int32, device=x.device)
    seed_launch(bits, noise, seed, g_t, g_val, r, None, None, shape, ticket)
    return seeds_scale(bits, ticket, r, c, cs, h, w, normalize)


def plan_dropblock(x, p, block_size, *, shared_channels, normalize, noise=None,
                   generator=None):
    """``layers.dropblock`` fused: the same Plan, bit for bit, in 2 launches (+1 draw).

    x: (N, C, H, W) float32/float16/bfloat16, H, W >= 1; noise: (N, Cs, H, W) or None
    (Cs = 1 with ``shared_channels``, else C). Returns Plan("seeds", (1, Cs == 1),
    (blocks (N, ceil(Cs*H*W/8)) uint8, scale (N,) float32)), blocks the seeds' packed r x r
    blocks (``layers._seeds_plan``)."""
    n, c, h, w = x.shape
    r = fitted_block(block_size, h, w)
    cs = 1 if shared_channels else c
    g_t, g_val = rate_args(_seed_rate(rate64(p, x.device), r, h, w), x)
    seed = draw_seed(noise, generator, x.device)
    blocks, scale = _plan(x, noise, seed, g_t, g_val, r, cs, normalize)
    return Plan("seeds", (1, cs == 1), (blocks, scale))


__all__ = ["plan_dropblock"]
