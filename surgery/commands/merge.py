"""`surgery merge`: every merge method of the registry (batch and continual with a resumable
state), from flags or a mergekit-style recipe. Methods, parameters, ranges and this command's
help all come from the methods' declarations (surgery/merge/registry.py)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from typer.core import TyperCommand

from . import _common, _render
from ._params import (DEFAULT_SHARD_SIZE, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, PrivateOpt, PushOpt, QuietOpt,
                      RayOpt, ResumeRunOpt, ShardSizeOpt, add_examples)

MergeOutputOpt = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Output checkpoint folder (refused if it exists, unless --force); with a recipe it may "
                           "also follow the recipe as mergekit-yaml takes it: surgery merge recipe.yml OUT.")]
RECIPE_SUFFIXES = (".yml", ".yaml")

EXAMPLES = [
    "surgery merge -m ties --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "-p density=0.5 -o out/ties",
    "surgery merge -m task_arithmetic --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a "
    "fixtures/llama-tiny/ft-b -p 1:weight=1.0 -p 2:weight=0.5 -p lambda=0.8 -o out/ta",
    "surgery merge -m slerp --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a -p t=0.3 -o out/slerp",
    "surgery merge -m opcm --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "--state out/opcm-state -o out/opcm-ab",
    "surgery merge --resume out/opcm-state fixtures/llama-tiny/ft-c --state out/opcm-state -o out/opcm-abc",
    "surgery merge fixtures/recipes/ties.yml out/merged   # a mergekit recipe, as mergekit-yaml takes it (same as --config)",
    "surgery merge fixtures/recipes/ties.yml --dry-run --json   # validate from headers and print the plan; writes nothing",
    "surgery merge -m della --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "-p density=0.5 -p epsilon=0.1 --seed 3 -o out/della",
]


class Decomposition(str, Enum):
    gram = "gram"
    svd = "svd"


class TrimTies(str, Enum):
    index = "index"
    argsort = "argsort"


def methods_help() -> str:
    """The methods and their parameters, from the registry (imported only when help is shown)."""
    from surgery.merge.registry import METHODS

    lines = ["Methods (-m) and their parameters (-p NAME=VALUE, or -p MODEL:NAME=VALUE for one model, "
             "counted from 1; a list of numbers is interpolated across the layers):"]
    for m in METHODS.values():
        params = "; ".join(f"{p.name}={'(required)' if p.required else _value(p.default)} "
                           f"({'per model, ' if p.per_model else ''}{p.range_text()})"
                           for p in m.params)
        lines.append(f"{m.name} ({m.kind}) {m.summary}." + (f" {params}" if params else ""))
    return "\n\n".join(lines)  # plain click help prints text as written: no markup, nothing to escape


def _value(x: Any) -> str:
    return str(x).lower() if isinstance(x, bool) else str(x)


class MergeCommand(TyperCommand):
    """Appends the registry's methods and parameters to `surgery merge --help`."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not getattr(self, "_methods_added", False):
            self.epilog = methods_help()
            self._methods_added = True
        super().format_help(ctx, formatter)


