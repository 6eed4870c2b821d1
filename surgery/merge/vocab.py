"""The output vocabulary of a merge (mergekit's ``tokenizer_source`` / ``tokenizer:``) and how
each model's embedding and LM-head rows are aligned to it, token by token.

Built from tokenizer files and config.json alone, before any tensor is read:

- ``base``: the base model's tokenizer (the first model without a base), with tokens at or
  beyond its config's ``vocab_size`` stripped (padding entries of a BPE tokenizer);
- ``union``: that tokenizer plus every token any model has below its ``vocab_size``: a model's
  ordinary tokens first (models in recipe order, base first; each model's tokens in id order),
  then added tokens (first settings seen win);
- ``MODEL``: that model's tokenizer as is;
- then the ``tokenizer.tokens`` keys not yet present are added; the output's rows are padded
  to ``pad_to_multiple_of``.

Rows, per output tensor whose first axis is the vocabulary (input embeddings and LM heads)
and per model: a model that has the token keeps its own row unless the token is ``force``d;
otherwise the row comes from the token's configured source — the only model that has it, the
base when it has it, the mean over the models that have it, a named model or model token, or
zeros — and padding rows are the mean of the model's other rows. These are mergekit 0.1.5's
rules; where mergekit's order depends on hash order (a model's ordinary tokens, models without
a base), surgery uses the recipe and id order above, so the result is reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoint.roles import sublayer_of
from ..core.errors import InputError, UsageError
from .recipe import TokenizerSpec, TokenSpec

VOCAB_SIZE_KEYS = ("vocab_size", "n_vocab", "padded_vocab_size")


def config_vocab_size(config: dict | None) -> int | None:
    """The vocabulary size config.json declares (top level, or a ``text_config``)."""
    cfg = config or {}
    for c in (cfg, cfg.get("text_config") or {}):
        for key in VOCAB_SIZE_KEYS:
            v = c.get(key) if isinstance(c, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def is_vocab_tensor(name: str, shape: Sequence[int], vocab_size: int | None) -> bool:
    """Input embeddings and LM heads (weights and biases) whose first axis is the vocabulary."""
    if not shape or (vocab_size is not None and shape[0] != vocab_size):
        return False
    kind = sublayer_of(name if name.endswith(".weight") else name.rsplit(".", 1)[0] + ".weight")
    return kind in ("embed", "lm_head")


def load_tokenizer(folder: Path, label: str) -> Any:
    """The fast tokenizer saved in ``folder`` (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    from ..checkpoint.model import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise InputError(f"the tokenizer of {label} cannot be loaded from {folder} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).", path=folder) from exc


def _copy(tok: Any) -> Any:
    """An independent copy of a tokenizer (saved and reloaded, so adding tokens leaves ``tok`` alone)."""
    import tempfile

    from transformers import AutoTokenizer

    from ..checkpoint.model import quiet_transformers

    with tempfile.TemporaryDirectory(prefix="surgery-tok-") as d, quiet_transformers():
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, use_fast=True)


def strip_unused(tok: Any, vocab_size: int | None, label: str) -> Any:
    """``tok`` without the tokens whose id is ≥ ``vocab_size`` (entries the model has no row for)."""
    vocab = tok.get_vocab()
    size = vocab_size or len(vocab)
    unused = {t for t, i in vocab.items() if i >= size}
    if not unused:
        return tok
    import tokenizers

    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise InputError(f"the tokenizer of {label} has tokens beyond the model's vocab_size ({size}) and is of type "
                         f"{data['model']['type']}; only BPE tokenizers can be trimmed for a tokenizer merge.")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    out = _copy(tok)
    out._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return out


