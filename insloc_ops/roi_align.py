"""Multi-level RoIAlign: every box from every FPN level, or each box from its assigned level, in one op."""
import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch

from . import reference
from ._backend import select
from . import _eager, _traceable

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_int(v):
    return type(v) is int or (isinstance(v, Integral) and not isinstance(v, bool))


def _pair(output_size):
    if type(output_size) is int and 0 < output_size <= reference.MAX_POOLED_SIZE:  # the common case, cheaply
        return output_size, output_size
    pair = (output_size, output_size) if _is_int(output_size) else output_size
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2 or \
            not all(_is_int(v) for v in pair):
        raise ValueError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    oh, ow = int(pair[0]), int(pair[1])
    if not (0 < oh <= reference.MAX_POOLED_SIZE and 0 < ow <= reference.MAX_POOLED_SIZE):
        raise ValueError(f"output_size must lie in [1, {reference.MAX_POOLED_SIZE}], got {output_size!r}")
    return oh, ow


def _check(features, rois, spatial_scales, sampling_ratio, levels):
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)) or len(features) == 0:
        raise ValueError("features must be a non-empty list or tuple of [B, C, H, W] tensors")
    f0 = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            raise ValueError(f"features[{i}] must be a 4-D [B, C, H, W] tensor, got "
                             f"{getattr(f, 'shape', type(f).__name__)}")
        if f.dtype not in _FLOATS:
            raise ValueError(f"features[{i}] must be float32, float16, bfloat16 or float64, got {f.dtype}")
        if f.dtype != f0.dtype or f.device != f0.device:
            raise ValueError(f"features[{i}] is {f.dtype} on {f.device} but features[0] is {f0.dtype} on "
                             f"{f0.device}; all levels must match")
        if f.shape[:2] != f0.shape[:2]:
            raise ValueError(f"features[{i}] has batch x channels {tuple(f.shape[:2])} but features[0] has "
                             f"{tuple(f0.shape[:2])}; all levels must match")
    if not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be a [R, 5] tensor of (batch_index, x1, y1, x2, y2), got "
                         f"{getattr(rois, 'shape', type(rois).__name__)}")
    if not rois.is_floating_point():
        raise ValueError(f"rois must be a floating-point tensor, got {rois.dtype}")
    if rois.device != f0.device:
        raise ValueError(f"rois is on {rois.device} but features are on {f0.device}")
    if not isinstance(spatial_scales, (list, tuple)) or len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales must be a sequence of {len(features)} floats (one per level), got "
                         f"{spatial_scales!r}")
    for s in spatial_scales:
        if not isinstance(s, Real) or isinstance(s, bool) or not 0 < s < math.inf:  # (traceable: compile)
            raise ValueError(f"spatial_scales must be positive finite numbers, got {spatial_scales!r}")
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool) or \
            not -2**31 <= sampling_ratio <= reference.MAX_ADAPTIVE_GRID:  # the kernels take a 32-bit int
        raise ValueError(f"sampling_ratio must be an int, at most {reference.MAX_ADAPTIVE_GRID} (the adaptive "
                         f"grid's cap; <= 0 means adaptive), got {sampling_ratio!r}")
    if levels is not None:
        if not isinstance(levels, torch.Tensor) or levels.dim() != 1 or levels.shape[0] != rois.shape[0]:
            raise ValueError(f"levels must be an int64 tensor of shape [{rois.shape[0]}] (one per RoI), got "
                             f"{getattr(levels, 'shape', type(levels).__name__)}")
        if levels.dtype != torch.int64:
            raise ValueError(f"levels must be int64, got {levels.dtype}")
        if levels.device != f0.device:
            raise ValueError(f"levels is on {levels.device} but features are on {f0.device}")


