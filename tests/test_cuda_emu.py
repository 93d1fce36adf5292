"""The CUDA kernels (csrc/cuda/*.cu), their own code compiled as host C++ and run on the CPU by the emulator
in csrc/emu/cuda_emu.h: launch geometry, shared-memory staging, barriers, warp shuffles, split-K combines
and the host code around them, against the reference and the CPU kernels; then again under
AddressSanitizer and under the race detector. What the emulator cannot show (the memory model, speed) is
left to the gpu-marked tests."""
import contextlib
import glob
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

import cuda_emu
import test_anchor_kernels as anchor_tests
import test_infonce_kernels as infonce_tests
import test_roi_align_kernels as roi_tests
from insloc_ops import reference

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cuda_emu.supported(), reason="the emulator needs Linux")]


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


@contextlib.contextmanager
def poisoned_outputs():
    """Deterministic mode with fill_uninitialized_memory: every at::empty the host code makes starts as NaN
    (floats) or the largest integer, so an element a kernel leaves unwritten shows."""
    before = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = before


@contextlib.contextmanager
def sm_count(n, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("INSLOC_EMU_SM_COUNT", str(n))
        yield


SCHEDULES = ["alternate", "forward", "reverse", "random:1", "random:7"]


def under_schedules(monkeypatch, fn):
    """fn() under every emulator schedule (thread order per round, block order): a race between threads
    of one round or between blocks makes the results differ."""
    results = []
    for schedule in SCHEDULES:
        with monkeypatch.context() as m:
            m.setenv("INSLOC_EMU_SCHEDULE", schedule)
            results.append(fn())
    return results


def assert_all_equal(results, rtol=0.0, atol=0.0):
    """Every result equal to the first (exactly, by default; NaN equal to NaN)."""
    flat = [torch.utils._pytree.tree_leaves(r) for r in results]
    for other in flat[1:]:
        assert len(other) == len(flat[0])
        for a, b in zip(flat[0], other):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# The emulator itself: every class of bug it claims to catch, caught; correct kernels pass
# ------------------------------------------------------------------------------------------------


def test_emulator_library_carries_the_insloc_ops_signatures(emu):
    for op in cuda_emu.OPS:
        mine = str(getattr(torch.ops.insloc_emu, op).default._schema)
        theirs = str(getattr(torch.ops.insloc_ops, op).default._schema)
        assert mine == theirs.replace("insloc_ops::", "insloc_emu::")


def test_emulator_runs_barriers_and_shuffles_correctly(emu):
    x = torch.arange(512, dtype=torch.float32)
    assert torch.equal(emu.selftest("reverse"), torch.cat([x[:256].flip(0), x[256:].flip(0)]))
    want = torch.zeros(512)
    want[:256] = x[:256].roll(-1) + x[256:].roll(-1)  # s[(t + 1) % 256], summed over the two rounds
    assert torch.equal(emu.selftest("two_rounds"), want)
    lanes = torch.arange(256, dtype=torch.float32).view(8, 32).sum(1)
    assert torch.equal(emu.selftest("warp_sum")[:8], lanes)


@pytest.mark.parametrize("case", ["reverse_unsynced", "two_rounds_unsynced"])
def test_emulator_exposes_a_missing_syncthreads(emu, case):
    # Read-after-write (threads read slots not yet written) and write-after-read (a second round overwrites
    # slots not yet read): both give wrong values, whichever order the previous blocks ran in.
    good = emu.selftest(case.replace("_unsynced", ""))
    for _ in range(2):
        assert not torch.equal(emu.selftest(case), good)


def test_emulator_schedules_expose_races(emu, monkeypatch):
    # Racy kernels give a different result under some schedule; race-free ones never do.
    for case in ("race_in_round", "race_between_blocks"):
        values = {float(out[0]) for out in under_schedules(monkeypatch, lambda: emu.selftest(case))}
        assert len(values) > 1, case
    for case in ("reverse", "two_rounds", "warp_sum"):
        assert_all_equal(under_schedules(monkeypatch, lambda: emu.selftest(case)))
    monkeypatch.setenv("INSLOC_EMU_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="INSLOC_EMU_SCHEDULE"):
        emu.selftest("reverse")


def test_emulator_poisons_dynamic_shared_memory(emu):
    assert emu.selftest("dynamic_shared")[:256].isnan().all()


@pytest.mark.parametrize("case,match", [
    ("divergent_barrier", "__syncthreads reached by 128 of 256"),
    ("partial_shuffle", "warp shuffle reached by 16 of the 32 lanes"),
    ("shared_over_48k", "without cudaFuncSetAttribute"),
    ("grid_y_too_large", "grid dimensions"),
    ("block_too_large", "more than 1024 threads"),
    ("grid_truncated", "out of range"),
    ("misaligned_vector_load", "a 16-byte load: the address 0x[0-9a-f]+ is not 16-byte aligned"),
    ("misaligned_vector_store", "a 16-byte store: the address 0x[0-9a-f]+ is not 16-byte aligned"),
])
def test_emulator_rejects_what_a_gpu_would_reject(emu, case, match):
    with pytest.raises(RuntimeError, match=match):
        emu.selftest(case)


def test_emulator_runs_aligned_vector_accesses(emu):
    before = emu.vector_accesses()
    assert torch.equal(emu.selftest("vector_copy")[:256], torch.arange(256.0))
    assert emu.vector_accesses() - before == 2 * 64  # a load and a store per thread


def test_emulator_allows_large_shared_memory_after_the_attribute(emu):
    assert emu.selftest("shared_over_48k_allowed")[:256].isnan().all()


def tf32(x):
    """float32 x rounded to TF32 as cvt.rna.tf32.f32 (wmma::__float_to_tf32) rounds: to nearest with ties away
    from zero, on the bits (a carry runs on into the exponent, up to Inf); Inf and NaN stay."""
    rounded = ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(x.isfinite(), rounded, x)


def from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def gemm_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in ((32, 24), (24, 32), (32, 32))]


@pytest.mark.parametrize("case", ["gemm", "gemm_b_row_major", "gemm_a_col_major"])
def test_emulator_wmma_gemm_matches_torch(emu, case, monkeypatch):
    # c + a b by four warps, one 16 x 16 tile each: a and b staged in (128-byte aligned) dynamic shared memory
    # with padded rows (ldm 28 and 36) and rounded to TF32 in the fragments, c loaded from global memory, the
    # result stored column-major. Cases: A row-major and B column-major, B row-major, A column-major.
    a, b, c = gemm_inputs(61)
    results = under_schedules(monkeypatch, lambda: emu.selftest_wmma(case, a, b, c))
    assert_all_equal(results)
    want = c.double() + tf32(a).double() @ tf32(b).double()
    scale = want.abs().max()
    assert (results[0] - want).abs().max() <= 1e-6 * scale
    assert (c.double() + a.double() @ b.double() - want).abs().max() > 1e-5 * scale  # the rounding shows


def test_emulator_wmma_loads_and_stores_whole_tiles(emu):
    tile = torch.randn(16, 16, generator=torch.Generator().manual_seed(62))
    assert torch.equal(emu.selftest_wmma("copy", tile, tile, tile), torch.cat([tile, tile], 1))
    # Warp 0 stores the tile to columns 0..15, then (after a barrier) warp 1 to columns 8..23.
    want = torch.cat([tile[:, :8], tile, torch.zeros(16, 8)], 1)
    assert torch.equal(emu.selftest_wmma("overlap_synced", tile, tile, tile), want)


def test_emulator_wmma_float_to_tf32_edge_values(emu):
    cases = [  # input bits, expected bits
        (0x3F801000, 0x3F802000),  # 1 + 2^-11, a tie: away from zero (to even would give 1)
        (0xBF801000, 0xBF802000),  # its negative: away from zero too
        (0x3F800FFF, 0x3F800000),  # just under the tie
        (0x3F803000, 0x3F804000),  # a tie whose upper neighbour is also the even one
        (0x3FFFF000, 0x40000000),  # a tie at the top of [1, 2): on into the next exponent, 2
        (0x3FFFFFFF, 0x40000000),  # 2 - 2^-23: 2
        (0x7F7FEFFF, 0x7F7FE000),  # rounds down to the largest TF32 value
        (0x7F7FF000, 0x7F800000),  # a tie above the largest TF32 value: Inf (no .satfinite)
        (0x7F7FFFFF, 0x7F800000),  # the largest float: Inf
        (0xFF7FFFFF, 0xFF800000),  # and its negative: -Inf
        (0x7F800000, 0x7F800000),  # Inf
        (0xFF800000, 0xFF800000),  # -Inf
        (0x00000000, 0x00000000),  # 0
        (0x80000000, 0x80000000),  # -0 keeps its sign
        (0x00000001, 0x00000000),  # the smallest subnormal: 0
        (0x80000FFF, 0x80000000),  # a negative subnormal under the tie: -0
        (0x00001000, 0x00002000),  # a subnormal tie: away from zero
        (0x007FF000, 0x00800000),  # the largest subnormals round up to the smallest normal
        (0x00800FFF, 0x00800000),  # the smallest normal, plus less than half
    ]
    x = from_bits([i for i, _ in cases])
    got = emu.selftest_wmma("to_tf32", x, x, x)
    assert got.view(torch.int32).tolist() == from_bits([o for _, o in cases]).view(torch.int32).tolist()
    assert torch.equal(tf32(x).view(torch.int32), got.view(torch.int32))  # the tests' rounding is the same
    # NaNs stay NaNs (a payload in the low 13 bits only must not become Inf), in TF32 form.
    nans = from_bits([0x7FC00000, 0x7F800001, 0xFF801FFF, 0xFFFFFFFF, 0x7FBFFFFF])
    got = emu.selftest_wmma("to_tf32", nans, nans, nans)
    assert got.isnan().all() and ((got.view(torch.int32) & 0x1FFF) == 0).all()
    # Every float bit pattern class: random bits, which cover all exponents, subnormals and NaNs.
    g = torch.Generator().manual_seed(64)
    x = torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    got = emu.selftest_wmma("to_tf32", x, x, x)
    finite = x.isfinite()
    assert torch.equal(got[finite].view(torch.int32), tf32(x)[finite].view(torch.int32))
    assert got[x.isnan()].isnan().all() and torch.equal(got[x.isinf()], x[x.isinf()])


@pytest.mark.parametrize("case,match", [
    ("misaligned", r"wmma::load_matrix_sync: the pointer 0x[0-9a-f]+ is not 32-byte \(256-bit\) aligned"),
    ("ldm", "ldm 10 is not a multiple of 4 floats"),
    ("lane_pointers", r"lanes 0 and \d+ of warp \d pass different pointers"),
    ("fragment_types", "pass different fragment types"),
    ("skipping_lanes", "wmma::load_matrix_sync reached by 16 of the 32 lanes of warp 0"),
    ("shuffle_and_wmma", r"wait at different warp-collective operations \(a warp shuffle, wmma::load_matrix_sync\)"),
    ("partial_warp", "needs a full warp of 32 lanes; the last warp of this 48-thread block has 16"),
    ("not_tf32", "wmma::mma_sync: element .* is not a TF32 value .* wmma::__float_to_tf32"),
])
def test_emulator_wmma_rejects_misuse(emu, case, match):
    # Each of these runs on a GPU, with wrong results or none.
    tile = torch.randn(16, 16, generator=torch.Generator().manual_seed(63))
    with pytest.raises(RuntimeError, match=match):
        emu.selftest_wmma(case, tile, tile, tile)


# The kernel tests of this module again in child processes, with the emulator library built
# - with AddressSanitizer: an out-of-bounds access of a kernel aborts;
# - with the race detector: two threads (or blocks) touching one word unordered, one of them writing,
#   fail the launch, including the lost updates no schedule shows.
from_the_plain_build = pytest.mark.skipif(cuda_emu.variant() != "plain", reason="runs in the plain build's process")
races_only = pytest.mark.skipif(not cuda_emu.races_wanted(), reason="only in the race detector's build")


# The kernel tests below, but for the schedule comparisons (five runs of each op; the plain build has them).
KERNEL_TESTS = "(roi_align or anchors or infonce) and not schedule_independent"


def run_child(args, env, timeout):
    return subprocess.run([sys.executable, *args], cwd=cuda_emu.ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def pytest_child(selection):
    # Triton's native library aborts at import under the preloaded AddressSanitizer runtime, and these
    # tests do not need it: the child hides it (insloc_ops then reports no Triton backend).
    return ["-c", "import sys; sys.modules['triton'] = None; import pytest; sys.exit(pytest.main(['-q', '-x', '-p', "
                  f"'no:cacheprovider', {__file__!r}, '-k', {selection!r}]))"]


@from_the_plain_build
def test_address_sanitizer_stops_an_out_of_bounds_read():
    code = "import sys; sys.path.insert(0, 'tests'); import cuda_emu; cuda_emu.load().selftest('read_past_end')"
    r = run_child(["-c", code], cuda_emu.asan_env(), timeout=900)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, r.stderr[-3000:]


@from_the_plain_build
def test_cuda_kernels_under_address_sanitizer():
    r = run_child(pytest_child(KERNEL_TESTS), cuda_emu.asan_env(), timeout=1800)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert " passed" in r.stdout and "ERROR: AddressSanitizer" not in r.stderr


@from_the_plain_build
def test_cuda_kernels_under_the_race_detector():
    env = {**os.environ, "INSLOC_EMU_RACES": "1"}
    r = run_child(pytest_child(f"({KERNEL_TESTS}) or race_detector_flags"), env, timeout=1800)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert " passed" in r.stdout and " skipped" not in r.stdout  # the self-test below ran too


@races_only
def test_race_detector_flags_racy_kernels_only():
    emu = cuda_emu.load()
    for case in ("reverse_unsynced", "two_rounds_unsynced", "race_in_round", "race_between_blocks", "lost_update"):
        with pytest.raises(RuntimeError, match="race on"):
            emu.selftest(case)
    for case in ("reverse", "two_rounds", "warp_sum", "dynamic_shared"):
        emu.selftest(case)
    assert emu.selftest("atomic_update")[0] == 256  # atomics are not races


@races_only
def test_race_detector_flags_racy_wmma_kernels_only():
    # WMMA loads and stores are recorded element by element, for the lane that holds the element.
    emu = cuda_emu.load()
    tile = torch.randn(16, 16, generator=torch.Generator().manual_seed(65))
    a, b, c = gemm_inputs(66)
    with pytest.raises(RuntimeError, match="race on global word"):
        emu.selftest_wmma("overlap", tile, tile, tile)  # two warps store overlapping tiles
    with pytest.raises(RuntimeError, match="race on shared word"):
        emu.selftest_wmma("gemm_unsynced", a, b, c)  # fragments loaded without a barrier after the staging
    for case in ("gemm", "gemm_b_row_major", "gemm_a_col_major"):
        emu.selftest_wmma(case, a, b, c)
    for case in ("copy", "overlap_synced"):
        emu.selftest_wmma(case, tile, tile, tile)


# ------------------------------------------------------------------------------------------------
# roi_align_multilevel (CUDA kernels: forward, atomic backward, deterministic backward)
# ------------------------------------------------------------------------------------------------


def emu_roi_align(emu, feats, rois, out_size, scales, sampling, aligned, levels, grad, deterministic):
    with poisoned_outputs():
        out = emu.roi_align_multilevel(feats, rois, levels, scales, out_size[0], out_size[1], sampling, aligned)
    torch.use_deterministic_algorithms(deterministic)
    try:
        gs = emu.roi_align_multilevel_backward(
            grad, rois, levels, scales, sampling, aligned, feats[0].shape[0], feats[0].shape[1],
            [f.shape[2] for f in feats], [f.shape[3] for f in feats],
            feats[0].is_contiguous(memory_format=torch.channels_last) and not feats[0].is_contiguous())
    finally:
        torch.use_deterministic_algorithms(False)
    return out, gs


# The CUDA file's two kernel families: the per-sample loop (the default) and the separable kernels.
KERNELS = ["sample", "separable"]


def separable_notes(emu):
    """How many times each separable RoIAlign kernel has been launched (host code's INSLOC_EMU_NOTE)."""
    return [emu.notes(f"roi_align: separable {k}") for k in ("forward", "backward", "deterministic backward")]


def use_kernels(monkeypatch, kernels):
    monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_FORWARD", kernels)
    monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_BACKWARD", kernels)


def check_roi_align(emu, dtype, channels_last, mode, aligned, sampling, seed):
    feats, rois, scales = roi_tests.problem("cuda", dtype, channels_last, seed=seed, R=37, C=19, B=3)
    levels = None if mode == "all" else torch.randint(0, 3, (37,), generator=torch.Generator().manual_seed(seed))
    ref32 = [f.float() if dtype in (torch.float16, torch.bfloat16) else f for f in feats]
    ref = reference.roi_align_multilevel(ref32, rois, (7, 6), scales, sampling, aligned, levels)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=ref.dtype)
    _, gr = roi_tests.grads("reference", ref32, rois, (7, 6), scales, sampling, aligned, levels, g.to(dtype).to(ref.dtype))
    tol = roi_tests.tol(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for deterministic in (False, True):
        out, gs = emu_roi_align(emu, feats, rois, (7, 6), scales, sampling, aligned, levels, g.to(dtype), deterministic)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.to(ref.dtype), ref, **tol)
        for a, b in zip(gs, gr):
            assert a.dtype == dtype and a.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(a.to(b.dtype), b, **tol)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_roi_align_dtypes_layouts_modes(emu, dtype, channels_last, mode, kernels, monkeypatch):
    use_kernels(monkeypatch, kernels)
    before = separable_notes(emu)
    check_roi_align(emu, dtype, channels_last, mode, True, 0, seed=31)
    # The separable kernels ran exactly when asked for: the forward in both of check_roi_align's rounds, the
    # backward in the first, the deterministic backward in the second.
    assert [n - b for n, b in zip(separable_notes(emu), before)] == ([2, 1, 1] if kernels == "separable" else [0] * 3)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("aligned,sampling", [(False, 2), (False, 0), (True, 3)])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_roi_align_sampling_and_alignment(emu, aligned, sampling, mode, kernels, monkeypatch):
    use_kernels(monkeypatch, kernels)
    check_roi_align(emu, torch.float32, False, mode, aligned, sampling, seed=32)


@pytest.mark.parametrize("sms", [1, 16, 1000])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_separable_channel_chunks(emu, sms, channels_last, monkeypatch):
    """The separable kernels' blocks take a chunk of the 19 channels (NCHW; channels_last blocks always take
    32): with one SM 32 (all of them); with 16, 1 for 37 RoIs by level and 4 for 3 levels x 37 RoIs (the last
    chunk holding 3); with 1000, 1. The deterministic backward's chunks are 16 or 32 (its minimum): with 16
    and 1000 SMs a chunk of 16 and one of 3."""
    use_kernels(monkeypatch, "separable")
    with sm_count(sms, monkeypatch):
        check_roi_align(emu, torch.float32, channels_last, "levels", False, 0, seed=37)
        check_roi_align(emu, torch.bfloat16, channels_last, "all", True, 2, seed=38)


def test_roi_align_separable_many_bins_per_pixel(emu, monkeypatch):
    """Output grids far finer than the map (bins under a pixel: a row is in many bins' spans) and coarser
    (one bin spans the map), against the reference."""
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, False, seed=39, R=17, C=5, B=2)
    for size in [(23, 17), (1, 2)]:
        ref = reference.roi_align_multilevel(feats, rois, size, scales, 0, True)
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(40))
        _, gr = roi_tests.grads("reference", feats, rois, size, scales, 0, True, None, g)
        use_kernels(monkeypatch, "separable")
        out, gs = emu_roi_align(emu, feats, rois, size, scales, 0, True, None, g, False)
        torch.testing.assert_close(out, ref, **roi_tests.tol(torch.float32))
        for a, b in zip(gs, gr):
            torch.testing.assert_close(a, b, **roi_tests.tol(torch.float32))


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_separable_deterministic_bands(emu, channels_last, monkeypatch):
    """The deterministic separable backward splits each level into bands of 32 rows, one block per band:
    levels of 80 and 40 rows (3 and 2 bands), RoIs across the bands' edges, overlapping on one image; against
    the reference and bitwise repeatable."""
    gen = torch.Generator().manual_seed(42)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.randn(2, 5, 80, 24, generator=gen).contiguous(memory_format=fmt),
             torch.randn(2, 5, 40, 12, generator=gen).contiguous(memory_format=fmt)]
    scales = [1 / 2, 1 / 4]
    xy = torch.rand(60, 4, generator=gen) * torch.tensor([48.0, 160.0, 48.0, 160.0]) - 4
    rois = torch.cat([torch.randint(0, 2, (60, 1), generator=gen).float(), torch.minimum(xy[:, :2], xy[:, 2:]),
                      torch.maximum(xy[:, :2], xy[:, 2:])], 1)
    rois[:20, 0] = 1
    use_kernels(monkeypatch, "separable")
    for levels in (None, torch.randint(0, 2, (60,), generator=gen)):
        ref = reference.roi_align_multilevel(feats, rois, (5, 4), scales, 0, True, levels)
        g = torch.randn(ref.shape, generator=gen)
        _, gr = roi_tests.grads("reference", feats, rois, (5, 4), scales, 0, True, levels, g)
        before = separable_notes(emu)[2]
        runs = under_schedules(monkeypatch, lambda: emu_roi_align(emu, feats, rois, (5, 4), scales, 0, True,
                                                                  levels, g, True)[1])
        assert separable_notes(emu)[2] - before == len(SCHEDULES)
        # Chunks of 32 channels on channels_last, else of at least 16 (C = 5: one chunk), not fewer to fill
        # the emulator's 4 SMs: a block rebuilds the tables of every RoI meeting its band.
        assert emu.value("roi_align: separable deterministic chunk") == (32 if channels_last else 16)
        assert_all_equal(runs)  # bitwise, whatever order threads and blocks run in
        for a, r in zip(runs[0], gr):
            torch.testing.assert_close(a, r, **roi_tests.tol(torch.float32))


