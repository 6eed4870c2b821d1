"""`surgery convert`: .bin/.pt to safetensors (weights-only), cast / re-shard safetensors,
GGUF to a Hugging Face folder, and a Llama checkpoint to GGUF."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import (DEFAULT_SHARD_SIZE, DtypeOpt, ForceOpt, JsonOpt, PrivateOpt, PushOpt, QuietOpt, RayOpt,
                      ResumeRunOpt, ShardSizeOpt, add_examples, choice)

EXAMPLES = [
    "surgery convert old-model/pytorch_model.bin -o out/model        # pickle -> safetensors, weights only",
    "surgery convert fixtures/llama-tiny/base -o out/bf16 --dtype bfloat16 --shard-size 1MB",
    "surgery convert fixtures/llama-tiny/base.q8_0.gguf -o out/from-gguf   # GGUF -> Hugging Face folder",
    "surgery convert out/from-gguf --to gguf --quant q8_0 -o out/tiny.q8_0.gguf   # for llama.cpp / Ollama",
    "surgery convert fixtures/llama-tiny/base -o out/f32 --dtype float32 --ray   # as Ray tasks (a local instance)",
]


class Format(str, Enum):
    safetensors = "safetensors"
    gguf = "gguf"


class Quant(str, Enum):
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    f32 = "f32"


def convert(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="A .bin/.pt file or folder (loaded weights-only), a .gguf file, or a safetensors checkpoint.")],
    output_arg: Annotated[Optional[Path], typer.Argument(metavar="OUTPUT", help="Output (same as -o; kept for older scripts).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="PATH", help="Output folder, or the .gguf file with --to gguf (refused if it exists, unless --force).", show_default=False)] = None,
    to: Annotated[Format, typer.Option("--to", help="Output format.")] = Format.safetensors,
    quant: Annotated[Optional[Quant], typer.Option("--quant", help="With --to gguf: matrix type (vectors stay f32). [default: f16]", show_default=False)] = None,
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = None,
    resume_run: ResumeRunOpt = False,
) -> None:
    """Convert checkpoints: pickles to safetensors (weights-only), dtype casts and re-sharding, GGUF in and out."""
    from surgery.convert import convert as run
    from surgery.core.errors import UsageError
    from surgery.core.executor import executor_for

    if output is not None and output_arg is not None and output != output_arg:
        raise UsageError("give the output once: as -o/--output or as the second argument.")
    out = output or output_arg
    if out is None:
        raise UsageError("name the output with -o/--output.")
    if push_to_hub and to == Format.gguf:
        raise UsageError("--push-to-hub uploads a checkpoint folder; push a GGUF file with `hf upload` instead.")
    with executor_for(ray, resume_run=resume_run) as executor:
        result = run(source, out, dtype=choice(dtype), shard_size=shard_size, force=force,
                     progress=_render.progress(quiet), to=to.value, quant=quant.value if quant else None,
                     executor=executor)

    def human(console, doc) -> None:
        if doc.get("source_format") == "gguf":
            types = ", ".join(f"{k} ×{v}" for k, v in doc["gguf_types"].items())
            console.print(f"dequantized {sum(doc['gguf_types'].values())} GGUF tensors ({types}) of a "
                          f"{doc['architecture']} model; tokenizer: {doc['tokenizer']}")
            if doc["dropped"]:
                console.print(f"not part of the model (dropped, as transformers drops them): {', '.join(doc['dropped'])}")
        elif doc.get("format") == "gguf":
            console.print("GGUF types: " + ", ".join(f"{k} ×{v}" for k, v in doc["gguf_types"].items()))

    _common.finish(result, as_json=as_json, human=human, push_to_hub=push_to_hub, private=private)


add_examples(convert, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
