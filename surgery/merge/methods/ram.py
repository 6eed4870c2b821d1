"""Reinforced Agent Merging (RAM, https://arxiv.org/abs/2601.13572), with mergekit 0.1.5's
semantics: an entry of a task vector counts as changed when |τ| > ``epsilon``. Entries changed
by exactly one model take that model's value (``ramplus_tl``: times λ_i), entries changed by
several take their mean, unchanged ones stay at the base.

``ramplus_tl`` (RAM+, tensor-local): per model and tensor, ρ_i = (entries model i shares
with another model) / max(entries only model i changed, epsilon), and
λ_i = 1 + r · clamp(ρ_i, 0, alpha) rescales its unique entries. The counts are whole-tensor
statistics, so RAM+ makes a counting pass before the output pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..method import Batch, Param, TensorContext
from .streaming import Inputs, Streamed

EPSILON = Param("epsilon", 1e-5, low=0.0, help="|τ| above this counts as a change")


def ram_block(base: torch.Tensor, taus: Sequence[torch.Tensor], epsilon: float,
              lambdas: Sequence[float] | None = None) -> torch.Tensor:
    """θ0 + Σ_i (τ_i on its unique entries, · λ_i) + (τ_i on shared entries) / (models changing it).

    Summed in model order, each model adding τ_i / c (c: how many models changed the entry; τ_i
    itself where c = 1, times λ_i) or 0: the bytes of mergekit's masked products, in fewer passes."""
    active = [t.abs() > epsilon for t in taus]
    counts = active[0].to(base.dtype)
    for a in active[1:]:
        counts.add_(a)
    unique = counts == 1 if lambdas is not None else None
    shared = counts.clamp_(min=1)
    merged = torch.zeros_like(base)
    for i, (t, a) in enumerate(zip(taus, active)):
        part = t / shared
        if unique is not None and lambdas[i] != 1.0:
            part = torch.where(unique, t * lambdas[i], part)
        merged.add_(part.masked_fill_(a.logical_not_(), 0))
    return merged.add_(base)


def ramplus_lambdas(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float,
                    epsilon: float) -> list[float]:
    """λ_i = 1 + r · clamp(shared_i / max(unique_i, epsilon), 0, alpha), in mergekit's float32."""
    rho = torch.tensor(list(shared)) / torch.tensor(list(unique)).clamp(min=epsilon)
    return [float(x) for x in 1 + r * rho.clamp(min=0, max=alpha)]


def _ram(ctx: TensorContext) -> torch.Tensor:
    base = ctx.base()
    return ram_block(base, [ctx.tau(i) for i in range(ctx.n)], float(ctx.params["epsilon"]))


def _ramplus(ctx: TensorContext) -> Streamed:
    p = ctx.params
    eps = float(p["epsilon"])
    inputs = Inputs(ctx)
    lambdas: list[float] = []

    def prepare() -> None:
        shared, unique = [0] * ctx.n, [0] * ctx.n
        for a, e in inputs.blocks:
            active = [t.abs_() > eps for t in inputs.vectors(a, e, taus=True)]
            counts = active[0].to(torch.int16)
            for act in active[1:]:
                counts.add_(act)
            many, one = counts > 1, counts == 1
            for i, act in enumerate(active):
                shared[i] += int(torch.count_nonzero(act & many))
                unique[i] += int(torch.count_nonzero(act & one))
        lambdas.extend(ramplus_lambdas(shared, unique, float(p["r"]), float(p["alpha"]), eps))

    def produce(a: int, e: int) -> torch.Tensor:
        base = inputs.base(a, e)
        return ram_block(base, [inputs.tau(i, a, e, base) for i in range(ctx.n)], eps, lambdas)

    return Streamed(ctx.shape, prepare, produce, inputs.release)


_PAPER = "https://arxiv.org/abs/2601.13572"

METHODS = (
    Batch("ram", _PAPER, "unique changes kept, shared changes averaged", (EPSILON,), _ram, elementwise=True),
    Batch("ramplus_tl", _PAPER, "RAM with each model's unique changes rescaled by its shared/unique ratio (per tensor)",
          (Param("r", 0.1, low=0.0, help="rescaling strength"),
           Param("alpha", 0.2, low=0.0, help="bound of the shared/unique ratio"), EPSILON), _ramplus),
)
