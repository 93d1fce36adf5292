"""Fake (meta) kernels and autograd formulas for the ops declared in csrc/ops.cpp.

Fake kernels let torch.compile / torch.export trace a call without running it; the autograd formulas
make the C++ and Triton variants differentiable. Each is registered for both variants of an op.
"""
import torch

VARIANTS = ("", "_triton")


def _lib(name):
    return f"insloc_ops::{name}"


def _one_device(op, **tensors):
    """A fake kernel allocates on its first tensor's device: a call that mixes devices (which only a direct
    torch.ops call with meta tensors reaches here) is an error, as in the real kernels."""
    named = []
    for name, v in tensors.items():
        if isinstance(v, (list, tuple)):
            named += [(f"{name}[{i}]", t) for i, t in enumerate(v)]
        elif v is not None:
            named.append((name, v))
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def _roi_align_fake(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned):
    _one_device("roi_align_multilevel", features=features, rois=rois, levels=levels)
    B, C = features[0].shape[:2]
    R = rois.shape[0]
    if levels is None:
        return features[0].new_empty((len(features), R, C, pooled_height, pooled_width))
    return features[0].new_empty((R, C, pooled_height, pooled_width))


def _roi_align_backward_fake(grad, rois, levels, spatial_scales, sampling_ratio, aligned, batch_size, channels,
                             heights, widths, channels_last):
    _one_device("roi_align_multilevel_backward", grad=grad, rois=rois, levels=levels)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [grad.new_empty((batch_size, channels, h, w)).contiguous(memory_format=fmt)
            for h, w in zip(heights, widths)]


def roi_align_meta(features, spatial_scales, sampling_ratio, aligned):
    """What the backward needs of a roi_align_multilevel call besides rois and levels."""
    f0 = features[0]
    return (list(spatial_scales), sampling_ratio, aligned, f0.shape[0], f0.shape[1],
            [f.shape[2] for f in features], [f.shape[3] for f in features],
            f0.dim() == 4 and f0.is_contiguous(memory_format=torch.channels_last) and not f0.is_contiguous())


def roi_align_grads(suffix, grad, rois, levels, meta):
    """The features' gradients (a list, one per level) from the output's gradient."""
    scales, sampling_ratio, aligned, B, C, heights, widths, channels_last = meta
    op = getattr(torch.ops.insloc_ops, "roi_align_multilevel_backward" + suffix)
    return list(op(grad.contiguous(), rois, levels, scales, sampling_ratio, aligned, B, C, heights, widths,
                   channels_last))


def _roi_align_setup(suffix):
    def setup_context(ctx, inputs, output):
        features, rois, levels, spatial_scales, _, _, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois, levels)
        ctx.meta = roi_align_meta(features, spatial_scales, sampling_ratio, aligned)

    def backward(ctx, grad):
        rois, levels = ctx.saved_tensors
        return roi_align_grads(suffix, grad, rois, levels, ctx.meta), None, None, None, None, None, None, None

    return setup_context, backward


def levels_or_zeros(tensors, B, C, heights, widths, channels_last):
    """Per-level tensors (gradients or tangents of the features) with zeros, laid out as the features, where
    autograd passed None; at least one must be present."""
    known = next(t for t in tensors if t is not None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t if t is not None else known.new_zeros((B, C, h, w)).contiguous(memory_format=fmt)
            for t, h, w in zip(tensors, heights, widths)]


def _roi_align_backward_setup(suffix):
    """The backward op is linear in the output's gradient: its own gradient is the forward op (double backward,
    a gradient penalty through RoIAlign)."""
    def setup_context(ctx, inputs, output):
        grad, rois, levels, spatial_scales, sampling_ratio, aligned, B, C, heights, widths, channels_last = inputs
        ctx.save_for_backward(rois, levels)
        ctx.args = (list(spatial_scales), grad.shape[-2], grad.shape[-1], sampling_ratio, aligned)
        ctx.like = (B, C, list(heights), list(widths), channels_last)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_grads):
        rois, levels = ctx.saved_tensors
        if all(g is None for g in grad_grads):
            return (None,) * 11
        grad_grads = levels_or_zeros(grad_grads, *ctx.like)
        op = getattr(torch.ops.insloc_ops, "roi_align_multilevel" + suffix)
        return (op(grad_grads, rois, levels, *ctx.args),) + (None,) * 10

    return setup_context, backward


def fold_into_channels(features, dims, V):
    """Per-level features [B, C, H, W], each vmapped at ``dims[l]`` (or not: then repeated), as [B, V * C, H, W]:
    RoIAlign pools each channel on its own, so a vmapped dimension can join the channels. Returns C too."""
    folded = []
    for f, d in zip(features, dims):
        f = f.movedim(d, 1) if d is not None else f.unsqueeze(1).expand(f.shape[0], V, *f.shape[1:])
        folded.append(f.flatten(1, 2))
    return folded, [n for j, n in enumerate(features[0].shape) if j != dims[0]][1]


