"""Fine-tune a torchvision Faster R-CNN (ResNet-FPN) from an ``insloc export`` and report COCO-style AP.

Data: the annotated aerial tree crowns (NEON sites; MIT licence) shipped inside the ``deepforest`` wheel,
fetched once with ``pip download --no-deps deepforest`` into a cache folder and read from the wheel (a zip):
nothing is installed and nothing is vendored. Four Pascal-VOC-annotated RGB images (~950 trees) are cut
into non-overlapping tiles; every 4th tile is held out for testing. One class ("tree").

    # CPU, a few minutes: ResNet-18 FPN, short schedule
    python examples/transfer_detection.py --init runs/demo/export-fpn.pth
    # GPU: same budget for each initialisation (R50: --depth 50 for 'random'), markdown table in --table
    python examples/transfer_detection.py --init random runs/moco/export.pth runs/insloc/export-fpn.pth \\
        --depth 50 --iters 3000 --table transfer.md

``--init`` takes ``random`` or a file written by ``insloc export --format torchvision`` (ResNet trunk: the
FPN starts random) or ``--format torchvision-fpn`` (trunk and FPN). Depth, FPN width and whether the FPN
has BatchNorm come from the file; ``--depth``, ``--fpn-channels`` and ``--fpn-norm`` set them for the
others (the official transfer configs put a norm in the FPN: ``--fpn-norm bn``, the default).
"""
import argparse
import glob
import math
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coco_ap import APResult, coco_ap  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("INSLOC_CACHE", Path.home() / ".cache" / "insloc")) / "deepforest"
ANNOTATED_IMAGES = ("OSBS_029", "SOAP_061", "2019_YELL_2_528000_4978000_image_crop2",
                    "2019_YELL_2_541000_4977000_image_crop")


# ---- data ----

@dataclass
class AnnotatedImage:
    name: str
    image: torch.Tensor  # [3, H, W] uint8
    boxes: torch.Tensor  # [N, 4] float32 xyxy pixels


def _wheel_version(path):
    """The version of a wheel file name as a sortable key: release numbers (1.10.0 after 1.9.2), then final
    after pre-release (1.10.0 after 1.10.0rc1)."""
    version = Path(path).name.split("-")[1]
    release = re.match(r"\d+(?:\.\d+)*", version)
    numbers = tuple(int(n) for n in release.group().split(".")) if release else ()
    return numbers, release is not None and release.end() == len(version)


def find_deepforest_wheel(cache_dir=DEFAULT_CACHE, download=True):
    """The deepforest wheel in cache_dir, downloaded there (no dependencies, not installed) if absent."""
    cache_dir = Path(cache_dir)
    found = sorted(glob.glob(str(cache_dir / "deepforest-*.whl")))
    if not found and download:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "deepforest", "-d", str(cache_dir)], check=True)
        found = sorted(glob.glob(str(cache_dir / "deepforest-*.whl")))
    if not found:
        raise FileNotFoundError(f"no deepforest wheel in {cache_dir} (run: pip download --no-deps deepforest "
                                f"-d {cache_dir})")
    return Path(max(found, key=_wheel_version))


def read_voc_boxes(xml_text):
    """Pascal VOC annotation -> [N, 4] float32 xyxy (every object is a tree: 'Tree', 'Alive', 'Dead')."""
    root = ET.fromstring(xml_text)
    boxes = [[float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
             for obj in root.iter("object")]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def read_deepforest_images(wheel):
    """The four annotated images of the wheel (PNG + VOC XML under deepforest/data/)."""
    images = []
    with zipfile.ZipFile(wheel) as z:
        for name in ANNOTATED_IMAGES:
            data = torch.frombuffer(bytearray(z.read(f"deepforest/data/{name}.png")), dtype=torch.uint8)
            image = torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB)  # [3, H, W]
            images.append(AnnotatedImage(name, image, read_voc_boxes(z.read(f"deepforest/data/{name}.xml"))))
    return images


def cut_tiles(images, tile=320, min_visible=0.5):
    """Non-overlapping tile x tile crops (remainders dropped); a box is kept, clipped, when at least
    min_visible of its area lies inside the tile."""
    tiles = []
    for im in images:
        _, H, W = im.image.shape
        for y in range(0, H - tile + 1, tile):
            for x in range(0, W - tile + 1, tile):
                b = im.boxes - torch.tensor([x, y, x, y], dtype=torch.float32)  # [N, 4]
                clipped = b.clamp(0, tile)
                area = (b[:, 2:] - b[:, :2]).prod(1)
                visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1)
                keep = (visible >= min_visible * area) & ((clipped[:, 2:] - clipped[:, :2]).min(1).values >= 2)
                tiles.append(AnnotatedImage(f"{im.name}@{x},{y}", im.image[:, y:y + tile, x:x + tile],
                                            clipped[keep]))
    return tiles


