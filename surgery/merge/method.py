"""The merge-method interface: what a method declares and what it is given.

A method is one module under ``surgery/merge/methods/`` exporting ``METHODS``, a tuple of
declarations, and one line in ``surgery/merge/registry.py``. Everything else — the CLI's
``-p KEY=VALUE`` and its flag aliases, ``surgery merge --help``, recipe validation, range
checks, the dry-run plan, the streaming loop — is derived from the declarations.

Two kinds of method:

- :class:`Batch`: one output tensor from the same tensor of every model. ``merge(ctx)``
  receives a :class:`TensorContext` (lazy access to the base and model tensors, resolved
  parameters, tensor name, layer, relative depth, seed) and returns the merged float32
  tensor — or, for a method that streams a large tensor itself, a ``rows(start, stop)``
  function. ``elementwise=True`` methods (an output entry depends only on the same entry of
  the inputs) are called once per row block, so memory stays at a few MB per model.
- :class:`Continual`: models are folded in order into a running state S_t (one float32
  tensor per merged tensor) that can be saved and resumed. ``step(ctx)`` returns S_t of one
  tensor from S_{t−1}, τ_t and the method's scalars; ``end_step`` turns whole-model totals
  (Σ‖τ_t‖², Σ‖S_t‖² over every tensor) into the scalars of the next step (OPCM's λ_t);
  ``output`` maps S_T to the merged tensor. Methods that need the totals run one streaming
  pass per model; the others fold every model in a single pass.

See docs/merge-methods.md for a worked example of adding a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..core.errors import UsageError

if TYPE_CHECKING:
    import torch

# ---- parameters -----------------------------------------------------------------------------

_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    Attributes:
        name: mergekit's name: the recipe key and the ``-p NAME=VALUE`` key.
        default: Value when nothing sets it.
        type: ``float``, ``int``, ``bool`` or ``str``.
        per_model: Set per model (mergekit's tensor parameters such as ``weight``); otherwise global.
        low, high: Valid range (None: unbounded); ``low_open`` / ``high_open`` exclude the bound.
        choices: The valid values of a ``str`` parameter.
        help: One line for ``surgery merge --help``.
        required: No default: a merge that does not set it is refused (mergekit's required
            parameters, e.g. nearswap's ``t``); ``default`` is then None.
        search: The range ``surgery tune`` searches (None: the parameter is not tuned).
    """

    name: str
    default: Any
    type: str = "float"
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""
    required: bool = False
    search: tuple[float, float] | None = None

    def range_text(self) -> str:
        """The valid values in words: ``(0, 1]``, ``≥ 0``, ``true or false``, ``one of a, b``."""
        if self.type == "bool":
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '≤'} {self.high:g}"
        return "any finite number" if self.type in ("float", "int") else "any text"

    def check(self, value: Any, where: str) -> None:
        """Raise UsageError naming ``where``, the parameter, the value and the valid range
        unless ``value`` is a valid scalar for this parameter."""
        want = _TYPES[self.type]
        ok_type = isinstance(value, want) and not (self.type != "bool" and isinstance(value, bool))
        if not ok_type:
            kind = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text"}[self.type]
            raise UsageError(f"{where}: `{self.name}` must be {kind}, got {value!r}.")
        if self.type in ("float", "int"):
            x = float(value)
            bad = not math.isfinite(x)
            if self.low is not None:
                bad = bad or x < self.low or (self.low_open and x == self.low)
            if self.high is not None:
                bad = bad or x > self.high or (self.high_open and x == self.high)
            if bad:
                raise UsageError(f"{where}: `{self.name}` = {value!r} is out of range; it takes {self.range_text()}.")
        if self.choices and value not in self.choices:
            raise UsageError(f"{where}: `{self.name}` = {value!r} is not valid; it takes {self.range_text()}.")


def unit(name: str, default: float = 1.0, *, per_model: bool = False, low_open: bool = False, help: str = "",
         search: tuple[float, float] | None = None) -> Param:
    """A parameter in [0, 1] (``(0, 1]`` with ``low_open``): densities, interpolation factors."""
    return Param(name, default, per_model=per_model, low=0.0, high=1.0, low_open=low_open, help=help, search=search)


def flag(name: str, default: bool, help: str = "") -> Param:
    """A boolean parameter."""
    return Param(name, default, type="bool", help=help)


WEIGHT = Param("weight", 1.0, per_model=True, help="the model's weight", search=(0.0, 2.0))
# The most iterations an iterative method may be asked for per tensor (Adam steps, Karcher
# iterations): defaults are 10-400, so a larger request is a typo or a hostile recipe, not a
# merge anyone can wait for; refused before any tensor is read.
MAX_STEPS = 100_000


# ---- batch methods --------------------------------------------------------------------------

