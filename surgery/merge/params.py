"""Parameter values of a merge, per tensor, with mergekit's precedence and the methods' declared
types and ranges.

A model's own setting wins, then the top-level one, then the method's default. A value is a
scalar, a list of numbers interpolated across the layers, or a list of ``{filter, value}``
entries (:func:`surgery.merge.recipe.evaluate`). Every scalar a setting can produce is
checked against the parameter's declaration before any tensor is read.
"""

from __future__ import annotations

from typing import Any

from ..checkpoint.roles import depth_of
from ..core.errors import UsageError
from .method import Method, Param, param_table
from .recipe import MergeRequest, evaluate


def _scalars(value: Any) -> list[Any]:
    """Every scalar a setting can evaluate to (list entries, filter values, nested)."""
    if isinstance(value, dict):
        return _scalars(value.get("value"))
    if isinstance(value, list):
        return [x for v in value for x in _scalars(v)]
    return [value]


def _is_gradient(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 1 and all(not isinstance(v, (dict, list)) for v in value)


def check_value(param: Param, value: Any, where: str) -> None:
    """Every scalar of a setting valid for ``param``; bool and text parameters take no gradients."""
    if _is_gradient(value) and param.type in ("bool", "str"):
        raise UsageError(f"{where}: `{param.name}` takes one value, not a list interpolated across layers.")
    for x in _scalars(value):
        param.check(x, where)


class Params:
    """Resolves the global and per-model parameter values of every tensor of a merge.

    Args:
        method: The method's declaration.
        request: The merge request (CLI or recipe).
        num_layers: Layer count of the reference model (for gradients).

    Raises:
        UsageError: A value of the wrong type or out of range (named with where it was set);
            on the command line, a parameter the method does not take.

    Attributes:
        warnings: One line per setting that mergekit would accept but this method does not
            use (recipes run as in mergekit; the command layer prints these on stderr).
    """

    def __init__(self, method: Method, request: MergeRequest, num_layers: int):
        self.method, self.request, self.num_layers = method, request, num_layers
        self.table = param_table(method)
        self.warnings: list[str] = []
        origin = f"recipe {request.origin}" if request.origin else "parameters"
        self.global_settings = self._known(request.parameters, origin, per_model_ok=True)
        self.model_settings = [self._known(m.parameters, f"{origin}: model {m.location}", per_model_ok=False)
                               for m in request.models]

    def _known(self, settings: dict[str, Any], where: str, per_model_ok: bool) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        valid = ", ".join(p.name for p in self.method.params) or "none"
        for key, value in settings.items():
            param = self.table.get(key)
            if param is None:
                msg = f"{where}: merge method {self.method.name!r} does not take `{key}`; it takes: {valid}"
                if self.request.origin is None:
                    raise UsageError(msg + ".")
                self.warnings.append(msg + " (ignored, as mergekit does).")
                continue
            if not per_model_ok and not param.per_model:
                # mergekit reads a method's global parameters from the top level only
                self.warnings.append(f"{where}: `{key}` is a global parameter of {self.method.name!r}; set it at the "
                                     f"top level (this setting is ignored, as mergekit does).")
                continue
            check_value(param, value, where)
            kept[key] = value
        return kept

    def layer_t(self, name: str) -> float:
        """Relative depth of a tensor in [0, 1] (0 outside the layers)."""
        d = depth_of(name)
        if d is None:
            return 0.0
        return min(1.0, d / (self.num_layers - 1)) if self.num_layers > 1 else 1.0

    def _value(self, param: Param, settings: list[dict[str, Any]], name: str, t: float) -> Any:
        for s in settings:
            if param.name in s:
                v = evaluate(s[param.name], name, t)
                if v is not None:
                    return int(round(v)) if param.type == "int" and isinstance(v, float) else v
        return param.default

    def shared(self, name: str) -> dict[str, Any]:
        """Global parameters for tensor ``name``."""
        t = self.layer_t(name)
        return {p.name: self._value(p, [self.global_settings], name, t) for p in self.method.params if not p.per_model}

    def per_model(self, name: str) -> list[dict[str, Any]]:
        """Per-model parameters for tensor ``name``, one dict per model."""
        t = self.layer_t(name)
        return [{p.name: self._value(p, [ms, self.global_settings], name, t) for p in self.method.params if p.per_model}
                for ms in self.model_settings]

    def recorded(self) -> dict[str, Any]:
        """The settings as given (for the model card), defaults filled in for the globals."""
        out = {p.name: p.default for p in self.method.params if not p.per_model}
        out.update(self.global_settings)
        return out
