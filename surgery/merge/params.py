"""Parameter values of a merge, per tensor, with mergekit's precedence and the methods' declared
types and ranges.

Settings live in scopes, highest precedence first (mergekit's ``ConfigReader``):

- a method's global parameters: the slice's ``parameters``, then the top level;
- a per-model parameter of one input: that input's own ``parameters`` (``models[i]`` or the
  slice source), then the slice's, then the top level.

The first scope that sets a parameter and yields a value for the tensor wins (a filter list
with no matching entry falls through to the next scope); otherwise the method's default.
A value is a scalar, a list interpolated at the tensor's layer position ``t``, or a list of
``{filter, value}`` entries (:func:`surgery.merge.recipe.evaluate`); a global parameter's
filters see the output tensor's name, a per-model one's the input tensor's name (they differ
in a slice that takes layer 5 of a model into output layer 2). Every scalar a setting can
produce is checked against the parameter's declaration before any tensor is read.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..checkpoint.roles import depth_of
from ..core.errors import UsageError
from .method import Method, Param, param_table
from .recipe import MergeRequest, evaluate

Scope = dict[str, Any]


def _scalars(value: Any) -> list[Any]:
    """Every scalar a setting can evaluate to (list entries, filter values, nested)."""
    if isinstance(value, dict):
        return _scalars(value.get("value"))
    if isinstance(value, list):
        return [x for v in value for x in _scalars(v)]
    return [value]


def check_value(param: Param, value: Any, where: str) -> None:
    """Every scalar of a setting valid for ``param`` (a list of booleans or texts is accepted, as
    mergekit does: layer position t picks ``value[int(t·(len−1))]``)."""
    for x in _scalars(value):
        param.check(x, where)


MISSING = object()


def resolve(param: Param, scopes: Sequence[Scope], tensor_name: str, t: float) -> Any:
    """The value of ``param`` for one tensor at layer position ``t`` from ``scopes`` (highest
    first); :data:`MISSING` when none sets it and the parameter has no default."""
    for s in scopes:
        if param.name in s:
            v = evaluate(s[param.name], tensor_name, t)
            if v is not None:
                return int(round(v)) if param.type == "int" and isinstance(v, float) else v
    return MISSING if getattr(param, "required", False) else param.default


class Params:
    """The checked parameter settings of a merge, resolved per tensor.

    Args:
        method: The method's declaration.
        request: The merge request (CLI or recipe).
        num_layers: Layer count of the reference model (gradients of whole-model merges).

    Raises:
        UsageError: A value of the wrong type or out of range (named with where it was set);
            on the command line, a parameter the method does not take.

    Attributes:
        warnings: One line per setting that mergekit would accept but this method does not
            use (recipes run as in mergekit; the command layer prints these on stderr).
        global_settings: The top-level scope; ``model_settings`` one scope per ``request.models``;
            ``slice_settings`` one per slice; ``source_settings`` per slice, one per source.
    """

    def __init__(self, method: Method, request: MergeRequest, num_layers: int = 1):
        self.method, self.request, self.num_layers = method, request, num_layers
        self.table = param_table(method)
        self.warnings: list[str] = []
        origin = request.where()
        self.global_settings = self._known(request.parameters, origin, shared_ok=True)
        self.model_settings = [self._known(m.parameters, f"{origin}: model {m.location}", shared_ok=False)
                               for m in request.models]
        self.slice_settings: list[Scope] = []
        self.source_settings: list[list[Scope]] = []
        for i, s in enumerate(request.slices or []):
            self.slice_settings.append(self._known(s.parameters, f"{origin}: slices[{i}]", shared_ok=True))
            self.source_settings.append([self._known(src.parameters, f"{origin}: slices[{i}].sources[{j}]",
                                                     shared_ok=False) for j, src in enumerate(s.sources)])

    def _known(self, settings: dict[str, Any], where: str, shared_ok: bool) -> Scope:
        kept: Scope = {}
        valid = ", ".join(p.name for p in self.method.params) or "none"
        for key, value in settings.items():
            param = self.table.get(key)
            if param is None:
                msg = f"{where}: merge method {self.method.name!r} does not take `{key}`; it takes: {valid}"
                if self.request.origin is None:
                    raise UsageError(msg + ".")
                self.warnings.append(msg + " (ignored, as mergekit does).")
                continue
            if not shared_ok and not param.per_model:
                # mergekit reads a method's global parameters from the top level and the slice only
                self.warnings.append(f"{where}: `{key}` is a global parameter of {self.method.name!r}; set it at the "
                                     f"top level (this setting is ignored, as mergekit does).")
                continue
            check_value(param, value, where)
            kept[key] = value
        return kept

    def resolve(self, out_name: str, t: float, shared_scopes: Sequence[Scope],
                inputs: Sequence[tuple[str, Sequence[Scope]]],
                labels: Sequence[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Global parameters of output tensor ``out_name`` and per-model parameters of each input
        (``(input tensor name, scopes)``), at layer position ``t``.

        Raises:
            UsageError: A parameter without a default that no setting gives for this tensor
                (named with the tensor and the model), as mergekit refuses it.
        """
        shared = {p.name: resolve(p, shared_scopes, out_name, t) for p in self.method.params if not p.per_model}
        per = [{p.name: resolve(p, scopes, name, t) for p in self.method.params if p.per_model}
               for name, scopes in inputs]
        for k, values in [(None, shared)] + list(enumerate(per)):
            for key, v in values.items():
                if v is MISSING:
                    p = self.table[key]
                    who = f" of model {labels[k]}" if k is not None and labels else ""
                    raise UsageError(f"{self.request.where()}: merge method {self.method.name!r} needs `{key}` "
                                     f"({p.help or p.range_text()}) for tensor {out_name!r}{who}; set it "
                                     f"{'for the model or ' if p.per_model else ''}at the top level.")
        return shared, per

    # ---- whole-model merges (models form; the continual runner) ------------------------------

    def layer_t(self, name: str) -> float:
        """Relative depth of a tensor in [0, 1] (0 outside the layers; 1 in a one-layer model)."""
        d = depth_of(name)
        if d is None:
            return 0.0
        return min(1.0, d / (self.num_layers - 1)) if self.num_layers > 1 else 1.0

    def shared(self, name: str) -> dict[str, Any]:
        """Global parameters for tensor ``name`` of a whole-model merge."""
        return self.resolve(name, self.layer_t(name), [self.global_settings], [])[0]

    def per_model(self, name: str) -> list[dict[str, Any]]:
        """Per-model parameters for tensor ``name`` of a whole-model merge, one dict per model."""
        return self.resolve(name, self.layer_t(name), [],
                            [(name, [ms, self.global_settings]) for ms in self.model_settings])[1]

    def recorded(self) -> dict[str, Any]:
        """The settings as given (for the model card), defaults filled in for the globals."""
        out = {p.name: p.default for p in self.method.params if not p.per_model}
        out.update(self.global_settings)
        return out
