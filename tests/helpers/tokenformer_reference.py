"""An independent float64 TokenFormer forward for the tests, written from the released code
(Haiyang-W/TokenFormer megatron/model/tokenformer.py, norms.py; GPT-NeoX rotary) and the
key renaming of kroggen/tokenformer-minimal (sequential.{i+2}.attention -> layers.i,
sequential.{i+2}.mlp -> layers.i.ffn). It shares no code with surgery.grow.model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def official_norm(attn: torch.Tensor, kind: str, scale_tokens: float | None = None) -> torch.Tensor:
    """nonlinear_norm_func of the released Pattention (exp / L1 for softmax), with an optional frozen count."""
    n = attn.shape[-1] if scale_tokens is None else scale_tokens
    if kind == "softmax":
        e = torch.exp(attn)
        return e / torch.norm(e, p=1, dim=-1, keepdim=True) * n
    if kind == "gelu_l2_norm":
        g = F.gelu(attn)
        return g / torch.norm(g, p=2, dim=-1, keepdim=True) * math.sqrt(n)
    if kind == "l2_norm_gelu":
        return F.gelu(attn / torch.norm(attn, p=2, dim=-1, keepdim=True) * math.sqrt(n))
    raise NotImplementedError(kind)


def official_pattention(x, key, value, kind, scale_tokens=None):
    attn = x @ key.transpose(-2, -1)
    attn = attn * torch.ones(attn.shape[-2], attn.shape[-1], dtype=attn.dtype)  # attn_bias of ones
    return official_norm(attn, kind, scale_tokens) @ value


def _layernorm(x, eps, weight=None, bias=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def _rotary_pairs(x, dims, base):
    """Rotate (x_j, x_{j+dims/2}) by angle pos·base^(-2j/dims): the rotate-half form, written pairwise."""
    if dims == 0:
        return x
    s = x.shape[2]
    half = dims // 2
    j = torch.arange(half, dtype=torch.float64)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * base ** (-2 * j / dims)[None, :]  # [s, half]
    c, sn = torch.cos(ang), torch.sin(ang)
    a, b = x[..., :half], x[..., half:dims]
    return torch.cat((a * c - b * sn, b * c + a * sn, x[..., dims:]), dim=-1)


def load(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    sd = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    return sd, json.loads((folder / "config.json").read_text())


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, *,
                     honour_frozen: bool = True) -> torch.Tensor:
    """Logits [B, S, V] in float64 (batch-first layout, SDPA causal attention)."""
    L, d, H = cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    hd = d // H
    rot = hd if cfg.get("rotary_pct", 1.0) >= 1 else int(hd * cfg["rotary_pct"])
    base, eps, kind = cfg.get("rotary_emb_base", 10000), cfg.get("layernorm_epsilon", 1e-5), cfg["norm_activation_type"]
    frozen = {k: (cfg.get(f"{k}_norm_slot_num") if honour_frozen else None) for k in ("qkv", "proj", "ffn")}
    renamed = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "sequential" and 2 <= int(parts[1]) < 2 + L:
            i = int(parts[1]) - 2
            rest = ".".join(parts[2:]).replace("attention.", "").replace("mlp.", "ffn.")
            renamed[f"layers.{i}.{rest}"] = v
        else:
            renamed[k] = v
    emb = renamed["sequential.0.word_embeddings.weight"]
    h = emb[ids]
    B, S = ids.shape
    for i in range(L):
        p = f"layers.{i}."
        pat = lambda name, x, slot: official_pattention(x, renamed[p + name + ".key_param_tokens"],
                                                         renamed[p + name + ".value_param_tokens"], kind, frozen[slot])
        x = _layernorm(h, eps)
        q, k, v = (pat(n, x, "qkv").view(B, S, H, hd).transpose(1, 2) for n in ("query", "key", "value"))
        q, k = _rotary_pairs(q, rot, base), _rotary_pairs(k, rot, base)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, d)
        h = h + pat("proj", ctx, "proj")
        h = h + pat("ffn", _layernorm(h, eps), "ffn")
    fn = f"sequential.{L + 3}.norm"
    h = _layernorm(h, eps, renamed[fn + ".weight"], renamed[fn + ".bias"])
    head = renamed[f"sequential.{L + 4}.final_linear.weight"] if cfg.get("no_weight_tying") else emb
    return h @ head.T
