"""`surgery diff`: per-tensor change between two checkpoints."""

from __future__ import annotations

from typing import Annotated

import typer

from . import _common, _render
from ._params import DeviceOpt, JsonOpt, QuietOpt

EXAMPLES = [
    "surgery diff fixtures/llama-tiny/base fixtures/llama-tiny/ft-code",
    "surgery diff base merged --json --changed-only",
]


def diff(
    a: Annotated[str, typer.Argument(help="Reference checkpoint.")],
    b: Annotated[str, typer.Argument(help="Changed checkpoint.")],
    changed_only: Annotated[bool, typer.Option("--changed-only", help="List only tensors that differ.")] = False,
    top: Annotated[int, typer.Option("--top", help="Human output: show the N largest relative changes (0 = all).")] = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-tensor relative change ‖B−A‖/‖A‖, cosine and max |B−A|; tensors only in one side; shape or dtype mismatches."""
    from surgery.diff import diff as run

    result = run(a, b, changed_only=changed_only, device=device, progress=_render.progress(quiet))

    def human(console, report) -> None:
        from rich.table import Table

        rows = sorted(report["tensors"], key=lambda r: -r["rel_change"]) if top else report["tensors"]
        rows = rows[:top] if top else rows
        table = Table(title=f"{report['a']} → {report['b']}")
        for col in ("tensor", "rel change", "cosine", "max |diff|"):
            table.add_column(col, justify="left" if col == "tensor" else "right")
        for r in rows:
            table.add_row(r["name"], _render.fmt_num(r["rel_change"]), f"{r['cosine']:.6f}", _render.fmt_num(r["max_abs_diff"]))
        console.print(table)
        s = report["summary"]
        console.print(f"{s['changed']} of {s['compared']} tensors changed; max rel change {_render.fmt_num(s['max_rel_change'])}")
        for key, what in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
            if report[key]:
                console.print(f"[yellow]{what}[/]: " + ", ".join(report[key]))
        for m in report["mismatched"]:
            console.print(f"[red]mismatch[/] {m['name']}: {m['shape_a']} {m['dtype_a']} vs {m['shape_b']} {m['dtype_b']}")

    _common.finish(result, as_json=as_json, human=human)


diff.__doc__ += "\n\nExamples:\n\n" + "\n\n".join(f"  {e}" for e in EXAMPLES)  # type: ignore[operator]


def register(app: typer.Typer) -> None:
    app.command("diff")(diff)