def test_roi_align_separable_falls_back_past_its_shared_memory(emu, monkeypatch):
    """Tables for a 16 x 16 grid over a 700 x 900 level need 113 KiB, over the 48 KiB the separable kernels
    use: the per-sample kernels run instead (bitwise their results), still correct."""
    gen = torch.Generator().manual_seed(41)
    feats = [torch.randn(1, 2, 700, 900, generator=gen)]
    rois = torch.tensor([[0.0, 10.0, 20.0, 40.0, 35.0], [0.0, 600.0, 500.0, 899.0, 699.0]])
    g = torch.randn(1, 2, 2, 16, 16, generator=gen)
    results = {}
    before = separable_notes(emu)
    for kernels in KERNELS:
        use_kernels(monkeypatch, kernels)
        results[kernels] = emu_roi_align(emu, feats, rois, (16, 16), [1.0], 0, True, None, g, False)
    assert separable_notes(emu) == before  # no separable kernel ran
    ref = reference.roi_align_multilevel(feats, rois, (16, 16), [1.0], 0, True)
    torch.testing.assert_close(results["separable"][0], ref, **roi_tests.tol(torch.float32))
    assert torch.equal(results["separable"][0], results["sample"][0])
    assert torch.equal(results["separable"][1][0], results["sample"][1][0])


