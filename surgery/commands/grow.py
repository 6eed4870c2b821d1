"""`surgery grow`: TokenFormer parameter-token growth that keeps the function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional


import typer

from . import _common, _render
from ._params import (Choice, DEFAULT_SHARD_SIZE, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, OutputOpt, PrivateOpt, PushOpt,
                      QuietOpt, RayOpt, ResumeRunOpt, ShardSizeOpt, add_examples, choice, deprecated_alias)

EXAMPLES = [
    "surgery grow fixtures/tokenformer-tiny -o out/tf-x2 --factor 2                  # tile: exact for every norm",
    "surgery grow fixtures/tokenformer-tiny -o out/tf-gram --ffn-tokens 100 --init gram",
    "surgery grow fixtures/tokenformer-tiny -o out/tf-rand --tokens 128 --init random --seed 1 --json",
    "surgery convert TokenFormer-150M/pytorch_model.bin -o out/tf150m && surgery grow out/tf150m "
    "--neox-config 150M_eval.yml --qkv-tokens 1536 --proj-tokens 1536 --ffn-tokens 6144 -o out/tf150m-x2   # needs the Hub",
]


class Init(Choice):
    tile = "tile"
    gram = "gram"
    zero = "zero"
    random = "random"


InitOpt = Annotated[Init, typer.Option("--init",
                                      help="How new tokens start: tile (repeat keys, zero values; exact, N a multiple of n), "
                                           "gram (matched key Gram matrix, zero values; exact for l2_norm_gelu), "
                                           "zero (zero keys and values; exact with the recorded frozen scale), "
                                           "random (the released code's init; approximate).")]


def grow(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="TokenFormer checkpoint (safetensors; convert pytorch_model.bin first).")],
    output: OutputOpt,
    tokens: Annotated[Optional[int], typer.Option("--tokens", metavar="N", help="New token count for every Pattention kind (qkv, proj, ffn).")] = None,
    qkv_tokens: Annotated[Optional[int], typer.Option("--qkv-tokens", metavar="N", help="New qkv_slot_num (query/key/value layers).")] = None,
    proj_tokens: Annotated[Optional[int], typer.Option("--proj-tokens", metavar="N", help="New proj_slot_num (attention output layers).")] = None,
    ffn_tokens: Annotated[Optional[int], typer.Option("--ffn-tokens", metavar="N", help="New ffn_slot_num (feed-forward layers).")] = None,
    factor: Annotated[Optional[float], typer.Option("--factor", metavar="F", help="Multiply every kind's token count by F.")] = None,
    init: InitOpt = Init.tile,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed for gram's rotation, random init and the verification ids.")] = 0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare logits before/after on seeded random ids; an exact init that deviates fails (exit 1).")] = True,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", metavar="T", help="Largest relative logit deviation an exact init may show (default by dtype: 1e-5 float32, 2e-2 bfloat16).")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--neox-config", metavar="FILE", help="GPT-NeoX YAML/JSON config for checkpoints without config.json (e.g. the official 150M_eval.yml).")] = None,
    config_old: Annotated[Optional[Path], typer.Option("--config", hidden=True, help="Deprecated spelling of --neox-config.")] = None,
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = None,
    resume_run: ResumeRunOpt = False,
) -> None:
    """Grow a TokenFormer's parameter tokens (tile / gram / zero / random) and check the logits are kept."""
    from surgery.core.executor import executor_for
    from surgery.grow import grow as run

    if config_old is not None:
        deprecated_alias("--config", "--neox-config")
        config_file = config_old
    # the verification forward runs here; only the output tensors are computed as Ray tasks
    with executor_for(ray, resume_run=resume_run) as executor:
        result = run(checkpoint, output, tokens=tokens, qkv_tokens=qkv_tokens, proj_tokens=proj_tokens,
                     ffn_tokens=ffn_tokens, factor=factor, init=choice(init), seed=seed, verify=verify,
                     tolerance=tolerance, config_file=config_file, dtype=choice(dtype), shard_size=shard_size,
                     force=force, device=device, progress=_render.progress(quiet), executor=executor)
    _common.finish(result, as_json=as_json, human=_print, push_to_hub=push_to_hub, private=private)


def _print(console: Any, doc: dict[str, Any]) -> None:
    from rich.table import Table

    rep = doc["growth"]
    table = Table(title=f"parameter tokens (--init {rep['init']}, {rep['norm_activation_type']})")
    for col in ("kind", "config field", "before", "after", "tensors", "scale tokens"):
        table.add_column(col, justify="right" if col in ("before", "after", "tensors", "scale tokens") else "left")
    for kind, s in rep["slots"].items():
        scale = str(s["scale_tokens_after"])
        table.add_row(kind, s["field"], str(s["before"]), str(s["after"]), str(s["tensors"]), scale)
    console.print(table)
    v = rep.get("verify")
    if v is None:
        console.print("verify: skipped (--no-verify)")
    else:
        verdict = ("[bold green]exact[/]" if v["passed"] else "[bold red]changed[/]") if v["exact_expected"] \
            else "[yellow]approximate[/]"
        console.print(f"verify: {verdict}  max |Δlogit| {_render.fmt_num(v['max_abs_dev'], 3)}, relative "
                      f"{_render.fmt_num(v['max_rel_dev'], 3)} (tolerance {_render.fmt_num(v['tolerance'], 3)}; "
                      f"{v['batch']}×{v['seq_len']} random ids, seed {v['seed']}, {v['compute_dtype']})")
    for note in rep.get("notes", []):
        console.print(f"note: {note}")


add_examples(grow, EXAMPLES)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("grow")(grow)
