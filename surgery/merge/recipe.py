"""mergekit-style merge requests: the YAML recipe reader, model references and parameter values.

A recipe is mergekit 0.1.5's ``MergeConfiguration``:

- ``merge_method``; ``base_model``; exactly one of ``models`` (whole models) or ``slices``
  (layer ranges of models stacked into the output: ``sources`` with ``model`` and
  ``layer_range``, an optional slice-level ``base_model`` and ``parameters``);
- ``parameters`` at the top level, per model (``models[i].parameters``), per slice and per
  slice source;
- ``dtype`` (mergekit's compute dtype; here the output dtype when ``out_dtype`` is absent —
  the math is always float32) and ``out_dtype``;
- ``tokenizer_source: base | union | MODEL`` or the newer ``tokenizer:`` block (``source``,
  ``tokens``, ``pad_to_multiple_of``);
- model references ``path``, ``org/name@revision`` and ``model+lora`` (a PEFT adapter folder
  or Hub id after ``+``, fused on the fly);
- ``chat_template``: ``auto`` (the template most of the models' tokenizers carry) or the
  template text itself, written into the output's tokenizer.

A parameter value (``weight``, ``density``, ``t``...) is, as in mergekit:

- a scalar;
- a list of numbers, interpolated linearly across the layers of a slice (layer i of N sits at
  i/(N−1), a one-layer slice at 1; tensors outside the layers — embeddings, final norm —
  take t = 0, the first value); a list of booleans or strings picks ``value[int(t·(len−1))]``;
- a list of ``{filter, value}`` entries: the first entry whose ``filter`` is a substring of
  the tensor name (or has no filter, or ``*``) gives the value (itself a scalar or list).

What mergekit itself would refuse is refused here (exit 2, naming the recipe entry); keys
mergekit would ignore are ignored with a warning; mergekit keys surgery does not implement
(``modules``; mergekit's bundled ``chat_template`` names) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.formats import read_yaml

# mergekit's MergeConfiguration keys; the ones surgery does not implement are refused by name.
RECIPE_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "modules")
UNSUPPORTED_KEYS = {
    "modules": "multi-module recipes are not supported; use 'models' or 'slices'",
}
# mergekit's bundled chat templates, which surgery does not ship (their text is mergekit's).
BUNDLED_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class ModelRef:
    """A model as a recipe names it: ``path[@revision][+lora[@revision]]`` (mergekit's ModelReference).

    Attributes:
        path: Local folder or file, or Hub repository id.
        revision: Hub revision after ``@``.
        lora: Adapter folder or Hub id after ``+`` (fused into the model on the fly).
        lora_revision: The adapter's Hub revision.
    """

    path: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None

    @classmethod
    def parse(cls, text: Any, where: str = "model") -> "ModelRef":
        """Parse mergekit's string form; UsageError naming ``where`` when malformed."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{where}: a model is a path or Hub id (text), not {text!r}.")
        chunks = text.strip().split("+")
        if len(chunks) > 2:
            raise UsageError(f"{where}: {text!r} has more than one '+'; write MODEL or MODEL+LORA.")
        parts = []
        for chunk in chunks:
            if chunk.count("@") > 1:
                raise UsageError(f"{where}: {chunk!r} has more than one '@'; write PATH or ORG/NAME@REVISION.")
            path, _, rev = chunk.partition("@")
            if not path:
                raise UsageError(f"{where}: {text!r} names no model before '@' or '+'.")
            parts.append((path, rev or None))
        (path, rev), lora = parts[0], parts[1] if len(parts) > 1 else (None, None)
        return cls(path, rev, lora[0], lora[1])

    @property
    def location(self) -> str:
        """The model itself as :func:`~surgery.checkpoint.reader.open_checkpoint` takes it."""
        return f"{self.path}@{self.revision}" if self.revision else self.path

    @property
    def lora_location(self) -> str | None:
        if self.lora is None:
            return None
        return f"{self.lora}@{self.lora_revision}" if self.lora_revision else self.lora

    @property
    def key(self) -> tuple:
        """Identity: local paths resolved (``./a`` and ``a`` are one model), Hub ids as written."""
        def norm(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            return str(q.resolve()) if q.exists() else p
        return norm(self.path), self.revision, norm(self.lora), self.lora_revision

    def __str__(self) -> str:
        return self.location + (f"+{self.lora_location}" if self.lora else "")


@dataclass
class ModelEntry:
    """One input model (``location`` in mergekit's string form) and its own parameter settings."""

    location: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ModelRef:
        return ModelRef.parse(self.location)


@dataclass
class SliceSource:
    """A layer range ``[start, stop)`` of one model feeding an output slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ModelRef:
        return ModelRef.parse(self.model)


@dataclass
class SliceSpec:
    """One output slice: its sources (merged with the method), a slice-level base and parameters."""

    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenSpec:
    """Where one token's embedding comes from (mergekit's ``tokenizer.tokens`` entry).

    Attributes:
        kind: ``model`` (the token's row in ``model``), ``model_token`` (row ``token_id`` or the
            row of ``token`` in ``model``'s own vocabulary), ``zero``, or None (mergekit's default).
        model: The source model (``model`` and ``model_token``).
        token_id, token: The source row of ``model_token``.
        force: Use this source even for models that have the token.
    """

    kind: str | None = None
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass
class TokenizerSpec:
    """The output vocabulary: ``base``, ``union`` or a model's tokenizer, extra tokens, padding.

    ``legacy`` marks the old ``tokenizer_source:`` key (no ``tokens``, no padding)."""

    source: str
    tokens: dict[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    legacy: bool = False

    @property
    def source_ref(self) -> ModelRef | None:
        return None if self.source in ("base", "union") else ModelRef.parse(self.source)


@dataclass
class MergeRequest:
    """Everything a merge needs to know about its inputs, from the CLI or a recipe.

    Attributes:
        method: Merge method name.
        base: The base model (mergekit string form) or None.
        models: Whole input models (empty when ``slices`` is given).
        parameters: Top-level parameter settings.
        dtype: Output dtype (the recipe's ``out_dtype``, else its ``dtype``).
        origin: The recipe file; None for the command line.
        slices: Output slices (mergekit's ``slices:``), or None.
        compute_dtype: The recipe's ``dtype`` (mergekit's compute dtype; recorded only).
        tokenizer: The output vocabulary, or None (the donor's tokenizer files are copied).
        chat_template: ``auto`` or a Jinja template for the output's tokenizer, or None.
        warnings: Recipe keys mergekit ignores (the merge reports them).
    """

    method: str
    base: str | None
    models: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    origin: str | None = None      # the recipe file, None for the command line
    slices: list[SliceSpec] | None = None
    compute_dtype: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def where(self) -> str:
        """How errors name this request's origin."""
        return f"recipe {self.origin}" if self.origin else "parameters"

    def referenced(self) -> list[str]:
        """Every model the request names (base first, then in recipe order), each once."""
        seen: dict[tuple, str] = {}
        names = ([self.base] if self.base else []) + [m.location for m in self.models]
        for s in self.slices or []:
            names += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        for n in names:
            seen.setdefault(ModelRef.parse(n).key, n)
        return list(seen.values())


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, float, bool, str)) and x is not None


def check_setting(value: Any, where: str) -> None:
    """Raise UsageError when ``value`` is not a scalar, a list of scalars or a list of {filter, value}."""
    if _scalar(value):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        if all(_scalar(v) for v in value):
            return
        for v in value:
            if not isinstance(v, dict) or "value" not in v or set(v) - {"filter", "value"}:
                raise UsageError(f"{where}: each entry of a filtered parameter list needs exactly 'value' and an "
                                 f"optional 'filter', got {v!r}.")
            if v.get("filter") is not None and not isinstance(v["filter"], str):
                raise UsageError(f"{where}: a 'filter' is a substring of tensor names (text), not {v['filter']!r}.")
            check_setting(v["value"], where)
        return
    raise UsageError(f"{where}: {value!r} is not a scalar, a list of numbers or a list of {{filter, value}} entries.")


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """The value of a setting for one tensor at layer fraction ``t`` (mergekit's rules);
    None when no filter entry matches."""
    if isinstance(value, dict):
        value = [value]
    if _scalar(value):
        return value
    if not value:
        return None
    if all(_scalar(v) for v in value):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    for cond in value:
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
            return evaluate(cond["value"], tensor_name, t)
    return None


# ---- the YAML reader -------------------------------------------------------------------------

class _Reader:
    """Walks one recipe document, collecting warnings for keys mergekit ignores."""

    def __init__(self, path: Path):
        self.path = path
        self.warnings: list[str] = []

    def fail(self, where: str, message: str) -> UsageError:
        return UsageError(f"recipe {self.path}: {where}{': ' if where else ''}{message}", path=self.path)

    def keys(self, doc: dict, allowed: tuple[str, ...], where: str) -> None:
        for k in doc:
            if k not in allowed:
                self.warnings.append(f"recipe {self.path}: {where + ': ' if where else ''}unknown key {k!r} "
                                     f"(ignored, as mergekit does; known keys: {', '.join(allowed)}).")

    def mapping(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, not {type(value).__name__}.")
        return value

    def model(self, value: Any, where: str) -> str:
        if value is None:
            raise self.fail(where, "names no model.")
        ref = ModelRef.parse(str(value) if isinstance(value, (int, float)) else value, f"recipe {self.path}: {where}")
        return str(ref)

    def params(self, value: Any, where: str) -> dict[str, Any]:
        params = self.mapping(value, where)
        for k, v in params.items():
            if not isinstance(k, str):
                raise self.fail(where, f"parameter names are text, not {k!r}.")
            check_setting(v, f"recipe {self.path}: {where}.{k}")
        return dict(params)

    def models(self, value: Any) -> list[ModelEntry]:
        if not isinstance(value, list) or not value:
            raise self.fail("", "'models' must be a non-empty list of {model: ..., parameters: ...} entries.")
        out = []
        for i, m in enumerate(value):
            where = f"models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict) or "model" not in m:
                raise self.fail(where, "needs a 'model' key.")
            self.keys(m, MODEL_KEYS, where)
            out.append(ModelEntry(self.model(m["model"], where + ".model"),
                                  self.params(m.get("parameters"), where + ".parameters")))
        return out

    def slices(self, value: Any) -> list[SliceSpec]:
        if not isinstance(value, list) or not value:
            raise self.fail("", "'slices' must be a non-empty list of {sources: [...]} entries.")
        out = []
        for i, s in enumerate(value):
            where = f"slices[{i}]"
            s = self.mapping(s, where)
            self.keys(s, SLICE_KEYS, where)
            sources = s.get("sources")
            if not isinstance(sources, list) or not sources:
                raise self.fail(where, "needs 'sources': a non-empty list of {model, layer_range} entries.")
            srcs = []
            for j, src in enumerate(sources):
                w = f"{where}.sources[{j}]"
                src = self.mapping(src, w)
                self.keys(src, SOURCE_KEYS, w)
                if "model" not in src:
                    raise self.fail(w, "needs a 'model' key.")
                srcs.append(SliceSource(self.model(src["model"], w + ".model"), self.layer_range(src.get("layer_range"), w),
                                        self.params(src.get("parameters"), w + ".parameters")))
            if s.get("residual_weight") is not None:
                self.warnings.append(f"recipe {self.path}: {where}: 'residual_weight' has no effect in mergekit 0.1.5 "
                                     f"(ignored here too).")
            base = s.get("base_model")
            out.append(SliceSpec(srcs, self.model(base, where + ".base_model") if base is not None else None,
                                 self.params(s.get("parameters"), where + ".parameters")))
        return out

    def layer_range(self, value: Any, where: str) -> tuple[int, int]:
        # mergekit's pydantic reads 24.0 as 24 (a whole-valued float), but not 23.5 or true
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            not isinstance(x, bool) and (isinstance(x, int) or (isinstance(x, float) and x.is_integer()))
            for x in value)
        if not ok:
            raise self.fail(where, f"'layer_range' must be [start, stop] (two whole numbers), got {value!r}.")
        a, b = (int(x) for x in value)
        if a < 0 or b <= a:
            raise self.fail(where, f"'layer_range' [{a}, {b}] is empty or negative; it is [start, stop) with "
                                   f"0 ≤ start < stop.")
        return int(a), int(b)

    def tokenizer(self, doc: dict) -> TokenizerSpec | None:
        if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
            raise self.fail("", "give either 'tokenizer_source' or 'tokenizer', not both (mergekit refuses both).")
        if doc.get("tokenizer_source") is not None:
            return TokenizerSpec(self.token_source(doc["tokenizer_source"], "tokenizer_source"), legacy=True)
        if doc.get("tokenizer") is None:
            return None
        block = self.mapping(doc["tokenizer"], "tokenizer")
        self.keys(block, TOKENIZER_KEYS, "tokenizer")
        source = self.token_source(block.get("source", "union"), "tokenizer.source")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise self.fail("tokenizer.pad_to_multiple_of", f"must be a whole number ≥ 1, got {pad!r}.")
        tokens = {}
        for tok, cfg in self.mapping(block.get("tokens"), "tokenizer.tokens").items():
            tokens[str(tok)] = self.token(cfg, f"tokenizer.tokens[{tok!r}]")
        return TokenizerSpec(source, tokens, pad)

    def token_source(self, value: Any, where: str) -> str:
        if value in ("base", "union"):
            return value
        return self.model(value, where)

    def token(self, cfg: Any, where: str) -> TokenSpec:
        cfg = self.mapping(cfg, where)
        self.keys(cfg, TOKEN_KEYS, where)
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise self.fail(where + ".force", f"must be true or false, got {force!r}.")
        src = cfg.get("source")
        if src is None:
            return TokenSpec(None, force=force)
        if isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero":
                return TokenSpec("zero", force=force)
            if kind == "model_token":
                tid, tok = src.get("token_id"), src.get("token")
                if (tid is None) == (tok is None):
                    raise self.fail(where + ".source", "a model_token source needs exactly one of token_id or token.")
                if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
                    raise self.fail(where + ".source.token_id", f"must be a whole number ≥ 0, got {tid!r}.")
                return TokenSpec("model_token", self.model(src.get("model"), where + ".source.model"), tid,
                                 None if tok is None else str(tok), force)
            raise self.fail(where + ".source", f"kind must be 'model_token' or 'zero', got {kind!r}.")
        return TokenSpec("model", self.model(src, where + ".source"), force=force)

    def chat_template(self, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail("chat_template", f"must be 'auto' or a Jinja template (text), not {value!r}.")
        if value in BUNDLED_TEMPLATES:
            raise self.fail("chat_template", f"{value!r} names one of mergekit's bundled templates, which surgery does "
                                             f"not ship; paste the template text itself, or use 'auto'.")
        if value != "auto" and (len(value) < 20 or "{" not in value):
            raise self.fail("chat_template", f"{value!r} is not a chat template: give 'auto' or a Jinja template.")
        return value

    def dtype(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        name = str(value).removeprefix("torch.")
        if name not in DTYPES:
            raise self.fail(key, f"{value!r} is not a dtype mergekit knows; choose one of {', '.join(DTYPES)}.")
        return name


def load_recipe(path: str | Path) -> MergeRequest:
    """Read a mergekit-style YAML recipe (every entry checked; no model is opened).

    Raises:
        InputError: The file cannot be read or is not YAML.
        UsageError: A mergekit key surgery does not implement (named), what mergekit would refuse
            (both or neither of ``models`` and ``slices``, no ``merge_method``, malformed values,
            empty layer ranges, ``tokenizer_source`` with ``tokenizer``).
    """
    p = Path(path)
    # the validated reader: size, strict UTF-8, safe tags, bounded nesting and aliases
    doc = read_yaml(p, what="recipe", expect=None)
    if not isinstance(doc, dict):
        raise UsageError(f"recipe {p} must be a mapping with merge_method, base_model and models or slices.", path=p)
    r = _Reader(p)
    for key, why in UNSUPPORTED_KEYS.items():
        if doc.get(key) is not None:
            raise r.fail("", f"'{key}' is not supported: {why}.")
    r.keys(doc, RECIPE_KEYS, "")
    if "merge_method" not in doc or not isinstance(doc["merge_method"], str):
        raise r.fail("", "has no merge_method (a method name such as ties, slerp or passthrough).")
    has_models, has_slices = bool(doc.get("models")), bool(doc.get("slices"))   # mergekit: an empty list is absent
    if has_models == has_slices:
        raise r.fail("", "give exactly one of 'models' (whole models) or 'slices' (layer ranges), as mergekit requires.")
    models = r.models(doc["models"]) if has_models else []
    slices = r.slices(doc["slices"]) if has_slices else None
    params = r.params(doc.get("parameters"), "parameters")
    base = doc.get("base_model")
    compute = r.dtype(doc.get("dtype"), "dtype")
    out = r.dtype(doc.get("out_dtype"), "out_dtype")
    return MergeRequest(doc["merge_method"], r.model(base, "base_model") if base is not None else None, models,
                        params, out or compute, origin=str(p), slices=slices, compute_dtype=compute,
                        tokenizer=r.tokenizer(doc), chat_template=r.chat_template(doc.get("chat_template")),
                        warnings=r.warnings)
