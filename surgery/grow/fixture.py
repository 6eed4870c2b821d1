"""Tiny seeded TokenFormer checkpoints in the official layout, for tests and examples.

``build_tiny_tokenformer(out)`` writes ``model.safetensors`` (or, with ``fmt="bin"``, the
``pytorch_model.bin`` the official releases ship) and a ``config.json`` holding the
GPT-NeoX fields of ``configs/tokenformer/*.yml`` at toy sizes. Random parameters, a
deterministic function of the arguments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .model import EMBEDDING, PATTENTION_MODULES, SLOT_FIELDS

TINY = dict(hidden_size=32, num_layers=2, num_attention_heads=4, qkv_slot_num=16, proj_slot_num=16,
            ffn_slot_num=64, vocab_size=96, max_position_embeddings=64)


def tiny_config(norm_activation_type: str = "l2_norm_gelu", **overrides: Any) -> dict[str, Any]:
    """A GPT-NeoX style TokenFormer config (the fields of the official 150M_eval.yml, toy sizes)."""
    cfg: dict[str, Any] = {
        "model_type": "tokenformer",
        **TINY,
        "seq_length": TINY["max_position_embeddings"],
        "pos_emb": "rotary",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "no_weight_tying": False,
        "norm": "layernorm_nonparam",
        "final_norm": "layernorm",
        "layernorm_epsilon": 1e-5,
        "gpt_j_residual": False,
        "norm_activation_type": norm_activation_type,
        "init_method": "normal",
        "output_layer_init_method": "wang_init",
    }
    cfg.update(overrides)
    return cfg


def tiny_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors for ``config`` in the official key layout."""
    g = torch.Generator().manual_seed(seed)
    d, layers = config["hidden_size"], config["num_layers"]
    kinds = {k: config[f] for k, f in SLOT_FIELDS.items()}

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {EMBEDDING: normal(config["vocab_size"], d, std=0.5)}
    for i in range(layers):
        block = f"sequential.{2 + i}"
        for role, kind in PATTENTION_MODULES.items():
            # keys ~ 1/√d so scores are O(1) and every normalisation is far from linear
            sd[f"{block}.{role}.key_param_tokens"] = normal(kinds[kind], d, std=1 / math.sqrt(d))
            sd[f"{block}.{role}.value_param_tokens"] = normal(kinds[kind], d, std=0.3)
    final = f"sequential.{layers + 3}.norm"
    sd[f"{final}.weight"] = 1 + normal(d, std=0.1)
    sd[f"{final}.bias"] = normal(d, std=0.1)
    if config.get("no_weight_tying"):
        sd[f"sequential.{layers + 4}.final_linear.weight"] = normal(config["vocab_size"], d, std=0.5)
    return sd


def build_tiny_tokenformer(out: str | Path, *, norm_activation_type: str = "l2_norm_gelu", seed: int = 0,
                           fmt: str = "safetensors", dtype: torch.dtype = torch.float32,
                           **overrides: Any) -> Path:
    """Write a tiny TokenFormer checkpoint folder and return it.

    Args:
        out: Folder to create (parents too).
        norm_activation_type: ``l2_norm_gelu``, ``gelu_l2_norm`` or ``softmax``.
        seed: Seed of the parameters.
        fmt: ``safetensors`` (model.safetensors) or ``bin`` (pytorch_model.bin, as released).
        dtype: Storage dtype.
        overrides: Config fields to change (sizes, ``no_weight_tying``...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(norm_activation_type, **overrides)
    sd = {k: v.to(dtype).contiguous() for k, v in tiny_state_dict(cfg, seed).items()}
    if fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
