"""``insloc export``: a pretraining checkpoint -> weights a detector can start from.

Formats (one file each; ``OUT`` is the ``--out`` path):

``raw``
    ``torch.save({"encoder": encoder_q state dict, "config": Config dict, "epoch": ..., "step": ...})``.
    Load with :func:`load_raw_encoder` (builds the encoder from the config, loads strictly).
``torchvision``
    The ResNet trunk keyed exactly as ``torchvision.models.resnet{18,50}()`` minus ``fc`` (C4: the head's
    ``res5`` becomes ``layer4``). Every method and architecture. Loads strictly with::

        model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
        model.load_state_dict(torch.load(OUT))
``torchvision-fpn`` (FPN checkpoints only)
    Trunk and neck keyed for ``BackboneWithFPN``: ``body.*`` + ``fpn.inner_blocks.{i}.0.*`` (laterals)
    + ``fpn.layer_blocks.{i}.0.*`` (3x3 outputs), and with ``fpn_norm="bn"`` (the recipe's) their
    BatchNorms as ``fpn.inner_blocks.{i}.1.*`` / ``fpn.layer_blocks.{i}.1.*``; the extra
    ``LastLevelMaxPool`` level has no weights. It loads strictly into a ``BackboneWithFPN`` built with the
    same norm (``norm_layer=None`` for ``fpn_norm="none"``)::

        trunk = torchvision.models.resnet50()
        backbone = BackboneWithFPN(trunk, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [256, 512, 1024, 2048],
                                   256, extra_blocks=LastLevelMaxPool(), norm_layer=torch.nn.BatchNorm2d)
        backbone.load_state_dict(torch.load(OUT))
        model = torchvision.models.detection.FasterRCNN(backbone, num_classes=91)

    (``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone`` is the ``fpn_norm="none"``
    variant.) ``num_batches_tracked`` is kept: ``nn.BatchNorm2d`` (what torchvision builds without pretrained
    weights) needs it and ``FrozenBatchNorm2d`` drops it on load, so both load strictly.
``detectron2``
    A pickle of ``{"model": {name: numpy array}, "__author__": "insloc", "matching_heuristics": True}``
    with detectron2's names (recipe.md, "Transfer"): trunk -> ``backbone.bottom_up.*`` (FPN) or
    ``backbone.*`` (C4); C4 res5 -> ``roi_heads.res5``; FPN neck -> ``backbone.fpn_lateral{2..5}`` /
    ``backbone.fpn_output{2..5}`` (+ ``.norm`` with ``fpn_norm="bn"``: set detectron2's ``MODEL.FPN.NORM``
    to ``"BN"`` or ``"SyncBN"``, as the official transfer configs do); the FPN box head's four convs ->
    ``roi_heads.box_head.conv{1..4}`` (+ ``.norm``) and its first fc -> ``roi_heads.box_head.fc1``
    (detectron2's 4conv1fc head: set ``ROI_BOX_HEAD.NUM_CONV 4``, ``NUM_FC 1``, ``NORM`` ``"SyncBN"`` for
    ``head_norm="bn"``, ``""`` for ``"none"`` (convs with biases instead of ``.norm``); its
    default 2fc head has an ``fc1`` of the same shape and would load this one silently; the official InsLoc
    FPN configs use ``FastRCNNConvFCHeadExtraNorm``, registered by their ``train_net.py``: the same head plus a
    norm after fc1's ReLU that starts untrained, into which this export loads the same). The second fc and
    the 128-d projection have no detectron2 counterpart and are dropped. Image-level MoCo checkpoints
    (``--method moco``) export the trunk as MoCo's own converter does: ``stem.conv1.*``, ``res2.*`` ...
    ``res5.*`` without a prefix, which detectron2's matching heuristics place in either layout (C4: res5 into
    ``roi_heads.res5``); ``layout="fpn"`` / ``"c4"`` (``--layout``) writes the prefixed names of that layout
    instead.

    The pickle (protocol 4) names only ``numpy.ndarray`` and ``bytearray``, so it loads writable under
    numpy 1.x and 2.x alike, and ``OUT`` must end in ``.pkl`` (detectron2 reads other names with torch.load).

Every format writes half-precision weights as float32. The checkpoint may be given as a run folder or its
``latest`` file (:func:`resolve_checkpoint`). The momentum (key) encoder is exported only with
``include_momentum=True``: then a second file ``OUT`` with ``-momentum`` before the suffix holds it, in the
same format. Files are written atomically
(see insloc/checkpoint.py).
"""
import argparse
import dataclasses
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import checkpoint
from .checkpoint import atomic_write, is_run_file
from .config import ARCHITECTURE_FIELDS, Config, with_added_fields

