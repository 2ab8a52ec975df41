"""HAWQ-V2 allocation: exact frontier vs brute force, budgets counted as budget.py counts them,
plans consumed by quantize_, config registration, errors, plot and CLI."""
import copy
import itertools
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch import LSQ, LSQPlus, quantize_
from slimtorch.config import config_from_dict, config_to_dict
from slimtorch.errors import ConfigError, PatternError
from slimtorch.quant.api import weight_quantizer
from slimtorch.cost import bitops, layer_costs, model_costs, trace_layers
from slimtorch.search.hawq import (HAWQConfig, best_under, hawq_plan, hawq_search, monotone_allocate,
                                   pareto_front, weight_perturbation)
from slimtorch.search.hessian import hutchinson_traces

pytestmark = pytest.mark.filterwarnings("ignore:negative average Hessian trace")




def _brute(costs, omegas, limit):
    best = None
    for ch in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[i][k] for i, k in enumerate(ch))
        o = sum(omegas[i][k] for i, k in enumerate(ch))
        if c <= limit and (best is None or o < best[1] - 1e-12):
            best = (c, o)
    return best


def _instance(rng):
    layers, k = rng.randint(1, 6), rng.randint(2, 4)
    numel = [rng.choice([1, 3, 64, 75, 128, 1000, rng.randint(1, 5000)]) for _ in range(layers)]
    bits = sorted(rng.sample(range(2, 9), k))
    costs = [[n * b + rng.randint(0, 3) for b in bits] for n in numel]     # bytes-like, with offsets
    omegas = [[rng.random() * 10 ** rng.uniform(-3, 1) / b for b in bits] for _ in numel]
    if rng.random() < 0.3:  # some non-monotone / tied entries
        omegas[0] = [0.5] * k
    return costs, omegas


def test_exact_frontier_equals_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        costs, omegas = _instance(rng)
        front = pareto_front(costs, omegas)
        assert front.exact and np.all(np.diff(front.costs) > 0) and np.all(np.diff(front.omegas) < 0)
        lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
        for limit in [lo - 1, lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)]:
            want, i = _brute(costs, omegas, limit), best_under(front, limit)
            if want is None:
                assert i is None
                continue
            ch = front.choices[i]
            assert sum(costs[j][k] for j, k in enumerate(ch)) == front.costs[i] <= limit
            assert sum(omegas[j][k] for j, k in enumerate(ch)) == pytest.approx(front.omegas[i])
            assert front.omegas[i] == pytest.approx(want[1], rel=1e-9, abs=1e-15)
            mono = monotone_allocate(list(range(len(costs))), costs, omegas, limit)
            assert mono is None or mono[2] >= want[1] - 1e-12


def test_thinned_frontier_warns_and_stays_feasible():
    rng = random.Random(1)
    numel = [rng.randint(100, 10 ** 5) for _ in range(12)]
    costs = [[n * b for b in (2, 4, 8)] for n in numel]
    omegas = [[rng.random() * n * 4.0 ** -b for b in (2, 4, 8)] for n in numel]
    with pytest.warns(UserWarning, match="thinned"):
        front = pareto_front(costs, omegas, max_points=100)
    assert not front.exact and len(front.costs) <= 100
    for i in range(len(front.costs)):
        assert sum(costs[j][k] for j, k in enumerate(front.choices[i])) == front.costs[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 8, 3, bias=False)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 24), nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _net_data():
    torch.manual_seed(0)
    return Net(), [(torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))) for _ in range(2)]


@pytest.fixture(scope="module")
def net_traces():
    torch.set_num_threads(1)
    model, data = _net_data()
    return model, data, hutchinson_traces(model, data, max_iter=30, seed=0, activations=True,
                                          progress=False)


@pytest.mark.parametrize("budget,target,quant", [
    ("avg_bits", 3.0, LSQPlus()), ("avg_bits", 2.5, LSQ(a_bits=None, weights="per_channel")),
    ("bytes", 4000, LSQPlus()), ("bytes", 3000, LSQ(weights="per_channel")),
    ("bitops", 2.0e6, LSQPlus()), ("bitops", 1.0e6, LSQ(a_bits=None))])
