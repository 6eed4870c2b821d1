"""Small helpers the command modules share (imported lazily by them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import _render


def push_if_asked(output: Path, repo_id: str | None, private: bool = False) -> str | None:
    """Upload ``output`` when ``--push-to-hub`` was given; returns the commit URL."""
    if not repo_id:
        return None
    from surgery.checkpoint.hub import push

    _render.log(f"pushing {output} to {repo_id} ...")
    return push(output, repo_id, private=private)


def written_summary(result: Any, pushed: str | None = None) -> dict[str, Any]:
    """The facts every writing command reports about its output."""
    return {
        "output": str(result.output_dir),
        "files": [str(f.name) for f in result.files],
        "num_tensors": result.num_tensors,
        "total_bytes": result.total_bytes,
        "pushed": pushed,
        "record": result.record,
    }


def print_written(console: Any, summary: dict[str, Any]) -> None:
    console.print(f"[bold green]wrote[/] {summary['output']}: {summary['num_tensors']} tensors, "
                  f"{_render.fmt_bytes(summary['total_bytes'])} in {len(summary['files'])} file(s)")
    if summary.get("pushed"):
        console.print(f"pushed: {summary['pushed']}")
