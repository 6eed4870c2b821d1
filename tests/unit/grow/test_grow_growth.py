"""Growth inits as tensor functions: which keep the Pattention output, which do not."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.core.errors import UsageError
from surgery.grow.growth import (exact_for, gram_keys, grow_keys, grow_values, key_rank, new_scale_tokens,
                                 tensor_generator, value_std)
from tokenformer_reference import official_pattention

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def _layer(n=12, d=8, dout=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, d, generator=g, dtype=torch.float64)
    return x, torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d), torch.randn(n, dout, generator=g, dtype=torch.float64)


def _grown(k, v, N, init, n_eff=None, seed=0):
    n_eff = k.shape[0] if n_eff is None else n_eff
    return (grow_keys(k, N, init, n_eff=n_eff, seed=seed, name="k"),
            grow_values(v, N, init, seed=seed, name="v", num_layers=2, hidden_size=k.shape[1]))


@pytest.mark.parametrize("norm", NORMS)
def test_tile_is_exact_for_every_norm(norm):
    x, k, v = _layer()
    k2, v2 = _grown(k, v, 36, "tile")
    assert torch.equal(k2[:12], k) and torch.equal(k2[12:24], k) and torch.equal(k2[24:], k)
    assert torch.equal(v2[:12], v) and not v2[12:].any()
    torch.testing.assert_close(official_pattention(x, k2, v2, norm), official_pattention(x, k, v, norm),
                               rtol=1e-12, atol=1e-12)


def test_tile_needs_a_multiple():
    _, k, _ = _layer()
    with pytest.raises(UsageError, match="multiple of 12 tokens, got 30"):
        grow_keys(k, 30, "tile", n_eff=12, seed=0, name="k")


@pytest.mark.parametrize("n,d,N", [(12, 8, 20), (12, 8, 13 + 7), (6, 8, 12), (6, 8, 40)])
def test_gram_matches_gram_matrix_and_keeps_l2_norm_gelu(n, d, N):
    x, k, v = _layer(n=n, d=d)
    k2, v2 = _grown(k, v, N, "gram")
    m = N - n
    new = k2[n:]
    torch.testing.assert_close(new.T @ new, (m / n) * (k.T @ k), rtol=1e-10, atol=1e-10)
    assert torch.equal(k2[:n], k) and not v2[n:].any()
    torch.testing.assert_close(official_pattention(x, k2, v2, "l2_norm_gelu"),
                               official_pattention(x, k, v, "l2_norm_gelu"), rtol=1e-10, atol=1e-10)
    # The same keys change the other two norms: why gram is refused for them.
    for norm in ("gelu_l2_norm", "softmax"):
        assert (official_pattention(x, k2, v2, norm) - official_pattention(x, k, v, norm)).abs().max() > 1e-3


def test_gram_with_a_frozen_scale_uses_m_over_n_eff():
    x, k, v = _layer()
    # a model whose scale is frozen at 8 tokens (grown with zeros before): gram adds m keys at ratio m/8
    k2 = grow_keys(k, 20, "gram", n_eff=8, seed=0, name="k")
    torch.testing.assert_close(k2[12:].T @ k2[12:], (8 / 8) * (k.T @ k), rtol=1e-10, atol=1e-10)
    v2 = grow_values(v, 20, "gram", seed=0, name="v", num_layers=2, hidden_size=8)
    before = official_pattention(x, k, v, "l2_norm_gelu", scale_tokens=8)
    after = official_pattention(x, k2, v2, "l2_norm_gelu", scale_tokens=new_scale_tokens("gram", 12, 20, 8))
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_gram_refuses_fewer_new_tokens_than_the_rank():
    _, k, _ = _layer(n=12, d=8)                     # rank 8
    with pytest.raises(UsageError, match=r"at least rank\(K\) = 8 new tokens, got 5"):
        gram_keys(k, 5, 5 / 12, torch.Generator().manual_seed(0))
    low = k[:, :1] @ torch.ones(1, 8, dtype=torch.float64)   # rank 1: one new token is enough
    assert key_rank(low) == 1
    new = gram_keys(low, 1, 1 / 12, torch.Generator().manual_seed(0))
    torch.testing.assert_close(new.T @ new, (low.T @ low) / 12, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_zero_is_exact_only_with_the_frozen_scale(norm):
    x, k, v = _layer()
    k2, v2 = _grown(k, v, 20, "zero")
    assert not k2[12:].any() and not v2[12:].any()
    before = official_pattention(x, k, v, norm)
    frozen = official_pattention(x, k2, v2, norm, scale_tokens=new_scale_tokens("zero", 12, 20, 12))
    torch.testing.assert_close(frozen, before, rtol=1e-12, atol=1e-12)
    live = official_pattention(x, k2, v2, norm)       # the released forward: scale √20 instead of √12
    assert (live - before).abs().max() > 1e-2


def test_zero_is_not_exact_for_softmax_even_frozen():
    x, k, v = _layer()
    k2, v2 = _grown(k, v, 20, "zero")
    out = official_pattention(x, k2, v2, "softmax", scale_tokens=12)
    assert (out - official_pattention(x, k, v, "softmax")).abs().max() > 1e-2
    assert not exact_for("zero", "softmax") and exact_for("zero", "gelu_l2_norm")


def test_random_follows_released_init_and_is_seeded():
    k = torch.zeros(10, 256, dtype=torch.float64)
    v = torch.zeros(10, 256, dtype=torch.float64)
    k2 = grow_keys(k, 4010, "random", n_eff=10, seed=3, name="a.key_param_tokens")
    v2 = grow_values(v, 4010, "random", seed=3, name="a.value_param_tokens", num_layers=12, hidden_size=256)
    assert k2[10:].std().item() == pytest.approx(0.02, rel=0.01)
    assert v2[10:].std().item() == pytest.approx(2 / 12 / 16, rel=0.01)
    assert value_std(12, 256) == 2 / 12 / 16
    assert torch.equal(k2, grow_keys(k, 4010, "random", n_eff=10, seed=3, name="a.key_param_tokens"))
    assert not torch.equal(k2, grow_keys(k, 4010, "random", n_eff=10, seed=4, name="a.key_param_tokens"))
    assert not torch.equal(k2[10:20], grow_keys(k, 4010, "random", n_eff=10, seed=3, name="b.key_param_tokens")[10:20])


def test_tensor_generator_depends_on_seed_and_name_only():
    a = torch.randn(4, generator=tensor_generator(1, "x"))
    assert torch.equal(a, torch.randn(4, generator=tensor_generator(1, "x")))
    assert not torch.equal(a, torch.randn(4, generator=tensor_generator(1, "y")))


def test_scale_bookkeeping():
    assert new_scale_tokens("tile", 16, 48, 16) == 48
    assert new_scale_tokens("tile", 24, 48, 16) == 32      # a zero-grown model tiled ×2
    assert new_scale_tokens("zero", 16, 40, 16) == 16
    assert new_scale_tokens("gram", 16, 40, 16) == 40
    assert new_scale_tokens("random", 16, 40, 16) == 40
