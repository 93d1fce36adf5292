import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from insloc.data import CopyPasteComposite, EpochSampler, TwoViewCrops, image_paths, moco_v2_augment
from insloc.data.augment import MEAN, STD
from insloc.data.composite import paste_size, random_resized_crop_box
from insloc.data.sources import builtin_image_paths


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for i, (w, h) in enumerate([(300, 200), (180, 260), (400, 400)]):
        folder = tmp_path / "sub" if i == 2 else tmp_path
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    return tmp_path


def test_builtin_source_is_the_photographs_shipped_in_the_wheels():
    paths = builtin_image_paths()
    assert len(paths) == 21
    names = {os.path.basename(p) for p in paths}
    assert {"astronaut.png", "coffee.png", "chelsea.png", "china.jpg", "flower.jpg"} <= names
    for p in paths:
        with Image.open(p) as f:
            assert min(f.size) >= 64


def test_folder_source_is_recursive_and_list_file_paths_are_relative_to_it(image_folder):
    paths = image_paths(str(image_folder))
    assert [os.path.relpath(p, image_folder) for p in paths] == ["good0.png", "good1.png", "sub/good2.png"]
    (image_folder / "list.txt").write_text("# two images\ngood1.png\n\nsub/good2.png\n")
    assert image_paths(str(image_folder / "list.txt")) == [str(image_folder / "good1.png"),
                                                          str(image_folder / "sub" / "good2.png")]
    with pytest.raises(FileNotFoundError):
        image_paths(str(image_folder / "missing"))


def test_folder_source_skips_hidden_files_and_lists_a_folder_reached_twice_once(image_folder):
    # macOS copies leave '._name' metadata beside each image; they sort first and do not decode
    (image_folder / "._good0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    (image_folder / ".cache").mkdir()
    Image.new("RGB", (64, 64)).save(image_folder / ".cache" / "thumb.png")
    (image_folder / "sub" / "up").symlink_to(image_folder, target_is_directory=True)  # a loop
    (image_folder / "again").symlink_to(image_folder / "sub", target_is_directory=True)  # a second way in
    paths = image_paths(str(image_folder))
    assert sorted(os.path.realpath(p) for p in paths) == sorted(
        os.path.realpath(image_folder / n) for n in ("good0.png", "good1.png", "sub/good2.png"))


def test_paste_size_keeps_aspect_and_fits_the_target():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        cw, ch = int(torch.randint(20, 500, ())), int(torch.randint(20, 500, ()))
        w, h = paste_size(g, cw, ch, (128, 255), 256)
        assert 128 - 1 <= max(w, h) <= 254
        assert abs(w / h - cw / ch) <= 0.02 * max(cw / ch, 1) + 1.0 / min(w, h) * (cw / ch)


def test_random_resized_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y, w, h = random_resized_crop_box(g, 320, 240, (0.2, 1.0), (0.5, 2.0))
        assert 0 <= x and x + w <= 320 and 0 <= y and y + h <= 240
        assert 0.2 * 320 * 240 * 0.95 <= w * h <= 320 * 240
        assert 0.5 * 0.9 <= w / h <= 2.0 * 1.1


def test_composite_boxes_lie_inside_the_canvas_within_the_recipe_size_bounds():
    ds = CopyPasteComposite(builtin_image_paths(), image_size=256, decode_cache=32)
    assert len(ds) == 21
    for i in range(24):
        sample = ds[(0, i)]
        assert sample["im_q"].shape == sample["im_k"].shape == (3, 256, 256)
        assert sample["im_q"].dtype == sample["im_k"].dtype == torch.uint8  # a quarter of float32's bytes
        for box in (sample["boxes_q"], sample["boxes_k"]):
            x1, y1, x2, y2 = box.tolist()
            w, h = x2 - x1, y2 - y1
            assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
            assert 127 <= max(w, h) <= 254 and min(w, h) >= 50
        assert not torch.equal(sample["boxes_q"], sample["boxes_k"])  # independent crops and places
        assert sample["unreadable"] == 0


COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 30), (200, 40, 210)]


