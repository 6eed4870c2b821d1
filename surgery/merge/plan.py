"""The plan of a batch merge, made from config files, tokenizer files and safetensors headers
before any tensor is read: which output tensor is made from which (model, tensor) sources by
the method, with which parameters, at which shape — validated as a whole, with every problem
named by its recipe entry — plus the output size and an estimate of the working memory.

As in mergekit, a recipe's ``models`` is one slice over every model's whole layer stack (the
base appended when it is not listed); ``slices`` stack layer ranges into the output, each
slice's layers merged from its sources (a source per model). Tensors before the layers come
from the first slice's sources, tensors after them from the last slice's, layer tensors are
renamed to their output layer; config.json's layer count follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.engine import BLOCK_BYTES, dtype_name, parse_dtype
from ..core.errors import IncompatibleCheckpointsError, InputError, UsageError
from .inputs import FusedCheckpoint, Inputs, Model
from .layout import PER_LAYER_KEYS, Layout, layout_of
from .method import Batch, TensorContext
from .params import Params, Scope
from .recipe import MergeRequest, ModelRef
from .vocab import (RowMap, Vocabulary, auto_chat_template, build_vocabulary, config_vocab_size, is_vocab_tensor,
                    load_tokenizer)

# (output embedding, input embedding) names of models that may tie them: a model without the
# first reads the second (mergekit's ``tied_names``).
from ..fuse.run import TIED_EMBEDDINGS  # noqa: E402

SUB_BLOCK_ELEMENTS = 1 << 20   # elementwise methods see about this many entries per model at a time


@dataclass(frozen=True)
class Source:
    """One input of an output tensor: tensor ``name`` of model ``model`` (an index into the plan's models)."""

    model: int
    name: str


@dataclass
class PlannedTensor:
    """One output tensor and how it is made.

    Attributes:
        name, shape, dtype: What is written (``dtype`` before the run's output dtype applies).
        base: The base input (None when the method runs without one).
        models: The other inputs, in order.
        shared, per_model: Resolved global parameters and one dict per ``models`` entry.
        t: Layer position for gradients (0 outside the layers).
        layer: Output layer index (None outside the layers).
        slice: Index of the slice it belongs to (pre-layer tensors: 0; post-layer: the last).
        copy: Non-floating tensor copied from this input unmerged.
        rows: Vocabulary alignment of an embedding or LM head (None: rows as stored).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: Source | None
    models: list[Source]
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: list[dict[str, Any]] = field(default_factory=list)
    t: float = 0.0
    layer: int | None = None
    slice: int = 0
    copy: Source | None = None
    rows: RowMap | None = None

    @property
    def inputs(self) -> list[Source]:
        return ([self.base] if self.base is not None else []) + self.models


@dataclass
class SliceInputs:
    """A slice after validation: its base and other inputs (model indices, with their layer ranges)."""

    index: int
    base: int | None
    models: list[int]
    ranges: dict[int, tuple[int, int]]
    shared_scopes: list[Scope]
    model_scopes: dict[int, list[Scope]]
    length: int


@dataclass
class MergePlan:
    """Everything a batch merge will do, known before any tensor is read.

    Attributes:
        method: The method's declaration.
        params: The checked parameter settings.
        inputs: The opened models; ``models[i]`` is the model of ``Source.model == i``.
        labels: Each model's reference as written; ``keys`` its identity.
        tensors: The output tensors, in output order.
        donor: Index of the model whose config.json and tokenizer files the output gets.
        config_update: Keys changed in the donor's config.json (layer count, vocabulary size).
        vocabulary: The output vocabulary (``tokenizer_source`` / ``tokenizer:``), or None.
        tokenizer: The tokenizer written into the output (the vocabulary's, or the donor's with
            the recipe's chat template); None copies the donor's tokenizer files as they are.
        slices: Each slice's output layers and sources (for the report).
        dtype: The output dtype (None: each tensor's own).
        warnings: Settings mergekit accepts that have no effect here, tokens no model has...
    """

    method: Batch
    params: Params
    inputs: Inputs
    models: list[Model]
    labels: list[str]
    keys: list[tuple]
    tensors: list[PlannedTensor]
    donor: int
    config_update: dict[str, Any]
    vocabulary: Vocabulary | None
    slices: list[dict[str, Any]]
    dtype: torch.dtype | None
    warnings: list[str]
    tokenizer: Any = None

    def materialize(self) -> None:
        """Download the weights of Hub models planned from their headers (after validation)."""
        for key, model in self.inputs.materialize().items():
            self.models[self.keys.index(key)] = model

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(t.shape) * torch.empty(0, dtype=self.out_dtype(t)).element_size() for t in self.tensors)

    def out_dtype(self, t: PlannedTensor) -> torch.dtype:
        return self.dtype if (self.dtype is not None and t.dtype.is_floating_point) else t.dtype

    def estimated_memory(self) -> int:
        """Working memory of the merge in bytes (tensors and buffers; the Python runtime not
        counted): the engine's write block and its cast, plus for each tensor what the method
        holds — a sub-block per input for elementwise methods, every input's float32 copy of
        the whole tensor otherwise — plus each fused adapter's current tensor."""
        worst = 0
        for t in self.tensors:
            if t.copy is not None:
                continue
            n = len(t.inputs) + 2
            numel = math.prod(t.shape)
            if self.method.elementwise:
                held = n * 4 * min(numel, SUB_BLOCK_ELEMENTS)
            else:
                held = n * 4 * numel
            worst = max(worst, held)
        fused = sum(max((m.info(n).nbytes for n in m.fusion.steps), default=0) * 3
                    for m in self.models if isinstance(m, FusedCheckpoint))
        return 2 * BLOCK_BYTES + worst + fused

    def describe(self) -> dict[str, Any]:
        """The plan as a JSON-able document (``--dry-run``)."""
        def src(s: Source | None) -> dict[str, str] | None:
            return None if s is None else {"model": self.labels[s.model], "tensor": s.name}

        tensors = []
        for t in self.tensors:
            doc: dict[str, Any] = {"name": t.name, "shape": list(t.shape), "dtype": dtype_name(self.out_dtype(t))}
            if t.copy is not None:
                doc.update(how="copy", source=src(t.copy))
            else:
                doc.update(how=self.method.name, base=src(t.base), models=[src(s) for s in t.models],
                           parameters=t.shared, model_parameters=t.per_model, t=round(t.t, 6))
                if t.rows is not None:
                    doc["vocabulary"] = {"rows": t.rows.size, "tokens": t.rows.n_vocab,
                                         "filled": len(t.rows.defaults), "missing": t.rows.missing}
            tensors.append(doc)
        vocab = None
        if self.vocabulary is not None:
            v = self.vocabulary
            vocab = {"source": v.spec.source, "tokens": len(v.vocab), "rows": v.size}
        return {"method": self.method.name, "models": self.labels, "donor": self.labels[self.donor],
                "slices": self.slices, "num_tensors": len(self.tensors), "output_bytes": self.output_bytes,
                "estimated_memory_bytes": self.estimated_memory(), "config_update": self.config_update,
                "vocabulary": vocab, "tensors": tensors, "warnings": self.warnings}


def _problem_list(problems: list[str]) -> str:
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])}{'…' if len(problems) > 4 else ''})" \
        if len(problems) > 1 else ""
    return f"{first}{more}."


