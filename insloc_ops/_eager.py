"""Eager-mode autograd for the fused ops, with less host work per call than the dispatcher's.

``torch.library.register_autograd`` (see _register.py) makes the ops differentiable everywhere, torch.compile
and torch.export included, but in eager mode each call through it flattens its arguments with pytree and
fills defaults in Python: about 80 us per call on a 2-core x86-64 CPU (2026-11-27), more than a whole InsLoc-sized
forward kernel takes on a GPU. These autograd.Functions call the same forward and backward ops with the same
formulas (the functions in _register.py) and are used only in eager mode, when a gradient is needed; a
compiled or traced call goes through the op as before.

The forward ops these Functions call, and eager calls that need no gradient, run below the Autograd
dispatch key (``below_autograd``): there an op registered with ``register_autograd`` finds a Python shim
that only redispatches (it would build an autograd node only for inputs that require grad with grad mode
on, which these calls never pass, but for a RoIAlign call whose boxes alone require grad: no gradient ever
reaches them, and that call's output now stays out of any graph, as the reference backend's does); skipping
it saves about 4 us per call on the same CPU. (The backward ops have no such shim: C++'s autograd fallback
costs them nothing measurable.)
"""
import contextlib

import torch
from torch.autograd.function import once_differentiable

from ._register import infonce_grads, refuse_second_order, roi_align_grads, roi_align_meta

# torch's own guard for running an op past autograd (torch.library's shims use it to redispatch); a
# plain call through the Autograd key where a torch build lacks it.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def below_autograd():
    """A context in which op calls skip the Autograd dispatch key (see the module's docstring)."""
    return _BELOW_AUTOGRAD() if _BELOW_AUTOGRAD is not None else contextlib.nullcontext()


def use_eager_autograd(*tensors):
    """Whether a call on ``tensors`` should take the eager autograd path."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in tensors))


def skips_autograd(*tensors):
    """Whether an eager call on ``tensors`` needs no autograd at all (grad mode off, or no input requiring
    grad), so that it may run below the Autograd key. Never under torch.compile, which traces the op."""
    return (not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def call_op(op, grad_inputs, *args):
    """``op(*args)`` for a call that does not take the eager autograd path: below the Autograd key where
    nothing among ``grad_inputs`` needs a gradient (eager), through it otherwise (compiled or traced)."""
    if skips_autograd(*grad_inputs):
        with below_autograd():
            return op(*args)
    return op(*args)


# Named after the ops they call, so that an autograd graph (grad_fn names) shows which op ran.
class roi_align_multilevel(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(ctx, suffix, rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned, *features):
        op = getattr(torch.ops.insloc_ops, "roi_align_multilevel" + suffix)
        with below_autograd():
            out = op(list(features), rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned)
        ctx.suffix = suffix
        ctx.save_for_backward(rois, levels)
        ctx.meta = roi_align_meta(features, spatial_scales, sampling_ratio, aligned)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rois, levels = ctx.saved_tensors
        grads = roi_align_grads(ctx.suffix, grad, rois, levels, ctx.meta)
        return (None,) * 8 + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[8:]))


class queue_infonce(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(ctx, suffix, q, k, queue, temperature):
        op = getattr(torch.ops.insloc_ops, "queue_infonce" + suffix)
        with below_autograd():
            loss, lse = op(q, k, queue, temperature)
        ctx.suffix, ctx.temperature = suffix, temperature
        ctx.save_for_backward(q, k, queue, lse)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        # Not once_differentiable: that runs the body under no_grad and lets a constant incoming gradient
        # through create_graph=True; refuse_second_order needs to see the grad mode autograd set.
        q, k, queue, lse = ctx.saved_tensors
        refuse_second_order(q, k)
        dq, dk = infonce_grads(ctx.suffix, grad_loss, q, k, queue, lse, ctx.temperature)
        return None, dq, dk if ctx.needs_input_grad[2] else None, None, None
