"""The FPN neck (P2-P5, no P6) and the InsLoc box head shared by the four levels."""
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Lateral 1x1 and output 3x3 convs over C2..C5; top-down nearest upsampling; P2..P5.

    norm="bn" (the official model: mmdetection's FPN with norm_cfg BN): each conv has no bias and is followed
    by a BatchNorm, with no activation. norm="none": convs with bias and Identity norms (no parameters, so
    the state-dict names of both variants are the same apart from the norms). Convs start xavier-uniform."""

    def __init__(self, in_channels, out_channels=256, norm="bn"):
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        bn = norm == "bn"

        def make_norm():
            return nn.BatchNorm2d(out_channels) if bn else nn.Identity()

        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=not bn) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not bn)
                                          for _ in in_channels)
        self.lateral_norms = nn.ModuleList(make_norm() for _ in in_channels)
        self.output_norms = nn.ModuleList(make_norm() for _ in in_channels)
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, feats):
        laterals = [norm(conv(f)) for conv, norm, f in zip(self.lateral_convs, self.lateral_norms, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # each [B, F, H_l, W_l]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        # P2..P5, each [B, F, H_l, W_l]
        return [norm(conv(x)) for conv, norm, x in zip(self.output_convs, self.output_norms, laterals)]


class FPNBoxHead(nn.Module):
    """4 x (3x3 conv, BN, ReLU) -> flatten -> fc1 -> ReLU -> fc2 -> ReLU -> fc3 (projection), on pooled RoIs.

    norm="none" drops the BN (the convs get a bias; index 1 of each block stays, as an Identity, so the
    state-dict names do not move): short single-process runs on a handful of images collapse with a
    normalised head (see insloc.config.demo)."""

    def __init__(self, in_channels=256, roi_size=7, fc_dim=1024, out_dim=128, num_convs=4, norm="bn",
                 init="official"):
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        if init not in ("official", "torch"):
            raise ValueError(f"init must be 'official' or 'torch', got {init!r}")
        bn = norm == "bn"
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=not bn),
                          nn.BatchNorm2d(in_channels) if bn else nn.Identity(), nn.ReLU(inplace=True))
            for _ in range(num_convs))
        self.fc1 = nn.Linear(in_channels * roi_size * roi_size, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.fc3 = nn.Linear(fc_dim, out_dim)
        if init == "official":
            self.official_init()

    def official_init(self):
        """The official head's initialisation: mmcv ConvModule's (kaiming normal, fan_out) for the convs,
        xavier-uniform fc1 and fc2, N(0, 0.01) for the projection, zero biases; BatchNorm weight 1, bias 0
        (PyTorch's default). init="torch" keeps PyTorch's layer defaults instead."""
        for block in self.convs:
            nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
            if block[0].bias is not None:
                nn.init.zeros_(block[0].bias)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc3.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc3.bias)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)  # [R, F, s, s]
        x = F.relu(self.fc1(x.flatten(1)))  # [R, fc_dim]
        x = F.relu(self.fc2(x))  # [R, fc_dim]
        return self.fc3(x)  # [R, out_dim]
