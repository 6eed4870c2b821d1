"""An edit file from two checkpoints: ΔW = edited − base per changed tensor, compressed by
truncated SVD (Eckart–Young: the rank-r truncation is the best rank-r approximation in
Frobenius norm, and its error is the energy of the dropped singular values)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..core.output import check_output
from ..core.progress import Progress, track
from ..core.result import Result
from .format import Edit, TensorEdit, save_edit

DEFAULT_ENERGY = 0.99


def choose_rank(sigma: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """Rank to keep: ``rank`` capped at the full rank, or the smallest r whose σ² share reaches ``energy``."""
    full = int(sigma.numel())
    if rank is not None:
        return min(rank, full)
    sq = sigma.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    target = (energy if energy is not None else DEFAULT_ENERGY) * total
    cum = torch.cumsum(sq, 0)
    # The small relative slack absorbs float round-off when energy == 1.
    r = int(torch.searchsorted(cum, torch.tensor(target * (1 - 1e-12), dtype=torch.float64)).item()) + 1
    return min(r, full)


def compress(name: str, delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
             factor_dtype: torch.dtype = torch.float32) -> tuple[TensorEdit, dict[str, Any]]:
    """Truncated SVD of one 2-D delta; dense when the factors would not be smaller.

    Returns:
        The TensorEdit and facts: kind, rank, energy (captured share of ‖ΔW‖²_F),
        rel_error (‖ΔW − ΔW_r‖_F / ‖ΔW‖_F).
    """
    rows, cols = delta.shape
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = choose_rank(s, rank=rank, energy=energy)
    sq = s.double() ** 2
    total = float(sq.sum())
    kept = float(sq[:r].sum())
    captured = kept / total if total > 0 else 1.0
    facts = {"rank": r, "full_rank": int(s.numel()), "energy": captured,
             "rel_error": math.sqrt(max(0.0, 1.0 - captured))}
    if r * (rows + cols + 1) >= rows * cols:
        # Factors would be no smaller than the matrix: store it exactly.
        return TensorEdit(name, dense=delta.to(factor_dtype)), {**facts, "kind": "dense", "rank": None,
                                                                 "energy": 1.0, "rel_error": 0.0}
    te = TensorEdit(name, u=u[:, :r].to(factor_dtype).contiguous(), v=vh[:r].T.to(factor_dtype).contiguous(),
                    s=s[:r].to(factor_dtype).contiguous())
    return te, {**facts, "kind": "low_rank"}


def extract_edit(base: str | Path | Checkpoint, edited: str | Path | Checkpoint, output: str | Path, *,
                 rank: int | None = None, energy: float | None = None, description: str = "",
                 subject: str | None = None, prompt: str | None = None, target: str | None = None,
                 factor_dtype: str = "float32", device: str = "cpu", force: bool = False,
                 progress: Progress | None = None) -> Result:
    """Write the edit that turns ``base`` into ``edited``.

    Args:
        base, edited: Checkpoints with the same tensor names and shapes.
        output: The edit ``.safetensors`` file to write.
        rank: Keep at most this many singular directions per tensor.
        energy: Otherwise keep the smallest rank that captures this share of ‖ΔW‖²_F
            (default 0.99).
        description, subject, prompt, target: Free text recorded in the metadata.
        factor_dtype: dtype of the stored factors.
        device: Where the SVDs run.
        force: Replace an existing output file.

    Returns:
        A Result: the written edit file and a report (per changed tensor its kind, rank,
        captured energy and relative error).

    Raises:
        UsageError: Both or bad ``rank`` / ``energy``; IncompatibleCheckpointsError when the
            checkpoints' names or shapes differ.
    """
    from ..core.engine import parse_dtype

    if rank is not None and energy is not None:
        raise UsageError("give --rank or --energy, not both.")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], got {energy}.")
    fdtype = parse_dtype(factor_dtype) or torch.float32
    out = Path(output)
    b = base if isinstance(base, Checkpoint) else open_checkpoint(str(base))
    e = edited if isinstance(edited, Checkpoint) else open_checkpoint(str(edited))
    read_paths = b.input_paths() + e.input_paths()
    check_output(out, force=force, inputs=read_paths, kind="file")
    only_b = sorted(set(b.names) - set(e.names))
    only_e = sorted(set(e.names) - set(b.names))
    if only_b or only_e:
        which, lst = (b.label, only_b) if only_b else (e.label, only_e)
        raise IncompatibleCheckpointsError(
            f"{b.label} and {e.label} have different tensors ({len(only_b) + len(only_e)} differ, e.g. {lst[0]!r} "
            f"only in {which}); extract needs the same architecture.", tensor=lst[0])
    for name in b.names:
        if b.info(name).shape != e.info(name).shape:
            raise IncompatibleCheckpointsError(
                f"tensor {name!r} is {b.info(name).shape} in {b.label} but {e.info(name).shape} in {e.label}.",
                tensor=name)
    tensors: dict[str, TensorEdit] = {}
    shas: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for name in track(b.names, "extracting", progress):
        ib, ie = b.info(name), e.info(name)
        raw_b = b.get_raw(name)
        if ib.dtype == ie.dtype and torch.equal(raw_b, e.get_raw(name)):
            continue
        wb = raw_b.to(torch.float32).to(device)
        delta = e.get(name, device=device) - wb
        if not bool(delta.any()):
            continue
        if delta.dim() == 2 and min(delta.shape) > 1:
            te, facts = compress(name, delta, rank=rank, energy=energy, factor_dtype=fdtype)
        else:
            te, facts = TensorEdit(name, dense=delta.to(fdtype)), {"kind": "dense", "rank": None, "energy": 1.0,
                                                                   "rel_error": 0.0}
        # Factors go to CPU at once: only the (small) edit stays resident, never two models.
        tensors[name] = TensorEdit(name, *(None if t is None else t.cpu() for t in (te.u, te.v, te.s, te.dense)))
        shas[name] = b.tensor_sha256(name)
        dn = float(delta.double().norm())
        wn = float(wb.double().norm())
        rows.append({"name": name, "shape": list(ib.shape), **facts, "delta_norm": dn,
                     "rel_change": dn / wn if wn > 0 else None})
    if not tensors:
        raise UsageError(f"{e.label} is identical to {b.label}: there is no edit to extract.")
    info = {"description": description, "subject": subject or "", "prompt": prompt or "", "target": target or "",
            "base": b.label, "model_type": str((b.config or {}).get("model_type", "")),
            "created_by": f"surgery edit extract {e.label}"}
    extra = {"extract": json.dumps({"rank": rank, "energy": None if rank is not None else (energy or DEFAULT_ENERGY)})}
    edit = Edit(tensors, base_sha256=shas, info={k: v for k, v in info.items() if v}, extra=extra)
    written = save_edit(edit, out, force=force, inputs=read_paths)
    stored = sum(t.numel() * t.element_size() for te in tensors.values() for t in te.tensors().values())
    dense = sum(math.prod(b.info(n).shape) * torch.empty((), dtype=fdtype).element_size() for n in tensors)
    return Result({"output": str(written.output), "base": b.label, "edited": e.label, "changed": len(tensors),
            "unchanged": len(b.names) - len(tensors), "stored_bytes": stored, "dense_bytes": dense,
            "min_energy": min(r["energy"] for r in rows), "tensors": rows}, written)
