"""Reliability of recipe validation: n mutants of a small valid recipe, each labelled by construction
"invalid" (must be refused: a wrong type, NaN/inf, an unknown key, a duplicate key, a non-mapping
section, deep nesting, non-UTF-8 bytes, a non-string key) or "any" (a value of the right type that
may or may not be in range). Each is loaded from a file, parsed, its model built and preflight-checked
(what ``slimtorch run`` does before training) and classified:

    named_error           a SlimtorchError (the message names a section or key)
    raw_exception         any other exception (a defect)
    accepted_but_invalid  an "invalid" mutant that passed (a defect)
    accepted              a valid mutant that passed

A sample of the accepted ones then runs in full (time-boxed): an error there is one the checks
before training missed ("late_error")."""
from __future__ import annotations

import copy
import math
import random
import signal
import tempfile
from collections import Counter
from pathlib import Path

import yaml

BASE = {"name": "fuzz", "seed": 0,
        "data": {"name": "digits", "eval_batch_size": 256, "options": {"limit_train": 240, "limit_test": 100}},
        "model": {"name": "digits_mlp", "kwargs": {"hidden": 16}},
        "train": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False},
        "compress": {"method": "lsq+", "w_bits": 4, "a_bits": 4, "calibrate_batches": 2, "include": ["fc*"],
                     "tie_bits": False, "integer_offset": False},
        "finetune": {"epochs": 1, "lr": 0.002, "batch_size": 32, "progress": False},
        "export": {"path": "model.slim"}}
SEARCH = {"method": "hawq", "bits": [2, 4, 8], "budget": "avg_bits", "target": 4.0, "seed": 0, "max_iter": 5,
          "num_batches": 1}
OUTCOMES = ("named_error", "raw_exception", "accepted_but_invalid", "accepted")
OTHER_TYPES = [True, False, "yes", "no", "1", 3, -1, 2.5, [1, 2], {"a": 1}, [None]]


class _Timeout(Exception):
    pass


def _leaves(doc, prefix=()):
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(doc, path, value):
    d = doc
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _other_type(v, rng):
    """A value of another JSON type than ``v`` (ints for floats and None do not count as other)."""
    def same(a):
        if isinstance(v, bool) or isinstance(a, bool):
            return type(a) is type(v)
        if isinstance(v, (int, float)) and isinstance(a, (int, float)):
            return isinstance(v, float) or isinstance(a, int)
        if isinstance(v, (list, tuple)) and isinstance(a, (list, tuple)):
            return True
        return type(a) is type(v)
    return rng.choice([a for a in OTHER_TYPES if not same(a)])


def mutants(n: int, seed: int = 0):
    """Yield (label, kind, text-or-bytes) for ``n`` mutants."""
    rng = random.Random(seed)
    kinds = ["type", "nonfinite", "number", "unknown_key", "delete", "section", "duplicate", "nesting",
             "binary", "key_type", "string"]
    for i in range(n):
        doc = copy.deepcopy(BASE)
        if rng.random() < 0.3:
            doc["search"] = dict(SEARCH)
        kind = kinds[i % len(kinds)]
        leaves = list(_leaves(doc))
        path, v = rng.choice(leaves)
        label = "invalid"
        if kind == "type":
            if v is None or isinstance(v, list) and not v:
                label = "any"
            _set(doc, path, _other_type(v, rng))
        elif kind == "nonfinite":
            _set(doc, path, rng.choice([math.nan, math.inf, -math.inf]))   # never a valid value
        elif kind == "number":
            label = "any"
            _set(doc, path, rng.choice([0, -1, 1, 7, 9, 10**9, 2**63, 1e308, -0.5, 0.999]))
        elif kind == "unknown_key":
            _set(doc, path[:-1] + (path[-1] + "_x",), 1)
        elif kind == "delete":
            label = "any"
            d = doc
            for k in path[:-1]:
                d = d[k]
            del d[path[-1]]
        elif kind == "section":
            sec = rng.choice(list(doc))
            value = rng.choice([5, "x", [1], True, None, [], {}])
            if sec == "seed":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            elif sec in ("name", "description"):
                ok = value is None or isinstance(value, str)
            else:                       # a mapping section: only "absent" is a valid other value
                ok = value is None or value == {}
            label = "any" if ok else "invalid"
            doc[sec] = value
        elif kind == "string":
            label = "any"
            _set(doc, path, rng.choice(["", "fc9*", "lsq", "uhlich", "mnist1d", "resnet20", "nope", "a" * 300]))
        text = yaml.safe_dump(doc, sort_keys=False)
        if kind == "duplicate":
            line = rng.choice([ln for ln in text.splitlines() if ln.startswith("  ") and ":" in ln])
            text = text.replace(line + "\n", line + "\n" + line + "\n", 1)
        elif kind == "nesting":
            depth = rng.randrange(40, 3000)
            text += f"description: {'[' * depth}{']' * depth}\n"
        elif kind == "binary":
            raw = bytearray(text.encode())
            raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC3, 0x80, 0xFE])
            yield label, kind, bytes(raw)
            continue
        elif kind == "key_type":
            text += rng.choice(["7: 1\n", "data: {name: digits, 3: 1}\n"])
        yield label, kind, text


