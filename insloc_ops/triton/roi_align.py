"""Multi-level RoIAlign in Triton: one launch for every level, forward and backward.

One program per (level-RoI pair, block of channels), all bins of the RoI at once (tile [bins, channels]). Level tensors arrive as separate pointer
arguments (the interpreter cannot load pointers from memory), so up to MAX_LEVELS levels; their sizes
and scales come from small tensors. Geometry follows csrc/common/roi_align.h: the in-range samples of a
bin are found by bisection, so boxes far larger than the map cost O(map), not O(grid^2).
"""
import torch
import triton
import triton.language as tl

from . import register_kernel
from .. import reference

MAX_LEVELS = 5
MAX_ADAPTIVE_GRID = tl.constexpr(65536)  # insloc_ops.reference.MAX_ADAPTIVE_GRID
# The sample geometry rounds like csrc/common/roi_align.h, so that the discrete choices (samples per bin,
# in or out of the map) match the CPU and CUDA kernels: divisions by tl.div_rn (a plain `/` compiles to an
# approximate division on the GPU: a box whose bin size is a whole number then got one sample more on an
# H200), and no mul + add contraction into FMA (csrc/common's mul_rn).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _div(a, b):
    """a / b rounded to nearest: fp32 `/` is approximate on the GPU (div.full), fp64 `/` is exact."""
    if b.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _axis(lo, hi, scale, offset, ALIGNED: tl.constexpr, pooled, sampling_ratio):
    start = lo * scale - offset
    size = (hi * scale - offset) - start
    if not ALIGNED:
        size = tl.where(size < 1.0, 1.0, size)  # NaN stays NaN
    bin_size = _div(size, tl.cast(pooled, size.dtype))  # pooled may arrive as a constexpr 1
    g = tl.ceil(bin_size)
    finite = (g >= 0) & (g - g == 0)
    g = tl.where(finite, tl.minimum(g, MAX_ADAPTIVE_GRID), 0.0)
    grid = tl.where(sampling_ratio > 0, sampling_ratio, g.to(tl.int32))
    return start, bin_size, grid


@triton.jit
def _sample_ranges(origin, bin_size, grid, size, kmask):
    """Per bin (vector ``origin``), the samples whose coordinate lies in [-1, size]: first index and count,
    plus the largest count. Coordinates are monotone along s (csrc/common/roi_align.h), so each range is
    found by bisection; boxes far larger than the map then cost O(map), not O(grid^2). Every sample is
    still tested."""
    first = tl.zeros_like(kmask.to(tl.int32))
    count = first + grid
    if grid > 8:  # few samples: test each one rather than bisect
        sz = size.to(origin.dtype)
        up = bin_size >= 0
        lo = first
        hi = first + grid
        for _ in range(32):  # first s inside: coord >= -1 (rising) or coord <= size (falling)
            mid = lo + (hi - lo) // 2
            y = origin + _div((mid.to(origin.dtype) + 0.5) * bin_size, grid.to(origin.dtype))
            ok = tl.where(up, y >= -1.0, y <= sz)
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, tl.minimum(mid + 1, hi))
        first = lo
        hi = first * 0 + grid
        for _ in range(32):  # first s past the map
            mid = lo + (hi - lo) // 2
            y = origin + _div((mid.to(origin.dtype) + 0.5) * bin_size, grid.to(origin.dtype))
            out = tl.where(up, y > sz, y < -1.0)
            hi = tl.where(out, mid, hi)
            lo = tl.where(out, lo, tl.minimum(mid + 1, hi))
        count = lo - first
    count = tl.where(kmask, count, 0)
    return first, count, tl.max(count, axis=0)


@triton.jit
def _axis_sample(y, size):
    valid = (y >= -1.0) & (y <= size.to(y.dtype)) & (size > 0)
    yc = tl.where(valid & (y > 0), y, 0.0)
    low = yc.to(tl.int32)
    edge = low >= size - 1
    low = tl.where(edge, size - 1, low)
    high = tl.where(edge, low, low + 1)
    yc = tl.where(edge, low.to(y.dtype), yc)
    frac = yc - low.to(y.dtype)
    return valid, low, high, 1.0 - frac, frac