def test_both_views_paste_a_crop_of_the_foreground_exactly_inside_their_boxes(tmp_path, monkeypatch):
    # Solid-colour images and no pixel augmentation: inside each view's box every pixel is the colour of the
    # foreground image (index % len), outside it the colour of one background image. A paste at another
    # place than the box (x and y swapped) or a view cut from another image's foreground shows here.
    import insloc.data.composite as composite
    monkeypatch.setattr(composite, "moco_v2_augment", lambda image, box, g: (TF.pil_to_tensor(image), box))
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (90 + 30 * i, 150 - 20 * i), colour).save(tmp_path / f"c{i}.png")
    paths = image_paths(str(tmp_path))
    ds = CopyPasteComposite(paths, image_size=64, paste_size=(24, 63), samples_per_epoch=12)
    palette = torch.tensor(COLOURS, dtype=torch.uint8)  # [5, 3]
    located, own_backgrounds = 0, 0
    for index in range(12):
        sample = ds[(0, index)]
        fg = palette[index % len(paths)].view(3, 1, 1)
        backgrounds = []
        for im, box in ((sample["im_q"], sample["boxes_q"]), (sample["im_k"], sample["boxes_k"])):
            x1, y1, x2, y2 = (int(v) for v in box.tolist())
            inside = torch.zeros(64, 64, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert (im[:, inside] == fg.view(3, 1)).all(), (index, box)
            outside = im[:, ~inside]  # [3, P]: one background colour
            assert outside.shape[1] > 0 and (outside == outside[:, :1]).all()
            assert (palette == outside[:, 0]).all(1).any()
            backgrounds.append(outside[:, 0])
            if not torch.equal(outside[:, 0], fg.flatten()):  # a background other than the foreground:
                assert torch.equal((im == fg).all(0), inside)  # the foreground's pixels are the box exactly
                located += 1
        assert not torch.equal(sample["boxes_q"], sample["boxes_k"])
        own_backgrounds += not torch.equal(*backgrounds)
    assert located >= 12  # most views have another image behind them
    assert own_backgrounds >= 6  # each view draws its own background


def test_a_sample_is_a_function_of_seed_epoch_and_index():
    ds = CopyPasteComposite(builtin_image_paths()[:4], image_size=64, paste_size=(32, 63))
    a, b, c = ds[(3, 1)], ds[(3, 1)], ds[(4, 1)]
    assert torch.equal(a["im_q"], b["im_q"]) and torch.equal(a["boxes_k"], b["boxes_k"])
    assert not torch.equal(a["im_q"], c["im_q"])


def test_augment_flips_the_box_with_the_image():
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[10:30, 5:45] = 255  # a white box [5, 10, 45, 30] on black
    box = torch.tensor([5.0, 10.0, 45.0, 30.0])
    flipped = 0
    for seed in range(12):
        out, out_box = moco_v2_augment(Image.fromarray(image), box, torch.Generator().manual_seed(seed))
        pixels = out.float().mean(0)  # [64, 96] 0..255
        mask = pixels > (pixels.max() + pixels.min()) / 2
        ys, xs = mask.nonzero(as_tuple=True)
        found = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert found == out_box.tolist()
        flipped += out_box[0].item() == 96 - 45
    assert 0 < flipped < 12


def test_augment_draws_with_the_recipe_probabilities_and_ranges(monkeypatch):
    # recipe.md: ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur sigma in [0.1, 2.0] p=0.5, flip p=0.5
    import insloc.data.augment as augment
    chances, ranges = [], []
    real_uniform = augment.uniform
    monkeypatch.setattr(augment, "chance", lambda g, p: chances.append(p) or True)  # every branch taken
    monkeypatch.setattr(augment, "uniform", lambda g, lo, hi: ranges.append((lo, hi)) or real_uniform(g, lo, hi))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    out, box = moco_v2_augment(image, torch.tensor([2.0, 3.0, 10.0, 12.0]), torch.Generator().manual_seed(0))
    assert chances == [0.8, 0.2, 0.5, 0.5]
    assert [x for r in ranges for x in r] == pytest.approx([0.6, 1.4] * 3 + [-0.1, 0.1, 0.1, 2.0])
    assert box.tolist() == [14.0, 3.0, 22.0, 12.0] and out.shape == (3, 16, 24)
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()  # grayscale


def test_normalize_is_the_recipe_normalisation_in_float32():
    from insloc.data import normalize
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, (images.float() - MEAN) / STD)  # as the workers computed it before
    mean, std = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float64), torch.tensor([58.395, 57.12, 57.375],
                                                                                        dtype=torch.float64)
    assert torch.allclose(out[:, :, 0, 0].double(), (images[:, :, 0, 0].double() - mean) / std, atol=1e-5, rtol=0)
    assert torch.equal(normalize(images[1]), out[1])  # one image as a batch
    # the trainer makes the uint8 batch channels_last first: normalize keeps that layout
    channels_last = normalize(images.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and torch.equal(channels_last, out)


def test_unreadable_images_are_skipped_and_counted(image_folder):
    (image_folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "empty.png").write_bytes(b"")
    paths = image_paths(str(image_folder))
    assert len(paths) == 5
    ds = CopyPasteComposite(paths, image_size=64, paste_size=(32, 63), samples_per_epoch=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[(0, i)] for i in range(20)]
    assert sum(s["unreadable"] for s in samples) >= 2
    assert all(s["im_q"].shape == (3, 64, 64) and s["im_q"].dtype == torch.uint8 for s in samples)
    assert ds.images.unreadable == {paths.index(str(image_folder / "corrupt.jpg")),
                                    paths.index(str(image_folder / "empty.png"))}
    assert any("skipping unreadable image" in str(w.message) for w in caught)


def test_only_unreadable_images_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    ds = CopyPasteComposite(image_paths(str(tmp_path)), image_size=64, paste_size=(32, 63))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="unreadable"):
            ds[(0, 0)]


