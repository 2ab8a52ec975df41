"""Tests for slimtorch.models: the zoo, import-path models, parameter counts, shapes, a quick training run."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch.models as sm
from slimtorch.errors import ConfigError
from slimtorch.models import zoo as zoo_mod

ZOO = ["digits_cnn", "digits_mlp", "lenet5", "mnist1d_cnn", "mnist_cnn", "resnet20"]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_zoo_names():
    assert sm.list_models() == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_forward_shapes_of_every_zoo_model(name):
    spec = sm.model_spec(name)
    model = sm.build_model(name).eval()
    assert model(torch.randn(3, *spec.input_shape)).shape == (3, 10)
    shape = (2,) + spec.input_shape[1:]  # two input channels, seven classes
    other = sm.build_model(name, num_classes=7, in_channels=2).eval()
    assert other(torch.randn(4, *shape)).shape == (4, 7)


def test_mnist_cnn_parameter_count():
    m = sm.build_model("mnist_cnn")
    assert _params(m) == 225_034 == 320 + 18_496 + 204_928 + 1_290
    assert [_params(layer) for layer in (m.conv1, m.conv2, m.fc1, m.fc2)] == [320, 18_496, 204_928, 1_290]
    assert m.fc1.in_features == 1600


def test_other_parameter_counts():
    assert _params(sm.build_model("mnist1d_cnn")) == 5_210  # 150 + 1900 + 1900 + 1260, as the reference
    assert _params(sm.build_model("digits_cnn")) == 38_282
    assert _params(sm.build_model("lenet5")) == 61_706
    assert _params(sm.build_model("resnet20")) == 269_722  # option A (zero-pad shortcuts)
    assert _params(sm.build_model("resnet20", shortcut="B")) == 272_474


def test_resnet20_structure():
    m = sm.build_model("resnet20", num_classes=100, in_channels=1)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 19
    assert [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[0].conv1.out_channels] == \
        [16, 32, 64]
    assert m.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    with pytest.raises(ConfigError, match="shortcut"):
        sm.build_model("resnet20", shortcut="C")


def test_input_size_options():
    assert sm.build_model("lenet5", input_size=32)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert sm.build_model("mnist_cnn", in_channels=3, input_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m1d = sm.build_model("mnist1d_cnn")
    x = torch.randn(5, 40)
    assert torch.equal(m1d(x), m1d(x.unsqueeze(1)))  # (batch, length) accepted like the reference
    with pytest.raises(ConfigError, match="too small"):
        sm.build_model("mnist_cnn", input_size=6)


def test_same_seed_same_weights():
    torch.manual_seed(0)
    a = sm.build_model("digits_cnn")
    torch.manual_seed(0)
    b = sm.build_model("digits_cnn")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_model_and_bad_options():
    with pytest.raises(ConfigError) as e:
        sm.build_model("resnet1000")
    assert "resnet1000" in str(e.value) and all(n in str(e.value) for n in ZOO)
    with pytest.raises(ConfigError, match="'num_clases'"):
        sm.build_model("mnist_cnn", num_clases=10)


def test_import_paths():
    assert isinstance(sm.build_model("torch.nn:Identity"), nn.Identity)
    lin = sm.build_model("torch.nn:Linear", in_features=4, out_features=2)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (2, 4)
    small = sm.build_model("slimtorch.models.resnet:CifarResNet", blocks=1)  # a class works as a factory
    assert sum(isinstance(mod, nn.Conv2d) for mod in small.modules()) == 7
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        sm.build_model("no_such_module_xyz:factory")
    with pytest.raises(ConfigError, match="torch.nn.*NoSuchLayer"):
        sm.build_model("torch.nn:NoSuchLayer")
    with pytest.raises(ConfigError, match="package.module:factory"):
        sm.build_model("torch.nn:")
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        sm.build_model("builtins:dict")
    with pytest.raises(ConfigError, match="'bogus'"):
        sm.build_model("slimtorch.models.cnn:MnistCNN", bogus=1)


def test_user_module_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_slimtorch.py").write_text(textwrap.dedent("""
        from torch import nn

        class Factories:
            @staticmethod
            def mlp(width=3, num_classes=2):
                return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = sm.build_model("user_models_for_slimtorch:Factories.mlp", width=5)
    assert m(torch.randn(2, 4)).shape == (2, 2) and m[0].out_features == 5


def test_register_model(monkeypatch):
    monkeypatch.setattr(zoo_mod, "_ZOO", dict(zoo_mod._ZOO))

    @sm.register_model("Tiny", input_shape=(4,))
    def tiny(num_classes=3):
        """A tiny linear model."""
        return nn.Linear(4, num_classes)

    spec = sm.model_spec("tiny")
    assert spec.input_shape == (4,) and spec.description == "A tiny linear model."
    assert sm.build_model("TINY", num_classes=5).out_features == 5
    with pytest.raises(ConfigError, match="already registered"):
        sm.register_model("tiny")(lambda: nn.Identity())


def test_digits_cnn_trains_above_95_percent():
    from slimtorch.data import load_dataset, make_loaders

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast and robust to a busy machine
    try:
        torch.manual_seed(0)
        bundle = load_dataset("digits", seed=0)
        train, test = make_loaders(bundle, batch_size=32, seed=0)
        model = sm.build_model("digits_cnn")
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for epoch in range(5):  # ~0.7 s
            model.train()
            for x, y in train.batches(epoch):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    finally:
        torch.set_num_threads(threads)
    assert correct / len(bundle.test) > 0.95
