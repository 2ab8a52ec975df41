"""Small reference networks: MNIST CNN, LeNet-5, the MNIST-1D CNN and the 8x8 digits models."""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.errors import ConfigError

__all__ = ["MnistCNN", "LeNet5", "Mnist1dCNN", "DigitsMLP", "DigitsCNN"]


def _out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(size: int, model: str, option: str = "input_size") -> None:
    if size < 1:
        raise ConfigError(f"{model}: {option} is too small for this architecture")


class MnistCNN(nn.Module):
    """conv 32 3x3, pool, conv 64 3x3, pool, fc 128, fc classes (225,034 parameters on 28x28x1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        s = _out(_out(input_size, 3) // 2, 3) // 2
        _check_size(s, "mnist_cnn")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * s * s, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; conv1 is padded by 2 so 28x28 inputs work (classic 32x32 too)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        s = _out(_out(input_size, 5, padding=2) // 2, 5) // 2
        _check_size(s, "lenet5")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * s * s, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


class Mnist1dCNN(nn.Module):
    """The MNIST-1D reference CNN (Greydanus' ConvBase): three stride-2 conv1d layers of 25 channels
    (kernels 5, 3, 3; padding 1) with ReLU, then a linear layer; 5,210 parameters on length 40."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: int = 25, input_length: int = 40):
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.relu3 = nn.ReLU()
        length = _out(_out(_out(input_length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        _check_size(length, "mnist1d_cnn", "input_length")
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (batch, length) as mnist1d ships it
            x = x.unsqueeze(1)
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.linear(self.flatten(x))


class DigitsMLP(nn.Module):
    """Flatten, two hidden ReLU layers, linear classifier; for 8x8 digits by default."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8, hidden: int = 128):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class DigitsCNN(nn.Module):
    """conv 16 3x3, conv 32 3x3 (padded), pool 2, fc 64, fc classes; 38,282 parameters on 8x8x1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        s = input_size // 2
        _check_size(s, "digits_cnn")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * s * s, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))