def union_tokenizer(base: Any, tokenizers: Sequence[tuple[Any, int | None]]) -> Any:
    """The base tokenizer plus every token the others have below their vocab size (module docstring).

    Args:
        base: The (stripped) base tokenizer.
        tokenizers: ``(tokenizer, vocab_size)`` per model, base first.
    """
    added: dict[str, Any] = {}
    ordinary: dict[str, None] = {}
    for tok, vsize in tokenizers:
        size = vsize or tok.vocab_size
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size:
                ordinary.setdefault(t, None)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < size:
                added.setdefault(info.content, info)
    out = _copy(base)
    base_vocab = base.get_vocab()
    for t in ordinary:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class RowSource:
    """Where an output row comes from when a model does not supply its own.

    ``kind``: ``avg`` (mean of ``rows``: (model index, row) pairs), ``row`` (one (model index,
    row)), ``zero``."""

    kind: str
    rows: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class RowMap:
    """How one vocabulary tensor's rows are filled for an ordered list of models.

    Attributes:
        own: Per model, per output row below ``n_vocab``: the model's own row, or −1.
        defaults: Output row -> its :class:`RowSource` (tokens some model lacks, forced tokens).
        n_vocab: Tokens in the output vocabulary; rows from ``n_vocab`` to ``size`` are padding.
        size: Rows of the output tensor.
        missing: Rows (per model) with no source at all (left zero; mergekit logs an error).
    """

    own: list[list[int]]
    defaults: dict[int, RowSource]
    n_vocab: int
    size: int
    missing: int = 0


@dataclass
class Vocabulary:
    """The output vocabulary and each model's token alignment to it.

    Attributes:
        tokenizer: The output tokenizer (written into the output folder).
        vocab: Token -> output id.
        size: Rows of every vocabulary tensor of the output (padded).
        perms: Model key -> per output id, the model's id of the token, or −1.
        original: Model key -> the model's own vocabulary (for ``model_token`` sources).
        base_key: The model whose tokenizer is the base of ``base`` and ``union``.
        spec: The recipe's settings.
        warnings: Tokens no model has (zero rows), tokenizers that could not be loaded.
    """

    tokenizer: Any
    vocab: dict[str, int]
    size: int
    perms: dict[tuple, list[int]]
    original: dict[tuple, dict[str, int]]
    base_key: tuple
    spec: TokenizerSpec
    key_of: Callable[[str], tuple]
    warnings: list[str] = field(default_factory=list)

    def row_map(self, keys: Sequence[tuple], labels: Sequence[str], rows_of: Sequence[int], where: str) -> RowMap:
        """The row plan of one vocabulary tensor whose sources are the models ``keys`` (in order).

        Args:
            keys: Model keys of the tensor's sources.
            labels: Their names, for messages.
            rows_of: Each source tensor's row count (``model_token`` ids are checked against it).
            where: The tensor, for messages.
        """
        n = len(self.vocab)
        perms = [self.perms[k] for k in keys]
        configs: dict[str, TokenSpec] = dict(self.spec.tokens)
        average: set[str] = set()
        base_i = keys.index(self.base_key) if self.base_key in keys else None
        for token, tid in self.vocab.items():
            if token in configs:
                continue
            present = [p[tid] >= 0 for p in perms]
            count = sum(present)
            if count == 1:
                configs[token] = TokenSpec("index", token_id=present.index(True))
            elif count == 0:
                configs[token] = TokenSpec("zero")
            elif base_i is not None and perms[base_i][tid] >= 0:
                configs[token] = TokenSpec("index", token_id=base_i)
            else:
                average.add(token)
        defaults: dict[int, RowSource] = {}
        for token, tid in self.vocab.items():
            cfg = configs.get(token)
            if not (cfg and cfg.force) and all(p[tid] >= 0 for p in perms):
                continue
            if token in average:
                defaults[tid] = RowSource("avg", [(i, p[tid]) for i, p in enumerate(perms) if p[tid] >= 0])
            elif cfg is not None:
                defaults[tid] = self._configured(token, tid, cfg, keys, labels, perms, rows_of, where)
        forced = {self.vocab[t] for t, c in self.spec.tokens.items() if c.force and t in self.vocab}
        own = [[-1 if tid in forced else r for tid, r in enumerate(p)] for p in perms]
        missing = sum(1 for o in own for tid, r in enumerate(o) if r < 0 and tid not in defaults)
        return RowMap(own, defaults, n, self.size, missing)

    def _configured(self, token: str, tid: int, cfg: TokenSpec, keys: Sequence[tuple], labels: Sequence[str],
                    perms: list[list[int]], rows_of: Sequence[int], where: str) -> RowSource:
        if cfg.kind == "zero":
            return RowSource("zero")
        if cfg.kind == "index":                       # assigned above: a model of this tensor
            return RowSource("row", [(cfg.token_id, perms[cfg.token_id][tid])])
        if cfg.kind is None or cfg.model is None:
            raise UsageError(f"{where}: token {token!r} is missing from some model and its tokenizer.tokens entry "
                             f"names no source; give it a source (a model, a model_token or zero).")
        key = self.key_of(cfg.model)
        if key not in keys:
            raise UsageError(f"{where}: token {token!r} takes its row from {cfg.model}, which is not an input of this "
                             f"tensor (inputs: {', '.join(labels)}).")
        i = list(keys).index(key)
        if cfg.kind == "model_token":
            row = cfg.token_id
            if row is None:
                row = self.original.get(key, {}).get(cfg.token)
                if row is None:
                    raise UsageError(f"{where}: token {cfg.token!r} (the source of {token!r}) is not in the vocabulary "
                                     f"of {cfg.model}.")
            if not 0 <= row < rows_of[i]:
                raise UsageError(f"{where}: token id {row} (the source of {token!r}) is out of range for {cfg.model}, "
                                 f"which has {rows_of[i]} rows.")
            return RowSource("row", [(i, row)])
        if perms[i][tid] < 0:
            raise UsageError(f"{where}: token {token!r} takes its row from {cfg.model}, whose vocabulary lacks it.")
        return RowSource("row", [(i, perms[i][tid])])


