"""Subspace analysis of two task vectors against their base.

Per shared 2-D tensor, with τ_A = A − base and τ_B = B − base:

- overlap of the top-k left and right singular subspaces of τ_A and τ_B: principal angles
  (Björck & Golub 1973) and mean cos²;
- leakage of each task vector into the top-r subspace of the base weight, where r is the frozen
  rank that orthogonal-subspace fine-tuning would protect (Nayak et al. 2025, "Sculpting Subspaces",
  https://arxiv.org/abs/2504.07097): the fixed-fraction rule r = f·min(m, n), or the importance rule
  r(l) = (mrr + I(l)(trr − mrr))·min(m, n) when per-layer importances I(l) are given.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..core.progress import Progress, track
from .common import check_energy, shared_matrices, summarize, tensor_identity
from .linalg import energy_rank, is_finite, leakage, subspace_overlap

MRR = 0.1   # minimum retention ratio (Nayak et al. 2025)
TRR = 0.8   # target retention ratio (Nayak et al. 2025)
SUMMARY_FIELDS = ["overlap_left", "overlap_right", "leakage_a", "leakage_b", "frozen_fraction"]


def frozen_rank(m: int, n: int, fraction: float) -> int:
    """Frozen rank of an m×n matrix under a retention fraction: round(fraction·min(m, n))."""
    return int(min(min(m, n), max(0, round(fraction * min(m, n)))))


def importance_fraction(importance: float, mrr: float = MRR, trr: float = TRR) -> float:
    """Retention fraction r(l) = mrr + I(l)·(trr − mrr) for an importance I(l) in [0, 1]."""
    return mrr + min(1.0, max(0.0, importance)) * (trr - mrr)


def check_options(rank: int | None, energy: float | None, fraction: float, mrr: float, trr: float) -> None:
    """Raise UsageError for conflicting or out-of-range subspace options."""
    if rank is not None and energy is not None:
        raise UsageError("give either `rank` or `energy`, not both: one chooses k for every tensor, the other per tensor.")
    if rank is not None and rank < 1:
        raise UsageError(f"`rank` must be at least 1, got {rank}.")
    if energy is not None:
        check_energy(energy)
    if not (0.0 <= fraction <= 1.0):
        raise UsageError(f"`frozen_fraction` must be in [0, 1], got {fraction}.")
    if not (0.0 <= mrr <= trr <= 1.0):
        raise UsageError(f"need 0 ≤ `mrr` ≤ `trr` ≤ 1, got mrr={mrr}, trr={trr}.")


def _svd(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    return u, s, vh.T


def analyze_subspace(base: Checkpoint, a: Checkpoint, b: Checkpoint, *, rank: int | None = None,
                     energy: float | None = None, frozen_fraction: float | None = None,
                     importance: dict[int, float] | None = None, mrr: float = MRR, trr: float = TRR,
                     device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """Overlap of the task vectors ``a − base`` and ``b − base`` and their leakage into the base.

    Args:
        base: The common base checkpoint.
        a: First fine-tuned checkpoint.
        b: Second fine-tuned checkpoint.
        rank: k for every tensor; or
        energy: k per task vector = its energy rank at this share of Σσ² (default 0.9 when neither).
        frozen_fraction: Fixed-fraction rule for the base's frozen rank (default (mrr + trr)/2).
        importance: Per-block importance I(l) in [0, 1]; when given, the importance rule sets the
            frozen rank of tensors with a block index (others keep the fixed fraction).
        mrr, trr: Minimum and target retention ratios of the importance rule.
        device: Where the SVDs run.
        progress: Progress sink.

    Returns:
        ``tensors`` (per tensor: k_a, k_b, ``left``/``right`` overlap, frozen rank, ``leakage_a``/``b``),
        ``by_type``, ``by_depth``, ``suggested_frozen_ranks``, ``skipped``, ``non_finite``.

    Raises:
        UsageError: Conflicting or out-of-range parameters.
        IncompatibleCheckpointsError: The three checkpoints share no 2-D tensor of one shape.
    """
    if rank is None and energy is None:
        energy = 0.9
    if frozen_fraction is None:
        frozen_fraction = (mrr + trr) / 2
    check_options(rank, energy, frozen_fraction, mrr, trr)
    names, skipped = shared_matrices(base, {"A": a, "B": b})
    if not names:
        raise IncompatibleCheckpointsError(
            f"{a.label} and {b.label} share no 2-D tensor of the same shape with base {base.label}: "
            "both must be fine-tunes of that base.", path=base.label)
    rows: list[dict[str, Any]] = []
    for name in track(names, "subspace", progress):
        m, n = base.info(name).shape
        ident = tensor_identity(name)
        w0 = base.get(name, dtype=torch.float32, device=device)
        ta = a.get(name, dtype=torch.float32, device=device) - w0
        tb = b.get(name, dtype=torch.float32, device=device) - w0
        row: dict[str, Any] = {"name": name, "shape": [m, n], **ident}
        bad = [lbl for lbl, t in (("base", w0), ("A", ta), ("B", tb)) if not is_finite(t)]
        if importance is not None and ident["depth"] is not None and ident["depth"] in importance:
            frac, rule = importance_fraction(importance[ident["depth"]], mrr, trr), "importance"
        else:
            frac, rule = frozen_fraction, "fixed_fraction"
        r = frozen_rank(m, n, frac)
        row.update({"frozen_rank": r, "frozen_fraction": frac, "frozen_rule": rule})
        rows.append(row)
        if bad:
            row.update({"finite": False, "non_finite_in": bad, "k_a": None, "k_b": None, "left": None,
                        "right": None, "leakage_a": None, "leakage_b": None,
                        "overlap_left": None, "overlap_right": None})
            continue
        ua, sa, va = _svd(ta)
        ub, sb, vb = _svd(tb)
        if rank is not None:
            ka = kb = min(rank, min(m, n))
        else:
            ka, kb = energy_rank(sa, energy), energy_rank(sb, energy)
        left = subspace_overlap(ua[:, :ka], ub[:, :kb])
        right = subspace_overlap(va[:, :ka], vb[:, :kb])
        u0, _, v0 = _svd(w0)
        la = leakage(ta, u0[:, :r], v0[:, :r])
        lb = leakage(tb, u0[:, :r], v0[:, :r])
        row.update({"finite": True, "k_a": ka, "k_b": kb, "left": left, "right": right,
                    "leakage_a": la, "leakage_b": lb,
                    "overlap_left": left["mean_cos2"], "overlap_right": right["mean_cos2"]})
        del w0, ta, tb, ua, ub, va, vb, u0, v0
    flat = [{**r, "leakage_a": (r["leakage_a"] or {}).get("total"), "leakage_b": (r["leakage_b"] or {}).get("total")}
            for r in rows]
    return {
        "base": base.label, "a": a.label, "b": b.label,
        "rank": rank, "energy": energy if rank is None else None,
        "frozen_rule": "importance" if importance is not None else "fixed_fraction",
        "frozen_fraction": frozen_fraction, "mrr": mrr, "trr": trr,
        "importance": {str(k): v for k, v in sorted(importance.items())} if importance is not None else None,
        "tensors": rows,
        "by_type": summarize(flat, "sublayer", SUMMARY_FIELDS),
        "by_depth": summarize(flat, "depth", SUMMARY_FIELDS),
        "suggested_frozen_ranks": {r["name"]: r["frozen_rank"] for r in rows},
        "non_finite": [r["name"] for r in rows if not r["finite"]],
        "skipped": skipped,
    }


def block_importance(hidden_states: list[torch.Tensor], mask: torch.Tensor | None = None) -> dict[int, float]:
    """Per-block importance from the hidden states entering and leaving each block.

    ``hidden_states[l]`` is block l's input and ``hidden_states[l+1]`` its output (transformers'
    ``output_hidden_states``). The raw score is the mean cosine similarity of input and output over
    the (unmasked) tokens, as in Nayak et al. 2025 (after AdaSVD); scores are min-max normalised
    to [0, 1] over the blocks (all 0.5 when they are equal).
    """
    raw: dict[int, float] = {}
    for layer in range(len(hidden_states) - 1):
        x, y = hidden_states[layer].double(), hidden_states[layer + 1].double()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        if mask is not None:
            keep = mask.bool()
            cos = cos[keep]
        raw[layer] = float(cos.mean())
    lo, hi = min(raw.values()), max(raw.values())
    if not math.isfinite(hi - lo) or hi - lo <= 1e-12:
        return {k: 0.5 for k in raw}
    return {k: (v - lo) / (hi - lo) for k, v in raw.items()}


def importance_from_text(base: Checkpoint, text: str, *, max_tokens: int = 512,
                         device: str = "cpu") -> dict[int, float]:
    """Run the base model (transformers, built from ``base``'s tensors) on ``text`` and return
    :func:`block_importance`.

    This holds the whole model in memory: it is the only part of ``analyze`` that does.

    Raises:
        InputError: The checkpoint cannot be built as a transformers model or has no tokenizer.
    """
    from ..checkpoint.model import load_model, load_tokenizer
    from ..core.errors import InputError

    try:
        tok = load_tokenizer(base)
        model = load_model(base, head="base", device=device)
    except InputError as exc:
        why = str(exc).rstrip(".")
        raise InputError(f"cannot load {base.label} with transformers to compute activations for `text` ({why}); "
                         f"drop `text` to use the fixed-fraction rule.", path=exc.path, tensor=exc.tensor) from exc
    enc = tok(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    hs = [h[0] for h in out.hidden_states]
    mask = enc.get("attention_mask")
    return block_importance(hs, mask[0] if mask is not None else None)
