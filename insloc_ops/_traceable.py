"""The reference RoIAlign as an opaque torch op, for torch.compile and torch.export.

The reference's sample grid is as large as the largest box needs (a value read from the boxes) and it loops
over the images the boxes name, so a tracer cannot follow it. Under tracing, roi_align_multilevel calls these
ops instead: the graph holds one op whose fake kernel gives the output's shape, and whose forward and backward
run the reference eagerly (reference.roi_align_multilevel_backward: RoIAlign is linear in the features, so
the backward needs their shapes, not their values). Eager calls do not use them.
"""
from typing import List, Optional

import torch

from . import reference
from ._register import _roi_align_backward_fake, _roi_align_backward_setup, _roi_align_fake, _roi_align_setup

SUFFIX = "_reference"


@torch.library.custom_op("insloc_ops::roi_align_multilevel" + SUFFIX, mutates_args=())
def roi_align_multilevel(features: List[torch.Tensor], rois: torch.Tensor, levels: Optional[torch.Tensor],
                         spatial_scales: List[float], pooled_height: int, pooled_width: int, sampling_ratio: int,
                         aligned: bool) -> torch.Tensor:
    return reference.roi_align_multilevel(features, rois, (pooled_height, pooled_width), spatial_scales,
                                          sampling_ratio, aligned, levels)


@torch.library.custom_op("insloc_ops::roi_align_multilevel_backward" + SUFFIX, mutates_args=())
def roi_align_multilevel_backward(grad: torch.Tensor, rois: torch.Tensor, levels: Optional[torch.Tensor],
                                  spatial_scales: List[float], sampling_ratio: int, aligned: bool, batch_size: int,
                                  channels: int, heights: List[int], widths: List[int],
                                  channels_last: bool) -> List[torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shapes = [(batch_size, channels, h, w) for h, w in zip(heights, widths)]
    grads = reference.roi_align_multilevel_backward(grad, rois, levels, spatial_scales, sampling_ratio, aligned,
                                                    shapes)
    return [g.contiguous(memory_format=fmt) for g in grads]


roi_align_multilevel.register_fake(_roi_align_fake)
roi_align_multilevel_backward.register_fake(_roi_align_backward_fake)
for op, (setup, backward) in ((roi_align_multilevel, _roi_align_setup(SUFFIX)),
                               (roi_align_multilevel_backward, _roi_align_backward_setup(SUFFIX))):
    op.register_autograd(backward, setup_context=setup)
