"""`surgery eval ppl`: perplexity of a checkpoint with transformers forward passes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import _common, _render
from ._params import ComputeDtype, DeviceOpt, JsonOpt, QuietOpt, TextOpt, TokenizerOpt, add_examples, choice

EXAMPLES = [
    "surgery eval ppl fixtures/llama-tiny/base                       # corpus perplexity on the built-in probe",
    "surgery eval ppl fixtures/llama-tiny/base --sentences --json    # per-sentence mean and median",
    "surgery eval ppl fixtures/gpt2-tiny/base --text fixtures/notes.txt --ctx 64 --stride 64   # disjoint windows",
]

eval_app = typer.Typer(name="eval", help="Evaluate a checkpoint (perplexity).", no_args_is_help=True,
                       rich_markup_mode=None)


def ppl(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint folder, file or Hub id of a causal LM (needs config.json and a tokenizer).")],
    text: TextOpt = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", metavar="N", help="Window length in tokens (default: the model's positions, at most 1024).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", metavar="N", help="Corpus mode: window step (default ctx/2; = ctx for disjoint windows).")] = None,
    sentences: Annotated[bool, typer.Option("--sentences", help="One sentence per line: per-sentence perplexity, mean and median.")] = False,
    max_sentences: Annotated[Optional[int], typer.Option("--max-sentences", metavar="N", help="Sentence mode: score only the first N sentences.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="B", help="Sequences per forward pass.")] = 8,
    dtype: Annotated[ComputeDtype, typer.Option("--model-dtype", case_sensitive=False, help="Compute dtype of the forward passes.")] = ComputeDtype.float32,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity: strided sliding windows (Hugging Face docs) or per-sentence (mean and median)."""
    from surgery.eval import ppl as run

    result = run(checkpoint, text=text, sentences=sentences, ctx=ctx, stride=stride, batch_size=batch_size,
                 device=device, dtype=choice(dtype), tokenizer=tokenizer, max_sentences=max_sentences,
                 progress=_render.progress(quiet))

    def human(console, report) -> None:
        console.print(f"checkpoint: {report['checkpoint']}   text: {report['text']}   "
                      f"device: {report['device']} ({report['dtype']})")
        if report["mode"] == "corpus":
            console.print(f"windows: {report['num_windows']} of {report['ctx']} tokens, stride {report['stride']}; "
                          f"{report['tokens_scored']:,} tokens scored")
            console.print(f"[bold]perplexity: {_render.fmt_num(report['perplexity'], 6)}[/]")
        else:
            extra = ""
            if report["skipped_sentences"]:
                extra += f", {report['skipped_sentences']} skipped (under 2 tokens)"
            if report["truncated_sentences"]:
                extra += f", {report['truncated_sentences']} cut to {report.get('ctx', '')} tokens"
            console.print(f"sentences: {report['num_sentences']}{extra}; {report['tokens_scored']:,} tokens scored")
            console.print(f"[bold]perplexity: mean {_render.fmt_num(report['mean'], 6)}, "
                          f"median {_render.fmt_num(report['median'], 6)}[/]")
        console.print(f"{_render.fmt_num(report['tokens_per_second'], 4)} scored tokens/s "
                      f"({_render.fmt_num(report['seconds'], 3)} s of forward passes)")

    _common.finish(result, as_json=as_json, human=human)


add_examples(ppl, EXAMPLES)
eval_app.command("ppl")(ppl)


def register(app: typer.Typer) -> None:
    """Add ``surgery eval ...`` to the app."""
    app.add_typer(eval_app, name="eval")
