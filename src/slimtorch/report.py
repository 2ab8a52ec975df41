"""``report(model)``: per-layer rows (name, kind, params, weight bits, activation bits, bytes) and
totals (bytes, FP32 bytes, compression ratio), printable as a table or markdown; a "stays float"
line for every module holding parameters slimtorch cannot quantize (quant/coverage.py). With pruning
masks: per layer the kept fraction and the sparse size (kept codes + mask, cost.py), and totals.
A product-quantized layer shows "PQ K/d" as its weight bits (K centroids of d elements)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .quant.coverage import float_lines, float_modules
from .cost import model_costs


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def render_table(head, body, foot) -> list[str]:
    """Aligned text table lines (first two columns left-aligned, the rest right-aligned)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, foot)]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return [line(head), sep, *map(line, body), sep, line(foot)]


def render_markdown(head, body, foot) -> str:
    rows = [head, ["---"] * len(head), *body, foot]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def _w_bits(r: dict) -> str:
    """"fp32", the bits, or for a product-quantized layer "PQ K/d" (+ the scalar bits after it)."""
    bits = "fp32" if r["w_bits"] == 32 else str(r["w_bits"])
    if not r.get("centroids"):
        return bits
    return f"PQ {r['centroids']}/{r['block']}" + ("" if r["w_bits"] == 32 else f" +{bits}")


@dataclass
class Report:
    rows: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    floats: list = field(default_factory=list)   # quant.coverage.float_modules entries

    def to_dict(self) -> dict:
        return {"layers": [dict(r) for r in self.rows], **self.totals,
                "float_modules": [dict(e) for e in self.floats]}

    @property
    def pruned(self) -> bool:
        return any(r.get("mask_format") for r in self.rows)

    def _table(self):
        head = ["layer", "kind", "params", "W bits", "A bits", "bytes"]
        body = [[r["name"], r["kind"], f"{r['params']:,}", _w_bits(r),
                 "fp32" if r["a_bits"] is None else str(r["a_bits"]), _fmt_bytes(r["bytes"])]
                for r in self.rows]
        t = self.totals
        foot = ["total", "", f"{t['params']:,}", "", "", _fmt_bytes(t["bytes"])]
        if self.pruned:
            head += ["kept", "mask", "sparse bytes"]
            for row, r in zip(body, self.rows):
                row += [f"{1 - r['sparsity']:.2%}", r["mask_format"] or "-", _fmt_bytes(r["sparse_bytes"])]
            foot += [f"{1 - t['sparsity']:.2%}", "", _fmt_bytes(t["sparse_bytes"])]
        return head, body, foot

    def _pruned_line(self) -> list[str]:
        t = self.totals
        if not self.pruned:
            return []
        return [f"pruned: {t['weights'] - t['kept']:,} of {t['weights']:,} weights ({t['sparsity']:.2%}); "
                f"stored sparse (kept codes + masks): {_fmt_bytes(t['sparse_bytes'])} "
                f"(x{t['fp32_bytes'] / t['sparse_bytes']:.2f} smaller than FP32)"]

    def __str__(self) -> str:
        t = self.totals
        tail = (f"FP32 {_fmt_bytes(t['fp32_bytes'])} -> {_fmt_bytes(t['bytes'])}  "
                f"(x{t['compression']:.2f} smaller; other float params: {t['other_params']:,})")
        return "\n".join([*render_table(*self._table()), tail, *self._pruned_line(), *float_lines(self.floats)])

    def to_markdown(self) -> str:
        t = self.totals
        return (render_markdown(*self._table()) +
                f"\n\nFP32 {t['fp32_bytes']:,} B -> {t['bytes']:,} B (x{t['compression']:.2f}).\n"
                + "".join(f"\n{line}\n" for line in self._pruned_line())
                + "".join(f"\n- {line}" for line in float_lines(self.floats))
                + ("\n" if self.floats else ""))


def report(model: nn.Module) -> Report:
    costs = model_costs(model)
    rows = [r.as_dict() for r in costs["layers"]]
    totals = {"bytes": costs["bytes"], "fp32_bytes": costs["fp32_bytes"],
              "compression": costs["compression"], "other_params": costs["other_params"],
              "params": sum(r["params"] for r in rows) + costs["other_params"],
              **{k: costs[k] for k in ("sparse_bytes", "weights", "kept", "sparsity")}}
    return Report(rows, totals, float_modules(model))
