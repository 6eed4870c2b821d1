"""The merge methods, one explicit table keyed by name (no registration by import side effect).

A method is added by writing its module, one :class:`MethodSpec` line below and a test.
Batch methods see one tensor of every model at a time; continual methods fold the models
in order into a running state that can be saved and resumed (see ``state.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from . import continual, dare, linear, slerp, task_arithmetic, ties

# merge(base, load, n, shared, per_model, tensor_name, seed) -> merged tensor (float32), where
# load(i) returns a fresh float32 copy of model i's tensor (or of a row block of it, for
# elementwise methods) that the method may overwrite.
BatchMerge = Callable[[Any, Callable[[int], Any], int, dict, list, str, int], Any]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is and which parameters it takes.

    Attributes:
        name: The ``-m`` / ``merge_method`` name.
        kind: ``batch`` or ``continual``.
        paper: Link to the paper.
        shared: Global parameters and their defaults.
        per_model: Per-model parameters and their defaults.
        base: ``required``, ``optional`` or ``ignored`` (mergekit's base policy).
        min_models, max_models: How many models (the base not counted).
        merge: Batch methods: the per-tensor function.
        elementwise: Batch methods whose output entry depends only on the same entry of the
            inputs (and per-tensor parameters): they stream in row blocks.
        rows: Batch methods that stream in row blocks although an entry depends on more than
            the same entry of the inputs (TIES' per-tensor threshold, DARE's seeded draws by
            flat position): ``rows(shape, base_rows, model_rows, n, shared, per_model,
            tensor_name, seed)`` returns the ``OutputTensor.rows`` function of one tensor;
            scalars use ``merge``.
        step: Continual methods other than OPCM: ``step(state, tau, count, **shared)``.
        output_scale: Continual: the merged task vector is ``output_scale(shared) · state``.
    """

    name: str
    kind: str
    paper: str
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, Any] = field(default_factory=dict)
    base: str = "required"
    min_models: int = 1
    max_models: int | None = None
    merge: BatchMerge | None = None
    elementwise: bool = False
    rows: Callable | None = None
    step: Callable | None = None
    output_scale: Callable[[dict], float] = lambda shared: 1.0


def _w(per_model, key="weight"):
    return [float(p[key]) for p in per_model]


def _linear(base, load, n, shared, per_model, name, seed):
    return linear.linear([load(i) for i in range(n)], _w(per_model), bool(shared["normalize"]))


def _task_arithmetic(base, load, n, shared, per_model, name, seed):
    deltas = [load(i).sub_(base) for i in range(n)]
    mixed = task_arithmetic.combine(deltas, _w(per_model), bool(shared["normalize"]))
    return mixed.mul_(float(shared["lambda"])).add_(base)


def _ties(base, load, n, shared, per_model, name, seed):
    return ties.ties_streamed(base, load, n, _w(per_model), _w(per_model, "density"), float(shared["lambda"]),
                              bool(shared["normalize"]))


def ties_argsort(base, load, n, shared, per_model, name, seed):
    """``ties`` with mergekit's argsort choice among equal magnitudes at the trim threshold."""
    return ties.ties_streamed(base, load, n, _w(per_model), _w(per_model, "density"), float(shared["lambda"]),
                              bool(shared["normalize"]), sparsify=lambda d, dens, i: ties.trim_argsort_(d, dens))


def _ties_rows(shape, base_rows, model_rows, n, shared, per_model, name, seed):
    return ties.TiesRows(shape, base_rows, model_rows, n, _w(per_model), _w(per_model, "density"),
                         float(shared["lambda"]), bool(shared["normalize"]))


def _dare(consensus):
    def run(base, load, n, shared, per_model, name, seed):
        return dare.dare_streamed(base, load, n, _w(per_model), _w(per_model, "density"), seed=seed, tensor_name=name,
                                  lam=float(shared["lambda"]), normalize=bool(shared["normalize"]),
                                  rescale=bool(shared["rescale"]), consensus=consensus)
    return run


def _dare_rows(consensus):
    def rows(shape, base_rows, model_rows, n, shared, per_model, name, seed):
        return dare.DareRows(shape, base_rows, model_rows, n, _w(per_model), _w(per_model, "density"), seed=seed,
                             tensor_name=name, lam=float(shared["lambda"]), normalize=bool(shared["normalize"]),
                             rescale=bool(shared["rescale"]), consensus=consensus)
    return rows


def _slerp(base, load, n, shared, per_model, name, seed):
    return slerp.slerp(float(shared["t"]), base, load(0))


_GTA_SHARED = {"lambda": 1.0, "int8_mask": False}

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", "batch", "https://arxiv.org/abs/2203.05482", {"normalize": True},
                         {"weight": 1.0}, base="ignored", merge=_linear, elementwise=True),
    "task_arithmetic": MethodSpec("task_arithmetic", "batch", "https://arxiv.org/abs/2212.04089",
                                  {**_GTA_SHARED, "normalize": False}, {"weight": 1.0}, merge=_task_arithmetic,
                                  elementwise=True),
    "ties": MethodSpec("ties", "batch", "https://arxiv.org/abs/2306.01708", {**_GTA_SHARED, "normalize": True},
                       {"weight": 1.0, "density": 1.0}, merge=_ties, rows=_ties_rows),
    "dare_linear": MethodSpec("dare_linear", "batch", "https://arxiv.org/abs/2311.03099",
                              {**_GTA_SHARED, "normalize": False, "rescale": True}, {"weight": 1.0, "density": 1.0},
                              merge=_dare(False), rows=_dare_rows(False)),
    "dare_ties": MethodSpec("dare_ties", "batch", "https://arxiv.org/abs/2311.03099",
                            {**_GTA_SHARED, "normalize": False, "rescale": True}, {"weight": 1.0, "density": 1.0},
                            merge=_dare(True), rows=_dare_rows(True)),
    "slerp": MethodSpec("slerp", "batch", "https://en.wikipedia.org/wiki/Slerp", {"t": 0.5}, {},
                        min_models=1, max_models=1, merge=_slerp),
    "opcm": MethodSpec("opcm", "continual", "https://arxiv.org/abs/2501.09522",
                       {"alpha": 0.5, "keep_diagonal": False, "project_embeddings": False}),
    "continual_task_arithmetic": MethodSpec(
        "continual_task_arithmetic", "continual", "https://arxiv.org/abs/2501.09522", {"scaling": 0.3},
        step=lambda s, tau, n, shared: continual.continual_task_arithmetic_step(s, tau, n, float(shared["scaling"]))),
    "continual_weight_average": MethodSpec(
        "continual_weight_average", "continual", "https://arxiv.org/abs/2501.09522", {},
        step=lambda s, tau, n, shared: continual.continual_weight_average_step(s, tau, n)),
    "magmax": MethodSpec(
        "magmax", "continual", "https://arxiv.org/abs/2407.06322", {"scaling": 0.5},
        step=lambda s, tau, n, shared: continual.magmax_step(s, tau, n),
        output_scale=lambda shared: float(shared["scaling"])),
}


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; UsageError listing the valid names otherwise."""
    from ..core.errors import UsageError

    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}.") from None
