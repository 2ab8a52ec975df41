"""Reliability as figures (issue 10): mutated recipes, damaged packed files, SIGKILL + resume, and the
peak memory of a hostile packed header. Writes its section of benchmarks/RESULTS.md.

    PYTHONPATH=src .venv/bin/python -m benchmarks.reliability [--recipes 1200] [--packed 1300] [--kills 10]

Kill points: the README's default recipe runs once uninterrupted through the CLI (the reference),
then ``--kills`` times killed with SIGKILL (no handler runs) and resumed with ``--resume``; kill
times are spread over the reference's duration, and every third kill lands as soon as a checkpoint
temporary file appears (a kill during a checkpoint write). A resume counts when its ``model.slim``
and metrics (wall times aside) equal the reference's byte for byte."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import reliability_packed, reliability_recipes
from benchmarks.results import write_section

RECIPE = Path("recipes/digits-lsqplus-w4a4.yaml")


def _cli(out: Path, *extra) -> list:
    return [sys.executable, "-m", "slimtorch.cli", "run", str(RECIPE), "--out", str(out), "--no-progress", *extra]


def _metrics(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    m.pop("timing", None)
    return m


def kill_points(k: int) -> dict:
    env = {**os.environ, "PYTHONPATH": "src"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="slim-kill-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run(_cli(tmp / "ref"), check=True, env=env, capture_output=True)
        total = time.perf_counter() - t0
        ref_bytes, ref_metrics = (tmp / "ref" / "model.slim").read_bytes(), _metrics(tmp / "ref")
        for i in range(k):
            out = tmp / f"k{i}"
            at_write = i % 3 == 2
            delay = total * (i + 1) / (k + 1)
            proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            start = time.perf_counter()
            while proc.poll() is None:
                elapsed = time.perf_counter() - start
                if at_write and elapsed > delay / 2 and out.is_dir() and any(out.glob(".*.tmp-*")):
                    break
                if not at_write and elapsed >= delay:
                    break
                time.sleep(0.002)
            killed_at = time.perf_counter() - start
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            left = sorted(p.name for p in out.glob("*")) + sorted(p.name for p in out.glob(".*.tmp-*"))
            res = subprocess.run(_cli(out, "--resume"), env=env, capture_output=True, text=True)
            same = res.returncode == 0 and (out / "model.slim").read_bytes() == ref_bytes \
                and _metrics(out) == ref_metrics
            took = [ln for ln in res.stderr.splitlines() if ln.startswith("resuming from")]
            rows.append({"kill_s": round(killed_at, 1), "during_write": at_write, "finished_first": finished,
                         "on_disk": left, "resumed_from": [ln.split(" (")[0].replace(str(out) + "/", "")
                                                           .replace("resuming from ", "") for ln in took],
                         "identical": same, "stale_tmp_left": bool(list(out.glob(".*.tmp-*"))),
                         "rc": res.returncode})
    return {"reference_s": round(total, 1), "rows": rows}


def _table(counts: dict) -> str:
    return " | ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())


def render(rec: dict, packed: dict, kills: dict) -> str:
    rc, pc = rec["counts"], packed["counts"]
    ok = sum(r["identical"] for r in kills["rows"])
    goals = [("0 raw exceptions", rc["raw_exception"] + pc["raw_exception"] == 0),
             ("0 silent wrong loads", pc["accepted_but_wrong"] == 0),
             ("0 accepted-but-invalid recipes", rc["accepted_but_invalid"] == 0),
             ("every model-dependent error before training", not rec["late_errors"]),
             (f"{len(kills['rows'])}/{len(kills['rows'])} bit-identical resumes", ok == len(kills["rows"]))]
    met = all(g for _, g in goals)
    lines = [f"Goal (issue 10): {'; '.join(n for n, _ in goals)}: **{'met' if met else 'NOT met'}**"
             + ("" if met else f" (failing: {', '.join(n for n, g in goals if not g)})") + ".", "",
             "| input | tried | named error | raw exception | accepted but invalid / wrong | accepted (valid) |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| mutated recipes (parse + model + preflight) | {rec['n']} | {rc['named_error']} | "
             f"{rc['raw_exception']} | {rc['accepted_but_invalid']} | {rc['accepted']} |",
             f"| damaged packed files (load_packed + file report) | {packed['n']} | {pc['named_error']} | "
             f"{pc['raw_exception']} | {pc['accepted_but_wrong']} | {pc['accepted_ok']} |", "",
             f"Recipes by mutation kind: " + "; ".join(f"{k}: {_table(v)}" for k, v in rec["by_kind"].items()) + ".",
             f"Accepted valid recipes then run in full (time-boxed at 20 s): {rec['full_runs']} finished, "
             f"{rec['full_timeouts']} timed out (long but valid, e.g. huge epochs), "
             f"**{len(rec['late_errors'])} failed after training started**"
             + (": " + "; ".join(rec["late_errors"][:5]) if rec["late_errors"] else "") + ".",
             f"Packed files by group: header edits with valid checksums {_table(packed['by_group']['header'])}; "
             f"byte damage {_table(packed['by_group']['bytes'])}.",
             f"Peak memory loading a {packed.get('hostile_file_bytes', '?')}-byte file whose header asks "
             f"for a 250,000,000-element scale: {packed['peak_mb_hostile_header']:.3f} MB (tracemalloc)"
             + (f", peak RSS rise {packed['peak_rss_rise_mb_hostile_header']:.1f} MB"
                if packed.get("peak_rss_rise_mb_hostile_header") is not None else "") + ".", "",
             f"SIGKILL + `--resume` on `{RECIPE}` (uninterrupted run {kills['reference_s']} s): "
             f"**{ok}/{len(kills['rows'])} bit-identical** (model.slim and metrics).", "",
             "| kill at (s) | during a checkpoint write | on disk when killed | resumed from | identical | stale .tmp left |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in kills["rows"]:
        lines.append(f"| {r['kill_s']} | {'yes' if r['during_write'] else 'no'} | {', '.join(r['on_disk']) or '-'} | "
                     f"{', '.join(r['resumed_from']) or '(fresh start)'} | {'yes' if r['identical'] else 'NO'} | "
                     f"{'yes' if r['stale_tmp_left'] else 'no'} |")
    lines += ["", "Example messages: " + " / ".join(
        f"`{m}`" for m in (rec["examples"]["named_error"][:2] + packed["examples"]["named_error"][:2]))]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", type=int, default=1200)
    ap.add_argument("--packed", type=int, default=1300)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--full-runs", type=int, default=60)
    args = ap.parse_args(argv)
    rec = reliability_recipes.run(args.recipes, full_runs=args.full_runs)
    print("recipes", rec["counts"], "late", rec["late_errors"][:3], flush=True)
    packed = reliability_packed.run(args.packed)
    print("packed", packed["counts"], flush=True)
    kills = kill_points(args.kills)
    print("kills", [r["identical"] for r in kills["rows"]], flush=True)
    Path("runs").mkdir(exist_ok=True)
    Path("runs/reliability.json").write_text(json.dumps({"recipes": rec, "packed": packed, "kills": kills}))
    body = render(rec, packed, kills)
    print(body)
    write_section("Reliability: hostile input and killed runs (issue 10)", body,
                  command="PYTHONPATH=src .venv/bin/python -m benchmarks.reliability " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
