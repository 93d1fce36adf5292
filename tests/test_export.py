import os
import pickle
import re
import zipfile
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from insloc.config import Config
from insloc.export import CheckpointError, ExportError, export, export_main, load_raw_encoder, momentum_path
from random_checkpoints import (R18_FPN_DEMO, R50_C4, R50_FPN, R50_FPN_NO_NORM, R50_MOCO, make_checkpoint,
                                write_checkpoint)

IMAGES = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (path, query encoder)} for the architectures, written once per module."""
    folder = tmp_path_factory.mktemp("ckpt")
    return {name: (folder / f"{name}.pt", write_checkpoint(folder / f"{name}.pt", cfg, seed=i))
            for i, (name, cfg) in enumerate({"r50_fpn": R50_FPN, "r50_c4": R50_C4, "r50_moco": R50_MOCO,
                                             "r18_fpn": R18_FPN_DEMO, "r50_fpn_no_norm": R50_FPN_NO_NORM}.items())}


def torchvision_fpn_backbone(encoder, trunk):
    """A BackboneWithFPN shaped like the encoder: its trunk, widths, and FPN norm (BatchNorm or none)."""
    norm = nn.BatchNorm2d if isinstance(encoder.neck.lateral_norms[0], nn.BatchNorm2d) else None
    return BackboneWithFPN(trunk, {f"layer{i + 1}": str(i) for i in range(4)}, encoder.backbone.out_channels,
                           encoder.neck.output_convs[0].out_channels, extra_blocks=LastLevelMaxPool(),
                           norm_layer=norm)


def stage_outputs(model, x):
    """C2..C5 of a torchvision ResNet run through its own forward (captured with hooks), and the output."""
    captured = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, a, out: captured.append(out))
             for i in range(1, 5)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return captured, out


# ---- torchvision ----

@pytest.mark.parametrize("name, tv_resnet", [("r50_fpn", torchvision.models.resnet50),
                                             ("r50_moco", torchvision.models.resnet50),
                                             ("r18_fpn", torchvision.models.resnet18)])
def test_torchvision_export_loads_strictly_and_reproduces_the_backbone_features(name, tv_resnet, checkpoints,
                                                                                 tmp_path):
    path, encoder = checkpoints[name]
    export(path, "torchvision", tmp_path / "tv.pth")
    model = tv_resnet()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "tv.pth"), strict=True)
    model.eval()
    stages, pooled = stage_outputs(model, IMAGES)
    with torch.no_grad():
        ours = encoder.backbone(IMAGES)
    for theirs, mine in zip(stages, ours, strict=True):
        assert torch.equal(theirs, mine)
    torch.testing.assert_close(pooled, ours[-1].mean((2, 3)))


def test_torchvision_export_of_c4_puts_res5_in_layer4_and_reproduces_res4_and_res5(checkpoints, tmp_path):
    path, encoder = checkpoints["r50_c4"]
    export(path, "torchvision", tmp_path / "tv.pth")
    model = torchvision.models.resnet50()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "tv.pth"), strict=True)
    model.eval()
    stages, _ = stage_outputs(model, IMAGES)
    with torch.no_grad():
        res4 = encoder.backbone(IMAGES)[-1]
        res5 = encoder.head.res5(res4)
    assert torch.equal(stages[2], res4)
    assert torch.equal(stages[3], res5)


@pytest.mark.parametrize("name", ["r50_fpn", "r50_fpn_no_norm"])
def test_torchvision_fpn_export_loads_strictly_into_a_faster_rcnn_backbone_and_reproduces_p2_to_p6(
        name, checkpoints, tmp_path):
    # fpn_norm="bn": a BackboneWithFPN with norm_layer=BatchNorm2d; "none": fasterrcnn_resnet50_fpn's own
    path, encoder = checkpoints[name]
    export(path, "torchvision-fpn", tmp_path / "fpn.pth")
    if name == "r50_fpn_no_norm":
        backbone = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
    else:
        backbone = torchvision_fpn_backbone(encoder, torchvision.models.resnet50())
        torchvision.models.detection.FasterRCNN(backbone, num_classes=2)  # the detector takes it
    backbone.load_state_dict(torch.load(tmp_path / "fpn.pth"), strict=True)
    backbone.eval()
    with torch.no_grad():
        theirs = backbone(IMAGES)
        body = backbone.body(IMAGES)
        ours_c = encoder.backbone(IMAGES)
        ours_p = encoder.neck(ours_c)
    assert list(theirs) == ["0", "1", "2", "3", "pool"]
    for i in range(4):
        assert torch.equal(body[str(i)], ours_c[i])
        assert torch.equal(theirs[str(i)], ours_p[i])
    assert torch.equal(theirs["pool"], nn.functional.max_pool2d(ours_p[3], 1, 2))


@pytest.mark.parametrize("name, depth", [("r50_fpn", "resnet50"), ("r18_fpn", "resnet18")])
def test_torchvision_fpn_export_loads_strictly_with_frozen_batchnorm(name, depth, checkpoints, tmp_path):
    path, encoder = checkpoints[name]
    export(path, "torchvision-fpn", tmp_path / "fpn.pth")
    trunk = getattr(torchvision.models, depth)(norm_layer=FrozenBatchNorm2d)
    backbone = torchvision_fpn_backbone(encoder, trunk).eval()
    backbone.load_state_dict(torch.load(tmp_path / "fpn.pth"), strict=True)
    with torch.no_grad():
        theirs = backbone(IMAGES)
        ours = encoder.neck(encoder.backbone(IMAGES))
    for i in range(4):  # FrozenBatchNorm2d folds scale and shift: equal up to float32 rounding over ~50 layers
        scale = ours[i].abs().max().item()
        torch.testing.assert_close(theirs[str(i)], ours[i], rtol=1e-4, atol=1e-4 * scale)


def test_torchvision_fpn_export_of_a_c4_or_moco_checkpoint_is_refused(checkpoints, tmp_path):
    for name in ("r50_c4", "r50_moco"):
        with pytest.raises(CheckpointError, match="needs an FPN checkpoint"):
            export(checkpoints[name][0], "torchvision-fpn", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


# ---- detectron2: expected names and shapes written out from detectron2's conventions ----

def _norm(prefix, channels, norm):
    buffers = ["weight", "bias", "running_mean", "running_var"]
    shapes = {f"{prefix}.norm.{b}": (channels,) for b in buffers}
    if norm == "SyncBN":  # torch BatchNorm buffers; FrozenBN has no num_batches_tracked
        shapes[f"{prefix}.norm.num_batches_tracked"] = ()
    return shapes


def _conv(prefix, out_c, in_c, k, norm):
    return {f"{prefix}.weight": (out_c, in_c, k, k), **_norm(prefix, out_c, norm)}


def detectron2_resnet_shapes(depth, stem_prefix, stage_prefixes, norm="SyncBN"):
    """detectron2 ResNet (BasicStem, BasicBlock / BottleneckBlock, shortcut when in != out channels)."""
    shapes = _conv(stem_prefix + "stem.conv1", 64, 3, 7, norm)
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    in_c = 64
    for stage, (count, prefix) in enumerate(zip(blocks, stage_prefixes)):
        out_c = 64 * 2 ** stage * (4 if depth == 50 else 1)
        mid = 64 * 2 ** stage
        for b in range(count):
            block = f"{prefix}.{b}"
            if in_c != out_c:
                shapes.update(_conv(block + ".shortcut", out_c, in_c, 1, norm))
            if depth == 50:
                shapes.update(_conv(block + ".conv1", mid, in_c, 1, norm))
                shapes.update(_conv(block + ".conv2", mid, mid, 3, norm))
                shapes.update(_conv(block + ".conv3", out_c, mid, 1, norm))
            else:
                shapes.update(_conv(block + ".conv1", out_c, in_c, 3, norm))
                shapes.update(_conv(block + ".conv2", out_c, out_c, 3, norm))
            in_c = out_c
    return shapes


def detectron2_r_fpn_shapes(depth, fpn_channels=256, fc_dim=1024, pooler=7, norm="SyncBN", fpn_norm=True):
    """GeneralizedRCNN with build_resnet_fpn_backbone (FPN.NORM = norm if fpn_norm, else "": convs with
    bias) and a FastRCNNConvFCHead (NUM_CONV 4, NUM_FC 1, NORM SyncBN): the pretrained parts (no RPN, no
    box predictor)."""
    shapes = detectron2_resnet_shapes(depth, "backbone.bottom_up.",
                                      [f"backbone.bottom_up.res{s}" for s in range(2, 6)], norm)
    widths = [64 * 2 ** s * (4 if depth == 50 else 1) for s in range(4)]
    for stage, c in zip(range(2, 6), widths):
        if fpn_norm:
            shapes.update(_conv(f"backbone.fpn_lateral{stage}", fpn_channels, c, 1, norm))
            shapes.update(_conv(f"backbone.fpn_output{stage}", fpn_channels, fpn_channels, 3, norm))
            continue
        shapes[f"backbone.fpn_lateral{stage}.weight"] = (fpn_channels, c, 1, 1)
        shapes[f"backbone.fpn_lateral{stage}.bias"] = (fpn_channels,)
        shapes[f"backbone.fpn_output{stage}.weight"] = (fpn_channels, fpn_channels, 3, 3)
        shapes[f"backbone.fpn_output{stage}.bias"] = (fpn_channels,)
    for k in range(1, 5):
        shapes.update(_conv(f"roi_heads.box_head.conv{k}", fpn_channels, fpn_channels, 3, norm))
    shapes["roi_heads.box_head.fc1.weight"] = (fc_dim, fpn_channels * pooler * pooler)
    shapes["roi_heads.box_head.fc1.bias"] = (fc_dim,)
    return shapes


def detectron2_r_c4_shapes(depth, norm="SyncBN"):
    """GeneralizedRCNN with build_resnet_backbone (res2..res4) and Res5ROIHeads (roi_heads.res5)."""
    return detectron2_resnet_shapes(depth, "backbone.", ["backbone.res2", "backbone.res3", "backbone.res4",
                                                         "roi_heads.res5"], norm)


def load_detectron2(path):
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="latin1")  # how detectron2 reads .pkl files
    assert obj["matching_heuristics"] is True and obj["__author__"] == "insloc"
    assert all(isinstance(v, np.ndarray) for v in obj["model"].values())
    return obj["model"]


@pytest.mark.parametrize("name, expected", [
    ("r50_fpn", detectron2_r_fpn_shapes(50)),
    ("r50_c4", detectron2_r_c4_shapes(50)),
    ("r18_fpn", detectron2_r_fpn_shapes(18, fpn_channels=64, fc_dim=256, fpn_norm=False)),
])
def test_detectron2_export_has_exactly_detectron2s_names_and_shapes(name, expected, checkpoints, tmp_path):
    export(checkpoints[name][0], "detectron2", tmp_path / "d2.pkl")
    model = load_detectron2(tmp_path / "d2.pkl")
    assert sorted(set(expected) - set(model)) == []
    assert sorted(set(model) - set(expected)) == []
    wrong = {k: (model[k].shape, s) for k, s in expected.items() if model[k].shape != s}
    assert wrong == {}


def test_detectron2_export_against_frozen_bn_differs_only_by_num_batches_tracked(checkpoints, tmp_path):
    export(checkpoints["r50_c4"][0], "detectron2", tmp_path / "d2.pkl")
    extras = set(load_detectron2(tmp_path / "d2.pkl")) - set(detectron2_r_c4_shapes(50, norm="FrozenBN"))
    assert extras and all(k.endswith(".norm.num_batches_tracked") for k in extras)


def test_detectron2_export_values_come_from_the_right_weights(checkpoints, tmp_path):
    path, encoder = checkpoints["r50_fpn"]
    export(path, "detectron2", tmp_path / "d2.pkl")
    model = load_detectron2(tmp_path / "d2.pkl")
    sd = encoder.state_dict()
    pairs = {"backbone.bottom_up.stem.conv1.norm.running_var": "backbone.bn1.running_var",
             "backbone.bottom_up.res3.0.shortcut.weight": "backbone.layer2.0.downsample.0.weight",
             "backbone.bottom_up.res3.0.shortcut.norm.bias": "backbone.layer2.0.downsample.1.bias",
             "backbone.bottom_up.res5.2.conv3.norm.weight": "backbone.layer4.2.bn3.weight",
             "backbone.fpn_lateral3.weight": "neck.lateral_convs.1.weight",
             "backbone.fpn_output5.norm.bias": "neck.output_norms.3.bias",
             "backbone.fpn_lateral2.norm.running_var": "neck.lateral_norms.0.running_var",
             "roi_heads.box_head.conv4.weight": "head.convs.3.0.weight",
             "roi_heads.box_head.conv1.norm.running_mean": "head.convs.0.1.running_mean",
             "roi_heads.box_head.fc1.weight": "head.fc1.weight"}
    for d2_name, our_name in pairs.items():
        np.testing.assert_array_equal(model[d2_name], sd[our_name].numpy())
    r18_path, r18_encoder = checkpoints["r18_fpn"]  # fpn_norm="none": the convs' biases
    export(r18_path, "detectron2", tmp_path / "r18.pkl")
    np.testing.assert_array_equal(load_detectron2(tmp_path / "r18.pkl")["backbone.fpn_output5.bias"],
                                  r18_encoder.neck.output_convs[3].bias.detach().numpy())
    c4_path, c4_encoder = checkpoints["r50_c4"]
    export(c4_path, "detectron2", tmp_path / "c4.pkl")
    np.testing.assert_array_equal(load_detectron2(tmp_path / "c4.pkl")["roi_heads.res5.0.conv2.weight"],
                                  c4_encoder.head.res5[0].conv2.weight.detach().numpy())


def our_name_of_detectron2(name):
    """The encoder key a detectron2 key comes from, written from detectron2's naming rather than from the
    exporter's table: the stem, res2..res5 (C4: roi_heads.res5 is our head's res5), bottleneck or basic blocks
    (convN.norm is bnN, shortcut is downsample), the FPN's laterals and outputs with their norms, the box head."""
    rules = [
        (r"(?:backbone\.bottom_up\.|backbone\.)?stem\.conv1\.weight", "backbone.conv1.weight"),
        (r"(?:backbone\.bottom_up\.|backbone\.)?stem\.conv1\.norm\.(\w+)", r"backbone.bn1.\1"),
        (r"roi_heads\.res5\.(.*)", r"head.res5.\1"),
        (r"(?:backbone\.bottom_up\.|backbone\.)?res(\d)\.(.*)", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}"),
        (r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", lambda m: f"neck.{m[1]}_convs.{int(m[2]) - 2}.{m[3]}"),
        (r"backbone\.fpn_(lateral|output)(\d)\.norm\.(\w+)", lambda m: f"neck.{m[1]}_norms.{int(m[2]) - 2}.{m[3]}"),
        (r"roi_heads\.box_head\.conv(\d)\.(weight|bias)", lambda m: f"head.convs.{int(m[1]) - 1}.0.{m[2]}"),
        (r"roi_heads\.box_head\.conv(\d)\.norm\.(\w+)", lambda m: f"head.convs.{int(m[1]) - 1}.1.{m[2]}"),
        (r"roi_heads\.box_head\.fc1\.(\w+)", r"head.fc1.\1"),
    ]
    for pattern, replacement in rules:
        m = re.fullmatch(pattern, name)
        if m:
            ours = m.expand(replacement) if isinstance(replacement, str) else replacement(m)
            break
    else:
        raise AssertionError(f"no rule for {name}")
    if ours.startswith(("backbone.layer", "head.res5.")):  # inside a block
        ours = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", ours)
        ours = ours.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.weight", ".downsample.0.weight")
    return ours


@pytest.mark.parametrize("name", ["r50_fpn", "r50_c4", "r18_fpn", "r50_moco"])
def test_every_detectron2_value_comes_from_its_weight(name, checkpoints, tmp_path):
    # Each exported array equals the encoder weight that detectron2's name designates, and no two names share
    # one (two weights of the same shape swapped, e.g. bn1 and bn2 of a basic block, fail here).
    path, encoder = checkpoints[name]
    export(path, "detectron2", tmp_path / "d2.pkl")
    model = load_detectron2(tmp_path / "d2.pkl")
    sd = encoder.state_dict()
    ours = {k: our_name_of_detectron2(k) for k in model}
    assert len(set(ours.values())) == len(ours)
    wrong = [k for k, v in model.items() if not np.array_equal(v, sd[ours[k]].numpy())]
    assert wrong == []
    # every encoder weight a detector has is exported: all but the projection (the FPN head's fc2 and fc3, the
    # MLP after C4's res5 or MoCo's pooled trunk)
    left = sorted(set(sd) - set(ours.values()))
    assert left and all(k.startswith(("head.fc2.", "head.fc3.", "head.mlp.")) for k in left), left


def test_detectron2_export_of_a_moco_trunk_has_moco_converters_unprefixed_names(checkpoints, tmp_path):
    # facebookresearch/moco detection/convert-pretrain-to-detectron2.py: stem.conv1.*, res2..res5.*, which
    # detectron2's matching heuristics place in an FPN (backbone.bottom_up.*) or a C4 (res5 in roi_heads) model
    path, encoder = checkpoints["r50_moco"]
    export(path, "detectron2", tmp_path / "d2.pkl")
    model = load_detectron2(tmp_path / "d2.pkl")
    expected = {k.split(".", 1)[1]: s for k, s in detectron2_r_c4_shapes(50).items()}
    assert set(model) == set(expected)
    assert all(model[k].shape == s for k, s in expected.items())
    sd = encoder.state_dict()
    for name, ours in [("res5.2.conv3.norm.weight", "backbone.layer4.2.bn3.weight"),
                       ("stem.conv1.weight", "backbone.conv1.weight")]:
        np.testing.assert_array_equal(model[name], sd[ours].numpy())


@pytest.mark.parametrize("layout, expected", [("c4", detectron2_r_c4_shapes(50)),
                                              ("fpn", None)])
def test_detectron2_export_of_a_moco_trunk_in_a_layout_asked_for(layout, expected, checkpoints, tmp_path):
    out = tmp_path / "d2.pkl"
    assert export_main([str(checkpoints["r50_moco"][0]), "--format", "detectron2", "--layout", layout,
                        "--out", str(out)]) == 0
    model = load_detectron2(out)
    if expected is None:
        expected = {k: s for k, s in detectron2_r_fpn_shapes(50).items() if k.startswith("backbone.bottom_up.")}
    assert set(model) == set(expected)


def test_detectron2_layout_other_than_the_insloc_arch_is_refused(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="cannot be exported in the detectron2 fpn layout"):
        export(checkpoints["r50_c4"][0], "detectron2", tmp_path / "d2.pkl", layout="fpn")


def test_detectron2_export_of_a_resnet18_res5_for_a_c4_head_warns(checkpoints, tmp_path):
    # detectron2's C4 RoI head (roi_heads.res5) is made of bottleneck blocks at every depth
    write_checkpoint(tmp_path / "r18c4.pt", Config(method="insloc", arch="c4", depth=18))
    write_checkpoint(tmp_path / "r18moco.pt", Config(method="moco", depth=18))
    for path, layout in (("r18c4.pt", None), ("r18moco.pt", "c4"), ("r18moco.pt", None)):
        with pytest.warns(UserWarning, match="ResNet-18 res5 does not fit detectron2's C4 RoI head"):
            export(tmp_path / path, "detectron2", tmp_path / "d2.pkl", layout=layout)
    with warnings.catch_warnings():  # an FPN model holds basic blocks; R50's res5 fits the C4 head
        warnings.simplefilter("error")
        export(checkpoints["r18_fpn"][0], "detectron2", tmp_path / "d2.pkl")
        export(tmp_path / "r18moco.pt", "detectron2", tmp_path / "d2.pkl", layout="fpn")
        export(checkpoints["r50_c4"][0], "detectron2", tmp_path / "d2.pkl")


def test_detectron2_pickle_names_only_numpy_ndarray_and_loads_writable_arrays(checkpoints, tmp_path):
    # numpy's own array pickles name numpy._core.multiarray (numpy 2) or numpy.core.multiarray (1.x), which
    # the other major version cannot import; numpy.ndarray and bytearray exist under both
    path, encoder = checkpoints["r18_fpn"]
    export(path, "detectron2", tmp_path / "d2.pkl")
    names = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    data = (tmp_path / "d2.pkl").read_bytes()
    assert data[:2] == b"\x80\x04"  # protocol 4: read by any Python 3
    model = Recording(open(tmp_path / "d2.pkl", "rb"), encoding="latin1").load()["model"]
    assert names == {"numpy.ndarray", "builtins.bytearray"}
    count = model["backbone.fpn_lateral2.weight"], model["backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked"]
    assert all(a.flags.writeable and a.flags.c_contiguous for a in count)
    assert count[1].shape == () and count[1].dtype == np.int64 and count[1] == 7
    np.testing.assert_array_equal(count[0], encoder.neck.lateral_convs[0].weight.detach().numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_detectron2_export_of_half_precision_weights_writes_float32(dtype, tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)
    ckpt["model"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "half.pt")
    export(tmp_path / "half.pt", "detectron2", tmp_path / "d2.pkl")
    model = load_detectron2(tmp_path / "d2.pkl")
    assert {a.dtype for a in model.values()} == {np.dtype(np.float32), np.dtype(np.int64)}
    np.testing.assert_array_equal(model["backbone.bottom_up.stem.conv1.weight"],
                                  encoder.backbone.conv1.weight.detach().to(dtype).float().numpy())


def test_detectron2_export_must_be_a_pkl_file(checkpoints, tmp_path, capsys):
    # detectron2's DetectionCheckpointer unpickles only names ending in .pkl; it torch.loads the rest
    with pytest.raises(ExportError, match=r"--out .*d2\.pth: a detectron2 export must end in \.pkl"):
        export(checkpoints["r18_fpn"][0], "detectron2", tmp_path / "d2.pth")
    assert export_main([str(checkpoints["r18_fpn"][0]), "--format", "detectron2", "--out",
                        str(tmp_path / "d2")]) == 2
    assert "--out" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# ---- raw, momentum ----

def test_raw_export_round_trips_to_the_same_encoder_and_embeddings(checkpoints, tmp_path):
    path, encoder = checkpoints["r18_fpn"]
    export(path, "raw", tmp_path / "raw.pth")
    raw = torch.load(tmp_path / "raw.pth")
    assert raw["config"]["depth"] == 18 and raw["epoch"] == 3 and set(raw) == {"encoder", "config", "epoch", "step"}
    loaded, config = load_raw_encoder(tmp_path / "raw.pth")
    assert config.fpn_channels == 64
    for k, v in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    rois = torch.tensor([[0, 4.0, 6.0, 40.0, 50.0], [1, 10.0, 2.0, 63.0, 30.0]])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IMAGES, rois), encoder(IMAGES, rois))