FORMATS = ("raw", "torchvision", "torchvision-fpn", "detectron2")
Format = Literal["raw", "torchvision", "torchvision-fpn", "detectron2"]
Layout = Literal["fpn", "c4"]


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the flag (or the file) and what is wrong."""


class CheckpointError(ExportError):
    """A checkpoint that cannot be exported; the message names the file and what is wrong."""


@dataclass
class PretrainCheckpoint:
    """The parts of a pretraining checkpoint that an export reads."""

    path: Path
    config: Config
    encoder_q: dict[str, torch.Tensor]
    encoder_k: dict[str, torch.Tensor]
    epoch: int | None = None
    step: int | None = None

    @property
    def description(self):
        arch = "" if self.config.method == "moco" else f" arch={self.config.arch}"
        return f"method={self.config.method}{arch} ResNet-{self.config.depth}"


def _torch_load(path, safe_globals):
    if safe_globals is None:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(safe_globals):
        return torch.load(path, map_location="cpu", weights_only=True)


def _strip_wrappers(name):
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers add name segments; the weights are the same
    return ".".join(part for part in name.split(".") if part not in ("module", "_orig_mod"))


def expected_encoder_shapes(config):
    """{name: shape} of the encoder that ``config`` describes (built on the meta device: no memory)."""
    from .models import build_encoder

    with torch.device("meta"):
        encoder = build_encoder(config)
    return {name: tuple(t.shape) for name, t in encoder.state_dict().items()}


def _check_encoder(state, expected, path, which, description):
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} of the {len(expected)} {which} weights of a {description} encoder are "
            f"missing from the checkpoint, e.g. {', '.join(which + '.' + n for n in missing[:4])}")
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        raise CheckpointError(
            f"{path}: {which} has {len(unexpected)} weights that a {description} encoder does not have, "
            f"e.g. {', '.join(which + '.' + n for n in unexpected[:4])} (does the config match the weights?)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: {which}.{name} has shape {tuple(state[name].shape)} but a "
                                  f"{description} encoder expects {shape}")


def config_from_checkpoint(values, path="checkpoint"):
    """The checkpoint's Config. Fields this version does not know (a checkpoint from a newer or older
    trainer) are ignored with a warning; the fields that define the encoder must all be present."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: the 'config' entry is a {type(values).__name__}, expected a Config dict")
    values = with_added_fields(values)
    missing = [f for f in ARCHITECTURE_FIELDS if f not in values]
    if missing:
        raise CheckpointError(f"{path}: the 'config' entry lacks the architecture fields {missing}")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(f"{path}: ignoring config fields this insloc version does not know: {unknown}")
    try:
        return Config.from_dict({k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as e:
        first = e
    try:  # a value this version does not accept (a newer trainer's choice) in a field the weights do not depend on
        cfg = Config.from_dict({k: values[k] for k in ARCHITECTURE_FIELDS})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the 'config' entry is not an insloc Config: {e}") from e
    warnings.warn(f"{path}: the 'config' entry's fields besides the architecture are not all valid here ({first}); "
                  f"converting with the architecture fields only")
    return cfg


def _zip_magic(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def resolve_checkpoint(path):
    """The checkpoint file ``path`` stands for (see :func:`insloc.checkpoint.resolve_checkpoint`)."""
    try:
        return Path(checkpoint.resolve_checkpoint(path))
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e


def load_pretrain_checkpoint(path, unsafe_load=False, check_momentum=True) -> PretrainCheckpoint:
    """Reads and validates an ``insloc pretrain`` checkpoint (format: ``insloc/models/__init__.py``).

    ``path``: a checkpoint file, or a run folder or its ``latest`` file (see :func:`resolve_checkpoint`).
    Loads with ``weights_only=True`` (tensors, plain containers and the numpy RNG state);
    ``unsafe_load=True`` unpickles anything, for files you trust that hold other objects.
    ``check_momentum=False`` leaves the momentum encoder's weights unchecked (for exports without it)."""
    path = resolve_checkpoint(path)
    safe_globals = None if unsafe_load else checkpoint.numpy_rng_globals()  # outside the try: its errors are not the file's
    try:
        ckpt = _torch_load(path, safe_globals)
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError, BadZipFile... for bad bytes
        unsafe = [] if unsafe_load else checkpoint.unsafe_globals(path)
        if unsafe:
            raise CheckpointError(f"{path}: holds Python objects that are not loaded without trust "
                                  f"({', '.join(unsafe[:4])}); if you trust the file, pass unsafe_load=True "
                                  f"(--unsafe-load)") from e
        size = path.stat().st_size
        kind = ("empty" if not size else "truncated or corrupt" if zipfile.is_zipfile(path) or _zip_magic(path)
                else "not a torch checkpoint")
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0]) if str(e) else ""  # no terminal colours
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: the file is {kind} "
                              f"({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not an insloc checkpoint (a {type(ckpt).__name__}, expected a dict "
                              f"with 'model' and 'config')")
    for key in ("model", "config"):
        if key not in ckpt:
            found = ", ".join(map(repr, list(ckpt)[:8]))
            raise CheckpointError(f"{path}: not an insloc checkpoint: no {key!r} entry (found {found})")
    config = config_from_checkpoint(ckpt["config"], path)
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: not an insloc checkpoint: its 'model' entry is a "
                              f"{type(ckpt['model']).__name__}, expected a state dict")

    model = {_strip_wrappers(k): v for k, v in ckpt["model"].items()}
    encoders = {}
    for which in ("encoder_q", "encoder_k"):
        prefix = which + "."
        encoders[which] = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    if not encoders["encoder_q"]:
        raise CheckpointError(f"{path}: not an insloc checkpoint: 'model' has no encoder_q.* weights "
                              f"(found e.g. {', '.join(list(model)[:4])})")
    loaded = PretrainCheckpoint(path, config, encoders["encoder_q"], encoders["encoder_k"],
                                ckpt.get("epoch"), ckpt.get("step"))
    expected = expected_encoder_shapes(config)
    _check_encoder(loaded.encoder_q, expected, path, "encoder_q", loaded.description)
    if loaded.encoder_k and check_momentum:
        _check_encoder(loaded.encoder_k, expected, path, "encoder_k", loaded.description)
    return loaded


