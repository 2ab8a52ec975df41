"""BatchNorm folding (quant/bn_fold.py): exact before quantization, pairs found by one forward pass,
BNs that cannot fold are left and named with the reason."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.bn_fold import FoldedBatchNorm

from bn_helpers import randomise_bn, rel  # noqa: E402


class Residual(nn.Module):
    """conv -> BN -> ReLU, depthwise conv without bias -> BN, a residual add, then a BN on the sum
    (must not fold), pooled -> Linear -> BN1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.post_add = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = self.post_add(y + self.dw_bn(self.dw(y)))
        return self.fc_bn(self.fc(y.mean((2, 3))))


MODELS = {
    "conv2d-bn-relu": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                             nn.Conv2d(6, 4, 3, stride=2), nn.BatchNorm2d(4)), (4, 3, 10, 10)),
    "conv1d-bn1d": (lambda: nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.BatchNorm1d(5), nn.ReLU(),
                                          nn.Conv1d(5, 3, 5), nn.BatchNorm1d(3, affine=False)), (4, 2, 16)),
    "grouped-depthwise": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                                                nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8)),
                          (4, 4, 9, 9)),
    "linear-bn1d": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 7, bias=False), nn.BatchNorm1d(7), nn.ReLU(),
                                          nn.Linear(7, 3)), (5, 3, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_is_exact(name):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = randomise_bn(factory()).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    result = st.fold_batchnorm_(model, x)
    assert len(result.folded) == n_bn and not result.skipped
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        assert rel(model(x), want) <= 1e-6
    assert result.max_rel_error <= 1e-6


def test_residual_bn_is_left_and_named():
    torch.manual_seed(0)
    model = randomise_bn(Residual()).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="post_add"):
        result = st.fold_batchnorm_(model, x)
    assert result.folded == [("conv", "bn"), ("dw", "dw_bn"), ("fc", "fc_bn")]
    assert list(result.skipped) == ["post_add"]
    assert "not the direct output" in result.skipped["post_add"]
    assert isinstance(model.post_add, nn.BatchNorm2d) and isinstance(model.bn, FoldedBatchNorm)
    assert model.dw.bias is not None                   # a bias-free conv gains the folded bias
    with torch.no_grad():
        assert rel(model(x), want) <= 1e-6


class SharedOutput(nn.Module):
    """The conv output is read by the BN and by a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_output_read_twice_is_not_folded():
    model = randomise_bn(SharedOutput()).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
    result = st.fold_batchnorm_(model, x, warn=False)
    assert not result.folded and "also read by" in result.skipped["bn"]
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_training_mode_restored_and_quantized_refused():
    model = MODELS["conv2d-bn-relu"][0]().train()
    st.fold_batchnorm_(model, torch.randn(2, 3, 10, 10))
    assert model.training and all(m.training for m in model.modules())
    model = MODELS["conv2d-bn-relu"][0]()
    st.quantize_(model, st.LSQ())
    with pytest.raises(ConfigError, match="before quantize_"):
        st.fold_batchnorm_(model, torch.randn(2, 3, 10, 10))


def test_folded_model_packs_and_loads(tmp_path):
    torch.manual_seed(0)
    factory, shape = MODELS["grouped-depthwise"]
    model = randomise_bn(factory())
    x = torch.randn(shape)
    st.fold_batchnorm_(model, x)
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=4))
    st.calibrate(model, [x])
    model.eval()
    st.save_packed(model, tmp_path / "m.slim")
    loaded = st.load_packed(tmp_path / "m.slim", factory())   # a fresh model with its BNs
    assert isinstance(loaded[1], FoldedBatchNorm) and loaded[3].bias is not None
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
