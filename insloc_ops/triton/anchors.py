"""sample_anchor_boxes in Triton: the algorithm of csrc/cuda/anchors.cu with the same IoU and random key.

Program (box n, anchor range p) streams over its anchors BLOCK at a time and atomically maxes two packed
int64 candidates of box n: (key << 31 | 2^31 - 1 - index) among eligible anchors, and (IoU bits << 31 |
2^31 - 1 - index) among all (csrc/common/anchors.h explains the packing). A second kernel unpacks them.
Float ops are rounded one by one like reference.box_iou: fp fusion off, division by tl.div_rn.
"""
import math

import torch
import triton
import triton.language as tl

from .. import reference
from . import register_kernel

_MAX_ANCHORS = 2**31 - 2  # csrc/common/anchors.h: kMaxAnchors; kernels write 2^31 - 1 as a literal
# No mul + add contraction into FMA (Triton's default): every backend must round like the reference.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _box_iou(bx1, by1, bx2, by2, barea, ax1, ay1, ax2, ay2, aarea):
    iw = tl.minimum(bx2, ax2) - tl.maximum(bx1, ax1)
    ih = tl.minimum(by2, ay2) - tl.maximum(by1, ay1)
    iw = tl.where(iw > 0.0, iw, 0.0)  # +0, never -0: IoU bits then order as integers
    ih = tl.where(ih > 0.0, ih, 0.0)
    inter = iw * ih
    union = (barea + aarea) - inter
    return tl.where(union > 0.0, tl.div_rn(inter, union), 0.0)


# seed_key is a runtime value: a specialisation (e.g. of the value 1 into a constant) would only recompile.
@triton.jit(do_not_specialize=["seed_key"])
def _sample_anchor_kernel(gt_ptr, anchor_ptr, packed_ptr, N, A, threshold, seed_key, span,
                          BLOCK: tl.constexpr):
    n = tl.program_id(0)
    n64 = n.to(tl.int64)  # 64-bit offsets: 4 n and N + n pass 2^31 for N >= 2^29 boxes
    begin = tl.program_id(1) * span
    end = tl.minimum(begin + span, A)
    bx1 = tl.load(gt_ptr + n64 * 4)
    by1 = tl.load(gt_ptr + n64 * 4 + 1)
    bx2 = tl.load(gt_ptr + n64 * 4 + 2)
    by2 = tl.load(gt_ptr + n64 * 4 + 3)
    barea = (bx2 - bx1) * (by2 - by1)
    box_key = _mix32(n.to(tl.uint32) ^ seed_key.to(tl.uint32))
    pick = tl.zeros([BLOCK], dtype=tl.int64)
    best = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(begin, end, BLOCK):
        idx = tl.arange(0, BLOCK).to(tl.int64) + start  # [BLOCK]; int32 would wrap past 2^31 - BLOCK anchors
        mask = idx < end
        p = anchor_ptr + idx * 4
        ax1 = tl.load(p, mask=mask, other=0.0)
        ay1 = tl.load(p + 1, mask=mask, other=0.0)
        ax2 = tl.load(p + 2, mask=mask, other=0.0)
        ay2 = tl.load(p + 3, mask=mask, other=0.0)
        aarea = (ax2 - ax1) * (ay2 - ay1)
        iou = _box_iou(bx1, by1, bx2, by2, barea, ax1, ay1, ax2, ay2, aarea)  # [BLOCK]
        low = 0x7FFFFFFF - idx
        iou_bits = iou.to(tl.int32, bitcast=True).to(tl.int64)
        best = tl.maximum(best, tl.where(mask, (iou_bits << 31) | low, 0))
        key = _mix32(idx.to(tl.uint32) ^ box_key).to(tl.int64)
        pick = tl.maximum(pick, tl.where(mask & (iou > threshold), (key << 31) | low, 0))
    tl.atomic_max(packed_ptr + n64, tl.max(pick, axis=0))
    tl.atomic_max(packed_ptr + N + n64, tl.max(best, axis=0))


