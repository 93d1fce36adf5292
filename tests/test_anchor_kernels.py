"""sample_anchor_boxes: every backend against the IoU-matrix reference (itself against torchvision), the
uniform choice, the argmax fallback, reproducibility, the nms_iou path, errors, opcheck and torch.compile.

The random key is one function of (seed, box, anchor) on every backend, so backends must pick exactly the
reference's anchors for the same seed; the input factories and the baselines live in bench/baselines.py,
shared with bench/bench_anchors.py.
"""
import textwrap

import pytest
import torch
import torchvision

import insloc_ops
from conftest import compile_for_sm90
from insloc_ops import reference

from bench import baselines
from bench.baselines import detection_anchors, detection_inputs, insloc_inputs, random_boxes


def baseline_sample_anchor_boxes(gt_boxes, anchors, iou_threshold=0.5, generator=None):
    return baselines.sample_anchor_boxes_iou_matrix(gt_boxes, anchors, iou_threshold, generator=generator)


def baseline_random_argmax(gt_boxes, anchors, iou_threshold=0.5, generator=None):
    return baselines.sample_anchor_boxes_random_argmax(gt_boxes, anchors, iou_threshold, generator=generator)


def cpu_backends():
    return [b for b in insloc_ops.available_backends()["sample_anchor_boxes"]["cpu"] if b != "reference"]


def run(backend, gt, anchors, threshold, seed):
    if backend == "reference":
        return reference.sample_anchor_boxes(gt, anchors, threshold, seed)
    op = torch.ops.insloc_ops.sample_anchor_boxes_triton if backend == "triton" else \
        torch.ops.insloc_ops.sample_anchor_boxes
    return op(gt, anchors, threshold, seed)


def assert_matches_reference(backend, gt, anchors, threshold, seed):
    want_index, want_iou = reference.sample_anchor_boxes(gt, anchors, threshold, seed)
    index, iou = run(backend, gt, anchors, threshold, seed)
    assert index.dtype == torch.int64 and iou.dtype == torch.float32
    assert torch.equal(index.cpu(), want_index.cpu()), f"{backend} picked other anchors than the reference"
    assert torch.equal(iou.cpu(), want_iou.cpu())
    # The IoU returned is the IoU of the chosen anchor, by reference.box_iou exactly and torchvision closely.
    g, a = gt.float().cpu(), anchors.float().cpu()[index.cpu()]
    exact = torch.stack([reference.box_iou(g[i:i + 1], a[i:i + 1])[0, 0] for i in range(len(g))]) if len(g) else iou
    assert torch.equal(iou.cpu(), exact.cpu())
    tv = torchvision.ops.box_iou(g, a).diagonal() if len(g) else iou.cpu()
    torch.testing.assert_close(iou.cpu(), tv, rtol=1e-5, atol=1e-6)
    return index, iou


# ----------------------------------------------------------------------------------------------
# The oracle and the inputs


def test_reference_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    gt, anchors = detection_inputs(50, g)
    torch.testing.assert_close(reference.box_iou(gt, anchors), torchvision.ops.box_iou(gt, anchors),
                               rtol=1e-5, atol=1e-6)


def test_reference_picks_an_eligible_anchor_or_the_first_argmax():
    g = torch.Generator().manual_seed(1)
    gt, anchors = detection_inputs(64, g)
    iou = torchvision.ops.box_iou(gt, anchors)  # [N, A]
    index, got = reference.sample_anchor_boxes(gt, anchors, 0.5, 123)
    has = (iou > 0.5).any(dim=1)
    assert has.any() and (~has).any(), "inputs must exercise both the random choice and the fallback"
    assert bool((got[has] > 0.5).all())
    assert torch.equal(index[~has], reference.box_iou(gt, anchors)[~has].argmax(dim=1))


@pytest.mark.parametrize("baseline", [baseline_sample_anchor_boxes, baseline_random_argmax])
def test_benchmark_baselines_follow_the_contract(baseline):
    g = torch.Generator().manual_seed(15)
    gt, anchors = detection_inputs(24, g)
    boxes, index, iou = baseline(gt, anchors, 0.5, g)
    all_iou = reference.box_iou(gt, anchors)
    has = (all_iou > 0.5).any(dim=1)
    assert has.any() and (~has).any()
    assert bool((iou[has] > 0.5).all()) and torch.equal(index[~has], all_iou[~has].argmax(dim=1))
    assert torch.equal(boxes, anchors[index])


