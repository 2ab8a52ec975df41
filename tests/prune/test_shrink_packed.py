"""A shrunk model (heads / FFN neurons removed by ``shrink_``) saved with ``save_packed`` loads into a
freshly built, unshrunk model of its architecture: the file records the kept groups and
``load_packed`` replays the shrink (export/packed_structure.py) before loading the weights."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.export.packed import read_packed
from slimtorch.prune.shrink import shrink_record, shrink_to_
from test_shrink import _tiny_bert as _bert      # tests/prune is on sys.path (pytest's prepend import mode)


def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                 enable_nested_tensor=False).eval()


def _prune_shrink(model, heads=0.5, neurons=0.25, **kw):
    st.prune_(model, st.Magnitude(remaining=heads, structure="heads"), **kw)
    st.prune_(model, st.Magnitude(remaining=neurons, structure="neurons"), **kw)
    return st.shrink_(model)


@pytest.mark.parametrize("quantized", [False, True])
def test_shrunk_hf_bert_loads_into_a_fresh_model(tmp_path, quantized):
    model, ids = _bert(), torch.randint(0, 50, (2, 9))
    _prune_shrink(model, include="encoder.*")
    if quantized:
        st.quantize_(model, st.LSQPlus(w_bits=8, a_bits=8), exclude=["*embeddings*"])
        st.calibrate(model, lambda m: [m(torch.randint(0, 50, (4, 9))) for _ in range(2)])
    with torch.no_grad():
        want = model(ids).last_hidden_state
    st.save_packed(model, tmp_path / "m.slim")
    meta, _, _ = read_packed(tmp_path / "m.slim")
    assert [r[:3] for r in meta["shrunk"]] == [["encoder.layer.0", "neurons", 64], ["encoder.layer.0.attention",
                                                "heads", 4], ["encoder.layer.1", "neurons", 64],
                                               ["encoder.layer.1.attention", "heads", 4]]
    fresh = st.load_packed(tmp_path / "m.slim", _bert)
    assert fresh.encoder.layer[0].attention.self.num_attention_heads == 2
    assert fresh.encoder.layer[1].intermediate.dense.out_features == 16
    with torch.no_grad():
        got = fresh(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if not quantized else 1e-5)


def test_shrunk_torch_encoder_loads_and_a_second_shrink_composes(tmp_path):
    model, x = _encoder(), torch.randn(2, 5, 16)
    _prune_shrink(model)
    _prune_shrink(model, heads=0.5, neurons=0.5)              # 4 -> 2 -> 1 heads, 32 -> 8 -> 4 neurons
    rec = {(o, k): (n, keep) for o, k, n, keep in shrink_record(model)}
    assert rec[("layers.0.self_attn", "heads")][0] == 4 and len(rec[("layers.0.self_attn", "heads")][1]) == 1
    assert rec[("layers.1", "neurons")][0] == 32 and len(rec[("layers.1", "neurons")][1]) == 4
    with torch.no_grad():
        want = model(x)
    st.save_packed(model, tmp_path / "m.slim")
    fresh = st.load_packed(tmp_path / "m.slim", _encoder)
    assert fresh.layers[0].self_attn.num_heads == 1 and fresh.layers[1].linear1.out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=1e-6)
    assert shrink_record(fresh) == shrink_record(model)
    shrink_to_(fresh, shrink_record(model))                    # replaying on a model shrunk alike: a no-op


def test_a_record_that_does_not_fit_is_refused(tmp_path):
    model = _encoder()
    _prune_shrink(model)
    st.save_packed(model, tmp_path / "m.slim")
    with pytest.raises(CheckpointError, match=r"shrunk heads of 'layers.0.self_attn': recorded from 4 groups, "
                                              r"the model has 8"):
        st.load_packed(tmp_path / "m.slim", lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 8, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False))
    with pytest.raises(ConfigError, match=r"no such attention / FFN block"):
        shrink_to_(nn.Sequential(nn.Linear(4, 4)), [["enc", "heads", 4, [0]]])
    with pytest.raises(ConfigError, match=r"not distinct indices < 4"):
        shrink_to_(_encoder(), [["layers.0.self_attn", "heads", 4, [0, 0]]])
