"""Which layer pairs cross-layer equalization may rescale (equalize.py), found from one eval-mode
forward pass rather than from the module tree or a symbolic trace: third-party convs that subclass
nn.Conv2d with their own forward, blocks that call one activation module several times, residual adds
written as ``x + inputs``, and functional calls are all seen as they actually run.

Conv/Linear, BatchNorm and activation modules are black boxes (forward pre-/post-hooks give their input
and output tensors); every other torch function called outside them is recorded by a
``TorchFunctionMode``. Each tensor becomes a dataflow node (a new node when an in-place op rewrites it),
each call an op reading nodes. A pair (W1, W2) is accepted only when W1's output reaches W2's input
through a chain in which every node has exactly one reader, made of at most one BatchNorm right after
W1, then positively homogeneous, channel-preserving ops (f(x / s) = f(x) / s for s > 0, per channel):
ReLU, LeakyReLU, PReLU, identity, dropout, zero padding and pooling (convs only). Anything else (a
residual add, a second reader, a flatten, ReLU6, a layer or BN called twice, weights shared or read
outside the layer) leaves the pair alone, with the reason."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .bn_fold import _META, _fname, _run, _tensors

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                       nn.Dropout3d)
HOMOGENEOUS_FUNCS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "dropout", "dropout_", "dropout1d",
                     "dropout2d", "dropout3d", "contiguous", "clone", "identity"}
SPATIAL_FUNCS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                 "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                 "adaptive_max_pool2d", "adaptive_max_pool3d", "pad", "_pad"}
RELU6_FUNCS = {"relu6", "hardtanh", "hardtanh_", "relu6_"}


@dataclass
class Chain:
    """W1 (``first``) -> [BatchNorm ``bn``] -> homogeneous ops -> W2 (``second``); module names."""
    first: str
    second: str
    bn: str | None = None


@dataclass
class _Op:
    name: str                      # module name, or the torch function's name
    module: nn.Module | None
    inputs: list
    outputs: list
    args: tuple = ()
    kwargs: dict | None = None


class _Flow(TorchFunctionMode):
    """The recorded dataflow of one forward pass (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.node: dict[int, int] = {}        # id(tensor) -> current node
        self.ndim: dict[int, int] = {}        # node -> tensor.dim()
        self.keep: list = []                  # strong references: ids stay unique during the pass
        self.ops: list[_Op] = []
        self.readers: dict[int, list] = {}    # node -> [op index | "the model output"]
        self.calls: dict[str, int] = {}
        self.stack: list = []
        self.params: dict[int, str] = {}      # id(parameter of a layer) -> layer name
        self.outside: set = set()             # layers whose parameters are read outside their forward
        for n, m in model.named_modules():
            if isinstance(m, LAYERS):
                for p in m.parameters(recurse=False):
                    self.params[id(p)] = n

    def _in(self, obj) -> list:
        return [self.node[id(t)] for t in _tensors(obj) if id(t) in self.node]

    def _out(self, obj) -> list:
        nodes = []
        for t in _tensors(obj):
            n = len(self.ndim)
            self.node[id(t)], self.ndim[n] = n, t.dim()
            self.keep.append(t)
            nodes.append(n)
        return nodes

    def _add(self, op: _Op) -> None:
        for n in op.inputs:
            self.readers.setdefault(n, []).append(len(self.ops))
        self.ops.append(op)

    def pre(self, m, args):
        name = self.names[id(m)]
        self.calls[name] = self.calls.get(name, 0) + 1
        self.stack.append(self._in(args) if not self.stack else None)

    def post(self, m, args, out):
        inputs = self.stack.pop()
        if not self.stack:
            self._add(_Op(self.names[id(m)], m, inputs, self._out(out)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _fname(func)
        if not self.stack and name not in _META:
            for t in _tensors((args, kwargs)):
                if id(t) in self.params:
                    self.outside.add(self.params[id(t)])
            inputs = self._in((args, kwargs))
            if inputs:
                self._add(_Op(name, None, inputs, self._out(out), args, kwargs))
        return out


def _record(model: nn.Module, example_input) -> _Flow:
    flow = _Flow(model)
    watched = [m for m in model.modules() if isinstance(m, LAYERS + (_BatchNorm, nn.Hardtanh) + HOMOGENEOUS_MODULES)]
    handles = [m.register_forward_pre_hook(flow.pre) for m in watched]
    handles += [m.register_forward_hook(flow.post) for m in watched]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), flow:
            out = _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for n in flow._in(out):
        flow.readers.setdefault(n, []).append("the model output")
    return flow


def _zero_pad(op: _Op) -> bool:
    mode = op.kwargs.get("mode", op.args[2] if len(op.args) > 2 else "constant")
    value = op.kwargs.get("value", op.args[3] if len(op.args) > 3 else None)
    return mode != "constant" or not value


def _relu_clamp(op: _Op) -> bool:
    lo = op.kwargs.get("min", op.args[1] if len(op.args) > 1 else None)
    hi = op.kwargs.get("max", op.args[2] if len(op.args) > 2 else None)
    return isinstance(lo, (int, float)) and lo == 0 and hi is None


def _follow(flow: _Flow, first: str, op: _Op, shared: set):
    """Walk from layer ``first``: (Chain | None, reason | None, [ReLU6 modules on the way])."""
    m1 = op.module
    conv = not isinstance(m1, nn.Linear)
    if flow.calls.get(first, 0) != 1:
        return None, f"called {flow.calls.get(first, 0)} times in one forward pass", []
    if len(op.outputs) != 1:
        return None, "its output is not one tensor", []
    node, bn, relu6, steps = op.outputs[0], None, [], 0
    while True:
        readers = flow.readers.get(node, [])
        if "the model output" in readers:
            return None, "the tensor reaching the next op is also the model output", relu6
        if len(readers) != 1:
            who = sorted({flow.ops[r].name for r in readers})
            return None, ("its output is never read" if not who else
                          f"the tensor is read by {len(readers)} ops ({', '.join(who)}), not a single next layer"), relu6
        nxt = flow.ops[readers[0]]
        if nxt.inputs != [node]:
            return None, f"{nxt.name} combines it with another tensor", relu6
        m = nxt.module
        if isinstance(m, LAYERS):
            if isinstance(m, nn.Linear) != (not conv) or m.weight.dim() != m1.weight.dim():
                return None, f"{type(m1).__name__} feeds {type(m).__name__} {nxt.name!r} (channel axes differ)", relu6
            if flow.calls.get(nxt.name, 0) != 1:
                return None, f"the next layer {nxt.name!r} is called {flow.calls.get(nxt.name, 0)} times", relu6
            if m1.weight.shape[0] != m.weight.shape[1] * getattr(m, "groups", 1):
                return None, f"{m1.weight.shape[0]} outputs feed {nxt.name!r} with another input width", relu6
            bad = {first, nxt.name} & (flow.outside | shared)
            if bad:
                return None, f"the weights of {sorted(bad)} are shared or read outside the layer", relu6
            return Chain(first, nxt.name, bn), None, relu6
        if len(nxt.outputs) != 1:
            return None, f"{nxt.name} returns several tensors", relu6
        if isinstance(m, _BatchNorm):
            if steps or bn:
                return None, f"BatchNorm {nxt.name!r} is not directly after the layer", relu6
            if flow.calls.get(nxt.name, 0) != 1 or m.running_var is None or not m.affine:
                return None, f"BatchNorm {nxt.name!r} is called twice, has no running statistics or no affine", relu6
            if m.num_features != m1.weight.shape[0] or (not conv and flow.ndim[node] != 2):
                return None, f"BatchNorm {nxt.name!r} normalises another axis than the layer's channels", relu6
            bn = nxt.name
        elif isinstance(m, (nn.ReLU6, nn.Hardtanh)) and m.min_val == 0:
            relu6.append(nxt.name)
        elif m is not None and not isinstance(m, HOMOGENEOUS_MODULES):
            return None, f"{type(m).__name__} {nxt.name!r} is not positively homogeneous", relu6
        elif m is None and nxt.name in RELU6_FUNCS:
            return None, f"functional {nxt.name} (ReLU6) is not positively homogeneous; only ReLU6 modules can " \
                         "be replaced (relu6_to_relu)", relu6
        elif m is None and not (nxt.name in HOMOGENEOUS_FUNCS
                                or (conv and nxt.name in SPATIAL_FUNCS and (nxt.name not in ("pad", "_pad")
                                                                            or _zero_pad(nxt)))
                                or (nxt.name in ("clamp", "clamp_", "clamp_min", "clamp_min_") and _relu_clamp(nxt))):
            return None, f"it reaches {nxt.name} (not a positively homogeneous, channel-preserving op)", relu6
        node, steps = nxt.outputs[0], steps + 1


def find_chains(model: nn.Module, example_input):
    """(chains [Chain] in forward order, skipped {layer: reason}, names of ReLU6 modules that block
    otherwise valid chains, {layer: the BatchNorm that alone reads its output}) from one eval-mode
    forward pass on ``example_input``."""
    flow = _record(model, example_input)
    count: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    shared = {flow.params[i] for i, c in count.items() if c > 1 and i in flow.params}
    chains, skipped, relu6, seen = [], {}, set(), set()
    for op in flow.ops:
        if not isinstance(op.module, LAYERS) or op.name in seen:
            continue
        seen.add(op.name)
        chain, reason, r6 = _follow(flow, op.name, op, shared)
        if chain is not None and r6:
            relu6.update(r6)
            skipped[op.name] = (f"ReLU6 {', '.join(r6)} before {chain.second!r} is not positively homogeneous "
                                "(relu6(x / s) != relu6(x) / s); relu6_to_relu=True replaces it by ReLU")
        elif chain is not None:
            chains.append(chain)
        else:
            skipped[op.name] = reason
    for n, m in model.named_modules():
        if isinstance(m, LAYERS) and n not in seen:
            skipped[n] = "not run by the example forward pass"
    bn_after = {}
    for op in flow.ops:
        readers = flow.readers.get(op.outputs[0], []) if isinstance(op.module, LAYERS) and op.outputs else []
        if len(readers) == 1 and readers[0] != "the model output":
            nxt = flow.ops[readers[0]]
            if (isinstance(nxt.module, _BatchNorm) and flow.calls.get(nxt.name) == 1 and nxt.module.affine
                    and nxt.module.running_var is not None and nxt.module.num_features == op.module.weight.shape[0]):
                bn_after[op.name] = nxt.name
    return chains, skipped, relu6, bn_after
