"""DARE (Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099):
drop each task-vector entry with probability 1 − density and rescale the survivors by
1/density, then combine linearly (``dare_linear``) or with TIES (``dare_ties``).

The drop is seeded per (seed, tensor name, model index) on the CPU, so a merge is
reproducible bit for bit, whatever the device and the order tensors are processed in.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from .ties import ties_streamed


def drop_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A 63-bit generator seed derived from the user seed, the tensor name and the model index."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability ``density`` (a uniform draw below it) and divide survivors by it.

    Args:
        delta: The task vector.
        density: Keep probability in (0, 1]; 1 returns ``delta`` unchanged.
        generator: A CPU generator (the draw happens on the CPU, then moves to ``delta``'s device).
        rescale: Divide the survivors by ``density`` (the DARE paper's rescale).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = (torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density).to(delta.device)
    out = delta * keep.to(delta.dtype)
    return out / density if rescale else out


def dare_streamed(base: torch.Tensor, load: Callable[[int], torch.Tensor], n: int, weights: Sequence[float],
                  densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
                  normalize: bool = False, rescale: bool = True, consensus: bool = False) -> torch.Tensor:
    """DARE reading model ``i`` with ``load(i)``, one at a time; TIES' sign election when ``consensus``."""
    def drop(d: torch.Tensor, density: float, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(drop_seed(seed, tensor_name, i))
        return dare_drop(d, density, g, rescale)

    if consensus:
        return ties_streamed(base, load, n, weights, densities, lam, normalize, sparsify=drop)
    out = torch.zeros_like(base)
    for i in range(n):
        out.add_(drop(load(i).sub_(base), float(densities[i]), i), alpha=float(weights[i]))
    if normalize:
        total = float(sum(weights))
        out.div_(total if abs(total) >= 1e-8 else 1.0)
    return out.mul_(lam).add_(base)


def dare_linear(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
                normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ Σ w_i DARE(τ_i) (divided by Σ w_i when ``normalize``)."""
    return dare_streamed(base, lambda i: models[i].clone(), len(models), weights, densities, seed=seed,
                         tensor_name=tensor_name, lam=lam, normalize=normalize, rescale=rescale)


def dare_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
              normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ · TIES sign election and disjoint sum of the DARE-dropped task vectors."""
    return dare_streamed(base, lambda i: models[i].clone(), len(models), weights, densities, seed=seed,
                         tensor_name=tensor_name, lam=lam, normalize=normalize, rescale=rescale, consensus=True)
