"""`surgery check`: CI validation with exit codes (0 pass, 1 fail, 3 unreadable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import ForceOpt, JsonOpt, QuietOpt, RayOpt, add_examples, deprecated_alias

EXAMPLES = [
    "surgery check fixtures/llama-tiny/ft-a                 # headers valid, every tensor readable, no NaN/Inf",
    "surgery check fixtures/llama-tiny/ft-a --shapes        # shapes agree with config.json's architecture",
    "surgery check fixtures/llama-tiny/ft-a --against fixtures/llama-tiny/base --atol 0.05",
    "surgery check fixtures/llama-tiny/ft-a --write-sha256 out/SHA256SUMS   # make a manifest for a later check",
    "surgery check fixtures/llama-tiny/ft-a --sha256 out/SHA256SUMS --json",
]


def check(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint to validate.")],
    shapes: Annotated[bool, typer.Option("--shapes", help="Check tensor shapes against config.json's architecture.")] = False,
    shapes_old: Annotated[bool, typer.Option("--config", hidden=True, help="Deprecated spelling of --shapes.")] = False,
    against: Annotated[Optional[str], typer.Option("--against", metavar="REF", help="Reference checkpoint: every tensor within tolerance.")] = None,
    atol: Annotated[float, typer.Option("--atol", metavar="X", help="Absolute tolerance for --against.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", metavar="X", help="Relative tolerance for --against.")] = 0.0,
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

    if shapes_old:
        deprecated_alias("--config", "--shapes")
    with executor_for(ray) as executor:
        result = run(checkpoint, integrity=not no_integrity, config=shapes or shapes_old, against=against, atol=atol,
                     rtol=rtol, manifest=sha256, write_manifest_to=write_sha256, force=force,
                     progress=_render.progress(quiet), executor=executor)

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


add_examples(check, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("check")(check)
