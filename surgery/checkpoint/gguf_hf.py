"""GGUF <-> Hugging Face: tensor names, per-tensor transforms, config and tokenizer.

Reading follows transformers' own GGUF loader (``modeling_gguf_pytorch_utils``) so a
converted folder equals ``from_pretrained(dir, gguf_file=...)``:

- names: the HF model is built on the meta device from the config; each of its parameter
  names goes through gguf-py's tensor name map for the architecture (also with leading
  module names stripped, as the loader does for sub-modules); GGUF tensors that map to no
  parameter are dropped, as the loader drops them (and listed in the report);
- values: the per-architecture transforms in :data:`READ_TRANSFORMS` (llama.cpp permutes
  the rows of Q and K for its RoPE layout; Gemma stores norms as 1 + w; GPT-2 stores some
  matrices transposed; ...);
- config: transformers' GGUF metadata table (``GGUF_CONFIG_MAPPING``) applied to the
  header we already parsed; architectures with special rules go through ``AutoConfig``;
- tokenizer: ``AutoTokenizer.from_pretrained(..., gguf_file=...)``, saved beside the weights.

Writing (``--to gguf``) is the inverse for the Llama architecture: llama.cpp's names, its
Q/K row permutation, metadata keys and tokenizer arrays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import CorruptCheckpointError, IncompatibleCheckpointsError, UsageError
from ..core.formats import read_json
from .gguf import GGUFArray, GGUFFile, GGUFTensorInfo

# GGUF architectures whose config transformers builds with special rules (or a newer
# table): their config comes from ``AutoConfig.from_pretrained(..., gguf_file=...)``.
SPECIAL_CONFIG_ARCHS = ("t5", "t5encoder", "stablelm", "lfm2", "gpt-oss", "gpt_oss", "minimax-m2", "gemma4",
                        "qwen35", "qwen35moe")
# Mixture-of-experts files whose expert tensors are split or merged into other shapes on load.
MOE_ARCHS = ("qwen2moe", "qwen3moe", "gpt-oss", "gpt_oss", "minimax-m2", "qwen35moe")
# transformers model_type -> gguf-py architecture name, where they differ.
MODEL_TYPE_TO_GGUF = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                      "gemma3_text": "gemma3", "gemma4_text": "gemma4", "umt5": "t5", "minimax_m2": "minimax-m2",
                      "gpt_oss": "gpt-oss"}


# ------------------------------------------------------------------------------ transforms

def _reverse_permute(w, heads: int):
    """Undo llama.cpp's Q/K row permutation: per head, rows (2, d) interleaved back to (d, 2)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _forward_permute(w, heads: int):
    """llama.cpp's Q/K row permutation (``convert_hf_to_gguf.LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_heads(name: str, cfg: dict) -> int | None:
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads is None or kv is None:
        return None
    if ".attn_q." in name:
        return heads
    if ".attn_k." in name:
        return kv
    return None


def _bloom_qkv(w, cfg: dict):
    heads, embed = cfg["n_head"], cfg["hidden_size"]
    q, k, v = (p.reshape(heads, embed // heads, *p.shape[1:]) for p in _split3(w))
    import numpy as np

    return np.stack([q, k, v], axis=1).reshape(w.shape)


def _split3(w):
    import numpy as np

    return np.array_split(w, 3, axis=0)


@dataclass(frozen=True)
class Transform:
    """How one GGUF tensor becomes its HF tensor. ``elementwise`` transforms can run on any
    row block; the others need the whole tensor."""

    applies: Callable[[str], bool]
    fn: Callable[[Any, str, dict], Any]
    elementwise: bool = False


def _has(*parts: str) -> Callable[[str], bool]:
    return lambda name: any(p in name for p in parts)


_LLAMA = [Transform(lambda n: ".attn_q." in n or ".attn_k." in n,
                    lambda w, n, c: _reverse_permute(w, _llama_heads(n, c)) if _llama_heads(n, c) else w)]
_NORM_MINUS_ONE = [Transform(_has("norm.weight"), lambda w, n, c: w - 1, elementwise=True)]
_GPT2 = [Transform(_has("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight"),
                   lambda w, n, c: w.T)]
_MAMBA = [Transform(_has("ssm_conv1d"), lambda w, n, c: w.reshape(w.shape[0], 1, *w.shape[1:])),
          Transform(_has("ssm_a"), lambda w, n, c: __import__("numpy").log(-w), elementwise=True)]
_LFM2 = [Transform(_has("shortconv.conv.weight"), lambda w, n, c: w.reshape(w.shape[0], 1, *w.shape[1:]))]
_BLOOM = [Transform(lambda n: "attn_qkv" in n and n.endswith("weight"), lambda w, n, c: _bloom_qkv(w, c)),
          Transform(lambda n: "attn_qkv" in n and n.endswith("bias"), lambda w, n, c: _bloom_qkv(w, c))]

# GGUF general.architecture -> transforms, as transformers' TENSOR_PROCESSORS apply them.
READ_TRANSFORMS: dict[str, list[Transform]] = {
    "llama": _LLAMA, "gemma2": _NORM_MINUS_ONE, "gemma3": _NORM_MINUS_ONE, "nemotron": _NORM_MINUS_ONE,
    "gpt2": _GPT2, "mamba": _MAMBA, "lfm2": _LFM2, "bloom": _BLOOM,
}
# GGUF names whose HF name is fixed rather than found through the name map.
FIXED_NAMES = {"gpt2": {"output.weight": "lm_head.weight"}}


def transform_for(arch: str, gguf_name: str) -> Transform | None:
    for t in READ_TRANSFORMS.get(arch, []):
        if t.applies(gguf_name):
            return t
    return None


# ------------------------------------------------------------------------------ config

def _value(v: Any) -> Any:
    if isinstance(v, GGUFArray):
        items = v.values()
        return items[0] if len(items) == 1 else items
    return v


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """The transformers config dict for this GGUF file, as ``AutoConfig.from_pretrained(...,
    gguf_file=...)`` builds it (``architectures`` set to the causal-LM class).

    Raises:
        IncompatibleCheckpointsError: transformers does not support the architecture.
    """
    import transformers

    arch = gf.architecture or ""
    if arch in SPECIAL_CONFIG_ARCHS:
        cfg = transformers.AutoConfig.from_pretrained(str(gf.path.parent), gguf_file=gf.path.name).to_dict()
    else:
        cfg = _config_dict(gf, arch)
        model_type = cfg.get("model_type")
        if model_type not in transformers.CONFIG_MAPPING:
            raise IncompatibleCheckpointsError(
                f"{gf.path} is a GGUF of architecture {arch!r}, which transformers cannot load; surgery convert "
                f"supports the architectures transformers' GGUF loader does.", path=gf.path)
        cfg = transformers.CONFIG_MAPPING[model_type].from_dict(cfg).to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = [model_class_name(cfg)]
    return cfg


def _config_dict(gf: GGUFFile, arch: str) -> dict[str, Any]:
    from transformers.integrations import GGUF_CONFIG_MAPPING
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING

    name = gf.get("general.name") or ""
    updated = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)
    if "llama" in arch and "mistral" in str(name).lower():
        updated = "mistral"
    if arch not in GGUF_CONFIG_MAPPING and updated not in GGUF_CONFIG_MAPPING:
        raise IncompatibleCheckpointsError(
            f"{gf.path} is a GGUF of architecture {arch!r}, which transformers' GGUF loader does not support; "
            f"convert it with a tool that knows this architecture.", path=gf.path)
    cfg: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in gf.tensors)
                           or arch in ("falcon", "bloom")}
    for k, v in (GGUF_CONFIG_DEFAULTS_MAPPING.get(updated) or GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        cfg.setdefault(k, v)
    for key, raw in gf.metadata.items():
        key = key.replace(arch, updated)
        prefix, _, rest = key.partition(".")
        table = GGUF_CONFIG_MAPPING.get(prefix)
        if table is None or rest not in table:
            continue
        target = table[rest]
        if target == -1 or target is None:
            continue
        value = _value(raw)
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        cfg[target] = value
    if cfg.get("model_type") == "gemma3":
        cfg["model_type"] = "gemma3_text"
    if "vocab_size" not in cfg and isinstance(gf.get("tokenizer.ggml.tokens"), GGUFArray):
        cfg["vocab_size"] = gf.get("tokenizer.ggml.tokens").count
    return cfg


def model_class_name(cfg: dict[str, Any]) -> str:
    """The class transformers loads this config with: causal LM, else seq2seq, else the base model."""
    from transformers.models.auto import modeling_auto as ma

    mt = cfg.get("model_type")
    for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                    ma.MODEL_MAPPING_NAMES):
        if mt in mapping:
            name = mapping[mt]
            return name if isinstance(name, str) else name[0]
    raise IncompatibleCheckpointsError(f"transformers has no model class for model_type {mt!r}.")


def meta_parameters(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the HF model's state dict, built on the meta device (no memory)."""
    import torch
    import transformers

    config = transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    cls = getattr(transformers, model_class_name(cfg))
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ names

