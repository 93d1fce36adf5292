"""The pure-PyTorch references against independent oracles (torchvision, F.cross_entropy, hand-computed
values): every kernel is tested against these, so they are tested first."""
import math

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")

from insloc_ops import reference  # noqa: E402

# ------------------------------------------------------------------------------------------- RoIAlign

LEVEL_SHAPES = [(16, 20), (8, 10), (4, 5)]
SCALES = [1 / 4, 1 / 8, 1 / 16]


def _features(dtype=torch.float64, B=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, h, w, generator=g, dtype=dtype).requires_grad_() for h, w in LEVEL_SHAPES]


# Boxes inside, partly outside, fully outside, zero-size, inverted (x2 < x1), huge, tiny.
ROIS = torch.tensor([
    [0, 4.0, 8.0, 60.0, 50.0],
    [1, -20.0, -10.0, 20.0, 30.0],
    [0, 100.0, 90.0, 140.0, 120.0],
    [1, 200.0, 200.0, 260.0, 250.0],
    [0, 13.0, 13.0, 13.0, 13.0],
    [1, 30.0, 30.0, 10.0, 12.0],
    [0, -500.0, -400.0, 900.0, 700.0],
    [1, 2.3, 5.7, 3.1, 6.2],
], dtype=torch.float64)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_reference_roi_align_equals_torchvision_values_and_grads(aligned, sampling_ratio):
    feats = _features()
    out = reference.roi_align_multilevel(feats, ROIS, (3, 4), SCALES, sampling_ratio, aligned)
    assert out.shape == (3, ROIS.shape[0], 3, 3, 4)
    expected = torch.stack([torchvision.ops.roi_align(f, ROIS, (3, 4), s, sampling_ratio, aligned)
                            for f, s in zip(feats, SCALES)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), feats)
    want = torch.autograd.grad((expected * g).sum(), feats)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reference_roi_align_float32_matches_torchvision():
    feats = [f.detach().float() for f in _features(seed=3)]
    rois = ROIS.float()
    out = reference.roi_align_multilevel(feats, rois, (7, 7), SCALES, 0, True)
    for lvl, (f, s) in enumerate(zip(feats, SCALES)):
        torch.testing.assert_close(out[lvl], torchvision.ops.roi_align(f, rois, (7, 7), s, 0, True),
                                   rtol=1e-5, atol=1e-5)


def test_reference_roi_align_hand_computed_values():
    # A 1x1x4x4 ramp f[y, x] = 4y + x; box (0, 0, 4, 4) at scale 1 pooled to 1x1 with 2x2 samples.
    f = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    # aligned: the box starts at -0.5, samples at 0.5 and 2.5 per axis: f = 2.5, 4.5, 10.5, 12.5 -> 7.5.
    assert reference.roi_align_multilevel([f], rois, (1, 1), [1.0], 2, True).item() == pytest.approx(7.5)
    # not aligned: samples at 1 and 3: f = 5, 7, 13, 15 -> 10 (3 is the last row/column, no interpolation).
    assert reference.roi_align_multilevel([f], rois, (1, 1), [1.0], 2, False).item() == pytest.approx(10.0)
    # Box (2, 2, 6, 6), not aligned: samples at 3 and 5; 5 > H = 4 is out of range and contributes nothing,
    # but still counts in the average: (f[3, 3] = 15) / 4.
    rois = torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]], dtype=torch.float64)
    assert reference.roi_align_multilevel([f], rois, (1, 1), [1.0], 2, False).item() == pytest.approx(3.75)


def test_reference_roi_align_empty_rois():
    feats = _features()
    out = reference.roi_align_multilevel(feats, ROIS[:0], (2, 2), SCALES, 0, True)
    assert out.shape == (3, 0, 3, 2, 2)
    lv = reference.roi_align_multilevel(feats, ROIS[:0], (2, 2), SCALES, 0, True,
                                        levels=torch.zeros(0, dtype=torch.int64))
    assert lv.shape == (0, 3, 2, 2)


def test_reference_roi_align_levels_mode_selects_the_assigned_level():
    feats = _features()
    levels = torch.tensor([0, 2, 1, 1, 0, 2, 1, 0])
    full = reference.roi_align_multilevel(feats, ROIS, (2, 3), SCALES, 0, True)
    out = reference.roi_align_multilevel(feats, ROIS, (2, 3), SCALES, 0, True, levels=levels)
    torch.testing.assert_close(out, full[levels, torch.arange(len(levels))])


