"""`surgery push`: upload a checkpoint folder to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _common
from ._params import JsonOpt, QuietOpt, add_examples

EXAMPLES = [
    "surgery push out/merged my-org/merged-model --private  # needs the Hub",
    "surgery push out/merged my-org/merged-model --revision experiment-1 -m 'try 1'  # needs the Hub",
    "surgery push out/merged my-org/merged-model --create-pr --exclude README.md  # needs the Hub",
]


def push(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Checkpoint folder to upload.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repository id, org/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", metavar="BRANCH", help="Branch to commit to (created if needed); with --create-pr, the branch the pull request targets.")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", metavar="TEXT", help="Commit message.")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", metavar="GLOB", help="Upload only files matching (repeatable).", show_default=False)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", metavar="GLOB", help="Leave out files matching (repeatable).", show_default=False)] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a checkpoint folder to a Hub model repository in one commit (creates the repository if needed)."""
    from surgery.checkpoint import open_checkpoint
    from surgery.checkpoint.hub import push as run

    open_checkpoint(str(folder))  # refuse to upload something that is not a valid checkpoint
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    url = run(folder, repo_id, private=private, revision=revision, commit_message=message, include=include,
              exclude=exclude, create_pr=create_pr)
    from surgery.core.result import Result

    what = "opened a pull request on" if create_pr else "pushed to"
    _common.finish(Result({"repo_id": repo_id, "revision": revision, "create_pr": create_pr, "commit_url": url}),
                   as_json=as_json, human=lambda c, doc: c.print(f"{what} {repo_id} from {folder}: {url}"))


add_examples(push, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("push")(push)
