"""Fake (meta) kernels and autograd formulas for the ops declared in csrc/ops.cpp.

Fake kernels let torch.compile / torch.export trace a call without running it; the autograd formulas
make the C++ and Triton variants differentiable. Each is registered for both variants of an op.
"""
import torch

VARIANTS = ("", "_triton")


def _lib(name):
    return f"insloc_ops::{name}"


def _roi_align_fake(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned):
    B, C = features[0].shape[:2]
    R = rois.shape[0]
    if levels is None:
        return features[0].new_empty((len(features), R, C, pooled_height, pooled_width))
    return features[0].new_empty((R, C, pooled_height, pooled_width))


def _roi_align_backward_fake(grad, rois, levels, spatial_scales, sampling_ratio, aligned, batch_size, channels,
                             heights, widths, channels_last):
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


def _anchor_fake(gt_boxes, anchors, iou_threshold, seed):
    N = gt_boxes.shape[0]
    return gt_boxes.new_empty((N,), dtype=torch.int64), gt_boxes.new_empty((N,), dtype=torch.float32)


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _infonce_fake(q, k, queue, temperature):
    G, N = q.shape[:2]
    return q.new_empty((G, N), dtype=_acc_dtype(q)), q.new_empty((G, N), dtype=_acc_dtype(q))


def _infonce_backward_fake(grad_loss, q, k, queue, lse, temperature):
    return torch.empty_like(q), torch.empty_like(k)


def refuse_second_order(q, k):
    """The fused InfoNCE backwards are not differentiable. Under create_graph=True with a constant incoming
    gradient (loss.sum()) autograd would take their dq, dk as constants and a second-order term (a gradient
    penalty) would silently vanish: raise instead."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("queue_infonce: the fused backends have no second-order gradients "
                           "(create_graph=True); use backend='reference' for those")


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
    G, N, D = q.shape
    acc = _acc_dtype(q)
    return q.new_empty((G, N), dtype=acc), q.new_empty((G, N), dtype=acc), q.new_empty((G, N, D), dtype=acc)


def _onepass_backward_fake(grad_loss, q, k, lse, neg_mean, temperature):
    return torch.empty_like(q), torch.empty_like(k)


def _onepass_setup_context(ctx, inputs, output):
    q, k, queue, temperature = inputs
    ctx.save_for_backward(q, k, output[1], output[2])
    ctx.temperature = temperature
    ctx.mark_non_differentiable(output[1], output[2])


def _onepass_backward(ctx, grad_loss, grad_lse, grad_neg_mean):
    q, k, lse, neg_mean = ctx.saved_tensors
    refuse_second_order(q, k)
    dq, dk = torch.ops.insloc_ops.queue_infonce_onepass_backward(grad_loss.contiguous(), q, k, lse, neg_mean,
                                                                 ctx.temperature)
    return dq, dk, None, None


def register():
    for suffix in VARIANTS:
        torch.library.register_fake(_lib("roi_align_multilevel" + suffix))(_roi_align_fake)
        torch.library.register_fake(_lib("roi_align_multilevel_backward" + suffix))(_roi_align_backward_fake)
        setup, backward = _roi_align_setup(suffix)
        torch.library.register_autograd(_lib("roi_align_multilevel" + suffix), backward, setup_context=setup)

        torch.library.register_fake(_lib("sample_anchor_boxes" + suffix))(_anchor_fake)

        torch.library.register_fake(_lib("queue_infonce" + suffix))(_infonce_fake)
        torch.library.register_fake(_lib("queue_infonce_backward" + suffix))(_infonce_backward_fake)
        setup, backward = _infonce_setup(suffix)
        torch.library.register_autograd(_lib("queue_infonce" + suffix), backward, setup_context=setup)

    torch.library.register_fake(_lib("queue_infonce_onepass"))(_onepass_fake)
    torch.library.register_fake(_lib("queue_infonce_onepass_backward"))(_onepass_backward_fake)
    torch.library.register_autograd(_lib("queue_infonce_onepass"), _onepass_backward,
                                    setup_context=_onepass_setup_context)
