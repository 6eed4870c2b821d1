"""Rendering: results on stdout (rich or one JSON document), progress and logs on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_QUIET = False


def set_quiet(value: bool) -> None:
    """``-q/--quiet``: no progress bars and no progress messages for the rest of this run."""
    global _QUIET
    _QUIET = bool(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _jsonable(obj.item())
        except Exception:
            pass
    if hasattr(obj, "__fspath__"):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def stdout_console():
    from rich.console import Console

    # Piped output is 240 columns wide unless COLUMNS says otherwise: tables stay whole for grep.
    width = None
    if not sys.stdout.isatty():
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) >= 20 else 240
    return Console(soft_wrap=True, width=width)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def emit(data: dict[str, Any], human: Callable[[Any], None], as_json: bool) -> None:
    """Print ``data`` as one JSON document (``--json``) or call ``human(console)``."""
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(data), indent=2) + "\n")
        sys.stdout.flush()
    else:
        human(stdout_console())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


class RichProgress:
    """A surgery.core.progress.Progress drawn with rich on stderr (hidden when not a terminal or quiet)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._progress = None
        self._task = None

    def start(self, total: int, description: str) -> None:
        if self.quiet:
            return
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.close()
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TimeRemainingColumn(), console=stderr_console(), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total or None)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def progress(quiet: bool = False) -> RichProgress:
    return RichProgress(quiet=quiet or _QUIET or not sys.stderr.isatty())


def log(message: str) -> None:
    """One line of information on stderr (hidden by ``-q``)."""
    if not _QUIET:
        stderr_console().print(message, highlight=False)


@dataclass(frozen=True)
class Col:
    """A table column. ``key`` marks the name column, which is never cut; when the console is
    too narrow, columns with the highest ``drop`` go first (0: always shown), and ``wrap``
    columns (free text) wrap between words before the name column gives up any room."""

    header: str
    justify: str = "right"
    key: bool = False
    drop: int = 0
    wrap: bool = False


def _is_plain(cell: str) -> bool:
    """Text rich prints as written, one terminal cell per character: no markup (``[``), no
    emoji codes (``:``), no control or wide characters, no edge whitespace."""
    if not (cell.isprintable() and "[" not in cell and ":" not in cell and cell == cell.strip()):
        return False
    if cell.isascii():
        return True
    from rich.cells import cell_len

    return cell_len(cell) == len(cell)


def _cell_len(cell: str, words: bool = False) -> int:
    if _is_plain(cell):
        return max(map(len, cell.split()), default=0) if words else len(cell)
    from rich.text import Text

    plain = Text.from_markup(cell).plain
    parts = plain.split() if words else plain.split("\n")
    return max((Text(p).cell_len for p in parts), default=0)


def print_table(console: Any, columns: Sequence[Col], rows: Sequence[Sequence[str]], title: str | None = None) -> None:
    """Print :func:`fit_table`'s table, then name the columns it left out (wrapped to the console).

    A table of plain text at its natural width on a console without styles (piped output) is
    written directly, as rich would draw it: rich takes ~1 ms per row to lay out a table, a
    quarter of a second for SmolLM2's tensor list in `surgery inspect`."""
    from rich.text import Text

    cells = [[str(c) for c in r] for r in rows]
    keep, dropped, width = _fit(console, columns, cells)
    text = None if width is not None else _plain_table(console, [columns[i] for i in keep],
                                                        [[r[i] for i in keep] for r in cells], title)
    if text is None:
        console.print(_rich_table(columns, cells, title, keep, width))
    else:
        console.file.write(text)
    if dropped:
        console.print(Text(f"not shown at this width: {', '.join(dropped)} (--json has every column)", style="dim"),
                      soft_wrap=False)


