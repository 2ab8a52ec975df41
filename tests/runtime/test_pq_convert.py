"""load_packed puts product-quantized Linear layers on the PQ runtime (runtime/pq_convert.py):
outputs equal the fake-quant model's (dense: bit-identical; LUT: float rounding), Conv/Embedding
keep the rebuilt dense weight, the kernel can be forced, bad choices are refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.attach import input_quantizer, set_input_quantizer
from slimtorch.errors import ConfigError
from slimtorch.runtime.pq_convert import convert_pq
from slimtorch.runtime.pq_lut import PQLinear

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8, bias=False)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.emb(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.fc2(F.relu(self.fc1(h)))                 # 3-D inputs (batch, seq, features)
        return self.out(h.mean(1))


def _net():
    torch.manual_seed(0)
    return Net()


X = torch.randint(0, 30, (6, 5))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    m = st.pq_(_net(), st.PQ(n_centroids=8, n_iter=4, block_sizes={"linear": 4, "conv": 3})).eval()
    path = tmp_path_factory.mktemp("pq") / "m.slim"
    st.save_packed(m, path)
    with torch.no_grad():
        return path, m(X)


@pytest.mark.parametrize("kernel", ["lut", "dense", "auto", "off"])
def test_load_packed_outputs_equal_the_fake_quant_model(packed, kernel):
    path, ref = packed
    m = st.load_packed(path, _net(), pq_kernel=kernel)
    linears = [m.fc1, m.fc2, m.out]
    if kernel == "off":
        assert all(type(t) is nn.Linear for t in linears)
    else:
        assert all(isinstance(t, PQLinear) for t in linears)
        assert all(t.kernel == kernel for t in linears) if kernel != "auto" else \
            all(t.kernel in ("lut", "dense") for t in linears)
    assert type(m.conv) is nn.Conv1d and type(m.emb) is nn.Embedding     # dense rebuild
    with torch.no_grad():
        y = m(X)
    if kernel == "dense":
        assert torch.equal(y, ref)
    # "off": the rebuilt nn.Linear holds the same weight values, but its matmul may take another BLAS
    # path than the parametrized fake-quant forward on some CPUs: equal to float rounding
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_int8_runtime_also_converts_and_fakequant_keeps_codebooks(packed):
    path, ref = packed
    m = st.load_packed(path, _net(), runtime="int8", pq_kernel="lut")
    assert isinstance(m.fc1, PQLinear)
    torch.testing.assert_close(m(X), ref, rtol=1e-5, atol=1e-5)
    fq = st.load_packed(path, _net(), runtime="fakequant", pq_kernel="lut")
    assert not isinstance(fq.fc1, PQLinear) and st.pq.codebook_of(fq.fc1) is not None


@pytest.mark.parametrize("bad", [{"pq_kernel": "fast"}, {"pq_batch": 0}])
def test_bad_kernel_choices_are_refused(packed, bad):
    with pytest.raises(ConfigError, match="pq_kernel='fast'|pq_batch=0"):
        st.load_packed(packed[0], _net(), **bad)


class Halve(nn.Module):
    def forward(self, x):
        return x / 2


def test_an_input_quantizer_moves_with_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    c, codes = torch.randn(4, 4), torch.randint(0, 4, (12,))
    with torch.no_grad():
        lin.weight.copy_(c[codes].reshape(6, 8))
    set_input_quantizer(lin, Halve())
    model = nn.Sequential(lin)
    x = torch.randn(3, 8)
    ref = model(x)
    assert convert_pq(model, {"0": (c, codes)}, "lut") == {"0": "lut"}
    assert isinstance(model[0], PQLinear) and isinstance(input_quantizer(model[0]), Halve)
    torch.testing.assert_close(model(x), ref)
