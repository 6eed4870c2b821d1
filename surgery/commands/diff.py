"""`surgery diff`: per-tensor change between two checkpoints."""

from __future__ import annotations

from typing import Annotated

import typer

from . import _common, _render
from ._params import DeviceOpt, JsonOpt, QuietOpt, add_examples

EXAMPLES = [
    "surgery diff fixtures/llama-tiny/base fixtures/llama-tiny/ft-a --top 5",
    "surgery diff fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b --json --changed-only | jq .summary",
]


def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="Reference checkpoint.")],
    b: Annotated[str, typer.Argument(metavar="B", help="Changed checkpoint.")],
    changed_only: Annotated[bool, typer.Option("--changed-only", help="List only tensors that differ.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="Human output: show the N largest relative changes (0 = all).")] = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-tensor relative change ‖B−A‖/‖A‖, cosine and max |B−A|; tensors only in one side; shape or dtype mismatches."""
    from surgery.diff import diff as run

    result = run(a, b, changed_only=changed_only, device=device, progress=_render.progress(quiet))

    def human(console, report) -> None:
        rows = sorted(report["tensors"], key=lambda r: -r["rel_change"]) if top else report["tensors"]
        rows = rows[:top] if top else rows
        cols = [_render.Col("tensor", key=True), _render.Col("rel change"), _render.Col("cosine", drop=2),
                _render.Col("max |diff|", drop=1)]
        cells = [(r["name"], _render.fmt_num(r["rel_change"]), f"{r['cosine']:.6f}", _render.fmt_num(r["max_abs_diff"]))
                 for r in rows]
        _render.print_table(console, cols, cells, title=f"{report['a']} → {report['b']}")
        s = report["summary"]
        console.print(f"{s['changed']} of {s['compared']} tensors changed; max rel change {_render.fmt_num(s['max_rel_change'])}")
        for key, what in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
            if report[key]:
                console.print(f"[yellow]{what}[/]: " + ", ".join(report[key]))
        for m in report["mismatched"]:
            console.print(f"[red]mismatch[/] {m['name']}: {m['shape_a']} {m['dtype_a']} vs {m['shape_b']} {m['dtype_b']}")

    _common.finish(result, as_json=as_json, human=human)


add_examples(diff, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("diff")(diff)