def test_two_view_crops_for_the_moco_baseline():
    ds = TwoViewCrops(builtin_image_paths()[:3], image_size=64)
    s = ds[(0, 2)]
    assert s["im_q"].shape == s["im_k"].shape == (3, 64, 64) and not torch.equal(s["im_q"], s["im_k"])
    assert s["boxes_q"].tolist() == [0, 0, 64, 64]


def test_epoch_sampler_shards_are_disjoint_equal_and_resume_mid_epoch():
    shards = [list(EpochSampler(23, 3, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 9  # 23 // 2 = 11 -> 3 whole batches of 3
    ids = [i for shard in shards for (_, i) in shard]
    assert len(set(ids)) == 18 and all(0 <= i < 23 for i in ids)
    sampler = EpochSampler(23, 3, seed=1)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, start_batch=2)
    assert list(sampler) == full[6:] and len(sampler) == len(full) - 6
    assert all(e == 5 for e, _ in full)
    sampler.set_epoch(6)
    assert [i for _, i in sampler] != [i for _, i in full]


def test_path_list_gives_back_every_path_and_survives_pickling():
    import pickle

    from insloc.data.sources import PathList
    paths = ["/data/a.jpg", "/data/ünïcode/ß.png", "rel/x.JPEG", "/d/" + "n" * 300 + ".png"]
    listed = PathList(paths)
    assert len(listed) == 4 and list(listed) == paths
    assert listed[-1] == paths[-1] and listed[np.int64(1)] == paths[1]
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range for 4 paths"):
            listed[bad]
    assert list(pickle.loads(pickle.dumps(listed))) == paths  # spawned workers get it pickled
    assert len(PathList([])) == 0 and list(PathList([])) == []
    # the paths live in two numpy arrays (no per-path Python objects for workers to un-share)
    assert listed.data.dtype == np.uint8 and listed.offsets.tolist()[-1] == len(listed.data)


def test_wide_images_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    from insloc.data.composite import ImageFiles, to_rgb
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "unit.tif")  # float 0..1
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i32.tif")  # 32-bit int holding 16-bit values
    Image.fromarray((ramp / 257).astype(np.int32)).save(tmp_path / "i8.tif")  # 32-bit int holding 0..255
    Image.fromarray((ramp / 65535 * 2000 - 1000).astype(np.float32)).save(tmp_path / "hu.tif")  # any range
    expected = np.rint(ramp / 257)
    images = ImageFiles([str(tmp_path / n) for n in ("g16.png", "unit.tif", "i32.tif", "i8.tif", "hu.tif")])
    with Image.open(tmp_path / "g16.png") as f:
        assert f.mode.startswith("I;16") and np.asarray(f.convert("RGB")).mean() > 250  # what Pillow alone does
    for i in range(len(images)):
        rgb = np.asarray(images.load(i)).astype(np.float64)
        assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
        assert np.abs(rgb[..., 0] - expected).max() <= 1.0, images.paths[i]
    # non-finite values are black; a constant image does not divide by zero
    nan = np.full((8, 8), np.nan, np.float32)
    nan[0, 0], nan[0, 1], nan[0, 2] = -5.0, 5.0, np.inf
    out = np.asarray(to_rgb(Image.fromarray(nan)))[..., 0]
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[0, 2] == 0 and (out[1:] == 0).all()
    assert (np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 70000, np.int32)))) == 0).all()
    # 8-bit modes are untouched
    rgb8 = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    assert (np.asarray(to_rgb(Image.fromarray(rgb8))) == rgb8).all()


