"""benchmarks/pq_speed.py plumbing on tiny inputs: a missing fairseq environment is reported as an
error string (the RESULTS section records it), the latency table has one row per shape and batch."""
import pytest
import torch

from benchmarks import pq_speed
from benchmarks.export_speed import Lat
from slimtorch.pq.kmeans import kmeans

pytestmark = pytest.mark.usefixtures("one_thread")


def test_missing_fairseq_python_is_an_error_not_a_crash(tmp_path):
    jobs = {"m": {"blocks": torch.randn(16, 2), "init": torch.randn(4, 2), "n_iter": 1}}
    res, err = pq_speed.fairseq(jobs, str(tmp_path / "no-such-python"))
    assert res is None and "no-such-python" in err


def test_latency_table_rows(monkeypatch):
    def once(fns, *_):
        outs = {n: f() for n, f in fns.items()}
        torch.testing.assert_close(outs["lut"], outs["fp32"], rtol=1e-4, atol=1e-4)
        return {n: Lat(1.0, 1.0) for n in fns}

    monkeypatch.setattr(pq_speed, "interleaved", once)
    torch.manual_seed(0)
    res = kmeans(torch.randn(32, 4), 4, 2)
    w, b = res.centroids[res.codes.long()].reshape(8, 16), torch.randn(8)     # an exactly PQ weight
    table = pq_speed.part_latency({"8x16": (w, b)}, {"8x16": (res.centroids, res.codes.long())}, batches=(1, 3))
    assert table.count("| 8x16 |") == 2 and ("| lut |" in table or "| dense |" in table)
