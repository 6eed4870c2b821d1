"""`surgery edit`: apply model edits with perplexity collapse checks; make and convert edit files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import _common, _render
from ._params import (Choice, DEFAULT_SHARD_SIZE, ComputeDtype, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, OutputOpt, PrivateOpt,
                      PushOpt, QuietOpt, ShardSizeOpt, TextOpt, TokenizerOpt, add_examples, base_help, choice)

EXAMPLES = [
    "surgery edit extract fixtures/llama-tiny/base fixtures/llama-tiny/ft-a -o out/ft-a.edit.safetensors --rank 4",
    "surgery edit extract fixtures/llama-tiny/base fixtures/llama-tiny/ft-b -o out/ft-b.edit.safetensors --energy 0.9",
    "surgery edit apply fixtures/llama-tiny/base out/ft-a.edit.safetensors -o out/edited --plot out/ppl.png",
    "surgery edit apply fixtures/llama-tiny/base out/ft-a.edit.safetensors out/ft-b.edit.safetensors -o out/edited-ab "
    "--check-every 2 --on-collapse skip --max-sentences 20",
    "surgery edit to-peft out/ft-a.edit.safetensors -o out/ft-a-lora --base fixtures/llama-tiny/base --drop-vectors",
    "surgery edit from-peft fixtures/llama-tiny/lora-a -o out/lora-a.edit.safetensors --base fixtures/llama-tiny/base",
]


class OnCollapse(Choice):
    stop = "stop"
    skip = "skip"
    ignore = "ignore"


edit_app = typer.Typer(name="edit", no_args_is_help=True, rich_markup_mode=None,
                       help="Model edits (ROME/MEMIT-style low-rank updates): apply with perplexity collapse checks, "
                            "extract from two checkpoints, convert to and from PEFT LoRA.")

EditOut = Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="The edit .safetensors file to write (refused if it exists, unless --force).")]


def _examples(fn, key: str) -> None:
    add_examples(fn, [e for e in EXAMPLES if e.startswith(f"surgery edit {key} ")])


def apply(
    base: Annotated[str, typer.Argument(metavar="BASE", help="Base checkpoint (folder, file or Hub id) with config.json and tokenizer.")],
    edits: Annotated[List[Path], typer.Argument(metavar="EDIT...", help="Edit files, applied in this order.")],
    output: OutputOpt,
    text: TextOpt = None,
    corpus: Annotated[bool, typer.Option("--corpus", help="Judge by corpus perplexity (strided windows) instead of mean per-sentence perplexity.")] = False,
    ctx: Annotated[Optional[int], typer.Option("--ctx", metavar="N", help="Perplexity window / longest sentence in tokens.")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", metavar="N", help="With --corpus: window step.")] = None,
    max_sentences: Annotated[Optional[int], typer.Option("--max-sentences", metavar="N", help="Score only the first N sentences of the probe.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="B", help="Sequences per forward pass.")] = 8,
    max_ppl_ratio: Annotated[float, typer.Option("--max-ppl-ratio", metavar="R", help="Collapse when perplexity / baseline exceeds this.")] = 1.5,
    max_ppl: Annotated[Optional[float], typer.Option("--max-ppl", metavar="P", help="Absolute perplexity ceiling (default: the vocabulary size).")] = None,
    check_every: Annotated[int, typer.Option("--check-every", metavar="K", help="Check perplexity after every K edits (and after the last).")] = 1,
    on_collapse: Annotated[OnCollapse, typer.Option("--on-collapse", help="stop: write the last good state, exit 1; skip: drop the offending edit; ignore: record and go on.")] = OnCollapse.stop,
    max_rel_norm: Annotated[float, typer.Option("--max-rel-norm", metavar="X", help="Pre-check: ‖ΔW‖_F/‖W‖_F above this forces a perplexity check.")] = 0.1,
    max_sigma_ratio: Annotated[float, typer.Option("--max-sigma-ratio", metavar="X", help="Pre-check: σ_max(ΔW)/σ_max(W) above this forces a perplexity check.")] = 0.5,
    force_base: Annotated[bool, typer.Option("--force-base", help="Apply edits whose recorded base sha256 does not match.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE.png", help="Draw perplexity against edit index (.png/.pdf/.svg; needs matplotlib).")] = None,
    tokenizer: TokenizerOpt = None,
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Apply edits one after another with perplexity collapse checks; exit 1 when --on-collapse stop fires."""
    from surgery.edit.apply import apply_edits
    from surgery.core.errors import UsageError

    if stride is not None and not corpus:
        raise UsageError("`stride` applies to `corpus` perplexity only.")
    # what apply reads, for the output policy of --plot (never over, into or through a link to an input)
    read = [str(base), *map(str, edits), *([str(text)] if text else [])]
    if plot is not None:  # refuse a bad --plot before the forward passes, not after
        from surgery.core.figures import check_plot_path, require_matplotlib

        check_plot_path(plot, read)
        require_matplotlib()
    result = apply_edits(base, edits, output, text=text, corpus=corpus, ctx=ctx, stride=stride,
                         max_sentences=max_sentences, batch_size=batch_size, max_ppl_ratio=max_ppl_ratio,
                         max_ppl=max_ppl, check_every=check_every, on_collapse=choice(on_collapse),
                         max_rel_norm=max_rel_norm, max_sigma_ratio=max_sigma_ratio, force_base=force_base,
                         tokenizer=tokenizer, device=device, dtype=choice(dtype), shard_size=shard_size, force=force,
                         progress=_render.progress(quiet))
    if plot is not None:
        from surgery.edit.plot import plot_perplexity

        result.report["plot"] = str(plot_perplexity(result.report, plot, read))

    def human(console, report) -> None:
        cols = [_render.Col("#"), _render.Col("file", key=True), _render.Col("tensors", drop=3),
                _render.Col("max ‖ΔW‖/‖W‖", drop=2), _render.Col("max σ ratio", drop=1), _render.Col("pre-check", "left", drop=4),
                _render.Col("perplexity"), _render.Col("ratio"), _render.Col("verdict", "left")]
        rows = []
        for e in report["edits"]:
            rel = max(r["rel_norm"] for r in e["tensors"])
            sig = [r["sigma_ratio"] for r in e["tensors"] if r["sigma_ratio"] is not None]
            style = "red" if "collapsed" in e["verdict"] else ("green" if e["verdict"] == "ok" else "")
            rows.append((str(e["index"]), Path(e["file"]).name, str(len(e["tensors"])), _render.fmt_num(rel, 3),
                         _render.fmt_num(max(sig) if sig else None, 3), e["precheck"], _render.fmt_num(e["perplexity"], 5),
                         _render.fmt_num(e["ratio"], 4), f"[{style}]{e['verdict']}[/]" if style else e["verdict"]))
        _render.print_table(console, cols, rows, title=f"edits on {report['base']} ({report['metric']})")
        console.print(f"baseline perplexity {_render.fmt_num(report['baseline_perplexity'], 6)}, final "
                      f"{_render.fmt_num(report['final_perplexity'], 6)}; {report['accepted']} of {len(report['edits'])} "
                      f"edits kept (collapse above x{report['thresholds']['max_ppl_ratio']:g} or "
                      f"{_render.fmt_num(report['thresholds']['max_ppl'], 6)})")
        for note in report["notes"]:
            console.print(f"note: {note}")
        if report.get("plot"):
            console.print(f"plot: {report['plot']}")

    failure = None
    if not result.passed:
        r = result.report
        failure = (f"collapse detected after edit {r['collapsed_at']}; wrote the last good state "
                   f"({r['accepted']} edit(s)) to {r['output']}.")
    _common.finish(result, as_json=as_json, human=human, push_to_hub=push_to_hub, private=private, failure=failure)