def _check_index_ranges(features, rois, levels):
    """Index ranges, where that costs no device sync (CPU tensors). On CUDA the kernels themselves never read
    outside the inputs: an out-of-range batch index or level gives zeros. (Not for the C++ CPU kernel, which
    checks them itself, in every mode.)"""
    f0 = features[0]
    if f0.device.type == "cpu" and rois.shape[0] and not torch.compiler.is_compiling() and \
            not _eager.under_transform(rois, levels):  # (vmapped boxes: no data-dependent check)
        b = rois[:, 0]
        gdt = reference._geometry_dtype(f0.dtype)
        b = b if b.dtype == gdt else b.to(gdt)  # as the kernels read it (1 - 1e-12 -> 1.0f)
        B = f0.shape[0]
        if not bool(((b >= 0) & (b < B)).all()):
            raise ValueError(f"rois[:, 0] (batch index) must lie in [0, {B}), got values in "
                             f"[{b.min().item()}, {b.max().item()}]")
        if levels is not None and not bool(((levels >= 0) & (levels < len(features))).all()):
            raise ValueError(f"levels must lie in [0, {len(features)}), got values in "
                             f"[{levels.min().item()}, {levels.max().item()}]")


def roi_align_multilevel(features, rois, output_size, spatial_scales, sampling_ratio=0, aligned=True,
                         levels=None, *, backend=None):
    """RoIAlign of ``rois`` on several feature levels in one launch.

    features: L tensors [B, C, H_l, W_l] (same B, C, dtype, device; NCHW or channels_last).
    rois: [R, 5] rows (batch_index, x1, y1, x2, y2) in input-image pixels.
    spatial_scales: L floats (1 / stride of each level).
    levels: None -> output [L, R, C, oh, ow], slice l == torchvision.ops.roi_align(features[l], ...);
            int64 [R] in [0, L) -> output [R, C, oh, ow], RoI r pooled from level levels[r].
    aligned=True shifts box coordinates by -0.5 pixel so that pixel centres sit at half-integers
    (torchvision's and detectron2's convention). Differentiable w.r.t. features.
    """
    features = list(features) if isinstance(features, tuple) else features
    _check(features, rois, spatial_scales, sampling_ratio, levels)
    oh, ow = _pair(output_size)
    if aligned is not True and aligned is not False and not isinstance(aligned, np.bool_):
        raise ValueError(f"aligned must be a bool, got {aligned!r}")
    scales = [float(s) for s in spatial_scales]
    which = select("roi_align_multilevel", features[0].device, backend)
    if which != "cpu" or features[0].shape[1] == 0:  # (the C++ kernel returns an empty output unchecked)
        _check_index_ranges(features, rois, levels)
    # No derivative reaches the boxes (nor does one of the reference's); boxes that require grad, or that a
    # torch.func transform wraps, are handed on as constants.
    rois = rois.detach()
    if which == "reference":
        if torch.compiler.is_compiling():  # one opaque op: a tracer cannot follow the reference (see _traceable)
            return _traceable.roi_align_multilevel(features, rois, levels, scales, oh, ow, sampling_ratio,
                                                   bool(aligned))
        return reference.roi_align_multilevel(features, rois, (oh, ow), scales, sampling_ratio, aligned, levels)
    suffix = "_triton" if which == "triton" else ""
    if _eager.use_eager_autograd(*features) or _eager.under_transform(rois, levels):
        return _eager.apply(_eager.roi_align_multilevel, suffix, rois, levels, scales, oh, ow, sampling_ratio,
                            bool(aligned), *features)
    op = getattr(torch.ops.insloc_ops, "roi_align_multilevel" + suffix)
    return _eager.call_op(op, features, rois, levels, scales, oh, ow, sampling_ratio, bool(aligned))


def fpn_levels(rois, canonical_size=224, canonical_level=4, min_level=2, max_level=5):
    """Zero-based FPN level per box (torchvision's LevelMapper): ``rois`` is [R, 5] or [R, 4]."""
    if not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.shape[1] not in (4, 5):
        raise ValueError(f"rois must be a [R, 5] or [R, 4] tensor, got {getattr(rois, 'shape', rois)!r}")
    for name, v in (("min_level", min_level), ("max_level", max_level), ("canonical_level", canonical_level)):
        if not _is_int(v):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if min_level > max_level:
        raise ValueError(f"need min_level <= max_level, got min_level={min_level}, max_level={max_level}")
    if not isinstance(canonical_size, Real) or isinstance(canonical_size, bool) or \
            not math.isfinite(canonical_size) or canonical_size <= 0:
        raise ValueError(f"canonical_size must be a positive finite number, got {canonical_size!r}")
    return reference.fpn_levels(rois, canonical_size, canonical_level, min_level, max_level)
