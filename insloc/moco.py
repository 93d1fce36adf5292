"""MoCo with box-level queries and keys: query/key encoders, momentum update, [G, K, D] queues, shuffle-BN.

Without a process group (one process) shuffle-BN is off: the key batch is normalised by its own
statistics, as in a single-GPU MoCo run. Under DDP the key images and their boxes are shuffled across
processes before the key forward and the key embeddings unshuffled after (MoCo's batch_shuffle_ddp /
batch_unshuffle_ddp, carrying the boxes along with their images).
"""
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from insloc_ops import enqueue_, queue_infonce, sample_anchor_boxes


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rois_from_boxes(boxes):
    """[N, 4] xyxy boxes, one per image -> [N, 5] rois (batch_index, x1, y1, x2, y2)."""
    index = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None]  # [N, 1]
    return torch.cat([index, boxes], dim=1)  # [N, 5]


class MoCo(nn.Module):
    """Query encoder (trained), key encoder (momentum copy), G queues of K keys and a shared pointer.

    ``forward`` returns the per-group InfoNCE losses [G] and the keys [G, N, D]; the caller sums the
    losses, steps, and then calls ``dequeue_and_enqueue(keys)`` (after backward, so the loss reads the
    queue without a copy)."""

    def __init__(self, encoder, *, queue_size=65536, dim=128, momentum=0.999, temperature=0.2,
                 anchors=None, anchor_iou=0.5, anchor_nms_iou=None, jittered_groups=(), shuffle_bn=True):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.num_groups = encoder.num_groups
        self.momentum, self.temperature, self.anchor_iou = momentum, temperature, anchor_iou
        if anchor_nms_iou is not None and not 0.0 <= anchor_nms_iou <= 1.0:
            raise ValueError(f"anchor_nms_iou must be None or a number in [0, 1], got {anchor_nms_iou!r}")
        self.anchor_nms_iou = anchor_nms_iou  # None: uniform choice; a number: the official NMS-diversified one
        self.jittered_groups, self.shuffle_bn = tuple(jittered_groups), shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(self.num_groups, queue_size, dim), dim=2))  # [G, K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # []
        self.register_buffer("anchors", anchors if anchors is not None else torch.zeros(0, 4), persistent=False)
        self.cpu_anchors = self.anchors.clone()  # stays on the CPU (not a buffer): query_rois of CPU boxes

    @torch.no_grad()
    def momentum_update_key_encoder(self):
        """key = m * key + (1 - m) * query, for every parameter."""
        params_k = list(self.encoder_k.parameters())
        torch._foreach_mul_(params_k, self.momentum)
        torch._foreach_add_(params_k, list(self.encoder_q.parameters()), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
        """keys [G, N, D] of this process; every process writes the keys of all processes."""
        keys = concat_all_gather(keys, dim=1) if _distributed() else keys  # [G, N * world, D]
        self.queue_ptr.copy_(enqueue_(self.queue, keys.to(self.queue.dtype), self.queue_ptr))

    @torch.no_grad()
    def query_rois(self, boxes, generator=None):
        """[G, N, 5] query rois: the ground-truth box, replaced on `jittered_groups` by a random anchor
        with IoU > anchor_iou (recipe: P5 only for FPN, the one group for C4): a uniform pick, or with
        anchor_nms_iou set, the official code's pick among the survivors of random-score NMS."""
        gt = rois_from_boxes(boxes)  # [N, 5]
        rois = gt.expand(self.num_groups, -1, -1).clone()  # [G, N, 5]
        if self.jittered_groups:
            anchors = self.cpu_anchors if boxes.device.type == "cpu" else self.anchors
            jittered, _, _ = sample_anchor_boxes(boxes, anchors.to(boxes.dtype), self.anchor_iou,
                                                 nms_iou=self.anchor_nms_iou, generator=generator)  # [N, 4]
            rois[list(self.jittered_groups), :, 1:] = jittered
        return rois

    def forward(self, im_q, boxes_q, im_k, boxes_k, generator=None, rois_q=None):
        """im_q, im_k: [N, 3, S, S]; boxes_q, boxes_k: [N, 4] pasted boxes (pixels, xyxy);
        generator: CPU generator of the box augmentation; rois_q: query_rois(boxes_q, generator) if the
        caller made them already (on im_q's device). Returns (losses [G], keys [G, N, D])."""
        if rois_q is None:
            rois_q = self.query_rois(boxes_q, generator)  # [G, N, 5]
        q = self.encoder_q(im_q, rois_q)  # [G, N, D]
        with torch.no_grad():
            self.momentum_update_key_encoder()
            shuffle = self.shuffle_bn and _distributed()
            if shuffle:
                im_k, boxes_k, idx_unshuffle = batch_shuffle_ddp(im_k, boxes_k)
            k = self.encoder_k(im_k, rois_from_boxes(boxes_k))  # [G, N, D], the same box on every level
            if shuffle:
                k = batch_unshuffle_ddp(k, idx_unshuffle, dim=1)  # [G, N, D]
        with torch.autocast(q.device.type, enabled=False):  # logits in fp32 even under bf16 autocast
            losses = queue_infonce(q, k, self.queue, self.temperature)  # [G]
        return losses, k


@torch.no_grad()
def concat_all_gather(x, dim=0):
    """Concatenation along `dim` of `x` from every process (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def batch_shuffle_ddp(images, boxes):
    """Shuffles images [N, ...] and their boxes [N, 4] across processes (equal N on every process).
    Returns this process's shard (images [N, ...], boxes [N, 4]) and the index that undoes it."""
    images_all = concat_all_gather(images)  # [N * W, ...]
    boxes_all = concat_all_gather(boxes)  # [N * W, 4]
    world, rank = dist.get_world_size(), dist.get_rank()
    idx_shuffle = torch.randperm(images_all.shape[0], device=images.device)  # [N * W]
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)  # [N * W]
    idx_this = idx_shuffle.view(world, -1)[rank]  # [N]
    # the boxes travel with their images; rois_from_boxes then numbers them by their new local position
    return images_all[idx_this], boxes_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x, idx_unshuffle, dim=0):
    """Undoes batch_shuffle_ddp on per-image outputs x (images along `dim`)."""
    x_all = concat_all_gather(x, dim=dim)  # [.., N * W, ..]
    idx_this = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]  # [N]
    return x_all.index_select(dim, idx_this)
