import pytest
import torch
import torchvision
from torch.nn import functional as F

from insloc.models import C4Encoder, FPNEncoder, GlobalEncoder

ROIS = torch.tensor([[0, 4.0, 6.0, 40.0, 50.0], [1, 10.0, 2.0, 63.0, 30.0], [1, 0.0, 0.0, 64.0, 64.0]])


@pytest.mark.parametrize("depth, tv", [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_backbone_state_dict_loads_into_torchvision_resnet_without_fc(depth, tv):
    enc = FPNEncoder(depth, fpn_channels=16, fc_dim=16)
    result = tv().load_state_dict(enc.backbone.state_dict(), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []


def test_c4_backbone_plus_res5_load_into_torchvision_resnet50_strictly():
    enc = C4Encoder(50)
    model = torchvision.models.resnet50()
    missing = model.load_state_dict(enc.backbone.state_dict(), strict=False).missing_keys
    assert {k.split(".")[0] for k in missing} == {"layer4", "fc"}
    model.layer4.load_state_dict(enc.head.res5.state_dict(), strict=True)
    assert sorted(k for k in enc.head.state_dict() if k.startswith("mlp")) == \
        ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    assert enc.head.mlp[0].weight.shape == (2048, 2048) and enc.head.mlp[2].weight.shape == (128, 2048)


def test_fpn_neck_and_head_key_names_and_shapes():
    sd = FPNEncoder(50).state_dict()
    for i, c in enumerate([256, 512, 1024, 2048]):
        # the official neck: conv without bias, then BatchNorm (mmdetection's FPN with norm_cfg BN)
        assert sd[f"neck.lateral_convs.{i}.weight"].shape == (256, c, 1, 1)
        assert sd[f"neck.output_convs.{i}.weight"].shape == (256, 256, 3, 3)
        assert f"neck.lateral_convs.{i}.bias" not in sd and f"neck.output_convs.{i}.bias" not in sd
        assert sd[f"neck.lateral_norms.{i}.running_var"].shape == (256,)
        assert sd[f"neck.output_norms.{i}.weight"].shape == (256,)
        assert sd[f"head.convs.{i}.0.weight"].shape == (256, 256, 3, 3)
        assert f"head.convs.{i}.0.bias" not in sd
        assert sd[f"head.convs.{i}.1.running_var"].shape == (256,)
    assert sd["head.fc1.weight"].shape == (1024, 256 * 7 * 7)
    assert sd["head.fc2.weight"].shape == (1024, 1024)
    assert sd["head.fc3.weight"].shape == (128, 1024)


def test_fpn_without_norm_keeps_the_conv_biases_and_has_no_norm_weights():
    sd = FPNEncoder(18, fpn_channels=16, fc_dim=16, fpn_norm="none").neck.state_dict()
    assert sorted(sd) == sorted(f"{kind}_convs.{i}.{p}" for kind in ("lateral", "output") for i in range(4)
                                for p in ("weight", "bias"))
    with pytest.raises(ValueError, match="norm must be 'bn' or 'none'"):
        FPNEncoder(18, fpn_norm="gn")


def test_fpn_norm_follows_each_conv_without_an_activation():
    torch.manual_seed(0)
    neck = FPNEncoder(18, fpn_channels=8, fc_dim=8).neck.train()
    feats = [torch.randn(2, c, s, s) for c, s in zip([64, 128, 256, 512], [16, 8, 4, 2])]
    outs = neck(feats)
    for out in outs:  # train-mode BatchNorm with weight 1, bias 0: each channel standardised, signs kept
        torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
        assert (out < 0).any()


def test_fpn_head_starts_as_the_official_head_or_with_pytorch_defaults():
    torch.manual_seed(0)
    head = FPNEncoder(18, fpn_channels=16, fc_dim=256, dim=128).head
    for fc in (head.fc1, head.fc2, head.fc3):
        assert fc.bias.abs().max() == 0
    bound = (6 / (16 * 49 + 256)) ** 0.5  # xavier-uniform fc1
    assert head.fc1.weight.abs().max() <= bound and head.fc1.weight.abs().max() > 0.9 * bound
    assert abs(head.fc3.weight.std().item() - 0.01) < 0.001  # N(0, 0.01) projection
    conv = head.convs[0][0].weight  # kaiming normal, fan_out = 16 * 9
    assert abs(conv.std().item() - (2 / (16 * 9)) ** 0.5) < 0.01
    torch.manual_seed(0)
    default = FPNEncoder(18, fpn_channels=16, fc_dim=256, dim=128, head_init="torch").head
    assert default.fc3.bias.abs().max() > 0 and default.fc3.weight.std() > 0.015
    with pytest.raises(ValueError, match="init must be 'official' or 'torch'"):
        FPNEncoder(18, head_init="xavier")


def test_fpn_encoder_gives_one_unit_embedding_per_level_and_box():
    torch.manual_seed(0)
    enc = FPNEncoder(18, fpn_channels=16, fc_dim=32, dim=8).eval()
    images = torch.randn(2, 3, 64, 64)
    z = enc(images, ROIS)  # [4, 3, 8]
    assert z.shape == (4, 3, 8) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4, 3))
    # per-level boxes that are all equal give the same result as shared boxes
    torch.testing.assert_close(enc(images, ROIS.expand(4, 3, 5)), z)
    # a different box on P5 only changes the P5 embedding
    per_level = ROIS.repeat(4, 1, 1)
    per_level[3, :, 1:] = torch.tensor([8.0, 8.0, 24.0, 24.0])
    z2 = enc(images, per_level)
    torch.testing.assert_close(z2[:3], z[:3])
    assert (z2[3] - z[3]).abs().max() > 1e-3


def test_c4_and_global_encoders_shapes():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    z = C4Encoder(18, dim=8)(images, ROIS)
    assert z.shape == (1, 3, 8)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(1, 3))
    g = GlobalEncoder(18, dim=8)(images)
    assert g.shape == (1, 2, 8)


