"""What the budget counts is what the packed file stores (issue 11, item 3): for every Uhlich
parametrization the differentiable weight size of Eq. 8a (float32 bias and quantizer parameters,
the packed-file variant) equals, layer by layer, the bytes ``save_packed`` spends on that layer."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.export.file_report import file_report
from slimtorch import cost as B


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", ["U1", "U2", "U3", "P1", "P2", "P3"])
@pytest.mark.parametrize("extra", [{}, {"bit_set": (2, 4, 8), "tie_bits": True}])
def test_budget_bytes_equal_file_bytes_per_layer(p, extra, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16, bias=False),
                      nn.ReLU(), nn.Linear(16, 10))
    kind = "uniform" if p[0] == "U" else "pow2"
    st.quantize_(m, st.Uhlich(kind=kind, parametrization=p, w_bits=3, a_bits=4, a_init="float", **extra))
    st.calibrate(m, [(torch.randn(8, 1, 8, 8),)], num_batches=1)
    m(torch.randn(2, 1, 8, 8))
    budget = {n: int(B.layer_weight_bytes_tensor(mod).detach()) for n, mod in m.named_modules()
              if n in ("0", "3", "5")}
    rep = file_report(st.save_packed(m, tmp_path / "m.slim")["path"])
    rows = {r["name"]: r for r in rep.rows}
    for name, nbytes in budget.items():
        assert rows[name]["file_bytes"] == nbytes == rows[name]["theory_bytes"], (p, name)
        assert nbytes == B.layer_cost(name, m.get_submodule(name)).bytes
    assert sum(budget.values()) == B.weight_bytes(m)
    # the Uhlich quantizers store two floats each (d/qmax, b/d, b/qmax, qmin/qmax, b/qmin)
    assert B.layer_cost("3", m[3]).qparams == 4


@pytest.mark.parametrize("remaining", [0.03, 0.3])
def test_pruned_layers_file_bytes_equal_sparse_cost(remaining, tmp_path):
    """A pruned + quantized layer is stored as its mask (bitmap or index list, cost.mask_bytes) plus
    the kept codes: the file spends exactly LayerCost.sparse_bytes on it (stored_bytes)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    st.prune_(m, st.Magnitude(remaining=remaining))
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    st.calibrate(m, [(torch.randn(8, 64),)], num_batches=1)
    rep = file_report(st.save_packed(m, tmp_path / "m.slim")["path"])
    rows = {r["name"]: r for r in rep.rows}
    for name in ("0", "2"):
        c = B.layer_cost(name, m.get_submodule(name))
        assert c.mask_format == ("index" if remaining == 0.03 else "bitmap")
        assert B.stores_sparse(c) and rows[name]["file_bytes"] == rows[name]["theory_bytes"] == c.sparse_bytes
    assert rep.totals["theory_bytes"] == B.model_costs(m)["stored_bytes"]