def test_benchmark_detection_shape_has_242991_anchors():
    assert detection_anchors(800, 1216, (4, 8, 16, 32, 64)).shape == (242991, 4)
    assert insloc_inputs(1, torch.Generator().manual_seed(0))[1].shape == (5120, 4)


# ----------------------------------------------------------------------------------------------
# Every backend picks the reference's anchors


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", ["insloc", "detection"])
def test_backend_matches_reference(backend, case):
    if backend not in cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    g = torch.Generator().manual_seed(2)
    # The Triton interpreter runs each program in Python: few boxes.
    n = {"cpu": 32, "triton": 3}[backend]
    gt, anchors = insloc_inputs(n, g) if case == "insloc" else detection_inputs(n, g)
    seeds = (0, 7, 2**40 + 3, -(2**63)) if backend == "cpu" else (5, 2**62 + 11)
    for seed in seeds:
        assert_matches_reference(backend, gt, anchors, 0.5, seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backend_converts_inputs_to_float32_once(backend, dtype):
    if backend not in cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    g = torch.Generator().manual_seed(3)
    gt, anchors = insloc_inputs(2 if backend == "triton" else 16, g, dtype=dtype)
    assert_matches_reference(backend, gt, anchors, 0.5, 99)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 0.95, -1.0, 2.0])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_thresholds_match_reference(backend, threshold):
    # Eligible means IoU > threshold, strictly: at 0 the anchors with no overlap are not (>= would take
    # them), at -1 every anchor is, at 2 none is (the argmax fallback). The Triton kernel clamps the
    # threshold to [-1, 1] first.
    if backend not in cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    g = torch.Generator().manual_seed(4)
    gt, anchors = detection_inputs(24 if backend == "cpu" else 3, g)  # the interpreter: few boxes
    assert_matches_reference(backend, gt, anchors, threshold, 17)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_threshold_near_one_is_taken_as_given(backend):
    # Anchors of IoU 1, 0.992 and 0.5 with the box: above 0.995 only the first is eligible, so every seed
    # picks it; above 0.99 the first two are, and the seeds pick both.
    if backend not in ["reference"] + cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    anchors = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 99.2], [0.0, 0.0, 100.0, 50.0]])
    for threshold, eligible in ((0.995, {0}), (0.99, {0, 1})):
        picks = {int(insloc_ops.sample_anchor_boxes(gt, anchors, threshold, seed=s, backend=backend)[1])
                 for s in range(24)}
        assert picks == eligible, (threshold, picks)
    for nms_iou in (0.0, 1.0):  # the ends of nms_iou's range are allowed
        _, index, iou = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, nms_iou=nms_iou, seed=3)
        assert iou[0] > 0.5 and int(index) in (0, 1)