# ---- name mappings (our names are torchvision's; see insloc/models/__init__.py) ----

def torchvision_resnet_state_dict(encoder, config):
    """Encoder weights -> ``torchvision.models.resnet{depth}()`` keys without ``fc``."""
    trunk = {k[len("backbone."):]: v for k, v in encoder.items() if k.startswith("backbone.")}
    if config.method != "moco" and config.arch == "c4":
        trunk.update({"layer4." + k[len("head.res5."):]: v for k, v in encoder.items()
                      if k.startswith("head.res5.")})
    return trunk


# The FPN neck's module lists (insloc/models/fpn.py): which conv each belongs to, and whether it is its norm.
_NECK = {"lateral_convs": ("lateral", False), "lateral_norms": ("lateral", True),
         "output_convs": ("output", False), "output_norms": ("output", True)}


def torchvision_fpn_state_dict(encoder, config):
    """FPN encoder weights -> ``BackboneWithFPN`` keys (``fasterrcnn_resnet50_fpn(...).backbone``)."""
    out = {"body." + k: v for k, v in torchvision_resnet_state_dict(encoder, config).items()}
    for name, v in encoder.items():
        parts = name.split(".")
        if parts[0] == "neck":  # conv -> Conv2dNormActivation index 0, its norm -> index 1
            kind, is_norm = _NECK[parts[1]]
            block = {"lateral": "inner_blocks", "output": "layer_blocks"}[kind]
            out[f"fpn.{block}.{parts[2]}.{int(is_norm)}.{parts[3]}"] = v
    return out


