"""Cross-layer equalization (equalize_): exact FP32 outputs, DFQ's optimum ranges, refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.bn_fold import FoldedBatchNorm


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.1)
            m.weight.data.copy_(torch.rand(n, generator=g) * 5 + 0.05)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model.eval()


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _rows(w):
    return w.detach().abs().reshape(w.shape[0], -1).amax(1)


def _cols(w):
    return w.detach().abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1)


def ds_block():
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),       # expand
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # depthwise
        nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)))                                          # project


@pytest.mark.parametrize("fold_bn", [True, False])
def test_conv_bn_relu_conv_exact(fold_bn):
    torch.manual_seed(0)
    m = _randomise_bn(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3)))
    x = torch.randn(2, 3, 10, 10)
    ref = m(x)
    r = st.equalize_(m, x, fold_bn=fold_bn)
    assert r.pairs == [("0", "3")]
    assert _rel(m(x), ref) < 1e-5 and r.max_rel_error < 1e-5
    assert isinstance(m[1], FoldedBatchNorm) == fold_bn
    assert r.max_log2_scale > 0.5                       # something was actually rescaled


@pytest.mark.parametrize("fold_bn", [True, False])
def test_depthwise_separable_block_converges_to_equal_ranges(fold_bn):
    m, x = ds_block(), torch.randn(4, 8, 12, 12)
    ref = m(x)
    mt = copy.deepcopy(m).train()
    r = st.equalize_(m, x, fold_bn=fold_bn, iterations=500, tol=1e-9)
    assert r.pairs == [("0", "3"), ("3", "6")]
    assert "6" in r.skipped                             # the last layer's output is the model output
    assert 1 < r.iterations < 500
    assert _rel(m(x), ref) < 1e-5
    if not fold_bn:                                     # BN kept: the scales sit in its affine, exact in train mode too
        assert _rel(copy.deepcopy(m).train()(x), mt(x)) < 1e-5
        st.fold_batchnorm_(m, x)
    # DFQ's fixed point: expand's rows, depthwise filters and project's columns share one range per channel
    r_expand, r_dw, r_proj = _rows(m[0].weight), _rows(m[3].weight), _cols(m[6].weight)
    assert torch.allclose(r_expand, r_dw, rtol=1e-4) and torch.allclose(r_dw, r_proj, rtol=1e-4)


def test_linear_relu_linear_one_step_optimum():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-2, 2, 12)[:, None])    # badly balanced output channels
    x = torch.randn(7, 6)
    ref = m(x)
    r1, r2 = _rows(m[0].weight), _cols(m[2].weight)
    s = torch.sqrt(r1 * r2) / r2                                # eq. 10
    b1 = m[0].bias.detach().clone()
    r = st.equalize_(m, x)
    assert r.pairs == [("0", "2")] and r.iterations <= 2
    assert _rel(m(x), ref) < 1e-5
    assert torch.allclose(_rows(m[0].weight), r1 / s, rtol=1e-5)
    assert torch.allclose(_cols(m[2].weight), r2 * s, rtol=1e-5)
    assert torch.allclose(_rows(m[0].weight), torch.sqrt(r1 * r2), rtol=1e-5)
    assert torch.allclose(m[0].bias, b1 / s, rtol=1e-5)


def test_relu6_pair_skipped_unless_asked():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 5, 5) * 10
    w = [p.detach().clone() for p in m.parameters()]
    r = st.equalize_(m, x)
    assert r.pairs == [] and "ReLU6" in r.skipped["0"] and "relu6_to_relu" in r.skipped["0"]
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))
    r = st.equalize_(m, x, relu6_to_relu=True)
    assert r.pairs == [("0", "2")] and r.relu6_replaced == ["1"] and type(m[1]) is nn.ReLU
    assert r.relu6_change > 0                          # inputs * 10 saturate ReLU6: the FP32 model changed


def test_residual_branch_and_flatten_not_equalized():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            y = self.a(x)
            z = self.b(F.relu(y)) + y                  # a's output also feeds the residual add
            return self.fc(torch.flatten(F.relu(self.c(z)), 1))

    m, x = Res().eval(), torch.randn(2, 4, 4, 4)
    w = {k: v.clone() for k, v in m.state_dict().items()}
    r = st.equalize_(m, x)
    assert r.pairs == []
    assert "read by 2 ops" in r.skipped["a"]
    assert "add combines it" in r.skipped["b"]
    assert "flatten" in r.skipped["c"] and "model output" in r.skipped["fc"]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in w.items())


def test_third_party_conv_and_shared_activation():
    """Convs that subclass nn.Conv2d with their own (padding) forward and one activation module called
    twice, as in the efficientnet-lite package; weight tying leaves the pair alone."""
    class SamePad(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.d, self.p = SamePad(4, 16, 1), SamePad(16, 16, 3, groups=16), nn.Conv2d(16, 4, 1)
            self.act = nn.LeakyReLU(0.1)

        def forward(self, x):
            return self.p(self.act(self.d(self.act(self.e(x)))))

    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(2, 4, 6, 6)
    ref = m(x)
    r = st.equalize_(m, x)
    assert r.pairs == [("e", "d"), ("d", "p")]
    assert _rel(m(x), ref) < 1e-5
    shared = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    shared[2].weight = shared[0].weight                                   # tied weights
    r = st.equalize_(shared, torch.randn(3, 4))
    assert r.pairs == [] and "shared" in r.skipped["0"]


def test_pair_that_changes_the_output_is_undone():
    """A conv subclass whose forward is not linear in its input passes the dataflow test (its forward
    is a black box) but fails the output check: that pair is undone and reported, the other kept."""
    class Offset(nn.Conv2d):
        def forward(self, x):
            return super().forward(x + 1.0)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), Offset(8, 2, 1)).eval()
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-2, 2, 8)[:, None, None, None])
        m[2].weight.mul_(torch.logspace(2, -2, 8)[:, None, None, None])
    x = torch.randn(2, 3, 4, 4)
    ref = m(x)
    r = st.equalize_(m, x)
    assert r.pairs == [("0", "2")] and "changed the model output" in r.skipped["2"]
    assert _rel(m(x), ref) < 1e-5


def test_quantized_model_and_missing_input_raise():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="example_input"):
        st.equalize_(m)
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=8))
    with pytest.raises(ConfigError, match="before quantize_"):
        st.equalize_(m, torch.randn(2, 4))
