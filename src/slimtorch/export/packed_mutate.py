"""Damaged packed files for the fuzz tests and the reliability benchmark: header edits re-written
with valid checksums (only the edit is wrong), raw byte flips and truncations, a hostile header,
and a peak-memory probe."""
from __future__ import annotations

import copy
import gc
import tracemalloc
from pathlib import Path

from .container import read_container, write_container

HUGE = (-1, 2 ** 31, 2 ** 64, 10 ** 30, 1e308, float("nan"), float("inf"), 0.5)
OPS = ("replace", "delete", "extra")


def paths(obj, prefix=()) -> list:
    """Every path (tuple of keys/indices) inside a nested dict/list, containers included."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def replacements(v) -> list:
    """Values of another type than ``v``, out-of-range or huge numbers, and ``v`` nested deeper."""
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return [c for c in (None, True, "yes", 0, [], {}, *HUGE) if type(c) is not type(v) or (num and c in HUGE)] \
        + [[v], {"x": v}]


def mutate(meta: dict, path: tuple, op: str, value=None) -> dict:
    """A deep copy of ``meta`` with ``op`` applied at ``path``: "replace" (by ``value``),
    "delete" (the key or list item) or "extra" (a new key next to it or inside it; a list item repeated)."""
    meta = copy.deepcopy(meta)
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    k = path[-1]
    if op == "replace":
        parent[k] = value
    elif op == "delete":
        del parent[k]
    elif isinstance(parent[k], dict):
        parent[k]["extra"] = 1
    elif isinstance(parent[k], list):
        parent[k].append(copy.deepcopy(parent[k][-1]) if parent[k] else 0)
    elif isinstance(parent, list):
        parent.append(parent[k])
    else:
        parent["extra"] = 1
    return meta


def load_parts(path) -> tuple[dict, dict]:
    """(format description without crc32, tensors) of a valid packed file."""
    meta, tensors, _ = read_container(path)
    meta.pop("crc32", None)
    return meta, tensors


def write_mutant(src, dst, edit) -> Path:
    """``dst``: ``src`` with its description replaced by ``edit(meta)``, checksums recomputed."""
    meta, tensors = load_parts(src)
    write_container(dst, tensors, edit(meta))
    return Path(dst)


def flip_byte(src, dst, pos: int, data_only: bool = True) -> Path:
    """``dst``: ``src`` with byte ``pos`` (counted from the data section when ``data_only``, modulo
    its length) inverted; checksums NOT recomputed."""
    blob = bytearray(Path(src).read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little") if data_only else 0
    i = start + pos % max(1, len(blob) - start)
    blob[i] ^= 0xFF
    Path(dst).write_bytes(bytes(blob))
    return Path(dst)


def truncate(src, dst, keep: int) -> Path:
    blob = Path(src).read_bytes()
    Path(dst).write_bytes(blob[:keep % len(blob)])
    return Path(dst)


def hostile_header(src, dst, numel: int = 250_000_000) -> Path:
    """``dst``: ``src`` whose first quantizer asks for a scale of ``numel`` values (valid checksums)."""
    def edit(meta):
        meta["quantizers"][0]["spec"]["scale_shape"] = [numel]
        return meta
    return write_mutant(src, dst, edit)


def _rss_peak_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def peak_memory_mb(fn) -> dict:
    """Run ``fn()`` (exceptions swallowed): tracemalloc peak (Python heap) and, on Linux, the rise
    of the resident-set peak (catches torch's allocations too), in MB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # reset VmHWM to the current RSS
    except OSError:
        pass
    rss0 = _rss_peak_kb()
    tracemalloc.start()
    try:
        fn()
    except Exception:  # noqa: BLE001 - the caller only wants the memory
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss1 = _rss_peak_kb()
    return {"tracemalloc_mb": peak / 2 ** 20, "rss_peak_rise_mb": None if rss0 is None else (rss1 - rss0) / 1024}


SIZE_KEYS = {"path", "file_bytes", "header_bytes", "file_over_theory", "compression", "within_limit"}


def report_dict(path) -> dict:
    """file_report(path) as a dict without what depends on the file's own size and name."""
    from .file_report import file_report
    return {k: v for k, v in file_report(path).to_dict().items() if k not in SIZE_KEYS}


def run_case(path, factory, inputs, want, want_report: dict) -> tuple[str, str]:
    """Load ``path`` with load_packed and file_report: ("named_error" | "raw_exception" |
    "accepted_but_wrong" | "accepted_ok", message). ``want``/``want_report``: the original's output
    on ``inputs`` and its ``report_dict``."""
    import torch

    from ..errors import SlimtorchError
    from .packed import load_packed
    try:
        with torch.no_grad():
            got = load_packed(path, factory)(inputs)
        rep = report_dict(path)
    except SlimtorchError as e:
        return ("named_error" if str(path) in str(e) else "raw_exception"), str(e)
    except Exception as e:  # noqa: BLE001 - what the benchmark counts
        return "raw_exception", f"{type(e).__name__}: {e}"
    ok = got.shape == want.shape and float((got - want).abs().max()) <= 1e-6 and rep == want_report
    return ("accepted_ok" if ok else "accepted_but_wrong"), ""


def tiny_net():
    """Conv2d(1, 4, 3) -> ReLU -> Flatten -> Linear(144, 10), seeded."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))


def tiny_packed(folder) -> dict:
    """``tiny_net`` quantized with LSQ+ (4/4 bits), calibrated and saved to ``folder``/m.slim:
    {"path", "factory", "inputs", "want" (its outputs), "report" (report_dict), "meta" (load_parts)}."""
    import torch

    import slimtorch
    from .packed import save_packed
    m = tiny_net()
    slimtorch.quantize_(m, slimtorch.LSQPlus(w_bits=4, a_bits=4))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    slimtorch.calibrate(m, [x])
    path = Path(folder) / "m.slim"
    save_packed(m, path)
    with torch.no_grad():
        want = m.eval()(x)
    return {"path": path, "factory": tiny_net, "inputs": x, "want": want, "report": report_dict(path),
            "meta": load_parts(path)[0]}
