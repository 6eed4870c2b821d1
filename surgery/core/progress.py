"""How long library calls report progress without printing anything themselves."""

from __future__ import annotations

from typing import Protocol


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
