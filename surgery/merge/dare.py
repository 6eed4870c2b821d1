"""DARE (Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099):
drop each task-vector entry with probability 1 − density and rescale the survivors by
1/density, then combine linearly (``dare_linear``) or with TIES (``dare_ties``).

The drop is decided per chunk of :data:`DRAW_CHUNK` consecutive entries of the flattened
tensor: chunk j of model i keeps entry e when the e-th float64 of
``torch.rand(len_j, generator=Generator().manual_seed(drop_seed(seed, tensor, i, j)))`` is
below the density (drawn on the CPU). A merge is therefore reproducible bit for bit
whatever the device, the order tensors are processed in, and the row blocks the work is
split into — which lets DARE stream in row blocks like the other methods (:class:`DareRows`).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from ..core.engine import rows_in_blocks
from .ties import SUB_ELEMENTS, ties_combine_weighted

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


def dare_streamed(base: torch.Tensor, load: Callable[[int], torch.Tensor], n: int, weights: Sequence[float],
                  densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0,
                  normalize: bool = False, rescale: bool = True, consensus: bool = False) -> torch.Tensor:
    """DARE of one whole tensor, reading model ``i`` with ``load(i)``; TIES' sign election when ``consensus``."""
    taus = [dare_drop(load(i).sub_(base), float(densities[i]), seed=seed, tensor_name=tensor_name, model_index=i,
                      rescale=rescale) for i in range(n)]
    return _combine(base, taus, weights, lam, normalize, consensus)


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


class DareRows:
    """DARE of one tensor of shape ``shape`` in row blocks: ``rows(a, e)`` returns θ0 + λ · the
    combined dropped task vectors for rows ``[a, e)``, a few rows at a time (the drop is
    elementwise given the seeded draws, so nothing whole-tensor is ever held).

    Args:
        shape: The tensor's shape (at least 1-D).
        base_rows: ``base_rows(a, e)``: float32 rows of θ0.
        model_rows: ``model_rows(i, a, e)``: a fresh float32 copy of rows of θ_i.
        n, weights, densities, seed, tensor_name, lam, normalize, rescale: As in :func:`dare_streamed`.
        consensus: TIES' sign election and disjoint sum (``dare_ties``) instead of the weighted sum.
    """

    def __init__(self, shape: Sequence[int], base_rows: Callable[[int, int], torch.Tensor],
                 model_rows: Callable[[int, int, int], torch.Tensor], n: int, weights: Sequence[float],
                 densities: Sequence[float], *, seed: int, tensor_name: str, lam: float = 1.0, normalize: bool = False,
                 rescale: bool = True, consensus: bool = False):
        self.shape = tuple(shape)
        self.row_elems = 1
        for s in self.shape[1:]:
            self.row_elems *= s
        self.numel = self.shape[0] * self.row_elems
        self.base_rows, self.model_rows, self.n = base_rows, model_rows, n
        self.weights, self.densities = [float(w) for w in weights], [float(d) for d in densities]
        self.seed, self.name, self.lam = seed, tensor_name, float(lam)
        self.normalize, self.rescale, self.consensus = bool(normalize), bool(rescale), bool(consensus)

    def _block(self, s: int, t: int) -> torch.Tensor:
        base = self.base_rows(s, t)
        taus = []
        for i in range(self.n):
            tau = self.model_rows(i, s, t).sub_(base)
            dens = self.densities[i]
            if dens <= 0:
                tau.zero_()
            elif dens < 1:
                keep = keep_mask(self.seed, self.name, i, self.numel, s * self.row_elems, t * self.row_elems, dens)
                dare_drop_(tau, keep, dens, self.rescale)
            taus.append(tau)
        return _combine(base, taus, self.weights, self.lam, self.normalize, self.consensus)

    def __call__(self, a: int, e: int) -> torch.Tensor:
        return rows_in_blocks(self.shape, a, min(e, self.shape[0]), SUB_ELEMENTS, self._block)
