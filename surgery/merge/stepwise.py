"""The continual-merge runner: folds the models in order into the running state S_t of a
:class:`~surgery.merge.method.Continual` method, optionally from a saved state, and writes
θ0 + output(S_T) (and the new state).

Methods whose scalars need whole-model totals (OPCM's λ_t) take one streaming pass per
model: S_t goes to a float32 scratch file beside the output (rewritten in place each step),
so memory stays at a few tensors whatever the number of models; a last pass writes the
output. The others fold every model in the single output pass. A fresh run's first model
costs no pass: S_1 is computed on the fly from θ_1 − θ0 when the next pass reads it.

Whole-tensor steps of threaded methods (OPCM's decompositions) run on one worker thread per
core, each with one intra-op thread, results consumed in submission order: runs are
byte-identical whatever the thread count (whole-model norms use :func:`~surgery.merge.method.sum_sq`).
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.reader import Checkpoint, open_local
from ..checkpoint.writer import ShardedWriter, TensorSpec
from ..core.engine import OutputTensor, copy_tensor, row_ranges, write_checkpoint
from ..core.errors import IncompatibleCheckpointsError
from ..core.output import scratch_dir
from ..core.progress import Progress, ensure
from ..core.result import Result
from .ahead import Pool as _Pool
from .batch import mergeable
from .method import Continual, StepContext, sum_sq
from .params import Params
from .state import ContinualState

BLOCK_ELEMENTS = 4 * 1024 * 1024   # row-block steps see at most this many entries


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """Row ranges covering dim 0 in blocks of <= BLOCK_ELEMENTS (None for scalars)."""
    if not shape:
        return None
    return row_ranges(0, shape[0], math.prod(shape[1:]), BLOCK_ELEMENTS) or [(0, 0)]


class _Source:
    """Where S_{t−1} comes from: nothing (before the first model), a state or scratch file, or
    — a fresh run's first model — computed on the fly as S_1 = step(τ_1), whose norms are
    accumulated as it is read (each tensor is read exactly once per pass)."""

    def __init__(self, runner: "StepRunner", ckpt: Checkpoint | None = None, first: Checkpoint | None = None):
        self.r, self.ckpt, self.first = runner, ckpt, first
        self.first_sq = {"tau_sq": 0.0, "state_sq": 0.0}

    def _first(self, name: str, tau: torch.Tensor, whole: bool) -> torch.Tensor:
        self.first_sq["tau_sq"] += sum_sq(tau)
        s = self.r.method.step(self.r.ctx(name, 1, None, tau, whole))
        self.first_sq["state_sq"] += sum_sq(s)
        return s

    def full(self, n: str) -> torch.Tensor | None:
        r = self.r
        if self.ckpt is not None:
            return self.ckpt.get(n, device=r.dev)
        if self.first is not None:
            return self._first(n, self.first.get(n, device=r.dev) - r.base.get(n, device=r.dev), True)
        return None

    def rows(self, n: str, a: int, b: int) -> torch.Tensor | None:
        r, f32 = self.r, torch.float32
        if self.ckpt is not None:
            return self.ckpt.get_rows(n, a, b, dtype=f32, device=r.dev)
        if self.first is not None:
            tau = (self.first.get_rows(n, a, b, dtype=f32, device=r.dev)
                   - r.base.get_rows(n, a, b, dtype=f32, device=r.dev))
            return self._first(n, tau, False)
        return None


class StepRunner:
    """One continual merge: ``method`` over ``models`` after an optional resumed ``state``.

    Args:
        method: The method's declaration.
        params: Resolved parameters.
        base: θ0.
        models: The new models, in order.
        state, state_tensors: A resumed state and its tensors (or None).
        base_identity: θ0's label, path and sha256, recorded in the state.
        device: Where the math runs.
        options: Execution options passed to the steps (``decomposition``).
        allow_nonfinite: Write merged tensors that hold NaN or Inf.
        progress: Progress sink.
    """

    def __init__(self, method: Continual, params: Params, base: Checkpoint, models: list[Checkpoint],
                 state: ContinualState | None, state_tensors: Checkpoint | None, *, base_identity: dict[str, str],
                 device: str, options: dict[str, Any], allow_nonfinite: bool = False, progress: Progress | None):
        self.method, self.params, self.base, self.models = method, params, base, models
        self.base_identity, self.allow_nonfinite = base_identity, allow_nonfinite
        self.dev, self.options, self.progress = device, options, ensure(progress)
        self.names = [n for n in base.names if mergeable(base, n)]
        self.shared = {n: params.shared(n) for n in self.names}
        self.state, self.state_tensors = state, state_tensors
        self.scalars = dict(state.scalars) if state is not None else dict(method.initial)
        if state_tensors is not None:
            problems = [n for n in self.names if n not in state_tensors
                        or state_tensors.info(n).shape != base.info(n).shape]
            if problems or len(state_tensors.names) != len(self.names):
                raise IncompatibleCheckpointsError(
                    f"the continual state does not match the base's tensors (e.g. "
                    f"{(problems or state_tensors.names)[0]!r}); it was made for another architecture.",
                    path=str(state_tensors.root))

    def ctx(self, name: str, t: int, prev: torch.Tensor | None, tau: torch.Tensor, whole: bool) -> StepContext:
        return StepContext(name, tuple(self.base.info(name).shape), t, prev, tau, self.shared[name], self.scalars,
                           whole, self.options)

    def _whole(self, name: str) -> bool:
        shape = tuple(self.base.info(name).shape)
        return not shape or self.method.whole(name, shape, self.shared[name])

    # ---- one pass per model (methods that need whole-model totals) ---------------------------

    def _pass(self, prev: _Source, model: Checkpoint, t: int, scratch: Path) -> tuple[dict[str, float], Checkpoint,
                                                                                      dict[str, float]]:
        specs = [TensorSpec(n, self.base.info(n).shape, torch.float32) for n in self.names]
        # S_t overwrites S_{t−1} in place: each tensor is read whole (or row block by row block)
        # before its new value is written to the same bytes, and no page has to be allocated.
        writer = ShardedWriter(scratch, specs, 1 << 62, {"format": "pt"}, reuse=True)
        sums: dict[str, list[float]] = {}       # per tensor: ‖τ‖², ‖S_t‖² (summed in name order)
        infos: dict[str, dict[str, float]] = {}
        f32, dev = torch.float32, self.dev
        pending: deque = deque()
        inflight = [0]

        def record(n: str, ctx: StepContext, s_new: torch.Tensor) -> None:
            sums[n] = [sum_sq(ctx.tau), sum_sq(s_new)]
            if ctx.info:
                infos[n] = dict(ctx.info)
            writer.write(n, s_new.to("cpu", f32).contiguous())
            self.progress.advance()

        def finish() -> None:
            n, future, ctx, cost = pending.popleft()
            inflight[0] -= cost
            record(n, ctx, future.result())

        self.progress.start(len(self.names), f"{self.method.name} step {t}: {model.label}")
        try:
            with _Pool(dev, self.method.threaded) as pool:
                for n in self.names:
                    blocks = _blocks(self.base.info(n).shape)
                    if blocks is None or self._whole(n):
                        tau = model.get(n, device=dev).sub_(self.base.get(n, device=dev))
                        ctx = self.ctx(n, t, prev.full(n), tau, True)
                        cost = pool.footprint(tau.numel())
                        while pending and (len(pending) >= pool.window or inflight[0] + cost > pool.budget):
                            finish()
                        pending.append((n, pool.submit(self.method.step, ctx), ctx, cost))
                        inflight[0] += cost
                        del tau, ctx
                    else:
                        total = [0.0, 0.0]
                        for a, e in blocks:
                            tau = (model.get_rows(n, a, e, dtype=f32, device=dev)
                                   - self.base.get_rows(n, a, e, dtype=f32, device=dev))
                            ctx = self.ctx(n, t, prev.rows(n, a, e), tau, False)
                            s_new = self.method.step(ctx)
                            total[0] += sum_sq(ctx.tau)
                            total[1] += sum_sq(s_new)
                            writer.write_rows(n, a, s_new.to("cpu", f32).contiguous())
                            del tau, ctx, s_new
                        sums[n] = total
                        self.progress.advance()
                while pending:
                    finish()
            if writer.missing():
                raise RuntimeError(f"step scratch misses {writer.missing()[:3]}")
        finally:
            writer.close()
            self.progress.close()
        totals = {"tau_sq": sum(sums[n][0] for n in self.names), "state_sq": sum(sums[n][1] for n in self.names)}
        return totals, open_local(scratch / "model.safetensors"), _mean_info(infos)

    # ---- the run -------------------------------------------------------------------------

    def _scratch_root(self, output: str | Path) -> Any:
        """Where the passes' S_t live: a temporary folder beside the output (a subclass running
        on Ray keeps a resumable one, :mod:`surgery.merge.remote`)."""
        return scratch_dir(output)

    def _fill_first(self, source: _Source, order: list[dict[str, Any]], first_step: dict[str, Any]) -> None:
        """The first model's norms and scalars, once the pass that computed S_1 on the fly is over."""
        tau_norm = math.sqrt(source.first_sq["tau_sq"])
        order[0]["tau_norm"] = tau_norm
        totals = {**source.first_sq, "sum_norms": tau_norm}
        if self.method.end_step is not None:
            self.scalars = self.method.end_step(dict(self.method.initial), totals, 1)
        first_step.update({"tau_norm": tau_norm, "merged_norm": math.sqrt(source.first_sq["state_sq"]),
                           "mean_tau_norm": tau_norm, **self.scalars})

    def run(self, output: str | Path, *, record: dict[str, Any], shard_size: str | int, force: bool,
            dtype: Any, state_dir: Path | None, guarded: list[Path], sink_factory: Callable) -> Result:
        st = self.state
        count = st.count if st else 0
        order = [dict(o) for o in st.order] if st else []
        steps = [dict(s) for s in st.steps] if st else []
        prev = _Source(self, self.state_tensors)
        first_step: dict[str, Any] | None = None     # a fresh run's first model, filled after the next pass

        with self._scratch_root(output) as scratch_root:
            fold: list[Checkpoint] = []
            for model in self.models:
                entry = {"label": model.label, "sha256": model.sha256(), "tau_norm": None}
                order.append(entry)
                if not self.method.uses_totals:
                    fold.append(model)
                    continue
                if count == 0:
                    prev, count = _Source(self, first=model), 1
                    first_step = {"step": 1, "model": model.label}
                    steps.append(first_step)
                    continue
                scratch = scratch_root / "s"
                scratch.mkdir(exist_ok=True)
                t = count + 1
                totals, ckpt, info = self._pass(prev, model, t, scratch)
                if prev.first is not None:
                    self._fill_first(prev, order, first_step)
                entry["tau_norm"] = math.sqrt(totals["tau_sq"])
                sum_norms = _sum_norms(order)
                if self.method.end_step is not None:
                    self.scalars = self.method.end_step(self.scalars, {**totals, "sum_norms": sum_norms}, t)
                steps.append({"step": t, "model": model.label, "tau_norm": entry["tau_norm"],
                              "merged_norm": math.sqrt(totals["state_sq"]), "mean_tau_norm": sum_norms / t,
                              **self.scalars, **{f"mean_{k}": v for k, v in info.items()}})
                prev, count = _Source(self, ckpt), t
            return self._write(output, prev, fold, count, order, steps, first_step, record=record,
                               shard_size=shard_size, force=force, dtype=dtype, state_dir=state_dir,
                               guarded=guarded, sink_factory=sink_factory)

    def _write(self, output, prev: _Source, fold: list[Checkpoint], count0: int, order, steps, first_step, *,
               record, shard_size, force, dtype, state_dir, guarded, sink_factory) -> Result:
        base, dev, method = self.base, self.dev, self.method
        tau_sq = [0.0] * len(fold)
        names = set(self.names)
        count = count0 + len(fold)

        def fold_block(n: str, b: torch.Tensor, s: torch.Tensor | None, read: Callable[[Checkpoint], torch.Tensor],
                       whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
            for i, m in enumerate(fold):
                tau = read(m).sub_(b)
                tau_sq[i] += sum_sq(tau)
                s = method.step(self.ctx(n, count0 + i + 1, s, tau, whole))
            return method.output(s, b, self.shared[n], self.scalars), s

        def plan(sink) -> list[OutputTensor]:
            out = []
            for name in base.names:
                info = base.info(name)
                if name not in names:
                    out.append(copy_tensor(base, name))
                elif not info.shape or (fold and self._whole(name)):
                    def compute(n: str = name) -> torch.Tensor:
                        b = base.get(n, device=dev)
                        merged, s = fold_block(n, b, prev.full(n), lambda m: m.get(n, device=dev), True)
                        if sink is not None:
                            sink.write(n, s)
                        return merged

                    out.append(OutputTensor(name, info.shape, info.dtype, compute=compute))
                else:
                    def rows(a: int, e: int, n: str = name) -> torch.Tensor:
                        f32 = torch.float32
                        b = base.get_rows(n, a, e, dtype=f32, device=dev)
                        merged, s = fold_block(n, b, prev.rows(n, a, e),
                                               lambda m: m.get_rows(n, a, e, dtype=f32, device=dev), False)
                        if sink is not None:
                            sink.write_rows(n, a, s)
                        return merged

                    out.append(OutputTensor(name, info.shape, info.dtype, rows=rows))
            return out

        def extra() -> dict[str, Any]:
            # runs after every tensor is written: the norms of this pass are complete
            if prev.first is not None:
                self._fill_first(prev, order, first_step)
            for i, m in enumerate(fold):
                norm = math.sqrt(tau_sq[i])
                order[count0 + i]["tau_norm"] = norm
                steps.append({"step": count0 + i + 1, "model": m.label, "tau_norm": norm})
            return {"order": order, "steps": steps, **self.scalars, "count": count,
                    "mean_tau_norm": _sum_norms(order) / count if count else None}

        def write(sink) -> Any:
            return write_checkpoint(plan(sink), output, donor=base, operation="merge", parameters=record,
                                    inputs=[base] + self.models, input_roles=["base"] + ["model"] * len(self.models),
                                    input_paths=guarded, dtype=dtype, shard_size=shard_size, force=force,
                                    progress=self.progress, extra_record=extra, allow_nonfinite=self.allow_nonfinite)

        if state_dir is not None:
            specs = [TensorSpec(n, base.info(n).shape, torch.float32) for n in self.names]
            with sink_factory(specs) as sink:
                written = write(sink)
                sink.finish(ContinualState(method.name, self.params.recorded(), self.base_identity, order, count, _sum_norms(order),
                                           self.scalars.get("lambda", 1.0), steps, scalars=dict(self.scalars)))
        else:
            written = write(None)
        lam = self.scalars.get("lambda") if method.uses_totals else None
        return Result({"method": method.name, "order": [o["label"] for o in order], "lambda": lam, "steps": steps,
                       "state": str(state_dir) if state_dir else None}, written)


def _sum_norms(order: list[dict[str, Any]]) -> float:
    return float(sum(o["tau_norm"] or 0.0 for o in order))


def _mean_info(infos: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in infos.values() for k in d})
    return {k: sum(d[k] for d in infos.values() if k in d) / sum(1 for d in infos.values() if k in d) for k in keys}
