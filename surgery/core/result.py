"""The one result shape every operation's entry point returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine imports torch; a read-only command's Result must not
    from .engine import WriteResult


@dataclass
class Result:
    """What an operation did.

    Attributes:
        report: JSON-able facts about the run (what the command prints, and ``--json``).
        written: The checkpoint or file written, or None (read-only operations, or nothing
            was written).
        passed: False when a check or policy failed (the command exits 1); ``written`` may
            still be set (``edit apply`` writes the last good state before it stops).
    """

    report: dict[str, Any]
    written: WriteResult | None = None
    passed: bool = True