@dataclass
class TensorContext:
    """What a batch method sees for one output tensor (or, for elementwise methods, one row
    block of it). Tensor accessors return fresh float32 copies the method may overwrite.

    Attributes:
        name: The tensor's name.
        shape: The whole tensor's shape (scalars are presented as shape ``(1,)``).
        n: Number of models (the base not counted).
        layer: Layer index parsed from the name (None outside the layers).
        depth: Relative depth in [0, 1] (layer / (layers − 1)); 0 outside the layers.
        seed: The run's seed (random methods derive per-tensor draws from it and ``name``).
        params: Global parameters resolved for this tensor.
        model_params: Per-model parameters resolved for this tensor, one dict per model.
        rows: The row block ``(start, stop)`` an elementwise method is asked for, else None.
        device: Where the math runs.
        options: Execution options of the run (``trim_ties``, ``decomposition``...).
    """

    name: str
    shape: tuple[int, ...]
    n: int
    layer: int | None
    depth: float
    seed: int
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    rows: tuple[int, int] | None
    device: str
    options: dict[str, Any] = field(default_factory=dict)
    _base_rows: Callable[[int, int], "torch.Tensor"] | None = field(default=None, repr=False)
    _model_rows: Callable[[int, int, int], "torch.Tensor"] | None = field(default=None, repr=False)
    _base_cache: Any = field(default=None, repr=False)

    @property
    def has_base(self) -> bool:
        return self._base_rows is not None

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        """Entries of the whole tensor."""
        return math.prod(self.shape)

    @property
    def flat_offset(self) -> int:
        """Flat index of the first entry this context covers."""
        return (self.rows[0] if self.rows else 0) * self.row_elems

    def _span(self) -> tuple[int, int]:
        return self.rows if self.rows is not None else (0, self.shape[0])

    def base(self) -> "torch.Tensor | None":
        """θ0 for this block (or the whole tensor); None when the method runs without a base.
        Read once per context; the same tensor is returned on every call (do not modify it)."""
        if self._base_rows is None:
            return None
        if self._base_cache is None:
            self._base_cache = self._base_rows(*self._span())
        return self._base_cache

    def model(self, i: int) -> "torch.Tensor":
        """θ_i for this block (or the whole tensor), a fresh copy."""
        return self._model_rows(i, *self._span())

    def tau(self, i: int) -> "torch.Tensor":
        """τ_i = θ_i − θ0 for this block, a fresh copy."""
        return self.model(i).sub_(self.base())

    def base_rows(self, start: int, stop: int) -> "torch.Tensor":
        """Rows of θ0 (for methods that stream a whole tensor themselves)."""
        return self._base_rows(start, stop)

    def model_rows(self, i: int, start: int, stop: int) -> "torch.Tensor":
        """Rows of θ_i, a fresh copy (for methods that stream a whole tensor themselves)."""
        return self._model_rows(i, start, stop)

    def weights(self, key: str = "weight") -> list[float]:
        """A per-model parameter as a list of floats (one per model)."""
        return [float(p[key]) for p in self.model_params]


@dataclass(frozen=True)
class Batch:
    """A batch merge method.

    Attributes:
        name: ``-m`` / ``merge_method`` name.
        paper: Link to the paper (or the reference implementation).
        summary: One line for ``surgery merge --help``.
        params: Declared parameters.
        merge: The per-tensor function (see :class:`TensorContext`): returns the merged float32
            tensor for the context, or a ``rows(start, stop)`` function producing it in row blocks.
        elementwise: ``merge`` is called per row block (an entry depends only on the same entry
            of the inputs and on per-tensor parameters).
        base: ``required``, ``optional`` or ``ignored`` (mergekit's base policy; ``ignored``
            also means a listed base is merged as one more model, as mergekit does for linear).
        min_models, max_models: How many models besides the base.
        check: ``check(ctx)`` for every tensor before any is read (``ctx`` has the resolved
            parameters, no data): raise UsageError for combinations of values no range can
            express (DELLA's density ± epsilon inside (0, 1)).
        copies: ``copies(params, model_params) -> i | None``: for a tensor whose output is, with
            these resolved parameters, model ``i``'s stored tensor unchanged (passthrough at
            scale 1), the index ``i``; the engine then copies the stored bytes (or casts them to
            the output dtype in row blocks) instead of decoding and computing. The bytes are the
            same: a float32 round trip of a stored float is exact.
        threaded: Each tensor's merge is heavy whole-tensor work on one intra-op thread
            (decompositions): ``surgery merge`` computes whole tensors ahead on one worker
            thread per core (:mod:`surgery.merge.ahead`); the bytes do not depend on the count.
    """

    name: str
    paper: str
    summary: str
    params: tuple[Param, ...]
    merge: Callable[[TensorContext], Any]
    elementwise: bool = False
    base: str = "required"
    min_models: int = 1
    max_models: int | None = None
    check: Callable[[TensorContext], None] | None = None
    copies: Callable[[dict[str, Any], list[dict[str, Any]]], int | None] | None = None
    threaded: bool = False
    kind: str = field(default="batch", init=False)