def test_cpu_one_box_split_across_threads_matches_reference():
    # N = 1 with many anchors takes the (box, anchor range) tiling with a cross-tile merge.
    g = torch.Generator().manual_seed(5)
    gt = random_boxes(1, 1344, 800, 300, 600, g)
    anchors = detection_anchors(800, 1344, (8, 16, 32, 64))  # 66,930 anchors
    for seed in range(4):
        assert_matches_reference("cpu", gt, anchors, 0.5, seed)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fallback_is_argmax_with_lowest_index_on_ties(backend):
    if backend != "reference" and backend not in cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    anchors = torch.tensor([
        [50.0, 50.0, 60.0, 60.0],  # IoU 0 with both
        [5.0, 0.0, 15.0, 10.0],  # IoU 1/3 with box 0
        [-5.0, 0.0, 5.0, 10.0],  # IoU 1/3 with box 0: a tie, mirrored
        [0.0, 5.0, 10.0, 15.0],  # IoU 1/3 with box 0: a tie
    ])
    index, iou = run(backend, gt, anchors, 0.5, 3)
    assert index.tolist() == [1, 0]  # box 0: first of three equal IoUs; box 1: no overlap at all -> index 0
    torch.testing.assert_close(iou, torch.tensor([1.0 / 3.0, 0.0]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_choice_is_uniform_over_the_eligible_anchors(backend):
    # One box, 8 eligible anchors (shifted copies, IoU > 0.5) among 40: chi-square over 4,000 fixed seeds.
    gt = torch.tensor([[100.0, 100.0, 200.0, 200.0]])
    eligible = torch.tensor([[100.0 + d, 100.0, 200.0 + d, 200.0] for d in range(0, 16, 2)])  # IoU >= 0.75
    others = torch.tensor([[100.0 + d, 100.0, 200.0 + d, 200.0] for d in range(40, 96, 2)])  # IoU < 0.43
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    anchors = torch.cat([eligible, others])[perm]  # eligible ones scattered
    want = set(perm.argsort()[:8].tolist())
    seeds = 4000
    counts = torch.zeros(anchors.shape[0], dtype=torch.int64)
    if backend == "reference":
        for s in range(seeds):
            counts[reference.sample_anchor_boxes(gt, anchors, 0.5, s)[0][0]] += 1
    else:
        for s in range(seeds):
            counts[torch.ops.insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, s)[0][0]] += 1
    assert set(counts.nonzero().squeeze(1).tolist()) == want
    expected = seeds / 8
    chi2 = float(((counts[sorted(want)].double() - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, f"chi-square {chi2:.2f} (7 dof) has p < 1e-3"  # 24.32: the 0.999 quantile


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_same_generator_state_gives_the_same_anchors(backend):
    if backend != "reference" and backend not in cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    gt, anchors = insloc_inputs(3, torch.Generator().manual_seed(6))
    first = insloc_ops.sample_anchor_boxes(gt, anchors, generator=torch.Generator().manual_seed(42), backend=backend)
    again = insloc_ops.sample_anchor_boxes(gt, anchors, generator=torch.Generator().manual_seed(42), backend=backend)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # Same state, other backend: same anchors (the keys are one function everywhere).
    ref = insloc_ops.sample_anchor_boxes(gt, anchors, generator=torch.Generator().manual_seed(42), backend="reference")
    assert torch.equal(first[1], ref[1])
    # A generator advances: 3 boxes each with several eligible anchors, 8 calls never all equal.
    g = torch.Generator().manual_seed(42)
    picks = {tuple(insloc_ops.sample_anchor_boxes(gt, anchors, generator=g, backend=backend)[1].tolist())
             for _ in range(8 if backend != "triton" else 3)}
    assert len(picks) > 1


def test_public_api_returns_the_chosen_anchor_boxes():
    gt, anchors = insloc_inputs(8, torch.Generator().manual_seed(7))
    boxes, index, iou = insloc_ops.sample_anchor_boxes(gt, anchors.double(), seed=5, backend="cpu")
    assert boxes.dtype == torch.float64 and torch.equal(boxes, anchors.double()[index])
    assert torch.equal(index, reference.sample_anchor_boxes(gt, anchors, 0.5, 5)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_gt_boxes(backend):
    if backend != "reference" and backend not in cpu_backends():
        pytest.skip(f"{backend} backend not available here")
    anchors = insloc_ops.grid_anchors(2, 16, (32,), (1.0,))
    for a in (anchors, anchors[:0]):
        boxes, index, iou = insloc_ops.sample_anchor_boxes(torch.zeros(0, 4), a, backend=backend)
        assert boxes.shape == (0, 4) and index.shape == (0,) and iou.shape == (0,)
        assert index.dtype == torch.int64 and iou.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# nms_iou: the official code's diversified choice


def test_nms_iou_one_keeps_every_eligible_anchor():
    # Nothing has IoU > 1 with a kept anchor, so the pick is uniform over all eligible anchors using the
    # second key stream: exactly the default choice with seed + 1.
    gt, anchors = detection_inputs(16, torch.Generator().manual_seed(8))
    index, iou = reference.sample_anchor_boxes_nms(gt, anchors, 0.5, 1.0, 77)
    want_index, want_iou = reference.sample_anchor_boxes(gt, anchors, 0.5, 78)
    assert torch.equal(index, want_index) and torch.equal(iou, want_iou)


@pytest.mark.parametrize("inputs", [insloc_inputs, detection_inputs])
def test_nms_iou_picks_a_survivor_of_random_score_nms(inputs):
    gt, anchors = inputs(16, torch.Generator().manual_seed(9))
    seed, nms_iou = 31, 0.6
    _, index, iou = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, nms_iou=nms_iou, seed=seed)
    keys = reference.random_keys(seed, gt.shape[0], anchors.shape[0])  # [N, A]
    keys2 = reference.random_keys(seed + 1, gt.shape[0], anchors.shape[0])  # [N, A]
    all_iou = reference.box_iou(gt, anchors)  # [N, A]
    diversified = with_eligible = 0
    for n in range(gt.shape[0]):
        eligible = (all_iou[n] > 0.5).nonzero().squeeze(1)
        if eligible.numel() == 0:  # the fallback: the best anchor
            assert index[n] == all_iou[n].argmax()
            continue
        with_eligible += 1
        # torchvision's greedy NMS with the random keys as scores (uint32: exact in float64).
        kept = eligible[torchvision.ops.nms(anchors[eligible].double(), keys[n, eligible].double(), nms_iou)]
        assert index[n] == kept[keys2[n, kept].argmax()]
        diversified += kept.numel() < eligible.numel()
    assert with_eligible >= gt.shape[0] // 2 and diversified > 0, "the NMS must have run and suppressed"
    torch.testing.assert_close(iou, all_iou.gather(1, index[:, None]).squeeze(1), rtol=0, atol=0)


@pytest.mark.parametrize("size", [1, 2, 7, 40, 130])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_greedy_nms_fixed_point_equals_the_sequential_loop(size, density):
    g = torch.Generator().manual_seed(size * 10 + int(density * 100))
    upper = (torch.rand(size, size, generator=g) < density).triu(1)
    overlaps = upper | upper.T | torch.eye(size, dtype=torch.bool)  # symmetric, each box overlaps itself
    want, suppressed = [], [False] * size
    for i in range(size):
        want.append(not suppressed[i])
        if want[-1]:
            suppressed = [s or bool(overlaps[i, j]) for j, s in enumerate(suppressed)]
    assert reference._greedy_nms_keep(overlaps).tolist() == want


def test_nms_iou_chunks_give_the_same_choice():
    gt, anchors = detection_inputs(24, torch.Generator().manual_seed(10))
    want = reference.sample_anchor_boxes_nms(gt, anchors, 0.5, 0.7, 5)
    has = (reference.box_iou(gt, anchors) > 0.5).any(dim=1)
    assert has.sum() >= 12 and not has.all(), "boxes with and without eligible anchors, to mix in one chunk"
    for chunk_pairs in (1, 3 * anchors.shape[0], 10**9):  # one box a chunk, three, all
        got = reference.sample_anchor_boxes_nms(gt, anchors, 0.5, 0.7, 5, chunk_pairs=chunk_pairs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_nms_iou_falls_back_to_argmax():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[50.0, 50.0, 60.0, 60.0], [5.0, 0.0, 15.0, 10.0], [-5.0, 0.0, 5.0, 10.0]])
    _, index, _ = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, nms_iou=0.5, seed=1)
    assert index.tolist() == [1]


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("gt, anchors, kwargs, match", [
    (torch.zeros(3, 5), torch.zeros(4, 4), {}, "gt_boxes must be an \\[N, 4\\]"),
    (torch.zeros(4), torch.zeros(4, 4), {}, "gt_boxes must be an \\[N, 4\\]"),
    (torch.zeros(3, 4), torch.zeros(4, 3), {}, "anchors must be an \\[N, 4\\]"),
    (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(4, 4), {}, "gt_boxes must be floating point"),
    (torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), torch.ones(4, 4), {}, "gt_boxes must be finite"),
    (torch.tensor([[0.0, 0.0, float("inf"), 1.0]]), torch.ones(4, 4), {}, "gt_boxes must be finite"),
    (torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), {}, "anchors must be finite"),
    (torch.tensor([[2.0, 0.0, 1.0, 1.0]]), torch.ones(4, 4), {}, "gt_boxes must satisfy x2 >= x1"),
    (torch.tensor([[0.0, 2.0, 1.0, 1.0]]), torch.ones(4, 4), {}, "gt_boxes must satisfy x2 >= x1 and y2 >= y1"),
    (torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, -1.0, 1.0]]), {}, "anchors must satisfy"),
    (torch.zeros(1, 4), torch.zeros(0, 4), {}, "anchors must not be empty"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"iou_threshold": float("nan")}, "iou_threshold must be a finite"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"nms_iou": 1.5}, "nms_iou must be None or a number in \\[0, 1\\]"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"iou_threshold": True}, "iou_threshold must be a finite"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"nms_iou": True}, "nms_iou must be None or a number"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"generator": 3}, "generator must be None or a CPU torch.Generator"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"seed": 2**63}, "seed must be an int"),
    (torch.zeros(1, 4), torch.zeros(1, 4), {"seed": 1.5}, "seed must be an int"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs_raise_naming_the_argument(gt, anchors, kwargs, match, backend):
    with pytest.raises(ValueError, match=match):
        insloc_ops.sample_anchor_boxes(gt, anchors, backend=backend, **kwargs)


@pytest.mark.parametrize("gt, anchors, match", [
    (torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), torch.ones(2, 4), "gt_boxes must be finite"),
    (torch.ones(1, 4), torch.tensor([[0.0, 0.0, 1.0, float("-inf")]]), "anchors must be finite"),
    (torch.tensor([[0.0, 0.0, 1e39, 1.0]], dtype=torch.float64), torch.ones(2, 4), "gt_boxes must be finite"),
    (torch.tensor([[0.0, 3.0, 1.0, 1.0]]), torch.ones(2, 4), "gt_boxes must satisfy x2 >= x1"),
    (torch.ones(1, 4), torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "anchors must satisfy x2 >= x1"),
    (torch.ones(1, 3), torch.ones(2, 4), "gt_boxes must be \\[N, 4\\]"),
    (torch.ones(1, 4), torch.ones(0, 4), "anchors must not be empty"),
])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_direct_op_call_checks_its_inputs(gt, anchors, match, backend):
    if backend not in cpu_backends():
        pytest.skip(f"{backend} kernel not available")
    op = torch.ops.insloc_ops.sample_anchor_boxes_triton if backend == "triton" else \
        torch.ops.insloc_ops.sample_anchor_boxes
    with pytest.raises(ValueError, match=match):
        op(gt, anchors, 0.5, 0)


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile


