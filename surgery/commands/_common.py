"""The one way every command finishes: push if asked, render (human or one JSON document),
exit 1 when a check failed. Imported lazily by the command modules."""

from __future__ import annotations

from typing import Any, Callable

from . import _render


def push_if_asked(output: Any, repo_id: str | None, private: bool = False) -> str | None:
    """Upload ``output`` when ``--push-to-hub`` was given; returns the commit URL."""
    if not repo_id:
        return None
    from surgery.checkpoint.hub import push
    from surgery.core.errors import HubError

    _render.log(f"pushing {output} to {repo_id} ...")
    try:
        return push(output, repo_id, private=private)
    except HubError as exc:  # the local write succeeded: say so, and how to retry the upload alone
        raise HubError(f"wrote {output}, but {exc.message.rstrip('.')}; the output is on disk: push it again with "
                       f"`surgery push {output} {repo_id}{' --private' if private else ''}`.",
                       path=output) from exc


def written_summary(written: Any, pushed: str | None = None) -> dict[str, Any]:
    """The facts every writing command reports about its output."""
    doc = {
        "output": str(written.output),
        "files": [str(f.name) for f in written.files],
        "num_tensors": written.num_tensors,
        "total_bytes": written.total_bytes,
        "pushed": pushed,
        "record": written.record,
    }
    if getattr(written, "execution", None):      # --ray: work units, units resumed, units per node
        doc["execution"] = written.execution
    return doc


def print_written(console: Any, doc: dict[str, Any]) -> None:
    console.print(f"[bold green]wrote[/] {doc['output']}: {doc['num_tensors']} tensors, "
                  f"{_render.fmt_bytes(doc['total_bytes'])} in {len(doc['files'])} file(s)")
    ex = doc.get("execution")
    if ex:
        resumed = f", {ex['resumed_units']} kept from the interrupted run" if ex["resumed_units"] else ""
        console.print(f"computed as {ex['units']} Ray work unit(s) on {len(ex['nodes'])} node(s){resumed}")
    if doc.get("pushed"):
        console.print(f"pushed: {doc['pushed']}")


def finish(result: Any, *, as_json: bool, human: Callable[[Any, dict[str, Any]], None] | None = None,
           push_to_hub: str | None = None, private: bool = False, failure: str | None = None) -> None:
    """Render an operation's :class:`~surgery.core.result.Result` and set the exit code.

    The document is the written output's summary (when something was written), the
    operation's report and ``passed``: with ``--json`` exactly that on stdout, otherwise
    ``human(console, doc)`` followed by the "wrote ..." line. A run that did not pass is not
    pushed, logs ``failure`` on stderr and exits 1.
    """
    import typer

    doc: dict[str, Any] = {}
    if result.written is not None:
        pushed = push_if_asked(result.written.output, push_to_hub, private) if result.passed else None
        doc.update(written_summary(result.written, pushed))
    doc.update(result.report)
    doc["passed"] = bool(result.passed)

    def render(console: Any) -> None:
        if human is not None:
            human(console, doc)
        if result.written is not None:
            print_written(console, doc)

    _render.emit(doc, render, as_json)
    if not result.passed:
        if failure:
            _render.log(failure)
        raise typer.Exit(1)