def _parse_params(items: list[str], n_models: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``-p KEY=VALUE`` (global) and ``-p MODEL:KEY=VALUE`` (model MODEL, counted from 1);
    values are YAML scalars or lists (``0.5``, ``true``, ``[0.2, 0.8]``)."""
    import yaml

    from surgery.core.errors import UsageError

    shared: dict[str, Any] = {}
    per: list[dict[str, Any]] = [dict() for _ in range(n_models)]
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"-p {item!r}: write KEY=VALUE (or MODEL:KEY=VALUE for one model), e.g. -p density=0.5.")
        target = shared
        if ":" in key:
            index, _, key = key.partition(":")
            if not index.strip().isdigit() or not 1 <= int(index) <= n_models:
                raise UsageError(f"-p {item!r}: the model number must be 1 to {n_models} (the models in the order "
                                 f"given), not {index!r}.")
            target = per[int(index) - 1]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if value is None or isinstance(value, dict):
            raise UsageError(f"-p {item!r}: {key} needs a value (a number, true/false, text or a list of numbers).")
        target[key.strip()] = value
    return shared, per


def _per_model(values: list[float] | None, n: int, flag: str) -> list[float] | None:
    from surgery.core.errors import UsageError

    if not values:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{flag} was given {len(values)} times for {n} model(s); give it once (all models) or once per model.")
    return list(values)


def merge(
    models: Annotated[Optional[List[str]], typer.Argument(help="Models to merge, in order (local folders, files, Hub ids org/name[@revision], MODEL+LORA_ADAPTER); or a recipe.yml and the output folder.")] = None,
    output: MergeOutputOpt = None,
    method: Annotated[Optional[str], typer.Option("-m", "--method", help="Merge method (listed below).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base (pretrained) model θ0; the t=0 end for slerp.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="mergekit YAML recipe (instead of -m/--base/MODELS); also accepted as the first argument.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate everything from config files and safetensors headers, print the plan (which output tensor comes from which inputs by which method, output size, estimated memory) and exit 0; nothing is read or written.")] = False,
    param: Annotated[Optional[List[str]], typer.Option("-p", "--param", metavar="[MODEL:]KEY=VALUE", help="A method parameter by mergekit's name, e.g. -p density=0.5 or -p 2:weight=0.3 (model 2 only); repeatable.")] = None,
    weight: Annotated[Optional[List[float]], typer.Option("--weight", "-w", help="Per-model weight; once for all models or once per model (alias of -p weight).")] = None,
    density: Annotated[Optional[List[float]], typer.Option("--density", help="Fraction of each task vector kept; once or per model (alias of -p density).")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Scale of the merged task vector (alias of -p lambda).")] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="Interpolation factor (alias of -p t).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="OPCM's split-rank threshold (alias of -p alpha).")] = None,
    scaling: Annotated[Optional[float], typer.Option("--scaling", help="Scale of continual_task_arithmetic and magmax (alias of -p scaling).")] = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="Divide by the sum of the weights (alias of -p normalize).")] = None,
    rescale: Annotated[Optional[bool], typer.Option("--rescale/--no-rescale", help="Task-vector methods (ties, dare_*, breadcrumbs*, della*): keep each sparsified task vector's L1 norm (alias of -p rescale).")] = None,
    keep_diagonal: Annotated[bool, typer.Option("--keep-diagonal", help="OPCM: keep τ's diagonal in the (U, V) basis (alias of -p keep_diagonal=true).")] = False,
    project_embeddings: Annotated[bool, typer.Option("--project-embeddings", help="OPCM: project embeddings too (alias of -p project_embeddings=true).")] = False,
    decomposition: Annotated[Decomposition, typer.Option("--decomposition", help="Continual methods' SVD: gram (eigh of the smaller Gram matrix, fast) or svd (LAPACK).")] = Decomposition.gram,
    trim_ties: Annotated[TrimTies, typer.Option("--trim-ties", help="TIES: which entries tied at the trim threshold survive: index (lowest flat index first, O(n)) or argsort (mergekit 0.1.5's torch.argsort order: identical to mergekit, slower).")] = TrimTies.index,
    seed: Annotated[int, typer.Option("--seed", help="Seed of random methods (DARE's drops) and of --shuffle.")] = 0,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="Continual methods: shuffle the models with --seed (default: command-line order).")] = False,
    state: Annotated[Optional[Path], typer.Option("--state", metavar="DIR", help="Save the continual-merge state here (atomically).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="DIR", help="Continue the continual merge saved in DIR with MODELS.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Copy tensors some models lack from the base instead of refusing.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Write merged tensors that hold NaN or Inf (refused by default, exit 3 naming the input tensor that carried them).")] = False,
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
    """Merge checkpoints (batch or continual with a resumable state), streaming one tensor at a time."""
    from surgery.core.errors import UsageError
    from surgery.core.executor import executor_for
    from surgery.merge import MergeOptions, MergeRequest, ModelEntry, load_recipe
    from surgery.merge import merge as run

    models = list(models or [])
    if config is None and models and models[0].lower().endswith(RECIPE_SUFFIXES) and Path(models[0]).is_file():
        config, models = Path(models[0]), models[1:]          # mergekit-yaml's form: recipe.yml OUT
    if config is not None and output is None and len(models) == 1:
        output, models = Path(models[0]), []
    if output is None and not dry_run:
        raise UsageError("name the output folder with -o OUT (or after the recipe: surgery merge recipe.yml OUT).")
    aliases: dict[str, Any] = {}
    for key, value in (("lambda", lam), ("t", t), ("alpha", alpha), ("scaling", scaling), ("normalize", normalize),
                       ("rescale", rescale)):
        if value is not None:
            aliases[key] = value
    if keep_diagonal:
        aliases["keep_diagonal"] = True
    if project_embeddings:
        aliases["project_embeddings"] = True
    if config is not None:
        given = [f for f, v in (("-m", method), ("--base", base), ("MODELS", models), ("--weight", weight),
                                ("--density", density), ("--resume", resume), ("-p", param)) if v] + \
            [f"--{k}" for k in aliases]
        if given:
            raise UsageError(f"a recipe gives the method, models and parameters; drop {', '.join(given)} "
                             f"(or put them in {config}).")
        request = load_recipe(config)
    else:
        if not models:
            raise UsageError("name the models to merge (MODEL...), or pass --config recipe.yml.")
        if resume is None and not method:
            raise UsageError("choose a merge method with -m (surgery merge --help lists them).")
        shared, per = _parse_params(list(param or []), len(models))
        for key, value in aliases.items():
            if key in shared:
                raise UsageError(f"{key} is given both as --{key} and as -p {key}=...; give it once.")
            shared[key] = value
        for key, values, flag in (("weight", weight, "--weight"), ("density", density, "--density")):
            for d, v in zip(per, _per_model(values, len(models), flag) or []):
                if key in d:
                    raise UsageError(f"{key} of a model is given both with {flag} and with -p; give it once.")
                d[key] = v
        request = MergeRequest(method or "", base, [ModelEntry(m, p) for m, p in zip(models, per)], shared)
    options = MergeOptions(seed=seed, allow_missing=allow_missing, decomposition=decomposition.value, shuffle=shuffle,
                           trim_ties=trim_ties.value, device=device, state_dir=state, resume_dir=resume,
                           allow_nonfinite=allow_nonfinite)
    with executor_for(ray, device=device, resume_run=resume_run) as executor:
        result = run(request, output, options=options, dtype=dtype, shard_size=shard_size, force=force,
                     progress=_render.progress(quiet), dry_run=dry_run, executor=executor)
    for warning in result.report.get("warnings", []):
        _render.log(f"warning: {warning}")
    if dry_run:
        _common.finish(result, as_json=as_json, human=_plan_table)
        return

    def human(console, doc) -> None:
        console.print(f"method: {doc['method']}   models, in order: {', '.join(doc['order'])}")
        if doc["steps"]:
            from rich.table import Table

            table = Table("step", "model", "‖τ‖", "‖S_t‖", "λ_t")
            for s in doc["steps"]:
                table.add_row(str(s["step"]), s["model"], _render.fmt_num(s.get("tau_norm")),
                              _render.fmt_num(s.get("merged_norm")), _render.fmt_num(s.get("lambda")))
            console.print(table)
        if doc["state"]:
            console.print(f"continual state saved in {doc['state']}")

    _common.finish(result, as_json=as_json, human=human, push_to_hub=push_to_hub, private=private)


def _plan_table(console: Any, doc: dict[str, Any]) -> None:
    """The dry-run plan: the inputs, slices and every output tensor's sources."""
    from rich.table import Table

    console.print(f"method: {doc['method']}   config and tokenizer from: {doc.get('donor') or doc.get('base')}")
    for s in doc.get("slices") or []:
        srcs = ", ".join(f"{x['model']}[{x['layer_range'][0]}:{x['layer_range'][1]}]" for x in s["sources"])
        console.print(f"slice {s['slice']}: {s['layers']} layer(s) from {srcs}"
                      + (f" (base {s['base']})" if s.get("base") else ""))
    if doc.get("vocabulary"):
        v = doc["vocabulary"]
        console.print(f"vocabulary: {v['source']}, {v['tokens']} tokens, {v['rows']} rows")
    if doc.get("config_update"):
        console.print("config.json: " + ", ".join(f"{k} = {v}" for k, v in doc["config_update"].items()))
    if doc.get("tensors"):
        table = Table("output tensor", "shape", "how", "inputs", "t")
        for t in doc["tensors"]:
            if t["how"] == "copy":
                inputs = f"{t['source']['model']}: {t['source']['tensor']}"
            else:
                srcs = ([t["base"]] if t.get("base") else []) + t["models"]
                inputs = "; ".join(f"{x['model']}: {x['tensor']}" + (" (base)" if k == 0 and t.get("base") else "")
                                   for k, x in enumerate(srcs))
            table.add_row(t["name"], "×".join(map(str, t["shape"])) or "scalar", t["how"], inputs,
                          _render.fmt_num(t.get("t")) if t["how"] != "copy" else "")
        console.print(table)
    console.print(f"{doc['num_tensors']} tensors, output {_render.fmt_bytes(doc['output_bytes'])}"
                  + (f", estimated working memory {_render.fmt_bytes(doc['estimated_memory_bytes'])}"
                     if doc.get("estimated_memory_bytes") else "") + "; nothing written (--dry-run).")


add_examples(merge, EXAMPLES)


def register(app: typer.Typer) -> None:
    """Add `surgery merge` to the app."""
    app.command("merge", cls=MergeCommand)(merge)