@pytest.mark.parametrize("variable", ["INSLOC_OPS_CUDA_ROI_FORWARD", "INSLOC_OPS_CUDA_ROI_BACKWARD"])
def test_roi_align_kernel_choice_must_be_valid(emu, variable, monkeypatch):
    monkeypatch.setenv(variable, "atomic")
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, False, seed=35, R=5, C=4, B=2)
    g = torch.zeros(3, 5, 4, 2, 2)
    with pytest.raises(RuntimeError, match=f"{variable} must be 'sample' or 'separable', got 'atomic'"):
        emu_roi_align(emu, feats, rois, (2, 2), scales, 0, True, None, g, False)


@pytest.mark.parametrize("channels", ["1", "3", "8"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_channels_per_thread(emu, channels, channels_last, monkeypatch):
    """INSLOC_OPS_CUDA_ROI_CHANNELS: NCHW threads that each take 1, 3 or 8 of the 19 channels (the last slot
    of a RoI then holds fewer), forward and atomic backward; channels_last keeps one per thread."""
    monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_CHANNELS", channels)
    check_roi_align(emu, torch.float32, channels_last, "levels", True, 0, seed=33)
    check_roi_align(emu, torch.bfloat16, channels_last, "all", False, 2, seed=34)


@pytest.mark.parametrize("channels", ["3", "8", "separable"])
def test_roi_align_mixed_layouts_with_channels_per_thread(emu, channels, monkeypatch):
    """Levels of both layouts in one call (NCHW first, so threads take several channels): each level's
    channel stride is its own (H x W for NCHW, 1 for channels_last). "separable": the separable forward."""
    if channels == "separable":
        use_kernels(monkeypatch, "separable")
    else:
        monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_CHANNELS", channels)
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, False, seed=36, R=23, C=11, B=2)
    feats = [f if i % 2 == 0 else f.contiguous(memory_format=torch.channels_last) for i, f in enumerate(feats)]
    levels = torch.randint(0, len(feats), (23,), generator=torch.Generator().manual_seed(36))
    for lv in (None, levels):
        with poisoned_outputs():
            out = emu.roi_align_multilevel(feats, rois, lv, scales, 7, 6, 0, True)
        ref = reference.roi_align_multilevel([f.contiguous() for f in feats], rois, (7, 6), scales, 0, True, lv)
        torch.testing.assert_close(out, ref, **roi_tests.tol(torch.float32))


@pytest.mark.parametrize("value", ["0", "9", "4x"])
def test_roi_align_channels_per_thread_must_be_valid(emu, value, monkeypatch):
    monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_CHANNELS", value)
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, False, seed=35, R=5, C=4, B=2)
    with pytest.raises(RuntimeError, match="INSLOC_OPS_CUDA_ROI_CHANNELS must be an integer in \\[1, 8\\]"):
        emu.roi_align_multilevel(feats, rois, None, scales, 7, 7, 0, True)


