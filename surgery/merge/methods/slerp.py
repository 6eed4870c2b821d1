"""Spherical linear interpolation of two models (Shoemake 1985; as used by mergekit,
https://en.wikipedia.org/wiki/Slerp): each tensor is flattened and interpolated along the
great circle between the two directions; nearly (anti)parallel pairs fall back to linear
interpolation."""

from __future__ import annotations

import math

import torch

from ..method import Batch, TensorContext, unit

DOT_THRESHOLD = 0.9995


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1).

    The angle comes from the normalized flattened tensors; the coefficients
    sin((1−t)θ)/sin θ and sin(tθ)/sin θ multiply the original (unnormalized) tensors.
    When |cos θ| > ``dot_threshold`` the result is (1−t) v0 + t v1.

    Args:
        t: Interpolation parameter.
        v0, v1: Same-shape tensors.
        dot_threshold: The |cos| above which the linear fallback is used.
        eps: Norms below this count as 1 (zero tensors).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.to(dtype).reshape(-1)
    b = v1.to(dtype).reshape(-1)
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1)) if a.numel() else 1.0
    if abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        c0, c1 = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    return (c0 * a + c1 * b).reshape(v0.shape)


def _merge(ctx: TensorContext) -> torch.Tensor:
    return slerp(float(ctx.params["t"]), ctx.base(), ctx.model(0))


METHODS = (
    Batch("slerp", "https://en.wikipedia.org/wiki/Slerp", "spherical interpolation from the base (t=0) to one model (t=1)",
          (unit("t", 0.5, help="interpolation factor: 0 = the base, 1 = the model", search=(0.0, 1.0)),), _merge,
          min_models=1, max_models=1),
)