@triton.jit
def _finalize_kernel(gt_ptr, anchor_ptr, packed_ptr, index_ptr, iou_ptr, N, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = n < N
    row = tl.where(mask, n, 0).to(tl.int64)  # lanes past N read box 0 and store nothing
    pick = tl.load(packed_ptr + row)
    best = tl.load(packed_ptr + N + row)
    chosen = tl.where(pick > 0, pick, best)
    a = 0x7FFFFFFF - (chosen & 0x7FFFFFFF)
    bx1 = tl.load(gt_ptr + row * 4)
    by1 = tl.load(gt_ptr + row * 4 + 1)
    bx2 = tl.load(gt_ptr + row * 4 + 2)
    by2 = tl.load(gt_ptr + row * 4 + 3)
    ax1 = tl.load(anchor_ptr + a * 4)
    ay1 = tl.load(anchor_ptr + a * 4 + 1)
    ax2 = tl.load(anchor_ptr + a * 4 + 2)
    ay2 = tl.load(anchor_ptr + a * 4 + 3)
    iou = _box_iou(bx1, by1, bx2, by2, (bx2 - bx1) * (by2 - by1), ax1, ay1, ax2, ay2, (ax2 - ax1) * (ay2 - ay1))
    tl.store(index_ptr + n, a, mask=mask)
    tl.store(iou_ptr + n, iou, mask=mask)


def _check(gt_boxes, anchors, iou_threshold):
    for name, rows, t in (("gt_boxes", "N", gt_boxes), ("anchors", "A", anchors)):
        if t.dim() != 2 or t.shape[1] != 4:
            raise ValueError(f"{name} must be [{rows}, 4], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if anchors.device != gt_boxes.device:
        raise ValueError(f"anchors is on {anchors.device} but gt_boxes is on {gt_boxes.device}")
    if anchors.shape[0] > _MAX_ANCHORS:
        raise ValueError(f"anchors must have at most {_MAX_ANCHORS} rows, got {anchors.shape[0]}")
    if gt_boxes.shape[0] and anchors.shape[0] == 0:
        raise ValueError("anchors must not be empty when gt_boxes is not")
    if not math.isfinite(float(iou_threshold)):
        raise ValueError(f"iou_threshold must be finite, got {iou_threshold}")
    if gt_boxes.device.type == "cpu":  # as the C++ CPU op (on a GPU that check would wait for the device)
        reference.check_box_values("gt_boxes", gt_boxes)
        reference.check_box_values("anchors", anchors)


def _kernel_threshold(iou_threshold):
    # An IoU lies in [0, 1], so any threshold >= 1 selects like 1 and any <= -1 like -1; clamped, it stays
    # finite as the kernel's float32 argument (1e300 would become inf).
    return min(max(float(iou_threshold), -1.0), 1.0)


def sample_anchor_boxes(gt_boxes, anchors, iou_threshold, seed):
    _check(gt_boxes, anchors, iou_threshold)
    N, A = gt_boxes.shape[0], anchors.shape[0]
    device = gt_boxes.device
    index = torch.empty(N, dtype=torch.int64, device=device)
    iou = torch.empty(N, dtype=torch.float32, device=device)
    if N == 0:
        return index, iou
    gt = gt_boxes.to(torch.float32).contiguous()  # [N, 4]
    anc = anchors.to(torch.float32).contiguous()  # [A, 4]
    seed = int(seed)
    seed_key = int(reference.mix32((seed & 0xFFFFFFFF) ^ reference.mix32((seed >> 32) & 0xFFFFFFFF)))
    packed = torch.zeros(2, N, dtype=torch.int64, device=device)  # [eligible pick | best IoU] per box
    BLOCK = 1024
    # Enough programs to fill the GPU when there are few boxes; one anchor range per box otherwise.
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    ranges = max(1, min(triton.cdiv(target, N), triton.cdiv(A, BLOCK), 65535))
    span = triton.cdiv(triton.cdiv(A, ranges), BLOCK) * BLOCK  # anchors per program, a multiple of BLOCK
    ranges = triton.cdiv(A, span)
    _sample_anchor_kernel[(N, ranges)](gt, anc, packed, N, A, _kernel_threshold(iou_threshold), seed_key, span,
                                       BLOCK=BLOCK, **LAUNCH_OPTIONS)
    FIN = 128
    _finalize_kernel[(triton.cdiv(N, FIN),)](gt, anc, packed, index, iou, N, BLOCK=FIN, **LAUNCH_OPTIONS)
    return index, iou


def register():
    register_kernel("sample_anchor_boxes_triton", sample_anchor_boxes)
