"""Karcher mean (mergekit's ``karcher``; "Functionality-Oriented LLM Merging on the Fisher-Rao
Manifold", https://arxiv.org/abs/2603.04972): the Riemannian barycenter of the models'
directions on the unit sphere, scaled by their mean norm, with mergekit 0.1.5's semantics.

The inputs are the models and — as in mergekit, whose karcher takes the base as one more
input — the base when one is given (last). With u_i = θ_i / ‖θ_i‖, the inputs whose norm
exceeds ``tol`` get equal weights a_i; starting from m = Σ a_i u_i / ‖·‖ (or the first unit
vector when that is below ``tol``), up to ``max_iter`` times:

    T = Σ_{θ_i ≥ tol} a_i (θ_i / sin θ_i)(u_i − cos θ_i m),  cos θ_i = ⟨m, u_i⟩;
    stop when ‖T‖ < tol; else m ← cos‖T‖ m + sin‖T‖ T/‖T‖, renormalized;

and the output is m · mean_i ‖θ_i‖ (over every input). Every iterate is a combination of the
u_i, so the iteration runs on their Gram matrix in float64 (one pass over the tensor) and the
output is a second pass; mergekit iterates on whole float32 tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..method import MAX_STEPS, Batch, Param, TensorContext
from .streaming import Inputs, Streamed, gram64


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """c with output = Σ c_i x_i, from the Gram matrix of the inputs x_i (float64)."""
    k = gram.shape[0]
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    safe = np.where(norms > 0, norms, 1.0)
    g = gram / np.outer(safe, safe)            # Gram of the unit vectors (zero vectors stay zero)
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return np.zeros(k)
    a = np.zeros(k)
    a[valid] = 1.0 / len(valid)

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    m = a.copy()
    mn = norm(m)
    if mn < tol:
        m = np.zeros(k)
        m[valid[0]] = 1.0
    else:
        m = m / mn
    for _ in range(max_iter):
        tangent = np.zeros(k)
        gm = g @ m
        for i in valid:
            dot = min(1.0, max(-1.0, float(gm[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            e = np.zeros(k)
            e[i] = 1.0
            tangent += a[i] * (theta / math.sin(theta)) * (e - dot * m)
        tn = norm(tangent)
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * (tangent / tn)
        un = norm(m)
        if un > tol:
            m = m / un
    scale = float(norms.sum()) / k
    return np.where(norms > 0, scale * m / safe, 0.0)


def _merge(ctx: TensorContext):
    inputs = Inputs(ctx)
    k = ctx.n + int(ctx.has_base)

    def xs(a: int, e: int, fresh: bool = True) -> list[torch.Tensor]:
        out = inputs.vectors(a, e, taus=False, fresh=fresh)
        if ctx.has_base:
            base = inputs.base(a, e)
            out.append(base.clone() if fresh else base)
        return out

    if k == 1:
        return Streamed(ctx.shape, None, lambda a, e: xs(a, e)[0], inputs.release)
    coef: list[float] = []

    def prepare() -> None:
        g = gram64(inputs.blocks, lambda a, e: xs(a, e, fresh=False))
        coef.extend(karcher_coefficients(g, int(ctx.params["max_iter"]), float(ctx.params["tol"])).tolist())

    def produce(a: int, e: int) -> torch.Tensor:
        vs = xs(a, e, fresh=False)
        out = vs[0] * coef[0]
        for c, x in zip(coef[1:], vs[1:]):
            out.add_(x, alpha=c)
        return out

    return Streamed(ctx.shape, prepare, produce, inputs.release)


METHODS = (
    Batch("karcher", "https://arxiv.org/abs/2603.04972",
          "Riemannian (Karcher) mean of the models' directions, scaled by their mean norm; a base is one more input",
          (Param("max_iter", 10, type="int", low=0, high=MAX_STEPS, help="most iterations"),
           Param("tol", 1e-5, low=0.0, help="convergence tolerance (and the norm below which an input is ignored)")),
          _merge, base="optional", min_models=1),
)
