"""EBS search memory vs a DNAS-style search (issue 14): bytes of parameters + Adam state and of the
tensors autograd saves for the backward pass in one training step, and the step time (interleaved).

DNAS (Wu et al. 2018) keeps one float weight per candidate bitwidth; its layer output mixes the
candidates' quantized copies, each branch with its own autograd graph. Our EBS keeps one meta weight
and recomputes each candidate's rounding in the backward pass (search/ebs_mix.py)."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight
from slimtorch.quant.fake_quant import fake_quant
from slimtorch.search.ebs import EBSConfig, ebs_state
from slimtorch.search.ebs_mix import BitMixer


class DNASWeights(BitMixer):
    """Weight mixer of a DNAS-style search: candidate b quantizes its OWN float copy W_b."""

    def __init__(self, mixer: BitMixer, weight: torch.Tensor):
        nn.Module.__init__(self)
        self.candidate_bits, self.role, self.temperature = mixer.candidate_bits, mixer.role, mixer.temperature
        self.candidates, self.strength, self.observing = mixer.candidates, mixer.strength, False
        self.copies = nn.ParameterList(nn.Parameter(weight.detach().clone()) for _ in self.candidate_bits)

    def forward(self, x):
        p = self.probs()
        return sum(p[b] * _fq(q, w) for b, (q, w) in enumerate(zip(self.candidates, self.copies)))


def _fq(q, x):
    n = x.numel() / q.scale.numel() / (x.shape[0] if q.role == "activation" and x.dim() > 1 else 1)
    return fake_quant(x, q.scale.clamp_min(1e-8), q.q_n, q.q_p, q.offset, 1.0 / (max(n, 1.0) * q.q_p) ** 0.5)


class DNASActs(BitMixer):
    """Activation side of the DNAS baseline: one branch graph per candidate (no recomputation)."""

    def __init__(self, mixer: BitMixer):
        nn.Module.__init__(self)
        self.candidate_bits, self.role, self.temperature = mixer.candidate_bits, mixer.role, mixer.temperature
        self.candidates, self.strength, self.observing = mixer.candidates, mixer.strength, False

    def forward(self, x):
        p = self.probs()
        return sum(p[b] * _fq(q, x) for b, q in enumerate(self.candidates))


def _searched(net, x, quant, bits, dnas: bool):
    m = copy.deepcopy(net)
    st.ebs_(m, EBSConfig(bits=bits, a_bits=bits, target_uniform=max(bits)), quant, example_input=x)
    st.calibrate(m, [x], bias_correction=False)
    if dnas:
        mods = dict(m.named_modules())
        for n, (wm, am) in ebs_state(m).mixers.items():
            layer = mods[n]
            chain = layer.parametrizations.weight
            chain[list(chain).index(wm)] = DNASWeights(wm, raw_weight(layer))
            layer.parametrizations.weight.original.requires_grad_(False)   # DNAS trains the copies only
            if am is not None:
                layer._modules["input_quantizer"] = DNASActs(am)
    return m


def _state_bytes(m, opt) -> int:
    params = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters() if p.requires_grad}.values())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return params + state


def _saved_bytes(m, x, y) -> int:
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    return sum(seen.values())


def search_memory(net, x, quant, bits, steps=10, rounds=3) -> dict:
    """{float|ebs|dnas: {label, state, saved, ms}} for one training step at x's batch size."""
    torch.manual_seed(0)
    y = torch.randint(0, 10, (x.shape[0],))
    models = {"float": copy.deepcopy(net), "ebs": _searched(net, x, quant, bits, False),
              "dnas": _searched(net, x, quant, bits, True)}
    labels = {"float": "float training (no search)", "ebs": "EBS (ours): one meta weight, recomputed rounding",
              "dnas": f"DNAS-style: one weight copy per candidate ({len(bits)})"}
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-4) for k, m in models.items()}
    out = {}
    for k, m in models.items():
        m.train()
        saved = _saved_bytes(m, x, y)
        opts[k].step()
        out[k] = {"label": labels[k], "state": _state_bytes(m, opts[k]), "saved": saved}
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            for _ in range(steps):
                t = time.perf_counter()
                loss = nn.functional.cross_entropy(m(x), y)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                times[k].append(time.perf_counter() - t)
    for k in models:
        out[k]["ms"] = 1000 * statistics.median(times[k])
    out["batch"] = int(x.shape[0])
    return out
