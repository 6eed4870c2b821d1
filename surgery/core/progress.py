"""How long library calls report progress without printing anything themselves."""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    """Receives progress of one long task; the command layer renders it on stderr."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """A Progress that shows nothing (the library default)."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def ensure(progress: Progress | None) -> Progress:
    """Return ``progress`` or a NullProgress when it is None."""
    return progress if progress is not None else NullProgress()


def track(items: Iterable[T], description: str, progress: Progress | None = None, *,
          total: int | None = None) -> Iterator[T]:
    """Yield ``items`` one by one with ``progress`` started before the first, advanced after
    each (a ``continue`` in the caller's loop counts too) and closed when the loop ends,
    breaks or raises.

    The one loop every read-side analysis uses::

        for name in track(names, "spectrum", progress):
            w = ckpt.get(name)
            ...

    Args:
        items: What to walk (usually tensor names); ``len(items)`` is the progress total
            unless ``total`` is given.
        description: The label the command layer shows next to the bar.
        progress: The sink (None shows nothing).
        total: The progress total when ``items`` has no length (a generator).
    """
    progress = ensure(progress)
    progress.start(len(items) if total is None else total, description)  # type: ignore[arg-type]
    try:
        for item in items:
            yield item
            progress.advance()
    finally:
        progress.close()
