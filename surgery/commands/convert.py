"""`surgery convert`: .bin/.pt to safetensors (weights-only), and cast / re-shard safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _common, _render
from ._params import DEFAULT_SHARD_SIZE, DtypeOpt, ForceOpt, JsonOpt, PrivateOpt, PushOpt, QuietOpt, ShardSizeOpt

EXAMPLES = [
    "surgery convert old-model/pytorch_model.bin out/model          # pickle -> safetensors, weights only",
    "surgery convert fixtures/llama-tiny/base out/bf16 --dtype bfloat16 --shard-size 1MB",
]


def convert(
    source: Annotated[str, typer.Argument(help="A .bin/.pt file or folder (loaded weights-only), or a safetensors checkpoint.")],
    output: Annotated[Path, typer.Argument(help="Output checkpoint folder.")],
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert to safetensors: the one place a pickle is opened (weights-only), plus dtype casts and re-sharding."""
    from surgery.convert import convert as run

    result = run(source, output, dtype=dtype, shard_size=shard_size, force=force, progress=_render.progress(quiet))
    _common.finish(result, as_json=as_json, push_to_hub=push_to_hub, private=private)


convert.__doc__ += "\n\nExamples:\n\n" + "\n\n".join(f"  {e}" for e in EXAMPLES)  # type: ignore[operator]


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
