"""DARE (Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099):
drop each task-vector entry with probability 1 − density and, with ``rescale`` (on by
default), rescale the survivors so the task vector keeps its L1 norm (mergekit 0.1.5's rule;
the paper divides by the density, which is the same in expectation), then combine linearly
(``dare_linear``) or with TIES' sign election (``dare_ties``).

The drop is decided by flat position (:func:`.sparsify.draw_bits`): model i keeps entry e
when u_e = r_e / 2^24 is below the density, r_e the top 24 bits of the e-th output of a
SplitMix64 stream keyed by ``drop_seed(seed, tensor, i)`` (integer arithmetic: numpy on
the CPU, tensor ops on other devices, equal on every device). A merge is
therefore reproducible bit for bit whatever the device, the order tensors are processed in,
and the row blocks the work is split into. The L1 norms are summed over fixed blocks in
float64 in a first pass; the output is streamed in row blocks in a second.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..method import WEIGHT, Batch, TensorContext
from .sparsify import (INT8_MASK, LAMBDA, Sparsify, density_param, drop_seed,  # noqa: F401
                       gta_rows, keep_mask, l1_factor, normalize_param, rescale_param, whole)
from .streaming import as64, sum64


def dare_drop(delta: torch.Tensor, density: float, *, seed: int, tensor_name: str, model_index: int,
              rescale: bool = True, start: int = 0, numel: int | None = None) -> torch.Tensor:
    """DARE's drop of a whole tensor (or of the flat entries ``start..start+delta.numel()`` of a
    tensor with ``numel`` entries). Returns a new tensor.

    Args:
        delta: The task vector (or a contiguous slice of it).
        density: Keep probability in (0, 1]; 1 returns ``delta`` unchanged.
        seed, tensor_name, model_index: Select the seeded draws (module docstring).
        rescale: Multiply the survivors by ‖delta‖₁ / ‖kept‖₁ (of the given entries).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    total = delta.numel() if numel is None else numel
    keep = keep_mask(seed, tensor_name, model_index, total, start, start + delta.numel(), density, delta.device)
    out = delta * keep.view(delta.shape)
    if rescale:
        factor = l1_factor(sum64(as64(delta.abs())), sum64(as64(out.abs())))
        out.mul_(factor) if factor != 1.0 else None
    return out


def _dare(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
          consensus: bool, *, seed: int, tensor_name: str, lam: float, normalize: bool, rescale: bool) -> torch.Tensor:
    return whole([Sparsify("random", float(d)) for d in densities], base, models, weights, consensus=consensus,
                 normalize=normalize, lam=lam, rescale=rescale, seed=seed, name=tensor_name)


def dare_linear(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
                normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ Σ w_i DARE(τ_i) (divided by Σ w_i when ``normalize``)."""
    return _dare(base, models, weights, densities, False, seed=seed, tensor_name=tensor_name, lam=lam,
                 normalize=normalize, rescale=rescale)


def dare_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
              normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ · TIES sign election and disjoint sum of the DARE-dropped task vectors."""
    return _dare(base, models, weights, densities, True, seed=seed, tensor_name=tensor_name, lam=lam,
                 normalize=normalize, rescale=rescale)


# ---- the methods --------------------------------------------------------------------------

def _method(consensus: bool):
    def merge(ctx: TensorContext):
        return gta_rows(ctx, [Sparsify("random", d) for d in ctx.weights("density")], consensus=consensus)
    return merge


_PARAMS = (WEIGHT, density_param(), LAMBDA, normalize_param(False), rescale_param(True), INT8_MASK)

METHODS = (
    Batch("dare_linear", "https://arxiv.org/abs/2311.03099", "random drop + L1 rescale, then a weighted sum",
          _PARAMS, _method(False)),
    Batch("dare_ties", "https://arxiv.org/abs/2311.03099", "random drop + L1 rescale, then TIES' sign election",
          _PARAMS, _method(True)),
)
