"""Continual merges on a Ray cluster: the passes of :mod:`surgery.merge.stepwise`, each a plan
of output tensors that the executor (:mod:`surgery.core.executor`) runs as work units.

What the local runner keeps in the driver's memory or accumulates as side effects travels as
per-tensor statistics instead (:class:`~surgery.core.engine.Computed`): every pass returns,
per tensor, ‖τ_t‖² and ‖S_t‖² (and the step's ``info``), and the driver reduces them in tensor
order into the whole-model totals that ``end_step`` turns into the next scalars (OPCM's λ_t).
Values the local runner accumulates block by block across the whole model (the first model's
norms, the folded models' norms) come back as per-block lists and are summed in the same
order, so the totals, the record and the output bytes are those of the local run.

Each pass writes S_t into its own folder inside a working folder kept when the run is
interrupted (:func:`surgery.core.output.resumable_scratch`), with a journal of finished work
units; ``steps.json`` records every finished pass with its totals. Running the same command
again skips finished passes and units. The state folder (``--state``) is a copy of the last
S_T, made by the tasks.
"""

from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..checkpoint.reader import Checkpoint, open_local
from ..checkpoint.writer import ShardedWriter, TensorSpec, write_text
from ..core.engine import Computed, OutputTensor, copy_tensor, run_key, write_checkpoint
from ..core.executor import Journal, torch_threads
from ..core.output import resumable_scratch
from ..core.result import Result
from .method import Continual, StepContext, sum_sq
from .state import ContinualState
from .stepwise import BLOCK_ELEMENTS, StepRunner, _mean_info, _sum_norms

STEPS_FILE = "steps.json"


