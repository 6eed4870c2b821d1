"""How much the task vectors of several fine-tunes of one base interfere, per tensor and per
layer, before any merge is made.

The properties "Demystifying Mergeability" (Zhou, Zhao, Yu & Rodolà 2026,
https://arxiv.org/abs/2601.22285) finds correlated with post-merge quality that need no data:

- **cosine** of each pair of task vectors τ_i, τ_j (whole tensor, flattened): near 0 the
  updates are independent and add without interference; negative they undo each other.
- **sign conflict**: among the entries where at least two task vectors are non-zero, the share
  whose non-zero values do not all have one sign — what TIES' sign election has to discard.
- **subspace overlap** (2-D tensors): mean cos² of the principal angles between the top
  singular subspaces of τ_i and τ_j, left (outputs) and right (inputs), each k the task
  vector's energy rank; ``chance`` = max(k_i, k_j)/d is its value for random subspaces.
  Overlap far above chance means the fine-tunes write to (or read from) the same directions.
- **effective rank** of each τ_i (exp of the entropy of σ/Σσ) over min(m, n): low-rank task
  vectors collide less.
- **relative size** ‖τ_i‖ / ‖θ0‖ per tensor.

Gradient alignment, the paper's strongest predictor, needs the fine-tunes' data and is not
computed. Everything streams one tensor at a time (all models' copies of it).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint, matrix_like
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..core.progress import Progress, track
from ..merge.method import dot64, sum_sq
from .common import check_energy, summarize, tensor_identity
from .linalg import energy_rank, is_finite, spectrum_metrics, subspace_overlap

FIELDS = ["cosine", "sign_conflict", "overlap_left", "overlap_right", "overlap_chance", "effective_rank",
          "relative_norm"]


def sign_conflict(taus: list[torch.Tensor]) -> tuple[int, int]:
    """(entries whose non-zero values disagree in sign, entries where ≥ 2 values are non-zero)."""
    pos = torch.zeros(taus[0].shape, dtype=torch.int16)
    neg = torch.zeros_like(pos)
    for t in taus:
        pos += t > 0
        neg += t < 0
    both = (pos + neg) >= 2
    return int((both & (pos > 0) & (neg > 0)).sum()), int(both.sum())


def _left_right(t: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    k = max(1, energy_rank(s, energy))
    return u[:, :k], vh[:k].T, s


def analyze_interference(base: Checkpoint, models: list[Checkpoint], *, energy: float = 0.9, device: str = "cpu",
                         progress: Progress | None = None) -> dict[str, Any]:
    """Interference metrics of the task vectors ``models − base`` (see the module docstring).

    Args:
        base: The common base.
        models: Two or more fine-tunes of it.
        energy: Share of Σσ² that sets each task vector's subspace rank k.
        device: Where the SVDs run.
        progress: Progress sink.

    Returns:
        ``pairs`` (whole-model cosine per pair), ``tensors`` (per tensor), ``by_depth`` and
        ``by_type`` summaries, ``layers`` (per block: the means of every metric), ``totals``
        and ``non_finite``.

    Raises:
        UsageError: Fewer than two models, or ``energy`` out of (0, 1].
        IncompatibleCheckpointsError: No floating tensor is shared with one shape by all.
    """
    if len(models) < 2:
        raise UsageError("interference needs at least two fine-tuned models (give MODEL MODEL ...).")
    check_energy(energy)
    names = [n for n in base.names if base.info(n).dtype.is_floating_point
             and all(n in m and m.info(n).shape == base.info(n).shape for m in models)]
    if not names:
        raise IncompatibleCheckpointsError(f"the models share no tensor of the same shape with base {base.label}: "
                                           f"they must be fine-tunes of it.", path=base.label)
    pairs = list(itertools.combinations(range(len(models)), 2))
    dots = {p: 0.0 for p in pairs}
    sq = [0.0] * len(models)
    base_sq = 0.0
    conflicts = [0, 0]
    rows: list[dict[str, Any]] = []
    non_finite: list[str] = []
    for name in track(names, "interference", progress):
        w0 = base.get(name, device=device)
        taus = [m.get(name, device=device).sub_(w0) for m in models]
        if not all(is_finite(t) for t in taus) or not is_finite(w0):
            non_finite.append(name)
            continue
        norms = [sum_sq(t) for t in taus]
        b2 = sum_sq(w0)
        base_sq += b2
        for i, n2 in enumerate(norms):
            sq[i] += n2
        cos = []
        for i, j in pairs:
            d = dot64(taus[i], taus[j])
            dots[(i, j)] += d
            if norms[i] > 0 and norms[j] > 0:
                cos.append(d / math.sqrt(norms[i] * norms[j]))
        bad, both = sign_conflict(taus)
        conflicts[0] += bad
        conflicts[1] += both
        row: dict[str, Any] = {
            "name": name, "shape": list(base.info(name).shape), **tensor_identity(name),
            "cosine": sum(cos) / len(cos) if cos else None,
            "sign_conflict": bad / both if both else None,
            "relative_norm": (math.sqrt(sum(norms) / len(norms)) / math.sqrt(b2)) if b2 > 0 else None,
            "overlap_left": None, "overlap_right": None, "overlap_chance": None, "effective_rank": None}
        if matrix_like(base.info(name)) and all(n2 > 0 for n2 in norms):
            spaces = [_left_right(t, energy) for t in taus]
            left = [subspace_overlap(spaces[i][0], spaces[j][0]) for i, j in pairs]
            right = [subspace_overlap(spaces[i][1], spaces[j][1]) for i, j in pairs]
            k_min = min(base.info(name).shape)
            eff = [spectrum_metrics(s, top=0)["effective_rank"] for _, _, s in spaces]
            row.update({
                "overlap_left": sum(o["mean_cos2"] for o in left) / len(left),
                "overlap_right": sum(o["mean_cos2"] for o in right) / len(right),
                "overlap_chance": sum(o["chance"] for o in left) / len(left),
                "effective_rank": sum(eff) / len(eff) / k_min,
                "ranks": [int(s[0].shape[1]) for s in spaces]})
            del spaces
        rows.append(row)
        del w0, taus
    labels = [m.label for m in models]
    pair_rows = [{"a": labels[i], "b": labels[j],
                  "cosine": dots[(i, j)] / math.sqrt(sq[i] * sq[j]) if sq[i] > 0 and sq[j] > 0 else None}
                 for i, j in pairs]
    by_depth = summarize(rows, "depth", FIELDS)
    layers = [{"layer": int(k), "tensors": v["count"],
               **{f: (v[f]["mean"] if v[f] else None) for f in FIELDS}} for k, v in by_depth.items()]
    return {
        "base": base.label, "models": labels, "energy": energy,
        "pairs": pair_rows,
        "totals": {"sign_conflict": conflicts[0] / conflicts[1] if conflicts[1] else None,
                   "relative_norms": [math.sqrt(s / base_sq) if base_sq > 0 else None for s in sq],
                   "tensors": len(rows)},
        "layers": layers,
        "by_type": summarize(rows, "sublayer", FIELDS),
        "by_depth": by_depth,
        "tensors": rows,
        "non_finite": non_finite,
    }
