"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic",
https://arxiv.org/abs/2212.04089): θ0 + λ Σ w_i τ_i, with mergekit's semantics."""

from __future__ import annotations

from typing import Sequence

import torch

from ..method import WEIGHT, Batch, Param, TensorContext, flag


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Σ w_i δ_i, divided by Σ w_i when ``normalize`` (a sum near zero divides by 1, as mergekit does).

    Each product w_i δ_i is rounded before the sum, in model order, as mergekit does, so entries
    whose sum cancels to about zero round the same way in both. The deltas are scaled in place
    (callers pass fresh tensors).
    """
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d.mul_(float(w)))
    if normalize:
        total = float(sum(weights))
        out.div_(total if abs(total) >= 1e-8 else 1.0)
    return out


def task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                    lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """θ0 + λ Σ w_i (θ_i − θ0) (divided by Σ w_i when ``normalize``).

    Args:
        base: θ0 (float32 or float64).
        models: θ_i, one per model.
        weights: w_i.
        lam: Global scale λ (mergekit's ``lambda``).
        normalize: Divide by Σ w_i (off by default, as in mergekit).
    """
    deltas = [m - base for m in models]
    return base + lam * combine(deltas, weights, normalize)


LAMBDA = Param("lambda", 1.0, help="scale of the merged task vector")
INT8_MASK = flag("int8_mask", False, "mergekit's memory option for masks; accepted, no effect on the result")


def _merge(ctx: TensorContext) -> torch.Tensor:
    base = ctx.base()
    mixed = combine([ctx.tau(i) for i in range(ctx.n)], ctx.weights(), bool(ctx.params["normalize"]))
    lam = float(ctx.params["lambda"])
    return (mixed.mul_(lam) if lam != 1.0 else mixed).add_(base)


METHODS = (
    Batch("task_arithmetic", "https://arxiv.org/abs/2212.04089", "θ0 + λ Σ w_i τ_i",
          (WEIGHT, LAMBDA, flag("normalize", False, "divide by the sum of the weights"), INT8_MASK), _merge,
          elementwise=True),
)
