"""Heads that end in the 128-d projection: the C4 RoI head (res5 + pooled MLP) and MoCo v2's pooled MLP."""
from torch import nn


def mlp(in_dim, hidden_dim, out_dim):
    """MoCo v2's projection: Linear -> ReLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class C4BoxHead(nn.Module):
    """res5 (torchvision's layer4 definition) as the RoI head on 14x14 res4 RoIs, GAP, MLP."""

    def __init__(self, res5, in_dim, out_dim=128):
        super().__init__()
        self.res5 = res5
        self.mlp = mlp(in_dim, in_dim, out_dim)

    def forward(self, x):
        x = self.res5(x)  # [R, C5, 7, 7]
        return self.mlp(x.mean((2, 3)))  # [R, out_dim]


class PooledMLPHead(nn.Module):
    """MoCo v2's image-level head: global average pool of C5, then the MLP."""

    def __init__(self, in_dim, out_dim=128):
        super().__init__()
        self.mlp = mlp(in_dim, in_dim, out_dim)

    def forward(self, x):
        return self.mlp(x.mean((2, 3)))  # [B, out_dim]
