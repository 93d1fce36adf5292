"""Every knob of a pretraining run in one typed dataclass, and the presets.

The CLI (``insloc pretrain``) is generated from the fields of :class:`Config`: each field becomes a
``--flag`` with its type, default and the help text in ``metadata``. Precedence: preset < YAML file <
command-line flags. The recipe's numbers (recipe.md) are the defaults; presets change only what differs.
"""
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from insloc_ops.infonce import MIN_TEMPERATURE


def _f(default, help, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to train
    method: Literal["insloc", "moco"] = _f("insloc", "insloc: box-level InsLoc; moco: image-level MoCo v2 baseline")
    arch: Literal["fpn", "c4"] = _f("fpn", "insloc architecture: R-FPN (P2-P5, 4conv-2fc head) or R-C4 (res5 head)")
    depth: Literal[18, 50] = _f(50, "ResNet depth (torchvision definitions, random init)")
    fpn_channels: int = _f(256, "FPN width")
    head_fc_dim: int = _f(1024, "FPN box head fc width")
    head_norm: Literal["bn", "none"] = _f("bn", "FPN box head conv normalisation: bn (the recipe) or none")
    head_init: Literal["official", "torch"] = _f("official", "FPN box head initialisation: official (mmcv's "
                                                 "kaiming-normal convs, xavier fcs, N(0, 0.01) projection, zero "
                                                 "biases) or torch (PyTorch's layer defaults)")
    fpn_norm: Literal["bn", "none"] = _f("bn", "FPN lateral and output conv normalisation: bn (the official model: "
                                               "BatchNorm after each conv, no bias) or none (convs with bias)")
    dim: int = _f(128, "embedding dimension D")
    fpn_roi_size: int = _f(7, "RoIAlign output size on P2-P5")
    c4_roi_size: int = _f(14, "RoIAlign output size on res4")
    # MoCo
    queue_size: int = _f(65536, "negatives per queue K (one queue per FPN level)")
    momentum: float = _f(0.999, "key encoder momentum m")
    temperature: float = _f(0.2, "InfoNCE temperature T")
    shuffle_bn: bool = _f(True, "shuffle key images and boxes across processes (needs DDP)")
    # data: the copy-paste composite
    data: str = _f("builtin", "image source: 'builtin' (photos shipped in scikit-image/scikit-learn), "
                              "a folder (searched recursively) or a UTF-8 text file with one image path per line")
    image_size: int = _f(256, "canvas side (backgrounds are resized to it)")
    crop_scale: list[float] = _f([0.2, 1.0], "foreground crop area fraction range")
    crop_ratio: list[float] = _f([0.5, 2.0], "foreground crop aspect ratio range (log-uniform)")
    paste_size: list[int] = _f([128, 255], "pasted foreground target w, h: uniform ints in [lo, hi)")
    samples_per_epoch: int = _f(0, "composites per epoch (0: one per image of the source)")
    decode_cache: int = _f(0, "decoded images each worker keeps in memory (0: none; for small sources)")
    num_workers: int = _f(8, "DataLoader workers per process")
    # box augmentation (query only)
    anchor_stride: int = _f(16, "anchor grid stride")
    anchor_sizes: list[float] = _f([32.0, 64.0, 128.0, 256.0], "anchor sizes (pixels)")
    anchor_ratios: list[float] = _f([0.5, 0.75, 1.0, 1.5, 2.0], "anchor aspect ratios h/w")
    anchor_iou: float = _f(0.5, "an anchor replaces the box if IoU > this")
    anchor_nms_iou: float | None = _f(None, "none: a uniform pick among the anchors with IoU > anchor_iou (the "
                                            "paper); a number, e.g. 0.7: the official code's choice, random-score "
                                            "NMS at this IoU among them, then a uniform pick among the survivors")
    # optimisation
    epochs: int = _f(200, "epochs (may be raised on --resume)")
    batch_size: int = _f(32, "images per process")
    lr: float = _f(0.03, "learning rate for a global batch of lr_batch (scaled linearly)")
    lr_batch: int = _f(256, "global batch size for which --lr is given")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    sgd_momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum (the InsLoc recipe; MoCo v2 uses plain momentum)")
    # system
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)")
    bf16: bool = _f(True, "bfloat16 autocast (CUDA only)")
    channels_last: bool = _f(True, "channels_last memory format (CUDA only)")
    compile: bool = _f(False, "torch.compile the encoders")
    threads: int = _f(0, "CPU threads of the training process (0: torch's default); 1 avoids oversubscription "
                         "when DataLoader workers share a few cores")
    seed: int = _f(0, "seed of the model init, the data and the box augmentation")
    name: str = _f("insloc-r50-fpn", "the run's name (a preset's name by default): without --out-dir the run "
                                     "writes to runs/<name>")
    out_dir: str = _f("", "output folder (default runs/<name>; with --resume of a run's folder or file, that "
                          "run's folder)")
    resume: str = _f("", "'auto' (the checkpoint out_dir's latest file names, if any), a checkpoint "
                        "file, a run folder or its latest file (the checkpoint latest names), or '' (fresh)")
    log_every: int = _f(10, "steps between progress lines")
    checkpoint_every: int = _f(0, "steps between checkpoints, besides the end of every epoch (0: epochs only)")
    keep_checkpoints: int = _f(2, "checkpoints kept in out_dir (the newest ones)")
    plot: bool = _f(True, "write loss.png at the end")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """A Config from a mapping (a YAML file's): values are converted to the fields' types where that
        loses nothing (PyYAML reads ``1e-4`` as a string, ``3`` as an int for a float field)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _convert(name, hints[name], value) for name, value in d.items()})

    def validate(self):
        """Checks every field's type and range; a ValueError names the field (and its flag). Returns self."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _convert(f.name, hints[f.name], getattr(self, f.name), strict=True)
        positive = ("fpn_channels", "head_fc_dim", "dim", "fpn_roi_size", "c4_roi_size", "queue_size",
                    "image_size", "anchor_stride", "epochs", "batch_size", "lr_batch", "log_every",
                    "keep_checkpoints")
        for name in positive:
            _require(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        for name in ("samples_per_epoch", "decode_cache", "num_workers", "threads", "checkpoint_every"):
            _require(name, getattr(self, name), getattr(self, name) >= 0, "0 or more")
        for name in ("lr", "weight_decay"):
            _require(name, getattr(self, name), getattr(self, name) >= 0, "0 or more")
        _require("momentum", self.momentum, 0 <= self.momentum <= 1, "in [0, 1]")
        _require("sgd_momentum", self.sgd_momentum, 0 <= self.sgd_momentum < 1, "in [0, 1)")
        _require("seed", self.seed, 0 <= self.seed < 2**31, "in [0, 2**31)")
        _require("temperature", self.temperature, MIN_TEMPERATURE <= self.temperature < math.inf,
                 f"a finite number >= {MIN_TEMPERATURE}")
        _require("anchor_iou", self.anchor_iou, 0 <= self.anchor_iou < 1, "in [0, 1)")
        if self.anchor_nms_iou is not None:
            _require("anchor_nms_iou", self.anchor_nms_iou, 0 <= self.anchor_nms_iou <= 1, "in [0, 1] or none")
        _require("crop_scale", self.crop_scale, len(self.crop_scale) == 2 and
                 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "two numbers lo hi with 0 < lo <= hi <= 1")
        _require("crop_ratio", self.crop_ratio, len(self.crop_ratio) == 2 and
                 0 < self.crop_ratio[0] <= self.crop_ratio[1], "two numbers lo hi with 0 < lo <= hi")
        _require("paste_size", self.paste_size, len(self.paste_size) == 2 and (self.method != "insloc" or
                 1 <= self.paste_size[0] < self.paste_size[1] <= self.image_size + 1),
                 f"two integers lo hi with 1 <= lo < hi <= image_size + 1 = {self.image_size + 1} "
                 "(targets are drawn from [lo, hi))")
        for name in ("anchor_sizes", "anchor_ratios"):
            values = getattr(self, name)
            _require(name, values, len(values) >= 1 and all(v > 0 for v in values), "one or more positive numbers")
        _require("data", self.data, self.data != "", "'builtin', a folder or a list file")
        _require("name", self.name, self.name not in ("", ".", "..") and "/" not in self.name and
                 os.sep not in self.name, "a folder name (not a path)")
        _require("device", self.device, re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                 "auto, cpu, cuda or cuda:N")
        return self


# The fields that fix the encoder's weights (names and shapes): a checkpoint loads only into the architecture
# it was trained with.
ARCHITECTURE_FIELDS = ("method", "arch", "depth", "fpn_channels", "head_fc_dim", "head_norm", "fpn_norm", "dim",
                       "fpn_roi_size", "c4_roi_size")
# Architecture fields added after checkpoints were written without them: the value those checkpoints were
# trained with (the FPN neck had no norm before fpn_norm existed).
ADDED_FIELDS = {"head_norm": "bn", "fpn_norm": "none"}


def architecture_fields(method, arch):
    """The ARCHITECTURE_FIELDS that shape the encoder of `method` and `arch` (build_encoder's arguments):
    MoCo's global encoder has no FPN or RoI head, C4's no FPN; an unknown method or arch gives them all."""
    if method == "moco":
        return ("method", "depth", "dim")
    if method == "insloc" and arch == "c4":
        return ("method", "arch", "depth", "dim", "c4_roi_size")
    if method == "insloc" and arch == "fpn":
        return tuple(f for f in ARCHITECTURE_FIELDS if f != "c4_roi_size")
    return ARCHITECTURE_FIELDS


def with_added_fields(values):
    """A checkpoint's config dict with the fields it predates filled in (see ADDED_FIELDS)."""
    return {**{k: v for k, v in ADDED_FIELDS.items() if k not in values}, **values}


def architecture_mismatch(cfg, saved, fields=ARCHITECTURE_FIELDS):
    """The fields where a checkpoint's config dict ``saved`` differs from ``cfg``, as '--flag (field): X in
    the checkpoint, Y here' strings (empty: the checkpoint's weights fit cfg's model)."""
    saved = with_added_fields(saved)
    return [f"{_flag(name)}: {saved[name]!r} in the checkpoint, {getattr(cfg, name)!r} here"
            for name in fields if name in saved and saved[name] != getattr(cfg, name)]


class UsageError(ValueError):
    """A value that can be checked only once a run starts (the device, the data, the output folder, the
    checkpoint to resume): reported as a bad flag (exit status 2), before anything is trained or written."""


def _flag(name):
    return f"--{name.replace('_', '-')} ({name})"


def _require(name, value, ok, what):
    if not ok:
        raise ValueError(f"{_flag(name)} must be {what}, got {value!r}")


def _convert(name, hint, value, strict=False):
    """`value` as type `hint`: an int for a float field, a string holding a number (PyYAML reads 1e-4 that
    way) for a number field. strict: only check. A ValueError names the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (not strict and isinstance(value, str) and value.lower() == "none"):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value in args and type(value) is type(args[0]):
            return value
        raise ValueError(f"{_flag(name)} must be one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{_flag(name)} must be a list of {args[0].__name__}, got {value!r}")
        converted = [_convert(name, args[0], v, strict) for v in value]
        return value if strict else converted
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{_flag(name)} must be true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{_flag(name)} must be a string, got {value!r}")
    if hint in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str) and not strict:
            try:
                number = float(value) if hint is float else int(value)
            except ValueError:
                pass
        if isinstance(number, int) or (hint is float and isinstance(number, float)):
            if hint is float and not math.isfinite(number):
                raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
            return float(number) if hint is float and not strict else number
    raise ValueError(f"{_flag(name)} must be {'an integer' if hint is int else 'a number'}, got {value!r}")


def insloc_r50_fpn():
    """The released recipe: R50-FPN, 256x256 composites, 4 x 65,536 queues, 200 epochs, 32 per GPU."""
    return Config(method="insloc", arch="fpn", depth=50, name="insloc-r50-fpn")


def insloc_r50_c4():
    """R50-C4: RoIAlign 14x14 on res4, res5 head, one queue; otherwise the recipe."""
    return Config(method="insloc", arch="c4", depth=50, name="insloc-r50-c4")


def moco_r50():
    """The MoCo v2 baseline on the same trainer: 224x224 RandomResizedCrop views (area 0.2-1, aspect ratio
    3/4-4/3, torchvision's default) and SGD without Nesterov, as facebookresearch/moco's main_moco.py."""
    return Config(method="moco", depth=50, image_size=224, crop_ratio=[3 / 4, 4 / 3], nesterov=False,
                  name="moco-r50")


def demo():
    """ResNet-18 FPN on 128x128 composites of the built-in photographs: a few minutes on 2 CPU cores.

    The ~20 built-in images are far fewer than a batch schedule needs, so an epoch is a fixed number of
    composites (each image is the foreground samples_per_epoch / 21 times, on random backgrounds).
    Departures from the recipe for a 120-step single-process run: a 64-key queue (full after 4 steps),
    m = 0.99, lr 0.0075 for batch 16 (4x the recipe's linear scaling), one compute thread beside the two
    data workers, no BatchNorm in the box head (head_norm="none") or the FPN (fpn_norm="none"), and
    PyTorch's default initialisation of the box head (head_init="torch"). Measured on this setting: with the
    recipe's BN head (or GroupNorm) the query and key embeddings collapse within ~50 steps (mean key
    cosine -> 1.0, loss -> log(K+1)) and the loss rises; without it the keys spread out and the loss
    falls. Split-batch BN (emulated shuffle-BN) and m = 0.999 did not prevent the collapse. Epoch-mean
    loss over the 6 epochs, this preset: 16.62 -> 15.50, falling throughout; with the FPN's BatchNorm it
    bottoms out at 15.62 (epoch 4) and ends at 15.95; with the official head initialisation, 15.46
    (epoch 2) and 16.28; with both, 15.84 (epoch 3) and 16.38."""
    return Config(name="demo", method="insloc", arch="fpn", depth=18, fpn_channels=64, head_fc_dim=256,
                  head_norm="none", fpn_norm="none", head_init="torch",
                  image_size=128, paste_size=[64, 127], anchor_sizes=[16.0, 32.0, 64.0, 128.0],
                  queue_size=64, momentum=0.99, lr_batch=64, batch_size=16, epochs=6,
                  samples_per_epoch=320, decode_cache=32, num_workers=2, threads=1, log_every=5)


PRESETS = {"insloc-r50-fpn": insloc_r50_fpn, "insloc-r50-c4": insloc_r50_c4, "moco-r50": moco_r50,
           "demo": demo}
