"""Per-tensor differences between two checkpoints (``surgery diff``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .checkpoint.reader import Checkpoint
from .core.engine import dtype_name
from .core.progress import Progress, track
from .core.result import Result


# Tensors are compared in row blocks of at most this many elements (float64: 8 MB each).
BLOCK_ELEMENTS = 1024 * 1024


class DiffAccumulator:
    """‖a‖², ‖b‖², ‖b−a‖², a·b and max |b−a| accumulated in float64 over blocks."""

    def __init__(self) -> None:
        self.aa = self.bb = self.dd = self.ab = 0.0
        self.max_abs = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
        d = b64 - a64
        self.aa += float(a64 @ a64)
        self.bb += float(b64 @ b64)
        self.ab += float(a64 @ b64)
        self.dd += float(d @ d)
        if d.numel():
            m = float(d.abs_().max())
            nan = m != m or self.max_abs != self.max_abs
            self.max_abs = float("nan") if nan else max(self.max_abs, m)

    def result(self) -> dict[str, float]:
        na, nb, nd = math.sqrt(self.aa), math.sqrt(self.bb), math.sqrt(self.dd)
        cos = self.ab / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        return {
            "norm_a": na, "norm_b": nb, "norm_diff": nd,
            "rel_change": nd / na if na > 0 else (0.0 if nd == 0 else math.inf),
            "cosine": cos,
            "max_abs_diff": self.max_abs,
        }


def tensor_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Relative change ‖b−a‖/‖a‖, cosine, max |b−a| and norms, in float64.

    Args:
        a: Reference tensor.
        b: Changed tensor (same shape).
    """
    acc = DiffAccumulator()
    acc.add(a, b)
    return acc.result()


def stream_diff(a: Checkpoint, b: Checkpoint, name: str, *, device: str = "cpu",
                max_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """:func:`tensor_diff` of one tensor read in row blocks, so memory stays a few blocks."""
    from .core.engine import row_ranges

    info = a.info(name)
    acc = DiffAccumulator()
    if len(info.shape) < 1 or info.shape[0] == 0:
        acc.add(a.get(name, dtype=torch.float64, device=device), b.get(name, dtype=torch.float64, device=device))
    else:
        for s, t in row_ranges(0, info.shape[0], info.numel // info.shape[0], max_elements):
            acc.add(a.get_rows(name, s, t, dtype=torch.float64, device=device),
                    b.get_rows(name, s, t, dtype=torch.float64, device=device))
    return acc.result()


def diff_checkpoints(a: Checkpoint, b: Checkpoint, *, device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """Compare every tensor of ``a`` and ``b``, one pair at a time.

    Returns:
        ``tensors``: per shared tensor the :func:`tensor_diff` numbers plus ``changed``;
        ``only_in_a`` / ``only_in_b``; ``mismatched`` (shape or dtype differs); ``summary``.
    """
    common = [n for n in a.names if n in b]
    rows, mismatched = [], []
    for name in track(common, "diff", progress):
        ia, ib = a.info(name), b.info(name)
        if ia.shape != ib.shape or ia.dtype != ib.dtype:
            mismatched.append({"name": name, "shape_a": list(ia.shape), "shape_b": list(ib.shape),
                               "dtype_a": dtype_name(ia.dtype), "dtype_b": dtype_name(ib.dtype)})
        if ia.shape != ib.shape:
            continue
        row = {"name": name, "shape": list(ia.shape), **stream_diff(a, b, name, device=device)}
        row["changed"] = row["max_abs_diff"] != 0.0
        rows.append(row)
    changed = [r for r in rows if r["changed"]]
    return {
        "a": a.label, "b": b.label,
        "tensors": rows,
        "only_in_a": [n for n in a.names if n not in b],
        "only_in_b": [n for n in b.names if n not in a],
        "mismatched": mismatched,
        "summary": {
            "compared": len(rows), "changed": len(changed),
            "max_rel_change": max((r["rel_change"] for r in rows), default=0.0),
            "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=0.0),
            "identical": not changed and not mismatched and all(n in b for n in a.names) and all(n in a for n in b.names),
        },
    }


def diff(a: str | Checkpoint, b: str | Checkpoint, *, changed_only: bool = False, device: str = "cpu",
         progress: Progress | None = None) -> Result:
    """``surgery diff``: :func:`diff_checkpoints` of two checkpoints given by location;
    ``changed_only`` keeps only the tensors that differ in the listing."""
    from .checkpoint.reader import open_checkpoint

    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b)
    report = diff_checkpoints(ca, cb, device=device, progress=progress)
    if changed_only:
        report["tensors"] = [r for r in report["tensors"] if r["changed"]]
    return Result(report)
