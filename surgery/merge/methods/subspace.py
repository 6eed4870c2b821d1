"""Linear algebra shared by the subspace merge methods (TSV-M, Iso-C, Iso-CTS): top singular
triplets, the orthogonal polar factor, and a one-thread section for decompositions.

Every decomposition here goes through the float64 Gram matrix of the smaller side (the rule
OPCM's ``gram`` decomposition uses, :func:`surgery.merge.methods.opcm.decompose`): squaring
in float64 keeps singular values down to about 1e-7 of the largest, far below what a task
matrix of bf16 checkpoints resolves, and the work is one small ``eigh`` instead of a full
SVD of a tall matrix (an embedding's 49,152 × 576 task vector costs a 576 × 576 ``eigh``).

Directions whose singular value is below :func:`rank_floor` (σ_max · √max(m, n) · eps_float32,
some 20× above the rounding noise of a float32 sum of task vectors) are treated as absent:
the polar factor of a rank-deficient matrix is then the partial isometry on its range,
where an SVD would pick arbitrary vectors for the zero singular values. For full-rank task
matrices (every real fine-tune) this changes nothing.

Decompositions run on one intra-op thread (:func:`surgery.core.determinism.one_thread`):
LAPACK and BLAS results can differ in the last bits between thread counts, and the merged
bytes must not. The cores are used by tensor instead: the methods are declared ``threaded``,
and ``surgery merge`` computes whole tensors ahead on one worker thread per core
(:mod:`surgery.merge.ahead`).
"""

from __future__ import annotations

import math
import time
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from ...core.determinism import numpy_blas_one_thread, numpy_linalg
from ...core.determinism import one_thread as single_thread  # noqa: F401  (the methods' name for it)

EPS32 = torch.finfo(torch.float32).eps


def rank_floor(s_max: float, shape: tuple[int, ...]) -> float:
    """Singular values at or below this are treated as zero (see the module docstring)."""
    return s_max * math.sqrt(max(shape)) * EPS32


def _on_numpy(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and numpy_linalg()


def matmul64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of float64 matrices: numpy's BLAS on one thread on the CPU (about twice torch's
    dgemm here, :func:`surgery.core.determinism.numpy_linalg`), torch elsewhere."""
    if not _on_numpy(a):
        return a @ b
    with numpy_blas_one_thread():
        return torch.from_numpy(a.numpy() @ b.numpy())


def _gram_eigh(m64: torch.Tensor, tall: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of the Gram matrix of the
    smaller side of the float64 ``m64``: mᵀm for a tall matrix, m mᵀ for a wide one."""
    gram = matmul64(m64.mT, m64) if tall else matmul64(m64, m64.mT)
    if _on_numpy(gram):
        with numpy_blas_one_thread():
            e, v = np.linalg.eigh(gram.numpy())
        evals, evecs = torch.from_numpy(e), torch.from_numpy(v)
    else:
        evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of a 2-D tensor, descending, in float64."""
    evals, _ = _gram_eigh(m.double(), m.shape[0] >= m.shape[1])
    return evals.sqrt()


def top_svd(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``r`` singular triplets of a 2-D float32 tensor: U (rows × r), σ (r), Vᵀ (r × cols).

    Directions below :func:`rank_floor` are returned as zero columns / rows with σ = 0, so the
    shapes are always r wide (r ≤ min(rows, cols)).
    """
    rows, cols = m.shape
    tall = rows >= cols
    m64 = m.double()                    # converted once: the Gram matrix and the other side use it
    evals, evecs = _gram_eigh(m64, tall)
    s = evals.sqrt()
    floor = rank_floor(float(s[0]) if s.numel() else 0.0, (rows, cols))
    k = min(r, int((s > floor).sum()))
    s_k, w = s[:k], evecs[:, :k]
    # the other side from the Gram eigenvectors: m w / σ (float64, then float32)
    other = (matmul64(m64, w) if tall else matmul64(m64.mT, w)) / s_k
    del m64
    u = torch.zeros(rows, r, dtype=m.dtype, device=m.device)
    vt = torch.zeros(r, cols, dtype=m.dtype, device=m.device)
    sigma = torch.zeros(r, dtype=m.dtype, device=m.device)
    if tall:
        u[:, :k], vt[:k] = other.to(m.dtype), w.mT.to(m.dtype)
    else:
        u[:, :k], vt[:k] = w.to(m.dtype), other.mT.to(m.dtype)
    sigma[:k] = s_k.to(m.dtype)
    return u, sigma, vt


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of a 2-D tensor (U Vᵀ of its SVD; on the range of ``a`` when
    it is rank deficient), in float64.

    Tall ``a``: a (aᵀa)^(−1/2); wide ``a``: (a aᵀ)^(−1/2) a — through the eigendecomposition of
    the smaller Gram matrix.
    """
    return polar_and_singular_values(a)[0]


def polar_and_singular_values(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`polar` of ``a`` and its :func:`singular_values`, from one Gram matrix and one
    ``eigh`` (the same bytes as the two calls)."""
    rows, cols = a.shape
    tall = rows >= cols
    a64 = a.double()
    evals, evecs = _gram_eigh(a64, tall)
    s = evals.sqrt()
    keep = s > rank_floor(float(s[0]) if s.numel() else 0.0, (rows, cols))
    w = evecs[:, keep]
    inv_sqrt = matmul64(w / s[keep], w.mT)
    return (matmul64(a64, inv_sqrt) if tall else matmul64(inv_sqrt, a64)), s


class FactorCache:
    """Decompositions kept across merges of the same task vectors (``surgery tune`` merges
    them once per trial). Keys name the tensor, the method and whatever else the decomposition
    depends on; values are tensors, tuples of tensors, or None. Least recently used entries go first
    once ``max_bytes`` is exceeded, so memory stays bounded; an evicted entry is recomputed,
    with the same bytes, when it is needed again.

    Attributes:
        seconds: Time spent computing the entries (the one-time cost the cache saves later;
            summed over threads).
        nbytes: Bytes held now.
        fills, evictions: Entries computed and dropped so far.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.seconds = 0.0
        self.nbytes = 0
        self.peak_bytes = 0
        self.fills = 0
        self.evictions = 0
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()       # tensors are merged on several worker threads

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0]
        t0 = time.perf_counter()
        value = compute()
        parts = (value,) if isinstance(value, torch.Tensor) else (value or ())
        size = sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
        with self._lock:
            self.seconds += time.perf_counter() - t0
            self.fills += 1
            self._entries[key] = (value, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                _, (_, old) = self._entries.popitem(last=False)
                self.nbytes -= old
                self.evictions += 1
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return value


def cached(options: dict[str, Any], key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in the run's :class:`FactorCache` (``options["factor_cache"]``) when
    it has one; a merge without one computes every time."""
    cache = options.get("factor_cache")
    return compute() if cache is None else cache.get(key, compute)