def split_tiles(tiles, test_every=4):
    """Every test_every-th tile (in reading order) is held out."""
    return ([t for i, t in enumerate(tiles) if i % test_every], [t for i, t in enumerate(tiles) if not i % test_every])


def detection_target(tile):
    return {"boxes": tile.boxes, "labels": torch.ones(len(tile.boxes), dtype=torch.int64)}


def augment(image, boxes, generator):
    """Random horizontal and vertical flips (aerial views have no up); image [3, H, W] float."""
    _, H, W = image.shape
    if torch.rand((), generator=generator) < 0.5:
        image, boxes = image.flip(2), torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], 1)
    if torch.rand((), generator=generator) < 0.5:
        image, boxes = image.flip(1), torch.stack([boxes[:, 0], H - boxes[:, 3], boxes[:, 2], H - boxes[:, 1]], 1)
    return image, boxes


# ---- model ----

@dataclass
class Initialisation:
    """What a detector starts from: ``random``, or an export (trunk only, or trunk + FPN)."""

    name: str
    depth: int
    fpn_channels: int
    state_dict: dict | None = None
    has_fpn: bool = False
    fpn_norm: bool = True  # BatchNorm after each FPN conv (the conv then has no bias)


def read_initialisation(spec, depth=18, fpn_channels=256, fpn_norm=True):
    """``random`` (with the given depth / width / FPN norm) or the path of a torchvision / torchvision-fpn
    export (a trunk-only export takes the given FPN width and norm)."""
    if spec == "random":
        return Initialisation("random", depth, fpn_channels, fpn_norm=fpn_norm)
    sd = torch.load(spec, map_location="cpu", weights_only=True)
    has_fpn = any(k.startswith("body.") for k in sd)
    trunk_prefix = "body." if has_fpn else ""
    if trunk_prefix + "conv1.weight" not in sd:
        raise ValueError(f"{spec}: not an 'insloc export --format torchvision' or 'torchvision-fpn' file")
    export_depth = 50 if trunk_prefix + "layer1.0.conv3.weight" in sd else 18
    width = sd["fpn.inner_blocks.0.0.weight"].shape[0] if has_fpn else fpn_channels
    norm = "fpn.inner_blocks.0.1.weight" in sd if has_fpn else fpn_norm
    return Initialisation(Path(spec).name, export_depth, width, sd, has_fpn, norm)


def build_detector(init: Initialisation, num_classes=2, size=320, light=False, head_seed=None):
    """Faster R-CNN on a ResNet-FPN (P2-P5 + max-pooled P6, as fasterrcnn_resnet50_fpn), trainable
    BatchNorm everywhere and no frozen stages (the recipe's transfer setting), weights from ``init``.
    ``light``: fewer proposals and sampled RoIs, for CPU runs. ``head_seed``: the global RNG is seeded with it
    after the backbone is built, so the RPN and box heads (and the RNG that training draws from) are the same
    for every initialisation of one FPN width, whatever the backbone drew (its depth, its FPN norm)."""
    trunk = getattr(torchvision.models, f"resnet{init.depth}")()
    widths = [64 * 2 ** i * (4 if init.depth == 50 else 1) for i in range(4)]
    norm = torch.nn.BatchNorm2d if init.fpn_norm else None
    backbone = BackboneWithFPN(trunk, {f"layer{i + 1}": str(i) for i in range(4)}, widths, init.fpn_channels,
                               extra_blocks=LastLevelMaxPool(), norm_layer=norm)
    if init.state_dict is not None:
        target = backbone if init.has_fpn else backbone.body
        target.load_state_dict(init.state_dict, strict=True)
    budget = dict(rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
                  rpn_post_nms_top_n_test=300, box_batch_size_per_image=128) if light else {}
    if head_seed is not None:
        torch.manual_seed(head_seed)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=size, max_size=size, **budget)


# ---- fine-tuning and evaluation ----

@dataclass
class Schedule:
    iters: int = 40
    batch_size: int = 2
    lr: float = 0.02
    warmup: int = 10
    weight_decay: float = 1e-4
    seed: int = 0


