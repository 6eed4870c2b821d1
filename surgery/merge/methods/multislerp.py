"""Multi-SLERP (mergekit's ``multislerp``, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
barycentric interpolation of several models on the hypersphere, with mergekit 0.1.5's
semantics. With x_i the flattened models (their task vectors when a base is given), weights
w (divided by their sum with ``normalize_weights``) and u_i = x_i / (‖x_i‖ + eps):

    m = Σ w_i u_i / ‖Σ w_i u_i‖,  T = Σ w_i (u_i − ⟨u_i, m⟩ m),  s = ‖T‖ + eps,
    output = (m cos s + T sin s / s) · Σ w_i ‖x_i‖   (+ θ0)

Every vector above lies in the span of the x_i, so the whole computation runs on their k×k
Gram matrix (one float64 pass) and the output Σ c_i x_i is a second pass: memory does not
grow with the tensor. One model is returned as it is; when Σ w_i u_i vanishes, two models
are combined linearly (Σ w_i x_i) and more are refused, as in mergekit — except when every
x_i is zero (a tensor no fine-tune changed, with a base): any combination of them is zero,
so the base is written, where mergekit 0.1.5 stops the whole merge.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...core.errors import UsageError
from ..method import WEIGHT, Batch, Param, TensorContext, flag
from .streaming import Inputs, Streamed, gram64


def multislerp_coefficients(gram: np.ndarray, weights: list[float], normalize: bool, eps: float,
                            tensor: str = "tensor") -> np.ndarray:
    """c with output = Σ c_i x_i, from the Gram matrix of the x_i (float64).

    Raises:
        UsageError: The weighted mean of the unit vectors vanishes with more than two models.
    """
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    inv = 1.0 / (norms + eps)
    if not norms.any():        # every x_i is zero: the result is θ0 (or zero) whatever the weights
        return np.zeros_like(w)
    m = w * inv
    mean_norm = math.sqrt(max(float(m @ gram @ m), 0.0))
    if mean_norm < eps:
        if len(w) == 2:
            return w
        raise UsageError(f"multislerp: the weighted mean of the models' directions is zero for tensor {tensor!r} "
                         f"(opposite models with balancing weights); change the weights (`weight`).")
    mh = m / mean_norm
    dots = inv * (gram @ mh)
    tangent = m - float(w @ dots) * mh
    s = math.sqrt(max(float(tangent @ gram @ tangent), 0.0)) + eps
    return (mh * math.cos(s) + tangent * (math.sin(s) / s)) * float(norms @ w)


def _check(ctx: TensorContext) -> None:
    if ctx.n > 1 and bool(ctx.params["normalize_weights"]) and sum(ctx.weights()) == 0:
        raise UsageError(f"multislerp: the weights sum to zero for tensor {ctx.name!r}, so they cannot be normalized; "
                         f"change the weights (`weight`) or turn `normalize_weights` off.")


def _merge(ctx: TensorContext):
    inputs = Inputs(ctx)
    if ctx.n == 1:              # mergekit returns the one model as it is (even with a base)
        return Streamed(ctx.shape, None, lambda a, e: inputs.model(0, a, e), inputs.release)
    taus = ctx.has_base
    coef: list[float] = []

    def prepare() -> None:
        g = gram64(inputs.blocks, lambda a, e: inputs.vectors(a, e, taus, fresh=False))
        coef.extend(multislerp_coefficients(g, ctx.weights(), bool(ctx.params["normalize_weights"]),
                                            float(ctx.params["eps"]), ctx.name).tolist())

    def produce(a: int, e: int) -> torch.Tensor:
        base = inputs.base(a, e)
        xs = inputs.vectors(a, e, taus, fresh=False)
        out = xs[0] * coef[0]
        for c, x in zip(coef[1:], xs[1:]):
            out.add_(x, alpha=c)
        return out if base is None else out.add_(base)

    return Streamed(ctx.shape, prepare, produce, inputs.release)


METHODS = (
    Batch("multislerp", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
          "weighted spherical mean of several models (or task vectors, with a base)",
          (WEIGHT, flag("normalize_weights", True, "divide the weights by their sum"),
           Param("eps", 1e-8, low=0.0, help="numerical guard added to norms")),
          _merge, base="optional", min_models=1, check=_check),
)
