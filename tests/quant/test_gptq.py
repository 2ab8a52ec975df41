"""GPTQ rounding (quant/gptq.py) against its equations on tiny problems."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.api import weight_quantizer
from slimtorch.quant.gptq import gptq_
from slimtorch.quant.gptq_solver import columns, gptq_round


def _quant(step, q_n=-2, q_p=1):
    return lambda w: torch.clamp(torch.round(w / step), q_n, q_p) * step


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(groups=4, padding=2, dilation=2)])
def test_conv_columns_are_im2col(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **kw)
    x = torch.randn(2, 8, 9, 9)
    cols = columns(conv, x)                                   # (groups, d, N)
    g = conv.groups
    unf = F.unfold(x, 3, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)   # (B, C*9, L)
    d = 8 // g * 9
    want = unf.view(2, g, d, -1).permute(1, 2, 0, 3).reshape(g, d, -1)
    assert torch.allclose(cols, want, atol=1e-6)


def test_linear_and_conv1d_columns():
    lin, x = nn.Linear(5, 3), torch.randn(4, 7, 5)
    assert torch.equal(columns(lin, x), x.reshape(-1, 5).t()[None])
    c1, x1 = nn.Conv1d(4, 6, 3, padding=1, groups=2), torch.randn(2, 4, 10)
    y = columns(c1, x1)
    w = c1.weight.detach().view(2, 3, -1)                     # per group: (rows, d)
    out = torch.einsum("grd,gdn->grn", w, y)                  # W X per group = conv without bias
    ref = F.conv1d(x1, c1.weight, None, padding=1, groups=2)
    assert torch.allclose(out.reshape(6, 2, 10).permute(1, 0, 2), ref, atol=1e-5)


def test_identity_hessian_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    q = gptq_round(w, torch.eye(7, dtype=torch.float64), _quant(0.5), damp=0.0)
    assert torch.equal(q, _quant(0.5)(w))


def test_one_column_after_another_by_hand():
    """d = 2, no reordering: q_1 = Q(w_1); w_2 <- w_2 - (w_1 - q_1) H^-1_12 / H^-1_11 (OBQ Eq. 3)."""
    w = torch.tensor([[0.3, 0.9]], dtype=torch.float64)
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    quant = _quant(1.0, -4, 3)
    q = gptq_round(w, h, quant, damp=0.0, act_order=False)
    hinv = torch.linalg.inv(h)
    w2 = 0.9 - (0.3 - 0.0) * hinv[0, 1] / hinv[0, 0]
    assert q.tolist() == [[0.0, float(torch.round(w2))]]


def test_beats_nearest_and_is_exact_when_brute_force_agrees():
    torch.manual_seed(1)
    x = torch.randn(4, 200, dtype=torch.float64)
    x[1] += 0.9 * x[0]                                        # correlated inputs: nearest is not optimal
    h = x @ x.t()
    quant = _quant(0.25)
    err = lambda q, w: float(((w - q) @ x).pow(2).sum())
    for _ in range(20):
        w = torch.rand(1, 4, dtype=torch.float64) * 0.7 - 0.45
        q = gptq_round(w, h, quant, damp=0.0)
        assert err(q, w) <= err(quant(w), w) + 1e-9
        grid = [k * 0.25 for k in range(-2, 2)]
        best = min(err(torch.tensor([c], dtype=torch.float64), w) for c in itertools.product(grid, repeat=4))
        assert err(q, w) <= 1.5 * best + 1e-9                 # greedy, but close to the exhaustive optimum


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 36, 10))


@pytest.mark.parametrize("asymmetric", [True, False])
def test_gptq_on_a_model_keeps_the_grid_and_lowers_the_error(asymmetric):
    data = [torch.randn(16, 3, 6, 6) for _ in range(4)]
    ref = _net().eval()
    want = torch.cat([ref(x) for x in data]).detach()
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=None))
    st.calibrate(m, data, bias_correction=False, rounding="nearest")
    with torch.no_grad():
        before = (torch.cat([m(x) for x in data]) - want).pow(2).mean()
    res = gptq_(m, data, asymmetric=asymmetric)
    assert set(res.layers) == {"0", "2", "4", "6"} and not res.skipped
    for n, (a, b) in res.layers.items():
        assert b <= a                                         # never worse than nearest on the data
    for layer in (m[0], m[2], m[4], m[6]):
        wq = weight_quantizer(layer)
        raw = layer.parametrizations.weight.original
        assert torch.allclose(wq(raw), raw, atol=1e-6)        # the stored weight is on the grid
    with torch.no_grad():
        after = (torch.cat([m(x) for x in data]) - want).pow(2).mean()
    assert after < before


def test_gptq_needs_calibration_and_valid_damping():
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    data = [torch.randn(4, 3, 6, 6)]
    with pytest.raises(ConfigError, match="not calibrated"):
        gptq_(m, data)
    st.calibrate(m, data)
    with pytest.raises(ConfigError, match="damp"):
        gptq_(m, data, damp=-1.0)
    with pytest.raises(ConfigError, match="list or loader"):
        gptq_(m, lambda model: model(data[0]))


def test_calibrate_rounds_by_gptq_at_4_bits_by_default_and_not_at_8():
    data = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    for bits, rounded in ((4, True), (8, False)):
        m = _net()
        before = m[4].weight.detach().clone()
        st.quantize_(m, st.LSQPlus(w_bits=bits, a_bits=8))
        st.calibrate(m, data)
        raw = m[4].parametrizations.weight.original
        on_grid = torch.allclose(weight_quantizer(m[4])(raw), raw, atol=1e-6)
        assert on_grid == rounded and torch.equal(raw, before) != rounded


def test_calibrate_rounding_choices_and_callable_loop():
    data = [torch.randn(8, 3, 6, 6)]
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    with pytest.raises(ConfigError, match="rounding"):
        st.calibrate(m, data, rounding="stochastic")
    with pytest.raises(ConfigError, match="list or loader"):
        st.calibrate(m, lambda model: model(data[0]), rounding="gptq")
    raw = m[4].parametrizations.weight.original.detach().clone()
    st.calibrate(m, lambda model: model(data[0]))            # auto with a callable: nearest
    assert torch.equal(m[4].parametrizations.weight.original, raw)


def test_lazy_block_updates_equal_column_by_column():
    torch.manual_seed(2)
    x = torch.randn(3, 40, 300, dtype=torch.float64)
    h = x @ x.transpose(1, 2)
    w = torch.randn(3, 6, 40, dtype=torch.float64)
    quant = _quant(0.3, -8, 7)
    qs = [gptq_round(w, h, quant, damp=0.01, block=b) for b in (1, 7, 64)]
    assert torch.allclose(qs[0], qs[1]) and torch.allclose(qs[0], qs[2])


def test_stages_split_the_order_evenly_and_handle_nothing_to_round():
    from slimtorch.quant.gptq import _stages
    assert _stages([], 8) == [] and _stages([], None) == []
    assert _stages(list("abcde"), None) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert [len(s) for s in _stages(list("abcdefg"), 3)] == [2, 3, 2]
    assert _stages(list("ab"), 8) == [["a"], ["b"]]


def test_transformer_encoder_layer_rounds_every_projection():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True).eval()
    m = nn.Sequential(layer, nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 6, 16) for _ in range(3)]
    with torch.no_grad():
        want = torch.cat([m(x) for x in data])
    st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=8))
    st.calibrate(m, data, rounding="nearest")
    with torch.no_grad():
        near = (torch.cat([m(x) for x in data]) - want).pow(2).mean()
    res = gptq_(m, data)
    linears = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert set(res.layers) == linears and not res.skipped        # q/k/v/out projections, FFN, head
    with torch.no_grad():
        after = (torch.cat([m(x) for x in data]) - want).pow(2).mean()
    assert after < near


def test_batches_of_one_sample_still_cross_validate():
    from slimtorch.quant.gptq_solver import _Moments
    lin = nn.Linear(6, 3)
    xs = [torch.randn(1, 6) for _ in range(8)]
    mom = _Moments(lin, xs, None)
    assert mom.n == [4, 4] and not mom.single                   # samples alternate across batches
    one = _Moments(lin, xs[:1], None)
    assert one.single and torch.equal(one.total()[0], one.h[0])  # one sample: counted once
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    data = [torch.randn(1, 3, 6, 6) for _ in range(6)]
    st.calibrate(m, data, rounding="nearest")
    res = gptq_(m, data)
    assert set(res.layers) == {"0", "2", "4", "6"}
    for before, after in res.layers.values():
        assert 0 <= after <= before                            # relative errors, counted once


def test_dict_batches_and_no_bias_added_without_bias_correction():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)

        def forward(self, batch):
            return self.b(torch.relu(self.a(batch["x"])))

    torch.manual_seed(0)
    m = Net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    st.calibrate(m, [{"x": torch.randn(8, 8)} for _ in range(3)], bias_correction=False)
    assert m.a.bias is None and m.b.bias is None
    raw = m.a.parametrizations.weight.original
    assert torch.allclose(weight_quantizer(m.a)(raw), raw, atol=1e-6)    # rounded by GPTQ all the same


def test_a_failure_part_way_leaves_the_model_as_it_was():
    data = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    st.calibrate(m, data, rounding="nearest")                   # bias-corrected
    before = {k: v.clone() for k, v in m.state_dict().items()}
    corr = m[0]._slim_bias_correction.clone()

    def stop(name, _errors):
        if name == "2":
            raise RuntimeError("stopped")
    with pytest.raises(RuntimeError, match="stopped"):
        gptq_(m, data, progress=stop)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(m[0]._slim_bias_correction, corr)


def test_keyword_batches_reach_a_forward_with_named_inputs():
    """A tokenizer-style dict batch whose keys are forward's parameters is passed as keywords (as a
    Hugging Face model takes it), through calibrate's observation, GPTQ and bias correction alike."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x, mask):
            return self.b(torch.relu(self.a(x * mask[..., None])))

    torch.manual_seed(0)
    m = Masked()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    batches = [{"x": torch.randn(8, 5, 8), "mask": (torch.rand(8, 5) > 0.3).float()} for _ in range(3)]
    st.calibrate(m, batches)
    raw = m.a.parametrizations.weight.original
    assert torch.allclose(weight_quantizer(m.a)(raw), raw, atol=1e-6)         # rounded by GPTQ
    assert m.a.input_quantizer.initialized and m.b.input_quantizer.initialized
