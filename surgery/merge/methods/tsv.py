"""Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors:
Reducing Task Interference in Model Merging", https://arxiv.org/abs/2412.00081; reference:
FusionBench ``fusion_bench/method/task_singular_vector/``, ``TaskSingularVectorMerging``).

For every 2-D tensor, each of the T task matrices keeps its top r = int(min(m, n) · (1/T))
singular triplets (U_i, σ_i, V_iᵀ). The kept left vectors are concatenated, U = [U_1 … U_T],
as are the right ones, Vᵀ = [V_1ᵀ; …; V_Tᵀ], and the singular values σ. The merged task
matrix decorrelates the tasks' subspaces by replacing U and Vᵀ with their orthogonal polar
factors (the nearest matrices with orthonormal columns / rows — "whitening"):

    Δ = polar(U) · diag(σ) · polar(Vᵀ)

Every other tensor (norms, biases) takes the mean of the task vectors. The result is
θ0 + α Δ. Per-model ``weight`` w_i scales τ_i before anything else (FusionBench's list form
of ``alpha``); the defaults (w_i = 1, α = 1) are FusionBench's configuration. Embeddings are
2-D and are merged like any other matrix, as in FusionBench.

Rules chosen where the reference leaves it open (see :mod:`surgery.merge.methods.subspace`):
the polar factors come from the float64 Gram matrices and ignore directions with σ = 0, so a
rank-deficient input (two identical fine-tunes) gives a determined result; a matrix with
min(m, n) < T keeps r = 0 directions and contributes nothing, as in the reference.

The factors are computed once from the unweighted task matrices, and the weights scale σ:
polar(U) diag(w ⊗ σ) polar(Vᵀ) is TSV-M of the w_i τ_i (scaling τ_i scales its singular values
and keeps its vectors; models with w_i = 0 are left out). So a run that merges the same models
with other weights (``surgery tune``) keeps the factors (:class:`~.subspace.FactorCache`) and
a trial costs one matrix product per tensor, with the bytes ``surgery merge`` writes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..method import WEIGHT, Batch, Param, TensorContext
from .subspace import cached, polar, single_thread, top_svd


def tsv_factors(taus: Sequence[torch.Tensor | Callable[[], torch.Tensor]],
                n: int | None = None) -> tuple[torch.Tensor, ...] | None:
    """TSV-M's factors of unweighted task matrices: (polar(U), σ, polar(Vᵀ)), float32.

    Args:
        taus: The task matrices of the models with a non-zero weight (float32, same 2-D shape),
            or functions returning them: each is then read when its turn comes and dropped
            after its decomposition, so one task matrix is in memory at a time.
        n: The number of models merged (T, which sets r = int(min(m, n) / T)); default len(taus).

    Returns:
        The factors, or None when r = 0 or no model takes part.
    """
    n = len(taus) if n is None else n
    if not taus:
        return None
    parts = []
    with single_thread():
        for tau in taus:
            t = tau() if callable(tau) else tau
            r = int(min(t.shape) * (1 / n))   # the reference's int(k · sv_reduction), rounding included
            if r == 0:
                return None
            parts.append(top_svd(t, r))
            dtype = t.dtype
            del t
        u = torch.cat([p[0] for p in parts], 1)
        s = torch.cat([p[1] for p in parts])
        vt = torch.cat([p[2] for p in parts], 0)
        del parts
        pu = polar(u).to(dtype)
        del u
        return pu, s, polar(vt).to(dtype)


def tsv_from_factors(factors: tuple[torch.Tensor, ...] | None, weights: Sequence[float],
                     shape: Sequence[int]) -> torch.Tensor:
    """Δ = polar(U) diag(w ⊗ σ) polar(Vᵀ) from :func:`tsv_factors` and the models' weights.

    This equals TSV-M of the weighted task matrices w_i τ_i: scaling τ_i scales its singular
    values and leaves its singular vectors (so the polar factors) unchanged, a negative w_i
    flips the sign of its vectors, which the polar factor carries through; models with w_i = 0
    must be left out of the factors (their directions are absent from w_i τ_i).
    """
    if factors is None:
        return torch.zeros(tuple(shape), dtype=torch.float32)
    pu, s, pvt = factors
    r = s.numel() // len(weights)
    scale = s * torch.tensor(list(weights), dtype=s.dtype).repeat_interleave(r)
    with single_thread():
        return (pu * scale) @ pvt


def tsv_matrix(taus: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """TSV-M's merged task matrix Δ of w_i τ_i: polar([U_1 … U_T]) diag(σ) polar([V_1ᵀ; …; V_Tᵀ]).

    Args:
        taus: The T task matrices (float32, same 2-D shape).
        weights: w_i per model (default 1).

    Returns:
        Δ in float32 (zeros when min(m, n) < T).
    """
    weights = [1.0] * len(taus) if weights is None else list(weights)
    kept = [i for i, w in enumerate(weights) if w != 0]
    factors = tsv_factors([taus[i] for i in kept], len(taus))
    return tsv_from_factors(factors, [weights[i] for i in kept], taus[0].shape)


def mean_task_vector(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ τ_i / T (what the subspace methods do with tensors that are not matrices)."""
    out = taus[0].clone()
    for t in taus[1:]:
        out.add_(t)
    return out.div_(len(taus))


def weighted_taus(ctx: TensorContext) -> list[torch.Tensor]:
    """w_i τ_i for every model (per-model ``weight``)."""
    return [ctx.tau(i).mul_(w) for i, w in enumerate(ctx.weights())]


def _merge(ctx: TensorContext) -> torch.Tensor:
    if len(ctx.shape) == 2:
        # the factors depend on the task vectors and on which weights are zero, not on their
        # values: a run that merges the same models many times (surgery tune) keeps them
        weights = ctx.weights()
        kept = tuple(i for i, w in enumerate(weights) if w != 0)
        factors = cached(ctx.options, (ctx.name, "tsv", kept),
                         lambda: tsv_factors([lambda i=i: ctx.tau(i) for i in kept], ctx.n))
        delta = tsv_from_factors(factors, [weights[i] for i in kept], ctx.shape)
    else:
        delta = mean_task_vector(weighted_taus(ctx))
    return delta.mul_(float(ctx.params["alpha"])).add_(ctx.base())


METHODS = (
    Batch("tsv", "https://arxiv.org/abs/2412.00081",
          "Task Singular Vectors (TSV-M): each task's top singular vectors, decorrelated by polar factors",
          (WEIGHT, Param("alpha", 1.0, help="scale of the merged task vector")), _merge, threaded=True),
)
