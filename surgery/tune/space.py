"""What ``surgery tune`` searches: the declared search ranges of a merge method's parameters,
optionally split by layer group, and how a point becomes a mergekit-style merge request.

A method's parameters with a ``search`` range (:class:`surgery.merge.method.Param`) are the
dimensions: ``weight`` once per model, every other one once for all models (set at the top
level, as mergekit applies it to every model). With layer groups, each model's ``weight`` is
searched separately for the attention projections, the MLP and everything else (embeddings,
norms), written as mergekit ``{filter, value}`` lists so the winning recipe re-runs with
``surgery merge --config``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from ..checkpoint.roles import sublayer_of
from ..core.errors import UsageError
from ..merge.method import Method
from ..merge.recipe import MergeRequest, ModelEntry

GROUPS = ("attention", "mlp", "rest")
ATTENTION = {"q", "k", "v", "qkv", "o"}
MLP = {"gate", "up", "down"}
DIGITS = 4                  # candidate values are rounded to this many decimals (stable keys, clean recipes)
# parameters that scale task vectors: searched up to 1 (each fine-tune's own step, what the
# defaults and the papers use), not to the declared 2, unless extrapolation is asked for —
# probe text a fine-tune was trained on rewards going further along its task vector, which
# does not carry over to other text (docs/tune.md, "Why the weights stop at 1")
SCALES = ("weight", "lambda", "scaling_factor")
SCALE_CAP = 1.0


def _module_path(name: str) -> str:
    """The last two module names of a parameter (``self_attn.q_proj`` of ``...self_attn.q_proj.weight``)."""
    parts = re.sub(r"\.(weight|bias)$", "", name).split(".")
    return ".".join(parts[-2:])


def group_filters(names: list[str]) -> dict[str, list[str]]:
    """mergekit filters (substrings of tensor names) selecting the attention and MLP tensors.

    Built from the names: each attention / MLP weight contributes the last two module names of
    its path (``self_attn.q_proj``, ``mlp.c_proj``), which must not occur in any tensor of
    another group; biases of the same modules match the same filters. Everything else is the
    ``rest`` group (the recipe's unfiltered entry).

    Raises:
        UsageError: The checkpoint has no recognisable attention or MLP weights, or a filter
            would also select a tensor of another group.
    """
    kinds: dict[str, str] = {}
    for n in names:
        sub = sublayer_of(n)
        if sub in ATTENTION:
            kinds[n] = "attention"
        elif sub in MLP:
            kinds[n] = "mlp"
    filters: dict[str, list[str]] = {"attention": [], "mlp": []}
    for n, g in kinds.items():
        f = _module_path(n)
        if f not in filters[g]:
            filters[g].append(f)
    if not filters["attention"] or not filters["mlp"]:
        raise UsageError("`groups` needs attention and MLP projections the checkpoint's names reveal "
                         "(q_proj, c_attn, gate_proj, mlp.c_fc ...); this architecture has none, tune without groups.")
    for g, fs in filters.items():
        for f in fs:
            wrong = [n for n in names if f in n and _group_of(n, kinds) != g]
            if wrong:
                raise UsageError(f"the layer-group filter {f!r} also matches {wrong[0]!r}; tune without `groups`.")
    return {g: sorted(fs) for g, fs in filters.items()}


def _group_of(name: str, kinds: dict[str, str]) -> str:
    if name in kinds:
        return kinds[name]
    stem = re.sub(r"\.bias$", ".weight", name)
    return kinds.get(stem, "rest")


@dataclass(frozen=True)
class Dim:
    """One searched number.

    Attributes:
        param: The method's parameter.
        model: The model a per-model ``weight`` belongs to (None: one value for every model).
        group: The layer group (None: every tensor).
        low, high: The searched range.
    """

    param: str
    model: int | None
    group: str | None
    low: float
    high: float

    @property
    def label(self) -> str:
        s = self.param if self.model is None else f"{self.param}[{self.model}]"
        return s if self.group is None else f"{s}.{self.group}"


class Space:
    """The searched parameters of one method over a template request.

    Args:
        method: The method's declaration.
        template: Base, models, dtype and fixed parameter settings (from the command line or a recipe).
        filters: Layer-group filters (:func:`group_filters`), or None to search without groups.
        extrapolate: Search the scales (:data:`SCALES`) over their whole declared range; by
            default they stop at :data:`SCALE_CAP` (or at the template's own value when it is larger).

    Raises:
        UsageError: The method declares nothing to search.
    """

    def __init__(self, method: Method, template: MergeRequest, filters: dict[str, list[str]] | None = None,
                 extrapolate: bool = False):
        self.method, self.template, self.filters, self.extrapolate = method, template, filters, extrapolate
        self.dims: list[Dim] = []
        for p in method.params:
            if p.search is None:
                continue
            lo, hi = p.search
            if p.name in SCALES and not extrapolate:
                hi = max(lo, min(hi, max([SCALE_CAP, *self._template_values(p.name)])))
            if p.per_model and p.name == "weight":
                for i in range(len(template.models)):
                    for g in (GROUPS if filters else (None,)):
                        self.dims.append(Dim(p.name, i, g, lo, hi))
            else:
                self.dims.append(Dim(p.name, None, None, lo, hi))
        if not self.dims:
            raise UsageError(f"merge method {method.name!r} has no parameter tune can search; choose one of the "
                             f"methods `surgery tune --help` lists.")
        self.start = [self._initial(d) for d in self.dims]

    @property
    def normalizes_weights(self) -> bool:
        """The method divides the weights by their sum (its ``normalize`` is on for this template)."""
        declared = next((p for p in self.method.params if p.name == "normalize"), None)
        if declared is None:
            return False
        value = self.template.parameters.get("normalize", declared.default)
        return bool(value) if isinstance(value, (bool, int)) else False

    @property
    def weight_dims(self) -> list[int]:
        """Indices of the per-model weight dimensions (moved together by a uniform scaling)."""
        return [i for i, d in enumerate(self.dims) if d.param == "weight" and d.model is not None]

    def _template_values(self, param: str) -> list[float]:
        """The plain numbers the template sets for ``param`` (top level and per model)."""
        values = [self.template.parameters.get(param)] + [m.parameters.get(param) for m in self.template.models]
        return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def _initial(self, d: Dim) -> float:
        """The template's value when it sets a plain number, else the declared default (clipped)."""
        value = None
        if d.model is not None:
            value = self.template.models[d.model].parameters.get(d.param)
        if value is None:
            value = self.template.parameters.get(d.param)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            value = next(p.default for p in self.method.params if p.name == d.param)
        return self.clip(d, float(value))

    @staticmethod
    def clip(d: Dim, x: float) -> float:
        return round(min(d.high, max(d.low, x)), DIGITS)

    def point(self, x: list[float]) -> list[float]:
        """``x`` clipped into the ranges and rounded."""
        return [self.clip(d, v) for d, v in zip(self.dims, x)]

    def grouped(self, filters: dict[str, list[str]], x: list[float]) -> tuple["Space", list[float]]:
        """The same method searched by layer group, and ``x`` in it (every group at the model's weight)."""
        space = Space(self.method, self.template, filters, self.extrapolate)
        values = {(d.param, d.model): v for d, v in zip(self.dims, x)}
        return space, space.point([values.get((d.param, d.model), s) for d, s in zip(space.dims, space.start)])

    def settings(self, x: list[float]) -> dict[str, float]:
        """The point as {label: value}, for logs and reports."""
        return {d.label: v for d, v in zip(self.dims, self.point(x))}

    def request(self, x: list[float]) -> MergeRequest:
        """The merge request of point ``x``: the template with the searched values set."""
        x = self.point(x)
        top = dict(self.template.parameters)
        models = [ModelEntry(m.location, dict(m.parameters)) for m in self.template.models]
        per_model: dict[tuple[str, int], dict[str | None, float]] = {}
        for d, v in zip(self.dims, x):
            if d.model is None:
                top[d.param] = v
                for m in models:                  # a model's own setting would win over the top level
                    m.parameters.pop(d.param, None)
            else:
                per_model.setdefault((d.param, d.model), {})[d.group] = v
        for (param, i), by_group in per_model.items():
            if None in by_group:
                models[i].parameters[param] = by_group[None]
            else:
                assert self.filters is not None
                entries: list[dict[str, Any]] = []
                for g in ("attention", "mlp"):
                    entries += [{"filter": f, "value": by_group[g]} for f in self.filters[g]]
                entries.append({"value": by_group["rest"]})
                models[i].parameters[param] = entries
        return dataclasses.replace(self.template, method=self.method.name, models=models, parameters=top)

    def key(self, x: list[float]) -> str:
        """A canonical text of the candidate (its method and every setting): equal keys, equal merges."""
        r = self.request(x)
        return json.dumps({"method": r.method, "parameters": r.parameters,
                           "models": [m.parameters for m in r.models]}, sort_keys=True)


def recipe_dict(request: MergeRequest) -> dict[str, Any]:
    """A mergekit-style recipe (``surgery merge --config``) of a request."""
    doc: dict[str, Any] = {"merge_method": request.method}
    if request.base:
        doc["base_model"] = request.base
    doc["models"] = [{"model": m.location, **({"parameters": m.parameters} if m.parameters else {})}
                     for m in request.models]
    if request.parameters:
        doc["parameters"] = request.parameters
    if request.dtype:
        doc["dtype"] = request.dtype
    return doc