def test_opcheck_cpu():
    if "cpu" not in cpu_backends():
        pytest.skip("cpu kernel not built")
    gt, anchors = insloc_inputs(5, torch.Generator().manual_seed(10))
    torch.library.opcheck(torch.ops.insloc_ops.sample_anchor_boxes.default, (gt, anchors, 0.5, 3))
    torch.library.opcheck(torch.ops.insloc_ops.sample_anchor_boxes.default, (gt[:0], anchors, 0.5, 3))


def test_opcheck_triton():
    if "triton" not in cpu_backends():
        pytest.skip("triton kernel not registered")
    gt, anchors = insloc_inputs(2, torch.Generator().manual_seed(11))
    anchors = anchors[:600]
    torch.library.opcheck(torch.ops.insloc_ops.sample_anchor_boxes_triton.default, (gt, anchors, 0.5, 3))


def test_torch_compile_fullgraph():
    if "cpu" not in cpu_backends():
        pytest.skip("cpu kernel not built")
    torch._dynamo.reset()
    gt, anchors = insloc_inputs(6, torch.Generator().manual_seed(12))

    def jitter(gt, anchors, seed=None):
        boxes, index, iou = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, seed=seed, backend="cpu")
        return boxes + 1.0, index, iou  # [N, 4], [N], [N]

    compiled = torch.compile(jitter, fullgraph=True)
    # An explicit seed (e.g. drawn from a generator outside the graph) is a graph input: exact agreement.
    for seed in (3, 4, 2**40):
        for got, want in zip(compiled(gt, anchors, seed), jitter(gt, anchors, seed)):
            assert torch.equal(got, want)
    # No seed: drawn from the global RNG inside the graph, a data-dependent int (.item(): captured by
    # fullgraph on torch 2.14; the flag makes that explicit on older versions). The picks obey the contract.
    torch.manual_seed(0)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        boxes, index, iou = compiled(gt, anchors)
    all_iou = reference.box_iou(gt, anchors)
    assert torch.equal(iou, all_iou.gather(1, index[:, None]).squeeze(1)) and bool((iou > 0.5).all())
    assert torch.equal(boxes, anchors[index] + 1.0)


