"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization through Weight Equalization
and Bias Correction", Sec. 4.1). For two layers y = f(W1 x + b1), z = W2 y + b2 with f positively
homogeneous (f(x / s) = f(x) / s for s > 0: ReLU, LeakyReLU, PReLU, identity), any positive diagonal
S leaves the output unchanged (eq. 4-5):

    W2 f(W1 x + b1) = W2 S f(S^-1 W1 x + S^-1 b1)         W1' = S^-1 W1,  b1' = S^-1 b1,  W2' = W2 S

With r1_i the range of output channel i of W1 (max |row i|) and r2_i that of input channel i of W2
(max |column i|), the precision of both layers is maximised by (eq. 10)

    s_i = sqrt(r1_i r2_i) / r2_i          so that  r1_i / s_i = r2_i s_i = sqrt(r1_i r2_i),

and a chain (expand 1x1 -> depthwise -> project 1x1) is equalized pair by pair, iterated until the
scales converge (Sec. 4.1.1). A BatchNorm right after W1 is first folded (``fold_bn=True``, the
paper's setting: W1 <- W1 gamma / sigma, bn_fold.py) or, with ``fold_bn=False``, kept: then W1's
effective rows W1 gamma / sigma are equalized and S^-1 goes into the BN's affine (gamma, beta), which
is exact in eval and train mode alike (W1 itself is unchanged until the BN is folded).

Pairs are found from the actual forward pass (equalize_flow.py: module hooks and a TorchFunctionMode
record which op reads which tensor), so it works on any nn.Module, including convs that subclass
nn.Conv2d and blocks that call modules functionally. A pair is equalized only when W1's output reaches
W2 through a chain in which every tensor has exactly one reader; the model output is then checked on
the example batch and a pair that changes it is undone. Call before ``quantize_``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .bn_fold import _outputs, _rel_error, _run, _set_module, fold_batchnorm_, fold_scale
from .equalize_flow import find_chains


@dataclass
class EqualizeResult:
    """``pairs``: [(layer1, layer2)] equalized, in forward order; ``skipped``: {layer1: reason} for
    layers whose output could not be equalized with a next layer; ``relu6_replaced``: ReLU6 modules
    replaced by ReLU (``relu6_to_relu=True``) and ``relu6_change``: the relative change of the FP32
    output that caused; ``folded``: the FoldResult when ``fold_bn``; ``iterations`` run;
    ``max_log2_scale``: largest |log2 s_i| applied; ``max_rel_error``: output change (should be ~1e-7)."""
    pairs: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    relu6_replaced: list = field(default_factory=list)
    relu6_change: float = 0.0
    folded: object = None
    iterations: int = 0
    max_log2_scale: float = 0.0
    max_rel_error: float = 0.0

    def __str__(self) -> str:
        lines = [f"equalized {a} -> {b}" for a, b in self.pairs]
        lines += [f"left {a}: {why}" for a, why in self.skipped.items()]
        if self.relu6_replaced:
            lines.append(f"ReLU6 -> ReLU: {', '.join(self.relu6_replaced)} (FP32 output changed by "
                         f"{self.relu6_change:.3g} relative)")
        return "\n".join(lines) or "no layer pairs"


def _rows(w: torch.Tensor) -> torch.Tensor:
    """r1: max |W| per output channel (row)."""
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _cols(w: torch.Tensor, groups: int) -> torch.Tensor:
    """r2: max |W| over everything that multiplies input channel i (a grouped / depthwise conv's
    input channel k * in_g + j is column j of the out / groups filters of group k)."""
    out, in_g = w.shape[0], w.shape[1]
    return w.abs().reshape(groups, out // groups, in_g, -1).amax(dim=(1, 3)).reshape(-1)


def _scale_cols(w: torch.Tensor, groups: int, s: torch.Tensor) -> torch.Tensor:
    out, in_g = w.shape[0], w.shape[1]
    return (w.reshape(groups, out // groups, in_g, -1) * s.reshape(groups, 1, in_g, 1)).reshape(w.shape)


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _check_not_quantized(model: nn.Module) -> None:
    from torch.nn.utils import parametrize
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m) or m._modules.get("input_quantizer") is not None:
            raise ConfigError(f"equalize_: layer {n!r} is already quantized; call equalize_ before quantize_ "
                              "(equalization rescales the float weights the quantizers are fitted to)")


def _eval_outputs(model, example_input):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return _outputs(_run(model, example_input))
    finally:
        for m, mode in modes.items():
            m.training = mode


def _replace_relu6(model: nn.Module, names: set) -> list:
    """Replace the ReLU6 modules ``names`` (every place each instance is registered) by ReLU."""
    targets = {id(model.get_submodule(n)) for n in names}
    done = []
    for n, m in list(model.named_modules(remove_duplicate=False)):
        if n and id(m) in targets:
            _set_module(model, n, nn.ReLU(inplace=getattr(m, "inplace", False)))
            done.append(n)
    return sorted(done)


class _Pair:
    """One pair on float64 working copies shared by all pairs: per layer its weight W, bias b and the
    per-row factor of the BatchNorm that alone reads its output (|gamma| / sigma, times the S^-1 already
    put into that BN's affine), so that ranges are those of the BN-folded weights."""

    def __init__(self, model, chain, work, bn_after):
        self.l1, self.l2, self.bn = chain.first, chain.second, chain.bn
        self.m1, self.m2 = model.get_submodule(self.l1), model.get_submodule(self.l2)
        for name, m in ((self.l1, self.m1), (self.l2, self.m2)):
            if name not in work:
                bn = model.get_submodule(bn_after[name]) if name in bn_after else None
                n = m.weight.shape[0]
                work[name] = {"w": m.weight.detach().to(torch.float64).clone(),
                              "b": None if m.bias is None else m.bias.detach().to(torch.float64).clone(),
                              "bn": bn, "f": fold_scale(bn).detach().abs() if bn is not None else torch.ones(n, dtype=torch.float64),
                              "mult": torch.ones(n, dtype=torch.float64)}
        self.work = work
        self.total = torch.ones(self.m1.weight.shape[0], dtype=torch.float64)   # S accumulated

    @staticmethod
    def _effective(v) -> torch.Tensor:
        return v["w"] * (v["f"] * v["mult"]).reshape((-1,) + (1,) * (v["w"].dim() - 1))

    def step(self) -> float:
        """Equalize once (eq. 10); returns max |log2 s_i|."""
        w1, w2 = self.work[self.l1], self.work[self.l2]
        r1 = _rows(self._effective(w1))
        r2 = _cols(self._effective(w2), _groups(self.m2))
        s = torch.sqrt(r1 * r2) / r2
        s = torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones_like(s))
        if self.bn is not None:                       # S^-1 into the BN's gamma and beta
            w1["mult"] = w1["mult"] / s
        else:
            w1["w"] = w1["w"] / s.reshape((-1,) + (1,) * (w1["w"].dim() - 1))
            if w1["b"] is not None:
                w1["b"] = w1["b"] / s
        w2["w"] = _scale_cols(w2["w"], _groups(self.m2), s)
        self.total *= s
        return float(s.log2().abs().max()) if s.numel() else 0.0

    @torch.no_grad()
    def write(self, written: set):
        """Copy the working values into the model (each layer once); returns a function that undoes it."""
        saved = []
        for m, name in ((self.m1, self.l1), (self.m2, self.l2)):
            if name in written:
                continue
            written.add(name)
            v = self.work[name]
            saved.append((m.weight, m.weight.detach().clone()))
            m.weight.copy_(v["w"].to(m.weight.dtype))
            if m.bias is not None and v["b"] is not None:
                saved.append((m.bias, m.bias.detach().clone()))
                m.bias.copy_(v["b"].to(m.bias.dtype))
            if v["bn"] is not None and bool((v["mult"] != 1).any()):
                for p in (v["bn"].weight, v["bn"].bias):
                    saved.append((p, p.detach().clone()))
                    p.mul_(v["mult"].to(p.dtype))

        def undo():
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)
        return undo


def equalize_(model: nn.Module, example_input=None, *, iterations: int = 100, tol: float = 1e-6,
              fold_bn: bool = True, relu6_to_relu: bool = False, check_tol: float = 1e-4) -> EqualizeResult:
    """Cross-layer equalization in place (module docstring; DFQ Sec. 4.1), before ``quantize_``.

    ``example_input``: one batch (a tensor or a tuple of positional args) the pairs are traced with
    and the result checked on (required). ``iterations``: passes over all pairs in forward order,
    stopping early once every |log2 s_i| < ``tol``. ``fold_bn=True``: ``fold_batchnorm_`` first (the
    BNs become identities; the weights are then the deployed, equalized ones); ``False``: BNs are kept
    and absorb S^-1 in gamma and beta. ``relu6_to_relu=True``: a ReLU6 that blocks a pair is replaced by
    ReLU first (what DFQ did for MobileNetV2); this changes the FP32 model (``relu6_change``); the
    default skips such pairs (ReLU6 is not positively homogeneous). A pair whose equalization changes
    the output on ``example_input`` by more than ``check_tol`` (relative L2) is undone and reported.
    Returns an :class:`EqualizeResult`."""
    _check_not_quantized(model)
    if example_input is None:
        raise ConfigError("equalize_ needs example_input (one batch, e.g. a calibration batch): the layer pairs "
                          "are found by running the forward pass")
    if iterations < 1:
        raise ConfigError(f"equalize_: iterations must be >= 1, got {iterations}")
    result = EqualizeResult()
    if fold_bn:
        result.folded = fold_batchnorm_(model, example_input, warn=False)
    chains, skipped, relu6, bn_after = find_chains(model, example_input)
    if relu6 and relu6_to_relu:
        before = _eval_outputs(model, example_input)
        result.relu6_replaced = _replace_relu6(model, relu6)
        result.relu6_change = _rel_error(before, _eval_outputs(model, example_input))
        chains, skipped, _, bn_after = find_chains(model, example_input)
    result.skipped = skipped
    if not chains:
        return result
    ref = _eval_outputs(model, example_input)
    undo, err, its, big = _equalize(model, chains, bn_after, iterations, tol, ref, example_input)
    if err > check_tol:                               # something broke: find the chains that do not check
        undo()
        ok = []
        for c in chains:
            u, e, *_ = _equalize(model, [c], bn_after, 1, tol, ref, example_input)
            u()
            if e <= check_tol:
                ok.append(c)
            else:
                result.skipped[c.first] = f"equalizing with {c.second!r} changed the model output (relative error {e:.2g})"
        chains = ok
        undo, err, its, big = _equalize(model, chains, bn_after, iterations, tol, ref, example_input) if chains else (None, 0.0, 0, 0.0)
    result.pairs = [(c.first, c.second) for c in chains]
    result.iterations, result.max_log2_scale, result.max_rel_error = its, big, err
    return result


def _equalize(model, chains, bn_after, iterations, tol, ref, example_input):
    """Iterate eq. 10 over ``chains`` on float64 copies, write once; (undo, output error, iterations
    run, max |log2 s| of the accumulated scales)."""
    work: dict = {}
    pairs = [_Pair(model, c, work, bn_after) for c in chains]
    its = 0
    for its in range(1, iterations + 1):
        if max(p.step() for p in pairs) < tol:
            break
    written: set = set()
    undos = [p.write(written) for p in pairs]
    big = max(float(p.total.log2().abs().max()) if p.total.numel() else 0.0 for p in pairs)

    def undo():
        for u in reversed(undos):
            u()
    return undo, _rel_error(ref, _eval_outputs(model, example_input)), its, big


__all__ = ["equalize_", "EqualizeResult"]
