"""Measured LUT-vs-dense choice (runtime/pq_select.py): a valid mode, cached per shape."""
import pytest
import torch

from slimtorch.runtime import pq_select
from slimtorch.runtime.pq_select import cached_choices, clear_cache, pick_kernel, time_kernels

pytestmark = pytest.mark.usefixtures("one_thread")


def test_time_kernels_times_both():
    t = time_kernels(16, 32, 4, 8, batch=2, repeats=2)
    assert set(t) == {"lut", "dense"} and all(v > 0 for v in t.values())


def test_pick_kernel_returns_a_valid_mode_and_caches_it(monkeypatch):
    clear_cache()
    assert pick_kernel(16, 32, 4, 8, batch=3) in ("lut", "dense")
    key = (16, 32, 4, 8, 3, "torch.float32", torch.get_num_threads())
    assert key in cached_choices()
    monkeypatch.setattr(pq_select, "time_kernels", lambda *a, **k: pytest.fail("re-timed a cached shape"))
    assert pick_kernel(16, 32, 4, 8, batch=3) == cached_choices()[key]


@pytest.mark.parametrize("lut, dense, want", [(1.0, 2.0, "lut"), (0.95, 1.0, "dense"), (2.0, 1.0, "dense")])
def test_lut_must_win_by_the_margin(monkeypatch, lut, dense, want):
    clear_cache()
    monkeypatch.setattr(pq_select, "time_kernels", lambda *a, **k: {"lut": lut, "dense": dense})
    assert pick_kernel(8, 8, 4, 4) == want
    clear_cache()