def _detectron2_block_name(rest):
    """'0.bn2.weight' -> '0.conv2.norm.weight'; '0.downsample.1.bias' -> '0.shortcut.norm.bias'."""
    block, layer, *param = rest.split(".")
    if layer.startswith("bn"):
        return ".".join([block, "conv" + layer[2:], "norm", *param])
    if layer == "downsample":
        index, *param = param
        return ".".join([block, "shortcut", *(["norm"] if index == "1" else []), *param])
    return rest


def _detectron2_trunk_name(name, layout):
    """torchvision trunk key -> detectron2 key. ``layer4`` (res5) is the RoI head in the C4 layout; layout
    None: no prefix (MoCo's converter's names, which detectron2's matching heuristics place)."""
    backbone = {"fpn": "backbone.bottom_up.", "c4": "backbone.", None: ""}[layout]
    stage, rest = name.split(".", 1)
    if stage in ("conv1", "bn1"):
        return backbone + "stem.conv1" + (".norm." if stage == "bn1" else ".") + rest
    res = f"res{int(stage[len('layer'):]) + 1}"
    if layout == "c4" and res == "res5":
        return "roi_heads.res5." + _detectron2_block_name(rest)
    return f"{backbone}{res}.{_detectron2_block_name(rest)}"


def detectron2_state_dict(encoder, config, layout):
    """Encoder weights -> detectron2 names (torch tensors; :func:`export` converts them to numpy)."""
    out = {_detectron2_trunk_name(k, layout): v
           for k, v in torchvision_resnet_state_dict(encoder, config).items()}
    if config.method == "moco":
        return out
    for name, v in encoder.items():
        parts = name.split(".")
        if parts[0] == "neck":
            kind, is_norm = _NECK[parts[1]]
            out[f"backbone.fpn_{kind}{int(parts[2]) + 2}{'.norm' if is_norm else ''}.{parts[3]}"] = v
        elif parts[:2] == ["head", "convs"]:
            conv = f"roi_heads.box_head.conv{int(parts[2]) + 1}"
            out[conv + (".norm." if parts[3] == "1" else ".") + ".".join(parts[4:])] = v
        elif parts[:2] == ["head", "fc1"]:
            out["roi_heads.box_head.fc1." + parts[2]] = v
    return out


# ---- writing ----

