"""DARE (Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099):
drop each task-vector entry with probability 1 − density and rescale the survivors by
1/density, then combine linearly (``dare_linear``) or with TIES (``dare_ties``).

The drop is seeded per (seed, tensor name, model index) on the CPU, so a merge is
reproducible bit for bit, whatever the device and the order tensors are processed in.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .task_arithmetic import combine
from .ties import ties_combine


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


def _dropped(base, models, densities, seed, tensor_name, rescale):
    out = []
    for i, (m, dens) in enumerate(zip(models, densities)):
        g = torch.Generator().manual_seed(drop_seed(seed, tensor_name, i))
        out.append(dare_drop(m - base, dens, g, rescale))
    return out


def dare_linear(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
                normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ Σ w_i DARE(τ_i) (divided by Σ w_i when ``normalize``)."""
    deltas = _dropped(base, models, densities, seed, tensor_name, rescale)
    return base + lam * combine(deltas, weights, normalize)


def dare_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
              normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ · TIES sign election and disjoint sum of the DARE-dropped task vectors."""
    deltas = _dropped(base, models, densities, seed, tensor_name, rescale)
    return base + lam * ties_combine(deltas, weights, normalize)
