"""The streaming side of a batch merge: each planned tensor (:mod:`surgery.merge.plan`) becomes
an engine :class:`~surgery.core.engine.OutputTensor` whose rows the method's per-tensor
function produces over a :class:`~surgery.merge.method.TensorContext`.

Each input of a tensor is a (model, tensor name) source read in row blocks; an embedding or LM
head is read through its vocabulary alignment (:class:`~surgery.merge.vocab.AlignedRows`).
Elementwise methods are called once per row block of about :data:`SUB_BLOCK_ELEMENTS` entries
per model; the others once per tensor, returning a tensor or a ``rows(start, stop)`` function
the engine streams. Scalars are presented as one-row tensors. Nothing here names a method.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..checkpoint.reader import Checkpoint
from ..core.engine import OutputTensor, cast_tensor, copy_tensor, rows_in_blocks
from .ahead import Ahead
from .inputs import FusedCheckpoint
from .method import Batch, TensorContext
from .plan import SUB_BLOCK_ELEMENTS, MergePlan, PlannedTensor
from .vocab import AlignedRows

Rows = Callable[[int, int], torch.Tensor]


def mergeable(ref: Checkpoint, name: str) -> bool:
    """Floating tensors are merged; integer buffers are copied from the reference."""
    return ref.info(name).dtype.is_floating_point


class _Lazy:
    """The rows function of one non-elementwise tensor: the method is called on the first
    request (or its result taken from the :class:`~surgery.merge.ahead.Ahead` that computed it
    on a worker thread); a tensor result is sliced, a rows function is delegated to, and both
    are dropped after the last row."""

    def __init__(self, method: Batch, make_ctx: Callable[[], TensorContext], shape: tuple[int, ...], scalar: bool,
                 ahead: Ahead | None = None):
        self.method, self.make_ctx, self.shape, self.scalar = method, make_ctx, shape, scalar
        self.result: Any = None
        self.ahead, self.job = ahead, -1
        if ahead is not None:
            self.job = ahead.add(self._compute, math.prod(shape))

    def _compute(self) -> Any:
        return self.method.merge(self.make_ctx())

    def __call__(self, a: int, e: int) -> torch.Tensor:
        if self.result is None or a == 0:
            self.result = self.ahead.result(self.job) if self.ahead is not None else self._compute()
        r = self.result
        block = r(a, e) if callable(r) else r[a:e]
        if e >= self.shape[0]:
            self.result = None
        return block.reshape(()) if self.scalar else block


def _readers(plan: MergePlan, t: PlannedTensor, device: str) -> list[Rows]:
    """Row readers of the tensor's inputs in (base, models...) order, float32 on ``device``."""
    f32 = torch.float32
    scalar = not t.shape

    def reader(i: int, name: str) -> Rows:
        ck = plan.models[i]
        if scalar:
            return lambda a, e: ck.get(name, device=device).reshape(1)[a:e].clone()
        return lambda a, e: ck.get_rows(name, a, e, dtype=f32, device=device)

    plain = [reader(s.model, s.name) for s in t.inputs]
    if t.rows is None:
        return plain
    # alignment happens on the CPU (row gathers), then moves to the device
    # closures hold the checkpoints they read, not the plan (a work unit on Ray pickles them)
    cpu = [(lambda a, e, ck=plan.models[s.model], n=s.name: ck.get_rows(n, a, e, dtype=f32)) for s in t.inputs]
    aligned = AlignedRows(t.rows, cpu, tuple(t.shape[1:]))
    return [(lambda a, e, m=m: aligned.rows(m, a, e).to(device)) for m in range(len(t.inputs))]


def _copied(plan: MergePlan, t: PlannedTensor) -> OutputTensor:
    """A tensor copied unmerged from one input: its stored bytes when it has them."""
    src = t.copy
    model = plan.models[src.model]
    if isinstance(model, FusedCheckpoint) and not model.changed(src.name):
        model = model.base
    if isinstance(model, FusedCheckpoint):
        return OutputTensor(t.name, t.shape, t.dtype, compute=lambda: model.get(src.name, dtype=None))
    return copy_tensor(model, src.name, new_name=t.name)


def _unchanged(plan: MergePlan, t: PlannedTensor) -> OutputTensor | None:
    """The output when the method declares it equal to one model's stored tensor (``Batch.copies``):
    the stored bytes, or a row-block cast to the output dtype; None when it must be computed."""
    if t.rows is not None or plan.method.copies is None:
        return None                       # rows gathered across vocabularies are always computed
    i = plan.method.copies(t.shared, t.per_model)
    if i is None:
        return None
    src = t.models[i]
    model = plan.models[src.model]
    if isinstance(model, FusedCheckpoint):
        if model.changed(src.name):
            return None                   # an adapter changes it: computed from the fused rows
        model = model.base
    return cast_tensor(model, src.name, t.dtype, new_name=t.name)


def output_tensors(plan: MergePlan, *, seed: int, device: str, options: dict[str, Any],
                   copies: bool = True, ahead: Ahead | None = None) -> list[OutputTensor]:
    """The engine's plan of a batch merge.

    Args:
        plan: The validated merge plan.
        seed: The run's seed.
        device: Where the math runs.
        options: Execution options passed to the method (``trim_ties``...).
        copies: Let a tensor the method leaves unchanged (``Batch.copies``) be a stored-bytes
            copy (False: every floating tensor gets a ``rows`` function, as ``surgery tune`` needs).
        ahead: Where a ``threaded`` method's whole tensors are computed ahead of the writer
            (the caller enters it around the write); None computes each when it is written.
    """
    method = plan.method
    out: list[OutputTensor] = []
    for t in plan.tensors:
        if t.copy is not None:
            out.append(_copied(plan, t))
            continue
        unchanged = _unchanged(plan, t) if copies else None
        if unchanged is not None:
            out.append(unchanged)
            continue
        scalar = not t.shape
        shape = t.shape if not scalar else (1,)
        readers = _readers(plan, t, device)
        has_base = t.base is not None
        base_rows = readers[0] if has_base else None
        model_readers = readers[1:] if has_base else readers

        def make_ctx(rows: tuple[int, int] | None = None, t: PlannedTensor = t, shape: tuple = shape,
                     base_rows=base_rows, model_readers=model_readers) -> TensorContext:
            return TensorContext(name=t.name, shape=shape, n=len(t.models), layer=t.layer, depth=t.t, seed=seed,
                                 params=t.shared, model_params=t.per_model, rows=rows, device=device,
                                 options=options, _base_rows=base_rows,
                                 _model_rows=lambda i, a, e: model_readers[i](a, e))

        if method.elementwise:
            def rows(a: int, e: int, shape: tuple = shape, make_ctx=make_ctx, scalar: bool = scalar) -> torch.Tensor:
                block = rows_in_blocks(shape, a, e, SUB_BLOCK_ELEMENTS, lambda s, u: method.merge(make_ctx((s, u))))
                return block.reshape(()) if scalar else block

            out.append(OutputTensor(t.name, t.shape, t.dtype, rows=rows))
        else:
            lazy = _Lazy(method, make_ctx, shape, scalar, ahead if method.threaded and not scalar else None)
            out.append(OutputTensor(t.name, t.shape, t.dtype, rows=lazy))
    return out
