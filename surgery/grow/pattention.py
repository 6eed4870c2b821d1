"""Pattention: attention from input tokens to learnable parameter tokens.

TokenFormer (Wang et al. 2024, https://arxiv.org/abs/2410.23168; reference code
Haiyang-W/TokenFormer ``megatron/model/tokenformer.py``) replaces every linear projection
with a Pattention layer holding ``n`` key tokens ``K`` [n, d_in] and ``n`` value tokens
``V`` [n, d_out]:

    A = X Kᵀ                      scores of each input row against every parameter token
    Y = Θ(A) V                    Θ normalises each row over the n parameter tokens

with three choices of Θ (``norm_activation_type``):

- ``l2_norm_gelu`` (default): Θ(A) = GeLU(A / ‖A‖₂ · √n)
- ``gelu_l2_norm``:           Θ(A) = G / ‖G‖₂ · √n with G = GeLU(A)
- ``softmax``:                Θ(A) = exp(A) / ‖exp(A)‖₁ · n  (= n · softmax(A))

The reference multiplies by the *live* token count ``n``. A checkpoint grown with zero
keys keeps ‖A‖ but would see √N instead of √n; such a checkpoint records the frozen
count (``scale_tokens``), which this module honours when given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORM_TYPES = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def nonlinear_norm(scores: torch.Tensor, norm_type: str = "l2_norm_gelu",
                   scale_tokens: float | None = None) -> torch.Tensor:
    """Normalise Pattention scores over the last (parameter-token) axis.

    Args:
        scores: ``[..., n]`` scores ``X Kᵀ``.
        norm_type: One of :data:`NORM_TYPES`.
        scale_tokens: The token count whose square root (l2 variants) or value (softmax)
            scales the normalised row; ``None`` uses the live count ``n`` as the reference does.

    Returns:
        The weights Θ(A), same shape as ``scores``.
    """
    n = float(scores.shape[-1] if scale_tokens is None else scale_tokens)
    if norm_type == "l2_norm_gelu":
        return F.gelu(scores / torch.linalg.vector_norm(scores, dim=-1, keepdim=True) * math.sqrt(n))
    if norm_type == "gelu_l2_norm":
        g = F.gelu(scores)
        return g / torch.linalg.vector_norm(g, dim=-1, keepdim=True) * math.sqrt(n)
    if norm_type == "softmax":
        # exp(A)/‖exp(A)‖₁ is softmax(A); the max-shifted form avoids overflow.
        return torch.softmax(scores, dim=-1) * n
    raise ValueError(f"unknown Pattention norm {norm_type!r}; choose one of {', '.join(NORM_TYPES)}")


def pattention(inputs: torch.Tensor, key_tokens: torch.Tensor, value_tokens: torch.Tensor,
               norm_type: str = "l2_norm_gelu", scale_tokens: float | None = None) -> torch.Tensor:
    """One Pattention layer: ``Θ(inputs @ key_tokensᵀ) @ value_tokens``.

    Args:
        inputs: ``[..., d_in]``.
        key_tokens: ``[n, d_in]`` (checkpoint tensor ``...key_param_tokens``).
        value_tokens: ``[n, d_out]`` (``...value_param_tokens``).
        norm_type: One of :data:`NORM_TYPES`.
        scale_tokens: Frozen token count for the scale (see :func:`nonlinear_norm`).

    Returns:
        ``[..., d_out]``.
    """
    return nonlinear_norm(inputs @ key_tokens.transpose(-2, -1), norm_type, scale_tokens) @ value_tokens
