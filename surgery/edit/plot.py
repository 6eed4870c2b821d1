"""Perplexity against edit index for ``edit apply --plot`` (matplotlib, an optional extra; see
:mod:`surgery.core.figures`). The command layer calls it after the run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from ..core.figures import new_figure, save_figure


def plot_perplexity(report: dict[str, Any], path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Draw the checks of an ``edit apply`` report: perplexity after each checked edit, the
    baseline, the collapse threshold, and collapsed checks in red.

    Raises:
        UsageError: matplotlib is not installed.
    """
    checks = report["checks"]
    base = report["baseline_perplexity"]
    xs = [0 if c["after_edit"] is None else c["after_edit"] + 1 for c in checks]
    ys = [c["perplexity"] if c["perplexity"] is not None and math.isfinite(c["perplexity"]) else float("nan")
          for c in checks]
    fig, axes = new_figure(1, 1, (7, 4))
    ax = axes[0][0]
    ax.plot(xs, ys, marker="o", color="tab:blue", label=report.get("metric", "perplexity"))
    bad = [(x, y) for x, y, c in zip(xs, ys, checks) if c["collapsed"]]
    if bad:
        ax.scatter([b[0] for b in bad], [b[1] for b in bad], color="tab:red", zorder=3, label="collapsed")
    ax.axhline(base, color="gray", linestyle=":", label="baseline")
    ax.axhline(base * report["thresholds"]["max_ppl_ratio"], color="tab:red", linestyle="--",
               label=f"collapse threshold (x{report['thresholds']['max_ppl_ratio']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("edits processed (0 = baseline)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"edit apply on {report['base']}", fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path, dpi=100, inputs=inputs)