def _classify(path: Path):
    from slimtorch.errors import SlimtorchError
    from slimtorch.recipe import load_recipe

    try:
        recipe = load_recipe(path)
        return recipe, None
    except SlimtorchError as e:
        return None, ("named_error", str(e))
    except Exception as e:  # noqa: BLE001 - what we measure
        return None, ("raw_exception", f"{type(e).__name__}: {e}")


def _preflight(recipe, out: Path):
    """What run_recipe does before training: data, model, preflight (no training)."""
    import slimtorch.pipeline as P

    def stop(*a, **k):
        raise _Timeout("stopped at training")
    real = P.train
    P.train = stop
    try:
        P.run_recipe(recipe, out, progress=False)
    except _Timeout:
        pass
    finally:
        P.train = real


def run(n: int = 1200, seed: int = 0, full_runs: int = 60, full_timeout_s: int = 20) -> dict:
    from slimtorch.errors import SlimtorchError

    counts, by_kind, examples = Counter(), {}, {o: [] for o in OUTCOMES}
    accepted = []
    with tempfile.TemporaryDirectory(prefix="slim-recipes-") as tmp:
        tmp = Path(tmp)
        for i, (label, kind, body) in enumerate(mutants(n, seed)):
            path = tmp / f"m{i}.yaml"
            path.write_bytes(body if isinstance(body, bytes) else body.encode())
            recipe, res = _classify(path)
            if recipe is not None:
                try:
                    _preflight(recipe, tmp / f"o{i}")
                except SlimtorchError as e:
                    res = ("named_error", str(e))
                except Exception as e:  # noqa: BLE001
                    res = ("raw_exception", f"{type(e).__name__}: {e}")
            if res is None:
                res = ("accepted_but_invalid" if label == "invalid" else "accepted", "")
                if label != "invalid":
                    accepted.append((i, path))
            counts[res[0]] += 1
            by_kind.setdefault(kind, Counter())[res[0]] += 1
            if len(examples[res[0]]) < 3:
                examples[res[0]].append(f"[{kind}] {res[1].replace(str(tmp) + '/', '')[:160]}")
        late = _full_runs(accepted, full_runs, full_timeout_s, tmp, random.Random(seed))
    return {"n": n, "seed": seed, "counts": {o: counts[o] for o in OUTCOMES},
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}, "examples": examples, **late}


def _full_runs(accepted, k, timeout_s, tmp: Path, rng) -> dict:
    """Run a sample of accepted recipes in full; any error now is one the early checks missed."""
    from slimtorch.pipeline import run_recipe
    from slimtorch.recipe import load_recipe

    def alarm(*_):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, alarm)
    done, timeouts, late = 0, 0, []
    try:
        for i, path in rng.sample(accepted, min(k, len(accepted))):
            signal.alarm(timeout_s)
            try:
                run_recipe(load_recipe(path), tmp / f"full{i}", progress=False)
                done += 1
            except _Timeout:
                timeouts += 1
            except Exception as e:  # noqa: BLE001 - an error after training started
                late.append(f"{path.name}: {type(e).__name__}: {str(e)[:160]}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return {"full_runs": done, "full_timeouts": timeouts, "late_errors": late}