def test_torch_compile_with_a_generator_says_to_pass_seed():
    torch._dynamo.reset()

    def jitter(gt, anchors, g):
        return insloc_ops.sample_anchor_boxes(gt, anchors, generator=g, backend="cpu")[1]

    gt, anchors = insloc_inputs(2, torch.Generator().manual_seed(13))
    # torch 2.11 and 2.14 pass our message through fullgraph compile; torch 2.6's dynamo replaces it with
    # "Observed exception" (versions between were not tried).
    older = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11)
    with pytest.raises(Exception, match="pass seed=|Observed exception" if older else "pass seed="):
        torch.compile(jitter, fullgraph=True)(gt, anchors, torch.Generator().manual_seed(0))


_PTX_CHECK = textwrap.dedent("""
    import triton_aot  # drops TRITON_INTERPRET; captures the launches the wrapper really makes
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from insloc_ops.triton import anchors
    fn, args, kwargs = next(l for l in triton_aot.launches() if l[0] is anchors._sample_anchor_kernel)
    sig, constexprs, options = triton_aot.signature_of(fn, args, kwargs)
    ptx = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                         options=options).asm["ptx"]
    print("fma", ptx.count("fma.rn.f32"), "div_rn", ptx.count("div.rn.f32"), "mul_rn", ptx.count("mul.rn.f32"))
""")