def test_reference_roi_align_nan_box_gives_zeros():
    feats = _features()
    rois = torch.tensor([[0, float("nan"), 1.0, 5.0, 5.0], [1, 0.0, float("inf"), 5.0, 5.0],
                         [0, 1.0, 1.0, 5.0, 5.0]], dtype=torch.float64)  # the last: the NaN box with x1 = 1
    out = reference.roi_align_multilevel(feats, rois, (2, 2), SCALES, 0, True)
    assert torch.isfinite(out).all()
    # A NaN coordinate samples nothing: zeros on every level, where the same box with a number pools values.
    assert (out[:, 0] == 0).all()
    assert (out[:, 2].flatten(1).abs().sum(1) > 0).all()


def test_reference_roi_align_batch_index_outside_the_batch_gives_zeros():
    # As the kernels on CUDA (the reference is a CUDA backend too; the range check is the CPU public API's):
    # -1, B, -0.5 (truncation would make it image 0), NaN name no image; 1.5 names image 1.
    feats = _features()
    box = [4.0, 8.0, 60.0, 50.0]
    rois = torch.tensor([[b] + box for b in (-1.0, 2.0, -0.5, float("nan"), 1.5, 0.0)], dtype=torch.float64)
    out = reference.roi_align_multilevel(feats, rois, (3, 3), SCALES, 0, True)
    assert (out[:, :4] == 0).all()
    expected = reference.roi_align_multilevel(feats, torch.tensor([[1.0] + box, [0.0] + box],
                                                                  dtype=torch.float64), (3, 3), SCALES, 0, True)
    assert torch.equal(out[:, 4:], expected) and (expected.abs().sum() > 0)
    out.sum().backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)


def test_fpn_levels_matches_torchvision_level_mapper():
    from torchvision.ops.poolers import LevelMapper

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    wh = torch.rand(200, 2, generator=g) * 600 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    mapper = LevelMapper(2, 5, canonical_scale=224, canonical_level=4)
    want = mapper([boxes])
    got = reference.fpn_levels(torch.cat([torch.zeros(200, 1), boxes], 1))
    torch.testing.assert_close(got, want)
    # Boxes whose sqrt(area) is nominally 224 x 2^j: rounding puts some a hair below a level's boundary, which
    # the formula's + 1e-6 keeps on the level (122 of these 4,000 boxes would drop one level without it).
    n = 4000
    corner = torch.rand(n, 2, generator=g) * 1000
    side = torch.tensor([56.0, 112.0, 224.0, 448.0, 896.0])[torch.randint(0, 5, (n,), generator=g)]
    w = side * (0.5 + torch.rand(n, generator=g))
    boxes = torch.cat([corner, corner + torch.stack([w, side ** 2 / w], 1)], 1)
    torch.testing.assert_close(reference.fpn_levels(boxes), mapper([boxes]).to(torch.int64))


# -------------------------------------------------------------------------------------------- Anchors


def test_grid_anchors_hand_computed():
    a = reference.grid_anchors((2, 3), 16, (32,), (0.5, 2.0))
    assert a.shape == (2 * 3 * 2, 4)
    w = math.sqrt(32 ** 2 / 0.5)  # ratio h/w = 0.5: wide box
    h = 0.5 * w
    torch.testing.assert_close(a[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    torch.testing.assert_close(a[1], torch.tensor([-h / 2, -w / 2, h / 2, w / 2]))  # ratio 2: tall
    # Location-major, x fastest: location 1 is (x=1, y=0) -> centre (16, 0).
    torch.testing.assert_close(a[2], torch.tensor([16 - w / 2, -h / 2, 16 + w / 2, h / 2]))
    # Location 3 is (x=0, y=1) -> centre (0, 16).
    torch.testing.assert_close(a[6], torch.tensor([-w / 2, 16 - h / 2, w / 2, 16 + h / 2]))
    b = reference.grid_anchors(1, 8, (16,), (1.0,), offset=0.5)
    torch.testing.assert_close(b, torch.tensor([[-4.0, -4.0, 12.0, 12.0]]))


def test_insloc_anchor_grid_has_5120_anchors_sizes_outer_ratios_inner():
    a = reference.grid_anchors(16, 16, (32, 64, 128, 256), (0.5, 0.75, 1.0, 1.5, 2.0))
    assert a.shape == (5120, 4)
    wh = a[:20, 2:] - a[:20, :2]
    areas = (wh[:, 0] * wh[:, 1]).view(4, 5)
    torch.testing.assert_close(areas, torch.tensor([32.0, 64, 128, 256]).pow(2).view(4, 1).expand(4, 5),
                               rtol=1e-5, atol=1e-3)
    ratios = (wh[:, 1] / wh[:, 0]).view(4, 5)
    torch.testing.assert_close(ratios, torch.tensor([0.5, 0.75, 1, 1.5, 2]).expand(4, 5), rtol=1e-5, atol=1e-5)


def _random_boxes(n, size, g, min_side=8.0):
    xy = torch.rand(n, 2, generator=g) * (size - min_side)
    wh = min_side + torch.rand(n, 2, generator=g) * (size - xy - min_side).clamp(min=1)
    return torch.cat([xy, xy + wh], 1)


def test_box_iou_equals_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = _random_boxes(40, 256, g), _random_boxes(300, 256, g)
    torch.testing.assert_close(reference.box_iou(a, b), torchvision.ops.box_iou(a, b))


def test_mix32_is_lowbias32():
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        x ^= x >> 16
        return x

    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    got = reference.mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32(x) for x in xs]
    # A bijection: no two anchors of a box share a key.
    keys = reference.random_keys(7, 3, 5000)
    assert all(len(set(row.tolist())) == 5000 for row in keys)


def test_sample_anchor_boxes_reference_picks_eligible_else_argmax():
    anchors = reference.grid_anchors(16, 16, (32, 64, 128, 256), (0.5, 0.75, 1.0, 1.5, 2.0))
    g = torch.Generator().manual_seed(2)
    boxes = _random_boxes(64, 256, g, min_side=64)
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 2.0, 2.0]])])  # tiny: no anchor exceeds 0.5
    iou = torchvision.ops.box_iou(boxes, anchors)
    index, got_iou = reference.sample_anchor_boxes(boxes, anchors, 0.5, seed=123)
    torch.testing.assert_close(got_iou, iou[torch.arange(len(boxes)), index])
    has = (iou > 0.5).any(1)
    assert has[:-1].all() and not has[-1]
    assert (got_iou[has] > 0.5).all()
    assert index[-1] == iou[-1].argmax()


