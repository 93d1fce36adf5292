import math
import sys
from pathlib import Path

import pytest
import torch

from insloc.export import export
from random_checkpoints import R18_FPN_DEMO, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import transfer_detection as td  # noqa: E402
from coco_ap import coco_ap  # noqa: E402


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def prediction(box_rows, scores, labels=None):
    n = len(scores)
    return {"boxes": boxes(*box_rows), "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels or [1] * n, dtype=torch.int64)}


def target(box_rows, labels=None):
    return {"boxes": boxes(*box_rows), "labels": torch.tensor(labels or [1] * len(box_rows), dtype=torch.int64)}


GT = [target([[0, 0, 10, 10], [20, 20, 40, 30]]), target([[5, 5, 25, 25]])]


# ---- the evaluator ----

def test_perfect_detections_give_ap_1():
    preds = [prediction([[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.8]), prediction([[5, 5, 25, 25]], [0.7])]
    result = coco_ap(preds, GT)
    assert result.ap == 1.0 and result.ap50 == 1.0 and result.ap75 == 1.0


def test_no_detections_give_ap_0():
    empty = prediction([], [])
    assert coco_ap([empty, empty], GT).ap == 0.0


def test_half_of_the_boxes_found_gives_51_of_101_recall_points():
    # 2 of 4 ground-truth boxes found, no false positive: precision 1 up to recall 0.5 -> points 0, .01, ..., .5
    gt = [target([[0, 0, 10, 10], [20, 20, 40, 30], [50, 50, 60, 60], [70, 0, 90, 20]])]
    result = coco_ap([prediction([[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.8])], gt)
    assert result.ap == pytest.approx(51 / 101) and result.ap50 == pytest.approx(51 / 101)


def test_a_false_positive_ranked_first_halves_the_precision():
    result = coco_ap([prediction([[100, 100, 110, 110], [0, 0, 10, 10]], [0.9, 0.8])], [target([[0, 0, 10, 10]])])
    assert result.ap == pytest.approx(0.5)


def test_a_box_with_iou_072_counts_at_thresholds_050_to_070_only():
    # [0, 0, 10, 10] vs [0, 0, 10, 7.2]: IoU 0.72 -> true positive at 0.50, 0.55, 0.60, 0.65, 0.70 (5 of 10)
    result = coco_ap([prediction([[0, 0, 10, 7.2]], [0.9])], [target([[0, 0, 10, 10]])])
    assert result.ap50 == 1.0 and result.ap75 == 0.0 and result.ap == pytest.approx(0.5)
    assert result.per_threshold == pytest.approx([1.0] * 5 + [0.0] * 5)


def test_one_detection_matches_one_ground_truth_and_classes_are_averaged():
    # duplicate detection of class 1 is a false positive; class 2 is missed entirely
    gt = [target([[0, 0, 10, 10], [30, 30, 40, 40]], labels=[1, 2])]
    preds = [prediction([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], labels=[1, 1])]
    assert coco_ap(preds, gt).ap == pytest.approx((1.0 + 0.0) / 2)


# ---- data ----

def test_voc_annotation_parsing_and_tiling_keep_boxes_inside_tiles():
    xml = ("<annotation><object><name>Tree</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>30</xmax>"
           "<ymax>40</ymax></bndbox></object><object><name>Dead</name><bndbox><xmin>60</xmin><ymin>10</ymin>"
           "<xmax>70</xmax><ymax>20</ymax></bndbox></object></annotation>")
    parsed = td.read_voc_boxes(xml)
    assert parsed.tolist() == [[5, 6, 30, 40], [60, 10, 70, 20]]
    image = td.AnnotatedImage("x", torch.zeros(3, 64, 130, dtype=torch.uint8), parsed)
    tiles = td.cut_tiles([image], tile=64)  # two tiles, 2 px of remainder dropped
    assert [t.name for t in tiles] == ["x@0,0", "x@64,0"]
    assert tiles[0].boxes.tolist() == [[5, 6, 30, 40]]  # 40% of box 2 is in tile 0: dropped
    assert tiles[1].boxes.tolist() == [[0, 10, 6, 20]]  # 60% in tile 1: kept, clipped


def test_flips_move_boxes_with_the_image():
    image = torch.zeros(3, 20, 30)
    image[:, 2:5, 3:9] = 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        flipped, b = td.augment(image, boxes([3, 2, 9, 5]), generator)
        x1, y1, x2, y2 = b[0].int().tolist()
        assert flipped[0, y1:y2, x1:x2].min() == 1.0 and flipped[0].sum() == 18


def test_real_deepforest_annotations_when_the_wheel_is_cached():
    try:
        wheel = td.find_deepforest_wheel(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"deepforest wheel not cached (no network in tests): {e}")
    images = {im.name: im for im in td.read_deepforest_images(wheel)}
    assert len(images["OSBS_029"].boxes) == 61 and images["OSBS_029"].image.shape == (3, 400, 400)
    train, test = td.split_tiles(td.cut_tiles(images.values(), tile=320))
    assert len(test) > 5 and len(train) > 3 * len(test) - 4
    assert not {t.name for t in train} & {t.name for t in test}
    for t in train + test:
        assert t.image.shape == (3, 320, 320) and (t.boxes >= 0).all() and (t.boxes <= 320).all()


# ---- initialisation and a few fine-tuning steps on CPU ----

def synthetic_tiles(n=4, size=64, seed=0):
    """Grey images with one bright rectangle each: a detection set that needs no download."""
    g = torch.Generator().manual_seed(seed)
    tiles = []
    for i in range(n):
        image = torch.full((3, size, size), 90, dtype=torch.uint8)
        x, y = torch.randint(0, size - 24, (2,), generator=g).tolist()
        w, h = torch.randint(12, 24, (2,), generator=g).tolist()
        image[:, y:y + h, x:x + w] = 230
        tiles.append(td.AnnotatedImage(f"s{i}", image, boxes([x, y, x + w, y + h])))
    return tiles


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transfer")
    encoder = write_checkpoint(folder / "demo.pt", R18_FPN_DEMO)
    export(folder / "demo.pt", "torchvision-fpn", folder / "fpn.pth")
    export(folder / "demo.pt", "torchvision", folder / "trunk.pth")
    return folder, encoder


def test_initialisation_from_an_export_puts_its_weights_in_the_detector(demo_exports):
    folder, encoder = demo_exports
    fpn = td.read_initialisation(str(folder / "fpn.pth"))
    assert (fpn.depth, fpn.fpn_channels, fpn.has_fpn) == (18, 64, True)
    detector = td.build_detector(fpn, size=64, light=True)
    assert torch.equal(detector.backbone.fpn.layer_blocks[2][0].weight, encoder.neck.output_convs[2].weight)
    assert torch.equal(detector.backbone.body.layer3[0].bn1.running_var, encoder.backbone.layer3[0].bn1.running_var)
    trunk = td.read_initialisation(str(folder / "trunk.pth"), fpn_channels=32)
    assert (trunk.depth, trunk.fpn_channels, trunk.has_fpn) == (18, 32, False)
    detector = td.build_detector(trunk, size=64, light=True)
    assert torch.equal(detector.backbone.body.conv1.weight, encoder.backbone.conv1.weight)
    with pytest.raises(ValueError, match="not an 'insloc export"):
        torch.save({"something": torch.zeros(1)}, folder / "other.pth")
        td.read_initialisation(str(folder / "other.pth"))


def test_every_initialisation_gets_the_same_random_heads(demo_exports):
    # A random R18 with BatchNorm after the FPN convs and an export without (its convs draw biases): the backbones
    # draw different amounts of random numbers, the heads built after head_seed are equal all the same.
    folder, _ = demo_exports
    detectors = []
    for init in (td.read_initialisation("random", fpn_channels=64, fpn_norm=True),
                 td.read_initialisation(str(folder / "fpn.pth"))):
        torch.manual_seed(1)
        detectors.append(td.build_detector(init, size=64, light=True, head_seed=0))
    assert detectors[0].backbone.fpn.layer_blocks[0][0].bias is None
    assert detectors[1].backbone.fpn.layer_blocks[0][0].bias is not None
    heads = [{k: v for k, v in d.state_dict().items() if not k.startswith("backbone.")} for d in detectors]
    assert list(heads[0]) == list(heads[1]) and any(k.startswith("rpn.") for k in heads[0])
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_the_newest_cached_wheel_is_chosen_by_version(tmp_path):
    for name in ("deepforest-1.9.2-py3-none-any.whl", "deepforest-1.10.0-py3-none-any.whl",
                 "deepforest-1.10.0rc1-py3-none-any.whl", "deepforest-1.10-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert td.find_deepforest_wheel(tmp_path, download=False).name == "deepforest-1.10.0-py3-none-any.whl"
    # a final release after its pre-releases, whatever order the names sort in
    assert td._wheel_version("deepforest-1.10.0rc1-x.whl") < td._wheel_version("deepforest-1.10.0-x.whl")
    assert td._wheel_version("deepforest-1.11.0rc1-x.whl") > td._wheel_version("deepforest-1.10.0-x.whl")


def test_a_few_fine_tuning_steps_run_on_cpu_and_evaluate(demo_exports):
    folder, _ = demo_exports
    torch.manual_seed(0)
    detector = td.build_detector(td.read_initialisation(str(folder / "fpn.pth")), size=64, light=True)
    before = detector.roi_heads.box_predictor.bbox_pred.weight.detach().clone()
    tiles = synthetic_tiles()
    loss = td.fine_tune(detector, tiles, td.Schedule(iters=2, batch_size=2, warmup=1), "cpu", log_every=0)
    assert math.isfinite(loss)
    assert not torch.equal(before, detector.roi_heads.box_predictor.bbox_pred.weight)
    result = td.evaluate(detector, tiles[:2], "cpu")
    assert 0.0 <= result.ap <= 1.0 and 0.0 <= result.ap50 <= 1.0
    table = td.markdown_table([("fpn.pth", "R18-FPN64", result, 0.1)])
    assert table.splitlines()[0].startswith("| initialisation |") and "| fpn.pth | R18-FPN64 |" in table
