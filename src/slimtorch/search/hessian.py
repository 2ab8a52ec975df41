"""Per-layer Hessian traces by Hutchinson's estimator (HAWQ-V2, Dong et al. 2020; PyHessian).

One Rademacher vector v over all traced weights (and, optionally, layer inputs) and ONE
Hessian-vector product Hv by double backprop per iteration serve every layer: the estimate for
layer i is v_i . (Hv)_i. Cross-layer terms v_i^T H_ij v_j have mean zero (v_i, v_j independent), so
each block estimate is unbiased for Tr(H_ii); they only add variance (as in NNCF's per-parameter
traces). Fixes the pitfalls listed in papers.md Sec. 3: the accumulator starts at zero (NNCF starts
it at randn), the relative-tolerance stop uses |mean| (negative traces), the model is in eval()
mode while estimating, biases are excluded, traces are averaged per element (Tr / numel).

Activation traces (HAWQ-V2 Sec. 3.3): a zero tensor d requiring grad is added to a layer's input,
so d^2L/dd^2 is the Hessian w.r.t. that input. It is block-diagonal over samples; for a loss that is
a mean over the batch, v^T H v estimates the mean over samples of the per-sample trace.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attach import find_layers, raw_weight
from ..errors import ConfigError, DataError, PatternError

FROZEN_MODES = ("skip", "trace", "error")
EAGER_HINT = ("an attention kernel without double backward ran, so Hessian-vector products fail, although "
              "the traces run scaled_dot_product_attention on its math kernel (sdpa_kernel(SDPBackend.MATH), "
              "which covers torch's nn.MultiheadAttention / nn.TransformerEncoder and Hugging Face's "
              "\"sdpa\" attention). A custom attention op is the likely cause: compute it with plain "
              "matmul/softmax, or for Hugging Face models load with "
              "AutoModel.from_pretrained(..., attn_implementation=\"eager\")")


@dataclass
class TraceResult:
    """Hutchinson estimates. ``traces``: average trace Tr(H_i)/numel_i of each layer's weight;
    ``totals``: Tr(H_i); ``stderr``: standard error of each average trace; ``frozen``: layers
    skipped because their weight does not require grad; ``act_traces``: average per-sample trace
    per input element (only with ``activations=True``)."""
    traces: dict[str, float]
    totals: dict[str, float]
    numel: dict[str, int]
    stderr: dict[str, float]
    iterations: int
    converged: bool
    seconds: float
    frozen: list[str] = field(default_factory=list)
    act_traces: dict[str, float] | None = None
    act_numel: dict[str, int] | None = None
    act_stderr: dict[str, float] | None = None
    history: list[float] = field(default_factory=list)  # running estimate of the summed trace
    elapsed: list[float] = field(default_factory=list)  # seconds from the start to each iteration's end

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("traces", "totals", "numel", "stderr", "iterations",
                                               "converged", "seconds", "frozen", "act_traces",
                                               "act_numel", "act_stderr")}


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y`` for ``(x, y, ...)`` batches; for dict batches
    (Hugging Face) ``model(**batch).loss``."""
    if isinstance(batch, dict):
        out = model(**batch)
        if getattr(out, "loss", None) is None:
            raise ConfigError("dict batches need a model that returns .loss (give labels) or a loss_fn")
        return out.loss
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ConfigError("default loss needs (x, y) batches; pass loss_fn(model, batch) -> loss")
    out = model(batch[0])
    out = getattr(out, "logits", out)
    return F.cross_entropy(out, batch[1])


def collect_batches(data: Iterable, num_batches: int | None) -> list:
    """The first ``num_batches`` batches of ``data`` (all when None); DataError when there are none."""
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise ConfigError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    batches = []
    for b in data:
        batches.append(b)
        if num_batches is not None and len(batches) >= num_batches:
            break
    if not batches:
        raise DataError("the data loader yielded no batch: Hessian traces need at least one batch")
    return batches


def batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    t = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() > 0 else 1


def _is_sdpa_error(e: Exception) -> bool:
    msg = str(e).lower()
    return "scaled_dot_product" in msg or "flash_attention" in msg or "efficient_attention" in msg


