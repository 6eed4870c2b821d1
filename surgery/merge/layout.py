"""Where a checkpoint's layers are: the tensors before the layer stack, each layer's tensors,
and the tensors after it — read from tensor names and config.json alone (no tensor data).

mergekit reads this from per-architecture JSON files; surgery infers it from the names, so it
works for any architecture whose layers are numbered blocks (``model.layers.N.``,
``transformer.h.N.``, ``encoder.layer.N.``, ``blocks.N.``...). Slices (frankenmerges) need
exactly one such stack; whole-model merges need none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.errors import IncompatibleCheckpointsError

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|layer|blocks|block)\.)(\d+)\.(.+)$")
# Non-layer tensors that come after the layer stack (final norms, output heads); the rest
# (embeddings, their norms) come before it. First match wins; matched against the full name.
POST_PATTERNS = tuple(re.compile(p) for p in (
    r"(^|\.)(lm_head|embed_out|output|score|classifier|pooler|qa_outputs|cls)\.",
    r"(^|\.)(norm|ln_f|final_layer_norm|final_layernorm|final_norm|norm_f|norm_out)\.",
))
PRE_PATTERNS = tuple(re.compile(p) for p in (
    r"(embed|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|token_type_embeddings|rotary)",
))
# config.json keys holding the layer count, in the order they are looked for.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config.json keys holding one entry per layer (resized when the layer count changes).
PER_LAYER_KEYS = ("layer_types",)


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (``model.layers.``, 3, ``mlp.up_proj.weight``)."""
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def is_post(name: str) -> bool:
    """A non-layer tensor that follows the layers (final norm, heads)."""
    if any(p.search(name) for p in POST_PATTERNS):
        return True
    return not any(p.search(name) for p in PRE_PATTERNS)


def config_layers(config: dict | None) -> tuple[str, int] | None:
    """(key, value) of the layer count in config.json, if it has one."""
    for key in LAYER_COUNT_KEYS:
        v = (config or {}).get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return key, v
    return None


@dataclass
class Layout:
    """A checkpoint's tensor names by position.

    Attributes:
        label: The checkpoint (for messages).
        prefix: The text before the layer index (``model.layers.``); None without layers.
        prefixes: Every distinct layer prefix found (more than one: several stacks, e.g. a
            vision tower and a language model).
        layers: Per layer index, the names after ``prefix{i}.`` (sorted).
        pre, post: Non-layer tensor names before and after the stack.
        num_layers: The layer count (config.json's, else the highest index + 1).
        count_key: The config.json key holding it (None when absent).
    """

    label: str
    prefix: str | None
    prefixes: list[str]
    layers: dict[int, list[str]] = field(default_factory=dict)
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    num_layers: int = 0
    count_key: str | None = None

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}{index}.{suffix}"

    def depth(self, name: str) -> int | None:
        """The layer index of ``name`` in this layout's stack (None outside it)."""
        parts = split_layer(name)
        return parts[1] if parts and parts[0] == self.prefix else None

    def check_stackable(self, where: str) -> None:
        """Slices need one layer stack; raise naming ``where`` otherwise."""
        if self.prefix is None:
            raise IncompatibleCheckpointsError(f"{where}: {self.label} has no numbered layers (no tensor named like "
                                               f"'model.layers.N.…'), so it cannot be sliced.", path=self.label)
        if len(self.prefixes) > 1:
            raise IncompatibleCheckpointsError(
                f"{where}: {self.label} has several layer stacks ({', '.join(p + 'N' for p in self.prefixes)}), so a "
                f"layer_range is ambiguous; merge it with 'models' instead of 'slices'.", path=self.label)


def layout_of(names: list[str], config: dict | None, label: str) -> Layout:
    """The layout of a checkpoint with tensor ``names`` and parsed ``config``."""
    counts: dict[str, int] = {}
    parsed = {}
    for n in names:
        parts = split_layer(n)
        if parts:
            parsed[n] = parts
            counts[parts[0]] = counts.get(parts[0], 0) + 1
    prefixes = sorted(counts, key=lambda p: -counts[p])
    prefix = prefixes[0] if prefixes else None
    lay = Layout(label, prefix, prefixes)
    for n in names:
        parts = parsed.get(n)
        if parts and parts[0] == prefix:
            lay.layers.setdefault(parts[1], []).append(parts[2])
        elif parts is None or len(prefixes) > 1:
            (lay.post if parts is None and is_post(n) else lay.pre).append(n)
    for suffixes in lay.layers.values():
        suffixes.sort()
    found = config_layers(config)
    lay.count_key = found[0] if found else None
    lay.num_layers = found[1] if found else (max(lay.layers) + 1 if lay.layers else 0)
    return lay