@pytest.mark.parametrize("kernels", KERNELS)
def test_roi_align_matches_torchvision(emu, kernels, monkeypatch):
    use_kernels(monkeypatch, kernels)
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, seed=22, R=50, C=8)
    rois = roi_tests.well_formed(rois)
    for aligned in (True, False):
        out = emu.roi_align_multilevel(feats, rois, None, scales, 7, 7, 0, aligned)
        for lvl, (f, s) in enumerate(zip(feats, scales)):
            torch.testing.assert_close(out[lvl], torchvision.ops.roi_align(f, rois, (7, 7), s, 0, aligned),
                                       **roi_tests.tol(torch.float32))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_deterministic_backward_is_bitwise_repeatable(emu, channels_last, kernels, monkeypatch):
    use_kernels(monkeypatch, kernels)
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, channels_last, seed=23, R=120, C=8)
    rois[:, 0] = 1  # many overlapping RoIs on one image
    ref = reference.roi_align_multilevel(feats, rois, (7, 7), scales, 0, True)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    _, gr = roi_tests.grads("reference", feats, rois, (7, 7), scales, 0, True, None, g)
    _, ga = emu_roi_align(emu, feats, rois, (7, 7), scales, 0, True, None, g, deterministic=True)
    _, gb = emu_roi_align(emu, feats, rois, (7, 7), scales, 0, True, None, g, deterministic=True)
    for a, b, r in zip(ga, gb, gr):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, **roi_tests.tol(torch.float32))


@pytest.mark.parametrize("channels", ["1", "8", "separable"])
def test_roi_align_zeroes_out_of_range_batch_and_level(emu, channels, monkeypatch):
    # Ordinary boxes that pool non-zero values with valid indices, then one bad batch or level index each:
    # those rows pool zeros and add no gradient (atomic and deterministic backward), the others are unchanged.
    # With 8 channels per thread the 3 channels fill part of one slot; "separable": the separable kernels.
    if channels == "separable":
        use_kernels(monkeypatch, "separable")
    else:
        monkeypatch.setenv("INSLOC_OPS_CUDA_ROI_CHANNELS", channels)
    feats, scales, valid, bad = roi_tests.out_of_range_case("cuda", seed=24)
    sizes = [h for h, _ in roi_tests.SIZES_CPU], [w for _, w in roi_tests.SIZES_CPU]

    def fwd(rois, levels):
        with poisoned_outputs():
            return emu.roi_align_multilevel(feats, rois, levels, scales, 2, 2, 0, True)

    def bwd(deterministic):
        def run(g, rois, levels):
            torch.use_deterministic_algorithms(deterministic)
            try:
                return emu.roi_align_multilevel_backward(g, rois, levels, scales, 0, True, 2, 3, *sizes, False)
            finally:
                torch.use_deterministic_algorithms(False)
        return run

    roi_tests.check_zeroes_out_of_range(fwd, [bwd(False), bwd(True)], valid, bad)


@pytest.mark.parametrize("kernels", KERNELS)
def test_roi_align_level_index_past_the_last_of_eight_levels(emu, kernels, monkeypatch):
    """With MAX_LEVELS (8) levels the level table is full: RoIs assigned level 8 or -1 pool zeros and add no
    gradient, the others pool as the reference. (An off-by-one in the level check would read the table's next
    fields as level 8's, which here happen to give no samples, so this does not catch that.)"""
    use_kernels(monkeypatch, kernels)
    gen = torch.Generator().manual_seed(43)
    feats = [torch.randn(1, 2, 6, 7, generator=gen) for _ in range(8)]
    scales = [1.0] * 8
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 4.0]] * 4)
    levels = torch.tensor([7, 8, -1, 0])
    g = torch.randn(4, 2, 2, 2, generator=gen)
    for deterministic in (False, True):
        out, gs = emu_roi_align(emu, feats, rois, (2, 2), scales, 0, True, levels, g, deterministic)
        assert out[0].abs().sum() > 0 and out[3].abs().sum() > 0
        assert torch.equal(out[1:3], torch.zeros_like(out[1:3]))
        ref = reference.roi_align_multilevel(feats, rois[[0, 3]], (2, 2), scales, 0, True, levels[[0, 3]])
        torch.testing.assert_close(out[[0, 3]], ref, **roi_tests.tol(torch.float32))
        touched = [gr.abs().sum() > 0 for gr in gs]
        assert touched == [True] + [False] * 6 + [True]