def _plain_table(console: Any, columns: Sequence[Col], rows: Sequence[Sequence[str]], title: str | None) -> str | None:
    """rich's drawing of a natural-width table (default box, one space of padding, title on its
    own line as a soft-wrapping console prints it), or None when rich must draw it: styles
    (a terminal), a non-UTF-8 or legacy Windows console, markup, or other than left/right cells."""
    if (console.color_system is not None or getattr(console, "legacy_windows", False) or console.record
            or not str(console.encoding).lower().startswith("utf") or not rows
            or any(c.justify not in ("left", "right") for c in columns)):
        return None
    texts = [c.header for c in columns] + [title or "x"] + [cell for r in rows for cell in r]
    if not all(map(_is_plain, texts)):
        return None
    width = [max(len(c.header), max(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str], left: str, mid: str, right: str) -> str:
        return left + mid.join(f" {t.ljust(w) if c.key or c.justify == 'left' else t.rjust(w)} "
                               for t, w, c in zip(cells, width, columns)) + right

    out = [title] if title else []
    out.append("┏" + "┳".join("━" * (w + 2) for w in width) + "┓")
    out.append(line([c.header for c in columns], "┃", "┃", "┃"))
    out.append("┡" + "╇".join("━" * (w + 2) for w in width) + "┩")
    out += [line(r, "│", "│", "│") for r in rows]
    out.append("└" + "┴".join("─" * (w + 2) for w in width) + "┘")
    return "\n".join(out) + "\n"


def fit_table(console: Any, columns: Sequence[Col], rows: Sequence[Sequence[str]],
              title: str | None = None) -> tuple[Any, list[str]]:
    """A rich Table that fits ``console.width`` and the headers of the columns it leaves out.

    Tensor names stay whole (they fold onto a second line only when nothing else can give
    room, never turn into ``model…``); the columns with the highest ``drop`` are left out
    first, headers and ``wrap`` columns wrap."""
    cells = [[str(c) for c in r] for r in rows]
    keep, dropped, width = _fit(console, columns, cells)
    return _rich_table(columns, cells, title, keep, width), dropped


def _fit(console: Any, columns: Sequence[Col], rows: Sequence[Sequence[str]]) -> tuple[list[int], list[str],
                                                                                        dict[int, int] | None]:
    """The columns kept, the headers left out, and the kept columns' widths (None: natural)."""
    cells = [max((_cell_len(r[i]) for r in rows), default=0) for i in range(len(columns))]
    natural = [max(len(c.header), cells[i]) for i, c in enumerate(columns)]
    # A column can shrink to its longest cell (longest word for wrap columns) and its header's
    # longest word (headers wrap).
    least = [max([min(natural[i], max(16, max((_cell_len(r[i], words=True) for r in rows), default=0)))
                  if c.wrap else cells[i]] + [len(w) for w in c.header.split()]) for i, c in enumerate(columns)]
    key = [i for i, c in enumerate(columns) if c.key]
    keep = list(range(len(columns)))

    def needed(idx: list[int], sizes: list[int]) -> int:  # rich's default box: a border and a space either side
        return sum(natural[i] if i in key else sizes[i] for i in idx) + 3 * len(idx) + 1

    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop):
        if needed(keep, least) <= console.width:
            break
        keep.remove(i)
    dropped = [columns[i].header for i in range(len(columns)) if i not in keep]
    if needed(keep, natural) <= console.width:
        return keep, dropped, None
    # explicit widths: rich's own shrinking would split numbers before it wraps headers
    width = {i: least[i] for i in keep}
    for i in key:
        room = console.width - needed([j for j in keep if j != i], least) - 3
        width[i] = max(12, min(natural[i], room))
    spare = console.width - sum(width.values()) - 3 * len(keep) - 1
    for i in keep:
        grow = min(max(spare, 0), natural[i] - width[i])
        width[i] += grow
        spare -= grow
    return keep, dropped, width


def _rich_table(columns: Sequence[Col], rows: Sequence[Sequence[str]], title: str | None, keep: list[int],
                width: dict[int, int] | None) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for i in keep:
        c = columns[i]
        if width is None:
            table.add_column(c.header, justify="left" if c.key else c.justify, no_wrap=c.key)
        else:
            table.add_column(c.header, justify="left" if c.key else c.justify, width=width[i], overflow="fold")
    for r in rows:
        table.add_row(*(str(r[i]) for i in keep))
    return table
