import pytest
import torch
import torchvision

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