@pytest.mark.parametrize("kernels", KERNELS)
def test_roi_align_empty_and_huge_boxes(emu, kernels, monkeypatch):
    use_kernels(monkeypatch, kernels)
    feats, rois, scales = roi_tests.problem("cuda", seed=25, R=6)
    assert emu.roi_align_multilevel(feats, rois[:0], None, scales, 3, 3, 0, True).shape == (3, 0, 3, 3, 3)
    giant = torch.tensor([[0.0, -1e7, -1e7, 1e7, 1e7]])  # grid clamps to 65536 per axis
    torch.testing.assert_close(emu.roi_align_multilevel(feats, giant, None, scales, 2, 2, 0, True),
                               reference.roi_align_multilevel(feats, giant, (2, 2), scales, 0, True))


# ------------------------------------------------------------------------------------------------
# sample_anchor_boxes: the CUDA kernel picks exactly the CPU kernel's anchors (same counter-based keys)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["insloc", "detection", "odd_sizes"])
def test_anchors_match_the_cpu_kernel(emu, case, monkeypatch):
    g = torch.Generator().manual_seed(41)
    if case == "insloc":
        gt, anchors = anchor_tests.insloc_inputs(32, g)
    elif case == "detection":
        gt, anchors = anchor_tests.detection_inputs(13, g, strides=(16, 32, 64))
    else:  # N not a multiple of the block's box group, A not a multiple of a block, float16 and float64 input
        gt, anchors = anchor_tests.detection_inputs(7, g, strides=(32, 64, 128), dtype=torch.float16)
        anchors = anchors[:-3].double()
    for sms in (1, 5):  # how the anchors are split into block ranges
        with sm_count(sms, monkeypatch):
            for seed in (0, 2**63 - 1, -7):
                want = torch.ops.insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, seed)
                with poisoned_outputs():
                    index, iou = emu.sample_anchor_boxes(gt, anchors, 0.5, seed)
                assert torch.equal(index, want[0]) and torch.equal(iou, want[1])


def test_anchors_fallback_ties_and_empty(emu, monkeypatch):
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    far = torch.tensor([[500.0, 500.0, 510.0, 510.0]]).repeat(3000, 1)
    anchors = torch.cat([far[:1], torch.tensor([[5.0, 0.0, 15.0, 10.0]]), far,
                         torch.tensor([[-5.0, 0.0, 5.0, 10.0]]), far, torch.tensor([[0.0, 5.0, 10.0, 15.0]])])
    with sm_count(3, monkeypatch):  # the tied anchors land in different blocks
        index, iou = emu.sample_anchor_boxes(gt, anchors, 0.5, 3)
    assert index.tolist() == [1, 0]  # box 0: lowest index among the ties; box 1: argmax 0 (all IoU 0)
    assert torch.equal(index, torch.ops.insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, 3)[0])
    index, iou = emu.sample_anchor_boxes(torch.zeros(0, 4), torch.ones(5, 4), 0.5, 1)
    assert index.shape == (0,) and iou.shape == (0,)


# ------------------------------------------------------------------------------------------------
# queue_infonce (CUDA kernels: split-K partial LSEs, combine, backward partials and finish)
# ------------------------------------------------------------------------------------------------


def emu_infonce_backward(emu, deterministic, *args):
    """The backward in either mode: deterministic (per-split partials; outputs poisoned first) or the
    default (atomics into one buffer; poisoning needs deterministic mode, so the outputs start as they are)."""
    if deterministic:
        with poisoned_outputs():
            return emu.queue_infonce_backward(*args)
    return emu.queue_infonce_backward(*args)


def check_infonce(emu, G, N, K, D, dtype=torch.float32, queue_dtype=None, temperature=0.2, seed=0,
                  deterministic=True):
    q, k, queue = infonce_tests.make_inputs(G, N, K, D, dtype, queue_dtype, seed=seed)
    with poisoned_outputs():
        loss, lse = emu.queue_infonce(q, k, queue, temperature)
    want_loss = infonce_tests.cross_entropy_oracle(q, k, queue, temperature)
    # 16-bit inputs: fp32 accuracy for the loss and lse, a loose bound for the 16-bit gradients.
    loss_tol, tol = infonce_tests.loss_tolerances(q, queue), infonce_tests.tolerances(q, queue)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == lse.dtype == acc and loss.shape == (G, N)
    torch.testing.assert_close(loss, want_loss.to(acc), **loss_tol)
    # Gradients against autograd through the reference.
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref, want_lse = reference.queue_infonce(q2, k2, queue, temperature)
    torch.testing.assert_close(lse, want_lse.detach(), **loss_tol)
    g = torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(ref)
    (ref * g).sum().backward()
    dq, dk = emu_infonce_backward(emu, deterministic, g.to(acc), q, k, queue, lse, temperature)
    assert dq.dtype == dk.dtype == dtype
    torch.testing.assert_close(dq, q2.grad, **tol)
    torch.testing.assert_close(dk, k2.grad, **tol)


@contextlib.contextmanager
def tensor_cores(on, monkeypatch):
    """INSLOC_OPS_CUDA_INFONCE_TC: "1" (the default) runs the WMMA kernels where D % 16 == 0, "0" never.
    on == "pipelined": the WMMA kernels with INSLOC_OPS_CUDA_INFONCE_PIPELINE=1 (register-prefetched tiles)."""
    with monkeypatch.context() as m:
        m.setenv("INSLOC_OPS_CUDA_INFONCE_TC", "1" if on else "0")
        m.setenv("INSLOC_OPS_CUDA_INFONCE_PIPELINE", "1" if on == "pipelined" else "0")
        yield


TC_MODES = dict(argvalues=[True, "pipelined", False], ids=["tc", "tc-pipelined", "cudacores"])


# D = 0, 8, 24: CUDA cores whatever the setting; 16, 48, 128: tensor cores unless switched off.
@pytest.mark.parametrize("shape", [(1, 1, 5, 8), (2, 19, 300, 24), (4, 33, 1000, 128), (1, 3, 0, 8),
                                   (1, 40, 130, 16), (2, 17, 333, 48), (1, 3, 0, 16), (2, 3, 7, 0)])
@pytest.mark.parametrize("temperature", [0.07, 0.2])
@pytest.mark.parametrize("tc", **TC_MODES)
def test_infonce_matches_the_oracles(emu, shape, temperature, tc, monkeypatch):
    with tensor_cores(tc, monkeypatch):
        check_infonce(emu, *shape, temperature=temperature)


