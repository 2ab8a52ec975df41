"""Reading YAML/JSON config files that may be hostile: every failure is a ConfigError naming the file.

On top of PyYAML's safe loader (no Python objects, ever): the file must be UTF-8 (the error gives
the byte offset of the first bad byte), at most ``MAX_BYTES`` long, keys must not repeat (YAML would
silently keep the last one), nesting is bounded by ``MAX_DEPTH`` and the document, with every alias
expanded, by ``MAX_NODES`` (so "billion laughs" anchors are refused before anything walks them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, naming both lines."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:   # explicit keys only: a merged (<<) key may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"a mapping key must be a scalar, got {type(key).__name__}",
                        key_node.start_mark) from None
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _check_size(node, name: str) -> None:
    """Depth and alias-expanded node count of the composed document, without expanding anything."""
    memo: dict[int, int] = {}

    def size(n, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ConfigError(f"{name}: nested deeper than {MAX_DEPTH} levels "
                              f"(line {n.start_mark.line + 1})")
        if id(n) in memo:
            return memo[id(n)]
        memo[id(n)] = 1   # a cycle counts once
        kids = [c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else \
            n.value if isinstance(n, yaml.SequenceNode) else []
        total = 1 + sum(size(c, depth + 1) for c in kids)
        if total > MAX_NODES:
            raise ConfigError(f"{name}: the document expands to more than {MAX_NODES:,} values "
                              "(aliases included); a recipe is far smaller")
        memo[id(n)] = total
        return total

    size(node, 0)


def loads(text: str, name: str = "<string>") -> Any:
    """Parse YAML/JSON ``text`` strictly (see the module docstring)."""
    loader = _StrictLoader(text)
    loader.name = name   # error marks name the file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, name)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to parse (over {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML/JSON: {e}") from None
    finally:
        loader.dispose()


def load_file(path) -> Any:
    """Read and parse a YAML/JSON file strictly; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes is too large for a config file (limit {MAX_BYTES:,})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "a recipe is a YAML or JSON text file") from None
    return loads(text, str(path))
