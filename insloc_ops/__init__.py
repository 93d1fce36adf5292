"""insloc_ops: fused operators for InsLoc pretraining, registered as ``torch.ops.insloc_ops.*``.

    roi_align_multilevel   RoIAlign over every FPN level (or each box's level) in one launch
    fpn_levels             the usual FPN level of each box
    grid_anchors           an anchor grid in detectron2's order
    sample_anchor_boxes    a random anchor overlapping each box, with no IoU matrix
    queue_infonce          MoCo's loss against a queue without the N x K logits
    enqueue_               the queue's ring-buffer write

Each op has a pure-PyTorch reference (``insloc_ops.reference``) and C++/CUDA/Triton kernels; see
``available_backends()``, ``selected_backends()`` and ``build_info()``.
"""
from ._ext import HAS_EXTENSION

if HAS_EXTENSION:
    from ._register import register as _register

    _register()
    from .triton import register as _register_triton

    _register_triton()

from . import reference  # noqa: E402
from ._backend import available_backends, selected_backends  # noqa: E402
from ._build import build_info  # noqa: E402
from .anchors import grid_anchors, sample_anchor_boxes  # noqa: E402
from .infonce import enqueue_, queue_infonce  # noqa: E402
from .roi_align import fpn_levels, roi_align_multilevel  # noqa: E402

__all__ = [
    "roi_align_multilevel", "fpn_levels", "grid_anchors", "sample_anchor_boxes", "queue_infonce", "enqueue_",
    "available_backends", "selected_backends", "build_info", "reference",
]
