"""A tiny CNN with BatchNorm for the recipe tests (``model.name: "bn_models:tiny_bn_cnn"``)."""
from torch import nn


def tiny_bn_cnn(num_classes: int = 4, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
