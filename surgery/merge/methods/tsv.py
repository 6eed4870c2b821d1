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
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..method import WEIGHT, Batch, Param, TensorContext
from .subspace import polar, single_thread, top_svd


def tsv_matrix(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M's merged task matrix Δ = polar([U_1 … U_T]) diag(σ) polar([V_1ᵀ; …; V_Tᵀ]).

    Args:
        taus: The T task matrices (float32, same 2-D shape).

    Returns:
        Δ in float32 (zeros when min(m, n) < T).
    """
    n = len(taus)
    rows, cols = taus[0].shape
    r = int(min(rows, cols) * (1 / n))   # the reference's int(k · sv_reduction), rounding included
    if r == 0:
        return torch.zeros_like(taus[0])
    with single_thread():
        parts = [top_svd(t, r) for t in taus]
        u = torch.cat([p[0] for p in parts], 1)
        s = torch.cat([p[1] for p in parts]).double()
        vt = torch.cat([p[2] for p in parts], 0)
        del parts
        return ((polar(u) * s) @ polar(vt)).to(taus[0].dtype)


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
    taus = weighted_taus(ctx)
    delta = tsv_matrix(taus) if len(ctx.shape) == 2 else mean_task_vector(taus)
    del taus
    return delta.mul_(float(ctx.params["alpha"])).add_(ctx.base())


METHODS = (
    Batch("tsv", "https://arxiv.org/abs/2412.00081",
          "Task Singular Vectors (TSV-M): each task's top singular vectors, decorrelated by polar factors",
          (WEIGHT, Param("alpha", 1.0, help="scale of the merged task vector")), _merge),
)