def loop_vmap(op, V, in_dims, args):
    """One call per vmapped element (vmapped boxes, levels or queues), stacked at dimension 0."""
    if V == 0:
        raise RuntimeError("vmap over an empty dimension is not supported by the fused backends")

    def pick(a, d, v):  # element v of the tensors in a (a pytree: a list of features, a tuple of meta), d its dims
        if isinstance(a, torch.Tensor):
            return a if d is None else a.select(d, v)
        if isinstance(a, (list, tuple)) and isinstance(d, (list, tuple)):
            return type(a)(pick(x, e, v) for x, e in zip(a, d))
        return a

    outs = [op(*[pick(a, d, v) for a, d in zip(args, in_dims)]) for v in range(V)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = type(outs[0])(torch.stack(o) for o in zip(*outs))  # a list or a tuple, as the op returns
    return stacked, type(outs[0])([0] * len(stacked))


def _roi_align_vmap(op):
    """The raw forward op's vmap rule: vmapped features join the channels (one launch)."""
    def rule(info, in_dims, features, rois, levels, *rest):
        V = info.batch_size
        if in_dims[1] is not None or in_dims[2] is not None:
            return loop_vmap(op, V, in_dims, (features, rois, levels, *rest))
        folded, C = fold_into_channels(features, in_dims[0], V)
        out = op([f.contiguous() for f in folded], rois, levels, *rest).unflatten(-3, (V, C))
        return out, out.dim() - 4

    return rule


def _roi_align_backward_vmap(op):
    """The raw backward op's vmap rule: a vmapped output gradient joins the channels (one launch)."""
    def rule(info, in_dims, grad, rois, levels, scales, sampling_ratio, aligned, B, C, heights, widths,
             channels_last):
        V = info.batch_size
        if any(d is not None for d in in_dims[1:]):
            return loop_vmap(op, V, in_dims, (grad, rois, levels, scales, sampling_ratio, aligned, B, C, heights,
                                               widths, channels_last))
        folded = grad.movedim(in_dims[0], -4).flatten(-4, -3).contiguous()
        grads = op(folded, rois, levels, scales, sampling_ratio, aligned, B, V * C, heights, widths, False)
        return [g.unflatten(1, (V, C)) for g in grads], [1] * len(grads)

    return rule


def _anchor_fake(gt_boxes, anchors, iou_threshold, seed):
    _one_device("sample_anchor_boxes", gt_boxes=gt_boxes, anchors=anchors)
    N = gt_boxes.shape[0]
    return gt_boxes.new_empty((N,), dtype=torch.int64), gt_boxes.new_empty((N,), dtype=torch.float32)


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _infonce_fake(q, k, queue, temperature):
    _one_device("queue_infonce", q=q, k=k, queue=queue)
    G, N = q.shape[:2]
    return q.new_empty((G, N), dtype=_acc_dtype(q)), q.new_empty((G, N), dtype=_acc_dtype(q))


def _infonce_backward_fake(grad_loss, q, k, queue, lse, temperature):
    _one_device("queue_infonce_backward", grad_loss=grad_loss, q=q, k=k, queue=queue, lse=lse)
    return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous, as every kernel returns them


def differentiated_further(*tensors, autograd=True):
    """Whether what a fused InfoNCE backward or jvp rule computes from ``tensors`` will itself be
    differentiated: plain autograd records it (create_graph=True, or a jvp's tangent that requires grad), a
    forward-mode tangent rides on it, or two torch.func grad/jvp transforms wrap it. (One such wrapper is
    the derivative being taken now: torch.func runs these rules on tensors wrapped at its own level, with grad
    mode on. vmap's batched wrappers are not derivatives.)"""
    functorch = getattr(torch._C, "_functorch", None)
    for t in tensors:
        if t is None:
            continue
        levels = 0
        while functorch is not None and functorch.is_functorch_wrapped_tensor(t):
            levels += bool(functorch.is_gradtrackingtensor(t))
            t = functorch.get_unwrapped(t)
        # (a wrapped tensor whose base requires grad may be a first-order torch.func call over parameters
        # that require grad: guard_derivatives judges those when a derivative actually reaches them)
        if levels > 1 or (autograd and levels == 0 and torch.is_grad_enabled() and t.requires_grad):
            return True
        if torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent \
                is not None:
            return True
    return False


SECOND_ORDER_ERROR = ("queue_infonce: the fused backends have no second-order gradients (create_graph=True, "
                      "or torch.func transforms over a gradient or a jvp); use backend='reference' for those")


def refuse_second_order(*tensors, autograd=True):
    """The fused InfoNCE backwards (and its forward-mode rule) are not differentiable. Autograd would take
    their results as constants: a gradient penalty, a Hessian or a jvp of a gradient would silently lose
    terms. Raise instead. (``autograd=False``: plain autograd is left to the caller; see not_differentiable.)"""
    if differentiated_further(*tensors, autograd=autograd):
        raise RuntimeError(SECOND_ORDER_ERROR)


class _RefusesDerivatives(torch.autograd.Function):
    """Identity on its first ``n`` inputs, attached to the rest; a derivative through it (reverse, forward,
    any transform) raises SECOND_ORDER_ERROR."""
    generate_vmap_rule = True

    @staticmethod
    def forward(n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(SECOND_ORDER_ERROR)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(SECOND_ORDER_ERROR)


def guard_derivatives(outputs, *inputs):
    """``outputs`` (a tuple of tensors, None allowed), computed without a graph by a fused InfoNCE rule from
    ``inputs``: where something may differentiate them further (an input that plain autograd tracks with grad
    mode on, a torch.func wrapper, a forward-mode tangent), they pass through a node whose derivatives raise
    SECOND_ORDER_ERROR, so that a derivative that would silently lose terms raises when it is taken, and
    first-order calls (a torch.func.grad over parameters that require grad, a backward of a torch.func.jvp's
    primal) work."""
    functorch = getattr(torch._C, "_functorch", None)
    fw = torch.autograd.forward_ad
    inputs = [x for x in inputs if x is not None]
    if not any((torch.is_grad_enabled() and x.requires_grad)
               or (functorch is not None and functorch.is_functorch_wrapped_tensor(x))
               or (fw._current_level >= 0 and fw.unpack_dual(x).tangent is not None) for x in inputs):
        return outputs
    present = [o for o in outputs if o is not None]
    guarded = iter(_RefusesDerivatives.apply(len(present), *present, *inputs))
    return tuple(next(guarded) if o is not None else None for o in outputs)


def infonce_grads(suffix, grad_loss, q, k, queue, lse, temperature):
    """(dq, dk) from the per-row loss gradient, recomputing the probabilities from the saved lse."""
    op = getattr(torch.ops.insloc_ops, "queue_infonce_backward" + suffix)
    return op(grad_loss.contiguous(), q, k, queue, lse, temperature)


def _infonce_setup(suffix):
    def setup_context(ctx, inputs, output):
        q, k, queue, temperature = inputs
        ctx.save_for_backward(q, k, queue, output[1])
        ctx.temperature = temperature
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_loss, grad_lse):
        q, k, queue, lse = ctx.saved_tensors
        refuse_second_order(q, k)
        dq, dk = infonce_grads(suffix, grad_loss, q, k, queue, lse, ctx.temperature)
        return dq, dk, None, None

    return setup_context, backward


def _onepass_fake(q, k, queue, temperature):
    _one_device("queue_infonce_onepass", q=q, k=k, queue=queue)
    G, N, D = q.shape
    acc = _acc_dtype(q)
    return q.new_empty((G, N), dtype=acc), q.new_empty((G, N), dtype=acc), q.new_empty((G, N, D), dtype=acc)


def _onepass_backward_fake(grad_loss, q, k, lse, neg_mean, temperature):
    _one_device("queue_infonce_onepass_backward", grad_loss=grad_loss, q=q, k=k, lse=lse, neg_mean=neg_mean)
    return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous, as the kernel returns them


def _onepass_setup_context(ctx, inputs, output):
    q, k, queue, temperature = inputs
    ctx.save_for_backward(q, k, output[1], output[2])
    ctx.temperature = temperature
    ctx.mark_non_differentiable(output[1], output[2])


def _onepass_backward(ctx, grad_loss, grad_lse, grad_neg_mean):
    q, k, lse, neg_mean = ctx.saved_tensors
    refuse_second_order(q, k)
    dq, dk = onepass_grads(grad_loss, q, k, lse, neg_mean, ctx.temperature)
    return dq, dk, None, None


def onepass_grads(grad_loss, q, k, lse, neg_mean, temperature):
    """(dq, dk) of the one-pass CPU InfoNCE from the per-row loss gradient and its saved sums."""
    return torch.ops.insloc_ops.queue_infonce_onepass_backward(grad_loss.contiguous(), q, k, lse, neg_mean,
                                                               temperature)


def fold_rows(t, d, V):
    """A per-row InfoNCE tensor [G, N, ...] vmapped at ``d`` (or not: then repeated) as [G, V * N, ...]: the rows
    are independent, so a vmapped dimension can join them. Returns N too."""
    t = t.movedim(d, 1) if d is not None else t.unsqueeze(1).expand(t.shape[0], V, *t.shape[1:])
    return t.flatten(1, 2), t.shape[2]


def _infonce_vmap(op, per_row, backward):
    """A vmap rule for an InfoNCE op ``op(*tensors, temperature)``, forward (q, k, queue) or backward
    (grad_loss, q, k, saved...), whose outputs are all per-row. The tensors at the indices in ``per_row`` are
    [G, N] or [G, N, D] per-row tensors; any other (the queue) is shared by the rows. Rows are independent, so
    a vmapped dimension joins the rows (one launch over V * N rows); a vmapped queue takes one call each. When
    only a backward's incoming gradient is vmapped (jacrev, a vjp of many cotangents) the op is linear in it
    row by row: one launch with a gradient of ones, in the accumulation dtype, then a product per cotangent."""
    q_index = 1 if backward else 0

    def rule(info, in_dims, *args):
        *tensors, temperature = args
        dims = in_dims[:-1]
        V = info.batch_size
        if any(d is not None for i, d in enumerate(dims) if i not in per_row):
            return loop_vmap(lambda *t: op(*t, temperature), V, dims, tensors)
        if backward and all(d is None for d in dims[1:]):
            grad, q, k = tensors[0].movedim(dims[0], 0), tensors[1], tensors[2]
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            ones = torch.ones(grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dq1, dk1 = op(ones, q.to(acc), k.to(acc), *tensors[3:], temperature)
            g = grad.to(acc).unsqueeze(-1)
            return ((g * dq1).to(q.dtype), (g * dk1).to(k.dtype)), (0, 0)
        folded = [fold_rows(t, d, V) if i in per_row else (t, None) for i, (t, d) in enumerate(zip(tensors, dims))]
        N = folded[q_index][1]
        outs = op(*[t for t, _ in folded], temperature)
        return tuple(o.unflatten(1, (V, N)) for o in outs), (1,) * len(outs)

    return rule


def register():
    for suffix in VARIANTS:
        torch.library.register_fake(_lib("roi_align_multilevel" + suffix))(_roi_align_fake)
        torch.library.register_fake(_lib("roi_align_multilevel_backward" + suffix))(_roi_align_backward_fake)
        setup, backward = _roi_align_setup(suffix)
        torch.library.register_autograd(_lib("roi_align_multilevel" + suffix), backward, setup_context=setup)
        setup, backward = _roi_align_backward_setup(suffix)
        torch.library.register_autograd(_lib("roi_align_multilevel_backward" + suffix), backward,
                                        setup_context=setup)
        for name, rule in (("roi_align_multilevel", _roi_align_vmap),
                           ("roi_align_multilevel_backward", _roi_align_backward_vmap)):
            torch.library.register_vmap(_lib(name + suffix), rule(getattr(torch.ops.insloc_ops, name + suffix)))

        torch.library.register_fake(_lib("sample_anchor_boxes" + suffix))(_anchor_fake)
        anchor_op = getattr(torch.ops.insloc_ops, "sample_anchor_boxes" + suffix)
        torch.library.register_vmap(_lib("sample_anchor_boxes" + suffix),
                                    lambda info, in_dims, *args, op=anchor_op: loop_vmap(op, info.batch_size,
                                                                                          in_dims, args))

        torch.library.register_fake(_lib("queue_infonce" + suffix))(_infonce_fake)
        torch.library.register_fake(_lib("queue_infonce_backward" + suffix))(_infonce_backward_fake)
        setup, backward = _infonce_setup(suffix)
        torch.library.register_autograd(_lib("queue_infonce" + suffix), backward, setup_context=setup)
        for name, per_row, backward in (("queue_infonce", (0, 1), False),
                                        ("queue_infonce_backward", (0, 1, 2, 4), True)):
            op = getattr(torch.ops.insloc_ops, name + suffix)
            torch.library.register_vmap(_lib(name + suffix), _infonce_vmap(op, per_row, backward))

    torch.library.register_fake(_lib("queue_infonce_onepass"))(_onepass_fake)
    torch.library.register_fake(_lib("queue_infonce_onepass_backward"))(_onepass_backward_fake)
    torch.library.register_autograd(_lib("queue_infonce_onepass"), _onepass_backward,
                                    setup_context=_onepass_setup_context)
    for name, per_row, backward in (("queue_infonce_onepass", (0, 1), False),
                                    ("queue_infonce_onepass_backward", (0, 1, 2, 3, 4), True)):
        op = getattr(torch.ops.insloc_ops, name)
        torch.library.register_vmap(_lib(name), _infonce_vmap(op, per_row, backward))
