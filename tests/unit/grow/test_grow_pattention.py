"""Pattention normalisations against closed forms computed element by element."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.grow.pattention import NORM_TYPES, nonlinear_norm, pattention
from tokenformer_reference import official_pattention


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _row(a: list[float], kind: str, n: float) -> list[float]:
    if kind == "l2_norm_gelu":
        norm = math.sqrt(sum(v * v for v in a))
        return [_gelu(v / norm * math.sqrt(n)) for v in a]
    if kind == "gelu_l2_norm":
        g = [_gelu(v) for v in a]
        norm = math.sqrt(sum(v * v for v in g))
        return [v / norm * math.sqrt(n) for v in g]
    e = [math.exp(v) for v in a]
    return [v / sum(e) * n for v in e]


@pytest.mark.parametrize("kind", NORM_TYPES)
@pytest.mark.parametrize("scale", [None, 3.0])
def test_nonlinear_norm_closed_form(kind, scale):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    got = nonlinear_norm(scores, kind, scale)
    n = scores.shape[-1] if scale is None else scale
    want = torch.tensor([_row(r, kind, n) for r in scores.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", NORM_TYPES)
def test_pattention_matches_released_formula(kind):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(6, 8, generator=g, dtype=torch.float64) / 3
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    out = pattention(x, k, v, kind)
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out, official_pattention(x, k, v, kind), rtol=1e-12, atol=1e-12)


def test_softmax_is_stable_for_large_scores():
    # exp(1000) overflows in the released form; n·softmax gives the same finite answer.
    s = torch.tensor([[1000.0, 999.0, 0.0]], dtype=torch.float64)
    out = nonlinear_norm(s, "softmax")
    assert torch.isfinite(out).all()
    e = torch.exp(s - 1000)
    torch.testing.assert_close(out, e / e.sum() * 3)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown Pattention norm 'relu'"):
        nonlinear_norm(torch.ones(1, 2), "relu")
