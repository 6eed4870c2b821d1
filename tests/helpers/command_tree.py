"""The app's commands, walked once for the tests that check every command the same way."""

from __future__ import annotations

from typing import Any


def leaf_commands() -> dict[str, Any]:
    """``{"edit apply": <click command>, ...}`` for every runnable command, in registration order."""
    import typer

    from surgery.commands.app import app

    def walk(cmd: Any, path: list[str]):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), cmd

    return dict(walk(typer.main.get_command(app), []))