def math_attention():
    """Context forcing scaled_dot_product_attention onto its math kernel: the fused (flash /
    memory-efficient) kernels that torch's nn.MultiheadAttention and Hugging Face's "sdpa" attention
    pick have no double backward, the math kernel (same function, plain ops) does."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.int8).to(t.dtype) * 2 - 1
    return v.to(t.device)


def select_weights(model, include=None, exclude=None, frozen="skip"):
    """(names -> weight Parameter to trace, frozen names). Shared weights are traced once."""
    if frozen not in FROZEN_MODES:
        raise ConfigError(f"frozen={frozen!r}; expected one of {FROZEN_MODES}")
    layers = find_layers(model, include, exclude)
    chosen, frozen_names = {}, []
    for name, m in layers.items():
        w = raw_weight(m)
        if not w.requires_grad and frozen != "trace":
            frozen_names.append(name)
        else:
            chosen[name] = w
    if frozen_names:
        if frozen == "error":
            raise ConfigError(f"layers with frozen weights (requires_grad=False): {frozen_names}")
        warnings.warn(f"Hessian traces skip {len(frozen_names)} layer(s) whose weight does not require "
                      f"grad: {frozen_names} (pass frozen='trace' to trace them anyway)", stacklevel=3)
    if not chosen:
        raise PatternError("no layer with a trainable weight to trace; frozen layers: "
                           f"{frozen_names} (pass frozen='trace')")
    return chosen, frozen_names


class _ActProbe:
    """Adds a zero tensor (requires grad) to each probed layer's first input during a forward."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.deltas: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None
            d = torch.zeros_like(args[0], requires_grad=True)
            self.deltas[name].append(d)
            return (args[0] + d,) + tuple(args[1:])
        return hook

    def reset(self):
        for v in self.deltas.values():
            v.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def _stderr(s1: torch.Tensor, s2: torch.Tensor, n: int) -> torch.Tensor:
    """Standard error of the mean from running sums of x and x^2 over n samples."""
    mean = s1 / n
    return ((s2 / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1)) / n).sqrt()