@triton.jit
def _sample(origin, start, t, bin_size, grid, size, n):
    """The t-th in-range sample of every bin along one axis: (valid, low, high, weight low, weight high)."""
    y = origin + _div(((start + t).to(origin.dtype) + 0.5) * bin_size, grid.to(origin.dtype))
    valid, low, high, w_low, w_high = _axis_sample(y, size)
    return valid & (t < n), low, high, w_low, w_high


@triton.jit
def _plane(ptr, b, H, W, C, c, CHANNELS_LAST: tl.constexpr):
    """Pointers to pixel 0 of image b's channels c ([1, BLOCK_C]) and the stride between pixels."""
    HW = H.to(tl.int64) * W
    if CHANNELS_LAST:
        return ptr + b.to(tl.int64) * HW * C + c[None, :], C
    else:
        return ptr + (b.to(tl.int64) * C + c[None, :]) * HW, 1


@triton.jit
def _level(lvl, f0, f1, f2, f3, f4):
    ptr = f0
    if lvl == 1:
        ptr = f1
    if lvl == 2:
        ptr = f2
    if lvl == 3:
        ptr = f3
    if lvl == 4:
        ptr = f4
    return ptr


@triton.jit
def _roi(rois_ptr, levels_ptr, sizes_ptr, scales_ptr, R, B, C, L, ph, pw, sampling_ratio,
         BY_LEVEL: tl.constexpr, ALIGNED: tl.constexpr, BINS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's tile -- one (level, RoI) pair x all its bins k x a block of channels c -- and that RoI's
    geometry on its level, with the per-bin origins of its bins (vectors over k)."""
    pair = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    k = tl.arange(0, BINS)
    kmask = k < ph * pw
    if BY_LEVEL:
        r = pair
        lvl = tl.load(levels_ptr + r)  # int64: range-tested before narrowing (2**32 + 1 must not pass as 1)
    else:
        r = pair % R
        lvl = pair // R
    lvl_ok = (lvl >= 0) & (lvl < L)
    lvl = tl.where(lvl_ok, lvl, 0).to(tl.int32)
    H = tl.load(sizes_ptr + 2 * lvl)
    W = tl.load(sizes_ptr + 2 * lvl + 1)
    scale = tl.load(scales_ptr + lvl)
    bf = tl.load(rois_ptr + 5 * r)
    x1 = tl.load(rois_ptr + 5 * r + 1)
    y1 = tl.load(rois_ptr + 5 * r + 2)
    x2 = tl.load(rois_ptr + 5 * r + 3)
    y2 = tl.load(rois_ptr + 5 * r + 4)
    batch_ok = (bf >= 0) & (bf < B)
    b = tl.where(batch_ok, bf, 0.0).to(tl.int32)
    offset = 0.5 if ALIGNED else 0.0
    ys, ybin, gh = _axis(y1, y2, scale, offset, ALIGNED, ph, sampling_ratio)
    xs, xbin, gw = _axis(x1, x2, scale, offset, ALIGNED, pw, sampling_ratio)
    p = k // pw
    q = k % pw
    yo = ys + p.to(ys.dtype) * ybin  # [BINS]
    xo = xs + q.to(xs.dtype) * xbin
    sy0, ny, ny_max = _sample_ranges(yo, ybin, gh, H, kmask)
    sx0, nx, nx_max = _sample_ranges(xo, xbin, gw, W, kmask)
    inv_count = _div(1.0, tl.maximum(gh.to(ys.dtype) * gw.to(ys.dtype), 1.0))  # as csrc/common's inv_count
    ok = lvl_ok & batch_ok
    return (pair, c, cmask, k, kmask, lvl, b, H, W, yo, ybin, gh, sy0, ny, ny_max, xo, xbin, gw, sx0, nx, nx_max,
            inv_count, ok)


@triton.jit
def _forward_kernel(out_ptr, rois_ptr, levels_ptr, sizes_ptr, scales_ptr, f0, f1, f2, f3, f4,
                    R, B, C, L, ph, pw, sampling_ratio,
                    BY_LEVEL: tl.constexpr, ALIGNED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    BINS: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program: one (level, RoI) pair x all its bins x a block of channels; tile [BINS, BLOCK_C].
    (pair, c, cmask, k, kmask, lvl, b, H, W, yo, ybin, gh, sy0, ny, ny_max, xo, xbin, gw, sx0, nx, nx_max, inv_count,
     ok) = _roi(rois_ptr, levels_ptr, sizes_ptr, scales_ptr, R, B, C, L, ph, pw, sampling_ratio,
                BY_LEVEL, ALIGNED, BINS, BLOCK_C)
    base, pstride = _plane(_level(lvl, f0, f1, f2, f3, f4), b, H, W, C, c, CHANNELS_LAST)
    acc = tl.zeros([BINS, BLOCK_C], dtype=yo.dtype)  # float32, float64 for float64 features
    if ok:
        for ty in range(0, ny_max):  # the ty-th in-range sample of every bin
            vy, ylo, yhi, wyl, wyh = _sample(yo, sy0, ty, ybin, gh, H, ny)
            for tx in range(0, nx_max):
                vx, xlo, xhi, wxl, wxh = _sample(xo, sx0, tx, xbin, gw, W, nx)
                m = (vy & vx & kmask)[:, None] & cmask[None, :]
                v1 = tl.load(base + ((ylo * W + xlo).to(tl.int64) * pstride)[:, None], mask=m, other=0.0)
                v2 = tl.load(base + ((ylo * W + xhi).to(tl.int64) * pstride)[:, None], mask=m, other=0.0)
                v3 = tl.load(base + ((yhi * W + xlo).to(tl.int64) * pstride)[:, None], mask=m, other=0.0)
                v4 = tl.load(base + ((yhi * W + xhi).to(tl.int64) * pstride)[:, None], mask=m, other=0.0)
                contrib = ((wyl * wxl)[:, None] * v1.to(acc.dtype) + (wyl * wxh)[:, None] * v2.to(acc.dtype)
                           + (wyh * wxl)[:, None] * v3.to(acc.dtype) + (wyh * wxh)[:, None] * v4.to(acc.dtype))
                acc += tl.where(m, contrib, 0.0)
        acc = acc * inv_count
    out = out_ptr + (pair.to(tl.int64) * C + c[None, :]) * (ph * pw) + k[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])


@triton.jit
def _backward_kernel(grad_ptr, rois_ptr, levels_ptr, sizes_ptr, scales_ptr, g0, g1, g2, g3, g4,
                     R, B, C, L, ph, pw, sampling_ratio,
                     BY_LEVEL: tl.constexpr, ALIGNED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     BINS: tl.constexpr, BLOCK_C: tl.constexpr):
    (pair, c, cmask, k, kmask, lvl, b, H, W, yo, ybin, gh, sy0, ny, ny_max, xo, xbin, gw, sx0, nx, nx_max, inv_count,
     ok) = _roi(rois_ptr, levels_ptr, sizes_ptr, scales_ptr, R, B, C, L, ph, pw, sampling_ratio,
                BY_LEVEL, ALIGNED, BINS, BLOCK_C)
    if ok:
        gp = _level(lvl, g0, g1, g2, g3, g4)
        acc_t = gp.dtype.element_ty
        tile = kmask[:, None] & cmask[None, :]
        g = tl.load(grad_ptr + (pair.to(tl.int64) * C + c[None, :]) * (ph * pw) + k[:, None], mask=tile, other=0.0)
        g = g.to(acc_t) * inv_count.to(acc_t)
        base, pstride = _plane(gp, b, H, W, C, c, CHANNELS_LAST)
        for ty in range(0, ny_max):  # the ty-th in-range sample of every bin
            vy, ylo, yhi, wyl, wyh = _sample(yo, sy0, ty, ybin, gh, H, ny)
            for tx in range(0, nx_max):
                vx, xlo, xhi, wxl, wxh = _sample(xo, sx0, tx, xbin, gw, W, nx)
                m = (vy & vx)[:, None] & tile
                tl.atomic_add(base + ((ylo * W + xlo).to(tl.int64) * pstride)[:, None],
                              g * (wyl * wxl).to(acc_t)[:, None], mask=m)
                tl.atomic_add(base + ((ylo * W + xhi).to(tl.int64) * pstride)[:, None],
                              g * (wyl * wxh).to(acc_t)[:, None], mask=m)
                tl.atomic_add(base + ((yhi * W + xlo).to(tl.int64) * pstride)[:, None],
                              g * (wyh * wxl).to(acc_t)[:, None], mask=m)
                tl.atomic_add(base + ((yhi * W + xhi).to(tl.int64) * pstride)[:, None],
                              g * (wyh * wxh).to(acc_t)[:, None], mask=m)


def _geometry_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(rois, levels, num_levels, spatial_scales, heights, widths, device, dtype):
    if num_levels == 0:
        raise ValueError("roi_align_multilevel: features must not be empty")
    if num_levels > MAX_LEVELS:
        raise ValueError(f"roi_align_multilevel (Triton): at most {MAX_LEVELS} levels, got {num_levels}; "
                         "use the C++ backend for more")
    if len(spatial_scales) != num_levels:
        raise ValueError(f"roi_align_multilevel: spatial_scales has {len(spatial_scales)} entries but there are "
                         f"{num_levels} levels")
    if rois.dim() != 2 or rois.shape[1] != 5 or not rois.is_floating_point():
        raise ValueError(f"roi_align_multilevel: rois must be a floating-point [R, 5], got {rois.dtype} "
                         f"{tuple(rois.shape)}")
    if rois.device != device:
        raise ValueError(f"roi_align_multilevel: rois is on {rois.device}, the features (or grad) on {device}")
    if levels is not None and (levels.dim() != 1 or levels.shape[0] != rois.shape[0] or levels.dtype != torch.int64
                               or levels.device != device):
        raise ValueError(f"roi_align_multilevel: levels must be int64 [R] on rois' device, got {levels.dtype} "
                         f"{tuple(levels.shape)} on {levels.device}")
    gdt = _geometry_dtype(dtype)
    r = rois.to(device=device, dtype=gdt).contiguous()
    lv = levels.contiguous() if levels is not None else r  # unused when levels is None
    sizes, scales = _level_tables(tuple(zip(map(int, heights), map(int, widths))),
                                  tuple(map(float, spatial_scales)), gdt, device)
    return r, lv, sizes, scales


_LEVEL_TABLES = {}  # (sizes, scales, dtype, device) -> the two tensors the kernels read them from


def _level_tables(sizes, scales, gdt, device):
    """The levels' [L, 2] sizes and [L] scales as tensors on ``device``, made once per value: making them
    copies from host memory, which on a GPU waits for the stream's queued work (a host sync per call). The
    kernels only read them."""
    key = (sizes, scales, gdt, device)
    found = _LEVEL_TABLES.get(key)
    if found is None:
        if len(_LEVEL_TABLES) >= 256:  # bounded: a program that varies its level sizes call after call
            _LEVEL_TABLES.clear()
        found = _LEVEL_TABLES[key] = (torch.tensor(sizes, dtype=torch.int32, device=device),
                                      torch.tensor(scales, dtype=gdt, device=device))
    return found


MAX_BINS = 4096  # a program holds all of a RoI's bins


def _check_sizes(ph, pw, sampling_ratio, heights, widths):
    """What the kernels index with 32-bit ints, and the largest tile they hold."""
    if not (0 < ph and 0 < pw and ph * pw <= MAX_BINS):
        raise ValueError(f"roi_align_multilevel (Triton): output_size must be positive with at most {MAX_BINS} "
                         f"bins, got {ph} x {pw}; use the C++ backend for more")
    if not -2**31 <= sampling_ratio <= reference.MAX_ADAPTIVE_GRID:
        raise ValueError(f"roi_align_multilevel: sampling_ratio must be at most {reference.MAX_ADAPTIVE_GRID} "
                         f"(<= 0: adaptive) and fit in 32 bits, got {sampling_ratio}")
    for l, (h, w) in enumerate(zip(heights, widths)):
        if not (0 <= h and 0 <= w and h * w < 2**31):
            raise ValueError(f"roi_align_multilevel (Triton): level {l} is {h} x {w} pixels; a level must be "
                             "under 2**31 pixels")


def _blocks(ph, pw, C):
    bins = triton.next_power_of_2(ph * pw)
    return bins, max(1, min(triton.next_power_of_2(max(C, 1)), MAX_BINS // bins))


def roi_align_multilevel(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio,
                         aligned):
    features = list(features)
    L = len(features)
    if L == 0:
        raise ValueError("roi_align_multilevel: features must not be empty")
    f0 = features[0]
    for l, f in enumerate(features):  # as the C++ ops check a direct torch.ops call (the Python API did already)
        if f.dim() != 4 or f.shape[:2] != f0.shape[:2] or f.dtype != f0.dtype or f.device != f0.device or \
                not f.is_floating_point():
            raise ValueError(f"roi_align_multilevel: features[{l}] must be floating [B, C, H, W] with the B, C, "
                             f"dtype and device of features[0] {tuple(f0.shape)} {f0.dtype} {f0.device}, got "
                             f"{tuple(f.shape)} {f.dtype} {f.device}")
    channels_last = not f0.is_contiguous() and f0.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [f.contiguous(memory_format=fmt) for f in features]
    B, C = f0.shape[:2]
    r, lv, sizes, scales = _common(rois, levels, L, spatial_scales, [f.shape[2] for f in feats],
                                   [f.shape[3] for f in feats], f0.device, f0.dtype)
    R = r.shape[0]
    ph, pw = int(pooled_height), int(pooled_width)
    _check_sizes(ph, pw, sampling_ratio, [f.shape[2] for f in feats], [f.shape[3] for f in feats])
    pairs = R if levels is not None else L * R
    out = f0.new_empty((R, C, ph, pw) if levels is not None else (L, R, C, ph, pw))
    if out.numel() == 0:
        return out
    ptrs = feats + [feats[0]] * (MAX_LEVELS - L)
    BINS, BLOCK_C = _blocks(ph, pw, C)
    grid = (pairs, triton.cdiv(C, BLOCK_C))
    _forward_kernel[grid](out, r, lv, sizes, scales, *ptrs, R, B, C, L, ph, pw, int(sampling_ratio),
                          BY_LEVEL=levels is not None, ALIGNED=bool(aligned), CHANNELS_LAST=channels_last,
                          BINS=BINS, BLOCK_C=BLOCK_C, **LAUNCH_OPTIONS)
    return out


def roi_align_multilevel_backward(grad, rois, levels, spatial_scales, sampling_ratio, aligned, batch_size, channels,
                                  heights, widths, channels_last):
    L = len(heights)
    if grad.is_cuda and torch.are_deterministic_algorithms_enabled():
        # Float atomics add in whatever order the threads arrive; the CUDA C++ backend has a deterministic path.
        msg = ("roi_align_multilevel_backward_triton does not have a deterministic implementation; use "
               "backend='cuda' under torch.use_deterministic_algorithms(True)")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        import warnings

        warnings.warn(msg)
    if len(widths) != L or batch_size < 0 or channels < 0:
        raise ValueError(f"roi_align_multilevel_backward: heights and widths must have one entry per level and "
                         f"batch_size, channels be >= 0, got {list(heights)}, {list(widths)}, {batch_size}, {channels}")
    r, lv, sizes, scales = _common(rois, levels, L, spatial_scales, heights, widths, grad.device, grad.dtype)
    R = r.shape[0]
    B, C = int(batch_size), int(channels)
    want = (R, C) if levels is not None else (L, R, C)
    if grad.dim() != len(want) + 2 or tuple(grad.shape[:-2]) != want:
        raise ValueError(f"roi_align_multilevel_backward: grad must be [{', '.join(map(str, want))}, ph, pw], got "
                         f"{tuple(grad.shape)}")
    ph, pw = grad.shape[-2:]
    _check_sizes(ph, pw, sampling_ratio, heights, widths)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    acc = [torch.zeros((B, C, h, w), dtype=acc_dtype, device=grad.device).contiguous(memory_format=fmt)
           for h, w in zip(heights, widths)]
    pairs = R if levels is not None else L * R
    if pairs * C * ph * pw > 0 and B > 0:
        g = grad.contiguous()
        ptrs = acc + [acc[0]] * (MAX_LEVELS - L)
        BINS, BLOCK_C = _blocks(ph, pw, C)
        grid = (pairs, triton.cdiv(C, BLOCK_C))
        _backward_kernel[grid](g, r, lv, sizes, scales, *ptrs, R, B, C, L, ph, pw, int(sampling_ratio),
                               BY_LEVEL=levels is not None, ALIGNED=bool(aligned), CHANNELS_LAST=bool(channels_last),
                               BINS=BINS, BLOCK_C=BLOCK_C, **LAUNCH_OPTIONS)
    return [a if a.dtype == grad.dtype else a.to(grad.dtype) for a in acc]


def register():
    register_kernel("roi_align_multilevel_triton", roi_align_multilevel)
    register_kernel("roi_align_multilevel_backward_triton", roi_align_multilevel_backward)
