"""Exact pure-PyTorch implementations of every insloc_ops operator.

They are the oracle every kernel is tested against (themselves tested against torchvision and
``F.cross_entropy``) and the fallback wherever no kernel is built. They favour plain, checkable
arithmetic over speed; ``sample_anchor_boxes`` here materialises the N x A IoU matrix.
Inputs are assumed valid: the public functions in insloc_ops validate before dispatching here.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# RoIAlign
# ----------------------------------------------------------------------------------------------


def _geometry_dtype(dtype):
    # Kernels compute coordinates in float32 for float32/float16/bfloat16 features (float64 for float64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_weights(start, bin_size, grid, pooled, size):
    """Bilinear sampling along one axis, averaged over the bin's samples.

    start, bin_size: [R] float; grid: [R] int64 samples per bin. Returns W [R, pooled, size] with
    W[r, p, i] = (1 / grid_r) * sum over the bin's samples of the interpolation weight of pixel i.
    RoIAlign's 2-D weights are products of a y factor and an x factor (the out-of-range rule included),
    so pooling is ``W_y @ feature @ W_x^T``.
    """
    R = start.shape[0]
    dt = start.dtype
    W = torch.zeros(R, pooled, size, dtype=dt, device=start.device)
    if R == 0 or size == 0:
        return W
    gmax = int(grid.max().item()) if R else 0
    if gmax <= 0:
        return W
    p = torch.arange(pooled, device=start.device, dtype=dt).view(1, pooled, 1)
    s = torch.arange(gmax, device=start.device, dtype=dt).view(1, 1, gmax)
    g = grid.to(dt).view(R, 1, 1)
    # Same evaluation order as the kernels: start + p * bin + ((s + 0.5) * bin) / grid.
    coord = start.view(R, 1, 1) + p * bin_size.view(R, 1, 1) + (s + 0.5) * bin_size.view(R, 1, 1) / g
    active = s < g
    valid = active & (coord >= -1.0) & (coord <= float(size))  # NaN compares False: never sampled
    c = torch.where(valid, coord.clamp(min=0.0), torch.zeros_like(coord))
    low = c.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(dt), c)
    frac = c - low.to(dt)
    scale = valid.to(dt) / g.clamp(min=1.0)
    flat = W.view(R * pooled, size)
    flat.scatter_add_(1, low.reshape(R * pooled, gmax), ((1.0 - frac) * scale).reshape(R * pooled, gmax))
    flat.scatter_add_(1, high.reshape(R * pooled, gmax), (frac * scale).reshape(R * pooled, gmax))
    return W


def _level_weights(rois, size, output_size, spatial_scale, sampling_ratio, aligned, gdt):
    """(Wy [R, ph, H], Wx [R, pw, W], batch [R] int64) of one level of height and width ``size``: pooling
    RoI r is ``Wy[r] @ feature[batch[r]] @ Wx[r]^T``; batch is -1 where the RoI names no image of the level's
    B = size[0] (it pools zeros)."""
    B, H, Wd = size
    ph, pw = output_size
    R = rois.shape[0]
    r = rois.to(gdt)
    offset = 0.5 if aligned else 0.0
    scale = torch.tensor(spatial_scale, dtype=gdt, device=r.device)
    x1 = r[:, 1] * scale - offset
    y1 = r[:, 2] * scale - offset
    x2 = r[:, 3] * scale - offset
    y2 = r[:, 4] * scale - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / ph
    bin_w = roi_w / pw
    if sampling_ratio > 0:
        grid_h = torch.full((R,), sampling_ratio, dtype=torch.int64, device=r.device)
        grid_w = grid_h
    else:
        grid_h = _adaptive_grid(roi_h / ph)
        grid_w = _adaptive_grid(roi_w / pw)
    Wy = _axis_weights(y1, bin_h, grid_h, ph, H)  # [R, ph, H]
    Wx = _axis_weights(x1, bin_w, grid_w, pw, Wd)  # [R, pw, W]
    # As the kernels (csrc/common roi_batch): a batch index outside [0, B), NaN included, pools zeros (the
    # public function refuses one on CPU tensors; on CUDA that check would cost a device sync).
    named = (r[:, 0] >= 0) & (r[:, 0] < B)
    batch = torch.where(named, r[:, 0], -1).to(torch.int64)
    return Wy, Wx, batch


def _by_image(batch):
    """(b, the indices of the RoIs on image b) for each image the RoIs name (-1 names none)."""
    for b in torch.unique(batch).tolist():
        if b >= 0:
            yield b, (batch == b).nonzero().squeeze(1)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _roi_align_one_level(feature, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision.ops.roi_align semantics for one level; differentiable w.r.t. ``feature``."""
    B, C, H, Wd = feature.shape
    ph, pw = output_size
    R = rois.shape[0]
    Wy, Wx, batch = _level_weights(rois, (B, H, Wd), output_size, spatial_scale, sampling_ratio, aligned,
                                   _geometry_dtype(feature.dtype))
    compute_dt = _compute_dtype(feature.dtype)
    f = feature.to(compute_dt)
    Wy = Wy.to(compute_dt)
    Wx = Wx.to(compute_dt)
    out = f.new_zeros(R, C, ph, pw)
    for b, idx in _by_image(batch):
        t = torch.einsum("chw,rqw->rchq", f[b], Wx[idx])  # [Rb, C, H, pw]
        out = out.index_copy(0, idx, torch.einsum("rph,rchq->rcpq", Wy[idx], t))  # [Rb, C, ph, pw]
    return out.to(feature.dtype)


