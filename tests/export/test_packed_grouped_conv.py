"""Depthwise and grouped convolutions (Conv2d and Conv1d, groups > 1): quantize, pack, load with
identical outputs; MACs count one group's fan-in."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cost import model_costs, trace_layers


def _net2d():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),   # depthwise
                         nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.ReLU(),                     # grouped
                         nn.Conv2d(16, 32, 3, groups=16, bias=False),                            # channel x2
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def _net1d():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(8, 8, 5, groups=8), nn.ReLU(),
                         nn.Conv1d(8, 12, 3, groups=2), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(12, 3))


CASES = [(_net2d, (2, 3, 10, 10)), (_net1d, (2, 4, 24))]


@pytest.mark.parametrize("factory,shape", CASES)
@pytest.mark.parametrize("weights", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 4])
def test_grouped_conv_round_trip(tmp_path, factory, shape, weights, bits):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    model = factory()
    st.quantize_(model, st.LSQPlus(w_bits=bits, a_bits=bits, weights=weights))
    st.calibrate(model, [x])
    model.eval()
    info = st.save_packed(model, tmp_path / "m.slim")
    for runtime in ("float", "fakequant"):
        loaded = st.load_packed(tmp_path / "m.slim", factory(), runtime=runtime)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), runtime
    assert info["theoretical_bytes"] == model_costs(model)["bytes"] == st.report(model).totals["bytes"]
    assert info["file_bytes"] <= 1.02 * info["theoretical_bytes"] + 4096


def test_grouped_conv_macs_count_one_group():
    shapes = trace_layers(_net2d(), torch.randn(1, 3, 10, 10))
    assert shapes["2"].macs == 8 * 10 * 10 * 9            # depthwise: 1 input channel per filter
    assert shapes["5"].macs == 16 * 10 * 10 * 2 * 9       # groups=4: 8/4 input channels per filter


def test_grouped_conv_onnx_export(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimtorch.export.onnx_export import ort_session
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    model = _net2d()
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=8))
    st.calibrate(model, [x])
    sess = ort_session(st.export_onnx(model.eval(), tmp_path / "m.onnx", x, exact=True))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)
