"""Anchor grids and the InsLoc box jitter: a random anchor overlapping each ground-truth box."""
import math
from numbers import Real

import torch

from . import _eager, reference
from ._backend import select


def _sized(v):
    return hasattr(v, "__len__") and not isinstance(v, (str, bytes))


def grid_anchors(feature_size, stride, sizes, aspect_ratios, offset=0.0, *, device=None, dtype=torch.float32):
    """Anchors of one feature grid: [H*W*len(sizes)*len(aspect_ratios), 4] xyxy.

    Location-major (row-major over the grid), per location sizes outer and aspect ratios inner
    (detectron2's order). ratio = h / w, w = sqrt(size^2 / ratio), h = ratio * w; centres at
    ((x + offset) * stride, (y + offset) * stride); not clipped to the image.
    """
    fs = (feature_size, feature_size) if isinstance(feature_size, int) else \
        tuple(feature_size) if _sized(feature_size) else ()
    if len(fs) != 2 or any((not isinstance(v, int)) or isinstance(v, bool) or v < 0 for v in fs):
        raise ValueError(f"feature_size must be an int or (H, W) of non-negative ints, got {feature_size!r}")
    def positive(v):
        return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not positive(stride):
        raise ValueError(f"stride must be a positive finite number, got {stride!r}")
    if not _sized(sizes) or len(sizes) == 0 or not all(positive(s) for s in sizes):
        raise ValueError(f"sizes must be a non-empty sequence of positive finite numbers, got {sizes!r}")
    if not _sized(aspect_ratios) or len(aspect_ratios) == 0 or \
            not all(positive(r) for r in aspect_ratios):
        raise ValueError(f"aspect_ratios must be a non-empty sequence of positive finite numbers, got "
                         f"{aspect_ratios!r}")
    if not isinstance(offset, Real) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return reference.grid_anchors(fs, stride, sizes, aspect_ratios, offset, device=device, dtype=dtype)


def _check_boxes(name, boxes):
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be an [N, 4] tensor of (x1, y1, x2, y2), got "
                         f"{getattr(boxes, 'shape', type(boxes).__name__)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {boxes.dtype}")


def _draw_seed(generator):
    # One 63-bit seed per call from a CPU generator: no device sync, and the same generator state gives
    # the same seed, hence the same anchors, on every backend.
    return torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64).item()  # (traceable by export)


def _check_box_values(name, boxes):
    # Needs a host sync, so only on CPU and in eager mode; the C++ CPU kernel checks again.
    if boxes.device.type != "cpu" or boxes.shape[0] == 0 or torch.compiler.is_compiling() or \
            _eager.under_transform(boxes):  # (vmapped boxes: no data-dependent check)
        return
    reference.check_box_values(name, boxes)


def sample_anchor_boxes(gt_boxes, anchors, iou_threshold=0.5, *, nms_iou=None, generator=None, seed=None,
                        backend=None):
    """For each ground-truth box, a uniformly random anchor among those with IoU > iou_threshold, or the
    highest-IoU anchor (lowest index on ties) when none qualifies.

    gt_boxes: [N, 4]; anchors: [A, 4]; generator: a CPU torch.Generator (default: the global one).
    Returns (boxes [N, 4] in anchors' dtype, anchor_index int64 [N], iou float32 [N]).

    The choice is the eligible anchor with the largest counter-based random key of (seed, box, anchor), so
    every backend picks the same anchors for the same seed. ``seed`` (an int in [-2**63, 2**63)) sets it
    directly instead of drawing it from ``generator``. Under torch.compile a torch.Generator cannot be
    traced: pass ``seed=`` drawn outside the compiled function, e.g.
    ``int(torch.randint(2**63 - 1, (), generator=g))`` (a graph input: no recompiles), or leave
    ``generator=None`` (the seed is drawn from the global RNG inside the graph: a data-dependent int, which
    fullgraph needs ``torch._dynamo.config.capture_scalar_outputs`` for on some torch versions).

    ``nms_iou=None`` (default) is the uniform choice the InsLoc paper describes. A number instead
    reproduces the official code: per box, the eligible anchors get random scores, greedy NMS at IoU
    ``nms_iou`` keeps a diverse subset, and one survivor is picked uniformly (see
    ``reference.sample_anchor_boxes_nms``). That path is pure PyTorch, eager only, ignores ``backend``, and
    runs on the CPU for inputs on any device (one copy each way): about 20 ms for 32 boxes and the 5,120
    InsLoc anchors on one CPU core, against about 1 ms for the uniform choice.
    """
    _check_boxes("gt_boxes", gt_boxes)
    _check_boxes("anchors", anchors)
    if anchors.device != gt_boxes.device:
        raise ValueError(f"anchors is on {anchors.device} but gt_boxes is on {gt_boxes.device}")
    if not isinstance(iou_threshold, Real) or isinstance(iou_threshold, bool) or \
            not -math.inf < iou_threshold < math.inf:  # (traceable: compile)
        raise ValueError(f"iou_threshold must be a finite number, got {iou_threshold!r}")
    if nms_iou is not None and (not isinstance(nms_iou, Real) or isinstance(nms_iou, bool) or
                                not 0.0 <= nms_iou <= 1.0):
        raise ValueError(f"nms_iou must be None or a number in [0, 1], got {nms_iou!r}")
    if gt_boxes.shape[0] and anchors.shape[0] == 0:
        raise ValueError("anchors must not be empty when gt_boxes is not")
    _check_box_values("gt_boxes", gt_boxes)
    _check_box_values("anchors", anchors)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be None or a CPU torch.Generator, got {generator!r}")
        if torch.compiler.is_compiling():  # before touching the generator: older dynamo cannot read its device
            if seed is None:
                raise ValueError("a torch.Generator cannot be traced by torch.compile: pass seed= (drawn from the "
                                 "generator outside the compiled function) or generator=None")
        elif generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if seed is None:
        seed = _draw_seed(generator)
    elif isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)) or (
            isinstance(seed, int) and not -2**63 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [-2**63, 2**63), got {seed!r}")
    gt, anc = gt_boxes.detach(), anchors.detach()
    if nms_iou is not None:
        index, iou = reference.sample_anchor_boxes_nms(gt, anc, float(iou_threshold), float(nms_iou), seed)
        return anc[index], index, iou
    which = select("sample_anchor_boxes", gt.device, backend)
    if which == "reference":
        index, iou = reference.sample_anchor_boxes(gt, anc, float(iou_threshold), seed)
    else:
        op = torch.ops.insloc_ops.sample_anchor_boxes_triton if which == "triton" else \
            torch.ops.insloc_ops.sample_anchor_boxes
        index, iou = op(gt, anc, float(iou_threshold), seed)
    return anc[index], index, iou
