"""LSQ+'s offset folds into the bias with identical outputs (LSQ+ Sec. 3.2)."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.fold import folded_bias


@pytest.mark.parametrize("model_input", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 5), lambda: nn.Conv2d(3, 4, 3),
                                  lambda: nn.Conv1d(3, 4, 3), lambda: nn.Conv2d(4, 6, 3, groups=2)])
def test_offset_fold_is_exact(make, model_input):
    torch.manual_seed(0)
    layer = make()
    model = nn.Sequential(layer)
    st.quantize_(model, st.LSQPlus(w_bits=4, a_bits=3, model_input=model_input))
    shape = {nn.Linear: (7, 12), nn.Conv2d: (2, layer.in_channels if hasattr(layer, "in_channels") else 3, 9, 9),
             nn.Conv1d: (2, 3, 11)}[type(layer).__mro__[1]]
    x = torch.randn(shape, dtype=torch.float64) - 0.5
    model.double()
    st.calibrate(model, [(x,)])
    aq = layer.input_quantizer
    assert aq.offset.abs().min() > 1e-3 and (aq.offset.numel() > 1) == (model_input == "per_channel"
                                                                and not isinstance(layer, nn.Linear))
    ref = model(x)
    p = aq.quant_params()
    x_free = aq.to_int(x) * p["scale"]  # offset-free input s * x_bar
    w = layer.weight.detach()
    bias = folded_bias(layer)
    if isinstance(layer, nn.Linear):
        out = nn.functional.linear(x_free, w, bias)
    elif isinstance(layer, nn.Conv2d):
        out = nn.functional.conv2d(x_free, w, bias, groups=layer.groups)
    else:
        out = nn.functional.conv1d(x_free, w, bias)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)


def test_padded_conv_refuses_to_fold():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    st.quantize_(model, st.LSQPlus())
    st.calibrate(model, [(torch.randn(2, 1, 5, 5),)])
    with pytest.raises(ConfigError, match="padding"):
        folded_bias(model[0])
