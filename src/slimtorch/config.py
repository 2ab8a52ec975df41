"""Method configs: frozen dataclasses with validation, (de)serialisation to dict/YAML/JSON, and a
registry from config type to the function that applies it (``quantize_`` dispatches on it).

Every method registers its config with ``@register_config("name")``; ``config_from_dict`` then
rebuilds it from ``{"method": "name", ...}`` and names any unknown key."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

_CONFIGS: dict[str, type] = {}
_HANDLERS: dict[type, Callable] = {}


def register_config(name: str):
    """Class decorator: make a config dataclass loadable by ``method: name``."""
    def deco(cls):
        cls.method = name
        _CONFIGS[name] = cls
        return cls
    return deco


def register_handler(config_type: type):
    """Decorator: ``fn(model, config, layers, plan)`` applies ``config_type`` (used by quantize_)."""
    def deco(fn):
        _HANDLERS[config_type] = fn
        return fn
    return deco


def handler_for(config) -> Callable:
    for t in type(config).__mro__:
        if t in _HANDLERS:
            return _HANDLERS[t]
    raise ConfigError(f"no handler registered for config type {type(config).__name__}")


def known_methods() -> list[str]:
    return sorted(_CONFIGS)


def check_keys(data: dict, allowed, where: str):
    """Raise ConfigError naming every key of ``data`` not in ``allowed``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    bad = sorted(set(data) - set(allowed))
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed keys: {sorted(allowed)}")


def check_call_kwargs(fn: Callable, kwargs: dict, what: str) -> None:
    """Raise ConfigError naming any keyword ``fn`` does not accept (when its signature is inspectable)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise ConfigError(f"{what}: unknown option(s) {', '.join(map(repr, bad))}; "
                          f"accepted: {', '.join(accepted) or '(none)'}")


def config_to_dict(cfg) -> dict:
    d = {"method": type(cfg).method}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def config_from_dict(data: dict, where: str = "config"):
    """Rebuild a registered config from ``{"method": name, ...}``; every field typed strictly
    (see schema.py) and range-checked, errors naming ``where`` and the field."""
    from .schema import build

    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"{where}: needs a 'method' key, one of {known_methods()}")
    name = data["method"]
    if not isinstance(name, str) or name not in _CONFIGS:
        raise ConfigError(f"{where}: unknown method {name!r}; known methods: {known_methods()}")
    return build(_CONFIGS[name], {k: v for k, v in data.items() if k != "method"}, f"{where} ({name})")


def save_config(cfg, path) -> None:
    path = Path(path)
    d = config_to_dict(cfg)
    text = json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False)
    path.write_text(text)


def load_yaml(path) -> Any:
    """Read a YAML/JSON file with the strict safe loader (safe_yaml.py); errors name the file."""
    from .safe_yaml import load_file

    return load_file(path)


def load_config(path):
    return config_from_dict(load_yaml(path), where=str(path))
