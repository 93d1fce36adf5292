"""Eager-mode autograd for the fused ops, with less host work per call than the dispatcher's.

``torch.library.register_autograd`` (see _register.py) makes the ops differentiable everywhere, torch.compile
and torch.export included, but in eager mode each call through it flattens its arguments with pytree and
fills defaults in Python: about 80 us per call on a 2-core x86-64 CPU (2026-11-27), more than a whole InsLoc-sized
forward kernel takes on a GPU. These autograd.Functions call the same forward and backward ops with the same
formulas (the functions in _register.py) and are used only in eager mode, when a gradient is needed; a
compiled or traced call goes through the op as before. They also carry what torch.library has no hook for:
forward-mode rules (jvp), vmap rules, and a differentiable RoIAlign backward; a call carrying a tangent or
made under a torch.func transform takes them too.

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
import torch.autograd.forward_ad as _fwAD

from ._register import (fold_into_channels, fold_rows, guard_derivatives, infonce_grads, levels_or_zeros,
                        loop_vmap, onepass_grads, refuse_second_order, roi_align_grads, roi_align_meta)

# torch's own guard for running an op past autograd (torch.library's shims use it to redispatch); a
# plain call through the Autograd key where a torch build lacks it.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def below_autograd():
    """A context in which op calls skip the Autograd dispatch key (see the module's docstring)."""
    return _BELOW_AUTOGRAD() if _BELOW_AUTOGRAD is not None else contextlib.nullcontext()


def _forward_ad_active():
    # fwAD.dual_level (which torch.func.jvp and jacfwd enter too) keeps the open level in this global; a
    # torch without it is asked tensor by tensor.
    return getattr(_fwAD, "_current_level", 0) >= 0


def has_tangent(*tensors):
    """Whether forward-mode AD is on and one of ``tensors`` carries a tangent (a dual tensor)."""
    # (torch.func's wrappers are left out: unpack_dual has no vmap rule, and under_transform routes them)
    return _forward_ad_active() and any(
        t is not None and not _wrapped(t) and _fwAD.unpack_dual(t).tangent is not None for t in tensors)


def use_eager_autograd(*tensors):
    """Whether a call on ``tensors`` should take the eager autograd path: a gradient is wanted (grad mode on,
    an input requires grad), an input carries a forward-mode tangent, or a torch.func transform is on."""
    if torch.compiler.is_compiling():
        return False
    return ((torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or has_tangent(*tensors)
            or under_transform(*tensors))


_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_TRANSFORM_LEVEL = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", lambda: 0)


def _wrapped(t):
    return _IS_WRAPPED is not None and _IS_WRAPPED(t)


def under_transform(*tensors):
    """Whether one of ``tensors`` is a torch.func wrapper (vmap's batched tensors, grad's and jvp's): the
    Functions below carry the rules those transforms need, the ops alone do not."""
    return _TRANSFORM_LEVEL() is not None and any(t is not None and _wrapped(t) for t in tensors)


def call_op(op, *args):
    """``op(*args)`` for a call that use_eager_autograd turned away: below the Autograd key in eager mode
    (nothing there needs autograd), through it under torch.compile (which traces the op)."""
    if torch.compiler.is_compiling():
        return op(*args)
    with below_autograd():
        return op(*args)


def _save(ctx, *tensors):
    """Saves ``tensors`` for the backward, and for the jvp when forward-mode AD is on."""
    ctx.save_for_backward(*tensors)
    if _forward_ad_active():
        ctx.save_for_forward(*tensors)


def _with_ctx_forward(cls):
    """A twin of ``cls`` (same name, backward and jvp) whose forward takes ctx and calls cls's forward and
    setup_context. torch.func needs the separate setup_context, but Function.apply then binds each call's
    arguments to forward's signature with inspect (about 60 us a call on a 2-core x86-64 CPU, 2026-11-28):
    calls outside torch.func take the twin."""
    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output
    return type(cls.__name__, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(cls.backward), "jvp": staticmethod(cls.jvp),
        "__doc__": cls.__doc__})


def apply(cls, *args):
    """``cls.apply(*args)``, through its ctx-forward twin unless a torch.func transform wraps a tensor."""
    if under_transform(*(a for a in args if isinstance(a, torch.Tensor))):
        return cls.apply(*args)
    return cls.twin.apply(*args)


# Named after the ops they call, so that an autograd graph (grad_fn names) shows which op ran. Written with
# a separate setup_context so that torch.func (grad, vjp, jvp, jacrev) can use them; called through apply().
class roi_align_multilevel(torch.autograd.Function):  # noqa: N801
    """Inputs: suffix, rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned, *features."""
    @staticmethod
    def forward(suffix, rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned, *features):
        op = getattr(torch.ops.insloc_ops, "roi_align_multilevel" + suffix)
        with below_autograd():
            return op(list(features), rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned)

    @staticmethod
    def setup_context(ctx, inputs, output):
        suffix, rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned, *features = inputs
        ctx.suffix = suffix
        _save(ctx, rois, levels)
        ctx.meta = roi_align_meta(features, spatial_scales, sampling_ratio, aligned)
        ctx.pool = (oh, ow)

    @staticmethod
    def backward(ctx, grad):
        rois, levels = ctx.saved_tensors
        grads = roi_align_backward_call(ctx.suffix, grad, rois, levels, ctx.meta, ctx.pool)
        return (None,) * 8 + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[8:]))

    @staticmethod
    def vmap(info, in_dims, suffix, rois, levels, spatial_scales, oh, ow, sampling_ratio, aligned, *features):
        # Each channel is pooled on its own: the vmapped dimension joins the channels (one launch).
        if in_dims[1] is not None or in_dims[2] is not None:
            return _vmap_loop(info, in_dims, roi_align_multilevel, suffix, rois, levels, spatial_scales, oh,
                              ow, sampling_ratio, aligned, *features)
        V = info.batch_size
        folded, C = fold_into_channels(features, in_dims[8:], V)
        meta = roi_align_meta(folded, spatial_scales, sampling_ratio, aligned)
        out = roi_align_call(suffix, folded, rois, levels, meta, (oh, ow)).unflatten(-3, (V, C))
        return out, out.dim() - 4

    @staticmethod
    def jvp(ctx, *tangents):
        # Linear in the features: the output's tangent is the op applied to their tangents (zeros for a level
        # without one). The boxes get no derivative, as in the backward.
        rois, levels = ctx.saved_tensors
        return roi_align_call(ctx.suffix, _feature_tangents(tangents[8:], ctx.meta), rois, levels, ctx.meta,
                              ctx.pool)