def test_listing_fingerprint_agrees_for_copies_and_differs_for_other_files(image_folder, tmp_path_factory):
    import shutil

    from insloc.data.sources import listing_fingerprint
    copy = tmp_path_factory.mktemp("node2") / "data"
    shutil.copytree(image_folder, copy)

    def fingerprint(source):
        return listing_fingerprint(image_paths(str(source)), str(source))
    assert fingerprint(image_folder) == fingerprint(copy)  # the same files under another root
    assert fingerprint(str(copy) + os.sep) == fingerprint(copy)
    (copy / "sub" / "good2.png").rename(copy / "sub" / "other.png")
    assert fingerprint(image_folder) != fingerprint(copy)
    # a list file: its entries as written (relative ones resolve in each copy's folder)
    for root in (image_folder, copy):
        (root / "list.txt").write_text(f"good0.png\n{image_folder / 'good1.png'}\n")
    assert fingerprint(image_folder / "list.txt") == fingerprint(copy / "list.txt")
    (copy / "list.txt").write_text("good0.png\n")
    assert fingerprint(image_folder / "list.txt") != fingerprint(copy / "list.txt")
    assert listing_fingerprint(builtin_image_paths(), "builtin") == \
        listing_fingerprint(["/elsewhere/" + os.path.basename(p) for p in builtin_image_paths()], "builtin")


def test_a_folder_that_cannot_be_read_is_left_out_with_a_warning(image_folder, monkeypatch):
    scandir = os.scandir

    def no_entry(path="."):  # as a folder without read permission does (the tests may run as root)
        if os.path.basename(os.fspath(path)) == "sub":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", no_entry)
    with pytest.warns(UserWarning, match=r"1 folder\(s\) could not be read and are left out \(first: "
                                         r"\[Errno 13\] Permission denied: '.*sub'\)"):
        paths = image_paths(str(image_folder))
    assert [os.path.relpath(p, image_folder) for p in paths] == ["good0.png", "good1.png"]


def test_path_list_digest_skips_a_common_prefix_as_relative_paths_would():
    import hashlib

    from insloc.data.sources import PathList
    rel = ["a.png", "sub/b.JPEG", "x", "ß/c.png"]
    for root in ("/data/train/", "/mnt/other/place/"):
        listed = PathList([root + r for r in rel])
        expected = hashlib.sha1("".join(rel).encode())
        expected.update(np.array([len(r.encode()) for r in rel], "<i8").tobytes())
        assert listed.digest(len(root)) == expected.hexdigest()
    assert PathList(["/d/ab", "/d/c"]).digest(3) != PathList(["/d/a", "/d/bc"]).digest(3)  # lengths count
    assert PathList([]).digest(5) == PathList([]).digest(0)
    with pytest.raises(ValueError, match="shorter than the 9 bytes"):
        PathList(["/d/a"]).digest(9)
