"""Figures (``--plot``) for any operation: matplotlib is an optional extra, drawn with its
object API on an Agg canvas so nothing global (the pyplot backend, open windows) changes in
the caller's process, and saved atomically like every other output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .errors import UsageError
from .output import atomic_file, check_output

SUFFIXES = {".png", ".pdf", ".svg", ".jpg", ".jpeg"}


def new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib Figure on an Agg canvas and its ``rows`` × ``cols`` axes (always 2-D).

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError("`plot` needs matplotlib, which is not installed: pip install 'surgery[plot]' "
                         "(or pip install matplotlib), or drop `plot`.") from exc
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def require_matplotlib() -> None:
    """Raise the `plot` UsageError now when matplotlib is missing (before any long computation)."""
    new_figure(1, 1, (1, 1))


def check_plot_path(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse a plot path whose format matplotlib would not write, or that is, contains or lies
    inside an input (the output policy of every write; a missing folder is created on saving,
    as for every output)."""
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise UsageError(f"`plot` {p}: use a .png, .pdf or .svg file name.")
    check_output(p, force=True, inputs=list(inputs), kind="file")
    return p


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120, inputs: Iterable[str | Path] = ()) -> Path:
    """Write ``fig`` to ``path`` atomically (an existing figure is replaced; an input never is)."""
    out = Path(path)
    with atomic_file(out, force=True, inputs=list(inputs)) as tmp:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lstrip(".").lower() or "png")
    return out
