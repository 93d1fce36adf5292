"""The plain-PyTorch / torchvision baselines the fused ops are measured against, with the fused ops'
signatures, so a model can run on either (bench_train_step.py swaps them in); and the anchor op's benchmark
inputs, which its tests share."""
import math

import torch
import torch.nn.functional as F
import torchvision

import insloc_ops


def roi_align_torchvision(features, rois, output_size, spatial_scales, sampling_ratio=0, aligned=True,
                          levels=None, *, backend=None):
    """One torchvision.ops.roi_align call per level; with ``levels``, MultiScaleRoIAlign's select/scatter."""
    if levels is None:
        return torch.stack([torchvision.ops.roi_align(f, rois, output_size, s, sampling_ratio, aligned)
                            for f, s in zip(features, spatial_scales)])
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *size))
    for lvl, (f, s) in enumerate(zip(features, spatial_scales)):
        idx = torch.where(levels == lvl)[0]  # host sync, as in torchvision's MultiScaleRoIAlign
        out[idx] = torchvision.ops.roi_align(f, rois[idx], size, s, sampling_ratio, aligned).to(out.dtype)
    return out


def _cpu_or_own_generator(generator, device):
    # A CPU generator cannot drive sampling on CUDA tensors: those use the device's default generator.
    return generator if generator is not None and generator.device == torch.device(device) else None


def _uniform_only(nms_iou):
    if nms_iou is not None:
        raise ValueError("the anchor baselines make the uniform choice only: nms_iou must be None")


def sample_anchor_boxes_iou_matrix(gt_boxes, anchors, iou_threshold=0.5, *, nms_iou=None, generator=None,
                                   backend=None):
    """The official code's structure without its NMS: the N x A IoU matrix, a threshold, then one
    multinomial draw per box over its eligible anchors (argmax when there is none). The uniform choice
    only (nms_iou must be None)."""
    _uniform_only(nms_iou)
    iou = torchvision.ops.box_iou(gt_boxes.float(), anchors.float())  # [N, A]
    eligible = iou > iou_threshold  # [N, A]
    gen = _cpu_or_own_generator(generator, gt_boxes.device)
    index = torch.empty(gt_boxes.shape[0], dtype=torch.int64, device=gt_boxes.device)
    for n in range(gt_boxes.shape[0]):
        if eligible[n].any():
            index[n] = torch.multinomial(eligible[n].float(), 1, generator=gen)[0]
        else:
            index[n] = iou[n].argmax()
    return anchors[index], index, iou.gather(1, index[:, None]).squeeze(1)


def sample_anchor_boxes_random_argmax(gt_boxes, anchors, iou_threshold=0.5, *, nms_iou=None, generator=None,
                                      backend=None):
    """The strongest plain-PyTorch variant: the N x A IoU matrix and an N x A matrix of uniform random
    numbers; the eligible anchor with the largest one is a uniform choice, all boxes at once."""
    _uniform_only(nms_iou)
    iou = torchvision.ops.box_iou(gt_boxes.float(), anchors.float())  # [N, A]
    eligible = iou > iou_threshold  # [N, A]
    # Drawn on the IoU matrix's device: a CPU draw and copy would time the host and the link, not the baseline.
    gen = _cpu_or_own_generator(generator, iou.device)
    noise = torch.rand(iou.shape, generator=gen, device=iou.device)  # [N, A]
    pick = torch.where(eligible, noise, -1.0).argmax(dim=1)  # [N]
    index = torch.where(eligible.any(dim=1), pick, iou.argmax(dim=1))  # [N]
    return anchors[index], index, iou.gather(1, index[:, None]).squeeze(1)


def queue_infonce_materialised(q, k, queue, temperature, *, reduction="mean", backend=None):
    """Per group: einsum logits against the queue, cat with the positive, F.cross_entropy (label 0)."""
    grouped = q.dim() == 3
    if not grouped:
        q, k, queue = q.unsqueeze(0), k.unsqueeze(0), queue.unsqueeze(0)
    losses = []
    for g in range(q.shape[0]):
        pos = torch.einsum("nd,nd->n", q[g], k[g]).unsqueeze(1)  # positive logits: N x 1
        neg = torch.einsum("nd,kd->nk", q[g], queue[g].detach().to(q.dtype))  # negative logits: N x K
        logits = torch.cat([pos, neg], dim=1).float() / temperature  # N x (1 + K)
        labels = torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
        losses.append(F.cross_entropy(logits, labels, reduction=reduction))
    out = torch.stack(losses)
    return out if grouped else out.squeeze(0)


# Inputs of the anchor benchmark and tests.
INSLOC_SIZES = (32, 64, 128, 256)
INSLOC_RATIOS = (0.5, 0.75, 1, 1.5, 2)


def random_boxes(n, width, height, min_side, max_side, generator, dtype=torch.float32):
    """n xyxy boxes inside a width x height canvas with sides uniform in [min_side, max_side]."""
    u = torch.rand(4, n, generator=generator, dtype=torch.float64)  # [4, N]
    w = min_side + (max_side - min_side) * u[0]
    h = min_side + (max_side - min_side) * u[1]
    x1 = (width - w) * u[2]
    y1 = (height - h) * u[3]
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).to(dtype)  # [N, 4]


def insloc_inputs(n, generator, dtype=torch.float32):
    """InsLoc's jitter: boxes in a 256 x 256 composite (sides 64..254) and the 5,120 anchors of a 16 x 16 grid."""
    anchors = insloc_ops.grid_anchors(16, 16, INSLOC_SIZES, INSLOC_RATIOS, dtype=dtype)  # [5120, 4]
    return random_boxes(n, 256, 256, 64, 254, generator, dtype), anchors


def detection_anchors(height, width, strides, ratios=(0.5, 1.0, 2.0), dtype=torch.float32):
    """FPN anchors of one image, levels concatenated: one size (8 x stride) and 3 ratios per level.
    800 x 1216 with strides 4..64 (P2-P6) gives 242,991 anchors."""
    return torch.cat([
        insloc_ops.grid_anchors((math.ceil(height / s), math.ceil(width / s)), s, (8 * s,), ratios, dtype=dtype)
        for s in strides
    ])


def detection_inputs(n, generator, strides=(32, 64, 128), height=800, width=1344, dtype=torch.float32):
    """Ground-truth boxes of an 800 x 1344 image (sides 16..600) and its anchors (4,200 for P5-P7)."""
    return (random_boxes(n, width, height, 16, 600, generator, dtype),
            detection_anchors(height, width, strides, dtype=dtype))
