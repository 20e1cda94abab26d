"""The one autograd Function of every layer: y = t * w, grad_t = grad_y * w.

``w`` is held constant (SPEC §1) and never stored: the Function keeps the layer's small
state (a :class:`~guidedrop.layers.Plan`) and rebuilds ``w`` inside the backend's apply
kernel, in the forward on x and in the backward on grad_y. Only AttentionDrop, whose
soft mask depends on x unit by unit, keeps x (detached: w is a constant of x).

The backward is the same Function applied to grad_y, so it is itself differentiable
(SPEC §1 "Second order"): with ``create_graph=True`` the graph records grad_y * w with w
constant, on every backend, and the kernel ops never see a tensor that requires grad.
"""

from __future__ import annotations

import torch

from . import layers


class _ApplyPlan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, x, backend, kind, meta, state):
        # t: the tensor multiplied (x, or grad_y in a backward); x: AttentionDrop's detached
        # source of S, else None. state is one tuple, not *state: with a varargs forward,
        # Dynamo's no-grad path mistakes the argument count for a forward without ctx.
        ctx.backend, ctx.kind, ctx.meta = backend, kind, meta
        ctx.save_for_backward(*((x,) if x is not None else ()), *state)
        return layers.apply(backend, layers.Plan(kind, meta, state), t, x)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, state = (saved[0], saved[1:]) if ctx.kind == "attention" else (None, saved)
        g = None
        if ctx.needs_input_grad[0]:
            # The same Function: differentiable again in grad (w constant), a no-op graph
            # node when create_graph is False (grad mode is off in a plain backward).
            g = _ApplyPlan.apply(grad, x, ctx.backend, ctx.kind, ctx.meta, tuple(state))
        return g, None, None, None, None, None


def apply(backend, plan: layers.Plan, x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> x * w(plan), differentiable in x (any order; w constant)."""
    src = x.detach() if plan.kind == "attention" else None
    return _ApplyPlan.apply(x, src, backend, plan.kind, plan.meta, plan.state)