def test_fpn_encoder_backpropagates_into_backbone():
    enc = FPNEncoder(18, fpn_channels=16, fc_dim=32, dim=8)
    enc(torch.randn(2, 3, 64, 64), ROIS)[:, :, 0].sum().backward()
    assert enc.backbone.conv1.weight.grad.abs().sum() > 0
    assert enc.neck.lateral_convs[0].weight.grad.abs().sum() > 0



def _head_inputs(enc, images, rois):
    """(the encoder's embeddings, what its head was given: the pooled RoIs [R, C, s, s])."""
    seen = []
    handle = enc.head.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        z = enc(images, rois)
    finally:
        handle.remove()
    return z, seen[0]


def test_fpn_encoder_pools_p2_to_p5_as_torchvision_roi_align_at_strides_4_to_32_aligned_adaptive():
    # recipe.md: every box from all four levels, RoIAlign 7x7, sampling_ratio 0 (adaptive), aligned=True. A
    # wrong stride, aligned=False or a fixed sampling ratio pools other features: the boxes are large on P2
    # (3 samples per bin adaptively) and small on P5 (1 sample).
    torch.manual_seed(0)
    enc = FPNEncoder(18, fpn_channels=16, fc_dim=32, dim=8).eval()
    images = torch.randn(2, 3, 64, 64)
    strides = (4, 8, 16, 32)
    with torch.no_grad():
        feats = enc.neck(enc.backbone(images))  # P2..P5
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
        z, pooled = _head_inputs(enc, images, ROIS)
        want = torch.cat([torchvision.ops.roi_align(f, ROIS, 7, spatial_scale=1.0 / s, sampling_ratio=0, aligned=True)
                          for f, s in zip(feats, strides)])  # [4 * 3, 16, 7, 7], level-major
        torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, F.normalize(enc.head(want), dim=1).view(4, 3, 8))
        # per-level boxes: level l pools its own boxes at its own stride
        per_level = ROIS.repeat(4, 1, 1)
        per_level[:, 0, 1:] = torch.tensor([[2.0, 2.0, 60.0, 62.0], [8.0, 8.0, 24.0, 30.0],
                                            [5.0, 9.0, 51.0, 33.0], [0.0, 10.0, 40.0, 64.0]])
        pooled = _head_inputs(enc, images, per_level)[1]
        want = torch.cat([torchvision.ops.roi_align(f, per_level[l], 7, spatial_scale=1.0 / s, sampling_ratio=0,
                                                    aligned=True) for l, (f, s) in enumerate(zip(feats, strides))])
        torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-5)
        # the comparison can tell: other geometry pools other features
        for level, scale, ratio, aligned in ((3, 1 / 16, 0, True), (3, 1 / 32, 2, True), (0, 1 / 4, 2, True),
                                             (3, 1 / 32, 0, False)):
            other = torchvision.ops.roi_align(feats[level], per_level[level], 7, scale, ratio, aligned)
            assert (other - want[3 * level: 3 * level + 3]).abs().max() > 1e-2


def test_c4_encoder_pools_res4_as_torchvision_roi_align_14x14_at_stride_16_aligned_adaptive():
    torch.manual_seed(0)
    enc = C4Encoder(18, dim=8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        res4 = enc.backbone(images)[-1]  # [2, 256, 4, 4]
        assert res4.shape == (2, 256, 4, 4)
        z, pooled = _head_inputs(enc, images, ROIS)
        want = torchvision.ops.roi_align(res4, ROIS, 14, spatial_scale=1.0 / 16, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, F.normalize(enc.head(want), dim=1)[None])
        for scale, ratio, aligned in ((1 / 32, 0, True), (1 / 16, 2, True), (1 / 16, 0, False)):
            assert (torchvision.ops.roi_align(res4, ROIS, 14, scale, ratio, aligned) - want).abs().max() > 1e-2


def test_fpn_head_is_four_conv_blocks_then_fc_relu_fc_relu_projection():
    # recipe.md: 4 x [3x3 conv, BN, ReLU] -> flatten -> fc 1024 -> ReLU -> fc 1024 -> ReLU -> fc 128
    torch.manual_seed(0)
    head = FPNEncoder(18, fpn_channels=8, fc_dim=32, dim=8).head.eval()
    x = torch.randn(5, 8, 7, 7)
    with torch.no_grad():
        h = x
        for block in head.convs:
            conv, norm, relu = block
            assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)
            assert isinstance(norm, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
            h = torch.relu(norm(conv(h)))
        h = torch.relu(head.fc1(h.flatten(1)))
        assert (head.fc2(h) < 0).any()  # so a missing ReLU after fc2 changes the output
        want = head.fc3(torch.relu(head.fc2(h)))
        assert len(head.convs) == 4
        torch.testing.assert_close(head(x), want)
