"""ResNet trunks built from torchvision's definitions (no weights), with torchvision's attribute names."""
from torchvision.models import resnet


class ResNetBackbone(resnet.ResNet):
    """torchvision's ResNet without ``avgpool`` and ``fc``; returns the stage outputs C2..C5.

    Keys are exactly torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), so the state dict loads
    into ``torchvision.models.resnet50()`` strictly once ``fc`` is ignored. With ``last_stage=3`` (C4
    models) ``layer4`` is removed here and lives in the RoI head as ``res5``.
    """

    def __init__(self, depth=50, last_stage=4):
        block, layers = {18: (resnet.BasicBlock, [2, 2, 2, 2]), 50: (resnet.Bottleneck, [3, 4, 6, 3])}[depth]
        super().__init__(block, layers)
        del self.avgpool, self.fc
        if last_stage == 3:
            del self.layer4
        self.depth, self.last_stage = depth, last_stage
        width = 64 * block.expansion
        self.out_channels = [width, 2 * width, 4 * width, 8 * width][:last_stage]  # C2..C5 (or C2..C4)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, 64, H/4, W/4]
        outs = []
        for stage in (self.layer1, self.layer2, self.layer3, getattr(self, "layer4", None))[: self.last_stage]:
            x = stage(x)
            outs.append(x)  # C2 [B, c, H/4, W/4] ... C5 [B, 8c, H/32, W/32]
        return outs


def resnet_stage5(depth=50):
    """torchvision's ``layer4`` of a fresh ResNet (the C4 RoI head, detectron2's ``res5``)."""
    return ResNetBackbone(depth, last_stage=4).layer4

