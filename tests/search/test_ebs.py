"""EBS verbs (search/ebs.py, ebs_search.py): expected cost equals the exact expectation over plans as
the cost module counts them, strengths all receive gradients, the search meets its target, the plan
feeds quantize_, bad input fails early."""
import copy
import itertools

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cost import bitops, layer_costs, model_costs, trace_layers
from slimtorch.errors import ConfigError, PatternError
from slimtorch.search.ebs import EBSConfig, ebs_, ebs_state


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _data(n=128, bs=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _plan_cost(net, plan, budget, x, quant):
    """The cost of ``plan`` counted on the quantized model: bytes of the packed file's accounting, or
    MACs x the bits its attached quantizers report."""
    q = st.quantize_(copy.deepcopy(net), quant, plan=plan)
    if budget == "bytes":
        return model_costs(q)["bytes"]
    rows = {r.name: r for r in layer_costs(q)}
    return bitops(trace_layers(q, x), {n: (r.w_bits, r.a_bits) for n, r in rows.items()})


@pytest.mark.parametrize("budget,tie", [("bitops", False), ("bytes", False), ("bitops", True)])
def test_expected_cost_equals_hand_computed_expectation(budget, tie):
    net, x = _net(), _data()[0][0]
    quant = st.LSQPlus()
    cfg = EBSConfig(bits=(2, 4), a_bits=(2, 4), tie_bits=tie, budget=budget, target_uniform=4)
    m = copy.deepcopy(net)
    s = ebs_(m, cfg, quant, example_input=x)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for wm, am in s.mixers.values():
            wm.strength.copy_(torch.randn(2, generator=g))
            if am is not None and am.strength is not wm.strength:
                am.strength.copy_(torch.randn(2, generator=g))
    layer_opts = []
    for n in s.names:
        wm, am = s.mixers[n]
        pw = dict(zip((2, 4), wm.probs(torch.float64).tolist()))
        pa = dict(zip((2, 4), am.probs(torch.float64).tolist()))
        opts = [((b, b), pw[b]) for b in (2, 4)] if tie else \
            [((w, a), pw[w] * pa[a]) for w in (2, 4) for a in (2, 4)]
        layer_opts.append(opts)
    want = 0.0
    for combo in itertools.product(*layer_opts):
        plan = {n: {"w_bits": w, "a_bits": a} for n, ((w, a), _) in zip(s.names, combo)}
        prob = 1.0
        for _, p in combo:
            prob *= p
        want += prob * _plan_cost(net, plan, budget, x, quant)
    assert float(s.expected_cost().detach()) == pytest.approx(want, rel=1e-9)
    # the penalty verb adds the hinge complexity loss
    ratio = want / s.target_value
    assert float(st.penalty(m).detach()) == pytest.approx(max(0.0, ratio - 1.0), rel=1e-5, abs=1e-7)


def test_every_strength_receives_gradient_and_search_meets_target():
    net, data = _net(), _data()
    x = data[0][0]
    m = copy.deepcopy(net)
    s = ebs_(m, EBSConfig(target_uniform=3), st.LSQPlus(), example_input=x)
    st.calibrate(m, data, bias_correction=False)
    loss = nn.functional.cross_entropy(m(x), data[0][1]) + st.penalty(m)
    loss.backward()
    for wm, am in s.mixers.values():
        for mix in (wm, am):
            assert mix.strength.grad is not None and (mix.strength.grad != 0).all()
    st.remove_ebs_(m)
    assert not hasattr(m, "_slimtorch_ebs") and list(st.quantized_layers(m)) == []

    r = st.ebs_search(net, data, EBSConfig(steps=40, warmup=5, target_uniform=3), progress=False)
    assert r.cost <= r.limit
    measured = _plan_cost(net, r.plan, "bitops", x, st.LSQPlus())
    assert measured == r.cost
    assert r.value <= r.target
    # fit="both" spent the budget: no layer can move to a costlier option without exceeding it
    macs = {n: s.macs for n, s in trace_layers(net, x).items()}
    for n, (w, a) in r.choice.items():
        for w2 in (2, 4, 8):
            for a2 in (2, 4, 8):
                extra = macs[n] * (w2 * a2 - w * a)
                assert extra <= 0 or r.cost + extra > r.limit
    q = st.quantize_(copy.deepcopy(net), st.LSQPlus(), plan=r.plan)
    st.calibrate(q, data)
    assert q(x).shape == (32, 10)
    assert [n for n, *_ in st.quantized_layers(q)] == ["0", "3"]   # first and last searched too
    assert r.history and r.history[-1]["step"] == 39
    assert set(r.history[0]["probs"]) == {"0", "3"} and len(r.history[0]["probs"]["0"]["w"]) == 3
    for p, p0 in zip(net.parameters(), _net().parameters()):
        assert torch.equal(p, p0)                                   # the float model is untouched


def test_tied_bits_first_last_float_and_weight_only():
    net, data = _net(), _data()
    r = st.ebs_search(net, data, EBSConfig(tie_bits=True, steps=10, warmup=2, target_uniform=4),
                      progress=False)
    assert all(p["w_bits"] == p["a_bits"] for p in r.plan.values())
    big = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 10))
    r = st.ebs_search(big, data, EBSConfig(first_last="float", steps=5, warmup=1), progress=False)
    assert list(r.plan) == ["2"] and r.float_layers == ["0", "5"]
    r = st.ebs_search(net, data, EBSConfig(a_bits=None, budget="bytes", steps=5, warmup=1, target_uniform=4),
                      quant=st.LSQ(a_bits=8), progress=False)
    assert all(p["a_bits"] == 8 for p in r.plan.values())
    assert r.cost == model_costs(st.quantize_(copy.deepcopy(net), st.LSQ(a_bits=8), plan=r.plan))["bytes"]