class roi_align_multilevel_backward(torch.autograd.Function):  # noqa: N801
    """The features' gradients from the output's: linear in it, so its own derivative is the forward op
    (gradient of a gradient, forward mode over a gradient). Inputs: suffix, rois, levels, meta, pool, grad."""
    @staticmethod
    def forward(suffix, rois, levels, meta, pool, grad):
        with below_autograd():
            return tuple(roi_align_grads(suffix, grad, rois, levels, meta))

    @staticmethod
    def setup_context(ctx, inputs, output):
        suffix, rois, levels, meta, pool, _ = inputs
        ctx.suffix, ctx.meta, ctx.pool = suffix, meta, pool
        _save(ctx, rois, levels)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grad_grads):
        rois, levels = ctx.saved_tensors
        if all(g is None for g in grad_grads):
            return None, None, None, None, None, None
        grad_grads = _feature_tangents(grad_grads, ctx.meta)
        return None, None, None, None, None, roi_align_call(ctx.suffix, grad_grads, rois, levels, ctx.meta,
                                                            ctx.pool)

    @staticmethod
    def vmap(info, in_dims, suffix, rois, levels, meta, pool, grad):
        if in_dims[1] is not None or in_dims[2] is not None:
            return _vmap_loop(info, in_dims, roi_align_multilevel_backward, suffix, rois, levels, meta, pool,
                              grad)
        V = info.batch_size
        scales, sampling_ratio, aligned, B, C, heights, widths, _ = meta
        folded = grad.movedim(in_dims[5], -4).flatten(-4, -3)
        grads = roi_align_backward_call(suffix, folded, rois, levels,
                                        (scales, sampling_ratio, aligned, B, V * C, heights, widths, False), pool)
        return tuple(g.unflatten(1, (V, C)) for g in grads), (1,) * len(grads)

    @staticmethod
    def jvp(ctx, _suffix, _rois, _levels, _meta, _pool, grad_t):
        rois, levels = ctx.saved_tensors
        return tuple(roi_align_backward_call(ctx.suffix, grad_t, rois, levels, ctx.meta, ctx.pool))


def _vmap_loop(info, in_dims, cls, *args):
    """A vmap rule that applies ``cls`` once per vmapped element (for batched boxes or queues) and stacks."""
    return loop_vmap(lambda *a: apply(cls, *a), info.batch_size, in_dims, args)


def _feature_tangents(tangents, meta):
    """Per-level tangents (or gradients) with zeros where autograd passes None (meta: roi_align_meta's)."""
    return levels_or_zeros(tangents, *meta[3:])


def roi_align_call(suffix, features, rois, levels, meta, pool):
    """The forward op on ``features`` with a recorded call's other arguments, differentiable when needed."""
    scales, sampling_ratio, aligned = meta[:3]
    if use_eager_autograd(*features) or under_transform(rois, levels):  # (boxes vmapped at an outer level)
        return apply(roi_align_multilevel, suffix, rois, levels, scales, *pool, sampling_ratio, aligned, *features)
    op = getattr(torch.ops.insloc_ops, "roi_align_multilevel" + suffix)
    with below_autograd():
        return op(list(features), rois, levels, scales, *pool, sampling_ratio, aligned)


def roi_align_backward_call(suffix, grad, rois, levels, meta, pool):
    """The backward op, differentiable when ``grad`` needs it (create_graph=True, a transform over it)."""
    if use_eager_autograd(grad) or under_transform(rois, levels):
        return apply(roi_align_multilevel_backward, suffix, rois, levels, meta, pool, grad)
    with below_autograd():
        return roi_align_grads(suffix, grad, rois, levels, meta)