def gguf_arch_for(model_type: str):
    """gguf-py's MODEL_ARCH for a transformers model_type."""
    from gguf import MODEL_ARCH_NAMES

    name = MODEL_TYPE_TO_GGUF.get(model_type, model_type)
    for arch, value in MODEL_ARCH_NAMES.items():
        if value == name:
            return arch
    raise IncompatibleCheckpointsError(f"gguf-py knows no architecture {name!r}; upgrade gguf (pip install -U gguf).")


def gguf_to_hf_names(hf_names: list[str], model_type: str, num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name for every HF name gguf-py's map knows, trying
    the full name first and then with leading module names stripped (the loader's recursion
    into sub-modules), the first match winning."""
    from gguf import get_tensor_name_map

    name_map = get_tensor_name_map(gguf_arch_for(model_type), num_layers)
    out: dict[str, str] = {}
    depth = max((n.count(".") for n in hf_names), default=0)
    for strip in range(depth + 1):
        for hf in hf_names:
            parts = hf.split(".")
            if strip >= len(parts) - 1:
                continue
            inner = ".".join(parts[strip:])
            base, suffix = inner, ""
            if inner.endswith((".weight", ".bias")):
                base, suffix = inner.rsplit(".", 1)
                suffix = "." + suffix
            gguf_name = name_map.get_name(base)
            if gguf_name is not None:
                out.setdefault(gguf_name + suffix, hf)
    return out


@dataclass
class ReadPlanEntry:
    """One HF tensor made from one GGUF tensor."""

    hf_name: str
    source: GGUFTensorInfo
    shape: tuple[int, ...]
    transform: Transform | None


def read_plan(gf: GGUFFile, cfg: dict[str, Any]) -> tuple[list[ReadPlanEntry], list[str]]:
    """Which GGUF tensor becomes which HF tensor (and how), and the GGUF tensors dropped.

    Raises:
        IncompatibleCheckpointsError: A MoE file whose experts are re-shaped on load; a shape
            that does not match the model; a model parameter no GGUF tensor provides.
    """
    arch = gf.architecture or ""
    if arch in MOE_ARCHS:
        raise IncompatibleCheckpointsError(
            f"{gf.path} is a mixture-of-experts GGUF ({arch}), whose expert tensors transformers splits and "
            f"merges on load; surgery convert does not rebuild those yet; load it with transformers instead.",
            path=gf.path)
    params = meta_parameters(cfg)
    num_layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0)
    mapping = gguf_to_hf_names(list(params), cfg["model_type"], num_layers)
    mapping.update(FIXED_NAMES.get(arch, {}))
    entries, dropped = [], []
    for t in gf.tensors:
        hf = mapping.get(t.name)
        if hf is None or hf not in params:
            dropped.append(t.name)
            continue
        tr = transform_for(arch, t.name)
        shape = params[hf]
        if math.prod(shape) != t.numel:
            raise IncompatibleCheckpointsError(
                f"GGUF tensor {t.name!r} in {gf.path} has shape {list(t.shape)} but {hf!r} of "
                f"{cfg['architectures'][0]} has {list(shape)}; the file and its metadata disagree.",
                path=gf.path, tensor=t.name)
        entries.append(ReadPlanEntry(hf, t, shape, tr))
    provided = {e.hf_name for e in entries}
    tied = bool(cfg.get("tie_word_embeddings"))
    missing = [n for n in params if n not in provided and not (tied and _is_output_head(n))
               and not n.endswith(("rotary_emb.inv_freq", "masked_bias", "attn.bias"))]
    if missing:
        raise IncompatibleCheckpointsError(
            f"{gf.path} has no tensor for {len(missing)} parameter(s) of {cfg['architectures'][0]}, first "
            f"{missing[0]!r}; the converted model would be incomplete.", path=gf.path, tensor=missing[0])
    return entries, dropped


def _is_output_head(name: str) -> bool:
    return name in ("lm_head.weight", "embed_out.weight") or name.endswith("lm_head.weight")


# ------------------------------------------------------------------------------ writing (Llama)

WRITE_QUANTS = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "f32": "F32"}
# llama.cpp's general.file_type for each --quant.
FILE_TYPE_OF_QUANT = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
WRITABLE_MODEL_TYPES = ("llama",)


@dataclass
class WritePlanEntry:
    """One GGUF tensor made from one HF tensor."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    ggml_type: str
    permute_heads: int | None


def write_plan(names_shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any], quant: str, label: str
               ) -> tuple[list[WritePlanEntry], list[str]]:
    """Llama HF tensors -> GGUF tensors: llama.cpp's names, types and Q/K permutation.

    1-D tensors stay F32 (llama.cpp's rule); matrices whose rows do not fill whole Q8_0
    blocks fall back to F16. A tied ``lm_head`` is not written (llama.cpp ties by absence).

    Returns:
        The plan and the HF tensors that have no GGUF counterpart (not written).
    """
    from gguf import get_tensor_name_map

    model_type = cfg.get("model_type")
    if model_type not in WRITABLE_MODEL_TYPES:
        raise UsageError(f"{label} is a {model_type or 'unknown'} model; `surgery convert --to gguf` writes the Llama "
                         f"architecture only (model_type llama).", path=label)
    layers = int(cfg["num_hidden_layers"])
    name_map = get_tensor_name_map(gguf_arch_for(model_type), layers)
    heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    plan, skipped = [], []
    for hf, shape in sorted(names_shapes.items()):
        if hf.endswith("rotary_emb.inv_freq") or (tied and hf == "lm_head.weight"):
            skipped.append(hf)
            continue
        base, suffix = hf, ""
        if hf.endswith((".weight", ".bias")):
            base, suffix = hf.rsplit(".", 1)
            suffix = "." + suffix
        g = name_map.get_name(base)
        if g is None:
            skipped.append(hf)
            continue
        gname = g + suffix
        if len(shape) < 2:
            gtype = "F32"
        else:
            gtype = WRITE_QUANTS[quant]
            if gtype == "Q8_0" and shape[-1] % 32:
                gtype = "F16"
        perm = heads if ".attn_q." in gname else kv if ".attn_k." in gname else None
        plan.append(WritePlanEntry(gname, hf, tuple(shape), gtype, perm))
    return plan, skipped


