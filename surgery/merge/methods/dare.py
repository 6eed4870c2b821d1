"""DARE (Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099):
drop each task-vector entry with probability 1 − density and rescale the survivors by
1/density, then combine linearly (``dare_linear``) or with TIES (``dare_ties``).

The drop is decided per chunk of :data:`DRAW_CHUNK` consecutive entries of the flattened
tensor: chunk j of model i keeps entry e when the e-th float64 of
``torch.rand(len_j, generator=Generator().manual_seed(drop_seed(seed, tensor, i, j)))`` is
below the density (drawn on the CPU). A merge is therefore reproducible bit for bit
whatever the device, the order tensors are processed in, and the row blocks the work is
split into — which lets DARE stream in row blocks like the elementwise methods.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from ..method import WEIGHT, Batch, TensorContext, flag
from .task_arithmetic import INT8_MASK, LAMBDA
from .ties import density_param, ties_combine_weighted

DRAW_CHUNK = 1 << 16   # entries per seeded draw


def drop_seed(seed: int, tensor_name: str, model_index: int, chunk: int = 0) -> int:
    """A 63-bit generator seed from the user seed, the tensor name, the model index and the chunk."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(seed: int, tensor_name: str, model_index: int, numel: int, start: int, stop: int,
              density: float) -> torch.Tensor:
    """Which of the flat entries ``[start, stop)`` of a tensor with ``numel`` entries DARE keeps
    (bool, on the CPU); the chunks overlapping the range are drawn whole and sliced."""
    out = torch.empty(stop - start, dtype=torch.bool)
    j = start // DRAW_CHUNK
    while j * DRAW_CHUNK < stop:
        a, e = j * DRAW_CHUNK, min(numel, (j + 1) * DRAW_CHUNK)
        g = torch.Generator().manual_seed(drop_seed(seed, tensor_name, model_index, j))
        draw = torch.rand(e - a, generator=g, dtype=torch.float64)
        lo, hi = max(a, start), min(e, stop)
        out[lo - start:hi - start] = draw[lo - a:hi - a] < density
        j += 1
    return out


def dare_drop_(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool = True) -> torch.Tensor:
    """Zero the entries ``keep`` (same number of entries, any device) drops, divide the rest by
    ``density`` when ``rescale``; in place."""
    flat = delta.view(-1)
    flat.masked_fill_(keep.to(flat.device).logical_not_(), 0)
    return flat.div_(density).view(delta.shape) if rescale else delta


def dare_drop(delta: torch.Tensor, density: float, *, seed: int, tensor_name: str, model_index: int,
              rescale: bool = True, start: int = 0, numel: int | None = None) -> torch.Tensor:
    """DARE's drop of a whole tensor (or of the flat entries ``start..start+delta.numel()`` of a
    tensor with ``numel`` entries). Returns a new tensor.

    Args:
        delta: The task vector (or a contiguous slice of it).
        density: Keep probability in (0, 1]; 1 returns ``delta`` unchanged.
        seed, tensor_name, model_index: Select the seeded draws (module docstring).
        rescale: Divide the survivors by ``density`` (the DARE paper's rescale).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    total = delta.numel() if numel is None else numel
    keep = keep_mask(seed, tensor_name, model_index, total, start, start + delta.numel(), density)
    return dare_drop_(delta.clone(), keep, density, rescale)


def _combine(base: torch.Tensor, taus: list[torch.Tensor], weights: Sequence[float], lam: float, normalize: bool,
             consensus: bool) -> torch.Tensor:
    if consensus:
        mixed = ties_combine_weighted([t.mul_(float(w)) for t, w in zip(taus, weights)], weights, normalize)
    else:
        mixed = torch.zeros_like(base)
        for t, w in zip(taus, weights):
            mixed.add_(t, alpha=float(w))
        if normalize:
            total = float(sum(weights))
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    return mixed.mul_(lam).add_(base)


def dare_linear(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
                normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ Σ w_i DARE(τ_i) (divided by Σ w_i when ``normalize``)."""
    return dare_block(base, lambda i: models[i].clone(), len(models), weights, densities, seed=seed,
                      tensor_name=tensor_name, numel=base.numel(), start=0, lam=lam, normalize=normalize,
                      rescale=rescale)


def dare_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
              normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """θ0 + λ · TIES sign election and disjoint sum of the DARE-dropped task vectors."""
    return dare_block(base, lambda i: models[i].clone(), len(models), weights, densities, seed=seed,
                      tensor_name=tensor_name, numel=base.numel(), start=0, lam=lam, normalize=normalize,
                      rescale=rescale, consensus=True)


def dare_block(base: torch.Tensor, model: Callable[[int], torch.Tensor], n: int, weights: Sequence[float],
               densities: Sequence[float], *, seed: int, tensor_name: str, numel: int, start: int,
               lam: float = 1.0, normalize: bool = False, rescale: bool = True,
               consensus: bool = False) -> torch.Tensor:
    """DARE of the flat entries ``start .. start + base.numel()`` of a tensor with ``numel``
    entries: the drop is elementwise given the seeded draws, so any blocking gives the same
    merge. ``model(i)`` returns a fresh float32 copy of model i's entries of the block."""
    taus = []
    for i in range(n):
        tau = model(i).sub_(base)
        dens = float(densities[i])
        if dens < 1:
            keep = keep_mask(seed, tensor_name, i, numel, start, start + tau.numel(), dens)
            dare_drop_(tau, keep, dens, rescale)
        taus.append(tau)
    return _combine(base, taus, weights, lam, normalize, consensus)


# ---- the methods --------------------------------------------------------------------------

def _method(consensus: bool):
    def merge(ctx: TensorContext) -> torch.Tensor:
        p = ctx.params
        return dare_block(ctx.base(), ctx.model, ctx.n, ctx.weights(), ctx.weights("density"), seed=ctx.seed,
                          tensor_name=ctx.name, numel=ctx.numel, start=ctx.flat_offset, lam=float(p["lambda"]),
                          normalize=bool(p["normalize"]), rescale=bool(p["rescale"]), consensus=consensus)
    return merge


_PARAMS = (WEIGHT, density_param(), LAMBDA, flag("normalize", False, "divide by the sum of the weights"),
           flag("rescale", True, "divide the surviving entries by the density"), INT8_MASK)

METHODS = (
    Batch("dare_linear", "https://arxiv.org/abs/2311.03099", "random drop + rescale, then a weighted sum",
          _PARAMS, _method(False), elementwise=True),
    Batch("dare_ties", "https://arxiv.org/abs/2311.03099", "random drop + rescale, then TIES' sign election",
          _PARAMS, _method(True), elementwise=True),
)
