"""MoCo v2's pixel augmentations on a PIL image (as MoCo v2 applies them), the box flipped with the image.

Every random draw comes from an explicit torch.Generator, so a sample is a pure function of its seed
(whatever the worker, the number of workers, or a resume)."""
import torch
from PIL import ImageFilter
from torchvision.transforms.v2 import functional as TF

# recipe.md: normalisation of RGB 0..255
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def uniform(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def chance(g, p):
    return float(torch.rand((), generator=g)) < p


def color_jitter(image, g, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """torchvision's ColorJitter: the four adjustments in a random order, each factor uniform."""
    b, c, s = (uniform(g, 1 - x, 1 + x) for x in (brightness, contrast, saturation))
    h = uniform(g, -hue, hue)
    for i in torch.randperm(4, generator=g).tolist():
        if i == 0:
            image = TF.adjust_brightness(image, b)
        elif i == 1:
            image = TF.adjust_contrast(image, c)
        elif i == 2:
            image = TF.adjust_saturation(image, s)
        else:
            image = TF.adjust_hue(image, h)
    return image


def moco_v2_augment(image, box, g):
    """image: RGB PIL image; box [4] xyxy pixels or None.
    ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur sigma in [0.1, 2] p=0.5, hflip p=0.5.
    Returns (image [3, H, W] uint8, box [4] or None); `normalize` makes the network's input of it."""
    if chance(g, 0.8):
        image = color_jitter(image, g)
    if chance(g, 0.2):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if chance(g, 0.5):
        image = image.filter(ImageFilter.GaussianBlur(radius=uniform(g, 0.1, 2.0)))  # MoCo v2's blur
    image = TF.pil_to_tensor(image)  # [3, H, W] uint8
    if chance(g, 0.5):
        image = TF.horizontal_flip(image)  # [3, H, W]
        if box is not None:
            W = image.shape[-1]
            box = torch.stack([W - box[2], box[1], W - box[0], box[3]])  # [4]
    return image, box


_NORMALIZE_CONSTANTS = {}


def normalize(images):
    """The samples' uint8 RGB images [..., 3, H, W] normalised to float32, where they are: the trainer does
    it after the copy to the GPU, so workers, shared memory and the host-to-device copy move a quarter of the
    bytes of float32 batches (the values are those of normalising in the workers: the same float32 ops)."""
    key = images.device
    if key not in _NORMALIZE_CONSTANTS:  # made once per device (a copy from pageable memory waits for the GPU)
        _NORMALIZE_CONSTANTS[key] = (MEAN.to(key), STD.to(key))
    mean, std = _NORMALIZE_CONSTANTS[key]
    return (images.to(torch.float32) - mean).div_(std)  # the same ops, one temporary fewer