@pytest.mark.parametrize("fmt", ["raw", "torchvision", "torchvision-fpn", "detectron2"])
def test_momentum_encoder_is_exported_only_when_asked(fmt, checkpoints, tmp_path):
    path, encoder = checkpoints["r18_fpn"]
    out = tmp_path / ("out.pkl" if fmt == "detectron2" else f"out.{fmt}")
    assert export(path, fmt, out) == [out]
    assert not momentum_path(out).exists()

    def conv1_of(file):
        if fmt == "detectron2":
            return torch.from_numpy(load_detectron2(file)["backbone.bottom_up.stem.conv1.weight"])
        sd = torch.load(file)
        return {"raw": lambda: sd["encoder"]["backbone.conv1.weight"], "torchvision": lambda: sd["conv1.weight"],
                "torchvision-fpn": lambda: sd["body.conv1.weight"]}[fmt]()

    query = encoder.backbone.conv1.weight.detach()
    assert torch.equal(conv1_of(out), query)
    if fmt == "raw":
        assert not any("encoder_k" in k or "queue" in k for k in torch.load(out)["encoder"])
    assert export(path, fmt, out, include_momentum=True) == [out, momentum_path(out)]
    assert torch.equal(conv1_of(momentum_path(out)), query + 1.0)  # make_checkpoint's key offset