class _PortablePickler(pickle.Pickler):
    """numpy pickles an array through a private module (numpy._core.multiarray under numpy 2,
    numpy.core.multiarray under 1.x) that the other major version cannot import; ``numpy.ndarray(shape,
    dtype, buffer)`` loads under any. A bytearray buffer: the array loads writable (``torch.from_numpy``,
    which detectron2 calls on it, warns on read-only arrays)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):  # tobytes: C order, whatever the strides
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(obj.tobytes()))
        return NotImplemented


def _save_detectron2(obj, f):
    _PortablePickler(f, protocol=4).dump(obj)  # protocol 4: any Python 3 reads it, and >4 GiB arrays fit


def _filesystem_error(e):
    """The OSError behind a failed write: `e` itself, or the one torch.save's C++ writer turned into a
    RuntimeError ("enforce fail at inline_container.cc ... unexpected pos", raised while handling the OSError of
    the file object's write); None for a RuntimeError that did not come from the file."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _atomic_save(path, write):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except (OSError, RuntimeError) as error:  # a directory, a parent that is a file, no permission, a full disk
        e = _filesystem_error(error)
        if e is None:
            raise
        temporary = e.filename and Path(e.filename).name.startswith(".tmp_")  # atomic_write's, not the user's
        detail = f"{e.filename}: {e.strerror}" if e.filename and e.strerror and not temporary else e.strerror or e
        raise ExportError(f"--out (out_path) {path}: cannot write it ({detail})") from e


def _check_request(fmt, out_path, layout):
    """What can be refused before the checkpoint is read."""
    if fmt not in FORMATS:
        raise ExportError(f"--format (fmt) {fmt!r}: unknown (expected one of {', '.join(FORMATS)})")
    if layout is not None and fmt != "detectron2":
        raise ExportError(f"--layout (layout) {layout!r} applies only to --format detectron2, not {fmt}")
    if layout not in (None, "fpn", "c4"):
        raise ExportError(f"--layout (layout) {layout!r}: expected 'fpn' or 'c4'")
    if fmt == "detectron2" and not out_path.name.endswith(".pkl"):
        raise ExportError(f"--out (out_path) {out_path}: a detectron2 export must end in .pkl (detectron2 "
                          f"reads other names as torch checkpoints)")


def _check_format(ckpt, fmt, layout):
    is_fpn = ckpt.config.method == "insloc" and ckpt.config.arch == "fpn"
    if fmt == "torchvision-fpn" and not is_fpn:
        raise CheckpointError(f"{ckpt.path}: format 'torchvision-fpn' needs an FPN checkpoint "
                              f"(method=insloc arch=fpn); this one is {ckpt.description}: "
                              f"use --format torchvision for the ResNet trunk")
    if fmt == "detectron2" and layout is not None and ckpt.config.method != "moco" and layout != ckpt.config.arch:
        raise CheckpointError(f"{ckpt.path}: a {ckpt.description} checkpoint cannot be exported in the "
                              f"detectron2 {layout} layout (only image-level MoCo trunks fit either)")
    c4_head = ckpt.config.arch == "c4" if ckpt.config.method != "moco" else layout != "fpn"
    if fmt == "detectron2" and ckpt.config.depth < 50 and c4_head:
        # detectron2 builds a C4 model's res5 (roi_heads.res5) of bottleneck blocks at every depth: basic blocks
        # are not loaded there (matching_heuristics skips what does not fit, with a warning in its log).
        warnings.warn(f"{ckpt.path}: a ResNet-{ckpt.config.depth} res5 does not fit detectron2's C4 RoI head "
                      f"(bottleneck blocks at every depth): only the stem and res2-res4 will load into a C4 model")


def _numpy(tensor):
    # numpy has no bfloat16; half and 8-bit floats become float32, which detectron2's models hold anyway
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()
    return tensor.numpy()


def _float32(tensor):
    """Half-precision floats (bf16, fp16, 8-bit) as float32, what the models that load an export hold."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


def _converted(ckpt, encoder, fmt, layout):
    contiguous = {k: _float32(v.detach().cpu()).contiguous() for k, v in encoder.items()}
    if fmt == "raw":
        return {"encoder": contiguous, "config": ckpt.config.to_dict(), "epoch": ckpt.epoch, "step": ckpt.step}
    if fmt == "torchvision":
        return torchvision_resnet_state_dict(contiguous, ckpt.config)
    if fmt == "torchvision-fpn":
        return torchvision_fpn_state_dict(contiguous, ckpt.config)
    model = detectron2_state_dict(contiguous, ckpt.config, layout)
    return {"model": {k: _numpy(v) for k, v in model.items()}, "__author__": "insloc",
            "matching_heuristics": True}


def momentum_path(out_path):
    """Where ``include_momentum=True`` writes the key encoder: ``x.pkl`` -> ``x-momentum.pkl``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}-momentum{out_path.suffix}")


