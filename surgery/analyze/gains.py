"""Top-singular-value gain diagnostics, and their comparison across widths.

Per matrix: σ_max, RMS = ‖W‖_F/√(mn) and the gain σ_max/RMS. For a target and a narrower proxy
checkpoint, tensors are paired by name and relative depth; the ratio σ_max^target/σ_max^proxy and
the implied width exponent log(ratio)/log(d_t/d_p) check sublayer-gain invariance across widths
("Robust Layerwise Scaling Rules by Proper Weight Decay Tuning", https://arxiv.org/abs/2510.15262:
in steady state σ_max ∝ √(η/λ)·d^0.75, so with λ ∝ √d and η ∝ 1/d the gains stay width invariant).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.roles import depth_of, with_depth
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..core.executor import map_items
from ..core.progress import Progress
from .common import matrix_names, summarize, tensor_identity
from .linalg import is_finite, nonfinite_counts, sigma_max

WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "width")
SUMMARY_FIELDS = ["sigma_max", "rms", "gain"]
PAIR_FIELDS = ["ratio", "exponent"]


def matrix_gain(w: torch.Tensor, *, exact: bool = False) -> dict[str, Any]:
    """σ_max, RMS ‖W‖_F/√(mn) and gain σ_max/RMS of one 2-D tensor (None for NaN/Inf tensors)."""
    if not is_finite(w):
        return {"finite": False, "nonfinite": nonfinite_counts(w), "sigma_max": None, "frobenius": None,
                "rms": None, "gain": None}
    m, n = w.shape
    s = sigma_max(w, exact=exact)
    # Row norms in float32 (short sums, ~1e-7 relative), combined in float64: as accurate as a float64
    # norm without a float64 copy of the matrix (226 MB for SmolLM2's embedding).
    fro = float(torch.linalg.vector_norm(torch.linalg.vector_norm(w, dim=1).double()))
    rms = fro / math.sqrt(m * n)
    return {"finite": True, "sigma_max": s, "frobenius": fro, "rms": rms, "gain": s / rms if rms > 0 else None}


def model_width(ckpt: Checkpoint) -> int | None:
    """The model width d: config.json's hidden size, else the embedding's second dimension."""
    cfg = ckpt.config or {}
    for key in WIDTH_KEYS:
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    text = cfg.get("text_config")
    if isinstance(text, dict):
        for key in WIDTH_KEYS:
            v = text.get(key)
            if isinstance(v, int) and v > 0:
                return v
    for name in matrix_names(ckpt):
        if tensor_identity(name)["sublayer"] == "embed":
            return int(ckpt.info(name).shape[1])
    return None


def num_blocks(names: list[str]) -> int:
    """Number of blocks: 1 + the largest block index in the names (0 when none has one)."""
    depths = [d for d in (depth_of(n) for n in names) if d is not None]
    return max(depths) + 1 if depths else 0


def proxy_depth(depth: int, target_blocks: int, proxy_blocks: int) -> int:
    """Block of the proxy at the same relative depth: round(l·(L_p − 1)/(L_t − 1))."""
    if target_blocks <= 1 or proxy_blocks <= 1:
        return 0
    return int(round(depth * (proxy_blocks - 1) / (target_blocks - 1)))


def pair_tensors(target: Checkpoint, proxy: Checkpoint) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Pair target and proxy matrices by name and relative depth.

    A name without a block index pairs with the same name; ``...layers.l...`` pairs with the proxy
    tensor of the same name at block ``proxy_depth(l)``. Returns (pairs, unpaired target names,
    proxy names used by no pair).
    """
    t_names, p_names = matrix_names(target), matrix_names(proxy)
    p_set = set(p_names)
    lt, lp = num_blocks(t_names), num_blocks(p_names)
    pairs, unpaired = [], []
    for name in t_names:
        d = depth_of(name)
        cand = name if d is None else with_depth(name, proxy_depth(d, lt, lp))
        if cand in p_set:
            pairs.append((name, cand))
        else:
            unpaired.append(name)
    used = {p for _, p in pairs}
    return pairs, unpaired, [p for p in p_names if p not in used]


def _drift_bounds(tolerance: float) -> tuple[float, float]:
    # Symmetric in log space, so swapping target and proxy gives the same verdict.
    return 1.0 / (1.0 + tolerance), 1.0 + tolerance