def build_vocabulary(spec: TokenizerSpec, models: Sequence[tuple[tuple, str, Path, dict | None]],
                     base_key: tuple, source_folder: Path | None, key_of: Callable[[str], tuple]) -> Vocabulary:
    """The output vocabulary and every model's alignment to it.

    Args:
        spec: The recipe's tokenizer settings.
        models: ``(key, label, tokenizer folder, config)`` of every model of the merge, base first.
        base_key: The base model's key (or the first model's).
        source_folder: The tokenizer folder of ``spec.source`` when it names a model.
        key_of: Maps a model reference (text) to its key.

    Raises:
        InputError: A tokenizer cannot be loaded or trimmed.
    """
    warnings: list[str] = []
    toks: dict[tuple, tuple[Any, int | None]] = {}
    info = {key: (label, folder, config) for key, label, folder, config in models}
    base_label, base_folder, base_config = info[base_key]
    base_tok = strip_unused(load_tokenizer(base_folder, base_label), config_vocab_size(base_config), base_label)
    toks[base_key] = (base_tok, config_vocab_size(base_config))
    for key, label, folder, config in models:
        if key in toks:
            continue
        try:
            toks[key] = (load_tokenizer(folder, label), config_vocab_size(config))
        except InputError as exc:
            warnings.append(f"{exc} Assuming it is the same as {base_label}'s, as mergekit does.")
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = union_tokenizer(base_tok, [toks[k] for k in toks])
    else:
        out = load_tokenizer(source_folder, spec.source)
    existing = set(out.get_vocab())
    if any(t not in existing for t in spec.tokens):
        out = _copy(out) if out is base_tok else out
        for t in spec.tokens:
            if t not in existing:
                out.add_tokens(t)
                existing.add(t)
    vocab = out.get_vocab()
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    perms: dict[tuple, list[int]] = {}
    original: dict[tuple, dict[str, int]] = {}
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    for key, label, folder, config in models:
        tok, vsize = toks.get(key, toks[base_key])
        own = tok.get_vocab()
        original[key] = own
        limit = vsize or len(own)
        p = [-1] * len(vocab)
        for t, new in ordered:
            old = own.get(t)
            p[new] = old if old is not None and old < limit else -1
        perms[key] = p
    return Vocabulary(out, vocab, size, perms, original, base_key, spec, key_of, warnings)