def _roi_align_one_level_backward(grad, rois, shape, spatial_scale, sampling_ratio, aligned):
    """The gradient of _roi_align_one_level with respect to its [B, C, H, W] feature, from the output's
    ``grad`` [R, C, ph, pw] (RoIAlign is linear in the feature: the feature's values are not needed)."""
    B, C, H, Wd = shape
    Wy, Wx, batch = _level_weights(rois, (B, H, Wd), tuple(grad.shape[-2:]), spatial_scale, sampling_ratio,
                                   aligned, _geometry_dtype(grad.dtype))
    compute_dt = _compute_dtype(grad.dtype)
    g, Wy, Wx = grad.to(compute_dt), Wy.to(compute_dt), Wx.to(compute_dt)
    out = g.new_zeros(B, C, H, Wd)
    for b, idx in _by_image(batch):
        t = torch.einsum("rcpq,rqw->rcpw", g[idx], Wx[idx])  # [Rb, C, ph, W]
        out[b] = torch.einsum("rph,rcpw->chw", Wy[idx], t)
    return out.to(grad.dtype)


# An adaptive grid larger than this per axis is clamped (only boxes over ~458k feature pixels per bin
# side reach it); it keeps every kernel's loop bounded. The kernels use the same constant.
MAX_ADAPTIVE_GRID = 65536
# The largest pooled height or width (the kernels index bins with 32-bit ints).
MAX_POOLED_SIZE = 1 << 15


def _adaptive_grid(bins_per_sample):
    g = torch.ceil(bins_per_sample)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))  # non-finite box: no samples, zeros out
    return g.clamp(min=0, max=MAX_ADAPTIVE_GRID).to(torch.int64)


def roi_align_multilevel(features, rois, output_size, spatial_scales, sampling_ratio=0, aligned=True,
                         levels=None):
    """All levels: ``[L, R, C, oh, ow]``; with ``levels`` (int64 [R]): ``[R, C, oh, ow]``."""
    if levels is None:
        out = torch.stack([
            _roi_align_one_level(f, rois, output_size, s, sampling_ratio, aligned)
            for f, s in zip(features, spatial_scales)
        ])
    else:
        B, C = features[0].shape[:2]
        out = features[0].new_zeros(rois.shape[0], C, *output_size)
        for lvl, (f, s) in enumerate(zip(features, spatial_scales)):
            idx = (levels == lvl).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_copy(0, idx, _roi_align_one_level(f, rois[idx], output_size, s, sampling_ratio,
                                                                  aligned))
    return _tied_to_every_level(out, features)


