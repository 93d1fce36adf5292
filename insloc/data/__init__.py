"""Pretext data: image sources, the copy-paste composite, MoCo v2 views and augmentations."""
from .augment import moco_v2_augment, normalize
from .composite import CopyPasteComposite, EpochSampler, ImageFiles, TwoViewCrops
from .sources import builtin_image_paths, image_paths

__all__ = ["CopyPasteComposite", "TwoViewCrops", "EpochSampler", "ImageFiles", "moco_v2_augment", "normalize",
           "image_paths", "builtin_image_paths"]