def auto_chat_template(tokenizers: Sequence[Any]) -> str | None:
    """The chat template most of ``tokenizers`` carry (ties: the first seen), None when none has one."""
    from collections import Counter

    found = []
    for tok in tokenizers:
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


# ---- reading aligned rows --------------------------------------------------------------------

def gather_rows(read: Callable[[int, int], torch.Tensor], idx: Sequence[int]) -> torch.Tensor:
    """Rows ``idx`` of a tensor whose contiguous rows ``read(a, e)`` returns, read in runs of
    consecutive indices (an identity alignment is one read)."""
    parts, start = [], 0
    for j in range(1, len(idx) + 1):
        if j == len(idx) or idx[j] != idx[j - 1] + 1:
            parts.append(read(idx[start], idx[j - 1] + 1))
            start = j
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class AlignedRows:
    """The rows of one vocabulary tensor, per model, aligned to the output vocabulary.

    Args:
        rowmap: The tensor's :class:`RowMap`.
        readers: Per model, ``read(a, e)``: float32 rows of the model's source tensor.
        rest: The shape after the first axis.
    """

    def __init__(self, rowmap: RowMap, readers: Sequence[Callable[[int, int], torch.Tensor]], rest: tuple[int, ...]):
        self.map, self.readers, self.rest = rowmap, readers, rest
        self._block: tuple[int, int, dict[int, torch.Tensor]] | None = None
        self._means: dict[int, torch.Tensor] = {}

    def _defaults(self, a: int, e: int) -> dict[int, torch.Tensor]:
        if self._block is None or self._block[:2] != (a, e):
            rows: dict[int, torch.Tensor] = {}
            for tid in range(a, min(e, self.map.n_vocab)):
                src = self.map.defaults.get(tid)
                if src is None:
                    continue
                if src.kind == "zero":
                    rows[tid] = torch.zeros(self.rest)
                    continue
                acc = None
                for m, r in src.rows:
                    x = self.readers[m](r, r + 1)[0]
                    acc = x if acc is None else acc + x
                rows[tid] = acc / len(src.rows) if src.kind == "avg" else acc
            self._block = (a, e, rows)
        return self._block[2]

    def _mean(self, m: int) -> torch.Tensor:
        """Mean of model ``m``'s aligned rows over the vocabulary (the padding rows' value)."""
        if m not in self._means:
            total = torch.zeros(self.rest, dtype=torch.float64)
            step = max(1, (16 << 20) // max(1, 4 * int(torch.Size(self.rest).numel())))
            for a in range(0, self.map.n_vocab, step):
                total += self._aligned(m, a, min(self.map.n_vocab, a + step)).sum(0, dtype=torch.float64)
            self._means[m] = (total / self.map.n_vocab).to(torch.float32)
        return self._means[m]

    def _aligned(self, m: int, a: int, e: int) -> torch.Tensor:
        out = torch.zeros((e - a, *self.rest))
        own = self.map.own[m][a:e]
        have = [j for j, r in enumerate(own) if r >= 0]
        if have:
            out[have] = gather_rows(self.readers[m], [own[j] for j in have]).to(out.dtype)
        defaults = None
        for j, r in enumerate(own):
            if r < 0 and (a + j) in self.map.defaults:
                defaults = defaults if defaults is not None else self._defaults(a, e)
                out[j] = defaults[a + j]
        return out

    def rows(self, m: int, a: int, e: int) -> torch.Tensor:
        """Rows ``[a, e)`` of model ``m``'s aligned tensor (float32)."""
        n = self.map.n_vocab
        parts = []
        if a < n:
            parts.append(self._aligned(m, a, min(e, n)))
        if e > n:
            pad = max(a, n)
            parts.append(self._mean(m).expand((e - pad, *self.rest)).clone())
        return parts[0] if len(parts) == 1 else torch.cat(parts)
