"""Model registry: ``build_model("mnist_cnn", num_classes=10)`` or ``build_model("pkg.mod:factory", **kw)``."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.config import check_call_kwargs
from slimtorch.models.cnn import DigitsCNN, DigitsMLP, LeNet5, Mnist1dCNN, MnistCNN
from slimtorch.models.resnet import resnet20

__all__ = ["ModelSpec", "register_model", "list_models", "model_spec", "build_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: the factory and the input shape (without batch) it expects by default."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: Optional[Tuple[int, ...]] = None
    description: str = ""


_ZOO: Dict[str, ModelSpec] = {}


def _key(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model name must be a non-empty string, got {name!r}; known models: "
                          f"{', '.join(list_models())}")
    return name.strip().lower()


def register_model(name: str, input_shape: Optional[Tuple[int, ...]] = None, *, overwrite: bool = False):
    """Decorator adding ``factory(**kwargs) -> nn.Module`` to the zoo under ``name``."""
    key = _key(name)

    def deco(factory: Callable[..., nn.Module]):
        if key in _ZOO and _ZOO[key].factory is not factory and not overwrite:
            raise ConfigError(f"model {key!r} is already registered; pass overwrite=True to replace it")
        doc = (inspect.getdoc(factory) or "").split("\n")[0]
        _ZOO[key] = ModelSpec(key, factory, tuple(input_shape) if input_shape else None, doc)
        return factory

    return deco


def list_models() -> List[str]:
    """Sorted names of the zoo models."""
    return sorted(_ZOO)


def model_spec(name: str) -> ModelSpec:
    """The zoo entry for ``name``; ConfigError listing the known names if there is none."""
    key = _key(name)
    if key not in _ZOO:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                          f"(or give an import path 'package.module:factory')")
    return _ZOO[key]


_check_kwargs = check_call_kwargs


def _import_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.strip().partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model import path {path!r} must look like 'package.module:factory'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model {path!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"model {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"model {path!r}: {attr!r} is not callable")
    return obj


def build_model(name_or_path: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, or call ``package.module:factory`` (a class or function) with kwargs."""
    if isinstance(name_or_path, str) and ":" in name_or_path:
        factory, what = _import_factory(name_or_path), f"model {name_or_path!r}"
    else:
        spec = model_spec(name_or_path)
        factory, what = spec.factory, f"model {spec.name!r}"
    _check_kwargs(factory, kwargs, what)
    try:
        model = factory(**kwargs)
    except (ConfigError, MemoryError):
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{what} could not be built with {kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what}: factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model


@register_model("mnist_cnn", (1, 28, 28))
def mnist_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """Two conv + two fc layers for 28x28 MNIST (225,034 parameters)."""
    return MnistCNN(num_classes, in_channels, input_size)


@register_model("lenet5", (1, 28, 28))
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """LeNet-5 (ReLU, max-pool, padded first conv) for 28x28 or 32x32 inputs."""
    return LeNet5(num_classes, in_channels, input_size)


@register_model("mnist1d_cnn", (1, 40))
def mnist1d_cnn(num_classes: int = 10, in_channels: int = 1, channels: int = 25, input_length: int = 40
                ) -> nn.Module:
    """The MNIST-1D reference 1-D CNN (5,210 parameters)."""
    return Mnist1dCNN(num_classes, in_channels, channels, input_length)


@register_model("resnet20", (3, 32, 32))
def _resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: str = "A") -> nn.Module:
    """CIFAR-style ResNet-20 (269,722 parameters; 272,474 with shortcut="B")."""
    return resnet20(num_classes, in_channels, width, shortcut)


@register_model("digits_mlp", (1, 8, 8))
def digits_mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 8, hidden: int = 128) -> nn.Module:
    """MLP for 8x8 digits: 64 -> hidden -> hidden -> classes."""
    return DigitsMLP(num_classes, in_channels, input_size, hidden)


@register_model("digits_cnn", (1, 8, 8))
def digits_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    """Small CNN for 8x8 digits (38,282 parameters)."""
    return DigitsCNN(num_classes, in_channels, input_size)
