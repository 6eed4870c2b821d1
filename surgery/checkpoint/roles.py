"""Tensor roles from names and shapes: matrix / vector / embedding, sublayer type, depth.

The name patterns are one data table (Llama, GPT-2 and BERT families), not regexes spread
through the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .format import TensorInfo


class TensorRole(str, Enum):
    MATRIX = "matrix"        # 2-D projection / linear weight
    EMBEDDING = "embedding"  # token / position embeddings and tied output heads
    VECTOR = "vector"        # biases, norms, anything 1-D
    OTHER = "other"          # scalars, >2-D tensors, integer buffers


# (name suffix pattern, sublayer type). First match wins; matched against the full name.
SUBLAYER_TABLE: list[tuple[str, str]] = [
    (r"(q_proj|self_attn\.q|attention\.self\.query|attn\.q)\.weight$", "q"),
    (r"(k_proj|attention\.self\.key|attn\.k)\.weight$", "k"),
    (r"(v_proj|attention\.self\.value|attn\.v)\.weight$", "v"),
    (r"attn\.c_attn\.weight$", "qkv"),
    (r"(query_key_value|qkv_proj|Wqkv)\.weight$", "qkv"),
    (r"(o_proj|attention\.output\.dense|attn\.c_proj|out_proj)\.weight$", "o"),
    (r"(gate_proj|w1)\.weight$", "gate"),
    (r"(up_proj|w3|intermediate\.dense|mlp\.c_fc|fc1)\.weight$", "up"),
    (r"(down_proj|w2|output\.dense|mlp\.c_proj|fc2)\.weight$", "down"),
    (r"(embed_tokens|word_embeddings|wte|tok_embeddings)\.weight$", "embed"),
    (r"(position_embeddings|wpe|token_type_embeddings)\.weight$", "pos_embed"),
    (r"(^|\.)(lm_head|embed_out|output)\.weight$", "lm_head"),
]
_COMPILED = [(re.compile(p), t) for p, t in SUBLAYER_TABLE]
# BERT's attention.output.dense must be "o", its plain output.dense "down": order matters above,
# so the attention pattern is checked first explicitly.
_BERT_ATTN_OUT = re.compile(r"attention\.output\.dense\.weight$")
_DEPTH = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
EMBEDDING_TYPES = {"embed", "pos_embed", "lm_head"}


@dataclass(frozen=True)
class Role:
    role: TensorRole
    sublayer: str | None
    depth: int | None


def sublayer_of(name: str) -> str | None:
    """Sublayer type of a weight name (q, k, v, qkv, o, gate, up, down, embed, pos_embed, lm_head)."""
    if _BERT_ATTN_OUT.search(name):
        return "o"
    for rx, kind in _COMPILED:
        if rx.search(name):
            return kind
    return None


def depth_of(name: str) -> int | None:
    """Block index parsed from the name (``model.layers.3.`` -> 3), or None."""
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


def with_depth(name: str, depth: int) -> str:
    """``name`` with its block index replaced by ``depth`` (unchanged when it has none)."""
    m = _DEPTH.search(name)
    if m is None:
        return name
    start, end = m.span(1)
    return name[:start] + str(depth) + name[end:]


def role_of(info: TensorInfo) -> Role:
    """Classify a tensor by its name and header."""
    sub = sublayer_of(info.name)
    depth = depth_of(info.name)
    if not info.dtype.is_floating_point:
        return Role(TensorRole.OTHER, sub, depth)
    if info.ndim == 2:
        if sub in EMBEDDING_TYPES or "embed" in info.name:
            return Role(TensorRole.EMBEDDING, sub, depth)
        return Role(TensorRole.MATRIX, sub, depth)
    if info.ndim == 1:
        return Role(TensorRole.VECTOR, sub, depth)
    return Role(TensorRole.OTHER, sub, depth)