def test_budget_met_exactly_as_budget_module_counts(net_traces, budget, target, quant):
    model, data, traces = net_traces
    before = copy.deepcopy(model.state_dict())
    res = hawq_search(model, data, HAWQConfig(budget=budget, target=target), quant=quant, traces=traces,
                      progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # pure
    q = quantize_(copy.deepcopy(model), quant, plan=res.plan)
    rows = {r.name: r for r in layer_costs(q)}
    if budget == "bytes":
        counted = model_costs(q)["bytes"]
    elif budget == "avg_bits":
        counted = sum(r.weight_numel * r.w_bits for r in rows.values())
        target = target * sum(r.weight_numel for r in rows.values())
    else:
        counted = bitops(trace_layers(model, data[0][0]), {n: (r.w_bits, r.a_bits) for n, r in rows.items()})
    assert counted == res.cost <= target
    # maximality: the next frontier point (less Omega) would break the budget
    nxt = [v for v, _ in res.frontier if v > res.value]
    assert not nxt or min(nxt) > res.target
    assert res.omega_total == pytest.approx(min(o for v, o in res.frontier if v <= res.value))
    for n, (w, a) in res.choice.items():
        assert weight_quantizer(q.get_submodule(n)).bits == w


def test_omega_definition_and_activation_allocation(net_traces):
    model, data, traces = net_traces
    res = hawq_search(model, data, HAWQConfig(budget="avg_bits", target=4, negative="keep"), traces=traces,
                      progress=False)
    w = model.fc1.weight
    k = res.options["fc1"].index((2, None))
    assert res.omega["fc1"][k] == pytest.approx(traces.traces["fc1"] * weight_perturbation(w, 2))
    assert weight_perturbation(w, 8) < weight_perturbation(w, 4) < weight_perturbation(w, 2)
    tied = hawq_search(model, data, HAWQConfig(budget="bitops", target=3e6, tie_bits=True,
                                               act_sensitivity=True), traces=traces, progress=False)
    assert all(p["w_bits"] == p["a_bits"] for p in tied.plan.values())
    both = hawq_search(model, data, HAWQConfig(budget="bitops", target=3e6, a_bits=(4, 8)),
                       traces=traces, progress=False)
    assert all(set(p) == {"w_bits", "a_bits"} and p["a_bits"] in (4, 8) for p in both.plan.values())
    assert both.monotone is None
    quantize_(copy.deepcopy(model), LSQPlus(), plan=both.plan)


def test_end_to_end_plan_feeds_quantize_and_monotone_option():
    model, data = _net_data()
    plan = hawq_plan(model, data, HAWQConfig(target=3.0, max_iter=10), progress=False)
    assert set(plan) == {"conv1", "conv2", "fc1", "fc2"}
    q = quantize_(copy.deepcopy(model), LSQPlus(), plan=plan)
    assert q(data[0][0]).shape == (16, 5)
    res = hawq_search(model, data, HAWQConfig(target=3.0, max_iter=10, search="monotone"), progress=False)
    assert res.omega_total == pytest.approx(res.monotone["omega"])


def test_frozen_layer_kept_at_max_bits_and_counted():
    model, data = _net_data()
    model.fc2.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="require"):
        res = hawq_search(model, data, HAWQConfig(budget="bytes", target=3500, max_iter=5), progress=False)
    assert res.traces.frozen == ["fc2"] and res.plan["fc2"] == {"w_bits": 8}
    assert model_costs(quantize_(copy.deepcopy(model), LSQPlus(), plan=res.plan))["bytes"] == res.cost


def test_config_registered_validated_and_errors(net_traces, tmp_path):
    model, data, traces = net_traces
    cfg = config_from_dict({"method": "hawq", "bits": [8, 2, 4], "budget": "bytes", "target": 5000})
    assert cfg.bits == (2, 4, 8) and config_from_dict(config_to_dict(cfg)) == cfg
    for bad in ({"bits": [1]}, {"bits": []}, {"budget": "flops"}, {"target": -1}, {"search": "x"},
                {"a_bits": [4], "tie_bits": True}, {"patience": 0}, {"rel_stderr": 2.0}):
        with pytest.raises(ConfigError):
            HAWQConfig(**bad)
    res = hawq_search(model, data, HAWQConfig(target=3.0, max_iter=30, rel_stderr=0.99), progress=False)
    assert res.traces.converged and res.traces.iterations == 10     # the precision stop (>= 10 probes) is used
    with pytest.raises(ConfigError, match="feasible range"):
        hawq_search(model, data, HAWQConfig(budget="avg_bits", target=1.9), traces=traces, progress=False)
    with pytest.raises(ConfigError, match="feasible range"):
        hawq_search(model, data, HAWQConfig(budget="bytes", target=100), traces=traces, progress=False)
    with pytest.raises(PatternError):
        hawq_search(nn.Sequential(nn.ReLU()), data, progress=False)
    with pytest.raises(PatternError):
        hawq_search(model, data, HAWQConfig(include=("nope*",)), progress=False)
    with pytest.raises(ConfigError, match="float model"):
        hawq_search(quantize_(copy.deepcopy(model), LSQPlus()), data, traces=traces, progress=False)
    with pytest.raises(ConfigError, match="tie"):
        hawq_search(model, data, traces=traces, quant=LSQ(tie_bits=True), progress=False)


def test_pareto_plot_and_cli(net_traces, tmp_path, capsys):
    from slimtorch.cli import main
    from slimtorch.search.pareto_plot import plot_frontier
    model, data, traces = net_traces
    res = hawq_search(model, data, HAWQConfig(target=3.0), traces=traces, progress=False)
    png = plot_frontier(res, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["hawq", "--model", "digits_mlp", "--dataset", "digits", "--target", "3", "--max-iter", "5",
               "--batches", "1", "--batch-size", "32", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    out = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert set(out["plan"]) == {"fc1", "fc2", "fc3"} and (tmp_path / "o" / "frontier.png").exists()
    assert "fc1" in capsys.readouterr().out