def fine_tune(model, tiles, schedule: Schedule, device, log_every=10, log=print):
    """SGD with linear warm-up and cosine decay; returns the last iteration's summed loss."""
    generator = torch.Generator().manual_seed(schedule.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=0.9, weight_decay=schedule.weight_decay)
    model.to(device).train()
    loss = torch.tensor(float("nan"))
    for it in range(schedule.iters):
        warm = min(1.0, (it + 1) / max(schedule.warmup, 1))
        lr = schedule.lr * warm * 0.5 * (1 + math.cos(math.pi * it / schedule.iters))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.randint(len(tiles), (schedule.batch_size,), generator=generator).tolist()
        images, targets = [], []
        for i in batch:
            image, boxes = augment(tiles[i].image.float() / 255, tiles[i].boxes, generator)
            images.append(image.to(device))
            targets.append({"boxes": boxes.to(device),
                            "labels": torch.ones(len(boxes), dtype=torch.int64, device=device)})
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (it + 1) % log_every == 0:
            log(f"  iter {it + 1}/{schedule.iters} lr {lr:.4f} loss {loss.item():.3f}")
    return loss.item()


@torch.no_grad()
def evaluate(model, tiles, device) -> APResult:
    model.to(device).eval()
    predictions = [{k: v.cpu() for k, v in model([t.image.float().div(255).to(device)])[0].items()} for t in tiles]
    return coco_ap(predictions, [detection_target(t) for t in tiles])


def markdown_table(rows):
    lines = ["| initialisation | backbone | AP | AP50 | AP75 | minutes |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {backbone} | {100 * r.ap:.1f} | {100 * r.ap50:.1f} | {100 * r.ap75:.1f} | {minutes:.1f} |"
              for name, backbone, r, minutes in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", nargs="+", default=["random"],
                        help="'random' and/or torchvision / torchvision-fpn exports; each is fine-tuned with the "
                             "same schedule")
    parser.add_argument("--depth", type=int, default=18, choices=(18, 50), help="ResNet depth of 'random'")
    parser.add_argument("--fpn-channels", type=int, default=256, help="FPN width of 'random' and trunk exports")
    parser.add_argument("--fpn-norm", choices=("bn", "none"), default="bn",
                        help="FPN BatchNorm of 'random' and trunk exports (torchvision-fpn exports bring theirs)")
    parser.add_argument("--iters", type=int, default=None, help="fine-tuning iterations (default: 30 CPU, 3000 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per iteration (default: 2 CPU, 8 GPU)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--tile", type=int, default=320, help="tile side in pixels (also the input size)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the deepforest wheel is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", default="", help="write the results as a markdown table to this file")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    schedule = Schedule(iters=args.iters or (3000 if gpu else 30), batch_size=args.batch_size or (8 if gpu else 2),
                        lr=args.lr, seed=args.seed)

    wheel = find_deepforest_wheel(args.cache_dir)
    train, test = split_tiles(cut_tiles(read_deepforest_images(wheel), args.tile))
    print(f"deepforest trees from {wheel.name}: {len(train)} train tiles ({sum(len(t.boxes) for t in train)} trees), "
          f"{len(test)} test tiles ({sum(len(t.boxes) for t in test)} trees), {args.tile}px; "
          f"{schedule.iters} iters x {schedule.batch_size} images on {args.device}")
    rows = []
    for spec in args.init:
        init = read_initialisation(spec, args.depth, args.fpn_channels, args.fpn_norm == "bn")
        torch.manual_seed(args.seed)  # the random backbone of 'random'
        # the same random heads for every initialisation of one FPN width
        model = build_detector(init, size=args.tile, light=not gpu, head_seed=args.seed)
        print(f"{init.name}: ResNet-{init.depth} FPN {init.fpn_channels}{' BN' if init.fpn_norm else ''}, "
              f"{'trunk + FPN' if init.has_fpn else 'trunk' if init.state_dict else 'nothing'} pretrained")
        start = time.perf_counter()
        fine_tune(model, train, schedule, args.device)
        result = evaluate(model, test, args.device)
        minutes = (time.perf_counter() - start) / 60
        print(f"{init.name}: AP {100 * result.ap:.1f}  AP50 {100 * result.ap50:.1f}  AP75 {100 * result.ap75:.1f}  "
              f"({minutes:.1f} min)")
        rows.append((init.name, f"R{init.depth}-FPN{init.fpn_channels}{'-BN' if init.fpn_norm else ''}", result,
                     minutes))
    table = markdown_table(rows)
    print(table)
    if args.table:
        device_name = torch.cuda.get_device_name() if gpu else "CPU"
        Path(args.table).write_text(f"Faster R-CNN on deepforest trees ({len(train)} train / {len(test)} test "
                                    f"tiles), {schedule.iters} iters x {schedule.batch_size} images, "
                                    f"{device_name}\n\n{table}")
    return rows


if __name__ == "__main__":
    main()