def test_bad_input_fails_early_with_clear_errors():
    net, x = _net(), _data()[0][0]
    with pytest.raises(ConfigError, match="non-empty list"):
        EBSConfig(bits=())
    with pytest.raises(ConfigError, match="out of range"):
        EBSConfig(bits=(2, 9))
    with pytest.raises(ConfigError, match="multiplier"):
        EBSConfig(multiplier=0)
    with pytest.raises(ConfigError, match="multiplier"):
        EBSConfig(multiplier=-1.0)
    with pytest.raises(ConfigError, match="warmup"):
        EBSConfig(steps=10, warmup=10)
    with pytest.raises(ConfigError, match="budget"):
        EBSConfig(budget="flops")
    with pytest.raises(ConfigError, match=r"infeasible.*feasible range is \["):
        ebs_(copy.deepcopy(net), EBSConfig(target=10.0), example_input=x)
    with pytest.raises(ConfigError, match="example_input"):
        ebs_(copy.deepcopy(net), EBSConfig())
    with pytest.raises(ConfigError, match="LSQ"):
        ebs_(copy.deepcopy(net), EBSConfig(), quant=st.Uhlich(), example_input=x)
    with pytest.raises(PatternError, match="matches no layer"):
        ebs_(copy.deepcopy(net), EBSConfig(include="nope*"), example_input=x)
    q = st.quantize_(copy.deepcopy(net), st.LSQ())
    with pytest.raises(ConfigError, match="before quantize_"):
        ebs_(q, EBSConfig(), example_input=x)
    m = copy.deepcopy(net)
    ebs_(m, EBSConfig(), example_input=x)
    with pytest.raises(ConfigError, match="already attached"):
        ebs_(m, EBSConfig(), example_input=x)
    with pytest.raises(ConfigError, match="no EBS search"):
        ebs_state(net)
    with pytest.raises(Exception, match="no batch"):
        st.ebs_search(net, [], EBSConfig(steps=2, warmup=0), progress=False)
    with pytest.raises(Exception, match="ran out"):
        st.ebs_search(net, iter(_data()), EBSConfig(steps=50, warmup=0, calib_batches=1), progress=False)
    assert EBSConfig.__name__ and st.config_from_dict({"method": "ebs", "bits": [2, 4]}).bits == (2, 4)


