"""The same verbs on every available device (CPU always; CUDA when present): nothing assumes CPU."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.quant import fake_quant

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fake_quant_same_on_device(device):
    torch.manual_seed(0)
    x = torch.randn(8, 16) * 3
    s = torch.tensor([0.2]); b = torch.tensor([0.1])
    outs, grads = [], []
    for dev in ("cpu", device):
        xx = x.detach().to(dev).clone().requires_grad_(True)
        ss, bb = (t.detach().to(dev).clone().requires_grad_(True) for t in (s, b))
        y = fake_quant(xx, ss, 0, 15, bb, 0.5)
        y.sum().backward()
        outs.append(y.detach().cpu())
        grads.append([t.grad.cpu() for t in (xx, ss, bb)])
    assert torch.equal(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_calibrate_train_on_device(device):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).to(device)
    st.quantize_(m, st.LSQPlus(w_bits=3, a_bits=4, weights="per_channel"))
    x, y = torch.randn(16, 2, 8, device=device), torch.randint(0, 3, (16,), device=device)
    st.calibrate(m, [(x,)])
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    assert all(p.device.type == device for p in m.parameters())
    assert st.report(m).totals["bytes"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_integer_offset_int32_bias_shared_inputs_on_device(device):
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], -1)))
    m = Two().to(device)
    st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=8, integer_offset=True, bias="int32"))
    x, y = torch.randn(32, 6, device=device), torch.randint(0, 3, (32,), device=device)
    assert st.share_input_quantizers(m, lambda mm: mm(x)) == [["a", "b"]]
    st.calibrate(m, [(x,)])
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    s = m.a.input_quantizer.quant_params()["scale"] * m.a.parametrizations.weight[0].quant_params()["scale"]
    k = m.a.bias / s
    assert k.device.type == device and (k - k.round()).abs().max() < 1e-3      # bias on the int32 grid


@pytest.mark.parametrize("device", DEVICES)
def test_onnx_export_of_a_model_on_device(device, tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    from slimtorch.export.onnx_export import export_onnx, ort_session
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).to(device)
    st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=8, integer_offset=True, bias="int32"))
    x = torch.randn(16, 2, 8, device=device)
    st.calibrate(m, [(x,)])
    with torch.no_grad():
        want = m.eval()(x).cpu().numpy()
    for kernels in ("qdq", "ort"):
        path = export_onnx(m, tmp_path / f"{kernels}.onnx", (x[:2],), input_names=["x"], kernels=kernels)
        got = ort_session(path).run(None, {"x": x.cpu().numpy()})[0]
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert next(m.parameters()).device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_product_quantization_on_device(device, tmp_path):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 8))
    m, ref = net().to(device), net()
    st.pq_(m, st.PQ(n_centroids=4, n_iter=3))
    st.pq_(ref, st.PQ(n_centroids=4, n_iter=3))
    for (_, _, a), (_, _, b) in zip(st.pq_layers(m), st.pq_layers(ref)):     # same codes on every device
        assert torch.equal(a.codes.cpu(), b.codes) and torch.allclose(a.centroids.cpu(), b.centroids, atol=1e-6)
    x = torch.randn(5, 2, 8, device=device)
    opt = torch.optim.SGD(st.pq_param_groups(m, lr=0.1), lr=0.1)
    m(x).pow(2).mean().backward(); opt.step()
    st.save_packed(m, tmp_path / "m.slim")
    got = st.load_packed(tmp_path / "m.slim", net())
    with torch.no_grad():
        assert torch.allclose(got(x.cpu()), m(x).cpu(), atol=1e-6)
