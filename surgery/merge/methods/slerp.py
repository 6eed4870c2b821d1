"""Spherical linear interpolation of two models (Shoemake 1985; as used by mergekit,
https://en.wikipedia.org/wiki/Slerp): each tensor is flattened and interpolated along the
great circle between the two directions; nearly (anti)parallel pairs fall back to linear
interpolation.

The norms and the dot product are float64 sums over fixed row blocks (one statistics pass,
:func:`.streaming.gram64`), then the output is produced in row blocks, so a tensor is never
held whole in float32 beyond :data:`.streaming.IN_MEMORY_BYTES` (until 30 Nov 2026 both
tensors were read whole and the angle came from a float32 dot product of normalized copies:
the same coefficients to about 1e-7, so an entry may now differ by one bf16 rounding step).
"""

from __future__ import annotations

import math

import torch

from ..method import Batch, TensorContext, unit
from .streaming import Inputs, Streamed, as64, gram64, sum64

DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, g00: float, g11: float, g01: float, dot_threshold: float = DOT_THRESHOLD,
                       eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 v0 + c1 v1, from ‖v0‖², ‖v1‖² and ⟨v0, v1⟩ (norms below
    ``eps`` count as 1; linear when |cos θ| > ``dot_threshold``)."""
    na, nb = math.sqrt(max(g00, 0.0)), math.sqrt(max(g11, 0.0))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = min(1.0, max(-1.0, g01 / (na * nb)))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1) (in-memory tensors; a merge streams the same math).

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
    x, y = as64(a), as64(b)
    c0, c1 = (slerp_coefficients(t, sum64(x * x), sum64(y * y), sum64(x * y), dot_threshold, eps)
              if a.numel() else (1.0 - t, t))
    return _combine(a, b, c0, c1).reshape(v0.shape)


def _combine(a: torch.Tensor, b: torch.Tensor, c0: float, c1: float) -> torch.Tensor:
    """c0 · a + c1 · b (new tensor; ``a`` and ``b`` are only read)."""
    return torch.mul(a, c0).add_(torch.mul(b, c1))


def _merge(ctx: TensorContext) -> Streamed:
    inputs = Inputs(ctx)
    t = float(ctx.params["t"])
    coef: list[float] = []

    def prepare() -> None:
        if ctx.numel == 0:
            coef.extend((1.0 - t, t))
            return
        g = gram64(inputs.blocks, lambda a, e: [inputs.base(a, e), inputs.model_view(0, a, e)])
        coef.extend(slerp_coefficients(t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1])))

    def produce(a: int, e: int) -> torch.Tensor:
        return _combine(inputs.base(a, e), inputs.model_view(0, a, e), *coef)
    return Streamed(ctx.shape, prepare, produce, inputs.release)


METHODS = (
    Batch("slerp", "https://en.wikipedia.org/wiki/Slerp", "spherical interpolation from the base (t=0) to one model (t=1)",
          (unit("t", 0.5, help="interpolation factor: 0 = the base, 1 = the model", search=(0.0, 1.0)),), _merge,
          min_models=1, max_models=1),
)