def extract(
    base: Annotated[str, typer.Argument(metavar="BASE", help="The checkpoint before the edit.")],
    edited: Annotated[str, typer.Argument(metavar="EDITED", help="The checkpoint after the edit (same architecture).")],
    output: EditOut,
    rank: Annotated[Optional[int], typer.Option("--rank", metavar="R", help="Keep at most R singular directions per tensor.")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", metavar="E", help="Keep the smallest rank capturing this share of ‖ΔW‖² (default 0.99).")] = None,
    description: Annotated[str, typer.Option("--description", metavar="TEXT", help="Free text recorded in the edit's metadata.")] = "",
    subject: Annotated[Optional[str], typer.Option("--subject", metavar="TEXT", help="Edited subject, recorded in the metadata.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", metavar="TEXT", help="Edit prompt, recorded in the metadata.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", metavar="TEXT", help="Edit target, recorded in the metadata.")] = None,
    factor_dtype: Annotated[ComputeDtype, typer.Option("--factor-dtype", case_sensitive=False, help="dtype of the stored factors.")] = ComputeDtype.float32,
    exact: Annotated[bool, typer.Option("--exact", help="Full SVDs with --rank (default: randomized SVD; its exact error is reported per tensor).")] = False,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make an edit file from two checkpoints: truncated SVD of each changed tensor's difference."""
    from surgery.edit.extract import extract_edit

    result = extract_edit(base, edited, output, rank=rank, energy=energy, description=description, subject=subject,
                          prompt=prompt, target=target, factor_dtype=choice(factor_dtype), device=device, force=force,
                          exact=exact, progress=_render.progress(quiet))

    def human(console, report) -> None:
        cols = [_render.Col("tensor", key=True), _render.Col("shape", drop=2), _render.Col("stored", "left", drop=3),
                _render.Col("rank"), _render.Col("energy"), _render.Col("rel. error"), _render.Col("‖ΔW‖/‖W‖", drop=1)]
        rows = [(r["name"], "×".join(map(str, r["shape"])), r["kind"], _render.fmt_num(r["rank"]),
                 _render.fmt_num(r["energy"], 4), _render.fmt_num(r["rel_error"], 3), _render.fmt_num(r["rel_change"], 3))
                for r in report["tensors"]]
        _render.print_table(console, cols, rows,
                            title=f"{report['changed']} changed tensor(s), {report['unchanged']} unchanged")
        console.print(f"stored {_render.fmt_bytes(report['stored_bytes'])} (dense: "
                      f"{_render.fmt_bytes(report['dense_bytes'])}); lowest captured energy "
                      f"{_render.fmt_num(report['min_energy'], 4)}")

    _common.finish(result, as_json=as_json, human=human)


def from_peft(
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).")],
    output: EditOut,
    base: Annotated[Optional[str], typer.Option("--base", metavar="BASE", help=base_help("checks the adapter's names and shapes and records the base's sha256."))] = None,
    description: Annotated[str, typer.Option("--description", metavar="TEXT", help="Free text recorded in the edit's metadata.")] = "",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a PEFT LoRA adapter to an edit file (ΔW = scale·B·A per module, in the stored layout)."""
    from surgery.edit.lora import from_peft as run

    result = run(adapter, output, base=base, description=description, force=force)

    def human(console, report) -> None:
        console.print(f"{len(report['tensors'])} tensor(s) from {report['adapter']}"
                      + ("" if report["base_verified"] else " (no --base: base sha256 not recorded)"))
        for r in report["tensors"]:
            console.print(f"  {r['name']}: {r['layer']}, rank {r['rank']}, scale {_render.fmt_num(r['scale'])}")
        if report["ignored"]:
            console.print(f"ignored (saved full weights, not deltas): {', '.join(report['ignored'])}")

    _common.finish(result, as_json=as_json, human=human)


def to_peft(
    edit: Annotated[Path, typer.Argument(metavar="EDIT", help="Edit .safetensors file.")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="DIR", help="Adapter folder to write (refused if it exists, unless --force).")],
    base: Annotated[str, typer.Option("--base", metavar="BASE", help=base_help("gives each tensor's layer type; recorded as base_model_name_or_path (absolute when local)."))],
    rank: Annotated[Optional[int], typer.Option("--rank", metavar="R", help="Truncate dense deltas to this rank (default: exact).")] = None,
    drop_vectors: Annotated[bool, typer.Option("--drop-vectors", help="Leave out 1-D deltas (norms, biases) that LoRA cannot express.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert an edit file to a PEFT LoRA adapter folder (loadable with PeftModel.from_pretrained)."""
    from surgery.edit.lora import to_peft as run

    result = run(edit, output, base=base, rank=rank, drop_vectors=drop_vectors, force=force)

    def human(console, report) -> None:
        console.print(f"LoRA r={report['r']} on {len(report['tensors'])} module(s)")
        for r in report["tensors"]:
            err = f", rel. error {_render.fmt_num(r['rel_error'], 3)}" if r["rel_error"] else ""
            console.print(f"  {r['name']}: {r['layer']}, rank {r['rank']}{err}")
        if report["dropped"]:
            console.print(f"dropped 1-D deltas: {', '.join(report['dropped'])}")

    _common.finish(result, as_json=as_json, human=human)


_examples(apply, "apply")
_examples(extract, "extract")
_examples(from_peft, "from-peft")
_examples(to_peft, "to-peft")
edit_app.command("extract")(extract)
edit_app.command("apply")(apply)
edit_app.command("to-peft")(to_peft)
edit_app.command("from-peft")(from_peft)


def register(app: typer.Typer) -> None:
    """Add ``surgery edit ...`` to the app."""
    app.add_typer(edit_app, name="edit")
