"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522), with mergekit 0.1.5's semantics: with cos the mean
pairwise cosine between the models' task vectors τ_i = θ_i − θ0 (each norm product clamped
at 1e-6, each cosine to [−1, 1]) and n models,

    t = n cos / (1 + (n − 1) cos),     output = t · mean_i θ_i + (1 − t) · θ0

(t = 0, the base, when |1 + (n − 1) cos| < 1e-6). The cosines are over whole flattened
tensors — a Gram matrix of the task vectors from one float64 pass, then an output pass — or,
with ``filter_wise``, over each row (each vector along the last dimension; a 1-D tensor is
one row), computed block by block.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from ..method import Batch, TensorContext, flag
from .streaming import Inputs, Streamed, gram64, row_dots64


def interpolation(cosines: torch.Tensor, n: int) -> torch.Tensor:
    """t = n cos / (1 + (n − 1) cos), 0 where the denominator is below 1e-6 in magnitude."""
    denominator = 1 + (n - 1) * cosines
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cosines), n * cosines / torch.where(singular, 1.0, denominator))


def mean_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine from Gram entries ``gram[..., i, j]`` (float64; norms clamped as mergekit)."""
    n = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0))
    cos = [(gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1)
           for i, j in itertools.combinations(range(n), 2)]
    return torch.stack(cos).mean(0)


def stock(base: torch.Tensor, models: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """t · mean(models) + (1 − t) · base (``t`` broadcast: a scalar or one value per row)."""
    average = models[0] + models[1] if len(models) > 1 else models[0].clone()
    for m in models[2:]:
        average.add_(m)
    return average.div_(len(models)).mul_(t).add_((1 - t) * base)      # in place: the same bytes, fewer buffers


def _filter_wise_block(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    taus = [m - base for m in models]
    n = len(models)
    g = torch.empty((*base.shape[:-1], n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g[..., i, j] = g[..., j, i] = row_dots64(taus[i], taus[j])
    t = interpolation(mean_cosine(g), n).to(base.dtype).to(base.device).unsqueeze(-1)
    return stock(base, models, t)


def _merge(ctx: TensorContext):
    inputs = Inputs(ctx)
    n = ctx.n
    if bool(ctx.params["filter_wise"]):
        if len(ctx.shape) == 1:       # one filter: the whole vector
            base = inputs.base(0, ctx.shape[0])
            return _filter_wise_block(base.unsqueeze(0), [inputs.model(i, 0, ctx.shape[0]).unsqueeze(0)
                                                         for i in range(n)]).squeeze(0)

        def rows(a: int, e: int) -> torch.Tensor:
            return _filter_wise_block(inputs.base(a, e), [inputs.model(i, a, e) for i in range(n)])
        return Streamed(ctx.shape, None, rows, inputs.release)
    t: list[float] = []

    def prepare() -> None:
        g = torch.from_numpy(gram64(inputs.blocks, lambda a, e: inputs.vectors(a, e, taus=True)))
        t.append(float(interpolation(mean_cosine(g), n)))

    def produce(a: int, e: int) -> torch.Tensor:
        return stock(inputs.base(a, e), [inputs.model_view(i, a, e) for i in range(n)], torch.tensor(t[0]))
    return Streamed(ctx.shape, prepare, produce, inputs.release)


METHODS = (
    Batch("model_stock", "https://arxiv.org/abs/2403.19522",
          "interpolate between the base and the models' mean by their task vectors' mean cosine",
          (flag("filter_wise", False, "one interpolation factor per row instead of per tensor"),), _merge,
          min_models=2),
)
