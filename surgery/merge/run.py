"""``surgery merge``'s entry point: validate the inputs from their headers, then stream the
merge through the engine one tensor at a time.

Batch methods read one tensor from every model per output tensor. Continual methods fold
the models in order into a running state; OPCM needs one whole-model scalar per step
(λ_t), so each of its steps is one streaming pass that writes S_t to a float32 scratch file
next to the output (memory stays at a few tensors, whatever the number of models), and a
final pass writes θ0 + S_T / λ_T. ``state_dir`` saves the state; ``resume_dir`` continues one.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.reader import Checkpoint, open_checkpoint, open_local
from ..checkpoint.roles import TensorRole, depth_of, role_of
from ..checkpoint.writer import ShardedWriter, TensorSpec
from ..core.engine import (OutputTensor, WriteResult, copy_tensor, dtype_name, parse_dtype, row_ranges, rows_in_blocks,
                      write_checkpoint)
from ..core.errors import IncompatibleCheckpointsError, InputError, UsageError
from ..core.progress import Progress, ensure
from ..core.result import Result
from . import opcm as opcm_math
from . import ties as ties_math
from .recipe import MergeRequest, evaluate
from .registry import METHODS, MethodSpec, get_method
from .state import ContinualState, load_state, state_writer

@dataclass
class MergeOptions:
    """Options that are not merge parameters.

    Attributes:
        seed: DARE's drop seed and ``shuffle``'s seed.
        allow_missing: Copy tensors that some models lack from the base instead of refusing.
        decomposition: OPCM's SVD: ``gram`` (eigh of the smaller Gram matrix, float64) or ``svd``.
        trim_ties: TIES: which entries tied at the trim threshold survive: ``index`` (lowest flat
            index first; O(n), streamed) or ``argsort`` (mergekit 0.1.5's torch.argsort order).
        shuffle: Shuffle the models (continual methods) with ``seed`` before merging.
        device: Where the math runs.
        state_dir: Save the continual state here.
        resume_dir: Continue the continual merge saved here.
    """

    seed: int = 0
    allow_missing: bool = False
    decomposition: str = "gram"
    trim_ties: str = "index"
    shuffle: bool = False
    device: str = "cpu"
    state_dir: Path | None = None
    resume_dir: Path | None = None


def _result(written: WriteResult, method: str, order: list[str], steps: list[dict[str, Any]] | None = None,
            lam: float | None = None, state_dir: Path | None = None) -> Result:
    return Result({"method": method, "order": order, "lambda": lam, "steps": steps or [],
                   "state": str(state_dir) if state_dir else None}, written)


# ---- parameters -----------------------------------------------------------------------------

def _num_layers(ref: Checkpoint) -> int:
    cfg = ref.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    depths = [d for d in (depth_of(n) for n in ref.names) if d is not None]
    return max(depths) + 1 if depths else 1


def _scalars(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return _scalars(value.get("value"))
    if isinstance(value, list):
        return [x for v in value for x in _scalars(v)]
    return [value]


def _check_type(key: str, value: Any, default: Any, where: str) -> None:
    """A boolean parameter takes true/false, a numeric one numbers (in every list/filter entry)."""
    for x in _scalars(value):
        ok = isinstance(x, bool) if isinstance(default, bool) else (isinstance(x, (int, float)) and not isinstance(x, bool))
        if not ok:
            kind = "true or false" if isinstance(default, bool) else "a number"
            raise UsageError(f"{where}: {key} must be {kind}, got {x!r}.")


class Params:
    """Resolves the shared and per-model parameter values of every tensor (mergekit's precedence:
    a model's own setting, then the top-level one, then the method's default)."""

    def __init__(self, spec: MethodSpec, request: MergeRequest, num_layers: int):
        self.spec, self.request, self.num_layers = spec, request, num_layers
        known = set(spec.shared) | set(spec.per_model)
        unknown = sorted(set(request.parameters) - known)
        for i, m in enumerate(request.models):
            unknown += [f"{k} (model {m.location})" for k in sorted(set(m.parameters) - set(spec.per_model))]
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise UsageError(f"merge method {spec.name!r} does not take parameter(s) {', '.join(unknown)}; "
                             f"it takes: {valid} (per-model: {', '.join(spec.per_model) or 'none'}).")
        defaults = {**spec.shared, **spec.per_model}
        for where, settings in [("parameters", request.parameters)] + [
                (f"parameters of model {m.location}", m.parameters) for m in request.models]:
            for key, value in settings.items():
                _check_type(key, value, defaults[key], where)

    def layer_t(self, name: str) -> float:
        d = depth_of(name)
        if d is None:
            return 0.0
        return d / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def _value(self, key: str, settings: list[dict], default: Any, name: str, t: float) -> Any:
        for s in settings:
            if key in s:
                v = evaluate(s[key], name, t)
                if v is not None:
                    return v
        return default

    def shared(self, name: str) -> dict[str, Any]:
        t = self.layer_t(name)
        return {k: self._value(k, [self.request.parameters], d, name, t) for k, d in self.spec.shared.items()}

    def per_model(self, name: str) -> list[dict[str, Any]]:
        t = self.layer_t(name)
        return [{k: self._value(k, [m.parameters, self.request.parameters], d, name, t)
                 for k, d in self.spec.per_model.items()} for m in self.request.models]


# ---- validation -----------------------------------------------------------------------------

def _check_compatible(ref: Checkpoint, models: list[Checkpoint], allow_missing: bool, ref_is_base: bool) -> set[str]:
    """Report every disagreement between ``ref`` and the models from the headers; returns the
    tensors to copy from the base (missing from some model, with ``allow_missing``)."""
    problems: list[str] = []
    copy_from_base: set[str] = set()
    for m in models:
        missing = [n for n in ref.names if n not in m]
        extra = [n for n in m.names if n not in ref]
        if missing:
            if allow_missing and ref_is_base:
                copy_from_base.update(missing)
            else:
                problems.append(f"{m.label} lacks {len(missing)} tensor(s) of {ref.label}, e.g. {missing[0]!r}"
                                + (" (pass --allow-missing to copy them from the base)" if ref_is_base else ""))
        if extra:
            problems.append(f"{m.label} has {len(extra)} tensor(s) that {ref.label} lacks, e.g. {extra[0]!r}")
        for n in ref.names:
            if n not in m:
                continue
            a, b = ref.info(n), m.info(n)
            if a.shape != b.shape:
                what = "vocabulary sizes differ" if role_of(a).role == TensorRole.EMBEDDING and a.shape[1:] == b.shape[1:] \
                    else "shapes differ"
                problems.append(f"tensor {n!r}: {what}, {tuple(a.shape)} in {ref.label} vs {tuple(b.shape)} in {m.label}")
            elif a.dtype != b.dtype:
                problems.append(f"tensor {n!r}: dtypes differ, {dtype_name(a.dtype)} in {ref.label} vs "
                                f"{dtype_name(b.dtype)} in {m.label} (convert one with `surgery convert --dtype`)")
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise IncompatibleCheckpointsError(f"cannot merge: {first}{more}.", path=ref.label)
    return copy_from_base


def _mergeable(ref: Checkpoint, name: str) -> bool:
    return ref.info(name).dtype.is_floating_point


def _out_dtype(target: torch.dtype | None, ref: Checkpoint, name: str) -> torch.dtype:
    return target if target is not None else ref.info(name).dtype


# ---- batch ----------------------------------------------------------------------------------

SUB_BLOCK_ELEMENTS = 1 << 20   # elementwise batch merges work on about this many entries per model at a time


def _merge_batch(spec: MethodSpec, request: MergeRequest, base: Checkpoint | None, models: list[Checkpoint],
                 options: MergeOptions, target: torch.dtype | None) -> tuple[list[OutputTensor], Checkpoint]:
    ref = base if base is not None else models[0]
    copy_from_base = _check_compatible(ref, models, options.allow_missing, base is not None)
    params = Params(spec, request, _num_layers(ref))
    dev = options.device
    merge_fn, rows_fn = spec.merge, spec.rows
    if spec.name == "ties" and options.trim_ties == "argsort":
        from .registry import ties_argsort
        merge_fn, rows_fn = ties_argsort, None
    plan = []
    for name in ref.names:
        if not _mergeable(ref, name) or name in copy_from_base:
            plan.append(copy_tensor(ref, name) if target is None or not _mergeable(ref, name)
                        else OutputTensor(name, ref.info(name).shape, target, compute=lambda n=name: ref.get(n)))
            continue

        shape = ref.info(name).shape
        if spec.elementwise and shape:
            def rows(a: int, e: int, n: str = name, shape: tuple = shape) -> torch.Tensor:
                f32 = torch.float32
                shared, per_model = params.shared(n), params.per_model(n)

                def part(s: int, t: int) -> torch.Tensor:
                    b = base.get_rows(n, s, t, dtype=f32, device=dev) if base is not None else None
                    load = lambda i: models[i].get_rows(n, s, t, dtype=f32, device=dev)  # noqa: E731
                    return merge_fn(b, load, len(models), shared, per_model, n, options.seed)

                # a few MB per model at a time, not the engine's whole block
                return rows_in_blocks(shape, a, e, SUB_BLOCK_ELEMENTS, part)

            plan.append(OutputTensor(name, shape, _out_dtype(target, ref, name), rows=rows))
            continue
        if rows_fn is not None and shape and base is not None:
            f32 = torch.float32
            rows = rows_fn(shape, lambda a, e, n=name: base.get_rows(n, a, e, dtype=f32, device=dev),
                             lambda i, a, e, n=name: models[i].get_rows(n, a, e, dtype=f32, device=dev),
                             len(models), params.shared(name), params.per_model(name), name, options.seed)
            plan.append(OutputTensor(name, shape, _out_dtype(target, ref, name), rows=rows))
            continue

        def compute(n: str = name) -> torch.Tensor:
            b = base.get(n, device=dev) if base is not None else None
            load = lambda i: models[i].get(n, device=dev)  # noqa: E731
            return merge_fn(b, load, len(models), params.shared(n), params.per_model(n), n, options.seed)

        plan.append(OutputTensor(name, shape, _out_dtype(target, ref, name), compute=compute))
    return plan, ref


# ---- continual ------------------------------------------------------------------------------

def _projected(ref: Checkpoint, name: str, project_embeddings: bool) -> bool:
    info = ref.info(name)
    if info.ndim != 2 or min(info.shape) == 0:
        return False
    role = role_of(info)
    if role.role == TensorRole.MATRIX or (role.role == TensorRole.EMBEDDING and role.sublayer == "lm_head"):
        return True
    return role.role == TensorRole.EMBEDDING and project_embeddings


def _sq(x: torch.Tensor) -> float:
    # float32 norm (torch reduces in cascaded blocks): no float64 copy of an embedding-sized tensor
    return float(torch.linalg.vector_norm(x)) ** 2


BLOCK_ELEMENTS = 4 * 1024 * 1024   # elementwise work runs in row blocks of at most this many elements


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """Row ranges covering dim 0 in blocks of <= BLOCK_ELEMENTS (None for scalars)."""
    if not shape:
        return None
    return row_ranges(0, shape[0], math.prod(shape[1:]), BLOCK_ELEMENTS) or [(0, 0)]


class _ProjectionPool:
    """Runs OPCM's per-matrix projections on worker threads, one intra-op thread each.

    One matrix per core at a time instead of every core on each small LAPACK call: on a quiet
    machine a little faster, and on a busy one it avoids the spinning at LAPACK's many small
    barrier-separated steps (a 576×576 eigh measured 1.2–7 s on two threads against 0.1 s on
    one). Meanwhile the calling thread reads the next tensors and writes finished ones.
    Results are consumed in submission order, so a run is deterministic.

    Only small projections go to the workers (working set up to :data:`SMALL_BYTES`), and at
    most :data:`BUDGET_BYTES` of them are in flight, so memory stays bounded on many-core
    machines. A larger matrix (a 7B model's MLP) runs on the calling thread with all of
    torch's threads, after the pending ones finish. Off the CPU (CUDA): everything on the
    calling thread, torch's thread setting unchanged.
    """

    SMALL_BYTES = 64 << 20
    BUDGET_BYTES = 512 << 20

    def __init__(self, device: str):
        self.cpu = str(device) == "cpu"
        self.workers = max(1, torch.get_num_threads()) if self.cpu else 1
        self.window = 2 * self.workers

    @staticmethod
    def footprint(numel: int) -> int:
        """Rough working set of one projection (inputs, float64 copy, factors, result)."""
        return numel * 4 * 6

    def small(self, numel: int) -> bool:
        return self.cpu and self.footprint(numel) <= self.SMALL_BYTES

    def __enter__(self) -> "_ProjectionPool":
        self._previous = torch.get_num_threads()
        if self.cpu:
            torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="surgery-opcm")
        return self

    def submit(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs)

    @contextmanager
    def all_threads(self):
        """Torch's original thread count for the block (call with no work pending)."""
        torch.set_num_threads(self._previous)
        try:
            yield
        finally:
            if self.cpu:
                torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._previous)


class _Source:
    """Where S_{t−1} comes from: nothing (before the first model), a state or scratch file,
    or θ_1 − θ0 read lazily (the first model, whose S_1 = τ_1 is never materialized)."""

    def __init__(self, ckpt: Checkpoint | None = None, model: Checkpoint | None = None,
                 base: Checkpoint | None = None, device: str = "cpu"):
        self.ckpt, self.model, self.base, self.dev = ckpt, model, base, device

    def full(self, n: str) -> torch.Tensor | None:
        if self.ckpt is not None:
            return self.ckpt.get(n, device=self.dev)
        if self.model is not None:
            return self.model.get(n, device=self.dev) - self.base.get(n, device=self.dev)
        return None

    def rows(self, n: str, a: int, b: int) -> torch.Tensor | None:
        f32 = torch.float32
        if self.ckpt is not None:
            return self.ckpt.get_rows(n, a, b, dtype=f32, device=self.dev)
        if self.model is not None:
            return (self.model.get_rows(n, a, b, dtype=f32, device=self.dev)
                    - self.base.get_rows(n, a, b, dtype=f32, device=self.dev))
        return None


class _Continual:
    """Runs one continual merge (OPCM or a fold baseline) with an optional resumed state."""

    def __init__(self, spec, request, base, models, options, target, state, state_tensors, progress):
        self.spec, self.request, self.base, self.models = spec, request, base, models
        self.options, self.target, self.progress = options, target, ensure(progress)
        self.dev = options.device
        copy_from_base = _check_compatible(base, models, options.allow_missing, True)
        if copy_from_base:
            raise UsageError(f"--allow-missing is not supported by the continual method {spec.name!r}: "
                             f"{sorted(copy_from_base)[0]!r} is missing from a model.")
        self.params = Params(spec, request, _num_layers(base))
        self.names = [n for n in base.names if _mergeable(base, n)]
        self.shared = {n: self.params.shared(n) for n in self.names}
        self.state = state
        self.state_tensors = state_tensors
        if state_tensors is not None:
            problems = [n for n in self.names if n not in state_tensors or state_tensors.info(n).shape != base.info(n).shape]
            if problems or len(state_tensors.names) != len(self.names):
                raise IncompatibleCheckpointsError(
                    f"the continual state does not match the base's tensors (e.g. {(problems or state_tensors.names)[0]!r}); "
                    f"it was made for another architecture.", path=str(options.resume_dir))

    def _project(self, name: str) -> bool:
        return _projected(self.base, name, bool(self.shared[name].get("project_embeddings", False)))

    # OPCM: one pass per step, S_t to scratch files.
    def _opcm_pass(self, prev: _Source, model: Checkpoint, scratch: Path,
                   lazy_first: bool) -> tuple[float, float, float, Checkpoint, dict[str, int]]:
        specs = [TensorSpec(n, self.base.info(n).shape, torch.float32) for n in self.names]
        # S_t overwrites S_{t-1} in place: each tensor is read whole (or row block by row block)
        # before its new value is written to the same bytes, and no page has to be allocated.
        writer = ShardedWriter(scratch, specs, 1 << 62, {"format": "pt"}, reuse=True)
        norms: dict[str, list[float]] = {}    # per tensor: ‖τ‖², ‖S_t‖², ‖S_1‖² (summed in name order below)
        ranks: dict[str, int] = {}
        f32, dev = torch.float32, self.dev
        pending: deque = deque()
        inflight = [0]

        def record(n: str, tau, s_prev, s_new, r) -> None:
            if r is not None:
                ranks[n] = r
            norms[n] = self._norms(tau, s_prev, s_new, lazy_first)
            writer.write(n, s_new.to("cpu", f32).contiguous())
            self.progress.advance()

        def finish() -> None:
            n, future, tau, s_prev = pending.popleft()
            inflight[0] -= pool.footprint(tau.numel())
            record(n, tau, s_prev, *future.result())

        self.progress.start(len(self.names), f"opcm step {self.count + 1}: {model.label}")
        try:
            with _ProjectionPool(dev) as pool:
                for n in self.names:
                    blocks = _blocks(self.base.info(n).shape)
                    if self._project(n) or blocks is None:
                        b = self.base.get(n, device=dev)
                        tau = model.get(n, device=dev) - b
                        del b
                        s_prev = prev.full(n)
                        sh = self.shared[n]
                        kwargs = dict(alpha=float(sh["alpha"]), project=self._project(n),
                                      keep_diagonal=bool(sh["keep_diagonal"]), decomposition=self.options.decomposition)
                        cost = pool.footprint(tau.numel())
                        if pool.small(tau.numel()):
                            while pending and (len(pending) >= pool.window or inflight[0] + cost > pool.BUDGET_BYTES):
                                finish()
                            pending.append((n, pool.submit(opcm_math.opcm_tensor, s_prev, tau, 1.0, **kwargs), tau, s_prev))
                            inflight[0] += cost
                        else:
                            while pending:
                                finish()
                            with pool.all_threads():
                                record(n, tau, s_prev, *opcm_math.opcm_tensor(s_prev, tau, 1.0, **kwargs))
                        del tau, s_prev
                    else:
                        total = [0.0, 0.0, 0.0]
                        for a, e in blocks:   # elementwise: S_t = S_{t-1} + τ, a row block at a time
                            tau = model.get_rows(n, a, e, dtype=f32, device=dev) - self.base.get_rows(n, a, e, dtype=f32, device=dev)
                            s_prev = prev.rows(n, a, e)
                            s_new = tau if s_prev is None else s_prev + tau
                            total = [x + y for x, y in zip(total, self._norms(tau, s_prev, s_new, lazy_first))]
                            writer.write_rows(n, a, s_new.to("cpu", f32).contiguous())
                            del tau, s_prev, s_new
                        norms[n] = total
                        self.progress.advance()
                while pending:
                    finish()
            acc = {k: sum(norms[n][i] for n in self.names) for i, k in enumerate(("tau", "s", "first"))}
            # Scratch: the header written up front is already complete; no fsync needed.
            if writer.missing():
                raise RuntimeError(f"opcm scratch misses {writer.missing()[:3]}")
        finally:
            writer.close()
            self.progress.close()
        return (math.sqrt(acc["tau"]), math.sqrt(acc["s"]), math.sqrt(acc["first"]),
                open_local(scratch / "model.safetensors"), ranks)

    @staticmethod
    def _norms(tau, s_prev, s_new, lazy_first) -> list[float]:
        return [_sq(tau), _sq(s_new), _sq(s_prev) if lazy_first and s_prev is not None else 0.0]

    def run(self, output, *, shard_size, force, sink_factory) -> Result:
        st = self.state
        self.count = st.count if st else 0
        self.sum_norms = st.sum_norms if st else 0.0
        self.lam = st.lam if st else 1.0
        order = list(st.order) if st else []
        steps = list(st.steps) if st else []
        prev = _Source(self.state_tensors, device=self.dev)
        is_opcm = self.spec.name == "opcm"
        lazy_first = False
        parent = Path(output).expanduser().resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        scratch_root = Path(tempfile.mkdtemp(prefix=".surgery-merge-", dir=parent))
        try:
            fold_models = []
            for k, model in enumerate(self.models):
                entry = {"label": model.label, "sha256": model.sha256(), "tau_norm": None}
                if not is_opcm:
                    fold_models.append(model)
                    order.append(entry)
                    continue
                if self.count == 0:
                    prev = _Source(model=model, base=self.base, device=self.dev)
                    lazy_first = True
                    self.count, self.lam = 1, 1.0
                    order.append(entry)
                    steps.append({"step": 1, "model": model.label, "tau_norm": None, "merged_norm": None, "lambda": 1.0})
                    continue
                scratch = scratch_root / "s"
                scratch.mkdir(exist_ok=True)
                tau_norm, s_norm, first_norm, ckpt, ranks = self._opcm_pass(prev, model, scratch, lazy_first)
                if lazy_first:
                    self._fill_first(order, steps, first_norm)
                    lazy_first = False
                self.count += 1
                self.sum_norms += tau_norm
                mean = self.sum_norms / self.count
                self.lam = s_norm / mean if mean > 0 and s_norm > 0 else 1.0
                entry["tau_norm"] = tau_norm
                order.append(entry)
                steps.append({"step": self.count, "model": model.label, "tau_norm": tau_norm, "merged_norm": s_norm,
                              "mean_tau_norm": mean, "lambda": self.lam,
                              "mean_split_rank": (sum(ranks.values()) / len(ranks)) if ranks else None})
                prev = _Source(ckpt, device=self.dev)
            return self._write(output, prev, fold_models, order, steps, lazy_first, shard_size, force, sink_factory)
        finally:
            shutil.rmtree(scratch_root, ignore_errors=True)

    def _fill_first(self, order, steps, norm: float) -> None:
        for e in order:
            if e["tau_norm"] is None:
                e["tau_norm"] = norm
        for s in steps:
            if s["tau_norm"] is None:
                s["tau_norm"] = s["merged_norm"] = s["mean_tau_norm"] = norm
        self.sum_norms += norm

    def _write(self, output, prev, fold_models, order, steps, lazy_first, shard_size, force, sink_factory) -> Result:
        base, dev, spec = self.base, self.dev, self.spec
        count0 = self.count
        acc = {"first": 0.0, "tau": [0.0] * len(fold_models)}
        specs = [TensorSpec(n, base.info(n).shape, torch.float32) for n in self.names]
        names = set(self.names)
        is_opcm = spec.name == "opcm"

        def run_write(sink):
            plan = []
            for name in base.names:
                if name not in names:
                    plan.append(copy_tensor(base, name))
                    continue
                shape = base.info(name).shape
                whole = (is_opcm and self._project(name)) or not shape

                def block(n: str, b: torch.Tensor, s: torch.Tensor | None, rows_of) -> torch.Tensor:
                    if is_opcm:
                        if lazy_first:
                            acc["first"] += _sq(s)
                        out = b + s / self.lam
                    else:
                        for i, m in enumerate(fold_models):
                            tau = rows_of(m) - b
                            acc["tau"][i] += _sq(tau)
                            s = spec.step(s, tau, count0 + i + 1, self.shared[n])
                        out = b + spec.output_scale(self.shared[n]) * s
                    return out, s

                if whole:
                    def compute(n: str = name) -> torch.Tensor:
                        out, s = block(n, base.get(n, device=dev), prev.full(n), lambda m: m.get(n, device=dev))
                        if sink is not None:
                            sink.write(n, s)
                        return out

                    plan.append(OutputTensor(name, shape, _out_dtype(self.target, base, name), compute=compute))
                else:
                    def rows(a: int, e: int, n: str = name) -> torch.Tensor:
                        f32 = torch.float32
                        out, s = block(n, base.get_rows(n, a, e, dtype=f32, device=dev), prev.rows(n, a, e),
                                       lambda m: m.get_rows(n, a, e, dtype=f32, device=dev))
                        if sink is not None:
                            sink.write_rows(n, a, s)
                        return out

                    plan.append(OutputTensor(name, shape, _out_dtype(self.target, base, name), rows=rows))

            def extra() -> dict[str, Any]:
                if is_opcm and lazy_first:
                    self._fill_first(order, steps, math.sqrt(acc["first"]))
                if not is_opcm:
                    for i, m in enumerate(fold_models):
                        norm = math.sqrt(acc["tau"][i])
                        order[count0 + i]["tau_norm"] = norm
                        self.sum_norms += norm
                        steps.append({"step": count0 + i + 1, "model": m.label, "tau_norm": norm})
                    self.count = count0 + len(fold_models)
                return {"order": [dict(e) for e in order], "steps": steps,
                        "lambda": self.lam if is_opcm else None, "count": self.count,
                        "mean_tau_norm": self.sum_norms / self.count if self.count else None}

            inputs = [base] + self.models
            result = write_checkpoint(plan, output, donor=base, operation="merge", parameters=self.record_params,
                                      inputs=inputs, input_roles=["base"] + ["model"] * len(self.models),
                                      shard_size=shard_size, force=force, progress=self.progress, extra_record=extra)
            return result

        st_params = {k: self.shared[self.names[0]][k] for k in spec.shared} if self.names else {}
        if self.options.state_dir is not None:
            with sink_factory(specs) as sink:
                result = run_write(sink)
                sink.finish(ContinualState(spec.name, st_params, self.base_identity, order, self.count,
                                           self.sum_norms, self.lam, steps))
        else:
            result = run_write(None)
        return _result(result, spec.name, [e["label"] for e in order], steps, self.lam if is_opcm else None,
                       self.options.state_dir)


# ---- entry point ----------------------------------------------------------------------------

def _open_all(request: MergeRequest) -> tuple[Checkpoint | None, list[Checkpoint]]:
    base = open_checkpoint(request.base) if request.base else None
    models = [open_checkpoint(m.location) for m in request.models]
    return base, models


def _base_identity(base: Checkpoint) -> dict[str, str]:
    p = Path(base.label)
    return {"label": base.label, "path": str(p.resolve()) if p.exists() else base.label, "sha256": base.sha256()}


def _resume(request: MergeRequest, options: MergeOptions) -> tuple[ContinualState, Checkpoint, Checkpoint, MergeRequest]:
    state, tensors = load_state(options.resume_dir)
    if request.method and request.method != state.method:
        raise UsageError(f"the state in {options.resume_dir} continues an {state.method!r} merge; drop -m "
                         f"{request.method} or start a new state.", path=options.resume_dir)
    for k, v in request.parameters.items():
        if k in state.parameters and state.parameters[k] != v:
            raise UsageError(f"the state in {options.resume_dir} was made with {k}={state.parameters[k]!r}; "
                             f"a resumed merge keeps it (drop the {k} setting).", path=options.resume_dir)
    where = request.base or state.base.get("path") or state.base["label"]
    try:
        base = open_checkpoint(where)
    except InputError as exc:
        raise InputError(f"the base recorded in {options.resume_dir} ({where}) cannot be opened ({exc}); pass --base "
                         f"with its current location.", path=where) from exc
    if base.sha256() != state.base["sha256"]:
        raise IncompatibleCheckpointsError(
            f"base {base.label} (sha256 {base.sha256()[:12]}…) is not the base of the state in {options.resume_dir} "
            f"({state.base['label']}, sha256 {state.base['sha256'][:12]}…); resume with the same base.",
            path=base.label)
    req = MergeRequest(state.method, where, request.models, {**state.parameters}, request.dtype)
    return state, tensors, base, req


def merge(request: MergeRequest, output: str | Path, *, options: MergeOptions | None = None,
          dtype: str | None = None, shard_size: str | int = "5GB", force: bool = False,
          progress: Progress | None = None) -> Result:
    """Merge the models of ``request`` into a new checkpoint at ``output``.

    Args:
        request: Method, base, models and parameter settings (from the CLI or a recipe).
        output: Output folder.
        options: Seed, device, continual state and resume folders, ...
        dtype: Output dtype (default: the recipe's, else each tensor's input dtype).
        shard_size: Maximum shard size.
        force: Replace an existing output.
        progress: Progress sink.

    Returns:
        A Result: the written checkpoint, and a report with the method, the model order and
        (continual methods) the per-step norms and OPCM's λ_t.

    Raises:
        UsageError: Unknown method or parameters, wrong number of models, bad flag combinations.
        InputError: Unreadable inputs; IncompatibleCheckpointsError when they disagree or the
            resumed state's base does not match.
    """
    options = options or MergeOptions()
    if options.decomposition not in opcm_math.DECOMPOSITIONS:
        raise UsageError(f"unknown decomposition {options.decomposition!r}; choose one of "
                         f"{', '.join(opcm_math.DECOMPOSITIONS)}.")
    if options.trim_ties not in ties_math.TIE_RULES:
        raise UsageError(f"unknown --trim-ties rule {options.trim_ties!r}; choose one of {', '.join(ties_math.TIE_RULES)}.")
    state = state_tensors = None
    if options.resume_dir is not None:
        state, state_tensors, base, request = _resume(request, options)
        models = [open_checkpoint(m.location) for m in request.models]
    spec = get_method(request.method)
    if not request.models:
        raise UsageError(f"merge method {spec.name!r} needs at least {spec.min_models} model(s) to merge.")
    if options.resume_dir is None:
        if spec.base == "required" and not request.base:
            raise UsageError(f"merge method {spec.name!r} needs a base model (--base or base_model).")
        # A model listed that is the base itself is the base, not another input (mergekit recipes list it).
        if request.base:
            keep = [m for m in request.models if m.location != request.base
                    and not (Path(m.location).exists() and Path(request.base).exists()
                             and Path(m.location).resolve() == Path(request.base).resolve())]
            if spec.base != "ignored":
                request = MergeRequest(request.method, request.base, keep, request.parameters, request.dtype)
        base, models = _open_all(request)
    n = len(request.models)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = f"exactly {spec.min_models}" if spec.max_models == spec.min_models else f"at least {spec.min_models}"
        raise UsageError(f"merge method {spec.name!r} takes {want} model(s) besides the base; got {n}.")
    if spec.kind == "batch" and (options.state_dir or options.resume_dir):
        raise UsageError(f"--state/--resume need a continual method (opcm, continual_task_arithmetic, "
                         f"continual_weight_average, magmax), not {spec.name!r}.")
    target = parse_dtype(dtype or request.dtype)
    if options.shuffle:
        order = list(range(n))
        random.Random(options.seed).shuffle(order)
        request = MergeRequest(request.method, request.base, [request.models[i] for i in order], request.parameters,
                               request.dtype)
        models = [models[i] for i in order]
    record = {"method": spec.name, "paper": spec.paper, "base": base.label if base is not None else None,
              "models": [m.location for m in request.models], "parameters": request.parameters,
              "model_parameters": [m.parameters for m in request.models], "dtype": dtype_name(target) if target else None,
              "seed": options.seed, "allow_missing": options.allow_missing}
    if spec.name == "ties":
        record["trim_ties"] = options.trim_ties
    if spec.kind == "batch":
        ref_base = base if spec.base != "ignored" else None
        plan, ref = _merge_batch(spec, request, ref_base, models, options, target)
        donor = base if base is not None else ref
        inputs = ([base] if base is not None and spec.base != "ignored" else []) + models
        roles = (["base"] if base is not None and spec.base != "ignored" else []) + ["model"] * len(models)
        result = write_checkpoint(plan, output, donor=donor, operation="merge", parameters=record, inputs=inputs,
                                  input_roles=roles, shard_size=shard_size, force=force, progress=progress)
        return _result(result, spec.name, [m.label for m in models])
    record.update({"decomposition": options.decomposition, "shuffle": options.shuffle,
                   "resume": str(options.resume_dir) if options.resume_dir else None,
                   "state": str(options.state_dir) if options.state_dir else None})
    runner = _Continual(spec, request, base, models, options, target, state, state_tensors, progress)
    runner.base_identity = state.base if state is not None else _base_identity(base)
    runner.record_params = record
    replace_ok = [Path(options.resume_dir)] if options.resume_dir else []

    def sink_factory(specs):
        return state_writer(options.state_dir, specs, replace_ok=replace_ok)

    return runner.run(output, shard_size=shard_size, force=force, sink_factory=sink_factory)
