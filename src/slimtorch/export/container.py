"""The file container: a valid safetensors file that slimtorch writes itself, with checksums.

Layout: 8-byte little-endian header length N, N bytes of JSON (space-padded to a multiple of 8),
then the tensors' bytes back to back in header order. The JSON holds safetensors' index
{name: {dtype, shape, data_offsets}} and ``__metadata__`` with three strings:

    "slimtorch.packed"  the format description: "zlib+base64:" + base64(zlib(JSON text)), see
                        packed.py (version 1 files hold the JSON text itself, also read)
    "sha256.header"     SHA-256 of canonical(index) + 0x00 + the stored format string
    "sha256.data"       SHA-256 of the data section

The format text also carries "crc32": 8 hex digits per tensor in index order, used only to name
the tensor a data-checksum failure comes from. Compression keeps the header small for models with
many layers (the text repeats keys, quantizer specs and layer-name prefixes); the decompressed size
is capped. Reading never unpickles anything."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import mmap
import os
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

META_KEY = "slimtorch.packed"
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
ZPREFIX = "zlib+base64:"
MAX_TEXT = 64 << 20      # decompressed format text, bytes
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}


def _canonical(index: dict) -> bytes:
    return json.dumps(index, sort_keys=True, separators=(",", ":")).encode()


def _header_digest(index: dict, text: str) -> str:
    return hashlib.sha256(_canonical(index) + b"\0" + text.encode()).hexdigest()


def encode_text(meta: dict) -> str:
    text = json.dumps(meta, separators=(",", ":")).encode()
    return ZPREFIX + base64.b64encode(zlib.compress(text, 9)).decode("ascii")


def decode_text(stored) -> dict:
    """The format dict of a stored format string (compressed or plain JSON); ValueError if bad."""
    if not isinstance(stored, str):
        raise ValueError("not a string")
    if stored.startswith(ZPREFIX):
        try:
            d = zlib.decompressobj()
            raw = d.decompress(base64.b64decode(stored[len(ZPREFIX):], validate=True), MAX_TEXT)
            if d.unconsumed_tail or not d.eof:
                raise ValueError("truncated or over the size cap")
            stored = raw.decode("utf-8")
        except (binascii.Error, zlib.error, UnicodeDecodeError) as e:
            raise ValueError(str(e)) from None
    meta = json.loads(stored)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def _tensor_bytes(t) -> tuple[str, list[int], bytes]:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.detach().cpu().contiguous()
    if t.dtype not in DTYPES:
        raise CheckpointError(f"cannot store a tensor of dtype {t.dtype}")
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return DTYPES[t.dtype], list(t.shape), raw.numpy().tobytes()


def write_container(path, tensors: dict, meta: dict) -> int:
    """Write ``tensors`` (name -> tensor/ndarray, written in this order) and ``meta`` atomically.
    Returns the file size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    index, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        dtype, shape, raw = _tensor_bytes(t)
        index[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    meta = dict(meta, crc32="".join(f"{zlib.crc32(c):08x}" for c in chunks))
    text = encode_text(meta)
    data = b"".join(chunks)
    head = {"__metadata__": {META_KEY: text, "sha256.header": _header_digest(index, text),
                             "sha256.data": hashlib.sha256(data).hexdigest()}, **index}
    hb = json.dumps(head, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return 8 + len(hb) + len(data)


def _fail(path, msg):
    raise CheckpointError(f"{path}: {msg}")


def _nat(v) -> bool:
    return type(v) is int and v >= 0


def _check_index(path, index: dict, data_len: int):
    spans = []
    for name, e in index.items():
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or e["dtype"] not in ITEMSIZE:
            _fail(path, f"tensor {name!r} has an unknown dtype {e.get('dtype') if isinstance(e, dict) else e!r}")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if (set(e) != {"dtype", "shape", "data_offsets"} or not isinstance(shape, list) or len(shape) > 16
                or not all(map(_nat, shape)) or not isinstance(offs, list) or len(offs) != 2
                or not all(map(_nat, offs)) or not offs[0] <= offs[1]):
            _fail(path, f"tensor {name!r} has a malformed shape or data_offsets in the header")
        numel = math.prod(shape)
        if offs[1] - offs[0] != numel * ITEMSIZE[e["dtype"]]:
            _fail(path, f"tensor {name!r}: shape {shape} ({e['dtype']}) needs "
                        f"{numel * ITEMSIZE[e['dtype']]} bytes but the header gives it {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            _fail(path, f"tensor {name!r} overlaps another or leaves a gap in the data section")
        end = b
    if end != data_len:
        what = "truncated" if end > data_len else "corrupt (trailing bytes after the last tensor)"
        _fail(path, f"file is {what}: the header describes {end} data bytes, the file has {data_len}")


CHUNK = 16 << 20        # bytes hashed per step


@contextmanager
def _mapped(path: Path):
    """The file's bytes, memory-mapped read-only (a file under 8 bytes is read as bytes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            yield f.read()
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm


def _verify(path, blob) -> tuple[dict, dict, int]:
    """Check header, format, index and both digests of the mapped file; (meta, index, data start)."""
    if len(blob) < 8:
        _fail(path, f"not a slimtorch packed model: {len(blob)} bytes (empty or truncated)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        if blob[8:9] == b"{":
            _fail(path, f"file is truncated: its header needs {n} bytes, only {len(blob) - 8} follow")
        _fail(path, "not a slimtorch packed model (not a safetensors file)")
    try:
        head = json.loads(blob[8:8 + n].decode("utf-8"))
        assert isinstance(head, dict)
    except (UnicodeDecodeError, ValueError, AssertionError, RecursionError):
        _fail(path, "header is corrupt: not valid JSON (not a safetensors file, or damaged)")
    md = head.pop("__metadata__", None) or {}
    if not isinstance(md, dict) or META_KEY not in md:
        hint = " (it is a training checkpoint: use load_checkpoint)" if "slimtorch" in md else ""
        _fail(path, f"not a slimtorch packed model: no {META_KEY!r} metadata{hint}")
    if isinstance(md[META_KEY], str) and md.get("sha256.header") != _header_digest(head, md[META_KEY]):
        _fail(path, "header is corrupt: SHA-256 of the header does not match (edited or damaged)")
    try:
        meta = decode_text(md[META_KEY])
    except (ValueError, RecursionError):
        _fail(path, "header is corrupt: the slimtorch metadata is not valid (compressed) JSON")
    from .packed import FORMAT, READ_VERSIONS, VERSION  # the format owns its tag and versions
    if meta.get("format") != FORMAT:
        _fail(path, f"not a slimtorch packed model (format {meta.get('format')!r}, expected {FORMAT!r})")
    if type(meta.get("version")) is not int or meta["version"] not in READ_VERSIONS:
        _fail(path, f"unsupported packed format version {meta.get('version')!r}: this slimtorch "
                    f"reads versions {', '.join(map(str, READ_VERSIONS))}" + (" (upgrade slimtorch)" if isinstance(
                        meta.get("version"), int) and meta["version"] > VERSION else ""))
    start = 8 + n
    _check_index(path, head, len(blob) - start)
    h = hashlib.sha256()
    with memoryview(blob) as view:
        for i in range(start, len(blob), CHUNK):
            h.update(view[i:min(i + CHUNK, len(blob))])
        if md.get("sha256.data") != h.hexdigest():
            crcs = meta.get("crc32", "")
            crcs = crcs if isinstance(crcs, str) else ""
            bad = [nm for i, (nm, e) in enumerate(head.items()) if crcs[8 * i:8 * i + 8] != "%08x" % zlib.crc32(
                view[start + e["data_offsets"][0]:start + e["data_offsets"][1]])]
            _fail(path, "data is corrupt: SHA-256 of the data section does not match"
                        + (f"; damaged tensor(s): {', '.join(bad[:5])}" if bad else ""))
    return meta, head, start


def read_container(path, check=None) -> tuple[dict, dict, dict]:
    """Read and verify a container through a memory map. ``check(meta, index)`` runs after the
    checksums and before any tensor is copied out. Returns (meta, tensors: name -> CPU tensor, index)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"packed model {path} does not exist or is not a file")
    with _mapped(path) as blob:
        meta, head, start = _verify(path, blob)
        if check is not None:
            check(meta, head)
        tensors = {}
        for name, e in head.items():
            a, b = e["data_offsets"]
            raw = torch.from_numpy(np.frombuffer(blob, np.uint8, b - a, start + a).copy()) if b > a else \
                torch.empty(0, dtype=torch.uint8)
            tensors[name] = raw.view(TORCH_DTYPES[e["dtype"]]).reshape(e["shape"])
    return meta, tensors, head
