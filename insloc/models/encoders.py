"""The three encoders. Each maps images (and boxes) to L2-normalised embeddings [G, N, D], G = groups
(one per FPN level for R50-FPN; 1 for C4 and image-level MoCo), each group with its own queue."""
import torch
import torch.nn.functional as F
from torch import nn

from insloc_ops import roi_align_multilevel

from .fpn import FPN, FPNBoxHead
from .heads import C4BoxHead, PooledMLPHead
from .resnet import ResNetBackbone, resnet_stage5


def _flatten_rois(rois):
    """[G, N, 5] per-group boxes -> ([G*N, 5] boxes, [G*N] level of each); [N, 5] -> (rois, None)."""
    if rois.dim() == 2:
        return rois, None
    G, N = rois.shape[:2]
    levels = torch.arange(G, device=rois.device).repeat_interleave(N)  # [G*N]
    return rois.reshape(G * N, 5), levels


class FPNEncoder(nn.Module):
    """ResNet -> FPN P2-P5 -> every box pooled from every level (7x7) -> shared 4conv-2fc head."""

    strides = (4, 8, 16, 32)

    def __init__(self, depth=50, fpn_channels=256, fc_dim=1024, dim=128, roi_size=7, head_norm="bn", fpn_norm="bn",
                 head_init="official"):
        super().__init__()
        self.backbone = ResNetBackbone(depth)
        self.neck = FPN(self.backbone.out_channels, fpn_channels, norm=fpn_norm)
        self.head = FPNBoxHead(fpn_channels, roi_size, fc_dim, dim, norm=head_norm, init=head_init)
        self.roi_size, self.num_groups = roi_size, len(self.strides)

    def forward(self, images, rois):
        """images [B, 3, S, S]; rois [N, 5] (the same boxes on every level) or [G, N, 5] (per level)."""
        feats = self.neck(self.backbone(images))  # P2..P5, [B, F, S/4, S/4] .. [B, F, S/32, S/32]
        boxes, levels = _flatten_rois(rois)
        pooled = roi_align_multilevel(feats, boxes, self.roi_size, [1.0 / s for s in self.strides],
                                      sampling_ratio=0, aligned=True, levels=levels)
        # levels=None -> [G, N, F, 7, 7]; per-level boxes -> [G*N, F, 7, 7]
        pooled = pooled.flatten(0, 1) if levels is None else pooled  # [G*N, F, 7, 7]
        z = self.head(pooled)  # [G*N, D]
        return F.normalize(z.float(), dim=1).view(self.num_groups, -1, z.shape[-1])  # [G, N, D]


class C4Encoder(nn.Module):
    """ResNet up to res4 -> RoIAlign 14x14 (stride 16) -> res5 -> GAP -> MLP."""

    stride = 16

    def __init__(self, depth=50, dim=128, roi_size=14):
        super().__init__()
        self.backbone = ResNetBackbone(depth, last_stage=3)
        c5 = 2 * self.backbone.out_channels[-1]
        self.head = C4BoxHead(resnet_stage5(depth), c5, dim)
        self.roi_size, self.num_groups = roi_size, 1

    def forward(self, images, rois):
        """images [B, 3, S, S]; rois [N, 5] or [1, N, 5]."""
        res4 = self.backbone(images)[-1]  # [B, C4, S/16, S/16]
        boxes = rois.reshape(-1, 5)  # [N, 5]
        pooled = roi_align_multilevel([res4], boxes, self.roi_size, [1.0 / self.stride],
                                      sampling_ratio=0, aligned=True)[0]  # [N, C4, 14, 14]
        z = self.head(pooled)  # [N, D]
        return F.normalize(z.float(), dim=1).unsqueeze(0)  # [1, N, D]


class GlobalEncoder(nn.Module):
    """Image-level MoCo v2: ResNet -> GAP of C5 -> MLP (boxes ignored)."""

    def __init__(self, depth=50, dim=128):
        super().__init__()
        self.backbone = ResNetBackbone(depth)
        self.head = PooledMLPHead(self.backbone.out_channels[-1], dim)
        self.num_groups = 1

    def forward(self, images, rois=None):
        z = self.head(self.backbone(images)[-1])  # [B, D]
        return F.normalize(z.float(), dim=1).unsqueeze(0)  # [1, B, D]
