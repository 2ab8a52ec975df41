"""Strict typing of every config field and call option, from the type annotations that are already there.

pydantic v2 in strict mode checks each value against its field's annotation: ``True`` is not an int,
``"yes"`` is not a bool, ``"1"`` is not a number, NaN and infinity are not numbers, a mapping is a
mapping. Range checks stay in each config's ``__post_init__``. Why pydantic (and not hand-written
isinstance checks): a new method's config dataclass gets the same rigour for free from its annotations,
and nested types (``tuple[int, ...]``, ``dict[str, int]``, ``Literal``) are checked element by element.
The configs stay plain frozen dataclasses; pydantic is only the checker at the boundary."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable

from pydantic import ConfigDict, TypeAdapter, ValidationError

from .errors import ConfigError

_STRICT = ConfigDict(strict=True, allow_inf_nan=False)
_ANY = object()   # a field or option whose annotation pydantic cannot check: accept as given


def _adapter(hint) -> Any:
    if hint is Any or hint is inspect.Parameter.empty:
        return _ANY
    try:
        return TypeAdapter(hint, config=_STRICT)
    except Exception:  # noqa: BLE001 - an annotation pydantic cannot build a checker for
        return _ANY


def _tuples(value):
    """YAML/JSON have lists only: read them as tuples (recursively) so tuple annotations apply."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _lists(value):
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _check(adapter, value, where: str):
    if adapter is _ANY:
        return value
    first = None
    for candidate in (_tuples(value), _lists(value)) if isinstance(value, (list, tuple, dict)) else (value,):
        try:
            return adapter.validate_python(candidate)
        except ValidationError as e:
            first = first or e.errors()[0]
    err = first
    loc, cur = "", value
    for part in err["loc"]:            # keep the keys and indices of the value; drop union-member tags
        if isinstance(cur, dict) and part in cur:
            loc, cur = loc + f"[{part!r}]", cur[part]
        elif isinstance(cur, (list, tuple)) and isinstance(part, int) and 0 <= part < len(cur):
            loc, cur = loc + f"[{part}]", cur[part]
    raise ConfigError(f"{where}{loc}: {err['msg'].lower()}, got {_short(err.get('input', value))}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _field_adapters(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: _adapter(hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def check_mapping(value, where: str, what: str = "a mapping") -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__} {_short(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be strings, got {_short(bad[0])}")
    return value


def check_fields(cls, values, where: str) -> dict:
    """``values`` checked against ``cls``'s dataclass fields: unknown keys named, every value typed
    strictly by its annotation. Returns the values as the annotations want them (tuples for lists)."""
    adapters = _field_adapters(cls)
    check_mapping(values, where, f"a mapping of {sorted(adapters)}")
    unknown = sorted(set(values) - set(adapters))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(adapters)}")
    return {k: _check(adapters[k], v, f"{where}.{k}") for k, v in values.items()}


def build(cls, values, where: str):
    """``cls(**values)`` after :func:`check_fields`; range errors of ``__post_init__`` name ``where``."""
    body = check_fields(cls, values, where)
    try:
        return cls(**body)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:   # a required field missing
        raise ConfigError(f"{where}: {e}") from None


def check_call(fn: Callable, options, where: str) -> dict:
    """Options for ``fn(**options)``: unknown names and values that do not fit the annotation of
    the parameter they go to are refused, naming them. Parameters without annotation take anything."""
    check_mapping(options, where)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    named = {n: p for n, p in params.items()
             if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    unknown = sorted(set(options) - set(named))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; "
                          f"accepted: {', '.join(named) or '(none)'}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names are still checked
        hints = {}
    return {k: _check(_adapter(hints.get(k, Any)), v, f"{where}.{k}") for k, v in options.items()}
