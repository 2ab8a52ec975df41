"""Product-quantized layers in the cost module (cost.py): indices at ceil(log2 K) bits per block,
centroids float32 or int8 + one scale, bias float32 (hand-computed bytes); centroids and codes are
compression state, not model parameters; the report shows "PQ K/d"."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch import cost as B


pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(32, 64), nn.Linear(64, 48, bias=False))


def _pq(int8=False):
    m = _net()
    st.pq_(m, st.PQ(n_centroids=16, n_iter=2, int8_centroids=int8), include=["0", "2"])
    with pytest.warns(UserWarning, match="using 384 centroids"):     # 3072 / 8 = 384 sub-vectors, 9-bit codes
        st.pq_(m, st.PQ(n_centroids=500, n_iter=1), include="3")
    return m


@pytest.mark.parametrize("int8", [False, True])
def test_hand_computed_bytes(int8):
    m = _pq(int8)
    rows = {r.name: r for r in B.layer_costs(m)}
    cents = (lambda k, d: k * d + 4) if int8 else (lambda k, d: 4 * k * d)
    # conv 3x3: 288 weights / 9 = 32 codes at 4 bits = 16 B; 16 x 9 centroids; 8 float32 biases
    assert rows["0"].bytes == 16 + cents(16, 9) + 4 * 8
    # linear 64x32: 256 codes at 4 bits = 128 B; 16 x 8 centroids; 64 biases
    assert rows["2"].bytes == 128 + cents(16, 8) + 4 * 64
    # linear 48x64 without bias: 384 codes at ceil(log2 384) = 9 bits = 432 B; 384 x 8 float32 centroids
    assert rows["3"].bytes == 432 + 4 * 384 * 8
    assert (rows["2"].centroids, rows["2"].block, rows["2"].w_bits) == (16, 8, 32)
    total = B.model_costs(m)
    assert total["bytes"] == sum(r.bytes for r in rows.values()) and total["other_params"] == 0
    assert total["fp32_bytes"] == 4 * sum(p.numel() for p in _net().parameters())
    assert total["buffer_bytes"] == 0                              # codes are the layers' own state
    assert B.weight_bytes(m) == total["bytes"]                     # the differentiable size agrees


def test_the_report_shows_the_codebook():
    text = str(st.report(_pq()))
    assert "PQ 16/9" in text and "PQ 16/8" in text and "PQ 384/8" in text


def test_codebook_bytes():
    assert B.codebook_bytes(4096, 256, 8) == (512, 8192)            # 1 bit per weight for the indices
    assert B.codebook_bytes(4096, 256, 8, int8_centroids=True) == (512, 2052)
    assert B.codebook_bytes(90, 2, 9) == (2, 72)                    # 10 codes at 1 bit
