"""Per-tensor singular spectra of a checkpoint (or of its task vector against a base).

Math (docs/analyze.md): σ_max, ‖W‖_F, stable rank ‖W‖_F²/σ_max², effective rank exp(H(σ/Σσ))
(Roy & Vetterli 2007, https://infoscience.epfl.ch/record/110188), energy rank at a share of Σσ².
Full spectra are computed in float32 with ``torch.linalg.svdvals``, one tensor at a time.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint
from ..core.engine import dtype_name
from ..core.errors import IncompatibleCheckpointsError
from ..core.executor import map_items
from ..core.progress import Progress
from .common import check_energy, check_top, matrix_names, shared_matrices, summarize, tensor_identity
from .linalg import is_finite, nonfinite_counts, singular_values, spectrum_metrics

SUMMARY_FIELDS = ["sigma_max", "frobenius", "stable_rank", "effective_rank", "energy_rank", "effective_rank_ratio"]


def tensor_spectrum(w: torch.Tensor, *, energy: float = 0.9, top: int = 8) -> dict[str, Any]:
    """Spectrum metrics of one 2-D tensor; a NaN/Inf tensor gets ``finite: False`` and no numbers."""
    if not is_finite(w):
        return {"finite": False, "nonfinite": nonfinite_counts(w), "sigma_max": None, "frobenius": None,
                "stable_rank": None, "effective_rank": None, "effective_rank_ratio": None, "energy_rank": None,
                "top_singular_values": None}, None
    s = singular_values(w)
    m = spectrum_metrics(s, energy=energy, top=top)
    m["effective_rank_ratio"] = m["effective_rank"] / min(w.shape) if m["effective_rank"] is not None else None
    return {"finite": True, **m}, s


def _spectrum_row(ckpt: Checkpoint, base: Checkpoint | None, energy: float, top: int, device: str, keep: bool,
                  name: str) -> tuple[dict[str, Any], list[float] | None]:
    """One matrix's row (and its full spectrum when ``keep``); reads its own inputs."""
    info = ckpt.info(name)
    w = ckpt.get(name, dtype=torch.float32, device=device)
    if base is not None:
        w -= base.get(name, dtype=torch.float32, device=device)
    metrics, s = tensor_spectrum(w, energy=energy, top=top)
    row = {"name": name, "shape": list(info.shape), "dtype": dtype_name(info.dtype), **tensor_identity(name), **metrics}
    return row, ([float(x) for x in s.cpu()] if keep and s is not None else None)


def analyze_spectrum(ckpt: Checkpoint, *, base: Checkpoint | None = None, energy: float = 0.9, top: int = 8,
                     device: str = "cpu", keep_spectra: bool = False,
                     progress: Progress | None = None, executor: Any = None) -> dict[str, Any]:
    """Spectrum of every floating 2-D tensor of ``ckpt`` (of ``ckpt − base`` when ``base`` is given).

    Args:
        ckpt: Checkpoint to analyze.
        base: Optional base; then each matrix is the task vector W − W_base.
        energy: Share of Σσ² that defines the energy rank.
        top: How many of the largest singular values to list per tensor.
        device: Where the SVDs run.
        keep_spectra: Also return every full spectrum (under ``spectra``, for plotting).
        progress: Progress sink.
        executor: Where the per-tensor SVDs run (:mod:`surgery.core.executor`; None: here).

    Returns:
        ``tensors`` (one row per matrix), ``by_type``, ``by_depth``, ``non_finite``, ``skipped``.

    Raises:
        UsageError: ``energy`` or ``top`` out of range.
        IncompatibleCheckpointsError: ``base`` shares no 2-D tensor of the same shape with ``ckpt``.
    """
    check_energy(energy)
    check_top(top)
    names, skipped = (matrix_names(ckpt), []) if base is None else shared_matrices(ckpt, {"base": base})
    if base is not None and not names:
        raise IncompatibleCheckpointsError(
            f"{ckpt.label} and base {base.label} share no 2-D tensor of the same shape: pass the base "
            "this checkpoint was fine-tuned from.", path=base.label)
    results = map_items(functools.partial(_spectrum_row, ckpt, base, energy, top, device, keep_spectra), names,
                        "spectrum", progress, executor=executor,
                        weights=[ckpt.info(n).nbytes * (1 if base is None else 2) for n in names])
    rows = [row for row, _ in results]
    spectra = {row["name"]: s for row, s in results if s is not None}
    report: dict[str, Any] = {
        "checkpoint": ckpt.label,
        "base": base.label if base is not None else None,
        "of": "task_vector" if base is not None else "weights",
        "energy": energy,
        "top": top,
        "tensors": rows,
        "by_type": summarize(rows, "sublayer", SUMMARY_FIELDS),
        "by_depth": summarize(rows, "depth", SUMMARY_FIELDS),
        "non_finite": [r["name"] for r in rows if not r["finite"]],
        "skipped": skipped,
    }
    if keep_spectra:
        report["spectra"] = spectra
    return report
