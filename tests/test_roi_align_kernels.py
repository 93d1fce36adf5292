"""roi_align_multilevel kernels (C++ CPU, Triton via the interpreter, CUDA and Triton under the gpu marker)
against the pure-PyTorch reference and torchvision.ops.roi_align, forward and backward."""
import textwrap
import zlib

import pytest
import torch
import torchvision

import insloc_ops
from conftest import HAS_CUDA, compile_for_sm90, poisoned_like
from insloc_ops import reference
from insloc_ops._backend import is_available

OP = torch.ops.insloc_ops.roi_align_multilevel
OP_BWD = torch.ops.insloc_ops.roi_align_multilevel_backward
CPU_BACKENDS = [b for b in ("cpu", "triton") if is_available("roi_align_multilevel", b, "cpu")]
GPU_BACKENDS = ["cuda", "triton"]


def tol(dtype):
    return {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4),
            torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}[dtype]


def make_features(B, C, sizes, dtype, device="cpu", channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, C, h, w, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for h, w in sizes]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    return feats


def make_rois(B, R, image, seed=0, device="cpu", special=True, dtype=torch.float32):
    """R random boxes in an image of side ``image``; with ``special``, the first rows are the edge cases:
    partly outside, fully outside, zero-size, x2 < x1, far larger than the map, NaN coordinates."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(R, 2, generator=g, dtype=torch.float64) * image * 1.1 - 0.05 * image
    wh = torch.rand(R, 2, generator=g, dtype=torch.float64) * image * 0.7 + 0.5
    b = torch.randint(0, B, (R, 1), generator=g).to(torch.float64)
    rois = torch.cat([b, xy, xy + wh], 1)
    cases = [
        [-0.3 * image, 0.2 * image, 0.4 * image, 0.9 * image],  # partly outside
        [1.5 * image, 1.5 * image, 2.0 * image, 2.5 * image],  # fully outside
        [0.3 * image, 0.3 * image, 0.3 * image, 0.3 * image],  # zero size
        [0.6 * image, 0.2 * image, 0.3 * image, 0.5 * image],  # x2 < x1
        [-40.0 * image, -30.0 * image, 50.0 * image, 45.0 * image],  # huge
        [float("nan"), 0.1 * image, 0.5 * image, 0.5 * image],  # NaN
    ]
    if special:
        for i, box in enumerate(cases[:R]):
            rois[i, 1:] = torch.tensor(box, dtype=torch.float64)
    return rois.to(device=device, dtype=dtype)


def well_formed(rois):
    """Boxes torchvision can take (it crashes on NaN and on x2 < x1 with aligned=True)."""
    ok = torch.isfinite(rois).all(1) & (rois[:, 3] >= rois[:, 1]) & (rois[:, 4] >= rois[:, 2])
    ok &= (rois[:, 3] - rois[:, 1]).abs() < 4 * 64  # keep torchvision's grid^2 loop short
    return rois[ok]


SIZES_CPU = [(12, 15), (6, 8), (3, 4)]
SCALES = [1 / 4, 1 / 8, 1 / 16]
IMAGE = 60
# Triton runs through the interpreter on CPU: tiny problems.
SIZES_TRITON = [(6, 7), (3, 4)]
SCALES_TRITON = [1 / 4, 1 / 8]


def problem(backend, dtype=torch.float32, channels_last=False, seed=0, R=8, device="cpu", C=3, B=2,
            all_cases=False):
    interpreted = backend == "triton" and device == "cpu"
    sizes, scales = (SIZES_TRITON, SCALES_TRITON) if interpreted else (SIZES_CPU, SCALES)
    feats = make_features(B, C, sizes, dtype, device, channels_last, seed)
    rois = make_rois(B, R, 28 if interpreted else IMAGE, seed, device)
    if interpreted and not all_cases:
        # The interpreter is slow: partly outside, x2 < x1, NaN and random boxes only.
        rois = rois[[0, 3, 5, 6, 7]]
    return feats, rois, scales


def run(backend, feats, rois, out_size, scales, sampling, aligned, levels=None):
    return insloc_ops.roi_align_multilevel(feats, rois, out_size, scales, sampling, aligned, levels, backend=backend)


def grads(backend, feats, rois, out_size, scales, sampling, aligned, levels, g):
    leaves = [f.detach().clone().requires_grad_() for f in feats]
    if backend == "reference":
        out = reference.roi_align_multilevel(leaves, rois, out_size, scales, sampling, aligned, levels)
    else:
        out = run(backend, leaves, rois, out_size, scales, sampling, aligned, levels)
    out.backward(g)
    # The reference never touches a level no RoI is assigned to: its gradient is zero.
    return out, [torch.zeros_like(f) if f.grad is None else f.grad for f in leaves]


# ------------------------------------------------------------------------------------------------
# CPU backends (C++ kernel and Triton through the interpreter) against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling", [0, 2])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_forward_backward_match_reference(backend, aligned, sampling, mode):
    # A seed that is the same in every process (hash() of a str is salted per process): failures reproduce.
    feats, rois, scales = problem(backend, seed=zlib.crc32(repr((aligned, sampling, mode)).encode()) % 1000)
    levels = None if mode == "all" else torch.arange(rois.shape[0]) % len(feats)
    out_size = (3, 2) if backend == "triton" else (5, 4)
    ref_out = reference.roi_align_multilevel(feats, rois, out_size, scales, sampling, aligned, levels)
    g = torch.randn_like(ref_out)
    out, gk = grads(backend, feats, rois, out_size, scales, sampling, aligned, levels, g)
    _, gr = grads("reference", feats, rois, out_size, scales, sampling, aligned, levels, g)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, **tol(torch.float32))
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, **tol(torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes_and_layouts_match_reference(backend, dtype, channels_last):
    feats, rois, scales = problem(backend, dtype, channels_last, seed=7)
    levels = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1])[: rois.shape[0]]
    for lv in (None, levels):
        ref_out = reference.roi_align_multilevel(feats, rois, (3, 3), scales, 0, True, lv)
        g = torch.randn_like(ref_out)
        out, gk = grads(backend, feats, rois, (3, 3), scales, 0, True, lv, g)
        _, gr = grads("reference", feats, rois, (3, 3), scales, 0, True, lv, g)
        torch.testing.assert_close(out, ref_out, **tol(dtype))
        for a, b in zip(gk, gr):
            assert a.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_kernel_matches_torchvision_per_level(aligned, sampling, channels_last):
    feats, rois, scales = problem("cpu", torch.float64, channels_last, seed=3, R=12)
    rois = well_formed(rois).to(torch.float64)
    out = OP(feats, rois, None, scales, 6, 5, sampling, aligned)  # [L, R, C, 6, 5]
    g = torch.randn_like(out)
    _, gk = grads("cpu", feats, rois, (6, 5), scales, sampling, aligned, None, g)
    for lvl, (f, s) in enumerate(zip(feats, scales)):
        leaf = f.detach().clone().requires_grad_()
        tv = torchvision.ops.roi_align(leaf, rois, (6, 5), s, sampling, aligned)
        tv.backward(g[lvl])
        torch.testing.assert_close(out[lvl], tv, **tol(torch.float64))
        torch.testing.assert_close(gk[lvl], leaf.grad, **tol(torch.float64))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton not available")
@pytest.mark.parametrize("aligned", [True, False])
def test_triton_matches_torchvision_per_level(aligned):
    feats, rois, scales = problem("triton", seed=4)
    rois = well_formed(rois)
    out = run("triton", feats, rois, (3, 2), scales, 0, aligned)
    for lvl, (f, s) in enumerate(zip(feats, scales)):
        torch.testing.assert_close(out[lvl], torchvision.ops.roi_align(f, rois, (3, 2), s, 0, aligned),
                                   **tol(torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_matches_reference(backend, dtype, channels_last):
    # The Triton kernel's 16-bit loads, fp32 sums and 16-bit stores run here through the interpreter.
    feats, rois, scales = problem(backend, dtype, channels_last, seed=5)
    feats32 = [f.float() for f in feats]
    levels = torch.arange(rois.shape[0]) % len(feats)
    out_size = (3, 3) if backend == "triton" else (4, 4)
    for lv in (None, levels):
        ref = reference.roi_align_multilevel(feats32, rois, out_size, scales, 0, True, lv)
        g = torch.randn_like(ref)
        out, gk = grads(backend, feats, rois, out_size, scales, 0, True, lv, g.to(dtype))
        _, gr = grads("reference", feats32, rois, out_size, scales, 0, True, lv, g.to(dtype).float())
        assert out.dtype == dtype and all(a.dtype == dtype for a in gk)
        torch.testing.assert_close(out.float(), ref, **tol(dtype))
        for a, b in zip(gk, gr):
            torch.testing.assert_close(a.float(), b, **tol(dtype))


def test_cpu_kernel_pools_a_linear_map_to_the_bin_centre():
    # Bilinear interpolation of f(y, x) = 10 y + x is exact inside the map, so every bin of a box inside
    # it pools to f at the bin centre; aligned=True puts pixel centres at half-integers.
    f = (10 * torch.arange(8.0)[:, None] + torch.arange(8.0)[None, :]).view(1, 1, 8, 8)
    rois = torch.tensor([[0.0, 1.5, 2.5, 5.5, 4.5]])  # aligned: x in [1, 5], y in [2, 4] in pixel units
    out = OP([f], rois, None, [1.0], 2, 2, 0, True)[0, 0, 0]
    expected = torch.tensor([[10 * 2.5 + 2.0, 10 * 2.5 + 4.0], [10 * 3.5 + 2.0, 10 * 3.5 + 4.0]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_special_boxes(backend):
    """NaN boxes and boxes outside the map pool to zero and take no gradient; huge boxes match the reference."""
    feats, rois, scales = problem(backend, seed=9, R=6, all_cases=True)
    out = run(backend, feats, rois, (2, 2), scales, 0, True)
    assert torch.isfinite(out).all()
    assert (out[:, 1] == 0).all()  # fully outside
    assert (out[:, 3] == 0).all()  # x2 < x1, adaptive grid: no samples
    assert (out[:, 5] == 0).all()  # NaN
    nan_only = rois[5:6]
    leaves = [f.detach().clone().requires_grad_() for f in feats]
    run(backend, leaves, nan_only, (2, 2), scales, 2, False).sum().backward()
    assert all((f.grad == 0).all() for f in leaves)
    huge = rois[4:5]
    torch.testing.assert_close(run(backend, feats, huge, (2, 2), scales, 0, True),
                               reference.roi_align_multilevel(feats, huge, (2, 2), scales, 0, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rois(backend):
    feats, _, scales = problem(backend)
    rois = torch.zeros(0, 5)
    leaves = [f.detach().clone().requires_grad_() for f in feats]
    out = run(backend, leaves, rois, (3, 3), scales, 0, True)
    assert out.shape == (len(feats), 0, 3, 3, 3)
    out.sum().backward()
    assert all(f.grad is not None and (f.grad == 0).all() for f in leaves)
    out = run(backend, feats, rois, (3, 3), scales, 0, True, torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 3, 3, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_rois_and_levels_mode_equal_all_levels_mode(backend):
    feats, rois, scales = problem(backend, seed=11)
    wide = torch.zeros(rois.shape[0], 10)
    wide[:, ::2] = rois
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    all_levels = run(backend, feats, strided, (3, 2), scales, 0, True)
    torch.testing.assert_close(all_levels, run(backend, feats, rois, (3, 2), scales, 0, True), rtol=0, atol=0)
    levels = torch.arange(rois.shape[0]).flip(0) % len(feats)
    by_level = run(backend, feats, strided, (3, 2), scales, 0, True, levels)
    torch.testing.assert_close(by_level, all_levels[levels, torch.arange(rois.shape[0])], rtol=0, atol=0)


def test_cpu_backward_is_deterministic():
    feats, rois, scales = problem("cpu", seed=12, R=40, C=16)
    rois[:, 0] = 0  # every RoI on one image: maximal overlap
    g = torch.randn(3, 40, 16, 7, 7)
    torch.use_deterministic_algorithms(True)
    try:
        a = OP_BWD(g, rois, None, scales, 0, True, 2, 16, [h for h, _ in SIZES_CPU], [w for _, w in SIZES_CPU], False)
        b = OP_BWD(g, rois, None, scales, 0, True, 2, 16, [h for h, _ in SIZES_CPU], [w for _, w in SIZES_CPU], False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def out_of_range_case(backend, seed=13, device="cpu"):
    """Eight ordinary boxes (random, well inside the maps), their valid levels, and the same boxes with one bad
    index in each of the first six rows: batch -1, -0.5 (image 0 if truncated before the test), B and NaN,
    level -1 and L. The last two rows stay valid."""
    feats, _, scales = problem(backend, seed=seed, R=1, device=device, all_cases=True)
    B, L = feats[0].shape[0], len(feats)
    # Inside the image region every level covers; a quarter to half of it on each side.
    hi = torch.tensor([min(f.shape[3] / s for f, s in zip(feats, scales)),
                       min(f.shape[2] / s for f, s in zip(feats, scales))], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(8, 2, generator=g, dtype=torch.float64) * hi * 0.4
    wh = (0.25 + 0.25 * torch.rand(8, 2, generator=g, dtype=torch.float64)) * hi
    b = (torch.arange(8) % B).to(torch.float64)[:, None]
    rois = torch.cat([b, xy, xy + wh], 1).to(device=device, dtype=torch.float32)
    levels = torch.arange(8, device=device) % L
    bad_rois, bad_levels = rois.clone(), levels.clone()
    bad_rois[:4, 0] = torch.tensor([-1.0, -0.5, float(B), float("nan")], device=device)
    bad_levels[4:6] = torch.tensor([-1, L], device=device)
    return feats, scales, (rois, levels), (bad_rois, bad_levels)


def check_zeroes_out_of_range(fwd, bwds, valid, bad):
    """fwd(rois, levels) and each of bwds (grad, rois, levels) -> feature grads on out_of_range_case's boxes.
    Each row first pools non-zero values with its valid indices, so a kernel that clamps or wraps a bad
    index instead of skipping the row shows: a bad row must pool exact zeros and add no gradient, while
    the valid rows come out as before."""
    (rois, levels), (bad_rois, bad_levels) = valid, bad
    good = fwd(rois, levels)
    assert (good.flatten(1).abs().sum(1) > 0).all()
    out = fwd(bad_rois, bad_levels)
    assert (out[:6] == 0).all() and torch.equal(out[6:], good[6:])
    # All-levels mode: a bad batch index zeroes its row on every level.
    good_all = fwd(rois, None)
    assert (good_all.flatten(2).abs().sum(2) > 0).all()
    out_all = fwd(bad_rois, None)
    assert (out_all[:, :4] == 0).all() and torch.equal(out_all[:, 4:], good_all[:, 4:])
    # Backward: gradient only on the bad rows; with valid indices it reaches the features, with bad ones not.
    g, g_all = torch.zeros_like(good), torch.zeros_like(good_all)
    g[:6], g_all[:, :4] = 1, 1
    for bwd in bwds:
        assert any((x != 0).any() for x in bwd(g, rois, levels))
        assert all((x == 0).all() for x in bwd(g, bad_rois, bad_levels))
        assert any((x != 0).any() for x in bwd(g_all, rois, None))
        assert all((x == 0).all() for x in bwd(g_all, bad_rois, None))


def test_cpu_kernel_refuses_out_of_range_batch_and_level():
    """The C++ CPU kernel reads the boxes on the host, so it refuses a bad batch index or level itself: under
    torch.compile, torch.export or a torch.func transform the public function's own check does not run (the
    CUDA kernels, which could only check with a device sync, pool zeros instead: tests/test_cuda_emu.py)."""
    feats, scales, (rois, levels), (bad_rois, bad_levels) = out_of_range_case("cpu")
    sizes = [h for h, _ in SIZES_CPU], [w for _, w in SIZES_CPU]
    good = OP(feats, rois, levels, scales, 2, 2, 0, True)
    for i, value in enumerate([-1.0, -0.5, float(feats[0].shape[0]), float("nan")]):
        r = rois.clone()
        r[i, 0] = value
        for lv in (None, levels):
            with pytest.raises(ValueError, match=rf"rois\[{i}, 0\] \(batch index\)"):
                OP(feats, r, lv, scales, 2, 2, 0, True)
            with pytest.raises(ValueError, match="batch index"):
                OP_BWD(torch.ones_like(good if lv is not None else OP(feats, rois, None, scales, 2, 2, 0, True)),
                       r, lv, scales, 0, True, 2, 3, *sizes, False)
    for value in (-1, len(feats)):
        lv = levels.clone()
        lv[5] = value
        with pytest.raises(ValueError, match=r"levels\[5\]"):
            OP(feats, rois, lv, scales, 2, 2, 0, True)
        with pytest.raises(ValueError, match=r"levels\[5\]"):
            OP_BWD(torch.ones_like(good), rois, lv, scales, 0, True, 2, 3, *sizes, False)
    # Where the public check is skipped: a vmap over the features reaches the kernel with the bad boxes.
    stacked = [torch.stack([f, f]) for f in feats]
    with pytest.raises(ValueError, match="batch index"):
        torch.func.vmap(lambda *fs: insloc_ops.roi_align_multilevel(list(fs), bad_rois, 2, scales, backend="cpu"))(
            *stacked)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton not available")
def test_triton_kernel_zeroes_out_of_range_batch_and_level():
    # The Triton op called directly (the public API range-checks on CPU before it gets there).
    from insloc_ops.triton import roi_align as triton_roi_align
    feats, scales, valid, bad = out_of_range_case("triton")
    sizes = [h for h, _ in SIZES_TRITON], [w for _, w in SIZES_TRITON]
    check_zeroes_out_of_range(
        lambda r, lv: triton_roi_align.roi_align_multilevel(feats, r, lv, scales, 2, 2, 0, True),
        [lambda g, r, lv: triton_roi_align.roi_align_multilevel_backward(g, r, lv, scales, 0, True, 2, 3, *sizes,
                                                                         False)], valid, bad)


def test_gradcheck_cpu_kernel_fp64():
    feats, rois, scales = problem("cpu", torch.float64, seed=14, R=8, C=2)
    rois = rois[[0, 2, 3, 6]]  # partly outside, zero-size, x2 < x1, random
    leaves = [f[:1].detach().clone().requires_grad_() for f in feats]
    rois[:, 0] = 0
    for lv in (None, torch.tensor([0, 1, 2, 0])):
        assert torch.autograd.gradcheck(
            lambda *fs: insloc_ops.roi_align_multilevel(list(fs), rois, (3, 2), scales, 0, True, lv, backend="cpu"),
            leaves, eps=1e-6, atol=1e-7)


def test_opcheck_cpu_kernel():
    feats, rois, scales = problem("cpu", seed=15, R=5)
    rois = well_formed(rois)
    feats = [f.requires_grad_() for f in feats]
    torch.library.opcheck(OP.default, (feats, rois, None, scales, 3, 2, 0, True))
    torch.library.opcheck(OP.default, (feats, rois, torch.arange(rois.shape[0]) % 3, scales, 2, 2, 2, False))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton not available")
def test_opcheck_triton_kernel():
    feats, rois, scales = problem("triton", seed=16)
    rois = well_formed(rois)[-2:]
    torch.library.opcheck(torch.ops.insloc_ops.roi_align_multilevel_triton.default,
                          (feats, rois, None, scales, 2, 1, 1, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_cpu():
    feats, rois, scales = problem("cpu", seed=17)
    rois = well_formed(rois)
    levels = torch.arange(rois.shape[0]) % 3

    def pool(fs, r, lv):
        return insloc_ops.roi_align_multilevel(fs, r, 3, scales, 0, True, lv, backend="cpu").relu().sum((-1, -2))

    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    for lv in (None, levels):
        torch.testing.assert_close(compiled(feats, rois, lv), pool(feats, rois, lv))


def test_bad_inputs_name_the_argument():
    feats, rois, scales = problem("cpu")
    with pytest.raises(ValueError, match="features"):
        insloc_ops.roi_align_multilevel([], rois, 2, [], backend="cpu")
    with pytest.raises(ValueError, match="spatial_scales"):
        insloc_ops.roi_align_multilevel(feats, rois, 2, scales[:2], backend="cpu")
    with pytest.raises(ValueError, match="rois"):
        insloc_ops.roi_align_multilevel(feats, rois[:, :4], 2, scales, backend="cpu")
    with pytest.raises(ValueError, match="levels"):
        insloc_ops.roi_align_multilevel(feats, rois, 2, scales, levels=torch.zeros(rois.shape[0]), backend="cpu")
    # Direct op calls skip the Python checks; the C++ entry points must refuse, not crash.
    with pytest.raises(RuntimeError, match="features"):
        OP([], rois, None, [], 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="spatial_scales"):
        OP(feats, rois, None, scales[:1], 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="rois"):
        OP(feats, rois[:, :3], None, scales, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="levels"):
        OP(feats, rois, torch.zeros(rois.shape[0], dtype=torch.int32), scales, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="levels"):
        OP(feats, rois, torch.zeros(3, dtype=torch.int64), scales, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="grad"):
        OP_BWD(torch.zeros(2, 8, 3, 2, 2), rois, None, scales, 0, True, 2, 3, [12, 6, 3], [15, 8, 4], False)
    # 32-bit ints in the kernels: the pooled size and sampling ratio must fit (2**32 + 2 would run as 2).
    for ph, pw, ratio in ((2**32 + 2, 2, 0), (2, 2**15 + 1, 0), (2, 2, 2**32 + 2), (2, 2, 65537)):
        with pytest.raises(ValueError, match="output_size" if ratio == 0 else "sampling_ratio"):
            OP(feats, rois, None, scales, ph, pw, ratio, True)
    with pytest.raises(ValueError, match="sampling_ratio"):
        OP_BWD(torch.zeros(3, 8, 3, 2, 2), rois, None, scales, 2**32 + 2, True, 2, 3, [12, 6, 3], [15, 8, 4], False)


@pytest.mark.parametrize("op", ["cpu", "triton"])
def test_kernels_zero_levels_out_of_int32_range(op):
    # On CUDA tensors the public API does not range-check levels (that costs a sync): a level of 2**32 + 1
    # must pool nothing, not level 1 after narrowing to 32 bits (the C++ CPU kernel refuses it instead).
    if op not in CPU_BACKENDS:
        pytest.skip(f"{op} not available")
    feats, scales, (rois, _), _ = out_of_range_case("cpu", seed=15)
    rois = rois[:4]
    if op == "cpu":
        for bad in (2**32 + 1, -2**32 + 1, 2**32):
            with pytest.raises(ValueError, match=r"levels\[1\]"):
                OP(feats, rois, torch.tensor([1, bad, 1, 0]), scales, 2, 2, 2, True)
        return
    from insloc_ops.triton import roi_align as triton_roi_align

    def pool(levels):
        return triton_roi_align.roi_align_multilevel(feats, rois, levels, scales, 2, 2, 2, True)
    # Each box pools non-zero values at the level its bad level would narrow to, so a wrap shows.
    wrapped = pool(torch.tensor([1, 1, 1, 0]))
    assert (wrapped.flatten(1).abs().sum(1) > 0).all()
    out = pool(torch.tensor([1, 2**32 + 1, -2**32 + 1, 2**32]))
    assert torch.equal(out[0], wrapped[0]) and (out[1:] == 0).all()


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton not available")
def test_triton_refuses_more_than_five_levels():
    feats = make_features(1, 1, [(2, 2)] * 6, torch.float32)
    with pytest.raises(ValueError, match="at most 5 levels"):
        insloc_ops.roi_align_multilevel(feats, torch.zeros(1, 5), 1, [1.0] * 6, backend="triton")


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton not available")
def test_triton_refuses_more_bins_than_a_program_holds():
    feats = make_features(1, 1, [(4, 4)], torch.float32)
    rois = torch.tensor([[0.0, 0, 0, 3, 3]])
    assert insloc_ops.roi_align_multilevel(feats, rois, 64, [1.0], backend="triton").shape == (1, 1, 1, 64, 64)
    with pytest.raises(ValueError, match="at most 4096 bins"):
        insloc_ops.roi_align_multilevel(feats, rois, (64, 65), [1.0], backend="triton")


# ------------------------------------------------------------------------------------------------
# GPU: CUDA kernel and Triton on CUDA tensors (run by the device-check script)
# ------------------------------------------------------------------------------------------------


def poison_cuda_allocator(nbytes=64 << 20):
    """Fills the caching allocator's free blocks with NaN, so an output element a kernel leaves unwritten
    (the op allocates its own outputs) reads back as NaN."""
    x = poisoned_like(torch.empty(nbytes // 4, device="cuda"))
    del x


def gpu_backends():
    return [b for b in GPU_BACKENDS if HAS_CUDA and is_available("roi_align_multilevel", b, "cuda")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["all", "levels"])
@pytest.mark.parametrize("aligned,sampling", [(True, 0), (False, 2), (False, 0)])
def test_gpu_matches_reference(backend, dtype, channels_last, mode, aligned, sampling):
    check_gpu_matches_reference(backend, dtype, channels_last, mode, aligned, sampling)


def check_gpu_matches_reference(backend, dtype, channels_last, mode, aligned, sampling):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    feats, rois, scales = problem(backend, dtype, channels_last, seed=21, R=37, device="cuda", C=19, B=3)
    levels = None if mode == "all" else torch.randint(0, 3, (37,), device="cuda")
    ref32 = [f.float() if dtype in (torch.float16, torch.bfloat16) else f for f in feats]
    ref = reference.roi_align_multilevel(ref32, rois, (7, 6), scales, sampling, aligned, levels)
    g = torch.randn_like(ref)
    poison_cuda_allocator()
    out, gk = grads(backend, feats, rois, (7, 6), scales, sampling, aligned, levels, g.to(dtype))
    _, gr = grads("reference", ref32, rois, (7, 6), scales, sampling, aligned, levels, g.to(dtype).to(ref.dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(ref.dtype), ref, **tol(dtype))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in zip(gk, gr):
        assert a.dtype == dtype and a.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(a.to(b.dtype), b, **tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_torchvision(backend):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    feats, rois, scales = problem(backend, torch.float32, seed=22, R=50, device="cuda", C=8)
    rois = well_formed(rois)
    for aligned in (True, False):
        out = run(backend, feats, rois, (7, 7), scales, 0, aligned)
        for lvl, (f, s) in enumerate(zip(feats, scales)):
            torch.testing.assert_close(out[lvl], torchvision.ops.roi_align(f, rois, (7, 7), s, 0, aligned),
                                       **tol(torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("out_size", [7, 14])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_gpu_many_channels_match_reference(backend, dtype, channels_last, out_size, mode):
    """The benchmarks' and training's channel count (256) and output sizes: the Triton kernel then runs several
    channel blocks per RoI (BLOCK_C is 64 at 7x7, 16 at 14x14), which the small-C tests never do. fp32 NCHW as
    benchmarked, bf16 channels_last as training feeds it."""
    check_gpu_many_channels(backend, dtype, channels_last, out_size, mode)


def check_gpu_many_channels(backend, dtype, channels_last, out_size, mode):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    R, size = 40, (out_size, out_size)
    feats, rois, scales = problem(backend, dtype, channels_last, seed=26, R=R, device="cuda", C=256, B=2)
    levels = None if mode == "all" else torch.arange(R, device="cuda") % 3
    ref32 = [f.float() for f in feats]
    ref = reference.roi_align_multilevel(ref32, rois, size, scales, 0, True, levels)
    g = torch.randn_like(ref)
    poison_cuda_allocator()
    out, gk = grads(backend, feats, rois, size, scales, 0, True, levels, g.to(dtype))
    _, gr = grads("reference", ref32, rois, size, scales, 0, True, levels, g.to(dtype).float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tol(dtype))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in zip(gk, gr):
        assert a.dtype == dtype and a.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(a.float(), b, **tol(dtype))


SEPARABLE = {"INSLOC_OPS_CUDA_ROI_FORWARD": "separable", "INSLOC_OPS_CUDA_ROI_BACKWARD": "separable"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["all", "levels"])
@pytest.mark.parametrize("aligned,sampling", [(True, 0), (False, 2)])
def test_gpu_cuda_separable_matches_reference(dtype, channels_last, mode, aligned, sampling, monkeypatch):
    """The CUDA file's separable forward and backward (opt-in) on the reference test's inputs."""
    for k, v in SEPARABLE.items():
        monkeypatch.setenv(k, v)
    check_gpu_matches_reference("cuda", dtype, channels_last, mode, aligned, sampling)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("out_size", [7, 14])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_gpu_cuda_separable_many_channels(dtype, channels_last, out_size, mode, monkeypatch):
    for k, v in SEPARABLE.items():
        monkeypatch.setenv(k, v)
    check_gpu_many_channels("cuda", dtype, channels_last, out_size, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_cuda_separable_deterministic_bands(channels_last, monkeypatch):
    """The separable deterministic backward's blocks own bands of 32 rows: levels of 80 and 40 rows, RoIs
    across the bands' edges, overlapping on one image; against the fp64 reference and bitwise repeatable."""
    if "cuda" not in gpu_backends():
        pytest.skip("cuda kernel not available")
    for k, v in SEPARABLE.items():
        monkeypatch.setenv(k, v)
    gen = torch.Generator().manual_seed(42)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.randn(2, 5, 80, 24, generator=gen).contiguous(memory_format=fmt).cuda(),
             torch.randn(2, 5, 40, 12, generator=gen).contiguous(memory_format=fmt).cuda()]
    xy = torch.rand(60, 4, generator=gen) * torch.tensor([48.0, 160.0, 48.0, 160.0]) - 4
    rois = torch.cat([torch.randint(0, 2, (60, 1), generator=gen).float(), torch.minimum(xy[:, :2], xy[:, 2:]),
                      torch.maximum(xy[:, :2], xy[:, 2:])], 1).cuda()
    rois[:20, 0] = 1
    for levels in (None, torch.randint(0, 2, (60,), generator=gen).cuda()):
        ref = reference.roi_align_multilevel(feats, rois, (5, 4), [1 / 2, 1 / 4], 0, True, levels)
        g = torch.randn(ref.shape, generator=gen).cuda()
        _, g64 = grads("reference", [f.double() for f in feats], rois.double(), (5, 4), [1 / 2, 1 / 4], 0, True,
                       levels, g.double())
        torch.use_deterministic_algorithms(True)
        try:
            _, ga = grads("cuda", feats, rois, (5, 4), [1 / 2, 1 / 4], 0, True, levels, g)
            _, gb = grads("cuda", feats, rois, (5, 4), [1 / 2, 1 / 4], 0, True, levels, g)
        finally:
            torch.use_deterministic_algorithms(False)
        for a, b, r in zip(ga, gb, g64):
            assert torch.equal(a, b)
            torch.testing.assert_close(a.double(), r, **tol(torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("channels", ["1", "3", "8", "", "separable"])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_gpu_cuda_channels_per_thread(channels, mode, monkeypatch):
    """NCHW CUDA threads taking 1, 3 or 8 of 19 channels (the last slot part-full), or the count the waves
    rule picks (""), or the separable kernels ("separable"), on fresh inputs each run: forward and atomic
    backward against the reference."""
    if "cuda" not in gpu_backends():
        pytest.skip("cuda kernel not available")
    if channels == "separable":
        for k, v in SEPARABLE.items():
            monkeypatch.setenv(k, v)
    else:
        monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_CHANNELS", channels)
    seed = int(torch.randint(0, 2**31, ()))
    feats, rois, scales = problem("cuda", torch.float32, False, seed=seed, R=37, device="cuda", C=19, B=3)
    levels = None if mode == "all" else torch.randint(0, 3, (37,), device="cuda")
    ref = reference.roi_align_multilevel(feats, rois, (7, 6), scales, 0, True, levels)
    g = torch.randn_like(ref)
    poison_cuda_allocator()
    out, gk = grads("cuda", feats, rois, (7, 6), scales, 0, True, levels, g)
    _, gr = grads("reference", feats, rois, (7, 6), scales, 0, True, levels, g)
    torch.testing.assert_close(out, ref, **tol(torch.float32), msg=lambda m: f"seed {seed}: {m}")
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, **tol(torch.float32), msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sample", "separable"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_cuda_deterministic_backward(channels_last, mode, kernels, monkeypatch):
    """Bitwise repeatable, and as accurate as an fp32 sum can be. With 300 RoIs on one image a gradient
    pixel sums over a thousand contributions, so the bound is relative to S, the sum of their magnitudes
    (the gradient of |g|): fp32 sums in any order land within 1.3e-6 S of the fp64 result here (measured
    with the fp32 reference and the CPU kernel; against the fp32 reference itself, errors reach 1.7e-4).
    kernels: the per-sample deterministic kernel, or the separable one (INSLOC_OPS_CUDA_ROI_BACKWARD)."""
    if "cuda" not in gpu_backends():
        pytest.skip("cuda kernel not available")
    monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_BACKWARD", kernels)
    feats, rois, scales = problem("cuda", torch.float32, channels_last, seed=23, R=300, device="cuda", C=32)
    rois[:, 0] = 1  # many overlapping RoIs on one image: atomics would reorder
    gen = torch.Generator().manual_seed(25)
    levels = None if mode == "all" else torch.randint(0, 3, (300,), generator=gen).cuda()
    ref = reference.roi_align_multilevel(feats, rois, (7, 7), scales, 0, True, levels)
    g = torch.randn(ref.shape, generator=gen).cuda()
    exact = [f.double() for f in feats]
    _, g64 = grads("reference", exact, rois.double(), (7, 7), scales, 0, True, levels, g.double())
    _, magnitude = grads("reference", exact, rois.double(), (7, 7), scales, 0, True, levels, g.double().abs())
    torch.use_deterministic_algorithms(True)
    try:
        poison_cuda_allocator()
        _, ga = grads("cuda", feats, rois, (7, 7), scales, 0, True, levels, g)
        _, gb = grads("cuda", feats, rois, (7, 7), scales, 0, True, levels, g)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, r, m in zip(ga, gb, g64, magnitude):
        assert torch.equal(a, b)
        assert not a.isnan().any()
        excess = (a.double() - r).abs() - (1e-5 * m + 1e-6)
        assert excess.max() <= 0, f"error over the bound by {excess.max().item():.3g}"


@pytest.mark.gpu
def test_cuda_zeroes_out_of_range_batch_and_level():
    if "cuda" not in gpu_backends():
        pytest.skip("cuda kernel not available")
    feats, scales, valid, bad = out_of_range_case("cuda", seed=24, device="cuda")
    sizes = [h for h, _ in SIZES_CPU], [w for _, w in SIZES_CPU]

    def fwd(rois, levels):
        poison_cuda_allocator()
        return OP(feats, rois, levels, scales, 2, 2, 0, True)

    def bwd(deterministic):
        def run(g, rois, levels):
            torch.use_deterministic_algorithms(deterministic)
            try:
                return OP_BWD(g, rois, levels, scales, 0, True, 2, 3, *sizes, False)
            finally:
                torch.use_deterministic_algorithms(False)
        return run

    check_zeroes_out_of_range(fwd, [bwd(False), bwd(True)], valid, bad)


@pytest.mark.gpu
def test_cuda_empty_and_huge_boxes():
    if "cuda" not in gpu_backends():
        pytest.skip("cuda kernel not available")
    feats, rois, scales = problem("cuda", seed=25, R=6, device="cuda")
    out = OP(feats, rois[:0], None, scales, 3, 3, 0, True)
    assert out.shape == (3, 0, 3, 3, 3)
    giant = torch.tensor([[0.0, -1e7, -1e7, 1e7, 1e7]], device="cuda")  # grid clamps to 65536 per axis
    torch.testing.assert_close(OP(feats, giant, None, scales, 2, 2, 0, True),
                               reference.roi_align_multilevel(feats, giant, (2, 2), scales, 0, True))


_PTX_CHECK = textwrap.dedent("""
    import triton_aot  # drops TRITON_INTERPRET; captures the launches the wrapper really makes
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from insloc_ops.triton import roi_align
    for name in ("_forward_kernel", "_backward_kernel"):
        kernel = getattr(roi_align, name)
        fn, args, kwargs = next(launch for launch in triton_aot.launches()
                                if launch[0] is kernel and launch[1][0].dtype == torch.float32)
        sig, constexprs, options = triton_aot.signature_of(fn, args, kwargs)
        ptx = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                             options=options).asm["ptx"]
        print(name, "fma", ptx.count("fma.rn.f32"), "div_full", ptx.count("div.full.f32"), "div_rn",
              ptx.count("div.rn.f32"))
""")


def test_triton_kernels_compile_for_sm90_with_exact_geometry():
    # On a GPU a plain fp32 `/` in Triton is an approximate division (div.full) and mul + add contract into
    # FMAs; the interpreter does neither, so only the PTX shows whether the sample geometry rounds like
    # csrc/common/roi_align.h (an H200 run found a bin with one sample too many from div.full).
    stdout = compile_for_sm90(_PTX_CHECK)
    lines = stdout.split("\n")
    for name in ("_forward_kernel", "_backward_kernel"):
        counts = dict(zip(*[iter(next(line for line in lines if line.startswith(name)).split()[1:])] * 2))
        assert counts["fma"] == "0" and counts["div_full"] == "0" and int(counts["div_rn"]) > 0, stdout


def _bad_calls():
    """(description, forward or backward, arguments, message) of direct op calls the Python API would refuse."""
    f0, rois = torch.zeros(2, 3, 8, 8), torch.tensor([[1.0, 0, 0, 8, 8]])
    two_rois = torch.tensor([[0.0, 0, 0, 8, 8], [1.0, 0, 0, 8, 8]])
    fwd = lambda feats, r=rois, sr=0, levels=None: (feats, r, levels, [1.0, 0.5], 2, 2, sr, True)  # noqa: E731
    bwd = lambda grad, r=two_rois, B=2, C=3, sizes=([8, 4], [8, 4]), levels=None: (  # noqa: E731
        grad, r, levels, [1.0, 0.5], 0, True, B, C, *sizes, False)
    return [
        ("a level of a smaller batch", "fwd", fwd([f0, torch.zeros(1, 3, 4, 4)]), r"features\[1\]"),
        ("a level of fewer channels", "fwd", fwd([f0, torch.zeros(2, 2, 4, 4)]), r"features\[1\]"),
        ("a level of another dtype", "fwd", fwd([f0, torch.zeros(2, 3, 4, 4, dtype=torch.float64)]), "dtype"),
        ("a 3-D level", "fwd", fwd([f0, torch.zeros(2, 3, 4)]), r"features\[1\]"),
        ("integer rois", "fwd", fwd([f0, torch.zeros(2, 3, 4, 4)], r=rois.long()), "rois"),
        ("a huge sampling ratio", "fwd", fwd([f0, torch.zeros(2, 3, 4, 4)], sr=2**31 - 1), "sampling_ratio"),
        ("a grad for fewer RoIs", "bwd", bwd(torch.zeros(2, 1, 3, 2, 2)), "grad"),
        ("a grad for fewer levels", "bwd", bwd(torch.zeros(1, 2, 3, 2, 2)), "grad"),
        ("a grad of fewer channels", "bwd", bwd(torch.zeros(2, 2, 2, 2, 2)), "grad"),
        ("a per-level grad without levels", "bwd", bwd(torch.zeros(2, 3, 2, 2)), "grad"),
        ("widths shorter than heights", "bwd", bwd(torch.zeros(2, 2, 3, 2, 2), sizes=([8, 4], [8])), "widths"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_a_direct_op_call_checks_its_arguments(case, backend):
    # torch.ops calls skip the Python API's checks: each backend's op must refuse what it cannot read within bounds
    _, which, args, match = case
    op = OP if which == "fwd" else OP_BWD
    if backend == "triton":
        op = torch.ops.insloc_ops.roi_align_multilevel_triton if which == "fwd" else \
            torch.ops.insloc_ops.roi_align_multilevel_backward_triton
    with pytest.raises((RuntimeError, ValueError), match=match):
        op(*args)


def test_triton_level_tables_are_made_once_per_value():
    # Making them copies from host memory, which waits for the stream on a GPU: once per value, not per call.
    tr = pytest.importorskip("insloc_ops.triton.roi_align")
    cpu = torch.device("cpu")
    a = tr._level_tables(((8, 8), (4, 4)), (0.25, 0.125), torch.float32, cpu)
    b = tr._level_tables(((8, 8), (4, 4)), (0.25, 0.125), torch.float32, cpu)
    assert a[0] is b[0] and a[1] is b[1]
    assert a[0].tolist() == [[8, 8], [4, 4]] and a[0].dtype == torch.int32 and a[1].tolist() == [0.25, 0.125]
    c = tr._level_tables(((8, 8), (4, 4)), (0.25, 0.5), torch.float32, cpu)
    d = tr._level_tables(((8, 8), (4, 4)), (0.25, 0.125), torch.float64, cpu)
    assert c[1].tolist() == [0.25, 0.5] and d[1].dtype == torch.float64 and d[1] is not a[1]
