"""What the three analyses share: which tensors they look at, per-type / per-depth summaries."""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

from ..checkpoint.reader import Checkpoint, matrix_like
from ..checkpoint.roles import depth_of, sublayer_of
from ..core.errors import UsageError

# Order in which sublayer types are listed in summaries and plots.
TYPE_ORDER = ["embed", "pos_embed", "q", "k", "v", "qkv", "o", "gate", "up", "down", "lm_head", "other"]


def matrix_names(ckpt: Checkpoint) -> list[str]:
    """Names of the floating 2-D tensors (projection weights and embeddings), sorted."""
    return [n for n in ckpt.names if matrix_like(ckpt.info(n))]


def shared_matrices(ref: Checkpoint, others: dict[str, Checkpoint]) -> tuple[list[str], list[dict[str, Any]]]:
    """The matrices of ``ref`` that every checkpoint in ``others`` holds with the same shape.

    Args:
        ref: The checkpoint whose matrices are walked.
        others: Role -> checkpoint (``{"base": base}``, ``{"A": a, "B": b}``), named in reasons.

    Returns:
        (names, skipped): the shared names in order, and ``{"name", "reason"}`` for the rest
        (``not in base``, ``shapes differ: ref [m, n], base [p, q]``).
    """
    names, skipped = [], []
    for n in matrix_names(ref):
        shape = list(ref.info(n).shape)
        missing = [role for role, c in others.items() if n not in c]
        if missing:
            skipped.append({"name": n, "reason": "not in " + ", ".join(missing)})
            continue
        shapes = {role: list(c.info(n).shape) for role, c in others.items()}
        if any(s != shape for s in shapes.values()):
            listed = ", ".join(f"{role} {s}" for role, s in shapes.items())
            skipped.append({"name": n, "reason": f"shapes differ: {shape} here, {listed}"})
        else:
            names.append(n)
    return names, skipped


def tensor_identity(name: str) -> dict[str, Any]:
    """``sublayer`` (type, "other" when unknown) and ``depth`` (block index or None) of a name."""
    return {"sublayer": sublayer_of(name) or "other", "depth": depth_of(name)}


def type_rank(kind: str) -> int:
    return TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER)


def summarize(rows: Iterable[dict[str, Any]], key: str, fields: list[str]) -> dict[str, dict[str, Any]]:
    """Group ``rows`` by ``row[key]`` and give count, mean, min and max of each numeric field.

    Rows whose field is None (non-finite tensor, zero task vector) are left out of that field's
    statistics; ``count`` counts every row of the group.
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        k = r.get(key)
        if k is None:
            continue
        groups.setdefault(k, []).append(r)
    if key == "sublayer":
        order = sorted(groups, key=type_rank)
    else:
        order = sorted(groups)
    out: dict[str, dict[str, Any]] = {}
    for k in order:
        g = groups[k]
        entry: dict[str, Any] = {"count": len(g)}
        for f in fields:
            vals = [float(r[f]) for r in g if r.get(f) is not None and math.isfinite(float(r[f]))]
            entry[f] = ({"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else None)
        out[str(k)] = entry
    return out


def check_energy(energy: float) -> None:
    if not (0.0 < energy <= 1.0):
        raise UsageError(f"`energy` must be in (0, 1], got {energy}: it is the share of Σσ² to keep, e.g. 0.9.")


def check_top(top: int) -> None:
    if top < 0:
        raise UsageError(f"`top` must be 0 or more, got {top}.")
