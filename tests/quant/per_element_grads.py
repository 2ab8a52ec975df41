"""Test helper: Q(x) and, per element i, dQ_i/dtheta for every quantizer parameter and dQ_i/dx_i."""
import torch


def per_element_grads(q, x):
    x = x.clone().requires_grad_(True)
    y = q(x)
    names = [n for n, _ in q.named_parameters()]
    params = [p for _, p in q.named_parameters()]
    grads = {n: torch.zeros_like(x) for n in names + ["x"]}
    for i in range(x.numel()):
        gs = torch.autograd.grad(y[i], params + [x], retain_graph=True, allow_unused=True)
        for n, g in zip(names + ["x"], gs):
            if g is not None:
                grads[n][i] = g[i] if n == "x" else g
    return y.detach(), grads
