"""TIES merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
Models", https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint mean — with
mergekit's semantics (sign elected by the sum of the weighted, trimmed task vectors; ties
go to +; the divisor is the sum of the weights of the agreeing models; ``rescale`` keeps
each trimmed task vector's L1 norm).

Trimming keeps the ``k = max(1, int(density · numel))`` entries of largest float32
magnitude. Entries whose magnitude equals the k-th largest (common: task vectors of bf16
checkpoints take few distinct values) are kept lowest flat index first — the order a
stable descending sort gives. The threshold is found by a two-level radix selection on
the float32 bit patterns (:mod:`.select`), O(numel) with no sort, on a stream of chunks, so
a tensor larger than memory allows is trimmed in row blocks (:class:`.sparsify.GtaRows`,
the family's shared computation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch

from ..method import WEIGHT, Batch, TensorContext
from .select import magnitude_threshold  # noqa: F401  (TIES' threshold, re-exported)
from .sparsify import (INT8_MASK, LAMBDA, GtaRows, Sparsify, density_param,  # noqa: F401
                       gta_rows, kept_count, l1_factor, normalize_param, rescale_param, row_inputs,
                       ties_combine_weighted)

TIE_RULES = ("index", "argsort")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest.

    ``k = max(1, int(density · numel))`` entries are kept (at least one, as in mergekit);
    equal magnitudes at the threshold are kept lowest flat index first (module docstring).
    Returns a new tensor.
    """
    return trim_(delta.clone(), density)


def trim_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`trim` in place (``delta`` is overwritten and returned)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    flat = delta.view(-1)
    mag = flat.abs().float()
    threshold = magnitude_threshold(lambda: [mag], kept_count(density, flat.numel()))
    del mag
    threshold.keeper().apply_(flat)
    return delta


def trim_argsort_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`trim_` with mergekit 0.1.5's choice among equal magnitudes: the first k entries of
    ``torch.argsort(|τ|, descending=True)`` (not stable on CPU: unspecified, but the same as
    mergekit on the same torch). A sort per tensor: slower, and the whole tensor in memory."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    flat = delta.view(-1)
    order = torch.argsort(flat.abs().float(), descending=True)
    flat[order[kept_count(density, flat.numel()):]] = 0
    return delta


def l1_rescale_(trimmed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """mergekit's ``rescale``: ``trimmed`` (in place) times ‖original‖₁ / ‖trimmed‖₁ (float64 sums)."""
    from .streaming import as64, sum64

    factor = l1_factor(sum64(as64(original.abs())), sum64(as64(trimmed.abs())))
    return trimmed.mul_(factor) if factor != 1.0 else trimmed


def ties_streamed(base: torch.Tensor, load: Callable[[int], torch.Tensor], n: int, weights: Sequence[float],
                  densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
                  sparsify: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None,
                  rescale: bool = False) -> torch.Tensor:
    """:func:`ties` reading model ``i`` with ``load(i)`` (a fresh tensor it may overwrite), one at a time."""
    sparsify = sparsify or (lambda d, dens, i: trim_(d, dens))
    weighted = []
    for i in range(n):
        d = load(i).sub_(base)
        full = d.clone() if rescale and float(densities[i]) < 1 else None
        d = sparsify(d, float(densities[i]), i)
        if full is not None:
            d = l1_rescale_(d, full)
        weighted.append(d.mul_(float(weights[i])))
    mixed = ties_combine_weighted(weighted, weights, normalize)
    del weighted
    return mixed.mul_(lam).add_(base)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
         sparsify: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None,
         rescale: bool = False) -> torch.Tensor:
    """θ0 + λ · TIES(τ_1..τ_n).

    Args:
        base: θ0.
        models: θ_i.
        weights: w_i.
        densities: Fraction of each τ_i kept.
        lam: Global scale λ.
        normalize: Disjoint mean (on by default, as in mergekit).
        sparsify: ``sparsify(delta, density, model_index)``; magnitude trimming by default.
        rescale: Keep each trimmed τ_i's L1 norm (mergekit's ``rescale``).
    """
    return ties_streamed(base, lambda i: models[i].clone(), len(models), weights, densities, lam, normalize, sparsify,
                         rescale)


def TiesRows(shape: Sequence[int], base_rows: Callable[[int, int], torch.Tensor],
             model_rows: Callable[[int, int, int], torch.Tensor], n: int, weights: Sequence[float],
             densities: Sequence[float], lam: float = 1.0, normalize: bool = True, rescale: bool = False) -> GtaRows:
    """TIES of one tensor of ``shape`` produced in row blocks: ``rows(a, e)`` returns
    θ0 + λ · TIES(τ) for rows ``[a, e)`` (the engine's ``OutputTensor.rows`` interface)."""
    return GtaRows(row_inputs(shape, base_rows, model_rows, n), [Sparsify("magnitude", float(d)) for d in densities],
                   weights, consensus=True, normalize=normalize, lam=lam, rescale=rescale, seed=0, name="tensor")


# ---- the method ---------------------------------------------------------------------------

def _merge(ctx: TensorContext):
    if ctx.options.get("trim_ties") == "argsort":
        p = ctx.params
        return ties_streamed(ctx.base(), ctx.model, ctx.n, ctx.weights(), ctx.weights("density"), float(p["lambda"]),
                             bool(p["normalize"]), sparsify=lambda d, dens, i: trim_argsort_(d, dens),
                             rescale=bool(p["rescale"]))
    return gta_rows(ctx, [Sparsify("magnitude", d) for d in ctx.weights("density")], consensus=True)


METHODS = (
    # normalize divides by the weights, so tune searches the overall scale through lambda
    Batch("ties", "https://arxiv.org/abs/2306.01708", "trim each task vector, elect signs, disjoint mean",
          (WEIGHT, density_param(), replace(LAMBDA, search=(0.5, 2.0)), normalize_param(True), rescale_param(False),
           INT8_MASK), _merge),
)
