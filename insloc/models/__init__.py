"""InsLoc encoders. Module tree and state-dict names (stable: the converters to torchvision and
detectron2 read them).

A pretraining model (``insloc.moco.MoCo``) holds two encoders of identical structure::

    encoder_q / encoder_k            (encoder_k: momentum copy, no gradients)
      backbone                       ResNetBackbone = torchvision ResNet minus avgpool/fc
        conv1, bn1, layer1, layer2, layer3, layer4      exactly torchvision's keys
      -- FPN (FPNEncoder, --arch fpn) --
      neck                           FPN, C2..C5 -> P2..P5 (strides 4, 8, 16, 32), no P6
        lateral_convs.{0..3}         1x1 conv (C2..C5); no bias with fpn_norm="bn" (the official model)
        lateral_norms.{0..3}         BatchNorm2d (fpn_norm="bn") or Identity (fpn_norm="none": convs have a bias)
        output_convs.{0..3}          3x3 conv; as the laterals
        output_norms.{0..3}          as lateral_norms
      head                           FPNBoxHead, shared by the 4 levels
        convs.{0..3}.0 / .1          3x3 conv (no bias) / BatchNorm2d  (.2 is the ReLU); with
                                     head_norm="none": conv with bias / Identity
        fc1, fc2                     fc 1024 (ReLU)
        fc3                          projection to D=128
      -- C4 (C4Encoder, --arch c4) --
      backbone has conv1, bn1, layer1..layer3 only (res4 output, stride 16, is pooled 14x14)
      head                           C4BoxHead
        res5                         torchvision's layer4 definition: loads into resnet50().layer4;
                                     detectron2's roi_heads.res5
        mlp.0, mlp.2                 Linear C5->C5, ReLU, Linear C5->D (2048->2048->128 for R50)
      -- image-level MoCo v2 (GlobalEncoder, --method moco) --
      backbone has conv1..layer4; head = PooledMLPHead: mlp.0, mlp.2 on the pooled C5
    queue      [G, K, D] float32, one L2-normalised key per row, G = 4 (FPN) or 1
    queue_ptr  [] int64, shared by the G queues

``encoder_q.backbone.state_dict()`` loads into ``torchvision.models.resnet50()`` with only ``fc.*``
missing (C4: also ``layer4.*``, which is ``encoder_q.head.res5.*``).

Checkpoint (``torch.save`` of a dict, written to a temporary file in the same folder then
``os.replace``d; ``latest`` in the same folder names the newest)::

    model        MoCo state dict: encoder_q.*, encoder_k.*, queue, queue_ptr
    optimizer    SGD state dict (momentum buffers of encoder_q parameters)
    scaler       None (bf16 autocast needs no GradScaler)
    epoch, step  schedule position: epochs completed in `epoch` counted from 0, `step_in_epoch`
                 batches done in the current epoch, `step` optimizer steps in total
    step_in_epoch
    rng          {"torch": CPU state, "cuda": [per device] or None, "numpy": ..., "python": ...,
                  "box_generator": the CPU generator of the anchor sampling}
    config       insloc.config.Config as a plain dict
    world_size   processes of the run that wrote it
"""
from .encoders import C4Encoder, FPNEncoder, GlobalEncoder
from .fpn import FPN, FPNBoxHead
from .heads import C4BoxHead, PooledMLPHead
from .resnet import ResNetBackbone, resnet_stage5


def build_encoder(cfg):
    """The encoder described by an ``insloc.config.Config``."""
    if cfg.method == "moco":
        return GlobalEncoder(cfg.depth, cfg.dim)
    if cfg.arch == "fpn":
        return FPNEncoder(cfg.depth, cfg.fpn_channels, cfg.head_fc_dim, cfg.dim, cfg.fpn_roi_size, cfg.head_norm,
                          cfg.fpn_norm, cfg.head_init)
    if cfg.arch == "c4":
        return C4Encoder(cfg.depth, cfg.dim, cfg.c4_roi_size)
    raise ValueError(f"unknown arch {cfg.arch!r} (expected 'fpn' or 'c4')")


__all__ = ["build_encoder", "FPNEncoder", "C4Encoder", "GlobalEncoder", "ResNetBackbone", "resnet_stage5",
           "FPN", "FPNBoxHead", "C4BoxHead", "PooledMLPHead"]
