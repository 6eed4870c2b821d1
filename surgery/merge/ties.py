"""TIES merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
Models", https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint mean — with
mergekit's semantics (sign elected by the sum of the weighted, trimmed task vectors; ties
go to +; the divisor is the sum of the weights of the agreeing models)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


CHUNK = 1 << 23   # elementwise steps run over flat chunks (32 MB in float32): no whole-tensor temporaries


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest.

    ``k = max(1, int(density · numel))`` entries are kept (at least one, as in mergekit).
    Equal magnitudes at the threshold are broken the way ``torch.argsort`` orders them, the
    same call mergekit makes, so the two agree entry for entry on the same float32 input
    (bf16 task vectors have many equal magnitudes). Returns a new tensor.
    """
    return trim_(delta.clone(), density)


def trim_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`trim` in place (``delta`` is overwritten and returned)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    flat = delta.view(-1)
    keep = torch.argsort(flat.abs().float(), descending=True)[:k]
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[keep] = False
    del keep
    flat.masked_fill_(mask, 0)
    return delta


def elect_sign(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sign (+1/−1) of Σ of the weighted trimmed task vectors per element (0 counts as +)."""
    total = torch.zeros_like(weighted[0])
    for w in weighted:
        total.add_(w)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def ties_combine_weighted(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Sign election plus disjoint (weighted) mean of already sparsified and weighted task vectors.

    Args:
        weighted: w_i · sparsified τ_i.
        weights: w_i.
        normalize: Divide by the sum of the weights of the models agreeing with the elected
            sign at each element (1 where none agrees).
    """
    shape = weighted[0].shape
    flats = [w.reshape(-1) for w in weighted]
    out = torch.empty_like(flats[0])
    for a in range(0, out.numel(), CHUNK):
        parts = [f[a:a + CHUNK] for f in flats]
        sign = elect_sign(parts)
        mixed = out[a:a + CHUNK].zero_()
        divisor = torch.zeros_like(mixed)
        for wd, w in zip(parts, weights):
            agree = wd * sign > 0          # nonzero and of the elected sign
            mixed.add_(wd.where(agree, 0.0))
            divisor.add_(agree.to(divisor.dtype), alpha=float(w))
        if normalize:
            divisor.masked_fill_(divisor == 0, 1.0)
            mixed.div_(divisor)
    return out.view(shape)


def ties_combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Sign election plus disjoint mean of sparsified (unweighted) task vectors."""
    return ties_combine_weighted([d * float(w) for d, w in zip(deltas, weights)], weights, normalize)


def ties_streamed(base: torch.Tensor, load: Callable[[int], torch.Tensor], n: int, weights: Sequence[float],
                  densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
                  sparsify: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`ties` reading model ``i`` with ``load(i)`` (a fresh tensor it may overwrite), one at a time."""
    sparsify = sparsify or (lambda d, dens, i: trim_(d, dens))
    weighted = []
    for i in range(n):
        d = load(i).sub_(base)
        d = sparsify(d, float(densities[i]), i)
        weighted.append(d.mul_(float(weights[i])))
    mixed = ties_combine_weighted(weighted, weights, normalize)
    del weighted
    return mixed.mul_(lam).add_(base)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
         sparsify: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None) -> torch.Tensor:
    """θ0 + λ · TIES(τ_1..τ_n).

    Args:
        base: θ0.
        models: θ_i.
        weights: w_i.
        densities: Fraction of each τ_i kept.
        lam: Global scale λ.
        normalize: Disjoint mean (on by default, as in mergekit).
        sparsify: ``sparsify(delta, density, model_index)``; magnitude trimming by default
            (DARE passes its random drop here).
    """
    return ties_streamed(base, lambda i: models[i].clone(), len(models), weights, densities, lam, normalize, sparsify)