def test_triton_kernel_compiles_for_sm90_without_fma():
    # The interpreter rounds every op on its own; a GPU build would contract mul + add into FMAs (Triton does
    # by default) and divide approximately, and pick other anchors. Compile for sm_90 here (no GPU needed)
    # and read the PTX.
    stdout = compile_for_sm90(_PTX_CHECK)
    counts = dict(zip(*[iter(stdout.split())] * 2))
    assert counts["fma"] == "0" and int(counts["div_rn"]) > 0 and int(counts["mul_rn"]) > 0, stdout


# ----------------------------------------------------------------------------------------------
# GPU (run by the device-check script on an H100)


def gpu_backends():
    return [b for b in insloc_ops.available_backends()["sample_anchor_boxes"].get("cuda", []) if b != "reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", ["insloc", "detection", "odd_sizes"])
def test_gpu_backend_matches_reference(backend, case):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh inputs each run
    if case == "insloc":
        gt, anchors = insloc_inputs(32, g)
    elif case == "detection":
        gt, anchors = detection_inputs(200, g, strides=(8, 16, 32, 64))
    else:  # N not a multiple of the block's box group, A not a multiple of a block, float16 and float64 input
        gt, anchors = detection_inputs(7, g, strides=(16, 32, 64, 128), dtype=torch.float16)
        anchors = anchors[:-3].double()
    gt, anchors = gt.cuda(), anchors.cuda()
    for seed in (0, 12345, 2**63 - 1, -7):
        index, _ = assert_matches_reference(backend, gt, anchors, 0.5, seed)
        cpu_index, _ = torch.ops.insloc_ops.sample_anchor_boxes(gt.cpu(), anchors.cpu(), 0.5, seed)
        assert torch.equal(index.cpu(), cpu_index)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_full_detection_shape_matches_cpu_kernel(backend):
    # 200 boxes x 242,991 anchors: exact agreement with the CPU kernel (whose math the reference checks).
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    gt = random_boxes(200, 1216, 800, 16, 600, g)
    anchors = detection_anchors(800, 1216, (4, 8, 16, 32, 64))
    for seed in (1, 2**33 + 1):
        want_index, want_iou = torch.ops.insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, seed)
        index, iou = run(backend, gt.cuda(), anchors.cuda(), 0.5, seed)
        assert torch.equal(index.cpu(), want_index) and torch.equal(iou.cpu(), want_iou)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_one_box_many_anchors_and_ties(backend):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]], device="cuda")
    # The tie of test_fallback_is_argmax_with_lowest_index_on_ties, with the tied anchors far apart among
    # many non-overlapping ones, so they land in different blocks.
    far = torch.tensor([[500.0, 500.0, 510.0, 510.0]]).repeat(100000, 1)
    anchors = torch.cat([far[:1], torch.tensor([[5.0, 0.0, 15.0, 10.0]]), far,
                         torch.tensor([[-5.0, 0.0, 5.0, 10.0]]), far, torch.tensor([[0.0, 5.0, 10.0, 15.0]])])
    index, iou = run(backend, gt, anchors.cuda(), 0.5, 3)
    assert index.tolist() == [1, 0]
    assert_matches_reference(backend, gt[:1], anchors.cuda(), 0.3, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_empty_gt_boxes(backend):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} not available on CUDA")
    index, iou = run(backend, torch.zeros(0, 4, device="cuda"), torch.ones(5, 4, device="cuda"), 0.5, 1)
    assert index.shape == (0,) and iou.shape == (0,) and index.is_cuda


@pytest.mark.gpu
def test_gpu_nms_iou_gives_the_cpu_choice_on_the_inputs_device():
    gt, anchors = insloc_inputs(16, torch.Generator().manual_seed(9))
    want = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, nms_iou=0.7, seed=4)
    got = insloc_ops.sample_anchor_boxes(gt.cuda(), anchors.cuda(), 0.5, nms_iou=0.7, seed=4)
    assert all(t.is_cuda for t in got)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.gpu
def test_gpu_opcheck_cuda():
    if "cuda" not in gpu_backends():
        pytest.skip("cuda kernel not built")
    gt, anchors = insloc_inputs(5, torch.Generator().manual_seed(14))
    torch.library.opcheck(torch.ops.insloc_ops.sample_anchor_boxes.default, (gt.cuda(), anchors.cuda(), 0.5, 3))
