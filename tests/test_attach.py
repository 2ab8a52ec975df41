"""attach.py: removing the last weight transform (or adding a bias transform) on a deep copy of a
parametrized module leaves the original working (torch keeps the property on a shared class)."""
import copy

import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import add_bias_transform, raw_weight


class _Twice(nn.Module):
    def forward(self, x):
        return 2 * x


def test_removing_noise_from_a_deep_copy_keeps_the_original():
    torch.manual_seed(0)
    net = st.quant_noise_(nn.Sequential(nn.Linear(16, 8)), st.QuantNoise(p=0.5))
    copied = copy.deepcopy(net)
    st.remove_quant_noise_(copied)
    assert not hasattr(copied[0], "parametrizations") and type(copied[0]) is nn.Linear
    net.eval()
    assert torch.equal(net[0].weight, raw_weight(net[0]))             # the original still has its weight

    other = copy.deepcopy(net)
    add_bias_transform(other[0], _Twice())
    assert torch.equal(other[0].bias, 2 * net[0].bias)
    assert isinstance(net[0].bias, nn.Parameter)                       # the original's bias is untouched
    net(torch.randn(2, 16))
