"""CIFAR-style ResNet-20 (He et al. 2016, section 4.2): 3 stages x 3 basic blocks, 16/32/64 channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError

__all__ = ["PadShortcut", "BasicBlock", "CifarResNet", "resnet20"]


class PadShortcut(nn.Module):
    """Parameter-free shortcut (option A): subsample spatially and zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``blocks`` basic blocks per stage (6n+2 layers)."""

    def __init__(self, blocks: int = 3, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 shortcut: str = "A"):
        super().__init__()
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ConfigError(f"resnet: shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}")
        if blocks < 1 or width < 1:
            raise ConfigError(f"resnet: blocks and width must be positive, got {blocks}, {width}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        chans = [width, 2 * width, 4 * width]
        layers, c_in = [], width
        for i, c in enumerate(chans):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(c_in, c, stride=2 if (i > 0 and b == 0) else 1, shortcut=shortcut))
                c_in = c
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: str = "A") -> CifarResNet:
    """ResNet-20: 269,722 parameters with the default option-A shortcuts (272,474 with option B)."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut)
