"""NuSLERP (mergekit's ``nuslerp``): spherical interpolation of two models, or — with a base —
of their task vectors (the result added back to the base), with the interpolation factor
from the two weights, t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6), following
mergekit 0.1.5:

- ``nuslerp_flatten`` (default): each tensor is one vector;
- otherwise each vector along the last dimension (a row), or with ``nuslerp_row_wise``
  each vector along the first dimension (a column of a matrix); a 1-D tensor is one vector.

For vectors v0, v1 with cos θ = ⟨v0/‖v0‖, v1/‖v1‖⟩ (norms clamped at 1e-7):
(sin((1 − t)θ) v0 + sin(tθ) v1) / sin θ, or (1 − t) v0 + t v1 when 1 − cos² θ ≤ 1e-16.
Norms and dot products are float64; whole-tensor and column statistics take one pass
before the output pass, rows are computed block by block.
"""

from __future__ import annotations

import torch

from ..method import WEIGHT, Batch, TensorContext, flag
from .streaming import Inputs, Streamed, column_dots64, gram64, row_dots64


def slerp_coefficients(t: float, n0: torch.Tensor, n1: torch.Tensor, dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) with slerp = c0 v0 + c1 v1, from the squared norms and the dot product (float64)."""
    a, b = n0.sqrt().clamp(min=1e-7), n1.sqrt().clamp(min=1e-7)
    cos = (dot / (a * b)).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return c0, c1


def nuslerp_factor(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _merge(ctx: TensorContext):
    inputs = Inputs(ctx)
    t = nuslerp_factor(ctx.weights())
    flatten, row_wise = bool(ctx.params["nuslerp_flatten"]), bool(ctx.params["nuslerp_row_wise"])
    taus = ctx.has_base
    coef: list[torch.Tensor] = []

    def out(a: int, e: int, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        base = inputs.base(a, e)
        v0, v1 = inputs.vectors(a, e, taus) if base is None else (inputs.tau(0, a, e, base), inputs.tau(1, a, e, base))
        res = v0.mul_(c0.to(v0.dtype).to(v0.device)).add_(v1.mul_(c1.to(v1.dtype).to(v1.device)))
        return res if base is None else res.add_(base)

    if flatten or len(ctx.shape) == 1:
        def prepare() -> None:
            g = torch.from_numpy(gram64(inputs.blocks, lambda a, e: inputs.vectors(a, e, taus, fresh=False)))
            coef.extend(slerp_coefficients(t, g[0, 0], g[1, 1], g[0, 1]))
        return Streamed(ctx.shape, prepare, lambda a, e: out(a, e, *coef), inputs.release)
    if not row_wise:      # each vector along the last dimension
        def rows(a: int, e: int) -> torch.Tensor:
            v0, v1 = inputs.vectors(a, e, taus, fresh=False)
            c0, c1 = slerp_coefficients(t, row_dots64(v0, v0), row_dots64(v1, v1), row_dots64(v0, v1))
            return out(a, e, c0.unsqueeze(-1), c1.unsqueeze(-1))
        return Streamed(ctx.shape, None, rows, inputs.release)

    def prepare_columns() -> None:      # each vector along the first dimension: statistics per column
        sums = None
        for a, e in inputs.blocks:
            v0, v1 = inputs.vectors(a, e, taus, fresh=False)
            part = torch.stack([column_dots64(v0, v0), column_dots64(v1, v1), column_dots64(v0, v1)])
            sums = part if sums is None else sums.add_(part)
        coef.extend(slerp_coefficients(t, sums[0], sums[1], sums[2]))
    return Streamed(ctx.shape, prepare_columns, lambda a, e: out(a, e, *coef), inputs.release)


METHODS = (
    Batch("nuslerp", "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
          "spherical interpolation of two models (or of their task vectors, with a base), t = w2 / (w1 + w2)",
          (WEIGHT, flag("nuslerp_flatten", True, "interpolate whole tensors (else row or column vectors)"),
           flag("nuslerp_row_wise", False, "without flatten: vectors along the first dimension instead of rows")),
          _merge, base="optional", min_models=2, max_models=2),
)