def hutchinson_traces(model: nn.Module, data, loss_fn: Callable | None = None, *, include=None,
                      exclude=None, max_iter: int = 200, tol: float = 1e-3, min_iter: int = 2,
                      patience: int = 1, num_batches: int | None = 4, stop_on: str = "total",
                      activations: bool = False, frozen: str = "skip", seed: int = 0,
                      eps: float = 1e-6, rel_stderr: float | None = None,
                      progress: bool = True) -> TraceResult:
    """Average Hessian trace per quantizable layer (weights only, biases excluded).

    ``data``: an iterable of batches (the first ``num_batches`` are used every iteration, their
    HVPs averaged by batch size) or a closure ``data(model) -> loss``. ``loss_fn(model, batch)``
    defaults to :func:`default_loss`. Stops after ``max_iter`` iterations, or when the relative
    change of the running mean |m_k - m_(k-1)| / (|m_k| + eps) is below ``tol`` for ``patience``
    consecutive iterations (1: PyHessian's rule; ``stop_on="total"``: summed trace, like PyHessian;
    ``"each"``: every layer). ``rel_stderr``: instead, stop once the standard error of the mean is below this
    fraction of |mean| (summed trace or every layer, per ``stop_on``; at least 10 iterations): a
    statement about the estimate's precision, which the step rule is not.
    The model is in eval() mode during the estimate; modes and requires_grad are restored.
    Under torch.distributed the per-iteration estimates are averaged over ranks (same seed -> same v).
    """
    if stop_on not in ("total", "each"):
        raise ConfigError(f"stop_on={stop_on!r}; expected 'total' or 'each'")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ConfigError(f"tol must be > 0, got {tol!r}")
    if rel_stderr is not None and not 0 < rel_stderr < 1:
        raise ConfigError(f"rel_stderr must be in (0, 1), got {rel_stderr!r}")
    weights, frozen_names = select_weights(model, include, exclude, frozen)
    names = list(weights)
    uniq = list({id(w): w for w in weights.values()}.values())   # tied weights: one block
    block = [next(i for i, u in enumerate(uniq) if u is weights[n]) for n in names]
    closure = callable(data) and not hasattr(data, "__iter__")
    batches = None if closure else collect_batches(data, num_batches)
    loss_fn = loss_fn or default_loss
    modules = dict(model.named_modules())
    probe = _ActProbe({n: modules[n] for n in names}) if activations else None

    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    gen = torch.Generator().manual_seed(seed)
    L, dev = len(uniq), uniq[0].device
    s1 = torch.zeros(L, dtype=torch.float64)            # accumulators start at zero (not randn)
    s2 = torch.zeros(L, dtype=torch.float64)
    a1 = torch.zeros(len(names), dtype=torch.float64) if activations else None
    a2 = torch.zeros(len(names), dtype=torch.float64) if activations else None
    act_numel: dict[str, int] = {}
    history, elapsed, prev, calm, it, converged, tot2 = [], [], None, 0, 0, False, 0.0
    t0 = time.perf_counter()

    unused: set[int] = set()

    def grads_of(loss, deltas):
        g = torch.autograd.grad(loss, uniq + deltas, create_graph=True, allow_unused=True)
        unused.update(i for i in range(L) if g[i] is None)
        return g

    def hvp(grads, params, vs, keep):
        pairs = [(g, v) for g, v in zip(grads, vs) if g is not None and g.requires_grad]
        if not pairs:   # loss linear in every traced tensor: H = 0
            return [torch.zeros_like(p) for p in params]
        try:
            hv = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs],
                                     retain_graph=keep, allow_unused=True)
        except RuntimeError as e:
            if _is_sdpa_error(e):
                raise ConfigError(EAGER_HINT) from e
            raise
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]

    def forward(batch):
        if probe is not None:
            probe.reset()
        with math_attention():      # the kernel is chosen in the forward; its backward follows
            loss = data(model) if closure else loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ConfigError("the loss (closure or loss_fn) must return a scalar tensor")
        deltas = [d for n in names for d in probe.deltas[n]] if probe is not None else []
        return loss, deltas

    try:
        for p in flags:
            p.requires_grad_(False)
        for w in uniq:
            w.requires_grad_(True)
        model.eval()
        cached = None
        if closure or len(batches) == 1:      # one graph, reused by every iteration (as PyHessian)
            loss, deltas = forward(None if closure else batches[0])
            cached = (grads_of(loss, deltas), deltas, 1)
        bar = tqdm(total=max_iter, desc="hutchinson", disable=not progress, file=sys.stderr,
                   mininterval=0.5, leave=False)
        for it in range(1, max_iter + 1):
            vw = [_rademacher(w, gen) for w in uniq]
            est = torch.zeros(L, dtype=torch.float64)
            aest = torch.zeros(len(names), dtype=torch.float64) if activations else None
            todo = [cached] if cached is not None else batches
            total_n = sum(1 if cached is not None else batch_size(b) for b in todo)
            for item in todo:
                if cached is not None:
                    grads, deltas, n = item
                else:
                    loss, deltas = forward(item)
                    grads, n = grads_of(loss, deltas), batch_size(item)
                va = [_rademacher(d, gen) for d in deltas]
                hv = hvp(grads, uniq + deltas, vw + va, cached is not None)
                w_hat = torch.stack([(v * h).sum().double() for v, h in zip(vw, hv[:L])]).cpu()
                est += w_hat * (n / total_n)
                if activations:
                    k = 0
                    for j, name in enumerate(names):
                        for d in probe.deltas[name]:
                            aest[j] += float((va[k] * hv[L + k]).sum()) * (n / total_n)
                            act_numel[name] = d[0].numel() if d.dim() > 1 else d.numel()
                            k += 1
            if dist:
                packed = est if aest is None else torch.cat([est, aest])
                packed = packed.to(dev)
                torch.distributed.all_reduce(packed)
                packed = packed.cpu() / torch.distributed.get_world_size()
                est, aest = packed[:L], (packed[L:] if activations else None)
            s1 += est
            s2 += est * est
            tot2 += est.sum().item() ** 2
            if activations:
                a1 += aest
                a2 += aest * aest
            mean = s1 / it
            cur = mean.sum().item() if stop_on == "total" else mean
            history.append(mean.sum().item())
            elapsed.append(time.perf_counter() - t0)
            if prev is not None:
                if stop_on == "total":
                    rel = abs(cur - prev) / (abs(cur) + eps)
                else:
                    rel = ((cur - prev).abs() / (cur.abs() + eps)).max().item()
                calm = calm + 1 if rel < tol else 0
                bar.set_postfix(trace=f"{history[-1]:.4g}", rel=f"{rel:.1e}", refresh=False)
            prev = cur.clone() if isinstance(cur, torch.Tensor) else cur
            bar.update(1)
            if rel_stderr is not None:
                calm = 0
                if it >= max(min_iter, 10) and stop_on == "total":
                    se_t = _stderr(s1.sum(), torch.tensor(tot2, dtype=torch.float64), it).item()
                    calm = int(se_t <= rel_stderr * abs(cur))
                elif it >= max(min_iter, 10):
                    calm = int(bool((_stderr(s1, s2, it) <= rel_stderr * mean.abs()).all()))
            if it >= max(min_iter, 2) and calm >= (1 if rel_stderr is not None else patience):
                converged = True
                break
        bar.close()
    finally:
        if probe is not None:
            probe.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        for m, mode in modes.items():
            m.training = mode

    if unused:
        warnings.warn("layers not used by the loss (trace 0): "
                      f"{[n for i, n in enumerate(names) if block[i] in unused]}", stacklevel=2)
    mean = s1 / it
    se = _stderr(s1, s2, it)
    numel = {n: weights[n].numel() for n in names}
    res = TraceResult(
        traces={n: mean[block[i]].item() / numel[n] for i, n in enumerate(names)},
        totals={n: mean[block[i]].item() for i, n in enumerate(names)},
        numel=numel,
        stderr={n: se[block[i]].item() / numel[n] for i, n in enumerate(names)},
        iterations=it, converged=converged, seconds=time.perf_counter() - t0,
        frozen=frozen_names, history=history, elapsed=elapsed)
    if activations:
        res.act_numel = {n: act_numel.get(n, 0) for n in names}
        am = a1 / it
        ase = _stderr(a1, a2, it)
        res.act_traces = {n: am[j].item() / max(act_numel.get(n, 0), 1) for j, n in enumerate(names)}
        res.act_stderr = {n: ase[j].item() / max(act_numel.get(n, 0), 1) for j, n in enumerate(names)}
    if not all(math.isfinite(v) for v in res.traces.values()):
        raise ConfigError("Hessian trace estimate is not finite (NaN/inf loss?)")
    return res