def _gain_rows(ckpt: Checkpoint, vs: Checkpoint | None, proxy_of: dict[str, str], exact: bool, device: str,
               name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One matrix's row, and its proxy's gain when it pairs with one; reads its own inputs."""
    info = ckpt.info(name)
    w = ckpt.get(name, dtype=torch.float32, device=device)
    row = {"name": name, "shape": list(info.shape), **tensor_identity(name), **matrix_gain(w, exact=exact)}
    del w
    pname = proxy_of.get(name)
    if pname is None or vs is None:
        return row, None
    return row, matrix_gain(vs.get(pname, dtype=torch.float32, device=device), exact=exact)


def analyze_gain(ckpt: Checkpoint, *, vs: Checkpoint | None = None, tolerance: float = 0.1,
                 expect_exponent: float = 0.0, ignore_types: tuple[str, ...] | list[str] = (), exact: bool = False,
                 device: str = "cpu", progress: Progress | None = None, executor: Any = None) -> dict[str, Any]:
    """σ_max, RMS and gain of every matrix; with ``vs``, ratios against a proxy of another width.

    Args:
        ckpt: The (target) checkpoint.
        vs: Optional proxy checkpoint (usually narrower), paired by name and relative depth.
        tolerance: A pair drifts when ratio / (d_t/d_p)^expect_exponent leaves [1/(1+T), 1+T].
        expect_exponent: The width exponent the ratio should follow; 0 = width-invariant gains.
        ignore_types: Sublayer types reported but left out of the drift verdict (e.g. ``embed``,
            whose vocabulary dimension does not grow with the width).
        exact: Full SVD instead of Lanczos for σ_max.
        device: Where the math runs.
        progress: Progress sink.
        executor: Where the per-tensor work runs (:mod:`surgery.core.executor`; None: here).

    Returns:
        ``tensors`` (per matrix of ``ckpt``), ``by_type``, ``by_depth``, ``non_finite``; with ``vs``
        also ``pairs``, ``pairs_by_type``, ``drifted``, ``passed``, ``widths``, ``unpaired``.

    Raises:
        UsageError: tolerance not positive.
        IncompatibleCheckpointsError: ``vs`` given but no tensor pairs up.
    """
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise UsageError(f"`tolerance` must be a positive number, got {tolerance}.")
    names = matrix_names(ckpt)
    pairs: list[tuple[str, str]] = []
    unpaired: list[str] = []
    proxy_unused: list[str] = []
    if vs is not None:
        pairs, unpaired, proxy_unused = pair_tensors(ckpt, vs)
        if not pairs:
            raise IncompatibleCheckpointsError(
                f"no 2-D tensor of {ckpt.label} pairs with one of {vs.label} by name and relative depth: "
                "`vs` needs a proxy of the same architecture family.", path=vs.label)
    proxy_of = dict(pairs)
    d_t = model_width(ckpt)
    d_p = model_width(vs) if vs is not None else None
    lo, hi = _drift_bounds(tolerance)
    weights = [ckpt.info(n).nbytes + (vs.info(proxy_of[n]).nbytes if n in proxy_of else 0)  # type: ignore[union-attr]
               for n in names]
    results = map_items(functools.partial(_gain_rows, ckpt, vs, proxy_of, exact, device), names, "gain", progress,
                        executor=executor, weights=weights)
    rows = [row for row, _ in results]
    pair_rows = [_pair_row(row, proxy_of[row["name"]], list(vs.info(proxy_of[row["name"]]).shape),  # type: ignore[union-attr]
                           prow, d_t, d_p, expect_exponent, lo, hi) for row, prow in results if prow is not None]
    report: dict[str, Any] = {
        "checkpoint": ckpt.label,
        "method": "svd" if exact else "lanczos",
        "tensors": rows,
        "by_type": summarize(rows, "sublayer", SUMMARY_FIELDS),
        "by_depth": summarize(rows, "depth", SUMMARY_FIELDS),
        "non_finite": [r["name"] for r in rows if not r["finite"]],
    }
    if vs is not None:
        ignored = set(ignore_types)
        for p in pair_rows:
            p["judged"] = p["sublayer"] not in ignored
        drifted = [p for p in pair_rows if p["judged"] and not p["within_tolerance"]]
        report.update({
            "proxy": vs.label,
            "widths": {"target": d_t, "proxy": d_p},
            "tolerance": tolerance, "expect_exponent": expect_exponent, "ignore_types": sorted(ignored),
            "bounds": [lo, hi],
            "pairs": pair_rows,
            "pairs_by_type": summarize(pair_rows, "sublayer", PAIR_FIELDS),
            "pairs_by_depth": summarize(pair_rows, "depth", PAIR_FIELDS),
            "drifted": [p["name"] for p in drifted],
            "within_tolerance": not drifted,
            "unpaired": unpaired,
            "proxy_unused": proxy_unused,
        })
    return report


def _pair_row(trow: dict[str, Any], pname: str, pshape: list[int], prow: dict[str, Any], d_t: int | None,
              d_p: int | None, expect_exponent: float, lo: float, hi: float) -> dict[str, Any]:
    out: dict[str, Any] = {"name": trow["name"], "proxy_name": pname, "shape": trow["shape"], "proxy_shape": pshape,
                           "sublayer": trow["sublayer"], "depth": trow["depth"],
                           "sigma_max": trow["sigma_max"], "proxy_sigma_max": prow["sigma_max"],
                           "ratio": None, "exponent": None, "normalized_ratio": None}
    if not (trow["finite"] and prow["finite"]):
        out.update({"within_tolerance": False, "reason": "non-finite " + ("target" if not trow["finite"] else "proxy")})
        return out
    st, sp = trow["sigma_max"], prow["sigma_max"]
    if sp == 0.0 or st == 0.0:
        out.update({"within_tolerance": st == sp, "reason": "zero matrix"})
        return out
    ratio = st / sp
    width_ratio = (d_t / d_p) if d_t and d_p else None
    exponent = math.log(ratio) / math.log(width_ratio) if width_ratio and width_ratio != 1.0 else None
    expected = width_ratio ** expect_exponent if width_ratio else 1.0
    norm = ratio / expected
    ok = lo <= norm <= hi
    out.update({"ratio": ratio, "exponent": exponent, "normalized_ratio": norm, "within_tolerance": ok,
                "reason": None if ok else f"ratio {ratio:.4g} outside [{lo * expected:.4g}, {hi * expected:.4g}]"})
    return out
