"""Reliability of the packed loader: n damaged copies of a small packed model, about half header
edits re-written with valid checksums (packed_mutate.mutate), half raw byte flips and truncations
(checksums left stale); each loaded with load_packed and file_report and classified as
"named_error" | "raw_exception" | "accepted_but_wrong" | "accepted_ok". Also the peak memory of
loading a header that asks for a 250,000,000-element scale."""
from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from slimtorch.export import load_packed
from slimtorch.export.packed_mutate import (OPS, flip_byte, hostile_header, mutate, paths, peak_memory_mb,
                                            replacements, run_case, tiny_packed, truncate, write_mutant)

OUTCOMES = ("named_error", "raw_exception", "accepted_but_wrong", "accepted_ok")


def _damage(case: dict, rng: random.Random, i: int, dst: Path) -> tuple[str, str]:
    """Write damaged copy ``i`` to ``dst``: (group, description)."""
    if i % 2 == 0:
        path = rng.choice(case["paths"])
        op = rng.choice(OPS)
        v = case["meta"]
        for k in path:
            v = v[k]
        value = rng.choice(replacements(v)) if op == "replace" else None
        write_mutant(case["path"], dst, lambda meta: mutate(meta, path, op, value))
        return "header", f"{op} {'.'.join(map(str, path))}" + (f" = {value!r}" if op == "replace" else "")
    kind = rng.choice(("flip_data", "flip_any", "truncate"))
    pos = rng.randrange(1 << 20)
    if kind == "truncate":
        truncate(case["path"], dst, pos)
    else:
        flip_byte(case["path"], dst, pos, data_only=kind == "flip_data")
    return "bytes", f"{kind} {pos}"


def run(n: int = 1300, seed: int = 0) -> dict:
    """Counts per outcome (overall and per group), up to 3 example messages per outcome, and
    "peak_mb_hostile_header" (tracemalloc peak, MB; "peak_rss_rise_mb_hostile_header" on Linux)."""
    t0, rng = time.perf_counter(), random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="slim-rel-") as tmp:
        case = tiny_packed(tmp)
        case["paths"] = [p for p in paths(case["meta"]) if p != ("crc32",)]
        counts, groups, examples = Counter(), {"header": Counter(), "bytes": Counter()}, {o: [] for o in OUTCOMES}
        dst = Path(tmp) / "damaged.slim"
        for i in range(n):
            group, what = _damage(case, rng, i, dst)
            outcome, msg = run_case(dst, case["factory"], case["inputs"], case["want"], case["report"])
            counts[outcome] += 1
            groups[group][outcome] += 1
            if len(examples[outcome]) < 3:
                examples[outcome].append(f"[{what}] {msg.replace(str(dst), '<file>')[:200]}")
        hostile = hostile_header(case["path"], Path(tmp) / "hostile.slim", 250_000_000)
        mem = peak_memory_mb(lambda: load_packed(hostile, case["factory"]))
        size = hostile.stat().st_size
    return {"n": n, "seed": seed, "counts": {o: counts[o] for o in OUTCOMES},
            "by_group": {g: {o: c[o] for o in OUTCOMES} for g, c in groups.items()},
            "examples": examples, "peak_mb_hostile_header": round(mem["tracemalloc_mb"], 3),
            "peak_rss_rise_mb_hostile_header": mem["rss_peak_rise_mb"], "hostile_file_bytes": size,
            "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    import json
    print(json.dumps(run(), indent=2))
