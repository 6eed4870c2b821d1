"""mergekit-style merge requests: the YAML recipe reader and per-tensor parameter values.

A parameter value (``weight``, ``density``, ``t``...) is, as in mergekit:

- a scalar;
- a list of numbers, interpolated linearly across the layers (layer i of N sits at
  i/(N−1); tensors outside the layers — embeddings, final norm — take the first value);
- a list of ``{filter, value}`` entries: the first entry whose ``filter`` is a substring of
  the tensor name (or has no filter, or ``*``) gives the value (itself a scalar or list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InputError, UsageError

RECIPE_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
MODEL_KEYS = ("model", "parameters")


@dataclass
class ModelEntry:
    """One input model and its own parameter settings."""

    location: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeRequest:
    """Everything a merge needs to know about its inputs, from the CLI or a recipe."""

    method: str
    base: str | None
    models: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    origin: str | None = None      # the recipe file, None for the command line


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
            check_setting(v["value"], where)
        return
    raise UsageError(f"{where}: {value!r} is not a scalar, a list of numbers or a list of {{filter, value}} entries.")


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """The value of a setting for one tensor at layer fraction ``t`` (mergekit's rules)."""
    if isinstance(value, dict):
        value = [value]
    if _scalar(value):
        return value
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
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate(cond["value"], tensor_name, t)
    return None


def load_recipe(path: str | Path) -> MergeRequest:
    """Read a mergekit-style YAML recipe.

    Raises:
        InputError: The file cannot be read or is not YAML.
        UsageError: Unknown keys (named), a missing ``merge_method`` or ``models``, malformed values.
    """
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise InputError(f"recipe {p} cannot be read: {exc.strerror or exc}.", path=p) from exc
    except yaml.YAMLError as exc:
        raise InputError(f"recipe {p} is not valid YAML: {str(exc).splitlines()[0]}.", path=p) from exc
    if not isinstance(doc, dict):
        raise UsageError(f"recipe {p} must be a mapping with merge_method, base_model and models.", path=p)
    unknown = sorted(set(doc) - set(RECIPE_KEYS))
    if unknown:
        hint = " (slices are not supported; list whole models under 'models')" if "slices" in unknown else ""
        raise UsageError(f"recipe {p}: unsupported key(s) {', '.join(unknown)}{hint}; supported: "
                         f"{', '.join(RECIPE_KEYS)}.", path=p)
    if "merge_method" not in doc:
        raise UsageError(f"recipe {p} has no merge_method.", path=p)
    models = doc.get("models") or []
    if not isinstance(models, list) or not models:
        raise UsageError(f"recipe {p} lists no models (a 'models:' list of {{model: ...}} entries).", path=p)
    entries = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise UsageError(f"recipe {p}: models[{i}] needs a 'model' key.", path=p)
        bad = sorted(set(m) - set(MODEL_KEYS))
        if bad:
            raise UsageError(f"recipe {p}: models[{i}] has unsupported key(s) {', '.join(bad)}; supported: "
                             f"{', '.join(MODEL_KEYS)}.", path=p)
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise UsageError(f"recipe {p}: models[{i}].parameters must be a mapping.", path=p)
        for k, v in params.items():
            check_setting(v, f"recipe {p}: models[{i}].parameters.{k}")
        entries.append(ModelEntry(str(m["model"]), dict(params)))
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise UsageError(f"recipe {p}: parameters must be a mapping.", path=p)
    for k, v in params.items():
        check_setting(v, f"recipe {p}: parameters.{k}")
    base = doc.get("base_model")
    dtype = doc.get("out_dtype") or doc.get("dtype")
    return MergeRequest(str(doc["merge_method"]), str(base) if base is not None else None, entries, dict(params),
                        str(dtype) if dtype else None, origin=str(p))
