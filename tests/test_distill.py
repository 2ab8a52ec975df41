"""distill_loss and hidden_state_loss against hand formulas; clear errors."""
import pytest
import torch
import torch.nn.functional as F

import slimtorch as st
from slimtorch.errors import ConfigError


def test_distill_loss_matches_the_reference_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, alpha = 2.0, 0.3
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    want = alpha * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert float(st.distill_loss(s, t, T=T, alpha=alpha, labels=y).detach()) == pytest.approx(float(want), rel=1e-6)
    assert float(st.distill_loss(s, t, T=T).detach()) == pytest.approx(float(kl), rel=1e-6)
    assert float(st.distill_loss(t, t, T=3.0)) == pytest.approx(0.0, abs=1e-6)
    t.requires_grad_(True)
    st.distill_loss(s, t, labels=y).backward()
    assert t.grad is None and s.grad is not None                     # no gradient into the teacher


def test_distill_loss_token_logits_and_errors():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    flat = st.distill_loss(s.reshape(6, 4), t.reshape(6, 4))
    assert float(st.distill_loss(s, t)) == pytest.approx(float(flat))
    with pytest.raises(ConfigError, match="T=0"):
        st.distill_loss(s, t, T=0)
    with pytest.raises(ConfigError, match="alpha=1.5"):
        st.distill_loss(s, t, alpha=1.5)
    with pytest.raises(ConfigError, match="differ in shape"):
        st.distill_loss(s, t[:, :2])


def test_hidden_state_loss():
    torch.manual_seed(0)
    hs = [torch.randn(2, 3, 4) for _ in range(3)]
    ht = [torch.randn(2, 3, 4) for _ in range(5)]
    want = (F.mse_loss(hs[0], ht[0]) + F.mse_loss(hs[2], ht[4])) / 2
    assert float(st.hidden_state_loss(hs, ht, pairs=[(0, 0), (2, 4)])) == pytest.approx(float(want))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    keep = mask.bool()
    want = ((hs[1] - ht[1])[keep] ** 2).mean()
    assert float(st.hidden_state_loss(hs, ht, pairs=[(1, 1)], attention_mask=mask)) == pytest.approx(float(want))
    with pytest.raises(ConfigError, match="pass pairs"):
        st.hidden_state_loss(hs, ht)
    with pytest.raises(ConfigError, match="out of range"):
        st.hidden_state_loss(hs, ht, pairs=[(3, 0)])
