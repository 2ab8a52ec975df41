"""Training checkpoints: one safetensors file, written atomically, never pickled.

Layout of the file (a plain safetensors file any safetensors reader can open):

* tensors ``model/<state_dict key>``, ``optim/...`` (optimizer state tensors, e.g.
  ``optim/state/0/exp_avg``, ``optim/state/0/step``), ``sched/...``, ``trainer/...``,
  ``extra/<name>``, ``rng/torch`` and ``rng/cuda/<i>`` (uint8 RNG states);
* metadata key ``"slimtorch"``: a JSON string ``{"format": "slimtorch-checkpoint", "version": 2,
  "model_objects", "optimizer", "scheduler", "trainer_state", "rng", "extra"}``;
* metadata keys ``"sha256.header"`` (SHA-256 of the ``"slimtorch"`` text and the canonical tensor
  index: names, dtypes, shapes) and ``"sha256.data"`` (SHA-256 of every tensor's name and bytes, in
  name order). Both are verified on every load, so a flipped byte anywhere is refused with the
  path and what failed. Version 1 files (no checksums) are still read, with a warning. Nested values are
  plain JSON; tensors are replaced by ``{"__tensor__": name}``, tuples by ``{"__tuple__": [...]}``,
  dicts with non-string keys by ``{"__dict__": [[k, v], ...]}``, numpy arrays by
  ``{"__ndarray__": [...], "dtype": ...}``. So optimizer ``step`` values round-trip exactly:
  0-dim tensors stay tensors (dtype included), Python numbers stay numbers.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimtorch.atomic import atomic_path
from slimtorch.errors import CheckpointError

FORMAT = "slimtorch-checkpoint"
VERSION = 2
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "apply_checkpoint", "restore_rng", "FORMAT", "VERSION"]


# --------------------------------------------------------------------------- JSON <-> objects
def _encode(obj: Any, name: str, tensors: dict) -> Any:
    """Turn ``obj`` into JSON-able data, moving tensors into ``tensors`` under ``name``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key, n = name, 1
        while key in tensors:
            key, n = f"{name}#{n}", n + 1
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{name}/key", tensors), _encode(v, f"{name}/{k}", tensors)]
                             for k, v in obj.items()]}
    raise CheckpointError(
        f"cannot store {type(obj).__name__} at '{name}' in a checkpoint: only tensors, numbers, "
        "strings, None, lists, tuples, dicts and numpy arrays are allowed (no pickling)")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _tensor_refs(obj: Any, out: set) -> set:
    if isinstance(obj, list):
        for v in obj:
            _tensor_refs(v, out)
    elif isinstance(obj, dict):
        if "__tensor__" in obj and len(obj) == 1:
            out.add(obj["__tensor__"])
        else:
            for v in obj.values():
                _tensor_refs(v, out)
    return out


# --------------------------------------------------------------------------- save
def _rng_state(tensors: dict) -> dict:
    tensors["rng/torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
            n_cuda += 1
    return {"python": _encode(random.getstate(), "rng/python", tensors),
            "numpy": _encode(np.random.get_state(), "rng/numpy", tensors), "cuda": n_cuda}


def _index_digest(text: str, tensors: dict) -> str:
    """SHA-256 of the metadata text and the tensor index (name, dtype, shape), in name order."""
    index = {k: [str(v.dtype), list(v.shape)] for k, v in sorted(tensors.items())}
    return hashlib.sha256(text.encode() + b"\0" + json.dumps(index).encode()).hexdigest()


def _data_digest(tensors: dict) -> str:
    """SHA-256 of every tensor's name and raw bytes, in name order (CPU, contiguous tensors)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _atomic_write(path: Path, tensors: dict, text: str) -> None:
    metadata = {"slimtorch": text, "sha256.header": _index_digest(text, tensors),
                "sha256.data": _data_digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_checkpoint(path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    trainer_state: dict | None = None, extra_tensors: dict | None = None) -> Path:
    """Write model, optimizer, scheduler, RNG states and ``trainer_state`` to ONE file, atomically.

    ``trainer_state`` may hold numbers, strings, lists, dicts and tensors. Returns the path.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: directory {path.parent} does not exist")
    tensors: dict[str, torch.Tensor] = {}
    model_objects = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"model/{key}"] = value
        else:  # get_extra_state() payloads
            model_objects[key] = _encode(value, f"model_obj/{key}", tensors)
    meta = {"format": FORMAT, "version": VERSION, "model_objects": model_objects,
            "optimizer": None if optimizer is None else _encode(optimizer.state_dict(), "optim", tensors),
            "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "sched", tensors),
            "trainer_state": _encode(dict(trainer_state or {}), "trainer", tensors),
            "extra": [], "rng": _rng_state(tensors)}
    for name, t in (extra_tensors or {}).items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"extra_tensors['{name}'] is a {type(t).__name__}, not a tensor")
        tensors[f"extra/{name}"] = t
        meta["extra"].append(name)
    # own, contiguous CPU copies: safetensors refuses tensors that share storage (tied weights,
    # views) and device tensors must be brought home anyway.
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
               for k, v in tensors.items()}
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not serialisable: {e}") from e
    _atomic_write(path, tensors, text)
    return path


