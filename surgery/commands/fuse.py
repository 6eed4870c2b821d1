"""`surgery fuse`: fuse adapters (PEFT LoRA family, HUT, TeRA, curriculum LoRA) into base weights, streaming."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import (DEFAULT_SHARD_SIZE, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, OutputOpt, PrivateOpt, PushOpt,
                      QuietOpt, RayOpt, ResumeRunOpt, ShardSizeOpt, add_examples, choice)

EXAMPLES = [
    "surgery fuse fixtures/llama-tiny/base fixtures/llama-tiny/lora-a -o out/fused            # one PEFT adapter",
    "surgery fuse fixtures/llama-tiny/base fixtures/llama-tiny/lora-a:0.7 fixtures/llama-tiny/lora-b:0.3 "
    "-o out/fused-ab --dtype float32   # weighted, in one pass",
    "surgery fuse fixtures/llama-tiny/base fixtures/llama-tiny/lora-a -o out/fused-checked --check --json   # logits vs PEFT",
]


def fuse(
    base: Annotated[str, typer.Argument(metavar="BASE", help="Base checkpoint: folder, .safetensors file or Hub id[@rev].")],
    adapters: Annotated[list[str], typer.Argument(metavar="ADAPTER[:WEIGHT]...",
                                                  help="Adapter folders, applied in order; WEIGHT scales each adapter's change (default 1).")],
    output: OutputOpt,
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    check: Annotated[bool, typer.Option("--check", help="Before the output appears, compare its logits with PEFT's base + adapter forward pass (needs peft; one PEFT adapter).")] = False,
    device: DeviceOpt = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="Intra-op threads for every tensor's math (default: one thread below 4M elements, torch's default above).")] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Write fused tensors that hold NaN or Inf (refused by default, naming the input tensor that carried them).")] = False,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = None,
    resume_run: ResumeRunOpt = False,
) -> None:
    """Fuse adapters into the base weights: affected tensors in float32, the rest copied untouched."""
    from surgery.core.executor import executor_for
    from surgery.fuse import fuse as run

    with executor_for(ray, device=device, resume_run=resume_run) as executor:
        result = run(base, adapters, output, dtype=choice(dtype), shard_size=shard_size, force=force, device=device,
                     check=check, threads=threads, allow_nonfinite=allow_nonfinite,
                     progress=_render.progress(quiet), executor=executor)

    def human(console, doc) -> None:
        for a in doc["adapters"]:
            console.print(f"[bold]{a['kind']}[/] {a['path']} (weight {a['weight']:g}): {a['tensors_changed']} "
                          f"tensor(s) changed; {a['key_mapping']}")
        if doc["untied_embeddings"]:
            u = doc["untied_embeddings"]
            console.print(f"untied {u['output']} from {u['input']} (config tie_word_embeddings=false)")
        cast = f", {doc['tensors_cast']} cast to {choice(dtype)}" if doc["tensors_cast"] else ""
        console.print(f"{len(doc['tensors_changed'])} tensor(s) fused, {doc['tensors_copied']} copied untouched{cast}")
        if doc["check"]:
            c = doc["check"]
            console.print(f"[bold green]check passed[/]: max |Δlogit| {c['max_abs_diff']:.3g} "
                          f"({c['relative_diff']:.2g} of the largest logit, tolerance {c['tolerance']:g})")

    _common.finish(result, as_json=as_json, human=human, push_to_hub=push_to_hub, private=private)


add_examples(fuse, EXAMPLES)


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
