"""2D ResNets (torchvision layout, random init) without a classifier, for DINO pretraining.

:class:`ResNet2D` is a torchvision ``ResNet`` whose ``fc`` is an ``nn.Identity``, so its state-dict keys are
torchvision's minus ``fc.*`` (``conv1.weight``, ``bn1.*``, ``layer{1..4}.{j}.*``): published DINO / DAX ResNet
weights load by name. A 1-channel stem is a ``conv1`` with one input channel.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["RESNET_CONFIGS", "ResNet2D"]

RESNET_CONFIGS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNet2D(ResNet):
    """ResNet-18 / ResNet-50 returning globally pooled features.

    Args:
        arch: ``"resnet18"`` (512 features) or ``"resnet50"`` (2048 features).
        in_chans: number of input channels.

    Attributes:
        arch: the ``arch`` argument.
        embed_dim: number of output features (channels of ``layer4``).
        in_chans: input channels.
        patch_size: ``None`` (not a patch-based model; present so code can treat both families alike).

    Raises:
        ValueError: for an unknown ``arch`` or ``in_chans < 1``.
    """

    def __init__(self, arch: str = "resnet50", in_chans: int = 3) -> None:
        if arch not in RESNET_CONFIGS:
            raise ValueError(f"unknown ResNet arch {arch!r}; expected one of {tuple(RESNET_CONFIGS)}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        block, layers = RESNET_CONFIGS[arch]
        super().__init__(block, layers)
        if in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.fc = nn.Identity()
        self.arch = arch
        self.embed_dim = 512 * block.expansion
        self.in_chans = in_chans
        self.patch_size = None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``layer4``.

        Args:
            x: images, shape (B, in_chans, H, W).

        Returns:
            Features, shape (B, embed_dim, ceil(H / 32), ceil(W / 32)) (H / 32 for multiples of 32).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    patch_grid = feature_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled ``layer4`` features (passed through ``fc``, an identity unless replaced).

        Args:
            x: images, shape (B, in_chans, H, W).

        Returns:
            Features, shape (B, embed_dim).
        """
        return self.fc(torch.flatten(self.avgpool(self.feature_map(x)), 1))
