"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces",
https://arxiv.org/abs/2502.04959; reference: FusionBench
``fusion_bench/method/isotropic_merging/``, ``ISO_C_Merge`` and ``ISO_CTS_Merge``).

Iso-C: for every 2-D tensor, the summed task matrix M = Σ τ_i = U Σ Vᵀ gets a flat spectrum,
every singular value replaced by their mean:

    Δ = mean(σ) · U Vᵀ

Iso-CTS keeps the top c singular directions of M as the common subspace, with
c = k − T·round((k − int(k·f)) / T), k = min(m, n), f = ``common_space_fraction``; each task
adds its top (k − c)/T directions of τ_i with the common subspace projected out
(τ_i − U_c U_cᵀ τ_i). The k left vectors and the k right vectors are made orthonormal by
their polar factors, and the spectrum is flattened to the mean of the k singular values:

    Δ = mean(σ_ts, σ_c) · polar([U_ts,1 … U_ts,T  U_c]) · polar([V_ts,1ᵀ; …; V_ts,Tᵀ; V_cᵀ])

Tensors that are not matrices take the mean of the task vectors. The result is θ0 + s Δ
with s = ``scaling_factor`` (FusionBench's default 1.0; the paper tunes it on validation
data). Per-model ``weight`` scales τ_i first (1: the reference).

The merged task matrix before the scale is kept in the run's
:class:`~.subspace.FactorCache` when it has one: ``surgery tune`` searches ``scaling_factor``
only (each model's weight stays where the recipe puts it), so its later trials rescale it.

Rules chosen where the reference leaves it open: polar factors ignore directions with σ = 0
(:mod:`surgery.merge.methods.subspace`), so a rank-deficient sum gives a determined result;
a tiny matrix whose rounding would make c negative keeps c = k − T·floor(k/T).

Computation: Iso-C's σ and polar factor come from one Gram matrix and one ``eigh``. Iso-CTS's
task-specific left vectors lie in the complement of U_c (each residual has U_c projected out,
and U_c's columns are orthonormal), so polar([U_ts U_c]) = [polar(U_ts) U_c]: only the
(k − c)-wide block is orthonormalised (equal in exact arithmetic; within 5e-6 relative of the
full polar factor on the SmolLM2 workload).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from ..method import WEIGHT, Batch, Param, TensorContext
from .subspace import cached, polar, polar_and_singular_values, single_thread, top_svd
from .tsv import mean_task_vector, weighted_taus

# tune searches the scale, as the paper does on validation data; each model's weight stays
# where the recipe puts it (a new weight means new decompositions, a scale only rescales them)
SCALING = Param("scaling_factor", 1.0, help="scale of the merged task vector", search=(0.0, 2.0))
FIXED_WEIGHT = dataclasses.replace(WEIGHT, search=None)


def iso_c_matrix(total: torch.Tensor) -> torch.Tensor:
    """Iso-C's merged task matrix mean(σ) · U Vᵀ of the summed task matrix ``total`` (float32)."""
    with single_thread():
        # one Gram matrix and one eigh give both the polar factor and the singular values
        factor, s = polar_and_singular_values(total)
        return factor.mul_(s.mean()).to(total.dtype)


def common_rank(k: int, n: int, fraction: float) -> tuple[int, int]:
    """(c, per-task rank) of Iso-CTS for min(m, n) = k, n tasks and ``common_space_fraction``."""
    c = int(k * fraction)
    task_total = round((k - c) / n) * n
    if task_total > k:                       # only for matrices smaller than a few times n
        task_total = (k // n) * n
    c = k - task_total
    return c, (k - c) // n


def iso_cts_matrix(taus: Sequence[torch.Tensor | Callable[[], torch.Tensor]], fraction: float) -> torch.Tensor:
    """Iso-CTS's merged task matrix (see the module docstring) of the T task matrices ``taus``.

    ``taus`` may hold functions returning the task matrices instead: each is then called twice
    (for the sum, then for its residual) and one task matrix is in memory at a time.
    """
    n = len(taus)

    def tau(i: int) -> torch.Tensor:
        return taus[i]() if callable(taus[i]) else taus[i]

    with single_thread():
        total = tau(0) if callable(taus[0]) else taus[0].clone()   # a fresh tensor, added into
        for i in range(1, n):
            total.add_(tau(i))
        rows, cols = total.shape
        c, per = common_rank(min(rows, cols), n, fraction)
        u_c, s_c, vt_c = top_svd(total, c)
        del total
        us, ss, vts = [], [], []
        for i in range(n):
            t = tau(i)
            specific = t - u_c @ (u_c.mT @ t)          # the common subspace projected out
            del t
            u, s, vt = top_svd(specific, per)
            us.append(u), ss.append(s), vts.append(vt)
            del specific
        # every task-specific left vector lies in the complement of the common ones (U_c has
        # orthonormal columns and was projected out of each residual), so the polar factor of
        # [U_ts U_c] is [polar(U_ts) U_c]: an eigh of the (k − c)-wide block instead of k-wide
        pu = torch.cat([polar(torch.cat(us, 1)), u_c.double()], 1)
        vt = torch.cat(vts + [vt_c], 0)
        mean = torch.cat(ss + [s_c]).double().mean()
        del us, vts
        return (pu @ polar(vt)).mul_(mean).to(u_c.dtype)


def _weighted_sum(ctx: TensorContext) -> torch.Tensor:
    """Σ w_i τ_i, added in model order with one task vector read at a time."""
    weights = ctx.weights()
    total = ctx.tau(0).mul_(weights[0])
    for i in range(1, ctx.n):
        total.add_(ctx.tau(i).mul_(weights[i]))
    return total


def _iso(ctx: TensorContext, key: tuple, matrix) -> torch.Tensor:
    scale = float(ctx.params["scaling_factor"])
    if len(ctx.shape) != 2:
        return mean_task_vector(weighted_taus(ctx)).mul_(scale).add_(ctx.base())
    # Δ depends on the task vectors, the weights and ``key``, not on ``scaling_factor``: a run
    # that merges the same models at several scales (surgery tune) keeps it
    delta = cached(ctx.options, (ctx.name, *key, tuple(ctx.weights())), lambda: matrix(ctx))
    delta = delta.mul_(scale) if ctx.options.get("factor_cache") is None else delta.mul(scale)
    return delta.add_(ctx.base())


def _iso_c(ctx: TensorContext) -> torch.Tensor:
    return _iso(ctx, ("iso_c",), lambda ctx: iso_c_matrix(_weighted_sum(ctx)))


def _iso_cts(ctx: TensorContext) -> torch.Tensor:
    fraction = float(ctx.params["common_space_fraction"])
    weights = ctx.weights()
    taus = [lambda i=i: ctx.tau(i).mul_(weights[i]) for i in range(ctx.n)]     # read when needed
    return _iso(ctx, ("iso_cts", fraction), lambda ctx: iso_cts_matrix(taus, fraction))


METHODS = (
    Batch("iso_c", "https://arxiv.org/abs/2502.04959",
          "Iso-C: the summed task matrix with its singular values flattened to their mean",
          (FIXED_WEIGHT, SCALING), _iso_c, threaded=True),
    Batch("iso_cts", "https://arxiv.org/abs/2502.04959",
          "Iso-CTS: common subspace of the sum plus task-specific subspaces, flattened spectrum",
          (FIXED_WEIGHT, SCALING,
           Param("common_space_fraction", 0.8, low=0.0, high=1.0,
                 help="share of the min(m, n) directions taken from the summed task matrix")), _iso_cts,
          threaded=True),
)
