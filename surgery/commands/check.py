"""`surgery check`: CI validation with exit codes (0 pass, 1 fail, 3 unreadable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import ForceOpt, JsonOpt, QuietOpt, RayOpt

EXAMPLES = [
    "surgery check out/merged                       # headers valid, every tensor readable, no NaN/Inf",
    "surgery check out/merged --config              # shapes agree with config.json",
    "surgery check out/merged --against ref --atol 1e-2",
    "surgery check out/merged --sha256 SHA256SUMS --json",
    "surgery check out/merged --write-sha256 SHA256SUMS   # make the manifest for a later check",
]


def check(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint to validate.")],
    config: Annotated[bool, typer.Option("--config", help="Check tensor shapes against config.json's architecture.")] = False,
    against: Annotated[Optional[str], typer.Option("--against", metavar="REF", help="Reference checkpoint: every tensor within tolerance.")] = None,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance for --against.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance for --against.")] = 0.0,
    sha256: Annotated[Optional[Path], typer.Option("--sha256", metavar="FILE", help="Manifest (sha256sum format or JSON) the files must match.")] = None,
    write_sha256: Annotated[Optional[Path], typer.Option("--write-sha256", metavar="FILE", help="Write a sha256 manifest of the shards, then run the checks.")] = None,
    no_integrity: Annotated[bool, typer.Option("--no-integrity", help="Skip reading every tensor for NaN/Inf.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = None,
) -> None:
    """Validate a checkpoint for CI: integrity, config shapes, tolerance against a reference, sha256 manifest."""
    from surgery.check import check as run
    from surgery.core.executor import executor_for

    with executor_for(ray) as executor:
        result = run(checkpoint, integrity=not no_integrity, config=config, against=against, atol=atol, rtol=rtol,
                     manifest=sha256, write_manifest_to=write_sha256, force=force, progress=_render.progress(quiet),
                     executor=executor)

    def human(console, report) -> None:
        if report.get("manifest_written"):
            console.print(f"wrote {report['manifest_written']}")
        for c in report["checks"]:
            mark = "[bold green]PASS[/]" if c["passed"] else "[bold red]FAIL[/]"
            console.print(f"{mark} {c['name']}: {c['detail']}")
            for f in c["failures"][:10]:
                console.print("     " + ", ".join(f"{k}={v}" for k, v in f.items()))
            if len(c["failures"]) > 10:
                console.print(f"     ... and {len(c['failures']) - 10} more (--json lists all)")
        console.print("[bold green]passed[/]" if report["passed"] else "[bold red]failed[/]")

    _common.finish(result, as_json=as_json, human=human)


check.__doc__ += "\n\nExamples:\n\n" + "\n\n".join(f"  {e}" for e in EXAMPLES)  # type: ignore[operator]


def register(app: typer.Typer) -> None:
    app.command("check")(check)
