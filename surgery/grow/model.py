"""A minimal TokenFormer language model: config, checkpoint layout and a reference forward.

Follows the released GPT-NeoX-based code (Haiyang-W/TokenFormer, ``megatron/model/
tokenformer.py``, ``configs/tokenformer/*.yml``) and the layout of its released
``pytorch_model.bin`` files (a DeepSpeed ``PipelineModule`` flattened to ``sequential.K``):

    sequential.0.word_embeddings.weight                         [vocab, d]
    sequential.{2+i}.attention.{query,key,value}.{key,value}_param_tokens   [qkv_slot_num, d]
    sequential.{2+i}.attention.proj.{key,value}_param_tokens    [proj_slot_num, d]
    sequential.{2+i}.mlp.{key,value}_param_tokens               [ffn_slot_num, d]
    sequential.{L+3}.norm.{weight,bias}                         final LayerNorm (``final_norm``)
    sequential.{L+4}.final_linear.weight                        only with ``no_weight_tying``

Block (pre-norm, non-parametric LayerNorm by default): h += proj(attn(q(x), k(x), v(x)));
h += ffn(norm(h)); causal softmax attention with scale 1/√head_dim and GPT-NeoX rotary
embeddings on the first ``rotary_pct`` of each head's dims. Logits use the tied
embedding. The forward reads one layer's tensors at a time through a getter, so a
checkpoint is evaluated without holding it in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from .pattention import NORM_TYPES, pattention

KEY_SUFFIX = "key_param_tokens"
VALUE_SUFFIX = "value_param_tokens"

# Module path inside a block -> which config slot count sizes it.
PATTENTION_MODULES: dict[str, str] = {
    "attention.query": "qkv",
    "attention.key": "qkv",
    "attention.value": "qkv",
    "attention.proj": "proj",
    "mlp": "ffn",
}
SLOT_FIELDS: dict[str, str] = {"qkv": "qkv_slot_num", "proj": "proj_slot_num", "ffn": "ffn_slot_num"}
# Written by `surgery grow --init zero`: the token count whose √ the normalisation keeps using.
NORM_SLOT_FIELDS: dict[str, str] = {"qkv": "qkv_norm_slot_num", "proj": "proj_norm_slot_num",
                                    "ffn": "ffn_norm_slot_num"}
KINDS = ("qkv", "proj", "ffn")

EMBEDDING = "sequential.0.word_embeddings.weight"

NORM_KINDS = ("layernorm_nonparam", "layernorm", "rmsnorm")


@dataclass
class TokenFormerConfig:
    """The config fields the forward pass and growth need (GPT-NeoX names)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    qkv_slot_num: int
    proj_slot_num: int
    ffn_slot_num: int
    norm_activation_type: str = "l2_norm_gelu"
    pos_emb: str = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    norm: str = "layernorm_nonparam"
    final_norm: str = "layernorm"
    layernorm_epsilon: float = 1e-5
    rms_norm_epsilon: float = 1e-8
    no_weight_tying: bool = False
    gpt_j_residual: bool = False
    norm_slot_num: dict[str, float] = field(default_factory=dict)

    def slots(self, kind: str) -> int:
        return int(getattr(self, SLOT_FIELDS[kind]))

    def scale_tokens(self, kind: str) -> float | None:
        """The frozen normalisation count for ``kind``, or None (use the live count)."""
        return self.norm_slot_num.get(kind)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config") -> "TokenFormerConfig":
        """Read a GPT-NeoX style config (keys with ``-`` or ``_``).

        Raises:
            InputError: a required field is missing or a value is not supported.
        """
        cfg = normalize_keys(raw)
        missing = [k for k in ("hidden_size", "num_layers", "num_attention_heads", *SLOT_FIELDS.values()) if k not in cfg]
        if missing:
            raise InputError(f"{where} lacks {', '.join(missing)}; a TokenFormer config (e.g. the official "
                             f"configs/tokenformer/150M_eval.yml) names them.")
        norm_type = cfg.get("norm_activation_type", "l2_norm_gelu")
        if norm_type not in NORM_TYPES:
            raise InputError(f"{where} has norm_activation_type {norm_type!r}; supported: {', '.join(NORM_TYPES)}.")
        # YAML 1.1 reads "1e-05" as a string: coerce every field to its declared type.
        kinds = {"pos_emb": str, "rotary_pct": float, "rotary_emb_base": float, "norm": str, "final_norm": str,
                 "layernorm_epsilon": float, "rms_norm_epsilon": float, "no_weight_tying": _boolean,
                 "gpt_j_residual": _boolean}
        try:
            kw: dict[str, Any] = {k: conv(cfg[k]) for k, conv in kinds.items() if cfg.get(k) is not None}
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where} has a value of the wrong type ({exc}).") from exc
        bad = next((k for k, v in kw.items() if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            raise InputError(f"{where} has {bad} = {kw[bad]}; it must be a finite number.")
        frozen = {kind: _count(cfg, f, where, number=True) for kind, f in NORM_SLOT_FIELDS.items()
                  if cfg.get(f) is not None}
        ints = {k: _count(cfg, k, where) for k in ("hidden_size", "num_layers", "num_attention_heads",
                                                   *SLOT_FIELDS.values())}
        return cls(**ints, norm_activation_type=norm_type, norm_slot_num=frozen, **kw)


def _count(cfg: dict[str, Any], key: str, where: str, number: bool = False) -> Any:
    """A positive integer (or, with ``number``, a positive finite number) field; YAML strings
    that spell one are accepted."""
    v = cfg[key]
    try:
        x = float(v) if not isinstance(v, bool) else float("nan")
    except (TypeError, ValueError):
        x = float("nan")
    if not math.isfinite(x) or x <= 0 or (not number and x != int(x)) or x > 2**40:
        kind = "a positive number" if number else "a positive integer"
        raise InputError(f"{where} has {key} = {v!r}; it must be {kind}.")
    return x if number else int(x)


def _boolean(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise ValueError(f"{v!r} is not true or false")
    return bool(v)


def normalize_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX accepts ``num-layers`` and ``num_layers``; use underscores throughout."""
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


@dataclass(frozen=True)
class PattentionSite:
    """One Pattention layer of the checkpoint."""

    module: str          # e.g. "sequential.2.attention.query"
    block: str           # e.g. "sequential.2"
    kind: str            # qkv / proj / ffn
    role: str            # attention.query ... mlp

    @property
    def key_name(self) -> str:
        return f"{self.module}.{KEY_SUFFIX}"

    @property
    def value_name(self) -> str:
        return f"{self.module}.{VALUE_SUFFIX}"


def _block_index(block: str) -> int | None:
    head, _, tail = block.rpartition(".")
    return int(tail) if tail.isdigit() and head.endswith("sequential") else None


def find_pattention(names: Iterable[str], *, label: str = "checkpoint") -> list[PattentionSite]:
    """Every Pattention layer among tensor ``names``, in block order.

    Raises:
        InputError: no ``*key_param_tokens`` tensor (not a TokenFormer checkpoint), a key
            tensor outside the known layout, or a key without its value tensor.
    """
    names = set(names)
    sites = []
    for name in sorted(names):
        if not name.endswith("." + KEY_SUFFIX):
            continue
        module = name[: -len(KEY_SUFFIX) - 1]
        for role, kind in PATTENTION_MODULES.items():
            if module.endswith("." + role):
                block = module[: -len(role) - 1]
                if _block_index(block) is not None:
                    break
        else:
            raise InputError(f"{label}: tensor {name!r} is not in the TokenFormer layout "
                             f"(sequential.K.{{{','.join(PATTENTION_MODULES)}}}.key_param_tokens).", tensor=name)
        site = PattentionSite(module, block, kind, role)
        if site.value_name not in names:
            raise InputError(f"{label} has {name!r} but no {site.value_name!r}; the checkpoint is incomplete.",
                             tensor=site.value_name)
        sites.append(site)
    if not sites:
        raise InputError(f"{label} is not a TokenFormer checkpoint: no tensor ends in '{KEY_SUFFIX}' "
                         f"(TokenFormer stores Pattention layers as key/value parameter tokens).")
    sites.sort(key=lambda s: (_block_index(s.block), list(PATTENTION_MODULES).index(s.role)))
    return sites


def blocks(sites: list[PattentionSite]) -> list[str]:
    """Block prefixes in order (``sequential.2``, ``sequential.3``, ...)."""
    seen: dict[str, None] = {}
    for s in sites:
        seen.setdefault(s.block, None)
    return list(seen)


def final_norm_prefix(sites: list[PattentionSite]) -> str:
    """``sequential.{L+3}.norm``: the final norm follows the last block and a reshape lambda."""
    last = _block_index(blocks(sites)[-1])
    return f"sequential.{last + 2}.norm"


def head_name(sites: list[PattentionSite], config: TokenFormerConfig) -> str:
    """The output projection: the tied embedding, or ``sequential.{L+4}.final_linear.weight``."""
    if not config.no_weight_tying:
        return EMBEDDING
    last = _block_index(blocks(sites)[-1])
    return f"sequential.{last + 3}.final_linear.weight"


# ---- forward --------------------------------------------------------------------------------

def _norm(x: torch.Tensor, kind: str, eps: float, rms_eps: float, get: Callable[[str], torch.Tensor],
          has: Callable[[str], bool], prefix: str) -> torch.Tensor:
    if kind in ("layernorm", "layernorm_nonparam"):
        w = get(prefix + ".weight") if kind == "layernorm" and has(prefix + ".weight") else None
        b = get(prefix + ".bias") if kind == "layernorm" and has(prefix + ".bias") else None
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    if kind == "rmsnorm":
        # GPT-NeoX RMSNorm: x / (‖x‖/√d + eps) * scale
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
        y = x / (rms + rms_eps)
        return y * get(prefix + ".scale") if has(prefix + ".scale") else y
    raise InputError(f"norm {kind!r} is not supported by the reference forward; supported: {', '.join(NORM_KINDS)}.")


def _rotary(x: torch.Tensor, dims: int, base: float) -> torch.Tensor:
    """GPT-NeoX rotary embedding (rotate-half form) on the first ``dims`` of ``x`` [B, S, H, hd]."""
    if dims <= 0:
        return x
    seq = x.shape[1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float64, device=x.device) / dims))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64, device=x.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().to(x.dtype)[None, :, None, :]
    sin = emb.sin().to(x.dtype)[None, :, None, :]
    rot, rest = x[..., :dims], x[..., dims:]
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def check_supported(config: TokenFormerConfig) -> None:
    """Raise InputError when the config asks for something the reference forward does not do."""
    problems = []
    if config.pos_emb not in ("rotary", "none"):
        problems.append(f"pos_emb {config.pos_emb!r} (supported: rotary, none)")
    for field_name in ("norm", "final_norm"):
        if getattr(config, field_name) not in NORM_KINDS:
            problems.append(f"{field_name} {getattr(config, field_name)!r} (supported: {', '.join(NORM_KINDS)})")
    if config.gpt_j_residual:
        problems.append("gpt_j_residual true")
    if config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
    if problems:
        raise InputError("the reference TokenFormer forward cannot evaluate this config: " + "; ".join(problems)
                         + "; grow without checking the function with `verify=False`.")


def lm_logits(get: Callable[[str], torch.Tensor], has: Callable[[str], bool], sites: list[PattentionSite],
              config: TokenFormerConfig, input_ids: torch.Tensor, *,
              get_rows: Callable[[str, int, int], torch.Tensor] | None = None, vocab_size: int | None = None,
              rows_per_block: int = 8192) -> torch.Tensor:
    """Logits of a TokenFormer LM on ``input_ids`` [B, S].

    Args:
        get: Returns a tensor by checkpoint name, already in the compute dtype and device.
        has: Whether the checkpoint holds a tensor name.
        sites: :func:`find_pattention` of the checkpoint.
        config: The model config (slot counts are read from the tensors, not from here).
        input_ids: Token ids.
        get_rows: Optional ``get_rows(name, start, stop)``; with ``vocab_size`` the embedding
            and head are read in blocks of ``rows_per_block`` rows, so a large vocabulary
            never sits in memory at the compute precision all at once.
        vocab_size: Rows of the embedding (needed with ``get_rows``).
        rows_per_block: Block size for ``get_rows``.

    Returns:
        ``[B, S, vocab]`` logits in the compute dtype.
    """
    check_supported(config)
    by_block: dict[str, dict[str, PattentionSite]] = {}
    for s in sites:
        by_block.setdefault(s.block, {})[s.role] = s
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    rot_dims = head_dim if config.rotary_pct >= 1 else int(head_dim * config.rotary_pct)
    if config.pos_emb != "rotary":
        rot_dims = 0
    eps, rms_eps = config.layernorm_epsilon, config.rms_norm_epsilon

    def pat(site: PattentionSite, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, get(site.key_name), get(site.value_name), config.norm_activation_type,
                          config.scale_tokens(site.kind))

    def blocks_of(name: str):
        if get_rows is None or vocab_size is None:
            yield 0, get(name)
            return
        for start in range(0, vocab_size, rows_per_block):
            yield start, get_rows(name, start, min(vocab_size, start + rows_per_block))

    h = None
    for start, emb in blocks_of(EMBEDDING):
        local = input_ids.to(emb.device) - start
        inside = (local >= 0) & (local < emb.shape[0])
        part = F.embedding(local.clamp(0, emb.shape[0] - 1), emb) * inside[..., None]
        h = part if h is None else h + part
        del emb
    bsz, seq, _ = h.shape
    mask = torch.ones(seq, seq, dtype=torch.bool, device=h.device).triu(1)
    for block in blocks(sites):
        mods = by_block[block]
        missing = [r for r in PATTENTION_MODULES if r not in mods]
        if missing:
            raise InputError(f"block {block} lacks Pattention layers {', '.join(missing)}.", tensor=block)
        x = _norm(h, config.norm, eps, rms_eps, get, has, f"{block}.input_layernorm")
        q, k, v = (pat(mods[r], x).view(bsz, seq, heads, head_dim)
                   for r in ("attention.query", "attention.key", "attention.value"))
        q, k = _rotary(q, rot_dims, config.rotary_emb_base), _rotary(k, rot_dims, config.rotary_emb_base)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(mask, float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v).reshape(bsz, seq, -1)
        h = h + pat(mods["attention.proj"], ctx)
        x = _norm(h, config.norm, eps, rms_eps, get, has, f"{block}.post_attention_layernorm")
        h = h + pat(mods["mlp"], x)
    h = _norm(h, config.final_norm, eps, rms_eps, get, has, final_norm_prefix(sites))
    return torch.cat([h @ w.transpose(0, 1) for _, w in blocks_of(head_name(sites, config))], dim=-1)
