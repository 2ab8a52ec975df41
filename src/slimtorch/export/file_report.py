"""What a packed file holds: per layer the bits, the theoretical bytes (cost.py, written at
save time) and the bytes the file really spends; totals with the header; a PNG bar chart.
A product-quantized layer shows "PQ K/d"; its plotted weight bits are the index bits."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..report import _fmt_bytes, render_markdown, render_table
from .packed import cost_rows, read_packed


@dataclass
class FileReport:
    path: str
    rows: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": self.path, "layers": [dict(r) for r in self.rows], **self.totals}

    def _table(self):
        head = ["layer", "kind", "params", "W bits", "A bits", "theory", "file"]
        body = [[r["name"], r["kind"], f"{r['params']:,}", f"PQ {r['centroids']}/{r['block']}" if r.get("centroids")
                 else "fp32" if r["w_bits"] == 32 else str(r["w_bits"]),
                 "fp32" if r["a_bits"] is None else str(r["a_bits"]), _fmt_bytes(r["theory_bytes"]),
                 _fmt_bytes(r["file_bytes"])] for r in self.rows]
        t = self.totals
        body.append(["(other float state)", "", "", "", "", _fmt_bytes(t["theory_other_bytes"]),
                     _fmt_bytes(t["other_file_bytes"])])
        body.append(["(header + index)", "", "", "", "", "", _fmt_bytes(t["header_bytes"])])
        foot = ["total", "", f"{t['params']:,}", "", "", _fmt_bytes(t["theory_bytes"]), _fmt_bytes(t["file_bytes"])]
        return head, body, foot

    def summary(self) -> str:
        t = self.totals
        return (f"file {t['file_bytes']:,} B = {t['file_over_theory']:.4f} x theoretical "
                f"{t['theory_bytes']:,} B (limit 1.02 x theory + 4 KiB = {t['limit_bytes']:,.0f} B: "
                f"{'ok' if t['within_limit'] else 'EXCEEDED'}); FP32 {t['fp32_bytes']:,} B "
                f"-> x{t['compression']:.2f} smaller")

    def __str__(self) -> str:
        return "\n".join([*render_table(*self._table()), self.summary()])

    def to_markdown(self) -> str:
        return render_markdown(*self._table()) + f"\n\n{self.summary()}\n"

    def plot(self, png_path) -> Path:
        """Bar chart: W/A bits per layer (top) and theoretical vs file bytes per layer (bottom)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        names = [r["name"] for r in self.rows]
        x = np.arange(len(names))
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(names) + 2), 7), sharex=True)
        a1.bar(x - 0.2, [r["w_bits"] for r in self.rows], 0.4, label="weight bits")
        a1.bar(x + 0.2, [r["a_bits"] or 32 for r in self.rows], 0.4, label="activation bits (32 = float)")
        a1.set_ylabel("bits")
        a1.legend(fontsize=8)
        a2.bar(x - 0.2, [r["theory_bytes"] for r in self.rows], 0.4, label="theoretical")
        a2.bar(x + 0.2, [r["file_bytes"] for r in self.rows], 0.4, label="in the file")
        a2.set_ylabel("bytes")
        a2.set_yscale("log")
        a2.legend(fontsize=8)
        a2.set_xticks(x, names, rotation=90, fontsize=7)
        a1.set_title(f"{Path(self.path).name}: {self.summary()[:80]}", fontsize=8)
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        return Path(png_path)


def file_report(path) -> FileReport:
    """Read (and verify) a packed file and account for every byte in it."""
    from .container import ITEMSIZE
    meta, tensors, index = read_packed(path)
    size = Path(path).stat().st_size
    nbytes = {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in index.items()}
    own = {}                                   # bytes per owning layer name (None = other state)
    for e in meta["layers"]:                   # params: the layer's slice of the pooled tensor (v2)
        keys = [f"{e['name']}.{t}" for t in ("w_codes", "weight", "params", "mask", "mask_index", "codebook")]
        own[e["name"]] = sum(tensors[k].numel() * tensors[k].element_size() for k in keys if k in tensors)
    costs = cost_rows(meta)
    float_layers = {r[0] for r in costs if r[0] not in own}
    other = 0
    for code, keys in meta["state"].items():
        for k, shape in keys:
            b = math.prod(shape) * ITEMSIZE[code]
            layer, _, leaf = k.rpartition(".")
            if layer in float_layers and leaf in ("weight", "bias"):
                own[layer] = own.get(layer, 0) + b
            else:
                other += b
    pq = {e["name"]: {"centroids": e["centroids"], "block": e["block"]} for e in meta["layers"] if e["kind"] == "codebook"}
    rows = [{"name": n, "kind": kind, "params": params, "w_bits": w_bits, "a_bits": a_bits,
             "theory_bytes": theory, "file_bytes": own.get(n, 0), **pq.get(n, {})}
            for n, kind, params, w_bits, a_bits, theory in costs]
    data = sum(nbytes.values())
    theory = meta["theory"]["bytes"]
    totals = {"file_bytes": size, "header_bytes": size - data, "other_file_bytes": other,
              "theory_bytes": theory, "theory_other_bytes": theory - sum(r["theory_bytes"] for r in rows),
              "fp32_bytes": meta["theory"]["fp32_bytes"], "file_over_theory": size / theory,
              "limit_bytes": 1.02 * theory + 4096, "within_limit": size <= 1.02 * theory + 4096,
              "compression": meta["theory"]["fp32_bytes"] / size,
              "params": meta["theory"].get("params", meta["theory"]["fp32_bytes"] // 4)}
    return FileReport(str(path), rows, totals)
