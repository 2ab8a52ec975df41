"""Reference networks and the model registry (zoo names or ``package.module:factory`` import paths)."""

from slimtorch.models.cnn import DigitsCNN, DigitsMLP, LeNet5, Mnist1dCNN, MnistCNN
from slimtorch.models.resnet import BasicBlock, CifarResNet, PadShortcut, resnet20
from slimtorch.models.zoo import ModelSpec, build_model, list_models, model_spec, register_model

__all__ = [
    "build_model", "list_models", "model_spec", "register_model", "ModelSpec",
    "MnistCNN", "LeNet5", "Mnist1dCNN", "DigitsMLP", "DigitsCNN",
    "CifarResNet", "BasicBlock", "PadShortcut", "resnet20",
]
