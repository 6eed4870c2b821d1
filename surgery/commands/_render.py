"""Rendering: results on stdout (rich or one JSON document), progress and logs on stderr."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable


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

    # Piped output is not cut to 80 columns: long tensor names stay whole for grep.
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)


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
    return RichProgress(quiet=quiet or not sys.stderr.isatty())


def log(message: str) -> None:
    """One line of information on stderr."""
    stderr_console().print(message, highlight=False)
