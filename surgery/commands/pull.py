"""`surgery pull`: download a Hub checkpoint's safetensors, config and tokenizer files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import ForceOpt, JsonOpt, QuietOpt, add_examples

EXAMPLES = [
    "surgery pull HuggingFaceTB/SmolLM2-135M-Instruct              # into the HF cache  # needs the Hub",
    "surgery pull HuggingFaceTB/SmolLM2-135M-Instruct@main -o smol  # and a folder  # needs the Hub",
    "surgery pull my-org/model --include '*.json'                   # only the configs  # needs the Hub",
]


def pull(
    repo: Annotated[str, typer.Argument(metavar="ORG/NAME[@REV]", help="Hub repository id, with an optional @revision.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also copy the files into this folder (refused if it exists, unless --force).", show_default=False)] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit (overrides @REV).", show_default=False)] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", metavar="GLOB", help="Only files matching (repeatable). Default: safetensors, index, config, generation and tokenizer files.", show_default=False)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", metavar="GLOB", help="Skip files matching (repeatable).", show_default=False)] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a checkpoint's safetensors, config, tokenizer and generation files from the Hub (never pickles)."""
    from surgery.pull import pull as run

    result = run(repo, output, revision=revision, include=include, exclude=exclude, force=force,
                 progress=_render.progress(quiet))

    def human(console, doc) -> None:
        console.print(f"{doc['repo_id']} @ {doc['revision']}: {len(doc['files'])} file(s), "
                      f"{_render.fmt_bytes(doc['total_bytes'])}")
        for f in doc["files"]:
            console.print(f"  {f['name']}  {_render.fmt_bytes(f['bytes'])}")
        console.print(f"cache: {doc['snapshot']}")
        if doc.get("output"):
            console.print(f"[bold green]wrote[/] {doc['output']}")

    _common.finish(result, as_json=as_json, human=human)


add_examples(pull, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
