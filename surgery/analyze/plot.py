"""Figures for ``analyze spectrum`` and ``analyze gain`` (matplotlib, an optional extra; see
:mod:`surgery.core.figures`). The command layer calls them after the analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..core.figures import check_plot_path, new_figure, require_matplotlib, save_figure
from .common import TYPE_ORDER, type_rank

def _colors(kinds: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(kinds) <= 10 else colormaps["tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["sublayer"] for r in rows}, key=type_rank)


def _grouped_bars(ax, rows: list[dict[str, Any]], field: str, kinds: list[str], colors: dict[str, Any],
                  ylabel: str, log: bool = False) -> None:
    """Bars per block (x) and sublayer type (colour); tensors without a block are placed at x = -1."""
    layered = [r for r in rows if r.get(field) is not None]
    if not layered:
        ax.set_visible(False)
        return
    xs = sorted({(r["depth"] if r["depth"] is not None else -1) for r in layered})
    pos = {x: i for i, x in enumerate(xs)}
    width = 0.8 / max(1, len(kinds))
    for j, k in enumerate(kinds):
        sel = [r for r in layered if r["sublayer"] == k]
        if not sel:
            continue
        ax.bar([pos[r["depth"] if r["depth"] is not None else -1] - 0.4 + (j + 0.5) * width for r in sel],
               [float(r[field]) for r in sel], width=width, color=colors[k], label=k)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(["—" if x == -1 else str(x) for x in xs], fontsize=7 if len(xs) > 16 else 9)
    ax.set_xlabel("block (— = outside the blocks)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def plot_spectrum(report: dict[str, Any], path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Four panels: normalised singular-value curves per tensor (coloured by type); stable rank,
    effective rank / min(m, n) and σ_max per block and type."""
    path = check_plot_path(path, inputs)
    rows = [r for r in report["tensors"] if r["finite"]]
    spectra = report.get("spectra", {})
    kinds = _kinds(rows)
    colors = _colors(kinds)
    fig, axes = new_figure(2, 2, (14, 9))
    ax = axes[0][0]
    seen: set[str] = set()
    for r in rows:
        s = spectra.get(r["name"])
        if not s or s[0] <= 0:
            continue
        n = len(s)
        xs = [(i + 0.5) / n for i in range(n)]
        ys = [max(v / s[0], 1e-12) for v in s]
        label = r["sublayer"] if r["sublayer"] not in seen else None
        seen.add(r["sublayer"])
        ax.plot(xs, ys, color=colors[r["sublayer"]], alpha=0.6, linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index / min(m, n)")
    ax.set_ylabel("σ_i / σ_max")
    ax.set_title("singular-value curves")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, ncol=2)
    _grouped_bars(axes[0][1], rows, "stable_rank", kinds, colors, "stable rank ‖W‖²_F/σ²_max")
    axes[0][1].set_title("stable rank")
    _grouped_bars(axes[1][0], rows, "effective_rank_ratio", kinds, colors, "effective rank / min(m, n)")
    axes[1][0].set_title("effective rank (share of full)")
    _grouped_bars(axes[1][1], rows, "sigma_max", kinds, colors, "σ_max", log=True)
    axes[1][1].set_title("top singular value")
    axes[1][1].legend(fontsize=8, ncol=2)
    what = "task vector vs " + str(report["base"]) if report.get("base") else "weights"
    fig.suptitle(f"spectrum of {report['checkpoint']} ({what})")
    return save_figure(fig, path, inputs=inputs)


def plot_gain(report: dict[str, Any], path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """σ_max and gain σ_max/RMS per block and type; with a proxy, the σ_max ratio per pair and the
    tolerance band."""
    path = check_plot_path(path, inputs)
    rows = [r for r in report["tensors"] if r["finite"]]
    kinds = _kinds(rows)
    colors = _colors(kinds)
    with_pairs = "pairs" in report
    fig, axes = new_figure(3 if with_pairs else 2, 1, (13, 11 if with_pairs else 8))
    _grouped_bars(axes[0][0], rows, "sigma_max", kinds, colors, "σ_max", log=True)
    axes[0][0].set_title(f"top singular value of {report['checkpoint']}")
    axes[0][0].legend(fontsize=8, ncol=len(kinds))
    _grouped_bars(axes[1][0], rows, "gain", kinds, colors, "σ_max / RMS")
    axes[1][0].set_title("gain σ_max / (‖W‖_F/√(mn))")
    if with_pairs:
        ax = axes[2][0]
        prs = [p for p in report["pairs"] if p["ratio"] is not None]
        _grouped_bars(ax, prs, "ratio", kinds, colors, "σ_max target / proxy")
        lo, hi = report["bounds"]
        w = report["widths"]
        expected = 1.0
        if w.get("target") and w.get("proxy"):
            expected = (w["target"] / w["proxy"]) ** report["expect_exponent"]
        ax.axhspan(lo * expected, hi * expected, color="green", alpha=0.12, label="tolerance")
        ax.axhline(expected, color="green", linewidth=1)
        ax.set_title(f"σ_max ratio vs proxy {report['proxy']} (d {w.get('target')} vs {w.get('proxy')})")
        ax.legend(fontsize=8, ncol=len(kinds) + 1, loc="lower right")
    return save_figure(fig, path, inputs=inputs)


__all__ = ["plot_spectrum", "plot_gain", "check_plot_path", "require_matplotlib", "TYPE_ORDER"]
