"""BatchNorm re-estimation (quant/bn_reestimate.py): running statistics = cumulative average of the
per-batch statistics of each BN's input with quantizers active; nothing else changes."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError


def net():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 5), nn.BatchNorm1d(5))


def test_statistics_are_the_cumulative_average():
    torch.manual_seed(0)
    model = net()
    batches = [torch.randn(8, 2, 8, 8) * (1 + i) + i for i in range(3)]
    st.quantize_(model, st.LSQ(w_bits=3, a_bits=4))
    st.calibrate(model, batches)
    q_state = {k: v.clone() for k, v in model.state_dict().items() if "parametrizations" in k or "input_quantizer" in k}
    seen = {i: [] for i in (1, 4, 8)}
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
             for i in seen]
    model.train()
    model[7].train(False)                      # a mixed mode: restored as it was
    result = st.reestimate_bn_(model, batches)
    for h in hooks:
        h.remove()
    assert result == {"1": 3, "4": 3, "8": 3}
    for i, xs in seen.items():
        dims = [0] + list(range(2, xs[0].dim()))
        mean = torch.stack([x.mean(dims) for x in xs]).mean(0)
        var = torch.stack([x.var(dims, unbiased=True) for x in xs]).mean(0)
        assert torch.allclose(model[i].running_mean, mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model[i].running_var, var, rtol=1e-5, atol=1e-6)
    # the first BN's input does not depend on the BN modes: the statistics are those of the
    # quantized conv's output over the batches
    with torch.no_grad():
        outs = [model[0](x) for x in batches]
    assert torch.allclose(model[1].running_mean, torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0), atol=1e-6)
    assert model[4].momentum == 0.3 and model[1].momentum == 0.1
    assert model.training and not model[7].training and model[1].training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in q_state.items())   # quantizers untouched


def test_needs_initialised_quantizers_and_data():
    model = net()
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=4))
    with pytest.raises(ConfigError, match="calibrate"):
        st.reestimate_bn_(model, [torch.randn(4, 2, 8, 8)])
    st.calibrate(model, [torch.randn(4, 2, 8, 8)])
    before = model[1].running_var.clone()
    with pytest.raises(ConfigError, match="no batch"):
        st.reestimate_bn_(model, [])
    assert torch.equal(model[1].running_var, before)
    assert st.reestimate_bn_(model, [torch.randn(4, 2, 8, 8)] * 5, num_batches=2) == {"1": 2, "4": 2, "8": 2}


def separable_cnn():
    """A small depthwise-separable CNN for 8x8 digits: conv-BN-ReLU, then two (depthwise 3x3-BN-ReLU,
    pointwise 1x1-BN-ReLU) blocks, global pooling, Linear."""
    def block(cin, cout, stride=1):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         *block(8, 16), *block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.slow
def test_reestimation_recovers_2bit_qat_accuracy_on_digits(capsys):
    from slimtorch.data import load_dataset, make_loaders
    from slimtorch.train import TrainConfig, evaluate, train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small convs: one thread is fastest and deterministic
    try:
        torch.manual_seed(0)
        bundle = load_dataset("digits")
        tr, te = make_loaders(bundle, batch_size=64, seed=0, test_batch_size=512)
        model = separable_cnn()
        train(model, tr.batches, TrainConfig(epochs=6, lr=1e-2, progress=False))
        fp32 = evaluate(model, te.batches(0))["accuracy"]
        st.quantize_(model, st.LSQ(w_bits=2, a_bits=2))
        st.calibrate(model, tr.batches(0), num_batches=4)
        train(model, tr.batches, TrainConfig(epochs=2, lr=1e-2, progress=False))
        before = evaluate(model, te.batches(0))["accuracy"]
        st.reestimate_bn_(model, tr.batches(0), num_batches=16)
        after = evaluate(model, te.batches(0))["accuracy"]
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\ndigits separable CNN: FP32 {100 * fp32:.1f}%, W2A2 QAT {100 * before:.1f}% -> "
              f"BN re-estimated {100 * after:.1f}%")
    assert fp32 > 0.85 and after >= before
