"""LSQ/LSQ+ quantizers: initialisers match their formulas, grad scale, calibration, errors."""
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError, PatternError
from slimtorch.quant import LSQQuantizer, fake_quant, qrange
from slimtorch.quant.init import mse_init


def test_lsq_init_formula():
    w = torch.randn(64, 9)
    q = LSQQuantizer(4, "weight", init="lsq")
    q(w)
    assert q.scale.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7), rel=1e-6)


def test_three_sigma_init_formula_per_channel():
    w = torch.randn(8, 3, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1) + 0.1
    q = LSQQuantizer(3, "weight", init="3sigma", scale_shape=(8, 1, 1, 1))
    q(w)
    v = w.reshape(8, -1)
    mu, sd = v.mean(1), v.std(1, unbiased=False)
    want = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** 2
    assert torch.allclose(q.scale.flatten(), want, rtol=1e-5)


def test_mse_init_minimises_error():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(20000)) * 2 - 0.3  # asymmetric, like a Swish output
    s, b, err = mse_init(x, 0, 15, True)
    for ds in (0.9, 1.1):
        for db in (-0.05, 0.05):
            alt = (fake_quant(x, s * ds, 0, 15, b + db) - x).pow(2).mean()
            assert err <= alt + 1e-7
    lo, hi = x.min(), x.max()
    naive = (fake_quant(x, (hi - lo) / 15, 0, 15, lo) - x).pow(2).mean()
    assert err <= naive


def test_mse_init_per_channel_minimises_each_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 5, 5) * torch.tensor([0.1, 1, 3, 0.5, 2, 10]).reshape(6, 1, 1, 1)
    s, b, err = mse_init(w, -2, 1, False, scale_shape=(6, 1, 1, 1))
    assert s.shape == err.shape == (6, 1, 1, 1) and b is None
    rows = w.reshape(6, -1)
    for c in range(6):
        own, _, own_err = mse_init(rows[c], -2, 1, False)              # the channel on its own
        assert err[c].item() <= own_err.item() * 1.02
        for ds in (0.9, 1.1):
            alt = (fake_quant(rows[c], s[c, 0, 0] * ds, -2, 1) - rows[c]).pow(2).mean()
            assert err[c].item() <= alt.item() + 1e-7
        minmax = (fake_quant(rows[c], rows[c].abs().max(), -2, 1) - rows[c]).pow(2).mean()
        assert err[c].item() < 0.8 * minmax.item()                    # 2 bits: clipping pays


def test_per_channel_mse_weight_quantizer_uses_mse_not_minmax():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    q = LSQQuantizer(2, "weight", init="mse", scale_shape=(8, 1))
    q.initialize(lin.weight)
    err = (q(lin.weight) - lin.weight).pow(2).mean(1)
    mm = (fake_quant(lin.weight, lin.weight.abs().amax(1, keepdim=True), -2, 1) - lin.weight).pow(2).mean(1)
    assert (err < mm).all()


def test_grad_scale_weights_and_activations():
    w = torch.randn(10, 20)
    q = LSQQuantizer(4, "weight")
    q(w)
    q.scale.grad = None
    q(w).sum().backward()
    g_scaled = q.scale.grad.clone()
    q2 = LSQQuantizer(4, "weight", use_grad_scale=False)
    q2.load_state_dict(q.state_dict())
    q2(w).sum().backward()
    assert g_scaled.item() == pytest.approx(q2.scale.grad.item() / math.sqrt(200 * 7), rel=1e-5)
    # activations: N = features of one sample, so g does not depend on the batch size
    a = LSQQuantizer(4, "activation", signed=True)
    x = torch.randn(6, 5)
    a(x)
    a(x).sum().backward()
    a3 = LSQQuantizer(4, "activation", signed=True, use_grad_scale=False)
    a3.load_state_dict(a.state_dict())
    a3(x).sum().backward()
    assert a.scale.grad.item() == pytest.approx(a3.scale.grad.item() / math.sqrt(5 * 7), rel=1e-5)


