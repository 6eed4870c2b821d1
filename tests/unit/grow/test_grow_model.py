"""The reference TokenFormer forward against an independent implementation, and layout checks."""

from __future__ import annotations

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.core.errors import InputError
from make_tokenformer import build_tiny_tokenformer
from surgery.grow.model import TokenFormerConfig, check_supported, find_pattention, lm_logits
from tokenformer_reference import load, reference_logits


def _ours(folder, ids):
    ck = open_checkpoint(folder)
    cfg = TokenFormerConfig.from_dict(ck.config)
    return lm_logits(lambda n: ck.get(n, dtype=torch.float64), ck.__contains__, find_pattention(ck.names), cfg, ids)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_forward_matches_independent_reference(tokenformers, norm):
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    sd, cfg = load(tokenformers[norm])
    torch.testing.assert_close(_ours(tokenformers[norm], ids), reference_logits(sd, cfg, ids), rtol=1e-10, atol=1e-10)


def test_forward_untied_head_and_full_rotary(tmp_path):
    folder = build_tiny_tokenformer(tmp_path / "m", seed=3, no_weight_tying=True, rotary_pct=1.0, num_layers=3)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    sd, cfg = load(folder)
    assert "sequential.7.final_linear.weight" in sd
    torch.testing.assert_close(_ours(folder, ids), reference_logits(sd, cfg, ids), rtol=1e-10, atol=1e-10)


def test_forward_is_causal(tokenformers):
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    ids2 = ids.clone()
    ids2[0, 7:] = (ids2[0, 7:] + 1) % 96
    a, b = _ours(tokenformers["l2_norm_gelu"], ids), _ours(tokenformers["l2_norm_gelu"], ids2)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-12, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_layout_found_in_block_order(tokenformers):
    sites = find_pattention(open_checkpoint(tokenformers["softmax"]).names)
    assert [(s.block, s.role, s.kind) for s in sites[:5]] == [
        ("sequential.2", "attention.query", "qkv"), ("sequential.2", "attention.key", "qkv"),
        ("sequential.2", "attention.value", "qkv"), ("sequential.2", "attention.proj", "proj"),
        ("sequential.2", "mlp", "ffn")]
    assert len(sites) == 10 and sites[0].key_name == "sequential.2.attention.query.key_param_tokens"


def test_not_a_tokenformer(fixtures_dir):
    names = open_checkpoint(fixtures_dir / "llama-tiny" / "base").names
    with pytest.raises(InputError, match="is not a TokenFormer checkpoint: no tensor ends in 'key_param_tokens'") as e:
        find_pattention(names, label="llama")
    assert e.value.exit_code == 3


def test_layout_errors():
    with pytest.raises(InputError, match="no 'sequential.2.mlp.value_param_tokens'"):
        find_pattention(["sequential.2.mlp.key_param_tokens"])
    with pytest.raises(InputError, match="'layers.0.query.key_param_tokens' is not in the TokenFormer layout"):
        find_pattention(["layers.0.query.key_param_tokens", "layers.0.query.value_param_tokens"])


def test_config_reading():
    cfg = TokenFormerConfig.from_dict({"hidden-size": 8, "num-layers": 1, "num_attention_heads": 2, "qkv_slot_num": 4,
                                       "proj_slot_num": 4, "ffn_slot_num": 8, "ffn_norm_slot_num": 6})
    assert cfg.hidden_size == 8 and cfg.norm_activation_type == "l2_norm_gelu" and cfg.scale_tokens("ffn") == 6.0
    assert cfg.scale_tokens("qkv") is None
    with pytest.raises(InputError, match="lacks qkv_slot_num, proj_slot_num"):
        TokenFormerConfig.from_dict({"hidden_size": 8, "num_layers": 1, "num_attention_heads": 2, "ffn_slot_num": 8})
    with pytest.raises(InputError, match="norm_activation_type 'relu'"):
        TokenFormerConfig.from_dict({"hidden_size": 8, "num_layers": 1, "num_attention_heads": 2, "qkv_slot_num": 4,
                                     "proj_slot_num": 4, "ffn_slot_num": 8, "norm_activation_type": "relu"})
    learned = TokenFormerConfig(8, 1, 2, 4, 4, 8, pos_emb="learned")
    with pytest.raises(InputError, match="pos_emb 'learned'.*`verify=False`"):
        check_supported(learned)


@pytest.mark.parametrize("untied", [False, True])
def test_row_blocked_embedding_and_head_match(tmp_path, untied):
    folder = build_tiny_tokenformer(tmp_path / "m", seed=4, no_weight_tying=untied)
    ck = open_checkpoint(folder)
    cfg = TokenFormerConfig.from_dict(ck.config)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    get = lambda n: ck.get(n, dtype=torch.float64)  # noqa: E731
    whole = lm_logits(get, ck.__contains__, find_pattention(ck.names), cfg, ids)
    blocked = lm_logits(get, ck.__contains__, find_pattention(ck.names), cfg, ids, vocab_size=96, rows_per_block=10,
                        get_rows=lambda n, a, b: ck.get_rows(n, a, b, dtype=torch.float64))
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)
