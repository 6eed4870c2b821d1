"""`surgery push`: upload a checkpoint folder to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import JsonOpt

EXAMPLES = ["surgery push out/merged my-org/merged-model --private"]


def push(
    folder: Annotated[Path, typer.Argument(help="Checkpoint folder to upload.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository id, org/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if needed).")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a checkpoint folder to a Hub model repository in one commit (creates the repository if needed)."""
    from surgery.checkpoint import open_checkpoint
    from surgery.checkpoint.hub import push as run

    open_checkpoint(str(folder))  # refuse to upload something that is not a valid checkpoint
    url = run(folder, repo_id, private=private, revision=revision, commit_message=message)
    from surgery.core.result import Result

    _common.finish(Result({"repo_id": repo_id, "revision": revision, "commit_url": url}), as_json=as_json,
                   human=lambda c, doc: c.print(f"pushed {folder} to {repo_id}: {url}"))


push.__doc__ += "\n\nExamples:\n\n" + "\n\n".join(f"  {e}" for e in EXAMPLES)  # type: ignore[operator]


def register(app: typer.Typer) -> None:
    app.command("push")(push)