def export(ckpt_path, fmt: Format, out_path, include_momentum=False, layout: Layout | None = None,
           unsafe_load=False) -> list[Path]:
    """Writes the query encoder of ``ckpt_path`` in format ``fmt`` to ``out_path`` (and, with
    ``include_momentum``, the key encoder next to it, see :func:`momentum_path`). ``layout``: the
    detectron2 layout, default the checkpoint's arch (MoCo: no prefix, see the module docstring). Returns
    the written paths."""
    out_path = Path(out_path)
    _check_request(fmt, out_path, layout)
    ckpt_path = resolve_checkpoint(ckpt_path)
    outputs = [out_path] + ([momentum_path(out_path)] if include_momentum else [])
    for path in outputs:
        if path.is_dir():
            raise ExportError(f"--out (out_path) {path}: is a directory; give the file to write")
        if path.exists() and os.path.samefile(path, ckpt_path):
            raise ExportError(f"--out (out_path) {path}: is the checkpoint being exported; writing it would "
                              f"replace the checkpoint")
        if path.exists() and is_run_file(path.name):
            raise ExportError(f"--out (out_path) {path}: is a file of a pretraining run (a checkpoint or its "
                              f"'latest'); give another name")
    ckpt = load_pretrain_checkpoint(ckpt_path, unsafe_load, check_momentum=include_momentum)
    _check_format(ckpt, fmt, layout)
    if ckpt.config.method != "moco":
        layout = layout or ckpt.config.arch
    encoders = [ckpt.encoder_q]
    if include_momentum:
        if not ckpt.encoder_k:
            raise CheckpointError(f"{ckpt.path}: include_momentum was asked for but the checkpoint has no "
                                  f"encoder_k.* weights")
        encoders.append(ckpt.encoder_k)
    converted = [_converted(ckpt, encoder, fmt, layout) for encoder in encoders]  # both before writing either
    new = [not path.exists() for path in outputs]
    written = []
    try:
        for path, obj in zip(outputs, converted):
            if fmt == "detectron2":
                _atomic_save(path, lambda f, obj=obj: _save_detectron2(obj, f))
            else:
                _atomic_save(path, lambda f, obj=obj: torch.save(obj, f))
            written.append(path)
    except BaseException:  # ExportError, or anything else (an interrupt) between the two files
        for path, was_new in zip(written, new):  # a first file this call created goes with the failed second
            if was_new:
                path.unlink(missing_ok=True)
        raise
    return outputs


def load_raw_encoder(path):
    """A ``raw`` export -> (the encoder module with its weights, its Config)."""
    from .models import build_encoder

    raw = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_checkpoint(raw["config"], path)
    encoder = build_encoder(config)
    encoder.load_state_dict(raw["encoder"])
    return encoder, config


def export_main(argv=None):
    """``insloc export CKPT --format FORMAT --out FILE``."""
    parser = argparse.ArgumentParser(
        prog="insloc export", description="Export a pretraining checkpoint's query encoder for fine-tuning.",
        epilog="Formats and how to load each: see the docstring of insloc/export.py.")
    parser.add_argument("checkpoint", help="checkpoint written by insloc pretrain, or a run folder (or its "
                                           "'latest' file): the checkpoint 'latest' names")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="raw: our encoder; torchvision: resnet trunk; torchvision-fpn: BackboneWithFPN "
                             "(FPN only); detectron2: pickle for DetectionCheckpointer")
    parser.add_argument("--out", required=True, help="output file (detectron2: ending in .pkl)")
    parser.add_argument("--include-momentum", action="store_true",
                        help="also write the momentum (key) encoder to OUT-momentum.SUFFIX")
    parser.add_argument("--layout", choices=("fpn", "c4"), default=None,
                        help="detectron2 only: the prefixed names of this layout for an image-level --method "
                             "moco checkpoint (default: unprefixed stem/res2..res5, placed by detectron2)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle arbitrary objects in the checkpoint (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        source = resolve_checkpoint(args.checkpoint)
        paths = export(source, args.fmt, args.out, args.include_momentum, args.layout, args.unsafe_load)
    except ExportError as e:
        print(f"insloc export: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path} ({args.fmt}, from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