# ---- bad checkpoints ----

def _respell(src, dst, old, new):
    """A copy of a torch checkpoint whose pickle names ``new`` where it named ``old`` (protocol 2: GLOBAL
    opcodes are text lines, so the bytes can be replaced)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info.filename, data)


def test_checkpoint_pickled_under_either_numpy_major_version_loads_without_unsafe_load(checkpoints, tmp_path):
    # the "rng" entry holds numpy arrays: numpy 2 pickles them with numpy._core.multiarray._reconstruct,
    # numpy 1.x with numpy.core.multiarray._reconstruct
    path, encoder = checkpoints["r18_fpn"]
    current, other = (b"numpy._core.multiarray", b"numpy.core.multiarray")
    if current not in zipfile.ZipFile(path).read(f"{path.stem}/data.pkl"):
        current, other = other, current
    _respell(path, tmp_path / "other.pt", current, other)
    export(tmp_path / "other.pt", "torchvision", tmp_path / "tv.pth")
    assert torch.equal(torch.load(tmp_path / "tv.pth")["conv1.weight"], encoder.backbone.conv1.weight)


def test_truncated_checkpoint_is_reported_as_truncated_or_corrupt(checkpoints, tmp_path):
    data = checkpoints["r18_fpn"][0].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: cannot be read .* truncated or corrupt"):
        export(bad, "torchvision", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_empty_and_missing_files_are_named(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: cannot be read .* empty"):
        export(tmp_path / "empty.pt", "raw", tmp_path / "out.pth")
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint file"):
        export(tmp_path / "nope.pt", "raw", tmp_path / "out.pth")


def test_a_plain_state_dict_is_not_an_insloc_checkpoint(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="not an insloc checkpoint: no 'model' entry"):
        export(tmp_path / "resnet.pt", "torchvision", tmp_path / "out.pth")
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    del ckpt["config"]
    torch.save(ckpt, tmp_path / "noconfig.pt")
    with pytest.raises(CheckpointError, match="no 'config' entry"):
        export(tmp_path / "noconfig.pt", "torchvision", tmp_path / "out.pth")


def test_missing_encoder_weights_are_named(tmp_path):
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    del ckpt["model"]["encoder_q.neck.lateral_convs.2.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 of the \d+ encoder_q weights .* missing .* "
                                              r"encoder_q\.neck\.lateral_convs\.2\.weight"):
        export(tmp_path / "missing.pt", "detectron2", tmp_path / "out.pkl")


def test_weights_of_another_architecture_than_the_config_says_are_refused(tmp_path):
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    ckpt["config"]["arch"] = "c4"  # FPN weights, C4 config
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="arch=c4 ResNet-18 encoder"):
        export(tmp_path / "mismatch.pt", "detectron2", tmp_path / "out.pkl")
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    ckpt["config"]["fpn_channels"] = 32
    torch.save(ckpt, tmp_path / "width.pt")
    with pytest.raises(CheckpointError, match=r"encoder_q\.neck\.lateral_convs\.0\.weight has shape \(64, 64, 1, 1\)"):
        export(tmp_path / "width.pt", "torchvision-fpn", tmp_path / "out.pth")


def test_config_fields_of_another_trainer_version_are_ignored_but_architecture_fields_are_required(tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)
    ckpt["config"]["warp_drive"] = True
    torch.save(ckpt, tmp_path / "newer.pt")
    with pytest.warns(UserWarning, match="ignoring config fields .*warp_drive"):
        export(tmp_path / "newer.pt", "torchvision", tmp_path / "tv.pth")
    assert torch.equal(torch.load(tmp_path / "tv.pth")["conv1.weight"], encoder.backbone.conv1.weight)
    del ckpt["config"]["depth"]
    torch.save(ckpt, tmp_path / "nodepth.pt")
    with pytest.raises(CheckpointError, match=r"lacks the architecture fields \['depth'\]"):
        export(tmp_path / "nodepth.pt", "raw", tmp_path / "out.pth")
    ckpt["config"] = "fpn"
    torch.save(ckpt, tmp_path / "strconfig.pt")
    with pytest.raises(CheckpointError, match="'config' entry is a str"):
        export(tmp_path / "strconfig.pt", "raw", tmp_path / "out.pth")


def test_a_checkpoint_from_before_fpn_norm_existed_exports_as_an_fpn_without_norm(tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)  # fpn_norm="none": the neck such checkpoints have
    del ckpt["config"]["fpn_norm"], ckpt["config"]["head_norm"]
    torch.save(ckpt, tmp_path / "old.pt")
    export(tmp_path / "old.pt", "torchvision-fpn", tmp_path / "fpn.pth")
    state = torch.load(tmp_path / "fpn.pth")
    assert torch.equal(state["fpn.inner_blocks.1.0.bias"], encoder.neck.lateral_convs[1].bias)
    assert [k for k in state if k.startswith("fpn.") and k.split(".")[3] != "0"] == []  # no norm (index 1)


def test_checkpoint_saved_under_compile_or_ddp_wrappers_exports_the_same(checkpoints, tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)
    ckpt["model"] = {k.replace("encoder_q.", "encoder_q._orig_mod.").replace("encoder_k.", "module.encoder_k."): v
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "wrapped.pt")
    export(tmp_path / "wrapped.pt", "torchvision", tmp_path / "tv.pth")
    assert torch.equal(torch.load(tmp_path / "tv.pth")["layer3.1.bn2.running_var"],
                       encoder.backbone.layer3[1].bn2.running_var)


# ---- command line ----

def test_export_main_writes_the_file_and_reports_errors_with_exit_status_2(checkpoints, tmp_path, capsys):
    path, _ = checkpoints["r18_fpn"]
    assert export_main([str(path), "--format", "detectron2", "--out", str(tmp_path / "m.pkl")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m.pkl").exists()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    assert export_main([str(tmp_path / "bad.pt"), "--format", "raw", "--out", str(tmp_path / "x.pth")]) == 2
    assert "bad.pt: cannot be read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(path), "--format", "onnx", "--out", str(tmp_path / "x")])


def test_export_errors_name_the_flag_and_exit_with_status_2(checkpoints, tmp_path, capsys):
    path = str(checkpoints["r18_fpn"][0])
    (tmp_path / "file").write_text("")
    for out, flag, message in [(tmp_path, "--out", "is a directory"),
                               (tmp_path / "file" / "tv.pth", "--out", "cannot write it"),
                               (tmp_path / "tv.pth", "--layout", "applies only to --format detectron2")]:
        layout = ["--layout", "c4"] if flag == "--layout" else []
        assert export_main([path, "--format", "torchvision", "--out", str(out), *layout]) == 2
        err = capsys.readouterr().err
        assert flag in err and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_exported_files_get_the_mode_the_umask_gives(checkpoints, tmp_path):
    previous = os.umask(0o027)
    try:
        for fmt, name in [("torchvision", "tv.pth"), ("detectron2", "d2.pkl")]:
            export(checkpoints["r18_fpn"][0], fmt, tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    finally:
        os.umask(previous)


def test_insloc_cli_export_subcommand_reaches_the_exporter(checkpoints, tmp_path):
    from insloc.cli import main

    path, _ = checkpoints["r18_fpn"]
    out = tmp_path / "tv.pth"
    assert main(["export", str(path), "--format", "torchvision", "--out", str(out)]) == 0
    assert "layer4.1.bn2.weight" in torch.load(out)


# ---- what the export refuses or resolves ----

def test_out_naming_the_checkpoint_itself_is_refused_and_the_checkpoint_kept(tmp_path, capsys):
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    path = tmp_path / "checkpoint_10.pt"
    torch.save(ckpt, path)
    before = path.read_bytes()
    os.link(path, tmp_path / "hardlink.pt")
    for out in (path, tmp_path / "." / "checkpoint_10.pt", tmp_path / "hardlink.pt"):
        with pytest.raises(ExportError, match=r"--out .*: is the checkpoint being exported"):
            export(path, "raw", out)
    assert export_main([str(path), "--format", "raw", "--out", str(path)]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    # the momentum file would be the checkpoint: also refused, before anything is written
    momentum_named = tmp_path / "a-momentum.pt"
    torch.save(ckpt, momentum_named)
    with pytest.raises(ExportError, match="a-momentum.pt: is the checkpoint being exported"):
        export(momentum_named, "raw", tmp_path / "a.pt", include_momentum=True)
    assert not (tmp_path / "a.pt").exists() and path.read_bytes() == before


def test_a_run_folder_or_its_latest_file_exports_the_checkpoint_latest_names(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    first, enc1 = make_checkpoint(R18_FPN_DEMO, seed=1)
    second, enc2 = make_checkpoint(R18_FPN_DEMO, seed=2)
    torch.save(first, run / "checkpoint_20.pt")
    torch.save(second, run / "checkpoint_10.pt")
    (run / "latest").write_text("checkpoint_20.pt\n")
    for source in (run, run / "latest"):
        assert export(source, "torchvision", tmp_path / "tv.pth") == [tmp_path / "tv.pth"]
        assert torch.equal(torch.load(tmp_path / "tv.pth")["conv1.weight"], enc1.backbone.conv1.weight)
    assert export_main([str(run), "--format", "raw", "--out", str(tmp_path / "raw.pth")]) == 0
    assert f"from {run / 'checkpoint_20.pt'}" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: a folder without checkpoints"):
        export(tmp_path / "empty", "raw", tmp_path / "x.pth")


def test_a_model_entry_that_is_not_a_state_dict_is_named(tmp_path):
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    ckpt["model"] = None
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'model' entry is a NoneType, expected a state dict"):
        export(tmp_path / "bad.pt", "raw", tmp_path / "x.pth")


def test_a_text_file_is_not_a_torch_checkpoint_and_the_message_has_no_terminal_codes(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("checkpoint_20.pt\n")
    with pytest.raises(CheckpointError, match="notes.txt: cannot be read as a torch checkpoint: the file is not a "
                                              "torch checkpoint") as e:
        export(tmp_path / "notes.txt", "raw", tmp_path / "x.pth")
    assert "\x1b" not in str(e.value)


def test_momentum_output_that_cannot_be_written_leaves_nothing_written(checkpoints, tmp_path):
    path = checkpoints["r18_fpn"][0]
    momentum_path(tmp_path / "x.pth").mkdir()
    with pytest.raises(ExportError, match=r"--out .*x-momentum\.pth: is a directory"):
        export(path, "torchvision", tmp_path / "x.pth", include_momentum=True)
    assert not (tmp_path / "x.pth").exists()


def test_a_damaged_momentum_encoder_blocks_only_its_own_export(tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "encoder_k.backbone.layer4" not in k}
    torch.save(ckpt, tmp_path / "partial.pt")
    export(tmp_path / "partial.pt", "torchvision", tmp_path / "tv.pth")
    assert torch.equal(torch.load(tmp_path / "tv.pth")["conv1.weight"], encoder.backbone.conv1.weight)
    with pytest.raises(CheckpointError, match="encoder_k"):
        export(tmp_path / "partial.pt", "torchvision", tmp_path / "tv2.pth", include_momentum=True)
    assert not (tmp_path / "tv2.pth").exists()


@pytest.mark.parametrize("fmt", ["raw", "torchvision", "torchvision-fpn"])
def test_every_format_writes_half_precision_weights_as_float32(fmt, tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)
    ckpt["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "half.pt")
    export(tmp_path / "half.pt", fmt, tmp_path / "out.pth")
    sd = torch.load(tmp_path / "out.pth")
    sd = sd["encoder"] if fmt == "raw" else sd
    assert {v.dtype for v in sd.values()} == {torch.float32, torch.int64}
    key = {"raw": "backbone.conv1.weight", "torchvision": "conv1.weight", "torchvision-fpn": "body.conv1.weight"}[fmt]
    assert torch.equal(sd[key], encoder.backbone.conv1.weight.detach().to(torch.bfloat16).float())


def test_an_unknown_format_is_an_export_error_naming_the_flag(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="--format .*'onnx': unknown"):
        export(checkpoints["r18_fpn"][0], "onnx", tmp_path / "x.onnx")


def test_a_checkpoint_file_named_latest_is_exported_as_itself(tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO, seed=4)
    (tmp_path / "a").mkdir()
    torch.save(ckpt, tmp_path / "a" / "latest")
    export(tmp_path / "a" / "latest", "torchvision", tmp_path / "tv.pth")
    assert torch.equal(torch.load(tmp_path / "tv.pth")["conv1.weight"], encoder.backbone.conv1.weight)


def test_a_file_size_limit_mid_write_is_an_error_naming_the_flag_in_every_format(checkpoints, tmp_path):
    # torch.save's C++ writer turns the file's OSError into a RuntimeError ("enforce fail at
    # inline_container.cc"); a real limit, in a child process (a full disk behaves alike: ENOSPC)
    import subprocess
    import sys
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from insloc.export import export_main\n"
        "sys.exit(export_main(sys.argv[1:]))\n")
    for fmt, name in (("raw", "x.pt"), ("torchvision", "x.pth"), ("detectron2", "x.pkl")):
        out = tmp_path / fmt / name
        args = [str(checkpoints["r18_fpn"][0]), "--format", fmt, "--out", str(out)]
        args += ["--include-momentum"] if fmt != "detectron2" else []
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"--out (out_path) {out}: cannot write it (File too large)" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert list((tmp_path / fmt).iterdir()) == []  # no partial file, no temporary


def test_a_config_value_this_version_does_not_take_outside_the_architecture_only_warns(tmp_path):
    ckpt, encoder = make_checkpoint(R18_FPN_DEMO)
    ckpt["config"]["head_init"] = "kaiming_uniform"  # as a newer trainer might write
    torch.save(ckpt, tmp_path / "newer.pt")
    with pytest.warns(UserWarning, match=r"--head-init \(head_init\) must be one of .*converting with the "
                                         r"architecture fields only"):
        export(tmp_path / "newer.pt", "raw", tmp_path / "raw.pt")
    restored, cfg = load_raw_encoder(tmp_path / "raw.pt")
    assert cfg.fpn_channels == R18_FPN_DEMO.fpn_channels
    for name, value in encoder.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    ckpt["config"]["arch"] = "c5"  # an architecture field still has to be right
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"not an insloc Config: --arch \(arch\)"):
        export(tmp_path / "bad.pt", "raw", tmp_path / "raw2.pt")


def test_out_naming_a_file_of_a_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt, _ = make_checkpoint(R18_FPN_DEMO)
    torch.save(ckpt, run / "checkpoint_4.pt")
    torch.save(ckpt, run / "checkpoint_2.pt")
    (run / "latest").write_text("checkpoint_4.pt\n")
    for out in (run / "latest", run / "checkpoint_2.pt"):
        before = out.read_bytes()
        with pytest.raises(ExportError, match="is a file of a pretraining run"):
            export(run / "checkpoint_4.pt", "raw", out)
        assert out.read_bytes() == before


def test_a_failed_momentum_write_removes_the_query_file_it_created(checkpoints, tmp_path, monkeypatch):
    import insloc.export as ex

    real = ex.atomic_write

    def fail_second(path, write):
        if "momentum" in os.path.basename(path):
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(ex, "atomic_write", fail_second)
    with pytest.raises(ExportError, match=r"x-momentum\.pth: cannot write it \(No space left on device\)"):
        export(checkpoints["r18_fpn"][0], "torchvision", tmp_path / "x.pth", include_momentum=True)
    assert list(tmp_path.iterdir()) == []


class _RunsCode:
    """Unpickling it would call a function the file names."""
    called = []

    def __reduce__(self):
        return (_RunsCode.called.append, ("unpickled",))


def test_resume_reads_a_checkpoint_without_running_code_it_names(tmp_path):
    from insloc.checkpoint import load_checkpoint, rng_state

    good = tmp_path / "checkpoint_00000001.pt"
    torch.save({"step": 1, "rng": rng_state(), "model": {"w": torch.ones(2)}}, good)
    loaded = load_checkpoint(good)  # tensors, plain values and the numpy RNG state load
    assert loaded["step"] == 1 and isinstance(loaded["rng"]["numpy"][1], np.ndarray)
    bad = tmp_path / "checkpoint_00000002.pt"
    torch.save({"step": 2, "payload": _RunsCode()}, bad)
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {bad}: it holds Python objects .*(getattr|append)"):
        load_checkpoint(bad)
    assert _RunsCode.called == []