# ---- continual methods ----------------------------------------------------------------------

@dataclass
class StepContext:
    """What a continual method's ``step`` sees for one tensor (or row block) at step t.

    Attributes:
        name: The tensor's name.
        shape: The whole tensor's shape.
        t: The step, 1-based (the t-th model of the whole continual merge, resumed runs included).
        prev: S_{t−1} for this tensor or block (None before the first model).
        tau: τ_t = θ_t − θ0 (fresh float32; the method may overwrite it).
        params: Global parameters resolved for this tensor.
        scalars: The method's scalars after step t−1 (e.g. OPCM's ``lambda``).
        whole: True when the whole tensor is given (the method asked for it), False for a row block.
        info: Per-tensor facts the step reports (``info["split_rank"] = r``): averaged over
            tensors into the step's record.
    """

    name: str
    shape: tuple[int, ...]
    t: int
    prev: "torch.Tensor | None"
    tau: "torch.Tensor"
    params: dict[str, Any]
    scalars: dict[str, float]
    whole: bool
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Continual:
    """A continual (sequential) merge method with a resumable state.

    Attributes:
        name, paper, summary, params: As for :class:`Batch`.
        step: ``step(ctx: StepContext) -> S_t`` for one tensor or row block.
        output: ``output(state, base, params, scalars) -> merged tensor`` (θ0 + f(S_T)).
        whole: ``whole(name, shape, params) -> bool``: the step needs the whole tensor (OPCM's
            projected matrices); otherwise it is called on row blocks.
        uses_totals: ``end_step`` needs whole-model totals, so every model takes its own pass.
        end_step: ``end_step(scalars, totals, t) -> scalars`` with ``totals`` the sums over
            every tensor of ``tau_sq`` (‖τ_t‖²) and ``state_sq`` (‖S_t‖²), and ``sum_norms``
            (Σ_i≤t ‖τ_i‖); None keeps the scalars.
        initial: The scalars before the first step.
        threaded: Whole-tensor steps are heavy (decompositions): run them on worker threads.
    """

    name: str
    paper: str
    summary: str
    params: tuple[Param, ...]
    step: Callable[[StepContext], "torch.Tensor"]
    output: Callable[["torch.Tensor", "torch.Tensor", dict[str, Any], dict[str, float]], "torch.Tensor"]
    whole: Callable[[str, tuple[int, ...], dict[str, Any]], bool] = lambda name, shape, params: False
    uses_totals: bool = False
    end_step: Callable[[dict[str, float], dict[str, float], int], dict[str, float]] | None = None
    initial: dict[str, float] = field(default_factory=dict)
    threaded: bool = False
    base: str = field(default="required", init=False)
    min_models: int = field(default=1, init=False)
    max_models: int | None = field(default=None, init=False)
    kind: str = field(default="continual", init=False)


Method = Batch | Continual


def param_table(method: Method) -> dict[str, Param]:
    """The method's parameters by name."""
    return {p.name: p for p in method.params}


def check_declaration(method: Method) -> None:
    """Defects in a declaration (duplicate parameter names, defaults out of their own range)."""
    names = [p.name for p in method.params]
    if len(set(names)) != len(names):
        raise ValueError(f"merge method {method.name!r} declares a parameter twice: {names}")
    for p in method.params:
        if not p.required:
            p.check(p.default, f"merge method {method.name!r} default")
        if p.search is not None:
            lo, hi = p.search
            p.check(lo, f"merge method {method.name!r} search range")
            p.check(hi, f"merge method {method.name!r} search range")
            if not lo < hi or p.type != "float":
                raise ValueError(f"merge method {method.name!r}: `{p.name}` search range {p.search} is not a float "
                                 f"interval")


# ---- deterministic reductions ----------------------------------------------------------------

def dot64(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Σ a·b in float64 with a summation order that does not depend on the thread count
    (numpy's single-threaded pairwise sum), so whole-tensor scalars — norms, cosines, λ_t —
    and therefore the output bytes are the same on any machine setting."""
    import numpy as np
    import torch

    x = a.detach().reshape(-1).to("cpu", dtype=torch.float64).numpy()
    y = x if b is a else b.detach().reshape(-1).to("cpu", dtype=torch.float64).numpy()
    return float(np.add.reduce(x * y)) if x.size else 0.0


def sum_sq(a: "torch.Tensor") -> float:
    """‖a‖² (see :func:`dot64`)."""
    return dot64(a, a)
