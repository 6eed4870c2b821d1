"""`surgery tune`: search merge settings by perplexity on the user's probe texts, then write the
best merge, its recipe and a report (held-out perplexities, every trial, the Pareto front)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import _common, _render
from ._params import (DEFAULT_SHARD_SIZE, Choice, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, PrivateOpt, PushOpt,
                      QuietOpt, ShardSizeOpt, add_examples, base_help, choice)


class Objective(Choice):
    """What the search minimises over the probes' log perplexities."""

    mean = "mean"
    worst = "worst"
    weighted = "weighted"


EXAMPLES = [
    "surgery tune task_arithmetic --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "--probe notes=fixtures/notes.txt --probe code=fixtures/make_fixtures.py -o out/tuned --trials 6",
    "surgery tune auto --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "--probe notes=fixtures/notes.txt -o out/tuned-auto --budget 30s --groups   # 4 methods, weights per layer group",
    "surgery tune out/tuned/recipe.yml --probe notes=fixtures/notes.txt@2 --probe code=fixtures/make_fixtures.py "
    "--objective weighted --trials 4 -o out/tuned-again",
    "surgery tune task_arithmetic --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "--probe notes=fixtures/notes.txt --probe code=fixtures/make_fixtures.py -o out/tuned-more --trials 8 "
    "--resume out/tuned/trials.jsonl   # 2 more trials after the 6 of that log",
    "surgery merge --config out/tuned/recipe.yml -o out/merged-again      # the winning merge, re-run",
]


def tune(
    target: Annotated[str, typer.Argument(metavar="METHOD|METHODS|auto|RECIPE",
                                          help="A batch merge method, a comma-separated list of them, `auto`, or a "
                                               "mergekit-style recipe (its method, base, models and fixed settings).")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="DIR", help="Output folder: model/, recipe.yml, report.json, report.md, pareto.png, trials.jsonl.")],
    models: Annotated[Optional[List[str]], typer.Argument(help="Models to merge, in order (optional with a recipe).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", metavar="BASE", help=base_help("the task vectors are MODEL − BASE (optional with a recipe)."))] = None,
    probe: Annotated[Optional[List[str]], typer.Option("--probe", metavar="NAME=FILE[@WEIGHT]", help="A probe text per domain, e.g. --probe code=code.txt; repeatable. WEIGHT counts in --objective weighted.")] = None,
    budget: Annotated[str, typer.Option("--budget", metavar="TIME", help="Wall-time budget of the whole run: 10m, 90s, 1h30m, or `none`.")] = "10m",
    trials: Annotated[Optional[int], typer.Option("--trials", metavar="N", help="At most this many candidates evaluated.")] = None,
    groups: Annotated[bool, typer.Option("--groups", help="Also search each model's weight per layer group (attention, MLP, rest).")] = False,
    objective: Annotated[Objective, typer.Option("--objective", case_sensitive=False, help="mean, worst or weighted log perplexity over the probes.")] = Objective.mean,
    holdout: Annotated[float, typer.Option("--holdout", metavar="FRACTION", help="Share of each probe's tokens kept out of the search for the report.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Orders the search; seeds random methods (DARE).")] = 0,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="LOG", help="Continue from a log (OUT.tune.jsonl while running, OUT/trials.jsonl after).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", metavar="N", help="Window length in tokens (default: the model's positions, at most 1024).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", metavar="N", help="Window step (default: --ctx, disjoint windows).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Sequences per forward pass.")] = 8,
    search_windows: Annotated[str, typer.Option("--search-windows", metavar="N|all", help="Windows of each probe's search part a trial is ranked on (evenly spaced, placed by --seed); the best 3 trials are then scored on all windows and the winner is chosen on those. `all` or 0: every trial scores every window.")] = "3",
    extrapolate: Annotated[bool, typer.Option("--extrapolate", help="Search weights, lambda and scaling_factor up to their declared maximum (2) instead of 1. Text the fine-tunes were trained on rewards scales above 1 that other text does not; use it only with probes the models never saw.")] = False,
    no_references: Annotated[bool, typer.Option("--no-references", help="Do not score the base and the models on the report parts.")] = False,
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Choose a merge on probe texts: search weights, density, λ ... (and the method) by perplexity."""
    from surgery.tune import tune as run

    def line(rec) -> None:
        if quiet or as_json:
            return
        ppl = ", ".join(f"{k} {_render.fmt_num(v, 5)}" for k, v in rec["perplexity"].items())
        settings = ", ".join(f"{k}={v:g}" for k, v in rec["settings"].items())
        tag = " (from the log)" if rec.get("replayed") else f" {rec['seconds']:.1f} s"
        if rec.get("fidelity") == "surrogate":
            tag = " (surrogate)" + tag
        _render.log(f"trial {rec['index']:>3} {rec['phase']:<7} {rec['method']}: {settings} | {ppl} | "
                    f"objective {rec['objective']:.4f}, best {rec['best']:.4f}{tag}")

    def on_trial(rec) -> None:
        import math

        rec = {**rec, "perplexity": {k: math.exp(v) if v < 700 else math.inf for k, v in rec["nll"].items()}}
        line(rec)

    result = run(target, base=base, models=list(models or []), probes=list(probe or []), output=output,
                 groups=groups, budget=None if budget.strip().lower() == "none" else budget, trials=trials,
                 seed=seed, objective_kind=choice(objective), holdout=holdout, ctx=ctx, stride=stride, batch_size=batch_size,
                 search_windows=search_windows, extrapolate=extrapolate,
                 dtype=choice(dtype), shard_size=shard_size, force=force, resume=resume, references=not no_references,
                 device=device, progress=_render.progress(quiet), on_trial=on_trial)

    def human(console, doc) -> None:
        best = doc["best"]
        probes = [p["name"] for p in doc["probes"]]
        console.print(f"[bold]best: {best['method']}[/] {', '.join(f'{k}={v:g}' for k, v in best['settings'].items())}"
                      f"  (trial {best['trial']} of {len(doc['trials'])}; stopped because {doc['stopped']})")
        from rich.table import Table

        table = Table(title="held-out perplexity (report parts)")
        table.add_column("candidate")
        for p in probes:
            table.add_column(p, justify="right")
        table.add_column(f"objective ({doc['objective']})", justify="right")
        import math

        for row in doc["held_out"]:
            table.add_row(row["label"], *[_render.fmt_num(math.exp(row["nll"][p]) if row["nll"][p] < 700 else math.inf, 5)
                                          for p in probes], _render.fmt_num(row["objective"], 5))
        console.print(table)
        console.print(f"recipe: {doc['output_folder']}/recipe.yml   report: {doc['output_folder']}/report.md"
                      + (f"   plot: {doc['plot']}" if doc.get("plot") else ""))

    _common.finish(result, as_json=as_json, human=human, push_to_hub=push_to_hub, private=private)


add_examples(tune, EXAMPLES)


def register(app: typer.Typer) -> None:
    """Add ``surgery tune`` to the app."""
    app.command("tune")(tune)