def llama_metadata(cfg: dict[str, Any], name: str, quant: str) -> list[tuple[str, Any, str]]:
    """(key, value, gguf value type) of the model keys llama.cpp reads for a Llama model."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    out = [
        ("general.name", name, "string"),
        ("general.file_type", FILE_TYPE_OF_QUANT[quant], "uint32"),
        ("general.quantization_version", 2, "uint32"),
        ("llama.context_length", int(cfg.get("max_position_embeddings", 2048)), "uint32"),
        ("llama.embedding_length", int(cfg["hidden_size"]), "uint32"),
        ("llama.block_count", int(cfg["num_hidden_layers"]), "uint32"),
        ("llama.feed_forward_length", int(cfg["intermediate_size"]), "uint32"),
        ("llama.attention.head_count", heads, "uint32"),
        ("llama.attention.head_count_kv", int(cfg.get("num_key_value_heads") or heads), "uint32"),
        ("llama.rope.freq_base", float(theta), "float32"),
        ("llama.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), "float32"),
        ("llama.vocab_size", int(cfg["vocab_size"]), "uint32"),
        ("llama.rope.dimension_count", head_dim, "uint32"),
    ]
    if rope_type == "linear":
        out += [("llama.rope.scaling.type", "linear", "string"),
                ("llama.rope.scaling.factor", float(rope["factor"]), "float32")]
    elif rope_type not in ("default", None):
        raise UsageError(f"rope scaling {rope_type!r} is not written to GGUF by surgery yet (linear and none are); "
                         f"use llama.cpp's convert_hf_to_gguf.py for this model.")
    return out


# ------------------------------------------------------------------------------ tokenizer (writing)

def tokenizer_metadata(folder: Path, vocab_size: int, pre: str | None = None) -> list[tuple[str, Any, str]]:
    """Tokenizer keys for a GGUF from an HF folder's tokenizer files.

    A byte-level BPE ``tokenizer.json`` (GPT-2, Llama 3, SmolLM, Qwen...) becomes llama.cpp's
    ``gpt2`` model: tokens by id, token types (added special tokens CONTROL, other added
    tokens USER_DEFINED), merges; a SentencePiece model (``tokenizer.model``, or a
    ``tokenizer.json`` BPE with byte fallback) becomes its ``llama`` model with scores.
    Special token ids, add-BOS/EOS flags and the chat template come from gguf-py's
    SpecialVocab, as llama.cpp's converter takes them. ``pre`` names llama.cpp's
    pre-tokenizer when known (a folder converted from GGUF records the original's).

    Raises:
        IncompatibleCheckpointsError: No tokenizer, or a kind GGUF cannot carry.
    """
    from gguf.vocab import SpecialVocab

    tj = folder / "tokenizer.json"
    out: list[tuple[str, Any, str]] = []
    data = read_json(tj, what="tokenizer.json", error=CorruptCheckpointError) if tj.is_file() else None
    model = (data or {}).get("model") or {}
    if data is not None and model.get("type") == "BPE" and not model.get("byte_fallback", False):
        tokens, types = _bpe_tokens(data, vocab_size)
        out += [("tokenizer.ggml.model", "gpt2", "string"), ("tokenizer.ggml.pre", pre or _pre_tokenizer(data), "string"),
                ("tokenizer.ggml.tokens", tokens, "array[string]"), ("tokenizer.ggml.token_type", types, "array[int32]")]
        special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    elif (folder / "tokenizer.model").is_file() or (data is not None and model.get("byte_fallback")):
        from gguf.vocab import LlamaHfVocab, SentencePieceVocab

        vocab = SentencePieceVocab(folder) if (folder / "tokenizer.model").is_file() else LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text.decode("utf-8", errors="replace"))
            scores.append(float(score))
            types.append(int(ttype))
        tokens, scores, types = _pad_vocab(tokens, types, vocab_size, scores)
        out += [("tokenizer.ggml.model", "llama", "string"), ("tokenizer.ggml.pre", "default", "string"),
                ("tokenizer.ggml.tokens", tokens, "array[string]"), ("tokenizer.ggml.scores", scores, "array[float32]"),
                ("tokenizer.ggml.token_type", types, "array[int32]")]
        special = SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    else:
        raise IncompatibleCheckpointsError(
            f"{folder} has no byte-level BPE tokenizer.json or SentencePiece tokenizer.model, so its GGUF would have "
            f"no usable tokenizer; add the tokenizer files of the base model to the folder.", path=folder)
    if special.merges:
        merges = [m if isinstance(m, str) else " ".join(m) for m in special.merges]
        out.append(("tokenizer.ggml.merges", merges, "array[string]"))
    ids = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
           "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}
    for typ, tid in special.special_token_ids.items():
        if typ in ids:
            out.append((f"tokenizer.ggml.{ids[typ]}", int(tid), "uint32"))
    for typ, flag in special.add_special_token.items():
        if typ in ("bos", "eos", "sep"):
            out.append((f"tokenizer.ggml.add_{typ}_token", bool(flag), "bool"))
    template = special.chat_template
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", template, "string"))
    return out


def _bpe_tokens(data: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens") or []}
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    n = max(vocab_size, max(by_id) + 1 if by_id else 0)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(4)  # USER_DEFINED, as llama.cpp pads a vocabulary shorter than the matrix
            continue
        tokens.append(by_id[i])
        a = added.get(i)
        types.append(1 if a is None else (3 if a.get("special") else 4))  # NORMAL / CONTROL / USER_DEFINED
    return tokens, types


def _pad_vocab(tokens, types, vocab_size, scores):
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(4)
        scores.append(-1000.0)
    return tokens, scores, types


# Pre-tokenizer split patterns llama.cpp knows by name (its vocab loader selects the regex
# by this name); anything else is written as "default".
_PRE_PATTERNS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
}


def _known_splits() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name: ours plus the first name transformers'
    GGUF tokenizer table gives each regex it builds (so what it writes, we read back)."""
    known = dict(_PRE_PATTERNS)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return known
    for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items():
        known.setdefault(pattern, name)
    return known


def _pre_tokenizer(data: dict) -> str:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps if isinstance(s, dict)]
    known = _known_splits()
    for s in steps:
        if isinstance(s, dict) and s.get("type") == "Split":
            pattern = (s.get("pattern") or {}).get("Regex")
            if pattern in known:
                return known[pattern]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # SmolLM / StarCoder: digits split one by one, then GPT-2 byte level
    if kinds == ["ByteLevel"]:
        return "gpt2"
    return "default"


_SAFE_NAME = re.compile(r"[^\w.\- ]+")


def model_name(label: str) -> str:
    """A general.name for the file from what the user called the input."""
    return _SAFE_NAME.sub("", Path(label.rstrip("/")).name) or "model"
