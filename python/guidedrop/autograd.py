"""The one autograd Function of every layer: y = x * w, grad_x = grad_y * w.

``w`` is held constant (SPEC §1) and never stored: the Function keeps the layer's small
state (a :class:`~guidedrop.layers.Plan`) and rebuilds ``w`` inside the backend's apply
kernel, in the forward on x and in the backward on grad_y. Only AttentionDrop, whose
soft mask depends on x unit by unit, keeps x.
"""

from __future__ import annotations

import torch

from . import layers


class _ApplyPlan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend, kind, meta, state):
        # state is one tuple, not *state: with a varargs forward, Dynamo's no-grad path
        # mistakes the argument count for a forward without ctx (torch 2.14).
        ctx.backend, ctx.kind, ctx.meta = backend, kind, meta
        keep_x = (x,) if kind == "attention" else ()
        ctx.save_for_backward(*keep_x, *state)
        return layers.apply(backend, layers.Plan(kind, meta, state), x, x)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, state = (saved[0], saved[1:]) if ctx.kind == "attention" else (None, saved)
        plan = layers.Plan(ctx.kind, ctx.meta, state)
        g = layers.apply(ctx.backend, plan, grad, x) if ctx.needs_input_grad[0] else None
        return g, None, None, None, None


def apply(backend, plan: layers.Plan, x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> x * w(plan), differentiable in x."""
    return _ApplyPlan.apply(x, backend, plan.kind, plan.meta, plan.state)
