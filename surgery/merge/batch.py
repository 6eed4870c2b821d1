"""The batch-merge plan: one OutputTensor per tensor of the reference model, each produced by
the method's per-tensor function over a :class:`~surgery.merge.method.TensorContext`.

Elementwise methods are called once per row block of about :data:`SUB_BLOCK_ELEMENTS`
entries per model; the others once per tensor, returning a tensor or a ``rows(start, stop)``
function the engine streams. Scalars are presented as one-row tensors. Nothing here names a
method.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.roles import depth_of
from ..core.engine import OutputTensor, copy_tensor, rows_in_blocks
from .method import Batch, TensorContext
from .params import Params

SUB_BLOCK_ELEMENTS = 1 << 20   # elementwise methods see about this many entries per model at a time


def mergeable(ref: Checkpoint, name: str) -> bool:
    """Floating tensors are merged; integer buffers are copied from the reference."""
    return ref.info(name).dtype.is_floating_point


class _Lazy:
    """The rows function of one non-elementwise tensor: the method is called on the first
    request; a tensor result is sliced, a rows function is delegated to, and both are dropped
    after the last row."""

    def __init__(self, method: Batch, make_ctx: Callable[[], TensorContext], shape: tuple[int, ...], scalar: bool):
        self.method, self.make_ctx, self.shape, self.scalar = method, make_ctx, shape, scalar
        self.result: Any = None

    def __call__(self, a: int, e: int) -> torch.Tensor:
        if self.result is None or a == 0:
            self.result = self.method.merge(self.make_ctx())
        r = self.result
        block = r(a, e) if callable(r) else r[a:e]
        if e >= self.shape[0]:
            self.result = None
        return block.reshape(()) if self.scalar else block


def plan_batch(method: Batch, params: Params, base: Checkpoint | None, models: list[Checkpoint], ref: Checkpoint,
               copy_from_base: set[str], *, seed: int, device: str, options: dict[str, Any]) -> list[OutputTensor]:
    """The output plan of a batch merge.

    Args:
        method: The method's declaration.
        params: Resolved parameters.
        base: θ0 (None when the method runs without one).
        models: The models, in order.
        ref: The checkpoint whose tensors, shapes and dtypes the output has.
        copy_from_base: Tensors copied from ``ref`` unmerged (missing from some model).
        seed: The run's seed.
        device: Where the math runs.
        options: Execution options passed to the method (``trim_ties``...).
    """
    f32 = torch.float32
    plan: list[OutputTensor] = []
    for name in ref.names:
        info = ref.info(name)
        if not mergeable(ref, name) or name in copy_from_base:
            plan.append(copy_tensor(ref, name))
            continue
        scalar = not info.shape
        shape = info.shape if not scalar else (1,)

        def reader(ck: Checkpoint, n: str = name, scalar: bool = scalar):
            if scalar:
                return lambda a, e: ck.get(n, device=device).reshape(1)[a:e].clone()
            return lambda a, e: ck.get_rows(n, a, e, dtype=f32, device=device)

        base_rows = reader(base) if base is not None else None
        model_readers = [reader(m) for m in models]

        def make_ctx(rows: tuple[int, int] | None = None, n: str = name, shape: tuple = shape,
                     base_rows=base_rows, model_readers=model_readers) -> TensorContext:
            return TensorContext(name=n, shape=shape, n=len(models), layer=depth_of(n), depth=params.layer_t(n),
                                 seed=seed, params=params.shared(n), model_params=params.per_model(n), rows=rows,
                                 device=device, options=options, _base_rows=base_rows,
                                 _model_rows=lambda i, a, e: model_readers[i](a, e))

        if method.elementwise:
            def rows(a: int, e: int, n: str = name, shape: tuple = shape, make_ctx=make_ctx,
                     scalar: bool = scalar) -> torch.Tensor:
                block = rows_in_blocks(shape, a, e, SUB_BLOCK_ELEMENTS, lambda s, t: method.merge(make_ctx((s, t))))
                return block.reshape(()) if scalar else block

            plan.append(OutputTensor(name, info.shape, info.dtype, rows=rows))
        else:
            plan.append(OutputTensor(name, info.shape, info.dtype, rows=_Lazy(method, make_ctx, shape, scalar)))
    return plan
