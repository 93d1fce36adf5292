"""The InsLoc pretext sample (a crop of one image pasted on two other images) and MoCo v2's two views.

A sample is keyed by (epoch, index) and drawn from a generator seeded by (seed, epoch, index), so it
does not depend on the worker that makes it, the number of workers, or whether the run was resumed."""
import math
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .augment import moco_v2_augment
from .sources import PathList


def sample_generator(seed, epoch, index):
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def randint(g, lo, hi):
    """Uniform int in [lo, hi)."""
    return int(torch.randint(lo, hi, (), generator=g))


def random_resized_crop_box(g, width, height, scale, ratio, tries=10):
    """torchvision's RandomResizedCrop parameters: area fraction uniform in `scale`, aspect ratio
    log-uniform in `ratio`, `tries` attempts, then a centre crop clamped to `ratio`. Returns (x, y, w, h)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand((), generator=g)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return randint(g, 0, width - w + 1), randint(g, 0, height - h + 1), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def paste_size(g, crop_w, crop_h, size_range, canvas):
    """Target (tw, th) uniform ints in [lo, hi); the crop is rescaled keeping its aspect ratio so that
    its long side <= max(tw, th) and its short side <= min(tw, th) (mmcv's imrescale). Returns (w, h)."""
    tw, th = randint(g, *size_range), randint(g, *size_range)
    factor = min(max(tw, th) / max(crop_w, crop_h), min(tw, th) / min(crop_w, crop_h))
    return (min(max(int(crop_w * factor + 0.5), 1), canvas),
            min(max(int(crop_h * factor + 0.5), 1), canvas))


def to_rgb(image):
    """An 8-bit RGB copy of a decoded image. Pillow's convert("RGB") clips 16-bit, 32-bit integer and float
    images at 255 (a 16-bit grayscale PNG comes out white), so those are scaled to 0..255 first: 16-bit by
    its range (/257); integer and float by the range their values fit (0..1 floats, 0..255, 0..65535), else
    stretched from their minimum to their maximum (non-finite values black)."""
    mode = image.mode
    if mode.startswith("I;16"):
        gray = np.asarray(image).astype(np.float32) / 257.0
    elif mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        finite = np.isfinite(values)
        lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1:
            scale, offset = 255.0, 0.0
        elif lo >= 0 and hi <= 255:
            scale, offset = 1.0, 0.0
        elif lo >= 0 and hi <= 65535:
            scale, offset = 1 / 257.0, 0.0
        else:
            scale, offset = 255.0 / max(hi - lo, 1e-12), lo
        gray = np.where(finite, (values - offset) * scale, 0.0)
    else:
        return image.convert("RGB")
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


class ImageFiles:
    """Decodes images by index to RGB PIL images; an unreadable file gives None (counted and warned about
    once per process), so the caller draws another. Keeps up to `cache` decoded images. The paths are kept
    in a PathList (shared by forked workers rather than copied page by page)."""

    def __init__(self, paths, cache=0):
        self.paths, self.cache = PathList.of(paths), cache
        self.decoded, self.unreadable = {}, set()

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        if index in self.decoded:
            return self.decoded[index]
        if index in self.unreadable:
            return None
        try:
            with Image.open(self.paths[index]) as f:
                image = to_rgb(f)
            if min(image.size) < 2:
                raise ValueError(f"image is {image.size[0]}x{image.size[1]}")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            self.unreadable.add(index)
            warnings.warn(f"skipping unreadable image {self.paths[index]}: {e}", stacklevel=2)
            return None
        if len(self.decoded) < self.cache:
            self.decoded[index] = image
        return image

    def load_or_replace(self, index, g, tries=16):
        """The image at `index`, or if it is unreadable a random other one. Returns (image, skipped)."""
        for skipped in range(tries):
            image = self.load(index)
            if image is not None:
                return image, skipped
            index = randint(g, 0, len(self.paths))
        raise RuntimeError(f"{tries} unreadable images in a row: is the data source readable? "
                           f"({len(self.unreadable)} of {len(self.paths)} failed so far)")


class CopyPasteComposite(Dataset):
    """One InsLoc sample: foreground image `index % len(paths)`, a random crop of it pasted (hard
    rectangular overwrite) at a random place on a background resized to `image_size`, independently for
    the query and the key view, each view with its own random background; then MoCo v2's augmentations.

    Item: im_q, im_k [3, S, S] uint8 (augment.normalize makes the network's input); boxes_q, boxes_k [4] xyxy
    pixels; unreadable (images skipped)."""

    def __init__(self, paths, image_size=256, crop_scale=(0.2, 1.0), crop_ratio=(0.5, 2.0),
                 paste_size=(128, 255), samples_per_epoch=0, seed=0, decode_cache=0):
        self.images = ImageFiles(paths, decode_cache)
        self.image_size, self.crop_scale, self.crop_ratio = image_size, tuple(crop_scale), tuple(crop_ratio)
        self.paste_size, self.seed = tuple(paste_size), seed
        self.num_samples = samples_per_epoch or len(self.images)

    def __len__(self):
        return self.num_samples

    def view(self, foreground, g):
        S = self.image_size
        background, skipped = self.images.load_or_replace(randint(g, 0, len(self.images)), g)
        canvas = background.resize((S, S), Image.BILINEAR)  # resized, not cropped
        x, y, w, h = random_resized_crop_box(g, *foreground.size, self.crop_scale, self.crop_ratio)
        pw, ph = paste_size(g, w, h, self.paste_size, S)
        x1, y1 = randint(g, 0, S - pw + 1), randint(g, 0, S - ph + 1)
        canvas.paste(foreground.resize((pw, ph), Image.BILINEAR, box=(x, y, x + w, y + h)), (x1, y1))
        box = torch.tensor([x1, y1, x1 + pw, y1 + ph], dtype=torch.float32)  # [4]
        image, box = moco_v2_augment(canvas, box, g)
        return image, box, skipped

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        g = sample_generator(self.seed, epoch, index)
        foreground, skipped = self.images.load_or_replace(index % len(self.images), g)
        im_q, boxes_q, skipped_q = self.view(foreground, g)
        im_k, boxes_k, skipped_k = self.view(foreground, g)
        return {"im_q": im_q, "boxes_q": boxes_q, "im_k": im_k, "boxes_k": boxes_k,
                "unreadable": skipped + skipped_q + skipped_k}


class TwoViewCrops(CopyPasteComposite):
    """MoCo v2's sample: two RandomResizedCrop(image_size, scale=crop_scale) views of image
    `index % len(paths)`, each with the MoCo v2 augmentations. The boxes are the whole canvas."""

    def view(self, image, g):
        S = self.image_size
        x, y, w, h = random_resized_crop_box(g, *image.size, self.crop_scale, self.crop_ratio)
        crop = image.resize((S, S), Image.BILINEAR, box=(x, y, x + w, y + h))
        pixels, _ = moco_v2_augment(crop, None, g)
        return pixels, torch.tensor([0.0, 0.0, S, S]), 0


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a permutation of the epoch's samples seeded by (seed, epoch), this
    process's shard, truncated to whole batches of equal count on every process, from batch `start`."""

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_samples // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples per epoch make no batch of {batch_size} on each of "
                             f"{world_size} processes: raise --samples-per-epoch (samples_per_epoch; 0 takes one "
                             f"per image) or lower --batch-size (batch_size)")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __len__(self):
        return (self.batches_per_epoch - self.start) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[self.rank::self.world_size]
        order = order[self.start * self.batch_size: self.batches_per_epoch * self.batch_size]
        return ((self.epoch, i) for i in order.tolist())
