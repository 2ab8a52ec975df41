"""Exact product-quantization noise, Quant-Noise mode "pq_exact" (Fan, Stock et al., ICLR 2021; papers.md
Sec. 6a: fairseq's README says dropping blocks "worked as well as assigning those blocks to their
current centroid"; this is the assignment, and at p = 1 the paper's "iPQ + QAT" baseline).

Each output row of the weight is cut into blocks of d elements, exactly as product quantization
cuts it (blocks.py; the codebooks of ``pq_`` share the geometry): block b_i, its current centroid
c(b_i) = argmin_k ||b_i - c_k||^2 (the k-means E-step, kmeans.assign, at every training forward,
without gradient), one M_i ~ Bernoulli(p) per block, and

    W_used,i = c(b_i)  if M_i = 1,   b_i  otherwise;        dL/dW = dL/dW_used   (straight-through)

computed as where(M, C[a] + (W - W.detach()), W), so the selected blocks hold exactly their centroid
(no 1/(1-p) rescaling: a block is replaced, not removed). At p = 1 every block is replaced: the
forward sees the PQ weight C[codes] of the current codebook (right after a converged fit, exactly
what ``pq_`` gives) and the gradient trains the float W, whose blocks move between centroids as in
scalar QAT on a fixed grid.

The centroids C get no gradient: k-means (kmeans.py) on the transform's input (the stored weight
through the transforms before it, e.g. W * M under a pruning mask), fitted when the noise is
attached (``n_iter`` iterations, seed 0, as ``pq_`` with its defaults) and refitted every
``update_every`` optimizer steps by ``st.step(model)`` (``register_step``, search/penalty.py),
warm-started from the current centroids (K stays; fewer than asked when the layer has fewer blocks,
with k-means's warning at the first fit only). C and the step count are buffers, so checkpoints
hold them and a resumed run refreshes on the same schedule; they are state of a training-time
transform and cost nothing (cost.py STATE_ROLES). Identity in eval, like the other modes.

Decisions: the stored weight is never written (as for every mode); the draw M uses torch's global
generator (deterministic under ``torch.manual_seed``; at p = 1 nothing is drawn); the assignment is
recomputed at every forward rather than frozen at the refit (frozen codes would make the forward
blind to W between refits: W would get gradients that change nothing until the next k-means)."""
from __future__ import annotations

import torch
from torch import nn

from ..attach import transform_input
from ..search.penalty import register_step
from .blocks import to_blocks
from .kmeans import assign, kmeans
from .noise import QuantNoiseTransform


def centroid_noise(x: torch.Tensor, p: float, centroids: torch.Tensor, block_size: int) -> torch.Tensor:
    """where(M, C[a] + (x - x.detach()), x): a = the nearest centroid of every block of
    ``block_size`` contiguous elements of each output row (x viewed as (out, -1, block_size)),
    M ~ Bernoulli(p) per block; p = 1: all blocks."""
    with torch.no_grad():
        codes = assign(to_blocks(x.detach(), block_size).float(), centroids.float())
    q = centroids.to(x.dtype).index_select(0, codes).reshape(x.shape)
    ste = q + (x - x.detach())                 # exact C[a] values, gradient 1 to x
    if p >= 1:
        return ste
    rows, n_blocks = x.shape[0], x[0].numel() // block_size
    chosen = torch.rand(rows, n_blocks, 1, device=x.device) < p
    chosen = chosen.expand(rows, n_blocks, block_size).reshape(x.shape)
    return torch.where(chosen, ste, x)


class ExactPQNoise(QuantNoiseTransform):
    """Quant-Noise mode "pq_exact" of one layer (module docstring). Buffers: ``centroids`` (K, d),
    ``steps`` (optimizer steps seen by ``st.step``), ``refreshes`` (refits after the first fit)."""

    def __init__(self, config, block_size: int, layer: str = "", owner: nn.Module | None = None):
        super().__init__(config, block_size, layer, owner)
        self.register_buffer("centroids", torch.zeros(0, block_size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def fit(self, weight: torch.Tensor | None = None) -> float:
        """k-means on the blocks of ``weight`` (default: what this transform receives now), warm-
        started from the current centroids once there are any; returns the k-means objective."""
        w = transform_input(self.owner, self) if weight is None else weight
        x = to_blocks(w.detach(), self.block_size)
        cfg, warm = self.config, self.centroids.shape[0] > 0
        res = kmeans(x, self.centroids.shape[0] if warm else cfg.exact("n_centroids"), cfg.exact("n_iter"),
                     seed=0, what=f"QuantNoise layer {self.layer!r}", init=self.centroids if warm else None)
        self.centroids = res.centroids.to(w.dtype)
        self.refreshes += int(warm)
        return res.objective[-1]

    @torch.no_grad()
    def after_step(self) -> bool:
        """One optimizer step: steps += 1, and a refit when steps is a multiple of ``update_every``."""
        self.steps += 1
        if int(self.steps) % self.config.exact("update_every"):
            return False
        self.fit()
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.quiet:
            return x
        if self.centroids.shape[0] == 0:
            raise RuntimeError(f"QuantNoise layer {self.layer!r}: the pq_exact codebook is not fitted "
                               "(attach with st.quant_noise_)")
        return centroid_noise(x, self.config.p, self.centroids, self.block_size)

    def extra_repr(self) -> str:
        c = self.config
        return (f"mode=pq_exact, p={c.p:g}, block_size={self.block_size}, n_centroids={self.centroids.shape[0]}, "
                f"update_every={c.exact('update_every')}")


def exact_noise_layers(model: nn.Module):
    """Yield every ExactPQNoise transform of ``model``."""
    return (t for t in model.modules() if isinstance(t, ExactPQNoise))


def refresh_quant_noise_(model: nn.Module) -> int:
    """Refit every "pq_exact" codebook of ``model`` now (k-means on the current weights, warm
    start); returns how many were refitted."""
    ts = list(exact_noise_layers(model))
    for t in ts:
        t.fit()
    return len(ts)


def advance_noise_(model: nn.Module) -> None:
    """Registered with ``st.step``: each "pq_exact" codebook counts the step and refits on schedule."""
    for t in exact_noise_layers(model):
        t.after_step()


register_step(advance_noise_)

__all__ = ["ExactPQNoise", "centroid_noise", "exact_noise_layers", "refresh_quant_noise_", "advance_noise_"]