class queue_infonce(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(suffix, q, k, queue, temperature):
        op = getattr(torch.ops.insloc_ops, "queue_infonce" + suffix)
        with below_autograd():
            return op(q, k, queue, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        suffix, q, k, queue, temperature = inputs
        lse = output[1]
        ctx.suffix, ctx.temperature = suffix, temperature
        _save(ctx, q, k, queue, lse)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def vmap(info, in_dims, suffix, q, k, queue, temperature):
        if in_dims[3] is not None:
            return _vmap_loop(info, in_dims, queue_infonce, suffix, q, k, queue, temperature)
        (q, N), (k, _) = fold_rows(q, in_dims[1], info.batch_size), fold_rows(k, in_dims[2], info.batch_size)
        if use_eager_autograd(q, k):
            loss, lse = apply(queue_infonce, suffix, q, k, queue, temperature)
        else:
            with below_autograd():
                loss, lse = getattr(torch.ops.insloc_ops, "queue_infonce" + suffix)(q, k, queue, temperature)
        V = info.batch_size
        return (loss.unflatten(1, (V, N)), lse.unflatten(1, (V, N))), (1, 1)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        # Not once_differentiable: that runs the body under no_grad and lets a constant incoming gradient
        # through create_graph=True; refuse_second_order needs to see the grad mode autograd set.
        q, k, queue, lse = ctx.saved_tensors
        refuse_second_order(q, k, grad_loss)
        with torch.no_grad(), below_autograd():
            dq, dk = infonce_grads(ctx.suffix, grad_loss, q, k, queue, lse, ctx.temperature)
        dq, dk = guard_derivatives((dq, dk if ctx.needs_input_grad[2] else None), q, k, grad_loss)
        return None, dq, dk, None, None

    @staticmethod
    def jvp(ctx, _suffix, q_t, k_t, _queue_t, _temperature):
        q, k, queue, lse = ctx.saved_tensors
        return _loss_tangent(lambda ones: infonce_grads(ctx.suffix, ones, q, k, queue, lse, ctx.temperature),
                             lse, q, k, q_t, k_t), None


def _loss_tangent(grads, lse, q, k, q_t, k_t):
    """InfoNCE's forward-mode rule: row i's loss depends on q_i and k_i alone, so ``grads`` (the backward op)
    fed a gradient of ones gives each row's own derivatives, and the tangent is their dot product with the
    input tangents, in the loss's dtype (the queue gets no derivative: the wrapper detaches it)."""
    refuse_second_order(q, k, q_t, k_t, autograd=False)
    with torch.no_grad(), below_autograd():
        dq, dk = grads(torch.ones_like(lse))
        loss_t = torch.zeros_like(lse)
        for d, t in ((dq, q_t), (dk, k_t)):
            if t is not None:
                loss_t = loss_t + (d.to(lse.dtype) * t.to(lse.dtype)).sum(-1)
    return guard_derivatives((loss_t,), q, k, q_t, k_t)[0]


class queue_infonce_onepass(torch.autograd.Function):  # noqa: N801
    """The C++ CPU kernel's training form (see infonce.py): the forward also returns what dq needs."""
    @staticmethod
    def forward(q, k, queue, temperature):
        with below_autograd():
            return torch.ops.insloc_ops.queue_infonce_onepass(q, k, queue, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, _, temperature = inputs
        ctx.temperature = temperature
        _save(ctx, q, k, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_neg_mean):
        q, k, lse, neg_mean = ctx.saved_tensors
        refuse_second_order(q, k, grad_loss)
        with torch.no_grad(), below_autograd():
            dq, dk = onepass_grads(grad_loss, q, k, lse, neg_mean, ctx.temperature)
        dq, dk = guard_derivatives((dq, dk if ctx.needs_input_grad[1] else None), q, k, grad_loss)
        return dq, dk, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, queue, temperature):
        if in_dims[2] is not None:
            return _vmap_loop(info, in_dims, queue_infonce_onepass, q, k, queue, temperature)
        (q, N), (k, _) = fold_rows(q, in_dims[0], info.batch_size), fold_rows(k, in_dims[1], info.batch_size)
        loss, lse, neg = apply(queue_infonce_onepass, q, k, queue, temperature)
        V = info.batch_size
        return (loss.unflatten(1, (V, N)), lse.unflatten(1, (V, N)), neg.unflatten(1, (V, N))), (1, 1, 1)

    @staticmethod
    def jvp(ctx, q_t, k_t, _queue_t, _temperature):
        q, k, lse, neg_mean = ctx.saved_tensors
        return _loss_tangent(lambda ones: onepass_grads(ones, q, k, lse, neg_mean, ctx.temperature),
                             lse, q, k, q_t, k_t), None, None


for _cls in (roi_align_multilevel, roi_align_multilevel_backward, queue_infonce, queue_infonce_onepass):
    _cls.twin = _with_ctx_forward(_cls)
