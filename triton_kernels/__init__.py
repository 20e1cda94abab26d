"""guidedrop.triton_kernels: the Triton backend (see python/guidedrop/backend_contract.md).

Installed as ``guidedrop.triton_kernels`` (setup.py maps this folder there). One module per
hot path; each kernel indexes x by logical (n, c, h, w) with x's strides (contiguous,
channels_last and sliced inputs alike, no copies). Importing it without Triton raises
ImportError, which guidedrop.dispatch reports as "unavailable".
"""

import torch
import triton  # noqa: F401  (ImportError here: the backend is unavailable)

from guidedrop.autograd import register_apply_ops

from ._common import HAS_OPS, unavailable, unsupported
from .block_mask import apply_block, apply_seeds, seed_bits, seed_coverage
from .channel_ranking import apply_channel, channel_stats
from .class_activation import cam
from .percentile_threshold import apply_attention, attention_stats, kth_largest, map_threshold
from .plans.attentiondrop import plan_attentiondrop
from .plans.camdrop import plan_camdrop
from .plans.corrdrop import plan_corrdrop
from .plans.dropblock import plan_dropblock
from .plans.focused_dropout import plan_focused_dropout
from .plans.selectscale import plan_selectout, plan_selectscale
from .pooled_correlation import pooled_correlation

name = "triton"

if HAS_OPS:  # (older torch: plain functions, which an exported program traces through)
    register_apply_ops(torch.ops.guidedrop_triton)

__all__ = [
    "name",
    "unavailable",
    "unsupported",
    "pooled_correlation",
    "channel_stats",
    "kth_largest",
    "map_threshold",
    "attention_stats",
    "cam",
    "seed_bits",
    "seed_coverage",
    "apply_channel",
    "apply_block",
    "apply_seeds",
    "apply_attention",
    "plan_attentiondrop",
    "plan_selectscale",
    "plan_selectout",
    "plan_focused_dropout",
    "plan_corrdrop",
    "plan_camdrop",
    "plan_dropblock",
]