class Planner:
    """Builds a :class:`MergePlan` from a request (see :func:`plan_merge`)."""

    def __init__(self, method: Batch, request: MergeRequest, *, allow_missing: bool, dtype: str | None, device: str,
                 inputs: Inputs | None = None):
        self.method, self.request = method, request
        self.allow_missing, self.device = allow_missing, device
        self.where = request.where()
        self.inputs = inputs if inputs is not None else Inputs(device)
        self.keys: list[tuple] = []
        self.models: list[Model] = []
        self.labels: list[str] = []
        self.layouts: dict[int, Layout] = {}
        self.dtype = parse_dtype(dtype or request.dtype)
        self.problems: list[str] = []
        self.vocabulary: Vocabulary | None = None

    # ---- models -------------------------------------------------------------------------------

    def model(self, text: str, where: str) -> int:
        """Index of model ``text`` in the plan, opening it on first use."""
        key = ModelRef.parse(text, f"{self.where}: {where}").key
        if key not in self.keys:
            # a recipe's errors name the entry; the command line's name the model itself
            self.inputs.open(text, f"{self.where}: {where}" if self.request.origin else "")
            self.keys.append(key)
            self.models.append(self.inputs.models[key])
            self.labels.append(text)
        return self.keys.index(key)

    def layout(self, i: int) -> Layout:
        if i not in self.layouts:
            m = self.models[i]
            self.layouts[i] = layout_of(m.names, m.config, self.labels[i])
        return self.layouts[i]

    # ---- slices ---------------------------------------------------------------------------------

    def slice_inputs(self, params: Params) -> list[SliceInputs]:
        """The request as slices (mergekit's normalisation of ``models``), each validated."""
        req = self.request
        base = self.model(req.base, "base_model") if req.base else None
        out = []
        if req.slices is None:
            idx = [self.model(m.location, f"model {m.location}") for m in req.models]
            scopes = {i: [params.model_settings[k], params.global_settings] for k, i in enumerate(idx)}
            if base is not None and base not in idx:
                idx.append(base)
                scopes[base] = [params.global_settings]
            ranges = {i: (0, self.layout(i).num_layers) for i in idx}
            out.append(self._split(0, "models", idx, base, ranges, [params.global_settings], scopes))
            return out
        for s, spec in enumerate(req.slices):
            where = f"slices[{s}]"
            idx, ranges, scopes = [], {}, {}
            for j, src in enumerate(spec.sources):
                i = self.model(src.model, f"{where}.sources[{j}]")
                if i in idx:
                    raise UsageError(f"{self.where}: {where}: {src.model} is listed twice; a slice takes each model once "
                                     f"(as mergekit requires).")
                idx.append(i)
                ranges[i] = src.layer_range
                scopes[i] = [params.source_settings[s][j], params.slice_settings[s], params.global_settings]
            slice_base = self.model(spec.base_model, f"{where}.base_model") if spec.base_model else base
            out.append(self._split(s, where, idx, slice_base, ranges,
                                   [params.slice_settings[s], params.global_settings], scopes))
        return out

    def _split(self, s: int, where: str, idx: list[int], base: int | None, ranges: dict[int, tuple[int, int]],
               shared: list[Scope], scopes: dict[int, list[Scope]]) -> SliceInputs:
        m = self.method
        label = f"{self.where}: {where}"
        if m.base == "ignored":
            base = None
        elif base is not None and base not in idx:
            raise UsageError(f"{label}: the base model {self.labels[base]} is not among the sources; add it (a "
                             f"{m.name!r} merge of a slice needs its base as one of the slice's sources).")
        elif base is None and m.base == "required":
            raise UsageError(f"{label}: merge method {m.name!r} needs a base model (`base` / base_model).")
        others = [i for i in idx if i != base]
        n = len(others)
        if n < m.min_models or (m.max_models is not None and n > m.max_models):
            want = f"exactly {m.min_models}" if m.max_models == m.min_models else \
                f"at least {m.min_models}" if m.max_models is None else f"{m.min_models} to {m.max_models}"
            besides = " besides the base" if m.base != "ignored" else ""
            raise UsageError(f"{label}: merge method {m.name!r} takes {want} model(s){besides}; got {n}.")
        lengths = {i: b - a for i, (a, b) in ranges.items()}
        for i, (a, b) in ranges.items():
            lay = self.layout(i)
            if self.request.slices is not None:
                lay.check_stackable(label)
                if b > lay.num_layers:
                    raise UsageError(f"{label}: layer_range [{a}, {b}] of {self.labels[i]} is out of range; it has "
                                     f"{lay.num_layers} layers (0 to {lay.num_layers - 1}).")
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{self.labels[i]} {ranges[i][1] - ranges[i][0]}" for i in idx)
            raise UsageError(f"{label}: every source of a slice must have the same number of layers; got {detail}.")
        return SliceInputs(s, base, others, ranges, shared, scopes, next(iter(lengths.values()), 0))

    # ---- tensors --------------------------------------------------------------------------------

    def _resolve_name(self, i: int, name: str) -> str | None:
        """The tensor of model ``i`` that serves as ``name`` (itself, or a tied embedding)."""
        m = self.models[i]
        if name in m:
            return name
        for out_name, in_name in TIED_EMBEDDINGS:
            if name == out_name and in_name in m:
                return in_name
        return None

    def _tensor(self, out_name: str, sl: SliceInputs, names: dict[int, str], t: float, layer: int | None,
                params: Params, ref: int) -> PlannedTensor | None:
        """One output tensor of slice ``sl`` whose input in model ``i`` is named ``names[i]``."""
        resolved: dict[int, str] = {}
        missing = []
        for i in ([sl.base] if sl.base is not None else []) + sl.models:
            n = self._resolve_name(i, names[i])
            if n is None:
                missing.append(i)
            else:
                resolved[i] = n
        ref_name = resolved.get(ref) or next(iter(resolved.values()), None)
        if ref_name is None:
            return None
        ref_i = ref if ref in resolved else next(iter(resolved))
        info = self.models[ref_i].info(ref_name)
        if missing:
            if self.allow_missing and sl.base is not None and sl.base in resolved and info.dtype.is_floating_point:
                return PlannedTensor(out_name, tuple(info.shape), info.dtype, None, [], t=t, layer=layer,
                                     slice=sl.index, copy=Source(sl.base, resolved[sl.base]))
            for i in missing:
                hint = " (pass `allow_missing` to copy it from the base)" if sl.base is not None else ""
                self.problems.append(f"{self.labels[i]} lacks tensor {names[i]!r}{hint}")
            return None
        if not info.dtype.is_floating_point:
            first = sl.base if sl.base is not None else sl.models[0]
            return PlannedTensor(out_name, tuple(info.shape), info.dtype, None, [], t=t, layer=layer, slice=sl.index,
                                 copy=Source(first, resolved[first]))
        vocab = self._is_vocab(ref_i, ref_name, info.shape)
        for i, n in resolved.items():
            other = self.models[i].info(n)
            if tuple(other.shape) == tuple(info.shape):
                continue
            if vocab and self.vocabulary is not None and tuple(other.shape[1:]) == tuple(info.shape[1:]):
                continue
            if vocab and tuple(other.shape[1:]) == tuple(info.shape[1:]):
                self.problems.append(
                    f"tensor {n!r}: vocabulary sizes differ, {tuple(info.shape)} in {self.labels[ref_i]} vs "
                    f"{tuple(other.shape)} in {self.labels[i]} (add `tokenizer_source: base` or `union` to the recipe "
                    f"to align the vocabularies by token)")
            else:
                self.problems.append(f"tensor {n!r}: shapes differ, {tuple(info.shape)} in {self.labels[ref_i]} vs "
                                     f"{tuple(other.shape)} in {self.labels[i]}")
            return None
        shared, per = params.resolve(out_name, t, sl.shared_scopes,
                                     [(resolved[i], sl.model_scopes[i]) for i in sl.models],
                                     [self.labels[i] for i in sl.models])
        shape = tuple(info.shape)
        rows = None
        if vocab and self.vocabulary is not None:
            order = ([sl.base] if sl.base is not None else []) + sl.models
            source_order = [i for i in self._source_order(sl) if i in order]
            rowmap = self.vocabulary.row_map([self.keys[i] for i in source_order], [self.labels[i] for i in source_order],
                                             [self.models[i].info(resolved[i]).shape[0] for i in source_order],
                                             f"{self.where}: tensor {out_name!r}")
            # the row map is in source order; re-index it to (base, models...) order
            pos = {i: k for k, i in enumerate(source_order)}
            rows = _reorder(rowmap, [pos[i] for i in order])
            shape = (self.vocabulary.size, *shape[1:])
        return PlannedTensor(out_name, shape, info.dtype, Source(sl.base, resolved[sl.base]) if sl.base is not None else None,
                             [Source(i, resolved[i]) for i in sl.models], shared, per, t, layer, sl.index, rows=rows)

    def _source_order(self, sl: SliceInputs) -> list[int]:
        """The slice's inputs in recipe order (mergekit's order for averaging rows)."""
        return list(sl.ranges)

    def _is_vocab(self, i: int, name: str, shape: tuple[int, ...]) -> bool:
        return is_vocab_tensor(name, shape, config_vocab_size(self.models[i].config) or shape[0] if shape else None)

    # ---- the whole plan ---------------------------------------------------------------------------

    def build(self) -> MergePlan:
        req, method = self.request, self.method
        donor_text = req.base or (req.models[0].location if req.models else req.slices[0].sources[0].model)
        params = Params(method, req, 1)
        slices = self.slice_inputs(params)
        for text in req.referenced():
            self.model(text, f"model {text}")
        donor = self.model(donor_text, "base_model" if req.base else "the first model")
        params.num_layers = self.layout(donor).num_layers
        self.vocabulary = self._vocabulary(donor)
        tensors = self._tensors(slices, params, donor)
        self._check_values(tensors)
        if self.problems:
            raise IncompatibleCheckpointsError(f"cannot merge: {_problem_list(self.problems)}",
                                               path=req.origin or self.labels[donor])
        config_update = self._config_update(slices, donor)
        warnings = list(req.warnings) + params.warnings + (self.vocabulary.warnings if self.vocabulary else [])
        for i, m in enumerate(self.models):
            if isinstance(m, FusedCheckpoint) and m.fusion.untied:
                warnings.append(f"{self.labels[i]}: the adapter changes one of the tied embeddings; this model's "
                                f"{m.fusion.untied['output']} is its own tensor.")
        slice_docs = [{"slice": sl.index, "layers": sl.length, "base": self.labels[sl.base] if sl.base is not None else None,
                       "sources": [{"model": self.labels[i], "layer_range": list(sl.ranges[i])}
                                   for i in sl.ranges]} for sl in slices]
        return MergePlan(method, params, self.inputs, self.models, self.labels, self.keys, tensors, donor, config_update,
                         self.vocabulary, slice_docs, self.dtype, warnings, self._tokenizer(donor))

    def _tokenizer(self, donor: int) -> Any:
        """The output tokenizer: the built vocabulary's, with the recipe's chat template set."""
        tok = self.vocabulary.tokenizer if self.vocabulary is not None else None
        template = self.request.chat_template
        if template is None:
            return tok
        if tok is None:
            tok = load_tokenizer(self.models[donor].root, self.labels[donor])
        if template == "auto":
            found = []
            for i, m in enumerate(self.models):
                try:
                    found.append(load_tokenizer(m.root, self.labels[i]))
                except InputError:
                    continue
            template = auto_chat_template(found)
        if template is not None:
            tok.chat_template = template
        return tok

    def _check_values(self, tensors: list[PlannedTensor]) -> None:
        """The method's own cross-parameter checks (``Batch.check``) on every tensor's resolved
        parameters, before any tensor is read."""
        check = getattr(self.method, "check", None)
        if check is None:
            return
        for t in tensors:
            if t.copy is None:
                shape = t.shape or (1,)
                check(TensorContext(name=t.name, shape=shape, n=len(t.models), layer=t.layer, depth=t.t, seed=0,
                                    params=t.shared, model_params=t.per_model, rows=None, device=self.device))

    def _vocabulary(self, donor: int) -> Vocabulary | None:
        spec = self.request.tokenizer
        if spec is None:
            return None
        base = self.model(self.request.base, "base_model") if self.request.base else 0
        entries = [(self.keys[i], self.labels[i], self.models[i].root, self.models[i].config)
                   for i in [base] + [k for k in range(len(self.models)) if k != base]]
        source_folder = None
        if spec.source_ref is not None:
            source_folder = self.models[self.model(spec.source, "tokenizer source")].root
        key_of = self.inputs.key
        for name, tok in spec.tokens.items():
            if tok.model is not None:
                self.model(tok.model, f"tokenizer.tokens[{name!r}]")
        return build_vocabulary(spec, entries, self.keys[base], source_folder, key_of)

    def _tensors(self, slices: list[SliceInputs], params: Params, donor: int) -> list[PlannedTensor]:
        out: list[PlannedTensor] = []
        first, last = slices[0], slices[-1]

        def add(t: PlannedTensor | None) -> None:
            if t is not None:
                out.append(t)

        if self.request.slices is None:
            sl = first
            names = set(self.models[donor].names)
            for i in sl.ranges:
                for n in self.models[i].names:
                    if n in names:
                        continue
                    if any(n == o and inp in names for o, inp in TIED_EMBEDDINGS):
                        names.add(n)          # an untied head beside tied models: merged with their embeddings
                    else:
                        self.problems.append(f"{self.labels[i]} has tensor {n!r}, which {self.labels[donor]} lacks")
            lay = self.layout(donor)
            for n in sorted(names):
                add(self._tensor(n, sl, {i: n for i in sl.ranges}, params.layer_t(n), lay.depth(n), params, donor))
            return out
        dl = self.layout(donor)
        dl.check_stackable(f"{self.where}: base_model" if self.request.base else f"{self.where}: the first model")
        ref0 = first.base if first.base is not None else first.models[0]
        for n in self.layout(ref0).pre:
            add(self._tensor(n, first, {i: n for i in first.ranges}, 0.0, None, params, ref0))
        layer = 0
        for sl in slices:
            ref = sl.base if sl.base is not None else sl.models[0]
            for k in range(sl.length):
                t = k / (sl.length - 1) if sl.length > 1 else 1.0
                ref_layer = sl.ranges[ref][0] + k
                suffixes = self.layout(ref).layers.get(ref_layer)
                if suffixes is None:
                    self.problems.append(f"{self.labels[ref]} has no tensors of layer {ref_layer}")
                    continue
                for i in sl.ranges:
                    have = set(self.layout(i).layers.get(sl.ranges[i][0] + k, []))
                    lacking = [x for x in suffixes if x not in have]
                    if lacking and i != ref:
                        self.problems.append(f"layer {sl.ranges[i][0] + k} of {self.labels[i]} lacks "
                                             f"{lacking[0]!r}, which layer {ref_layer} of {self.labels[ref]} has")
                for suffix in suffixes:
                    names = {i: self.layout(i).name(sl.ranges[i][0] + k, suffix) for i in sl.ranges}
                    add(self._tensor(dl.name(layer, suffix), sl, names, t, layer, params, ref))
                layer += 1
        refz = last.base if last.base is not None else last.models[0]
        for n in self.layout(refz).post:
            add(self._tensor(n, last, {i: n for i in last.ranges}, 0.0, None, params, refz))
        return out

    def _config_update(self, slices: list[SliceInputs], donor: int) -> dict[str, Any]:
        update: dict[str, Any] = {}
        cfg = self.models[donor].config or {}
        if self.request.slices is not None:
            lay = self.layout(donor)
            total = sum(sl.length for sl in slices)
            if lay.count_key and cfg.get(lay.count_key) != total:
                update[lay.count_key] = total
            for key in PER_LAYER_KEYS:
                per = [(sl, i) for sl in slices for i in range(sl.length)]
                values = []
                for sl, k in per:
                    ref = sl.base if sl.base is not None else sl.models[0]
                    src = (self.models[ref].config or {}).get(key)
                    idx = sl.ranges[ref][0] + k
                    if isinstance(src, list) and idx < len(src):
                        values.append(src[idx])
                if isinstance(cfg.get(key), list) and len(values) == total and values != cfg[key]:
                    update[key] = values
        if self.vocabulary is not None:
            key = next((k for k in ("vocab_size", "n_vocab", "padded_vocab_size") if k in cfg), "vocab_size")
            if cfg.get(key) != self.vocabulary.size:
                update[key] = self.vocabulary.size
        if isinstance(self.models[donor], FusedCheckpoint) and self.models[donor].fusion.untied:
            update["tie_word_embeddings"] = False
        return update


def _reorder(rowmap: RowMap, order: list[int]) -> RowMap:
    """``rowmap`` with its models re-indexed: new model k is old model ``order[k]``."""
    inverse = {old: new for new, old in enumerate(order)}
    defaults = {tid: type(src)(src.kind, [(inverse[m], r) for m, r in src.rows])
                for tid, src in rowmap.defaults.items()}
    return RowMap([rowmap.own[o] for o in order], defaults, rowmap.n_vocab, rowmap.size, rowmap.missing)


def plan_merge(method: Batch, request: MergeRequest, *, allow_missing: bool = False, dtype: str | None = None,
               device: str = "cpu", inputs: Inputs | None = None) -> MergePlan:
    """Validate ``request`` as a whole and plan every output tensor, from headers alone.

    Raises:
        UsageError: A method, parameter, slice or layer range that cannot work (named by its
            recipe entry).
        InputError: Unreadable models; IncompatibleCheckpointsError listing every tensor whose
            name or shape disagrees between the models.
    """
    return Planner(method, request, allow_missing=allow_missing, dtype=dtype, device=device, inputs=inputs).build()
