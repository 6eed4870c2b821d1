"""Linear merge: the weighted average of the models (Wortsman et al. 2022, "Model soups",
https://arxiv.org/abs/2203.05482), with mergekit's semantics."""

from __future__ import annotations

from typing import Sequence

import torch

from ...core.errors import UsageError
from ..method import WEIGHT, Batch, TensorContext, flag


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Σ w_i x_i, divided by Σ w_i when ``normalize``.

    Args:
        tensors: One tensor per model, same shape.
        weights: One weight per model.
        normalize: Divide by the sum of the weights (mergekit's default).

    Returns:
        The merged tensor in float32 (float64 if the inputs are float64).

    Raises:
        UsageError: ``normalize`` with weights that sum to zero.
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for x, w in zip(tensors, weights):
        out.add_(x.to(dtype), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-12:
            raise UsageError("linear merge weights sum to zero; change the weights (`weight`) or turn `normalize` off.")
        out.div_(total)
    return out


def _merge(ctx: TensorContext) -> torch.Tensor:
    return linear([ctx.model(i) for i in range(ctx.n)], ctx.weights(), bool(ctx.params["normalize"]))


METHODS = (
    Batch("linear", "https://arxiv.org/abs/2203.05482", "weighted average of the models (model soups)",
          (WEIGHT, flag("normalize", True, "divide by the sum of the weights")), _merge, elementwise=True,
          base="ignored"),
)