def roi_align_multilevel_backward(grad, rois, levels, spatial_scales, sampling_ratio, aligned, shapes):
    """The features' gradients (one per level, of the [B, C, H, W] ``shapes``) from the gradient of
    roi_align_multilevel's output; the same arithmetic as autograd through it."""
    if levels is None:
        return [_roi_align_one_level_backward(grad[lvl], rois, shape, s, sampling_ratio, aligned)
                for lvl, (shape, s) in enumerate(zip(shapes, spatial_scales))]
    grads = []
    for lvl, (shape, s) in enumerate(zip(shapes, spatial_scales)):
        idx = (levels == lvl).nonzero().squeeze(1)
        grads.append(_roi_align_one_level_backward(grad[idx], rois[idx], shape, s, sampling_ratio, aligned))
    return grads


def _tied_to_every_level(out, features):
    """``out`` tied to every level through an empty slice (no values, a zero gradient), so that each level gets
    a gradient, zeros where no box reads it, as from the fused backends: with no boxes (or none on a level)
    the output would otherwise not depend on it, and backward() would fail or leave its grad None. Only where
    autograd records (torch.func's transforms give unused inputs zeros themselves, and an empty vmap cannot
    broadcast the tie)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if not torch.is_grad_enabled() or any(wrapped(f) for f in features) or not any(f.requires_grad
                                                                                   for f in features):
        return out
    return out + sum(f[:0].sum().to(out.dtype) for f in features)


def fpn_levels(rois, canonical_size=224, canonical_level=4, min_level=2, max_level=5):
    """Zero-based FPN level of each box: floor(k0 + log2(sqrt(area) / s0) + 1e-6) clamped to
    [min_level, max_level], minus min_level (torchvision's LevelMapper). ``rois`` is [R, 5] or [R, 4]."""
    b = rois[:, -4:]
    b = b if b.dtype in (torch.float32, torch.float64) else b.float()  # as torchvision's box_area (fp16 overflows)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    s = torch.sqrt(area)
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_size) + 1e-6)
    lvl = torch.nan_to_num(lvl, nan=float(min_level), posinf=float(max_level), neginf=float(min_level))
    return lvl.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


# ----------------------------------------------------------------------------------------------
# Anchors
# ----------------------------------------------------------------------------------------------


def grid_anchors(feature_size, stride, sizes, aspect_ratios, offset=0.0, *, device=None, dtype=torch.float32):
    """Anchors of one feature grid, xyxy, location-major (row-major locations), per location sizes outer
    and aspect ratios (h/w) inner: detectron2's DefaultAnchorGenerator order."""
    H, W = (feature_size, feature_size) if isinstance(feature_size, int) else tuple(feature_size)
    base = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            base.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    base = torch.tensor(base, dtype=torch.float64, device=device).view(1, -1, 4)
    ys = (torch.arange(H, dtype=torch.float64, device=device) + offset) * stride
    xs = (torch.arange(W, dtype=torch.float64, device=device) + offset) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base).reshape(-1, 4).to(dtype)


def box_iou(a, b):
    """IoU of every pair, [N, M], float32, in the kernels' order of operations; union <= 0 gives 0."""
    a = a.float()
    b = b.float()
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = iw * ih
    union = (area_a[:, None] + area_b[None, :]) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


_M32 = 0xFFFFFFFF