def test_temperature_anneal_schedule_and_setter():
    from slimtorch.search.ebs import set_temperature, temperature_at
    cfg = EBSConfig(steps=12, warmup=1, temperature=1.0, temperature_final=0.01)
    assert temperature_at(cfg, 0) == temperature_at(cfg, 1) == 1.0
    assert temperature_at(cfg, 6) == pytest.approx(0.1)
    assert temperature_at(cfg, 11) == pytest.approx(0.01)
    assert temperature_at(EBSConfig(temperature_final=None), 200) == 1.0
    assert temperature_at(EBSConfig(), 299) == pytest.approx(0.1)
    net, x = _net(), _data()[0][0]
    m = copy.deepcopy(net)
    s = ebs_(m, EBSConfig(), example_input=x)
    wm, _ = s.mixers["0"]
    with torch.no_grad():
        wm.strength.copy_(torch.tensor([0.0, 0.1, 0.2]))
    set_temperature(m, 0.01)
    assert float(wm.probs()[2]) > 0.99
    with pytest.raises(ConfigError, match="temperature"):
        set_temperature(m, 0)
    with pytest.raises(ConfigError, match="temperature_final"):
        EBSConfig(temperature_final=-1.0)


def test_mixed_precision_autocast_and_half_inputs_work():
    """bf16 activations with fp32 steps (autocast): forward and backward run, the mixture is summed in
    fp32 and returned in the input's dtype."""
    net, x = _net(), _data()[0][0]
    m = copy.deepcopy(net)
    ebs_(m, EBSConfig(), example_input=x)
    st.calibrate(m, [x], bias_correction=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        loss = out.float().logsumexp(-1).mean() + st.penalty(m)
    loss.backward()
    s = ebs_state(m)
    assert all(mix.strength.grad is not None for pair in s.mixers.values() for mix in pair)
    from slimtorch.search.ebs_mix import BitMixer
    from slimtorch.quant.quantizer import LSQQuantizer
    mix = BitMixer((2, 4), lambda b: LSQQuantizer(b, "activation", signed=None, init="minmax"), "activation")
    xb = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    y = mix(xb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad is not None and mix.strength.grad is not None


def test_bytes_budget_counts_excluded_and_float_first_last_layers_as_float():
    """The plan's exact bytes (what quantize_ with the same include/exclude gives) equal result.cost."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 16, generator=g)
    data = [(xs[i:i + 16], (xs[i:i + 16, 0] > 0).long()) for i in range(0, 64, 16)]
    for kw, exclude in ((dict(exclude="4"), "4"), (dict(first_last="float"), ["0", "4"])):
        r = st.ebs_search(big, data, EBSConfig(budget="bytes", target_uniform=4, steps=4, warmup=1, **kw),
                          progress=False)
        q = st.quantize_(copy.deepcopy(big), st.LSQPlus(), exclude=exclude, plan=r.plan)
        assert model_costs(q)["bytes"] == r.cost <= r.limit


def test_target_just_below_the_minimum_and_tied_quant_config_are_refused():
    net, x = _net(), _data()[0][0]
    with pytest.raises(ConfigError, match="feasible range"):
        ebs_(copy.deepcopy(net), EBSConfig(budget="avg_bits", target=2 - 1e-13, target_uniform=None), example_input=x)
    with pytest.raises(ConfigError, match="ties W/A bits"):
        ebs_(copy.deepcopy(net), EBSConfig(), quant=st.LSQPlus(tie_bits=True), example_input=x)
    assert EBSConfig(bits=(2, 4), tie_bits=True).a_bits == (2, 4)
    m = copy.deepcopy(net)
    ebs_(m, EBSConfig(), example_input=x)
    with pytest.raises(ConfigError, match="fit="):
        st.ebs_select(m, fit="nonee")
