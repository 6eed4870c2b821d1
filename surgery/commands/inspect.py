"""`surgery inspect`: what is in a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from . import _common, _render
from ._params import JsonOpt, QuietOpt, add_examples

EXAMPLES = [
    "surgery inspect fixtures/llama-tiny/base",
    "surgery inspect fixtures/llama-tiny/base.q8_0.gguf --no-tensors      # a GGUF file: types, metadata",
    "surgery inspect HuggingFaceTB/SmolLM2-135M-Instruct --json | jq .num_parameters  # needs the Hub",
]


def inspect(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Folder, .safetensors file, index JSON, .gguf file, or Hub id org/name[@rev] (headers only, no weights downloaded).")],
    tensors: Annotated[bool, typer.Option("--tensors/--no-tensors", help="List every tensor (human output).")] = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tensors, shapes, dtypes, parameter count, shards and metadata of a checkpoint (headers only)."""
    from surgery.inspect import inspect as run

    result = run(checkpoint)

    def human(console, report) -> None:
        if tensors:
            cols = [_render.Col("tensor", key=True), _render.Col("shape", "left"), _render.Col("dtype", "left", drop=3),
                    _render.Col("bytes", drop=2), _render.Col("file", "left", drop=4)]
            rows = [(t["name"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"], _render.fmt_bytes(t["bytes"]),
                     t["file"]) for t in report["tensors"]]
            _render.print_table(console, cols, rows, title=report["checkpoint"])
        console.print(f"parameters: [bold]{report['num_parameters']:,}[/]"
                      + (f" (tied, counted once: {', '.join(report['tied_duplicates'])})" if report["tied_duplicates"] else ""))
        console.print(f"tensors: {report['num_tensors']}   size: {_render.fmt_bytes(report['total_bytes'])}   "
                      f"dtypes: " + ", ".join(f"{k} {_render.fmt_bytes(v)}" for k, v in report["dtypes"].items()))
        console.print("shards: " + ", ".join(f"{s['file']} ({_render.fmt_bytes(s['bytes'])})" for s in report["shards"]))
        if report.get("format") == "gguf":
            console.print(f"GGUF v{report['gguf_version']}: {report['architecture']} \"{report['name']}\", "
                          f"{report['file_type']}, {report['bits_per_weight']} bits per weight")
            tok = report["tokenizer"]
            if tok["model"]:
                console.print(f"tokenizer: {tok['model']} ({tok['pre']}), {tok['tokens']} tokens")
            if report["config"]:
                console.print("config: " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
            console.print(f"metadata: {len(report['metadata'])} keys (--json lists them)")
            return
        if report.get("source") == "hub":
            console.print(f"hub: {report['root']} (headers only: {_render.fmt_bytes(report['header_bytes'])} read)")
        if report["config"]:
            console.print("config: " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
        meta = report["metadata"]
        if meta:
            rec = meta.get("surgery")
            if isinstance(rec, dict) and "operation" in rec:
                console.print(f"made by: surgery {rec.get('operation')} (record in README.md and __metadata__)")
            other = {k: v for k, v in meta.items() if k != "surgery"}
            if other:
                console.print("metadata: " + ", ".join(f"{k}={v}" for k, v in other.items()))

    _common.finish(result, as_json=as_json, human=human)


add_examples(inspect, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
