"""The transformers integration: the callback runs the schedule and logs sparsity; the loss mixin
adds the penalty (and distillation); scores get their own learning rate; slimtorch imports without it."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import slimtorch as st

transformers = pytest.importorskip("transformers")


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def test_callback_steps_the_schedule_and_logs():
    from slimtorch.integrations import PruneCallback
    model = _model()
    st.prune_(model, st.Magnitude(remaining=0.2, total_steps=4), include="bert.encoder.*")
    cb = PruneCallback()
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    for i in range(4):
        state.global_step = i + 1
        cb.on_step_end(None, state, control, model=model)
    logs = {"loss": 1.0}
    cb.on_log(None, state, control, logs=logs, model=model)
    assert logs["sparsity"] == pytest.approx(st.sparsity(model)["sparsity"]) and logs["sparsity"] > 0.75
    cb.on_train_end(None, state, control, model=model)
    assert "pruned:" in str(cb.report)


class _Base:
    """Stands for transformers.Trainer (which needs accelerate): the task loss of the HF model."""

    def __init__(self, model, args):
        self.model, self.args, self.optimizer = model, args, None

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        out = model(**inputs)
        return (out.loss, out) if return_outputs else out.loss


def test_loss_mixin_adds_penalty_and_distillation():
    from slimtorch.integrations import PruneLossMixin
    from slimtorch.prune import soft_penalty

    class T(PruneLossMixin, _Base):
        pass

    model = _model()
    st.prune_(model, st.SoftMovement(total_steps=10, lam=10.0), include="bert.encoder.*")
    for _ in range(5):
        st.step(model)
    args = SimpleNamespace(learning_rate=1e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    model.eval()                                            # no dropout: the same forward twice
    trainer = T(model, args)
    inputs = {"input_ids": torch.randint(0, 40, (2, 6)), "labels": torch.tensor([0, 2])}
    task = model(**inputs).loss
    loss = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(loss, task + soft_penalty(model))
    trainer.teacher, trainer.distill_T, trainer.distill_alpha = _model().eval(), 2.0, 0.5
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True)
    t_logits = trainer.teacher(input_ids=inputs["input_ids"]).logits
    want = st.distill_loss(out.logits, t_logits, T=2.0, alpha=0.5, labels=inputs["labels"]) + soft_penalty(model)
    torch.testing.assert_close(loss, want)
    opt = trainer.create_optimizer()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2] and opt.param_groups[1]["weight_decay"] == 0.0
    loss.backward(); opt.step()


def test_slimtorch_imports_without_the_integrations():
    code = "import sys, slimtorch; assert 'transformers' not in sys.modules; import slimtorch.integrations"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": "src"})
