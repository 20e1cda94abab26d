"""The one autograd Function of every layer: y = t * w, grad_t = grad_y * w.

``w`` is held constant (SPEC §1) and never stored: the Function keeps the layer's small
state (a :class:`~guidedrop.layers.Plan`) and rebuilds ``w`` inside the backend's apply
kernel, in the forward on x and in the backward on grad_y. Only AttentionDrop, whose
soft mask depends on x unit by unit, keeps x (detached: w is a constant of x).

The backward is the same Function applied to grad_y, so it is itself differentiable
(SPEC §1 "Second order"): with ``create_graph=True`` the graph records grad_y * w with w
constant, on every backend, and the kernel ops never see a tensor that requires grad.
Only where the Function is gone, in a program torch.export made in train mode, do the
apply ops meet one: :func:`register_apply_ops` gives them the same formula.
"""

from __future__ import annotations

import torch

from . import _validation, layers, reference


def _forward(t, x, backend, kind, meta, state):
    # t: the tensor multiplied (x, or grad_y in a backward); x: AttentionDrop's detached
    # source of S, else None.
    if _legacy_batched(t):
        # torch.autograd.grad(..., is_grads_batched=True) vmaps the backward with torch's
        # legacy batching, whose tensors a Triton launch cannot read: the reference's
        # apply, the same function of the same plan in torch ops
        backend = reference
    return layers.apply(backend, layers.Plan(kind, meta, state), t, x)


def _legacy_batched(t) -> bool:
    """Whether t is a tensor of torch's legacy batching (is_grads_batched). Not asked while
    torch.compile traces: Dynamo cannot trace the check, and traced code holds none."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_legacy_batchedtensor(t)


def _save(ctx, x, backend, kind, meta, state):
    ctx.backend, ctx.kind, ctx.meta = backend, kind, meta
    saved = (*((x,) if x is not None else ()), *state)
    ctx.save_for_backward(*saved)
    ctx.save_for_forward(*saved)


def _backward(ctx, grad):
    # A no-op graph node when create_graph is False (grad mode is off in a plain backward).
    g = _again(ctx, grad) if ctx.needs_input_grad[0] else None
    return g, None, None, None, None, None


def _jvp(ctx, t_dot, *_):
    # y = t * w with w constant: the output's tangent is t_dot * w
    return _again(ctx, t_dot)


class _ApplyPlan(torch.autograd.Function):
    """Traced by torch.compile, and under torch.func's transforms (grad, vjp), which accept
    only this form: a forward without ctx, and setup_context. state is one tuple, not
    *state: with a varargs forward, Dynamo's no-grad path mistakes the argument count for
    a forward without ctx."""

    forward = staticmethod(_forward)
    backward = staticmethod(_backward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs[1:])

    @staticmethod
    def vmap(info, in_dims, *args):
        # torch's own message would invite a vmap rule; the layers' statistics have none
        raise NotImplementedError(_validation.NO_VMAP)


class _ApplyPlanForwardAD(_ApplyPlan):
    """With forward-mode AD (torch.func.jvp, torch.autograd.forward_ad). Dynamo cannot
    trace a Function that defines jvp: compiled code takes it only under forward AD (Dynamo
    then runs it eagerly, a graph break)."""

    jvp = staticmethod(_jvp)


class _ApplyPlanEager(torch.autograd.Function):
    """The same Function in the form with ctx in forward, for eager calls outside torch.func:
    torch binds a setup_context Function's arguments to its forward's signature with
    inspect at every call, about a third of a layer's host time (forward and backward)."""

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)

    @staticmethod
    def forward(ctx, t, x, backend, kind, meta, state):
        _save(ctx, x, backend, kind, meta, state)
        return _forward(t, x, backend, kind, meta, state)


def _function():
    if torch.compiler.is_compiling():
        return _ApplyPlan if torch.autograd.forward_ad._current_level < 0 else _ApplyPlanForwardAD
    if torch._C._are_functorch_transforms_active():
        return _ApplyPlanForwardAD
    return _ApplyPlanEager


