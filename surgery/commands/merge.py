"""`surgery merge`: linear, task arithmetic, TIES, DARE, SLERP and continual merging (OPCM,
continual task arithmetic / weight average, MagMax) with a resumable state, or a mergekit-style recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from . import _common, _render
from ._params import (DEFAULT_SHARD_SIZE, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, OutputOpt, PrivateOpt, PushOpt,
                      QuietOpt, ShardSizeOpt)

EXAMPLES = [
    "surgery merge -m ties --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "--density 0.5 -o out/ties",
    "surgery merge -m task_arithmetic --base B A1 A2 --weight 1.0 --weight 0.5 --lambda 0.8 -o out/ta",
    "surgery merge -m slerp --base A B --t 0.3 -o out/slerp",
    "surgery merge -m opcm --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b "
    "--state out/opcm-state -o out/opcm-ab",
    "surgery merge --resume out/opcm-state fixtures/llama-tiny/ft-c --state out/opcm-state -o out/opcm-abc",
    "surgery merge --config recipe.yml -o out/merged --dtype bfloat16",
]

METHOD_NAMES = ("linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, opcm, continual_task_arithmetic, "
                "continual_weight_average, magmax")


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
    output: OutputOpt,
    models: Annotated[Optional[List[str]], typer.Argument(help="Models to merge, in order (local folders, files or Hub ids).")] = None,
    method: Annotated[Optional[str], typer.Option("-m", "--method", help=f"Merge method: {METHOD_NAMES}.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base (pretrained) model θ0; the t=0 end for slerp.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="mergekit-style YAML recipe (instead of -m/--base/MODELS).")] = None,
    weight: Annotated[Optional[List[float]], typer.Option("--weight", "-w", help="Per-model weight; once for all models or once per model.")] = None,
    density: Annotated[Optional[List[float]], typer.Option("--density", help="Fraction of each task vector kept (ties, dare_*); once or per model.")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Global scale of the merged task vector (task_arithmetic, ties, dare_*).")] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="SLERP interpolation parameter (0 = base, 1 = the model).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="OPCM split-rank threshold on cumsum(σ)/Σσ (default 0.5).")] = None,
    scaling: Annotated[Optional[float], typer.Option("--scaling", help="Scale of continual_task_arithmetic (0.3) and magmax (0.5).")] = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="Divide by the sum of the weights (default per method, as mergekit).")] = None,
    rescale: Annotated[Optional[bool], typer.Option("--rescale/--no-rescale", help="DARE: divide survivors by the density (default on).")] = None,
    keep_diagonal: Annotated[bool, typer.Option("--keep-diagonal", help="OPCM: keep the diagonal of τ in the (U, V) basis.")] = False,
    project_embeddings: Annotated[bool, typer.Option("--project-embeddings", help="OPCM: project embeddings too (default: summed like biases).")] = False,
    decomposition: Annotated[str, typer.Option("--decomposition", help="OPCM's SVD: gram (eigh of the smaller Gram matrix, fast) or svd (LAPACK).")] = "gram",
    trim_ties: Annotated[str, typer.Option("--trim-ties", help="TIES: which entries tied at the trim threshold survive: index (lowest flat index first, O(n), default) or argsort (mergekit 0.1.5's torch.argsort order: identical to mergekit, slower).")] = "index",
    seed: Annotated[int, typer.Option("--seed", help="Seed for DARE's drops and --shuffle.")] = 0,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="Continual methods: shuffle the models with --seed (default: command-line order).")] = False,
    state: Annotated[Optional[Path], typer.Option("--state", metavar="DIR", help="Save the continual-merge state here (atomically).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="DIR", help="Continue the continual merge saved in DIR with MODELS.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Copy tensors some models lack from the base instead of refusing.")] = False,
    dtype: DtypeOpt = None,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge checkpoints (batch or continual with a resumable state), streaming one tensor at a time."""
    from surgery.core.errors import UsageError
    from surgery.merge import MergeOptions, MergeRequest, ModelEntry, load_recipe
    from surgery.merge import merge as run

    models = list(models or [])
    params: dict[str, Any] = {}
    for key, value in (("lambda", lam), ("t", t), ("alpha", alpha), ("scaling", scaling), ("normalize", normalize),
                       ("rescale", rescale)):
        if value is not None:
            params[key] = value
    if keep_diagonal:
        params["keep_diagonal"] = True
    if project_embeddings:
        params["project_embeddings"] = True
    if config is not None:
        given = [f for f, v in (("-m", method), ("--base", base), ("MODELS", models), ("--weight", weight),
                                ("--density", density), ("--resume", resume)) if v] + [f"--{k}" for k in params]
        if given:
            raise UsageError(f"--config takes the method, models and parameters from the recipe; drop {', '.join(given)} "
                             f"(or put them in {config}).")
        request = load_recipe(config)
    else:
        if not models:
            raise UsageError("name the models to merge (MODEL...), or pass --config recipe.yml.")
        if resume is None and not method:
            raise UsageError(f"choose a merge method with -m: {METHOD_NAMES}.")
        per = [dict() for _ in models]
        for key, values, flag in (("weight", weight, "--weight"), ("density", density, "--density")):
            vals = _per_model(values, len(models), flag)
            for d, v in zip(per, vals or []):
                d[key] = v
        request = MergeRequest(method or "", base, [ModelEntry(m, p) for m, p in zip(models, per)], params)
    if shuffle and resume is None and request.method and not request.method.startswith(("opcm", "continual", "magmax")):
        raise UsageError("--shuffle only applies to continual methods (opcm, continual_*, magmax).")
    options = MergeOptions(seed=seed, allow_missing=allow_missing, decomposition=decomposition, shuffle=shuffle,
                           trim_ties=trim_ties, device=device, state_dir=state, resume_dir=resume)
    result = run(request, output, options=options, dtype=dtype, shard_size=shard_size, force=force,
                 progress=_render.progress(quiet))

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


merge.__doc__ += "\n\nExamples:\n\n" + "\n\n".join(f"  {e}" for e in EXAMPLES)  # type: ignore[operator]


def register(app: typer.Typer) -> None:
    """Add `surgery merge` to the app."""
    app.command("merge")(merge)
