"""No silent float layer: modules slimtorch cannot quantize are named (report, quantize_ warning),
and calibrate names the layer whose forward a parent bypasses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.coverage import float_modules


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.norm, self.fc = nn.GRU(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)
        self.gain = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(self.norm(self.gru(x)[0])) * self.gain


class Functional(nn.Module):
    """Holds a Linear but uses its weight functionally."""

    def __init__(self):
        super().__init__()
        self.proj, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.linear(x, self.proj.weight, self.proj.bias))


def test_float_modules_name_what_and_why():
    entries = {e["name"]: e for e in float_modules(Recurrent())}
    assert set(entries) == {"(model)", "gru"}                 # norms are float by design
    assert entries["gru"]["params"] == ["bias_hh_l0", "bias_ih_l0", "weight_hh_l0", "weight_ih_l0"]
    assert "used functionally" in entries["gru"]["reason"]
    assert entries["(model)"]["params"] == ["gain"] and entries["(model)"]["numel"] == 2


def test_quantize_warns_and_report_lists_float_modules():
    model = Recurrent()
    with pytest.warns(UserWarning, match=r"stays float: gru \(GRU\)"):
        st.quantize_(model, st.LSQ())
    rep = st.report(model)
    assert "stays float: gru (GRU)" in str(rep) and "stays float: gru (GRU)" in rep.to_markdown()
    assert [e["name"] for e in rep.to_dict()["float_modules"]] == ["(model)", "gru"]


def test_no_warning_when_everything_is_quantized(recwarn):
    st.quantize_(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), st.LSQ())
    assert not [w for w in recwarn if "stays float" in str(w.message)]


def test_calibrate_names_the_bypassed_layer_and_its_parent():
    model = nn.Sequential(Functional())
    st.quantize_(model, st.LSQ())
    with pytest.raises(ConfigError, match=r"1 activation quantizer.*proj \(Linear inside Functional '0' "
                                          r"uses its weight functionally"):
        st.calibrate(model, [torch.randn(3, 4)])


def test_calibrate_on_an_empty_loader_says_so():
    model = nn.Sequential(nn.Linear(4, 2))
    st.quantize_(model, st.LSQ())
    with pytest.raises(ConfigError, match="did not run the model"):
        st.calibrate(model, [])


def test_calibrate_still_blames_torch_mha_if_left_unsplit(monkeypatch):
    """Without the split, torch's MHA calls out_proj.weight functionally: the message says so."""
    import slimtorch.quant.mha as mha
    monkeypatch.setattr(mha, "split_selected_", lambda *a: [])
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 1,
                                  enable_nested_tensor=False)
    st.quantize_(model, st.LSQ())
    with pytest.raises(ConfigError, match=r"out_proj \(NonDynamicallyQuantizableLinear inside "
                                          r"MultiheadAttention 'layers.0.self_attn' uses its weight"):
        st.calibrate(model, [torch.randn(5, 2, 8)])
