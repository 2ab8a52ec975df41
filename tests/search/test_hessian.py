"""Hutchinson per-layer traces: exact-Hessian agreement, negative traces, eval mode, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from slimtorch.errors import ConfigError, DataError, PatternError
from slimtorch.search.hessian import hutchinson_traces




def _mlp_data(seed=0, d_in=24, hidden=32, classes=20, n=512):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    x, y = torch.randn(n, d_in), torch.randint(0, classes, (n,))
    return model, x, y


def _exact_avg_trace(model, name, loss):
    """Tr(H)/n of ``loss(forward)`` w.r.t. one layer's weight, from the full autograd Hessian."""
    w0 = model.get_submodule(name).weight.detach()

    def f(w):
        return loss(lambda *a: functional_call(model, {f"{name}.weight": w}, a))
    h = torch.autograd.functional.hessian(f, w0)
    return h.reshape(w0.numel(), w0.numel()).diagonal().sum().item() / w0.numel()


def test_matches_exact_per_layer_trace_after_200_iterations():
    model, x, y = _mlp_data()
    ce = lambda f: F.cross_entropy(f(x), y)
    exact = {n: _exact_avg_trace(model, n, ce) for n in ("0", "2")}
    res = hutchinson_traces(model, [(x, y)], max_iter=200, tol=1e-12, seed=0, progress=False)
    assert res.iterations == 200 and not res.converged
    for n in exact:
        assert res.traces[n] == pytest.approx(exact[n], rel=0.05)
        assert res.totals[n] == pytest.approx(res.traces[n] * res.numel[n])
    # the same data split in two batches gives the same estimate (HVPs averaged by batch size)
    two = hutchinson_traces(model, [(x[:200], y[:200]), (x[200:], y[200:])], max_iter=200, tol=1e-12,
                            seed=0, progress=False)
    for n in exact:
        assert two.traces[n] == pytest.approx(res.traces[n], rel=1e-4)


@pytest.mark.parametrize("patience, least", [(1, 5), (2, 10)])     # 1: the default, PyHessian's rule
def test_negative_trace_relative_stop(patience, least):
    model, x, y = _mlp_data(seed=1, n=256)
    lam = 0.5

    def loss(f):
        out = f(x)
        return F.cross_entropy(out, y) - lam * out.pow(2).sum(1).mean()
    exact = _exact_avg_trace(model, "2", loss)
    assert exact < 0
    res = hutchinson_traces(model, lambda m: loss(m), max_iter=400, tol=1e-3, seed=0, patience=patience,
                            progress=False)
    # PyHessian's code (no |.| in the denominator) exits at iteration 2 on a negative trace
    assert res.converged and least < res.iterations < 400
    assert res.traces["2"] == pytest.approx(exact, rel=0.1)
    assert sum(res.totals.values()) < 0


def test_eval_mode_flags_restored_biases_excluded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].weight.requires_grad_(False)
    seen = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(m.training))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    a = hutchinson_traces(model, [(x, y)], max_iter=20, seed=3, progress=False)
    b = hutchinson_traces(model, [(x, y)], max_iter=20, seed=3, progress=False)
    assert seen and not any(seen)                      # dropout off while estimating
    assert model.training and all(m.training for m in model.modules())
    assert not model[1].weight.requires_grad and model[0].bias.requires_grad
    assert a.traces == b.traces                        # deterministic (eval mode, fixed seed)
    assert a.numel == {"0": 48, "4": 24}               # weights only


def test_frozen_layers_reported_not_dropped():
    model, x, y = _mlp_data(n=64)
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen|require"):
        res = hutchinson_traces(model, [(x, y)], max_iter=5, progress=False)
    assert res.frozen == ["0"] and list(res.traces) == ["2"]
    res = hutchinson_traces(model, [(x, y)], max_iter=5, frozen="trace", progress=False)
    assert set(res.traces) == {"0", "2"} and not model[0].weight.requires_grad
    with pytest.raises(ConfigError, match="frozen"):
        hutchinson_traces(model, [(x, y)], max_iter=5, frozen="error", progress=False)


def test_activation_trace_matches_exact_per_sample():
    model, x, y = _mlp_data(seed=2, d_in=16, hidden=32, classes=20, n=128)
    head = model[2]
    h = torch.relu(model[0](x)).detach()
    per = [torch.autograd.functional.hessian(lambda a: F.cross_entropy(head(a)[None], y[i:i + 1]), h[i])
           .diagonal().sum().item() for i in range(len(x))]
    exact = sum(per) / len(per) / h.shape[1]
    res = hutchinson_traces(model, [(x, y)], max_iter=1000, tol=1e-12, activations=True, seed=0,
                            progress=False)
    assert res.act_numel == {"0": 16, "2": 32}
    # unbiased: within 4 standard errors (cross-block terms make this estimate noisier)
    assert abs(res.act_traces["2"] - exact) < 4 * res.act_stderr["2"]
    assert res.act_traces["2"] == pytest.approx(exact, rel=0.1)


def test_unused_layer_gets_zero_trace_with_warning():
    mlp, x, y = _mlp_data(n=32)

    class WithPooler(nn.Module):   # like BertModel's pooler when only hidden states feed the loss
        def __init__(self):
            super().__init__()
            self.mlp, self.pooler = mlp, nn.Linear(3, 3)

        def forward(self, x):
            return self.mlp(x)
    with pytest.warns(UserWarning, match="not used"):
        res = hutchinson_traces(WithPooler(), [(x, y)], max_iter=5, progress=False)
    assert res.traces["pooler"] == 0.0 and res.traces["mlp.2"] != 0.0


def test_errors():
    model, x, y = _mlp_data(n=16)
    with pytest.raises(DataError, match="no batch"):
        hutchinson_traces(model, [], progress=False)
    with pytest.raises(PatternError):
        hutchinson_traces(model, [(x, y)], include="nothing*", progress=False)
    with pytest.raises(PatternError):
        hutchinson_traces(nn.Sequential(nn.ReLU()), [(x, y)], progress=False)
    with pytest.raises(ConfigError):
        hutchinson_traces(model, [(x, y)], max_iter=0, progress=False)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v).mean(1))


def test_sdpa_without_double_backward_says_eager():
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    try:
        res = hutchinson_traces(_Attn(), [(x, y)], max_iter=2, progress=False)
    except ConfigError as e:
        assert "eager" in str(e)
    else:  # a build whose SDPA kernel has a double backward: then it simply works
        assert set(res.traces) == {"qkv", "out"}


def test_relative_stderr_stop_reaches_the_requested_precision():
    model, x, y = _mlp_data(seed=2, n=256)
    ce = lambda m: F.cross_entropy(m(x), y)
    res = hutchinson_traces(model, ce, max_iter=2000, rel_stderr=0.02, seed=0, progress=False)
    assert res.converged and 10 <= res.iterations < 2000
    tot = sum(res.totals.values())
    # recompute the summed-trace standard error from the running means
    h = res.history
    xs = torch.tensor([h[0]] + [(k + 1) * h[k] - k * h[k - 1] for k in range(1, len(h))], dtype=torch.float64)
    assert xs.std().item() / len(xs) ** 0.5 <= 0.02 * abs(tot) * (1 + 1e-6)
    each = hutchinson_traces(model, ce, max_iter=3000, rel_stderr=0.05, stop_on="each", seed=0, progress=False)
    assert each.converged
    assert all(each.stderr[n] <= 0.05 * abs(each.traces[n]) * (1 + 1e-6) for n in each.traces)
    with pytest.raises(ConfigError, match="rel_stderr"):
        hutchinson_traces(model, ce, rel_stderr=1.5, progress=False)
