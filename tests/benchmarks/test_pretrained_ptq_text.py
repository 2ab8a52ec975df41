"""benchmarks/pretrained_ptq_text.py on a toy model: a method's row, a failing peer's row, the table."""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import pretrained_ptq_text as T  # noqa: E402


def _task():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(32, 4)
    task = T.Task("toy", "setup", m, T.chunks((x[:16],), 8), T.chunks((x[16:],), 8), ("x",),
                  labels=torch.randint(0, 3, (16,)))
    task.ref = T.outputs(task, lambda b: m(*b))
    return task


def test_rows_failures_and_partial_table():
    task = _task()
    r = T.run_method(task, T.ours(False), 8, 1)
    assert r["agree"] >= 87.5 and r["cosine"] > 0.99 and r["calib_s"] >= 0

    def broken(*args, **kw):
        raise RuntimeError("no | such\n   thing")
    bad = T.run_method(task, broken, 8, 1)
    assert bad == "failed: RuntimeError: no / such thing"
    task.rows = {"ours": {8: r}, "peer": {8: bad}}
    text = T.body([task], total=4, notes="notes")
    assert "PARTIAL run: 2 of 4 cells measured" in text and "| FP32 |" in text
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 5 and len({line.count("|") for line in rows}) == 1     # header, rule, FP32, 2 rows
