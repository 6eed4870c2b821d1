"""An edit file from two checkpoints: ΔW = edited − base per changed tensor, compressed by
truncated SVD (Eckart–Young: the rank-r truncation is the best rank-r approximation in
Frobenius norm, and its error is the energy of the dropped singular values).

With a fixed ``rank`` the factors come from a randomized SVD (Halko, Martinsson & Tropp
2011, https://arxiv.org/abs/0909.4061: a Gaussian sketch of rank + 10 columns, two power
iterations with re-orthonormalisation), which skips the full decomposition of large
matrices such as embeddings. Its factors are U_r S_r V_rᵀ = P ΔW with P = U_r U_rᵀ an
orthogonal projector, so the error of what is stored is known exactly without the full
SVD: ‖ΔW − U_r S_r V_rᵀ‖²_F = ‖ΔW‖²_F − ‖S_r‖². That error is reported per tensor; it is
never below the optimal (Eckart–Young) error, and ``exact=True`` computes the full SVD."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..core.determinism import one_thread, svd
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..core.output import check_output
from ..core.progress import Progress, track
from ..core.result import Result
from .format import Edit, TensorEdit, save_edit

DEFAULT_ENERGY = 0.99
OVERSAMPLE = 10
POWER_ITERS = 2
SEED = 0


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


def sum_squares(t: torch.Tensor, block: int = 1 << 20) -> float:
    """Σ t² accumulated in float64 over blocks of ``block`` elements (no float64 copy of ``t``)."""
    flat = t.reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), block):
        total += float(torch.sum(flat[i:i + block].double() ** 2))
    return total


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS,
                   seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (U, S, Vᴴ) of ``a`` from a seeded Gaussian sketch of
    ``rank + oversample`` columns with ``power_iters`` power iterations (Halko et al. 2011,
    Algorithms 4.4 and 5.1). U_r S_r V_rᵀ equals U_r U_rᵀ a exactly (an orthogonal
    projection of ``a``)."""
    m, n = a.shape
    k = min(rank + oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=g, dtype=a.dtype).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub[:, :rank]), s[:rank], vh[:rank]


def compress(name: str, delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
             factor_dtype: torch.dtype = torch.float32, exact: bool = False) -> tuple[TensorEdit, dict[str, Any]]:
    """Truncated SVD of one 2-D delta; dense when the factors would not be smaller.

    With ``rank`` (and not ``exact``) the factors come from :func:`randomized_svd` when the
    sketch is smaller than the matrix; otherwise from the full SVD.

    Returns:
        The TensorEdit and facts: kind, rank, method (``exact`` / ``randomized``), energy
        (captured share of ‖ΔW‖²_F) and rel_error (‖ΔW − stored‖_F / ‖ΔW‖_F; exact for
        either method, from ‖ΔW‖_F and the kept singular values).
    """
    rows, cols = delta.shape
    d = delta.float()
    total = sum_squares(d)
    sketch = rank is not None and not exact and rank + OVERSAMPLE < min(rows, cols) // 2
    if sketch:
        seed = SEED + zlib.crc32(name.encode())  # deterministic per tensor, whatever the order
        with one_thread():   # the same bytes whatever the thread count
            u, s, vh = randomized_svd(d, rank, seed=seed)
        r = min(rank, int(s.numel()))
        method = "randomized"
    else:
        u, s, vh = svd(d)   # one thread, fixed signs: the same bytes whatever the thread count
        r = choose_rank(s, rank=rank, energy=energy)
        method = "exact"
    kept = float(s[:r].double().pow(2).sum())
    captured = min(1.0, kept / total) if total > 0 else 1.0
    facts = {"rank": r, "full_rank": min(rows, cols), "method": method, "energy": captured,
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
                 exact: bool = False, progress: Progress | None = None) -> Result:
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
        exact: Full SVDs even with ``rank`` (default: a randomized SVD, whose exact error
            is reported per tensor).

    Returns:
        A Result: the written edit file and a report (per changed tensor its kind, rank,
        captured energy and relative error).

    Raises:
        UsageError: Both or bad ``rank`` / ``energy``; IncompatibleCheckpointsError when the
            checkpoints' names or shapes differ.
    """
    from ..core.engine import parse_dtype

    if rank is not None and energy is not None:
        raise UsageError("give `rank` or `energy`, not both.")
    if rank is not None and rank < 1:
        raise UsageError(f"`rank` must be at least 1, got {rank}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"`energy` must be in (0, 1], got {energy}.")
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
        raw_b, raw_e = b.get_raw(name), e.get_raw(name)  # each tensor read once
        if ib.dtype == ie.dtype and torch.equal(raw_b, raw_e):
            continue
        wb = raw_b.to(torch.float32).to(device)
        delta = raw_e.to(torch.float32).to(device)
        delta -= wb
        del raw_e
        if not bool(delta.any()):
            continue
        # the sha256 of the base tensor's stored bytes, from the bytes already in memory
        sha = hashlib.sha256(raw_b.reshape(-1).view(torch.uint8).numpy()).hexdigest()
        wn = math.sqrt(sum_squares(wb))
        del raw_b, wb  # only the delta stays: one tensor in float32 at a time
        dn = math.sqrt(sum_squares(delta))
        if delta.dim() == 2 and min(delta.shape) > 1:
            te, facts = compress(name, delta, rank=rank, energy=energy, factor_dtype=fdtype, exact=exact)
        else:
            te, facts = TensorEdit(name, dense=delta.to(fdtype)), {"kind": "dense", "rank": None, "method": "exact",
                                                                   "energy": 1.0, "rel_error": 0.0}
        # Factors go to CPU at once: only the (small) edit stays resident, never two models.
        tensors[name] = TensorEdit(name, *(None if t is None else t.cpu() for t in (te.u, te.v, te.s, te.dense)))
        shas[name] = sha
        del delta
        rows.append({"name": name, "shape": list(ib.shape), **facts, "delta_norm": dn,
                     "rel_change": dn / wn if wn > 0 else None})
    if not tensors:
        raise UsageError(f"{e.label} is identical to {b.label}: there is no edit to extract.")
    info = {"description": description, "subject": subject or "", "prompt": prompt or "", "target": target or "",
            "base": b.label, "model_type": str((b.config or {}).get("model_type", "")),
            "created_by": f"surgery edit extract {e.label}"}
    extra = {"extract": json.dumps({"rank": rank, "energy": None if rank is not None else (energy or DEFAULT_ENERGY),
                                    "svd": "exact" if exact or rank is None else "randomized"})}
    edit = Edit(tensors, base_sha256=shas, info={k: v for k, v in info.items() if v}, extra=extra)
    written = save_edit(edit, out, force=force, inputs=read_paths)
    stored = sum(t.numel() * t.element_size() for te in tensors.values() for t in te.tensors().values())
    dense = sum(math.prod(b.info(n).shape) * torch.empty((), dtype=fdtype).element_size() for n in tensors)
    return Result({"output": str(written.output), "base": b.label, "edited": e.label, "changed": len(tensors),
            "unchanged": len(b.names) - len(tensors), "stored_bytes": stored, "dense_bytes": dense,
            "min_energy": min(r["energy"] for r in rows), "max_rel_error": max(r["rel_error"] for r in rows),
            "tensors": rows}, written)