def test_auto_signed_activation_and_state_roundtrip():
    a = LSQQuantizer(4, "activation", signed=None)
    a(torch.rand(4, 10))
    assert a.signed is False and a.q_n == 0 and a.q_p == 15
    b = LSQQuantizer(4, "activation", signed=None)
    b.load_state_dict(a.state_dict())
    assert b.signed is False and b.initialized and b.scale.item() == a.scale.item()


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_quantize_all_layers_and_report():
    m = _net()
    st.quantize_(m, st.LSQPlus(w_bits=3, a_bits=4, weights="per_tensor"))   # one weight scale a layer
    rows = st.report(m).rows
    assert [(r["name"], r["w_bits"], r["a_bits"]) for r in rows] == [("0", 3, 4), ("3", 3, 4)]
    assert rows[0]["kind"] == "Conv2d"
    assert rows[1]["bytes"] == math.ceil(1440 * 3 / 8) + 4 * 10 + 4 * (1 + 2)
    assert st.report(m).totals["fp32_bytes"] == 4 * sum(p.numel() for p in _net().parameters())


def test_quantize_errors():
    with pytest.raises(PatternError, match="nomatch"):
        st.quantize_(_net(), st.LSQ(), include="nomatch*")
    with pytest.raises(PatternError, match="typo"):
        st.quantize_(_net(), st.LSQ(), exclude="typo")
    with pytest.raises(PatternError, match="no quantizable layer"):
        st.quantize_(nn.Sequential(nn.ReLU()), st.LSQ())
    for bad in (1, 9, 0, 4.0):
        with pytest.raises(ConfigError, match="w_bits"):
            st.LSQ(w_bits=bad)
    with pytest.raises(ConfigError, match="a_bits"):
        st.LSQPlus(a_bits=12)
    m = _net()
    st.quantize_(m, st.LSQ())
    with pytest.raises(ConfigError, match="already quantized"):
        st.quantize_(m, st.LSQ())
    with pytest.raises(PatternError, match="plan"):
        st.quantize_(_net(), st.LSQ(), plan={"nope": 4})


def test_plan_and_tied_bits():
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=2, a_bits=4, tie_bits=True), plan={"3": {"w_bits": 8}})
    rows = {r["name"]: (r["w_bits"], r["a_bits"]) for r in st.report(m).rows}
    assert rows == {"0": (4, 4), "3": (8, 8)}


def test_include_exclude_embedding():
    m = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8, weights="per_channel"), exclude="2")
    r = {x["name"]: x for x in st.report(m).rows}
    assert r["0"]["w_bits"] == 4 and r["0"]["a_bits"] is None and r["2"]["w_bits"] == 32
    out = m(torch.randint(0, 50, (3, 5)))
    assert out.shape == (3, 5, 2)


def test_calibrate_initialises_from_all_batches_and_restores_mode():
    torch.manual_seed(0)
    m = _net()
    st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=4))
    m.train()
    batches = [(torch.randn(8, 1, 8, 8),) for _ in range(3)]
    assert st.calibrate(m, batches) == 2
    assert m.training
    aq = m[0].input_quantizer
    assert aq.initialized and aq.offset.item() < 0  # negative inputs: offset absorbs them
    with pytest.raises(ConfigError, match="no data"):
        m2 = _net()
        st.quantize_(m2, st.LSQPlus())
        st.calibrate(m2, [])


def test_quantized_training_step_reduces_loss():
    torch.manual_seed(0)
    m = _net()
    st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=4))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    st.calibrate(m, [(x,)])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for n, p in m.named_parameters() if "scale" in n or "offset" in n)


def test_encode_decode_bit_exact_and_rebuild():
    from slimtorch.quant.quantizer import build_quantizer
    torch.manual_seed(0)
    for q, x in [(LSQQuantizer(3, "weight", scale_shape=(6, 1)), torch.randn(6, 10)),
                 (LSQQuantizer(5, "activation", learn_offset=True, init="mse"), torch.randn(4, 30))]:
        y = q(x)
        codes = q.encode(x)
        assert codes.min() >= 0 and codes.max() < 2 ** q.bits
        assert torch.equal(q.decode(codes), y)
        q2 = build_quantizer(q.spec())
        q2.load_state_dict(q.state_dict())
        assert torch.equal(q2(x), y)


def test_signed_one_bit_is_refused():
    with pytest.raises(ConfigError, match="at least 2 bits"):
        LSQQuantizer(1, "weight", signed=True)
    q = LSQQuantizer(1, "weight", signed=False)
    w = torch.rand(4, 4)
    assert q(w).unique().numel() <= 2