def _again(ctx, t):
    """The Function again on t (grad_y, or a tangent): t * w, w constant, differentiable
    again in t."""
    saved = ctx.saved_tensors
    if torch.is_grad_enabled() and _legacy_batched(t):
        # torch's legacy batching drops a custom Function's graph: the gradient would not
        # require grad, and a second backward would miss this term without an error
        raise NotImplementedError(
            "torch.autograd.grad(..., is_grads_batched=True, create_graph=True) through a "
            "guidedrop layer: torch's batched backward drops the graph of a custom autograd "
            "Function. Use create_graph=False, or loop over the grad outputs. (Batched with "
            "grad mode on: also torch.autograd.functional.jacobian(vectorize=True) with "
            "strategy='forward-mode', where the reverse mode works.)")
    if not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        # torch.func.vjp's vjp_fn runs after its transform has exited: what the forward
        # saved are still its wrappers, whose storage a kernel cannot read (traced, there
        # are none, and Dynamo cannot trace the unwrapping)
        saved = [_validation.func_unwrapped(s) for s in saved]
    x, state = (saved[0], saved[1:]) if ctx.kind == "attention" else (None, saved)
    t = _validation.resolved(t)  # grad_y may be a lazy negation (the backward of a conj)
    return _function().apply(t, x, ctx.backend, ctx.kind, ctx.meta, tuple(state))


def apply(backend, plan: layers.Plan, x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> x * w(plan), differentiable in x (any order; w constant)."""
    src = x.detach() if plan.kind == "attention" else None
    if torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        # torch.compile(torch.func.grad(f)): Dynamo takes x for a tensor that does not
        # require grad there and inlines the Function's forward (the CUDA backend's
        # gradient came out 0, before register_apply_ops gave its ops a formula; not
        # retried without this). Run it eagerly.
        return _apply_eagerly(x, src, backend, plan.kind, plan.meta, plan.state)
    return _function().apply(x, src, backend, plan.kind, plan.meta, plan.state)


@torch.compiler.disable
def _apply_eagerly(*args):
    return _function().apply(*args)


# The kernel backends' apply ops (backend_contract.md): each (t, *args) -> t * w(args).
APPLY_OPS = ("apply_channel", "apply_block", "apply_seeds", "apply_attention")


def register_apply_ops(namespace) -> None:
    """Gives the apply ops of ``namespace`` (``torch.ops.guidedrop_triton``,
    ``torch.ops.guidedrop``) the Function's own autograd formula: grad_t = op(grad_y,
    *args), every other argument held constant, its gradient None (SPEC §1; also
    AttentionDrop's x, w's source). The layers do not need it (the Function calls the ops
    with grad mode off), but a program torch.export makes in train mode inlines the
    Function's forward, so its graph holds the bare op and its backward is this (without
    it, backward through a Triton or CUDA program raised "no autograd formula was
    registered", found by a helper's attack). The Triton ops' ``_dynamic`` twins need none:
    they are reached only below autograd, inside an op being traced. Called once, where
    the backend's ops are registered."""
    for name in APPLY_OPS:
        op = getattr(namespace, name)
        torch.library.register_autograd(op.default, _op_backward(op),
                                        setup_context=_op_setup_context)


def _op_setup_context(ctx, inputs, output):
    # args minus t: the tensors saved (saved-tensor hooks and checks see them), the rest kept
    ctx.args = list(inputs[1:])
    ctx.tensor_at = [i for i, a in enumerate(ctx.args) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(*(ctx.args[i] for i in ctx.tensor_at))
    for i in ctx.tensor_at:
        ctx.args[i] = None


def _op_backward(op):
    def backward(ctx, grad):
        args = list(ctx.args)
        for i, saved in zip(ctx.tensor_at, ctx.saved_tensors, strict=True):
            args[i] = saved
        # the op again, on grad_y: itself differentiable (second order) through this formula
        return (op(_validation.resolved(grad), *args), *(None,) * len(args))
    return backward