def test_sample_anchor_boxes_reference_argmax_ties_take_lowest_index():
    anchors = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 10], [0, 0, 10, 10]])
    box = torch.tensor([[5.0, 5, 15, 15]])  # IoU 25/175 < 0.5 with anchors 0, 2, 3 (equal), 0 with 1
    index, iou = reference.sample_anchor_boxes(box, anchors, 0.5, seed=9)
    assert index.tolist() == [0] and iou.item() == pytest.approx(25 / 175)


def test_sample_anchor_boxes_reference_is_uniform_over_eligible():
    # 10 identical eligible anchors and 10 ineligible ones: over many seeds each eligible one is chosen
    # about equally often (chi-square, 9 degrees of freedom; 27.88 is the 0.999 quantile).
    box = torch.tensor([[0.0, 0, 10, 10]])
    anchors = torch.cat([torch.tensor([[0.0, 0, 10, 10]]).repeat(10, 1), torch.tensor([[50.0, 50, 60, 60]]).repeat(10, 1)])
    anchors = anchors[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    eligible = (torchvision.ops.box_iou(box, anchors)[0] > 0.5).nonzero().squeeze(1)
    counts = torch.zeros(20)
    trials = 4000
    for seed in range(trials):
        counts[reference.sample_anchor_boxes(box, anchors, 0.5, seed)[0]] += 1
    assert counts.sum() == counts[eligible].sum() == trials
    expected = trials / 10
    chi2 = ((counts[eligible] - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.88, counts


def test_sample_anchor_boxes_reference_same_seed_same_choice():
    anchors = reference.grid_anchors(16, 16, (32, 64, 128, 256), (0.5, 0.75, 1.0, 1.5, 2.0))
    boxes = _random_boxes(32, 256, torch.Generator().manual_seed(5), min_side=64)
    a = reference.sample_anchor_boxes(boxes, anchors, 0.5, 77)[0]
    b = reference.sample_anchor_boxes(boxes, anchors, 0.5, 77)[0]
    c = reference.sample_anchor_boxes(boxes, anchors, 0.5, 78)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# -------------------------------------------------------------------------------------------- InfoNCE


def _explicit_cross_entropy(q, k, queue, T):
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], 1) / T
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long), reduction="none")


@pytest.mark.parametrize("T", [0.07, 0.2])
def test_reference_infonce_equals_cross_entropy_values_and_grads(T):
    g = torch.Generator().manual_seed(0)
    G, N, K, D = 3, 5, 17, 8
    q = F.normalize(torch.randn(G, N, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(G, N, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    queue = F.normalize(torch.randn(G, K, D, generator=g, dtype=torch.float64), dim=-1)
    loss, lse = reference.queue_infonce(q, k, queue, T)
    want = torch.stack([_explicit_cross_entropy(q[i], k[i], queue[i], T) for i in range(G)])
    torch.testing.assert_close(loss, want)
    w = torch.randn(G, N, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad((loss * w).sum(), (q, k))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_enqueue_wraps_around():
    queue = torch.zeros(2, 5, 3)
    keys = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    ptr = reference.enqueue_(queue, keys, 3)
    assert ptr == 1
    torch.testing.assert_close(queue[:, 3:], keys[:, :2])
    torch.testing.assert_close(queue[:, :1], keys[:, 2:])
    assert (queue[:, 1:3] == 0).all()