# --------------------------------------------------------------------------- load
def _read_header(path: Path) -> tuple[dict, dict, dict]:
    """Parse and check the safetensors header ourselves so that every failure has a clear reason."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a slimtorch checkpoint: {size} bytes, "
                                  "too short to be a safetensors file (truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            first = f.read(1)
            if first == b"{" and n < 100_000_000:
                raise CheckpointError(f"{path} is truncated: its header needs {n} bytes but the file "
                                      f"has only {size - 8} after the length field")
            raise CheckpointError(f"{path} is not a slimtorch checkpoint: not a safetensors file "
                                  f"(header length {n} exceeds the file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a slimtorch checkpoint: not a safetensors file "
                              f"(header is not valid JSON: {e})") from None
    md = header.get("__metadata__")
    text = md.get("slimtorch") if isinstance(md, dict) else None
    if text is None:
        raise CheckpointError(f"{path} is not a slimtorch checkpoint: a safetensors file without "
                              "'slimtorch' metadata")
    try:
        meta = json.loads(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a slimtorch checkpoint: its 'slimtorch' metadata is "
                              f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} is not a slimtorch checkpoint (format {fmt!r}, "
                              f"expected {FORMAT!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} is corrupt: checkpoint format version {version!r} is not a "
                              "positive integer")
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}, newer than this "
                              f"slimtorch supports ({VERSION}); upgrade slimtorch to read it")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise CheckpointError(f"{path} is corrupt: its safetensors header has a malformed tensor "
                              "entry") from None
    if size != 8 + n + end:
        what = "truncated" if size < 8 + n + end else "corrupt (trailing bytes)"
        raise CheckpointError(f"{path} is {what}: expected {8 + n + end} bytes, found {size}")
    if version >= 2 and md.get("sha256.header") != _index_digest(text, _index_shapes(header, path)):
        raise CheckpointError(f"{path} is corrupt: SHA-256 of its header does not match (edited or "
                              "damaged metadata or tensor index)")
    return header, meta, md


class _Shape:
    """Stands in for a tensor in the header digest: only dtype and shape are read."""
    def __init__(self, dtype, shape):
        self.dtype, self.shape = dtype, shape


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def _index_shapes(header: dict, path) -> dict:
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or v.get("dtype") not in _ST_DTYPES or not isinstance(v.get("shape"), list):
            raise CheckpointError(f"{path} is corrupt: tensor entry {k!r} of its safetensors header "
                                  "is malformed")
        out[k] = _Shape(_ST_DTYPES[v["dtype"]], v["shape"])
    return out


def read_checkpoint(path) -> dict:
    """Read a checkpoint without applying it.

    Returns ``{"model", "model_objects", "optimizer", "scheduler", "trainer_state", "extra_tensors",
    "rng", "version"}``; tensors are on the CPU.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    header, meta, md = _read_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is corrupt: safetensors could not read it ({e})") from None
    if meta["version"] >= 2:
        if md.get("sha256.data") != _data_digest(tensors):
            raise CheckpointError(f"{path} is corrupt: SHA-256 of its tensor data does not match "
                                  "(damaged on disk or edited); refusing to load it")
    else:
        warnings.warn(f"{path}: checkpoint format version 1 carries no checksum; its data cannot be "
                      "verified", stacklevel=2)
    missing = sorted(_tensor_refs(meta, set()) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} is corrupt: metadata refers to missing tensors {missing[:10]}")
    return {"version": meta["version"],
            "model": {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
            "model_objects": _decode(meta.get("model_objects") or {}, tensors),
            "optimizer": _decode(meta.get("optimizer"), tensors),
            "scheduler": _decode(meta.get("scheduler"), tensors),
            "trainer_state": _decode(meta.get("trainer_state") or {}, tensors),
            "extra_tensors": {n: tensors[f"extra/{n}"] for n in meta.get("extra", [])},
            "rng": {"torch": tensors.get("rng/torch"),
                    "cuda": [tensors[f"rng/cuda/{i}"] for i in range((meta.get("rng") or {}).get("cuda", 0))],
                    "python": _decode((meta.get("rng") or {}).get("python"), tensors),
                    "numpy": _decode((meta.get("rng") or {}).get("numpy"), tensors)}}


def restore_rng(rng: dict) -> None:
    """Restore torch (CPU and, where present, CUDA), Python and numpy RNG states from ``read_checkpoint``."""
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        states = rng["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)
    if rng.get("python") is not None:
        v = rng["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if rng.get("numpy") is not None:
        np.random.set_state(tuple(rng["numpy"]))


def _adoptable(model, state: dict) -> set:
    """Keys of per-channel model-input steps (set by calibrate) whose shape the model's quantizers take
    on load (one value <-> one per channel; quant/quantizer.py ``adoptable``)."""
    return {k for n, q in model.named_modules() if hasattr(q, "adoptable")
            for k in q.adoptable(state, f"{n}." if n else "")}


def apply_checkpoint(ckpt: dict, path, *, model, optimizer=None, scheduler=None,
                     restore_rng_state: bool = True) -> dict:
    """Load a ``read_checkpoint`` result into live objects; returns ``trainer_state``."""
    got = dict(ckpt["model"], **ckpt["model_objects"])
    expected = model.state_dict()
    adopt = _adoptable(model, got)
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in got and k not in adopt and isinstance(v, torch.Tensor)
              and isinstance(got[k], torch.Tensor) and got[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "",
                 f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatch {shapes}" if shapes else ""]
        raise CheckpointError(f"{path} does not fit the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(got, strict=True)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if ckpt[key] is None:
            raise CheckpointError(f"{path} holds no {key} state, but a {key} was given to load into")
        try:
            obj.load_state_dict(ckpt[key])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{path}: the {key} state does not fit the given "
                                  f"{type(obj).__name__}: {e}") from None
    if restore_rng_state:
        restore_rng(ckpt["rng"])
    return ckpt["trainer_state"]


def load_checkpoint(path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and optimizer, scheduler).

    Restores the RNG states unless ``restore_rng=False``. Returns the saved ``trainer_state``.
    """
    return apply_checkpoint(read_checkpoint(path), path, model=model, optimizer=optimizer,
                            scheduler=scheduler, restore_rng_state=restore_rng)