@pytest.mark.parametrize("case", ["all", "first"])
@pytest.mark.parametrize("tc", **TC_MODES)
def test_infonce_negatives_that_overflow_to_minus_inf_add_nothing(emu, case, tc, monkeypatch):
    # One -inf logit first in a lane's stream made its partial log-sum-exp NaN (lse_add of -inf to the empty
    # (-inf, 0)), and with it the row's loss; it adds exp(-inf) = 0.
    q, k, queue = infonce_tests.overflow_inputs(case)
    with tensor_cores(tc, monkeypatch), poisoned_outputs():
        loss, lse = emu.queue_infonce(q, k, queue, 0.2)
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    want, _ = reference.queue_infonce(q2, k2, queue.double(), 0.2)
    torch.testing.assert_close(loss, want.detach().float(), rtol=1e-5, atol=1e-5)
    g = torch.rand(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (want * g).sum().backward()
    with tensor_cores(tc, monkeypatch):
        dq, dk = emu_infonce_backward(emu, True, g.float(), q, k, queue, lse, 0.2)
    torch.testing.assert_close(dq, q2.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk, k2.grad.float(), rtol=1e-4, atol=1e-5)


def infonce_run(emu, q, k, queue, temperature, g):
    loss, lse = emu.queue_infonce(q, k, queue, temperature)
    with poisoned_outputs():  # deterministic backward: bitwise repeatable
        return (loss, lse, *emu.queue_infonce_backward(g, q, k, queue, lse, temperature))


@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16])
def test_infonce_tensor_cores_reach_fp32_accuracy(emu, queue_dtype, monkeypatch):
    # TF32x3 (hi.hi + hi.lo + lo.hi): errors against fp64 of the size of the fp32 path's. Plain TF32 (the
    # low parts dropped) is off by about 1e-4 in the loss here, so these bounds catch a lost term.
    q, k, queue = infonce_tests.make_inputs(2, 20, 700, 128, queue_dtype=queue_dtype, seed=61)
    g = torch.rand(2, 20, generator=torch.Generator().manual_seed(62))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    exact, _ = reference.queue_infonce(q64, k64, queue.double(), 0.07)
    exact_dq, exact_dk = torch.autograd.grad((exact * g.double()).sum(), (q64, k64))
    for tc in (True, False):
        with tensor_cores(tc, monkeypatch):
            loss, _, dq, dk = infonce_run(emu, q, k, queue, 0.07, g)
        torch.testing.assert_close(loss.double(), exact.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(dq.double(), exact_dq, rtol=0, atol=1e-5)
        torch.testing.assert_close(dk.double(), exact_dk, rtol=0, atol=1e-5)


def test_infonce_tensor_core_selection(emu, monkeypatch):
    # Which kernels ran shows in the bits: each version gives the same bits whenever it runs, and the two
    # versions do not give the same bits.
    q, k, queue = infonce_tests.make_inputs(2, 9, 300, 32, seed=63)
    g = torch.rand(2, 9, generator=torch.Generator().manual_seed(64))
    with tensor_cores(False, monkeypatch):
        cores = infonce_run(emu, q, k, queue, 0.2, g)
    with tensor_cores(True, monkeypatch):
        tc = infonce_run(emu, q, k, queue, 0.2, g)
    assert not torch.equal(cores[0], tc[0]) and not torch.equal(cores[2], tc[2])
    assert_all_equal([cores, tc], rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("INSLOC_OPS_CUDA_INFONCE_TC", raising=False)  # unset: tensor cores where they run
    assert_all_equal([tc, infonce_run(emu, q, k, queue, 0.2, g)])
    monkeypatch.setenv("INSLOC_EMU_CC_MAJOR", "7")  # a Turing GPU: no TF32 WMMA
    assert_all_equal([cores, infonce_run(emu, q, k, queue, 0.2, g)])
    monkeypatch.delenv("INSLOC_EMU_CC_MAJOR")
    q64, k64, queue64 = q.double(), k.double(), queue.double()  # fp64: CUDA cores
    with tensor_cores(True, monkeypatch):
        on = infonce_run(emu, q64, k64, queue64, 0.2, g.double())
    with tensor_cores(False, monkeypatch):
        assert_all_equal([on, infonce_run(emu, q64, k64, queue64, 0.2, g.double())])
    q, k, queue = infonce_tests.make_inputs(2, 9, 300, 40, seed=65)  # D % 16 != 0: CUDA cores
    with tensor_cores(True, monkeypatch):
        on = infonce_run(emu, q, k, queue, 0.2, g)
    with tensor_cores(False, monkeypatch):
        assert_all_equal([on, infonce_run(emu, q, k, queue, 0.2, g)])
    monkeypatch.setenv("INSLOC_OPS_CUDA_INFONCE_TC", "yes")
    with pytest.raises(RuntimeError, match="INSLOC_OPS_CUDA_INFONCE_TC must be 0 or 1"):
        emu.queue_infonce(q, k, queue, 0.2)


@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_infonce_tensor_cores_read_a_queue_at_any_address(emu, queue_dtype, monkeypatch):
    # The tensor-core kernels read the queue in 16-byte chunks where its address allows (a GPU faults on a
    # misaligned one, and so does the emulator), element by element where it does not: here a view that
    # starts one element into its storage. Both give the same tiles, hence the same bits.
    q, k, queue = infonce_tests.make_inputs(2, 9, 300, 32, queue_dtype=queue_dtype, seed=66)
    shifted = torch.empty(queue.numel() + 1, dtype=queue.dtype)[1:].view(queue.shape).copy_(queue)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    g = torch.rand(2, 9, generator=torch.Generator().manual_seed(67))
    with tensor_cores(True, monkeypatch):
        before = emu.vector_accesses()
        aligned = infonce_run(emu, q, k, queue, 0.2, g)
        middle = emu.vector_accesses()
        assert_all_equal([aligned, infonce_run(emu, q, k, shifted, 0.2, g)])
    assert middle > before and emu.vector_accesses() == middle  # 16-byte chunks, then element by element


@pytest.mark.parametrize("queue_dtype,D", [(torch.float32, 32), (torch.float32, 128), (torch.float32, 144),
                                           (torch.bfloat16, 256), (torch.bfloat16, 272)])
def test_infonce_pipelined_tiles_give_the_same_bits(emu, queue_dtype, D, monkeypatch):
    """The pipelined tensor-core kernels load each tile earlier, into registers, and store the same values
    to the same places: the same products in the same order, so bitwise the unpipelined results (deterministic
    backward). fp32 D = 144 and bf16 D = 272 need more than 16 chunks a thread: those run unpipelined."""
    # 2100 keys: 33 tiles; with 3 SMs the forward's 3 splits take 11 tiles each and the deterministic backward's
    # 16 splits 2 or 3, so the prefetch of a next tile runs in both.
    q, k, queue = infonce_tests.make_inputs(2, 9, 2100, D, queue_dtype=queue_dtype, seed=68)
    g = torch.rand(2, 9, generator=torch.Generator().manual_seed(69))
    label = "queue_infonce: pipelined tiles"
    with sm_count(3, monkeypatch):
        with tensor_cores(True, monkeypatch):
            plain = infonce_run(emu, q, k, queue, 0.2, g)
        before = emu.notes(label)
        with tensor_cores("pipelined", monkeypatch):
            assert_all_equal([plain, infonce_run(emu, q, k, queue, 0.2, g)])
    fits = D * queue.element_size() <= 512  # 16 chunks of 16 bytes a thread, 2 threads a row
    assert emu.notes(label) - before == (2 if fits else 0)  # forward and backward, or neither
    for d, tc in ((D, True), (24, False)):  # an invalid setting is an error on either kernel family
        q2, k2, queue2 = infonce_tests.make_inputs(1, 3, 70, d, seed=70)
        with tensor_cores(tc, monkeypatch):
            monkeypatch.setenv("INSLOC_OPS_CUDA_INFONCE_PIPELINE", "2")
            with pytest.raises(RuntimeError, match="INSLOC_OPS_CUDA_INFONCE_PIPELINE must be 0 or 1, got '2'"):
                emu.queue_infonce(q2, k2, queue2, 0.2)


def k_splits(K, tile, max_splits):
    """The split count the host code's rule gives (csrc/common/infonce.h split_k): K's tiles in at most
    ``max_splits`` equal runs of whole tiles."""
    tiles = max(1, -(-K // tile))
    per = -(-tiles // max(1, min(tiles, max_splits)))
    return -(-tiles // per)


def splits_to_fill(sms, G, N, per_sm=4):
    """K splits for about ``per_sm`` blocks an SM over G x ceil(N / 16) row blocks (infonce.cu)."""
    return max(1, -(-(per_sm * sms) // (G * -(-N // 16))))


@pytest.mark.parametrize("D,queue_dtype,mode,fewer", [
    (128, None, True, False), (144, None, True, False), (128, None, "pipelined", False),
    (144, torch.bfloat16, "pipelined", True)])
def test_infonce_backward_grid_follows_its_occupancy(emu, D, queue_dtype, mode, fewer, monkeypatch):
    """The pipelined tensor-core backward sizes its default (atomic) grid for the blocks an SM holds of it, at
    most 4: here the emulator's occupancy, by shared memory (D = 128: 55 KiB a block, 4 an SM; D = 144: 61 KiB,
    3); on a GPU its registers allow 3. The default tensor-core backward keeps the grid for 4 blocks an SM it was
    measured with on a GPU, whatever D (fp32 D = 144 is not pipelined: over 16 chunks a thread). Values against
    the reference, and the split count launched (3 SMs, 1 row block: 6 splits for 4 blocks an SM, 4 of 3 tiles
    each for 3)."""
    label = "queue_infonce: grid for fewer blocks an SM"
    before = emu.notes(label)
    with sm_count(3, monkeypatch), tensor_cores(mode, monkeypatch):
        check_infonce(emu, 2, 9, 700, D, queue_dtype=queue_dtype, seed=D, deterministic=False)
    assert (emu.notes(label) > before) == fewer
    assert emu.value("queue_infonce: forward splits") == k_splits(700, 64, splits_to_fill(3, 2, 9)) == 6
    want = k_splits(700, 64, splits_to_fill(3, 2, 9, 3 if fewer else 4))
    assert emu.value("queue_infonce: backward splits") == want == (4 if fewer else 6)


@pytest.mark.parametrize("tc", **TC_MODES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sms", [1, 3, 132])
def test_infonce_split_counts(emu, sms, deterministic, tc, monkeypatch):
    # The number of K splits of the forward and the default backward follows the SM count; 132 (an H100)
    # gives one tile per split. The deterministic backward takes at most 16 splits whatever the SM count.
    with sm_count(sms, monkeypatch), tensor_cores(tc, monkeypatch):
        check_infonce(emu, 2, 17, 777, 16, seed=sms, deterministic=deterministic)
    tile = 64 if tc else 32  # D = 16: the tensor-core kernels' tiles are 64 rows, the others' 32
    fill = k_splits(777, tile, splits_to_fill(sms, 2, 17))
    assert emu.value("queue_infonce: forward splits") == fill
    assert emu.value("queue_infonce: backward splits") == (k_splits(777, tile, 16) if deterministic else fill)
    if sms == 132:
        assert fill == -(-777 // tile)  # one tile a split


@pytest.mark.parametrize("tc", **TC_MODES)
@pytest.mark.parametrize("dtype,queue_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, None),
    (torch.float16, None), (torch.float64, None), (torch.float32, torch.float64)])
def test_infonce_dtypes(emu, dtype, queue_dtype, tc, monkeypatch):
    with tensor_cores(tc, monkeypatch):
        check_infonce(emu, 2, 9, 200, 32, dtype, queue_dtype, seed=3)


@pytest.mark.parametrize("D", [300, 304])
def test_infonce_feature_dim_over_48k_of_shared_memory(emu, D):
    # D = 300 (CUDA cores): the forward tile needs 57 KiB and the backward 77 KiB of dynamic shared memory;
    # D = 304 (tensor cores): 101 and 120 KiB. A launch may use over 48 KiB only after
    # cudaFuncSetAttribute; the emulator checks that it was called.
    check_infonce(emu, 1, 5, 100, D, seed=4)


@pytest.mark.parametrize("dtype, D", [(torch.float64, 120), (torch.float64, 90), (torch.float32, 186),
                                      (torch.float32, 250)])
def test_infonce_feature_dims_just_under_48k_of_dynamic_shared_memory(emu, dtype, D):
    # Without the opt-in a block gets 48 KiB of static plus dynamic shared memory together. These D put the
    # CUDA-core kernels' tiles just under 48 KiB; the kernels' small reduction arrays, once static
    # __shared__, took the total over it with no opt-in (fp64 D = 120 forward, 90 backward; fp32 D = 250
    # forward, 186 backward). They now live in the dynamic buffer, whose size the emulator checks.
    check_infonce(emu, 1, 5, 100, D, dtype, seed=4)


def test_kernels_with_dynamic_shared_memory_declare_no_static_shared_memory():
    # allow_shared and the emulator count dynamic bytes only: a static __shared__ array next to a dynamic
    # buffer would make the driver's 48 KiB check fail where neither sees it.
    cu_files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "*.cu")))
    kernels = 0
    for path in cu_files:
        with open(path) as f:
            source = f.read()
        for match in re.finditer(r"__global__[^{;]*\{", source):
            kernels += 1
            depth, i = 1, match.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(source[i], 0)
                i += 1
            body = source[match.end():i]
            if "INSLOC_DYNAMIC_SHARED" in body:
                line = source.count("\n", 0, match.start()) + 1
                assert "__shared__" not in body, f"{os.path.basename(path)}:{line}: static and dynamic shared memory"
    assert len(cu_files) == 3 and kernels >= 10


def test_infonce_empty_batch(emu):
    q, k, queue = infonce_tests.make_inputs(2, 0, 50, 8)
    loss, lse = emu.queue_infonce(q, k, queue, 0.2)
    assert loss.shape == lse.shape == (2, 0)
    dq, dk = emu.queue_infonce_backward(loss, q, k, queue, lse, 0.2)
    assert dq.shape == dk.shape == (2, 0, 8)


def blocked_notes(emu):
    return [emu.notes(f"queue_infonce: {p} blocked") for p in ("forward", "backward")]


@pytest.mark.parametrize("dtype, D, K, blocked", [
    (torch.float32, 896, 70, []), (torch.float32, 1024, 70, ["backward"]),
    (torch.float32, 1200, 4000, ["forward", "backward"]), (torch.float64, 512, 70, ["backward"])])
@pytest.mark.parametrize("deterministic", [True, False])
def test_infonce_feature_dims_past_shared_memory_take_the_blocked_path(emu, dtype, D, K, blocked, deterministic):
    # The CUDA-core kernels hold rows of D in shared memory (227 KiB a block here, as on an H100): fp32 fits
    # D <= 1199 forward and <= 899 backward, fp64 593 and 445; past that the partials come from matmuls over
    # chunks of the queue (D = 1200, K = 4000: 3 chunks). D = 1024 was a RuntimeError in the backward, after a
    # forward that had worked. (Tensor cores on, the default: they fit only below these D.)
    before = blocked_notes(emu)
    check_infonce(emu, 2, 5, K, D, dtype, seed=5, deterministic=deterministic)
    ran = [a - b for a, b in zip(blocked_notes(emu), before)]
    assert ran == [int(p in blocked) for p in ("forward", "backward")]
    if "forward" in blocked:  # one running partial per row, however many chunks: memory does not grow with K
        assert emu.value("queue_infonce: forward splits") == 1


def test_infonce_blocked_path_ignores_autocast_and_merges_inf_across_chunks(emu):
    # Its matmuls run in fp32 under an autocast region too (they went through autocast: bf16 products); two +inf
    # logits in different chunks give +inf, as in one chunk and as the reference (not exp(inf - inf) = NaN).
    q, k, queue = infonce_tests.make_inputs(1, 3, 5000, 1200, seed=8)  # 3 chunks of the queue
    loss, lse = emu.queue_infonce(q, k, queue, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_loss, auto_lse = emu.queue_infonce(q, k, queue, 0.2)
    assert torch.equal(auto_loss, loss) and torch.equal(auto_lse, lse)
    g = torch.ones_like(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_grads = emu.queue_infonce_backward(g, q, k, queue, lse, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(auto_grads, emu.queue_infonce_backward(g, q, k, queue, lse, 0.2)))
    queue[0, 10, 0] = queue[0, 4900, 0] = float("inf")  # q[..., 0] > 0 in row 0 of make_inputs? checked below
    inf_rows = q[0, :, 0] > 0
    loss, _ = emu.queue_infonce(q, k, queue, 0.2)
    want, _ = reference.queue_infonce(q, k, queue, 0.2)
    assert inf_rows.any() and torch.equal(loss[0, inf_rows], want[0, inf_rows])
    assert (loss[0, inf_rows] == float("inf")).all()


@pytest.mark.parametrize("case", ["all", "first"])
def test_infonce_blocked_path_overflow_to_minus_inf_adds_nothing(emu, case):
    # the inputs of the kernels' test, padded with zero features to D = 1200 (the same dot products)
    q, k, queue = (torch.nn.functional.pad(t, (0, 1200 - 16)) for t in infonce_tests.overflow_inputs(case, K=300))
    with poisoned_outputs():
        loss, lse = emu.queue_infonce(q, k, queue, 0.2)
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    want, _ = reference.queue_infonce(q2, k2, queue.double(), 0.2)
    torch.testing.assert_close(loss, want.detach().float(), rtol=1e-5, atol=1e-5)
    (want * 0.5).sum().backward()
    dq, dk = emu_infonce_backward(emu, True, torch.full_like(loss, 0.5), q, k, queue, lse, 0.2)
    torch.testing.assert_close(dq, q2.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk, k2.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("D", [8, 1200])  # 1200: the blocked path
@pytest.mark.parametrize("nan_row", [0, 7, 40])
def test_infonce_non_finite_input_gives_non_finite_loss(emu, nan_row, D):
    # nan_row 0 and 7 were the bug this test found: a NaN logit that a thread met before any finite one
    # was dropped by the merge of partial log-sum-exps, so the CUDA kernel returned a finite loss.
    q, k, queue = infonce_tests.make_inputs(2, 3, 50, D)
    q[0, 1, 2] = float("nan")
    k[0, 2, 0] = float("inf")  # positive logit +-inf: loss NaN or inf
    queue[1, nan_row, 3] = float("nan")  # poisons every row of group 1
    loss, lse = emu.queue_infonce(q, k, queue, 0.2)
    assert not torch.isfinite(loss[0, 1]) and not torch.isfinite(loss[0, 2])
    assert not torch.isfinite(loss[1]).any()
    assert torch.isfinite(loss[0, 0])
    g = torch.zeros_like(loss)
    g[0, 0] = 1
    dq, _ = emu.queue_infonce_backward(g, q, k, queue, lse, 0.2)
    assert torch.isfinite(dq[0, 0]).all()


# ------------------------------------------------------------------------------------------------
# No kernel's results depend on the order its threads and blocks run in
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["all", "levels"])
def test_roi_align_is_schedule_independent(emu, monkeypatch, channels_last, mode, kernels):
    use_kernels(monkeypatch, kernels)
    feats, rois, scales = roi_tests.problem("cuda", torch.float32, channels_last, seed=51, R=20, C=6, B=2)
    levels = None if mode == "all" else torch.arange(20) % 3
    rois[:, 0] = 1  # overlapping RoIs on one image: backward contributions collide
    g = torch.randn((20, 6, 4, 3) if levels is not None else (3, 20, 6, 4, 3),
                    generator=torch.Generator().manual_seed(2))

    def run(deterministic):
        return lambda: emu_roi_align(emu, feats, rois, (4, 3), scales, 0, True, levels, g, deterministic)

    assert_all_equal(under_schedules(monkeypatch, run(True)))
    # Atomic adds in another order round differently, by a few ulps at most.
    assert_all_equal(under_schedules(monkeypatch, run(False)), rtol=1e-5, atol=1e-6)


def test_anchors_are_schedule_independent(emu, monkeypatch):
    gt, anchors = anchor_tests.detection_inputs(9, torch.Generator().manual_seed(52), strides=(32, 64))
    with sm_count(3, monkeypatch):
        assert_all_equal(under_schedules(monkeypatch, lambda: emu.sample_anchor_boxes(gt, anchors, 0.5, 11)))


@pytest.mark.parametrize("D,pipeline", [(24, "0"), (32, "0"), (32, "1")])  # CUDA cores, tensor cores
def test_infonce_is_schedule_independent(emu, monkeypatch, D, pipeline):
    monkeypatch.setenv("INSLOC_OPS_CUDA_INFONCE_PIPELINE", pipeline)
    q, k, queue = infonce_tests.make_inputs(2, 21, 400, D, seed=53)
    g = torch.rand(2, 21, generator=torch.Generator().manual_seed(3))

    def run(deterministic):
        def go():
            loss, lse = emu.queue_infonce(q, k, queue, 0.2)
            return loss, lse, *emu_infonce_backward(emu, deterministic, g, q, k, queue, lse, 0.2)
        return go

    with sm_count(3, monkeypatch):
        assert_all_equal(under_schedules(monkeypatch, run(True)))
        # The default backward's atomic adds in another order round differently, by a few ulps at most.
        assert_all_equal(under_schedules(monkeypatch, run(False)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Fresh random inputs every run (the seed is in the failure message, to reproduce it)
# ------------------------------------------------------------------------------------------------


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little") % 100000


@pytest.mark.parametrize("kernels", KERNELS)
def test_fresh_inputs_roi_align(emu, kernels, monkeypatch):
    use_kernels(monkeypatch, kernels)
    seed = fresh_seed()
    try:
        check_roi_align(emu, torch.float32, bool(seed % 2), ("all", "levels")[seed // 2 % 2], True, 0, seed=seed)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from e


def test_fresh_inputs_anchors(emu):
    seed = fresh_seed()
    gt, anchors = anchor_tests.insloc_inputs(23, torch.Generator().manual_seed(seed))
    want = torch.ops.insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, seed)
    got = emu.sample_anchor_boxes(gt, anchors, 0.5, seed)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"


@pytest.mark.parametrize("pipeline", ["0", "1"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fresh_inputs_infonce(emu, deterministic, pipeline, monkeypatch):
    monkeypatch.setenv("INSLOC_OPS_CUDA_INFONCE_PIPELINE", pipeline)  # "1": the pipelined tensor-core kernels
    seed = fresh_seed()
    try:
        check_infonce(emu, 1 + seed % 4, 1 + seed % 37, seed % 700, 8 * (1 + seed % 6), seed=seed,
                      deterministic=deterministic)  # D = 16, 32, 48 on tensor cores
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from e