class _Prev:
    """S_{t−1} inside a task: read from a folder (a pass's output or a saved state), or — a
    fresh run's first model — S_1 = step(θ_1 − θ0) computed on the fly, whose norms are
    reported as per-block statistics (``first_tau_sq``, ``first_state_sq``)."""

    def __init__(self, ckpt: Checkpoint | None = None, first: Checkpoint | None = None):
        self.ckpt, self.first = ckpt, first

    def read(self, job: "_Job", n: str, rows: tuple[int, int] | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        f32, dev = torch.float32, job.device
        if self.ckpt is not None:
            s = self.ckpt.get(n, device=dev) if rows is None else self.ckpt.get_rows(n, *rows, dtype=f32, device=dev)
            return s, {}
        if self.first is None:
            return None, {}
        if rows is None:
            tau = self.first.get(n, device=dev) - job.base.get(n, device=dev)
        else:
            tau = self.first.get_rows(n, *rows, dtype=f32, device=dev) - job.base.get_rows(n, *rows, dtype=f32, device=dev)
        tau_sq = sum_sq(tau)
        s = job.method.step(job.ctx(n, 1, None, tau, rows is None))
        return s, {"first_tau_sq": [tau_sq], "first_state_sq": [sum_sq(s)]}


class _Job:
    """What every task of one pass needs: the method, θ0, the scalars of the pass and the
    per-tensor parameters of the tensors it covers (set per unit by :func:`_for`)."""

    def __init__(self, method: Continual, base: Checkpoint, shapes: dict[str, tuple[int, ...]],
                 params: dict[str, dict[str, Any]], scalars: dict[str, float], options: dict[str, Any], device: str):
        self.method, self.base, self.shapes, self.params = method, base, shapes, params
        self.scalars, self.options, self.device = dict(scalars), dict(options), device
        self.one_thread = 1 if (method.threaded and str(device) == "cpu") else None

    def ctx(self, n: str, t: int, prev: torch.Tensor | None, tau: torch.Tensor, whole: bool) -> StepContext:
        return StepContext(n, self.shapes[n], t, prev, tau, self.params[n], self.scalars, whole, self.options)


def _for(job: _Job, n: str) -> _Job:
    """``job`` carrying only tensor ``n``'s shape and parameters (what travels with its closure)."""
    small = object.__new__(_Job)
    small.__dict__.update(job.__dict__, shapes={n: job.shapes[n]}, params={n: job.params[n]})
    return small


def _read(job: _Job, ckpt: Checkpoint, n: str, rows: tuple[int, int] | None) -> torch.Tensor:
    if rows is None:
        return ckpt.get(n, device=job.device)
    return ckpt.get_rows(n, *rows, dtype=torch.float32, device=job.device)


def _step(job: _Job, prev: _Prev, model: Checkpoint, t: int, n: str, *rows: int) -> Computed:
    """S_t of tensor ``n`` (or rows ``[a, e)``) from S_{t−1} and τ_t, with ‖τ_t‖², ‖S_t‖² and
    (whole tensors) the step's info as statistics; as :meth:`StepRunner._pass` computes it."""
    span = tuple(rows) if rows else None
    with torch_threads(job.one_thread):
        tau = _read(job, model, n, span)
        tau = tau.sub_(_read(job, job.base, n, span)) if span is None else tau - _read(job, job.base, n, span)
        s_prev, stats = prev.read(job, n, span)
        ctx = job.ctx(n, t, s_prev, tau, span is None)
        s_new = job.method.step(ctx)
        stats.update(tau_sq=sum_sq(ctx.tau), state_sq=sum_sq(s_new))
        if span is None:
            stats.update({f"info:{k}": float(v) for k, v in ctx.info.items()})
        return Computed(s_new, stats)


def _final(job: _Job, prev: _Prev, fold: list[Checkpoint], count0: int, emit: bool, n: str, *rows: int) -> Computed:
    """S_T of tensor ``n`` (or a row block) after folding ``fold`` into S_{t−0}; with ``emit``
    the merged output θ0 + f(S_T) instead. Statistics: each folded model's ‖τ‖² and the
    first model's norms, per block; as :meth:`StepRunner._write` computes them."""
    span = tuple(rows) if rows else None
    b = _read(job, job.base, n, span)
    s, stats = prev.read(job, n, span)
    for i, m in enumerate(fold):
        tau = _read(job, m, n, span).sub_(b)
        stats[f"fold_tau_sq:{i}"] = [sum_sq(tau)]
        s = job.method.step(job.ctx(n, count0 + i + 1, s, tau, span is None))
    out = job.method.output(s, b, job.params[n], job.scalars) if emit else s
    return Computed(out, stats)


def _in_order(stats: dict[str, dict[str, Any]], names: list[str], key: str) -> float:
    """Σ of the per-block values ``key`` over ``names`` in order, accumulated one value at a time
    (the order the local runner adds them in)."""
    acc = 0.0
    for n in names:
        for v in stats.get(n, {}).get(key, ()):
            acc += v
    return acc


class RemoteStepRunner(StepRunner):
    """:class:`~surgery.merge.stepwise.StepRunner` whose passes run on an executor (Ray)."""

    def __init__(self, *args: Any, executor: Any, key_inputs: list[Any], record: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.executor = executor
        self._key = run_key("merge-steps", record, 0, [], [self.base, *self.models, *key_inputs])
        self._done: dict[str, Any] = {}
        self._root: Path | None = None
        self.passes: list[dict[str, Any]] = []      # each pass's execution (units, seconds per unit)

    # ---- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _scratch_root(self, output: str | Path) -> Iterator[Path]:
        with resumable_scratch(output, key=self._key, fresh=self.executor.resume == "never") as (root, _):
            self._root = root
            steps = root / STEPS_FILE
            self._done = json.loads(steps.read_text()) if steps.is_file() else {}
            yield root

    def _job(self) -> _Job:
        shapes = {n: tuple(self.base.info(n).shape) for n in self.names}
        return _Job(self.method, self.base, shapes, self.shared, self.scalars, self.options, self.dev)

    def _run_plan(self, folder: Path, plan: list[OutputTensor], description: str) -> dict[str, dict[str, Any]]:
        """Write a float32 plan into ``folder`` (one file) on the executor, resumably; its statistics."""
        folder.mkdir(exist_ok=True)
        specs = [TensorSpec(o.name, o.shape, o.dtype) for o in plan]
        writer = ShardedWriter(folder, specs, 1 << 62, {"format": "pt"}, reuse=True)
        journal = Journal(folder)
        self.progress.start(sum(s.nbytes for s in specs), description)
        try:
            # the local pass runs every step on one thread (merge/stepwise._Pool): so can the tasks
            one = 1 if (self.method.threaded and str(self.dev) == "cpu") else None
            stats, execution = self.executor.write(writer, sorted(plan, key=lambda o: o.name), self.progress,
                                                   journal, threads=one)
            writer.finish({"format": "pt"})
            self.passes.append({"pass": description, **execution.to_json()})
        finally:
            writer.close()
            journal.close()
            self.progress.close()
        return stats

    def _prev(self, prev: Any) -> _Prev:
        return _Prev(ckpt=prev.ckpt, first=prev.first)

    def _plan(self, fn: Callable[..., Computed], job: _Job, dtype_of: Callable[[str], torch.dtype],
              whole: Callable[[str], bool], block_rows: Callable[[str], int | None], *args: Any) -> list[OutputTensor]:
        plan = []
        for n in self.names:
            shape = tuple(self.base.info(n).shape)
            fn_n = functools.partial(fn, _for(job, n), *args, n)
            nbytes = self.base.info(n).nbytes * (2 + len(self.models))
            if whole(n):
                plan.append(OutputTensor(n, shape, dtype_of(n), compute=fn_n, input_bytes=nbytes))
            else:
                plan.append(OutputTensor(n, shape, dtype_of(n), rows=fn_n, input_bytes=nbytes,
                                         block_rows=block_rows(n)))
        return plan

    # ---- one pass per model ----------------------------------------------------------------

    def _pass(self, prev: Any, model: Checkpoint, t: int, scratch: Path) -> tuple[dict[str, float], Checkpoint | None,
                                                                                  dict[str, float]]:
        folder = scratch.parent / f"step-{t}"
        done = self._done.get(str(t))
        if done is None:
            job = self._job()

            def rows_per_block(n: str) -> int:       # the local pass's row blocks (the same sums)
                shape = self.base.info(n).shape
                return max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))

            plan = self._plan(_step, job, lambda n: torch.float32, lambda n: not self.base.info(n).shape or self._whole(n),
                              rows_per_block, self._prev(prev), model, t)
            stats = self._run_plan(folder, plan, f"{self.method.name} step {t}: {model.label}")
            infos: dict[str, dict[str, float]] = {}
            for n in self.names:
                info = {k[5:]: v for k, v in stats.get(n, {}).items() if k.startswith("info:")}
                if info:
                    infos[n] = info
            done = {"totals": {"tau_sq": sum(stats[n]["tau_sq"] for n in self.names),
                               "state_sq": sum(stats[n]["state_sq"] for n in self.names)},
                    "info": _mean_info(infos),
                    "first": {k: _in_order(stats, self.names, f"first_{k}") for k in ("tau_sq", "state_sq")}}
            self._done[str(t)] = done
            write_text(self._root / STEPS_FILE, json.dumps(self._done, sort_keys=True))
            previous = scratch.parent / f"step-{t - 1}"
            if previous.is_dir():      # S_{t−1} is no longer needed, not even to resume
                import shutil

                shutil.rmtree(previous, ignore_errors=True)
        if prev.first is not None:
            prev.first_sq = dict(done["first"])
        ckpt = open_local(folder / "model.safetensors") if (folder / "model.safetensors").is_file() else None
        return dict(done["totals"]), ckpt, dict(done["info"])

    # ---- the output (and the state) --------------------------------------------------------

    def _write(self, output, prev, fold: list[Checkpoint], count0: int, order, steps, first_step, *,
               record, shard_size, force, dtype, state_dir, guarded, sink_factory) -> Result:
        base, method = self.base, self.method
        count = count0 + len(fold)
        job = self._job()
        source = self._prev(prev)
        dtype_of = {n: base.info(n).dtype for n in self.names}
        whole = lambda n: not base.info(n).shape or bool(fold and self._whole(n))  # noqa: E731
        materialize = state_dir is not None and (source.ckpt is None or bool(fold))
        folded = list(fold)
        stats: dict[str, dict[str, Any]] = {}
        if materialize:        # S_T into a folder first: the output reads it and the state copies it
            plan = self._plan(_final, job, lambda n: torch.float32, whole, lambda n: None, source, fold, count0, False)
            stats = self._run_plan(self._root / "final", plan, f"{method.name}: state")
            source, fold = _Prev(ckpt=open_local(self._root / "final" / "model.safetensors")), []
            whole = lambda n: not base.info(n).shape  # noqa: E731

        def extra(out_stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
            got = stats or out_stats
            if prev.first is not None:
                prev.first_sq = {k: _in_order(got, self.names, f"first_{k}") for k in ("tau_sq", "state_sq")}
                self._fill_first(prev, order, first_step)
            for i, m in enumerate(folded):
                norm = math.sqrt(_in_order(got, self.names, f"fold_tau_sq:{i}"))
                order[count0 + i]["tau_norm"] = norm
                steps.append({"step": count0 + i + 1, "model": m.label, "tau_norm": norm})
            return {"order": order, "steps": steps, **self.scalars, "count": count,
                    "mean_tau_norm": _sum_norms(order) / count if count else None}

        plan = self._plan(_final, job, dtype_of.__getitem__, whole, lambda n: None, source, fold, count0, True)
        plan += [copy_tensor(base, n) for n in base.names if n not in dtype_of]
        state_specs = [TensorSpec(n, base.info(n).shape, torch.float32) for n in self.names]
        state = sink_factory(state_specs) if state_dir is not None else nullcontext()
        with state as sink:
            written = write_checkpoint(plan, output, donor=base, operation="merge", parameters=record,
                                       inputs=[base] + self.models, input_roles=["base"] + ["model"] * len(self.models),
                                       input_paths=guarded, dtype=dtype, shard_size=shard_size, force=force,
                                       progress=self.progress, extra_record=extra, executor=self.executor)
            if sink is not None:
                self.progress.start(sum(s.nbytes for s in state_specs), f"{method.name}: saving the state")
                self.executor.write(sink.writer, [copy_tensor(source.ckpt, n) for n in self.names], self.progress)
                self.progress.close()
                sink.finish(ContinualState(method.name, self.params.recorded(), self.base_identity, order, count,
                                           _sum_norms(order), self.scalars.get("lambda", 1.0), steps,
                                           scalars=dict(self.scalars)))
        lam = self.scalars.get("lambda") if method.uses_totals else None
        return Result({"method": method.name, "order": [o["label"] for o in order], "lambda": lam, "steps": steps,
                       "state": str(state_dir) if state_dir else None, "passes": self.passes}, written)