def mix32(x):
    """A bijective 32-bit integer hash (the "lowbias32" finaliser), on int64 tensors holding uint32 values.
    csrc/common/anchors.h and insloc_ops/triton/anchors.py compute the same function on uint32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def _anchor_keys(seed, box, anchor):
    """The random key of each (box, anchor) pair: box and anchor int64 index tensors (broadcast), int64
    result holding uint32 values. key(n, a) = mix32(a ^ mix32(n ^ mix32(seed_lo ^ mix32(seed_hi))))."""
    seed = int(seed)
    t = lambda v: torch.tensor(v, dtype=torch.int64, device=anchor.device)  # noqa: E731
    seed_key = mix32(t(seed & _M32) ^ mix32(t((seed >> 32) & _M32)))
    return mix32(anchor ^ mix32(box ^ seed_key))


def random_keys(seed, num_boxes, num_anchors, device=None):
    """The random key of every (box, anchor) pair, [N, A] int64 holding uint32 values (_anchor_keys).

    For one box the keys of distinct anchors are distinct (mix32 is a bijection), so "the eligible anchor
    with the largest key" is a uniform random choice with no ties, computable in one streaming pass by any
    backend.
    """
    n = torch.arange(num_boxes, dtype=torch.int64, device=device)
    a = torch.arange(num_anchors, dtype=torch.int64, device=device)
    return _anchor_keys(seed, n[:, None], a[None, :])  # [N, A]


def check_box_values(name, boxes):
    """The kernels' condition on boxes (as the C++ CPU kernel checks it): finite in float32, x2 >= x1, y2 >= y1.
    A host sync: for CPU tensors."""
    if not bool(torch.isfinite(boxes.to(torch.float32)).all()):  # the kernels compute in float32
        raise ValueError(f"{name} must be finite (after conversion to float32)")
    if not bool(((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).all()):
        raise ValueError(f"{name} must satisfy x2 >= x1 and y2 >= y1")


def sample_anchor_boxes(gt_boxes, anchors, iou_threshold, seed):
    """Per box, the eligible anchor (IoU > threshold) with the largest random key, else the highest-IoU
    anchor (lowest index on ties). Returns (anchor index int64 [N], iou float32 [N])."""
    N, A = gt_boxes.shape[0], anchors.shape[0]
    device = gt_boxes.device
    if N == 0 or A == 0:
        if N and not A:
            raise ValueError("anchors must not be empty when gt_boxes is not")
        return torch.zeros(N, dtype=torch.int64, device=device), torch.zeros(N, dtype=torch.float32, device=device)
    iou = box_iou(gt_boxes, anchors)  # [N, A]
    eligible = iou > torch.tensor(iou_threshold, dtype=torch.float32)
    keys = random_keys(seed, N, A, device)
    pick = torch.where(eligible, keys, torch.full_like(keys, -1)).argmax(dim=1)  # first max; keys unique
    best = iou.argmax(dim=1)  # first maximal value: lowest index on ties
    index = torch.where(eligible.any(dim=1), pick, best)
    return index, iou.gather(1, index[:, None]).squeeze(1)


def _greedy_nms_keep(overlaps):
    """Greedy NMS over boxes ranked 0..E-1 (best first): overlaps [E, E] bool, True where two boxes' IoU
    exceeds the NMS threshold. Returns keep [E] bool: box i is kept iff no kept box ranked before it
    overlaps it. Computed as the fixed point of keep_i = not any(keep_j and overlaps[j, i], j < i), iterated
    from all-kept. The fixed point is unique (by induction on i it satisfies greedy NMS's recurrence), and
    after t rounds the first t ranks are final, so it ends in at most E rounds, usually a few."""
    E = overlaps.shape[0]
    earlier = torch.ones(E, E, dtype=torch.bool, device=overlaps.device).triu(1)  # [j, i]: j ranked before i
    suppresses = (overlaps & earlier).float()  # 0/1: the kept-suppressor counts below are exact integers
    keep = torch.ones(E, device=overlaps.device)
    for _ in range(E):
        new = (keep @ suppresses == 0).float()  # [E]
        if torch.equal(new, keep):
            break
        keep = new
    return keep.bool()


# sample_anchor_boxes_nms takes boxes in chunks of at most this many box x anchor pairs.
NMS_CHUNK_PAIRS = 1 << 22


def sample_anchor_boxes_nms(gt_boxes, anchors, iou_threshold, nms_iou, seed, chunk_pairs=None):
    """The official InsLoc code's diversified choice. Per box: the eligible anchors (IoU > threshold) are
    ranked by their random keys (the same keys as sample_anchor_boxes), greedy NMS in that order drops
    every anchor whose IoU with a kept one is > nms_iou, and the survivor with the largest key of a second
    stream (seed + 1) is chosen: a uniform pick among the survivors. With no eligible anchor, the
    highest-IoU anchor (lowest index on ties); the official code instead runs the same NMS over its 4,000
    highest-IoU anchors, a case the recipe's pasted boxes hardly reach (none of 200,000 simulated ones:
    their best anchor's IoU was just above 0.5 at the least).

    Runs on the CPU whatever the inputs' device (one copy each way: its many small steps would each wait
    for a GPU). Boxes go in chunks of at most chunk_pairs box x anchor pairs (NMS_CHUNK_PAIRS by default):
    the chunk's IoUs, eligibility and both key streams in a few batched steps, then per box only the NMS
    over its E eligible anchors ([E, E] IoUs). Returns (anchor index int64 [N], iou float32 [N]) on
    gt_boxes' device."""
    N, A = gt_boxes.shape[0], anchors.shape[0]
    device = gt_boxes.device
    gt_boxes, anchors = gt_boxes.cpu(), anchors.cpu()
    index = torch.zeros(N, dtype=torch.int64)
    iou_out = torch.zeros(N, dtype=torch.float32)
    threshold = torch.tensor(iou_threshold, dtype=torch.float32)
    rows = max(1, int(chunk_pairs or NMS_CHUNK_PAIRS) // max(A, 1))
    for s in range(0, N, rows):
        e = min(N, s + rows)
        iou = box_iou(gt_boxes[s:e], anchors)  # [n, A]
        eligible = iou > threshold  # [n, A]
        chosen = iou.argmax(dim=1)  # [n], the fallback: first maximal value, lowest index on ties
        box, anchor = eligible.nonzero(as_tuple=True)  # [P] each, by box
        if box.numel():
            # Each box's eligible anchors by descending key (keys of one box are distinct), boxes in order.
            keys = _anchor_keys(seed, box + s, anchor)  # [P]
            order = (box * (_M32 + 1) + (_M32 - keys)).argsort()  # [P]
            box, anchor = box[order], anchor[order]
            keys2 = _anchor_keys(int(seed) + 1, box + s, anchor)  # [P], the second stream
            counts = eligible.sum(dim=1).tolist()
            start = 0
            for r, count in enumerate(counts):
                if count:
                    ranked = anchor[start:start + count]  # [E], by score
                    b = anchors[ranked]  # [E, 4]
                    keep = _greedy_nms_keep(box_iou(b, b) > nms_iou)  # [E]
                    k2 = keys2[start:start + count]
                    chosen[r] = ranked[torch.where(keep, k2, torch.full_like(k2, -1)).argmax()]
                    start += count
        index[s:e] = chosen
        iou_out[s:e] = iou.gather(1, chosen[:, None]).squeeze(1)
    return index.to(device), iou_out.to(device)


# ----------------------------------------------------------------------------------------------
# Queue InfoNCE
# ----------------------------------------------------------------------------------------------


def queue_infonce(q, k, queue, temperature):
    """Per-row InfoNCE with materialised logits. q, k: [G, N, D]; queue: [G, K, D].
    Returns (loss [G, N], lse [G, N]), float32 (float64 for float64 inputs)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q32, k32, neg = q.to(dt), k.to(dt), queue.detach().to(dt)
    pos = (q32 * k32).sum(-1, keepdim=True)  # positive logits: G x N x 1
    negs = torch.einsum("gnd,gkd->gnk", q32, neg)  # negative logits: G x N x K
    logits = torch.cat([pos, negs], dim=-1) / temperature  # G x N x (1+K)
    lse = torch.logsumexp(logits, dim=-1)  # G x N
    return lse - logits[..., 0], lse


def enqueue_(queue, keys, ptr):
    """Writes keys [.., N, D] into the ring buffer queue [.., K, D] at ptr, wrapping; returns (ptr + N) % K."""
    K, N = queue.shape[-2], keys.shape[-2]
    if N == 0:
        return ptr.clone() if torch.is_tensor(ptr) else ptr  # a new tensor, as for N > 0: no alias of the caller's
    device = queue.device
    base = ptr.to(device) if torch.is_tensor(ptr) else ptr
    idx = (base + torch.arange(N, device=device)) % K  # [N]
    queue.index_copy_(queue.dim() - 2, idx, keys.detach().to(queue.dtype))
    return (ptr + N) % K
