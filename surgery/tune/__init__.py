"""``surgery tune``: choose a merge by the models' perplexity on the user's probe texts.

Searches the declared search ranges of one or several batch merge methods (weights, density,
λ, ...; optionally each model's weight per layer group) for the lowest objective — the mean,
the worst, or a weighted mean of the probes' log perplexities — on the first part of every
probe text, within a time budget and a trial count; then writes the best merge
(:func:`surgery.merge.merge`), its mergekit-style recipe, and a report whose perplexities
come from the held-out last part of every probe. See docs/tune.md.

Layout of the output folder::

    OUT/model/        the merged checkpoint (surgery merge --config OUT/recipe.yml gives the same bytes)
    OUT/recipe.yml    the winning recipe
    OUT/report.json   every trial, the Pareto front, held-out numbers, timings
    OUT/report.md     the same as a page
    OUT/pareto.png    the figure (when matplotlib is installed)
    OUT/trials.jsonl  the log (resume or extend the search with --resume OUT/trials.jsonl)

While it runs, the log is kept at ``OUT.tune.jsonl`` beside the output, rewritten after every
trial; an interrupted run continues with ``--resume OUT.tune.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import UsageError
from ..core.output import atomic_output, check_output
from ..core.progress import Progress, ensure
from ..core.result import Result
from ..eval.perplexity import read_text
from ..merge.inputs import Inputs
from ..merge.recipe import MergeRequest, ModelEntry, load_recipe
from ..merge.registry import METHODS, get_method
from .evaluate import Evaluator, file_identity
from .log import check_setup, log_text, read_log, write_log
from .search import Stop, objective, pareto, search
from .space import Space, group_filters, recipe_dict

OBJECTIVES = ("mean", "worst", "weighted")
# what `tune auto` searches: batch methods that are deterministic and cheap per trial. TSV-M's
# decompositions are computed once and rescaled per trial; Iso-C / Iso-CTS only search their
# scale, after decompositions that take one to three minutes on a 135M model and two CPU cores,
# and start far behind at their defaults, so auto leaves them to an explicit `tune iso_c`.
# breadcrumbs_ties is the cheap sparsifying one (deterministic, unlike DARE's random drops).
AUTO_METHODS = ("task_arithmetic", "ties", "breadcrumbs_ties", "tsv")
# time kept back for what the budget cannot see from inside: interpreter start, imports, exit
BUDGET_MARGIN_S, BUDGET_MARGIN_SHARE = 5.0, 0.02
MAX_HELD_OUT_FRONT = 6
# multi-fidelity: trials are ranked on a few windows of each probe's search part (the
# surrogate); the best RESCORE_TOP of them, and the best starting point (a method's defaults,
# when the search moved away from them), are scored on the whole search parts before the
# winner is chosen
DEFAULT_SEARCH_WINDOWS = 3
RESCORE_TOP = 3


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds of ``10m``, ``90s``, ``1h``, ``1h30m`` or a plain number of seconds (None: no limit).

    Raises:
        UsageError: Not a duration.
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or m is None or not any(m.groups()):
        raise UsageError(f"`budget` {text!r} is not a duration; write e.g. 10m, 90s, 1h30m or a number of seconds.")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + se


def parse_windows(text: int | str | None) -> int:
    """``--search-windows``: a count of windows, or ``all``/``0``/None for every window (0).

    Raises:
        UsageError: Neither a non-negative count nor ``all``.
    """
    if text is None:
        return 0
    t = str(text).strip().lower()
    if t == "all":
        return 0
    if not re.fullmatch(r"\d+", t):
        raise UsageError(f"`search_windows` {text!r} must be a number of windows per probe (e.g. 3) or all.")
    return int(t)


def parse_probe(text: str) -> tuple[str, str, float]:
    """``NAME=FILE`` or ``NAME=FILE@WEIGHT`` (weight for the ``weighted`` objective) -> (name, file, weight)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UsageError(f"`probe` {text!r} must be NAME=FILE (e.g. code=code.txt), optionally NAME=FILE@WEIGHT.")
    path, weight = rest, 1.0
    m = re.fullmatch(r"(.*)@([0-9]*\.?[0-9]+(?:e-?\d+)?)", rest)
    if m:
        path, weight = m.group(1), float(m.group(2))
    if not weight > 0:
        raise UsageError(f"`probe` {text!r}: the weight must be positive.")
    return name.strip(), path, weight


def _template(target: str, base: str | None, models: list[str], dtype: str | None) -> tuple[MergeRequest, list[str]]:
    """The template request and the methods to search, from a recipe or a method list."""
    p = Path(target)
    if p.suffix.lower() in (".yml", ".yaml") or p.is_file():
        req = load_recipe(p)
        if req.slices is not None or req.tokenizer is not None:
            raise UsageError(f"recipe {p}: tune searches whole-model merges; drop "
                             f"{'slices' if req.slices is not None else 'the tokenizer settings'} to tune it.", path=p)
        entries = [ModelEntry(m) for m in models] if models else req.models
        req = dataclasses.replace(req, base=base or req.base, dtype=dtype or req.dtype,
                                  models=[m for m in entries if m.location != (base or req.base)])
        return req, [req.method]
    names = list(AUTO_METHODS) if target.strip() == "auto" else [t.strip() for t in target.split(",") if t.strip()]
    if not names:
        raise UsageError("name a merge method, a comma-separated list of methods, 'auto', or a recipe file to tune.")
    for n in names:
        get_method(n)
    return MergeRequest(names[0], base, [ModelEntry(m) for m in models], {}, dtype), names


def searchable_methods() -> list[str]:
    """Batch methods with at least one declared search range (what tune can search)."""
    return [n for n, m in METHODS.items() if m.kind == "batch" and any(p.search for p in m.params)]


def tune(target: str, *, base: str | None, models: list[str], probes: list[str], output: str | Path,
         groups: bool = False, budget: str | float | None = "10m", trials: int | None = None, seed: int = 0,
         objective_kind: str = "mean", holdout: float = 0.5, ctx: int | None = None, stride: int | None = None,
         batch_size: int = 8, search_windows: int | str | None = DEFAULT_SEARCH_WINDOWS,
         extrapolate: bool = False, dtype: str | None = None, shard_size: str | int = "5GB", force: bool = False,
         resume: str | Path | None = None, references: bool = True, device: str = "cpu",
         progress: Progress | None = None, on_trial: Callable[[dict[str, Any]], None] | None = None) -> Result:
    """Search merge settings on probe texts and write the best merge, its recipe and a report.

    Args:
        target: A method (``ties``), a comma-separated list of methods, ``auto`` (task_arithmetic,
            ties, breadcrumbs_ties, tsv) or a mergekit-style recipe whose method, base, models and
            fixed settings are the starting point.
        base: θ0 (may come from the recipe).
        models: The fine-tunes (may come from the recipe).
        probes: ``NAME=FILE[@WEIGHT]`` texts, one per domain.
        output: Output folder (see the module docstring for its layout).
        groups: Also search each model's weight per layer group (attention, MLP, rest).
        budget: Wall-time budget of the whole run (``10m``; None: no limit).
        trials: At most this many evaluated candidates (None: no limit).
        seed: Orders the search (and seeds random methods such as DARE).
        objective_kind: ``mean``, ``worst`` or ``weighted`` log perplexity over the probes.
        holdout: Share of each probe's tokens kept out of the search for the report.
        ctx, stride, batch_size: Perplexity windows (default: ``eval ppl``'s ctx, disjoint windows).
        search_windows: Windows of each probe's search part a trial is ranked on (evenly spaced,
            placed by the seed); the best few trials are then scored on the whole search parts
            and the winner is chosen on those. 0 or None: every trial scores every window.
        extrapolate: Search the scales (weights, ``lambda``, ``scaling_factor``) over their
            whole declared range (up to 2); by default they stop at 1 (see
            :data:`surgery.tune.space.SCALES`).
        dtype: Output dtype (default: the inputs'); candidates are scored rounded to it.
        shard_size, force: As for ``merge``.
        resume: A log of an earlier run with the same setup: its trials are replayed, not re-run.
        references: Also score the base and every model on the report parts (if the budget allows).
        device: Where the forward passes and the merge math run.
        progress: Progress sink (its description carries the best objective so far).
        on_trial: Called with each trial's record as it finishes (the command logs one line).

    Returns:
        A Result whose ``written`` is OUT/model and whose report holds every trial, the Pareto
        front, the held-out numbers and the timings.

    Raises:
        UsageError: Bad flags, unknown or unsearchable methods, a probe too short, a log of
            another setup, an existing output without ``force``.
        InputError: Unreadable inputs or probe files.
    """
    t_start = time.perf_counter()
    progress = ensure(progress)
    if objective_kind not in OBJECTIVES:
        raise UsageError(f"unknown `objective` {objective_kind!r}; choose one of {', '.join(OBJECTIVES)}.")
    if not 0.0 < holdout < 1.0:
        raise UsageError(f"`holdout` must be between 0 and 1 (the share of each probe kept for the report), got {holdout}.")
    if trials is not None and trials < 1:
        raise UsageError(f"`trials` must be at least 1, got {trials}.")
    search_windows = parse_windows(search_windows)
    budget_s = parse_duration(budget)
    if budget_s is not None and budget_s <= 0:
        raise UsageError(f"`budget` must be positive, got {budget!r}.")
    template, method_names = _template(target, base, models, dtype)
    if not template.base:
        raise UsageError("tune needs a base model (`base`, or base_model in the recipe).")
    if not template.models:
        raise UsageError("tune needs at least one model to merge besides the base.")
    for n in method_names:
        m = get_method(n)
        if m.kind != "batch" or not any(p.search for p in m.params):
            raise UsageError(f"tune cannot search {n!r}; it searches the batch methods with declared ranges: "
                             f"{', '.join(searchable_methods())}.")
        if len(template.models) < m.min_models or (m.max_models is not None and len(template.models) > m.max_models):
            raise UsageError(f"merge method {n!r} takes {m.min_models}"
                             f"{'' if m.max_models == m.min_models else '+'} model(s); tune got {len(template.models)}.")
    if not probes:
        raise UsageError("give at least one probe text: `probe` NAME=FILE (e.g. `probe` code=code.txt).")
    parsed = [parse_probe(p) for p in probes]
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise UsageError(f"probe names must be unique; got {', '.join(names)}.")
    texts = [(n, path, read_text(path), w) for n, path, w in parsed]
    weights = {n: w for n, _, w in parsed}

    with Inputs(device) as opened:               # headers only: what the output must not touch
        for where, text in [("base", template.base)] + [(f"model {m.location}", m.location) for m in template.models]:
            opened.open(text, where)
        input_paths = opened.input_paths() + [Path(p[1]) for p in parsed]
    out = Path(output)
    if template.origin:
        input_paths.append(Path(template.origin))
    check_output(out, force=force, inputs=input_paths)
    log_path = out.with_name(out.name + ".tune.jsonl")
    if resume is None and log_path.exists() and not force:
        raise UsageError(f"a log of an earlier run is at {log_path}; continue it with `resume` {log_path}, or pass "
                         f"`force` to start over.", path=log_path)

    progress.start(0, "tune: loading the model and the inputs")
    progress.close()
    ev = Evaluator(template.base, [m.location for m in template.models], texts, holdout=holdout, ctx=ctx,
                   stride=stride, batch_size=batch_size, search_windows=search_windows, seed=seed, device=device)
    filters = group_filters(ev.base.names) if groups else None
    spaces = [Space(get_method(n), dataclasses.replace(template, method=n), extrapolate=extrapolate)
              for n in method_names]
    setup = {"base": file_identity(template.base), "models": [file_identity(m.location) for m in template.models],
             "probes": [{"name": p.name, "sha256": p.sha256, "tokens": p.tokens, "weight": p.weight}
                        for p in ev.probes],
             "holdout": holdout, "ctx": ev.probes[0].search.ctx, "stride": ev.probes[0].search.stride,
             "objective": objective_kind, "seed": seed, "methods": method_names, "groups": groups,
             "dtype": template.dtype, "template": recipe_dict(template) | {"merge_method": None}}
    if not ev.exact:            # (absent when exact: logs of the exact search stay resumable)
        setup["search_windows"] = {p.name: p.windows for p in ev.probes}
    if extrapolate:
        setup["extrapolate"] = True
    cache: dict[str, dict[str, Any]] = {}
    replayed_from: str | None = None
    if resume is not None:
        saved, old = read_log(resume)
        check_setup(saved, setup, resume)
        cache = {t["key"]: t for t in old if t.get("kind", "trial") == "trial"}
        replayed_from = str(resume)
    records: list[dict[str, Any]] = []
    state = {"evaluated": 0, "replayed": 0, "best": math.inf, "stopped": "the search converged",
             "trial_seconds": [], "merge_seconds": [], "score_seconds": [], "prepare_seconds": 0.0,
             "by_method": {}, "pruned": 0, "rescore_seconds": 0.0}
    spaces_by_key: dict[str, tuple[Space, list[float]]] = {}
    log_inputs = input_paths + [out]
    margin = 0.0 if budget_s is None else BUDGET_MARGIN_S + BUDGET_MARGIN_SHARE * budget_s

    def remaining() -> float:
        return math.inf if budget_s is None else budget_s - margin - (time.perf_counter() - t_start)

    def typical(kind: str) -> float:
        xs = state[kind]
        return sorted(xs)[len(xs) // 2] if xs else 0.0

    def expected(method: str) -> float:
        # a trial of this method: its own slowest so far, else the slowest of any method
        xs = state["by_method"].get(method) or state["trial_seconds"]
        return max(xs) if xs else 0.0

    def per_token() -> float:
        # forward time per token, from the trials that scored their whole surrogate
        return typical("score_seconds") / max(1, ev.tokens("surrogate"))

    def rescore_cost() -> float:
        # the best few trials scored on the whole search parts (with their merges)
        if ev.exact:
            return 0.0
        return (RESCORE_TOP + 1) * (typical("merge_seconds") + per_token() * ev.tokens("search"))

    def final_reserve() -> float:
        # the re-scoring, the winner's held-out score and the final merge: a report part costs
        # about what a search part does per token; the written merge about 3x the in-memory one plus I/O
        write = 3 * typical("merge_seconds") + ev.base.nbytes() * (len(ev.models) + 2) / 150e6
        return rescore_cost() + per_token() * ev.tokens("report") + typical("merge_seconds") + write

    def evaluate(space: Space, x: list[float], phase: str) -> float:
        key = space.key(x)
        spaces_by_key.setdefault(key, (space, list(x)))
        for r in records:
            if r["key"] == key:
                return r["objective"]
        rec = cache.get(key)
        if rec is not None:
            rec = {**rec, "phase": phase, "replayed": True}
            state["replayed"] += 1
        else:
            if trials is not None and state["evaluated"] >= trials:
                state["stopped"] = f"the trial limit ({trials}) was reached"
                raise Stop
            if state["trial_seconds"] and remaining() < expected(space.method.name) * 1.1 + final_reserve():
                state["stopped"] = "the time budget was spent"
                raise Stop
            t0 = time.perf_counter()
            filled, dropped = ev.cache_state()
            request = space.request(x)
            ev.load(request, seed=seed)
            prepare = 0.0
            fills, drops = ev.cache_state()
            if fills != filled and drops == dropped:
                # this merge computed what is kept across trials (TSV-M's factors, trimming's |τ|
                # order) for the first time: a one-time cost of the method, reported apart. The
                # trial's own merge is timed again with everything cached (the same bytes)
                prepare = time.perf_counter() - t0
                ev.load(request, seed=seed)
            t1 = time.perf_counter()
            # raced against the best so far: stopped once it provably cannot beat it
            incumbent = state["best"]
            nll, lower, share = ev.race(lambda lb: objective(lb, objective_kind, weights) >= incumbent)
            seconds = time.perf_counter() - t0 - prepare
            state["evaluated"] += 1
            state["trial_seconds"].append(seconds)
            state["by_method"].setdefault(space.method.name, []).append(seconds)
            state["merge_seconds"].append(t1 - t0 - prepare)
            if share >= 1.0:
                state["score_seconds"].append(time.perf_counter() - t1)
            state["prepare_seconds"] += prepare
            rec = {"kind": "trial", "key": key, "method": space.method.name, "settings": space.settings(x),
                   "nll": nll, "seconds": round(seconds, 3), "merge_seconds": round(t1 - t0 - prepare, 3),
                   "prepare_seconds": round(prepare, 3), "phase": phase,
                   "fidelity": "full" if ev.exact else "surrogate"}
            if share < 1.0:
                state["pruned"] += 1
                rec.update(pruned=True, scored_share=round(share, 4), nll_lower_bound=lower)
        # a pruned trial's objective is its lower bound (not below the best when it was stopped)
        rec["objective"] = objective(rec["nll_lower_bound"] if rec.get("pruned") else rec["nll"], objective_kind,
                                     weights)
        rec["x"] = list(x)
        records.append(rec)
        state["best"] = min(state["best"], rec["objective"])
        write_log(log_path, setup, [_loggable(r) for r in records], log_inputs)
        progress.start(trials or 0, f"tune: best {state['best']:.4f} ({objective_kind} log ppl) after")
        progress.advance(len(records))
        if on_trial is not None:
            on_trial({**rec, "index": len(records) - 1, "best": state["best"]})
        return rec["objective"]

    def to_groups(p):
        from .search import Point

        grouped, x = p.space.grouped(filters, p.x)
        return Point(grouped, x, p.value)

    try:
        best = search(spaces, evaluate, seed=seed, group_space=to_groups if groups else None)
    finally:
        progress.close()
    if best is None:
        raise UsageError(f"the budget ({budget}) ended before the first candidate was scored; give a larger "
                         f"`budget`.")
    winner_key = best.space.key(best.x)
    if not ev.exact:
        winner_key = _rescore(records, spaces_by_key, ev, seed, objective_kind, weights, remaining, state,
                              lambda: (typical("merge_seconds") + per_token() * ev.tokens("search")) * 1.1
                              + final_reserve() - rescore_cost(), progress)
        write_log(log_path, setup, [_loggable(r) for r in records], log_inputs)
    winner = next(i for i, r in enumerate(records) if r["key"] == winner_key)
    best_space, best_x = spaces_by_key[winner_key]
    complete = [i for i, r in enumerate(records) if not r.get("pruned")]
    front = [complete[i] for i in pareto([records[i] for i in complete])]

    # ---- held-out numbers: the winner always; then the methods' starting points, the Pareto
    # front and the references while the budget allows
    held: list[dict[str, Any]] = []
    report_cost = typical("merge_seconds") + per_token() * ev.tokens("report")

    def held_out(label: str, kind: str, load: Callable[[], None], extra: dict[str, Any] | None = None) -> None:
        load()
        nll = ev.score("report")
        row = {"label": label, "kind": kind, "nll": nll, "objective": objective(nll, objective_kind, weights),
               **(extra or {})}
        held.append(row)

    def space_of(rec):
        return spaces_by_key[rec["key"]][0]

    held_out(f"best: trial {winner} ({records[winner]['method']})", "best", lambda: ev.load(best_space.request(best_x), seed=seed),
             {"trial": winner})
    optional: list[tuple[str, str, Callable[[], None], dict[str, Any]]] = []
    for i, r in enumerate(records):
        if r["phase"] == "screen" and i != winner:
            s, x = space_of(r), r["x"]
            optional.append((f"start: {r['method']} (trial {i})", "start",
                             lambda s=s, x=x: ev.load(s.request(x), seed=seed), {"trial": i}))
    if references:
        optional.append(("base", "reference", lambda: ev.load_checkpoint(ev.base), {}))
        for m, mc in zip(template.models, ev.models):
            optional.append((f"model {m.location}", "reference", lambda mc=mc: ev.load_checkpoint(mc), {}))
    for i in front[:MAX_HELD_OUT_FRONT]:
        if i != winner:
            s, x = space_of(records[i]), records[i]["x"]
            optional.append((f"Pareto: trial {i} ({records[i]['method']})", "pareto",
                             lambda s=s, x=x: ev.load(s.request(x), seed=seed), {"trial": i}))
    skipped = 0
    for label, kind, load, extra in optional:
        write_cost = 3 * typical("merge_seconds") + ev.base.nbytes() * (len(ev.models) + 2) / 150e6
        if remaining() < report_cost * 1.2 + write_cost:
            skipped += 1
            continue
        held_out(label, kind, load, extra)

    # ---- the output folder
    request = best_space.request(best_x)
    report: dict[str, Any] = {
        "method": request.method, "objective": objective_kind, "seed": seed, "groups": groups,
        "extrapolate": extrapolate,
        "best": {"trial": winner, "method": request.method, "settings": records[winner]["settings"],
                 "search_nll": records[winner].get("full_nll", records[winner]["nll"]),
                 "surrogate_nll": None if ev.exact else records[winner]["nll"], "held_out_nll": held[0]["nll"],
                 "held_out_perplexity": {k: _exp(v) for k, v in held[0]["nll"].items()},
                 "objective": records[winner].get("full_objective", records[winner]["objective"]),
                 "held_out_objective": held[0]["objective"]},
        "search_windows": None if ev.exact else {p.name: {"scored": len(p.windows), "of": len(p.search.windows),
                                                          "indices": p.windows} for p in ev.probes},
        "rescored": [i for i, r in enumerate(records) if "full_nll" in r] if not ev.exact else [],
        "rescore_seconds": state["rescore_seconds"],
        "probes": [{"name": p.name, "path": p.path, "tokens": p.tokens, "weight": p.weight,
                    "search_tokens": int(p.search.ids.numel()), "report_tokens": int(p.report.ids.numel())}
                   for p in ev.probes],
        "ctx": ev.probes[0].search.ctx, "stride": ev.probes[0].search.stride, "holdout": holdout,
        "trials": [_reported(r) for r in records], "pareto": front, "held_out": held,
        "held_out_skipped": skipped, "trials_evaluated": state["evaluated"], "trials_replayed": state["replayed"],
        "trials_pruned": sum(1 for r in records if r.get("pruned")),
        "resumed_from": replayed_from, "stopped": state["stopped"],
        "trial_seconds_median": typical("trial_seconds"), "setup_seconds": ev.setup_seconds,
        "prepare_seconds": state["prepare_seconds"], "factor_cache_peak_bytes": ev.factor_cache.peak_bytes,
        "sorted_cache_bytes": ev.sorted_cache.nbytes,
        "recipe": recipe_dict(request), "budget_seconds": budget_s,
    }
    from ..merge import MergeOptions, merge
    from . import report as pages

    factor_cache = ev.factor_cache            # the final merge reuses the decompositions
    del ev
    with atomic_output(out, force=force, inputs=input_paths) as tmp:
        written = merge(request, tmp / "model", options=MergeOptions(seed=seed, device=device,
                                                                      factor_cache=factor_cache), dtype=dtype,
                        shard_size=shard_size, progress=progress).written
        import yaml

        (tmp / "recipe.yml").write_text(yaml.safe_dump(recipe_dict(request), sort_keys=False))
        (tmp / "trials.jsonl").write_text(log_text(setup, [_loggable(r) for r in records]))
        report["seconds"] = time.perf_counter() - t_start
        (tmp / "report.md").write_text(pages.markdown(report))
        try:
            pages.plot(report, tmp / "pareto.png", inputs=input_paths)
            report["plot"] = str(out / "pareto.png")
        except UsageError:
            report["plot"] = None           # matplotlib is an optional extra
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if log_path.exists():
        log_path.unlink()
    final = out / "model"
    written = dataclasses.replace(written, output=final, files=[final / f.name for f in written.files])
    report["seconds"] = time.perf_counter() - t_start
    report["output_folder"] = str(out)
    return Result(report, written)


def _exp(v: float) -> float:
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def _rescore(records: list[dict[str, Any]], spaces_by_key: dict[str, Any], ev: Evaluator, seed: int,
             objective_kind: str, weights: dict[str, float], remaining: Callable[[], float], state: dict[str, Any],
             need: Callable[[], float], progress: Progress) -> str:
    """Score the best starting point (the screened trial with the lowest surrogate objective)
    and the best :data:`RESCORE_TOP` trials by their surrogate on the whole search parts (the
    best trial and the best start always, the others while the budget allows), and return the
    key of the best by that full score. So the winner is never worse on the whole search parts
    than the start it was searched from. Trials re-scored by an earlier run (their log has
    ``full_nll``) are not scored again."""
    complete = sorted((r for r in records if not r.get("pruned")), key=lambda r: r["objective"])
    ranked = complete[:RESCORE_TOP]
    start = next((r for r in complete if r["phase"] == "screen"), None)
    if start is not None and start not in ranked:
        ranked.insert(1, start)
    progress.start(len(ranked), "tune: the best trials on the whole search parts")
    try:
        for n, r in enumerate(ranked):
            if "full_nll" not in r:
                if n > 0 and r is not start and remaining() < need():
                    continue
                t0 = time.perf_counter()
                space, x = spaces_by_key[r["key"]]
                ev.load(space.request(x), seed=seed)
                r["full_nll"] = ev.score("search")
                r["full_objective"] = objective(r["full_nll"], objective_kind, weights)
                r["full_seconds"] = round(time.perf_counter() - t0, 3)
                state["rescore_seconds"] += time.perf_counter() - t0
            progress.advance(n + 1)
    finally:
        progress.close()
    full = [r for r in records if "full_nll" in r]
    return min(full, key=lambda r: r["full_objective"])["key"]


def _loggable(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("replayed",)}


def _reported(r: dict[str, Any]) -> dict[str, Any]:
    return {"method": r["method"], "phase": r["phase"], "settings": r["settings"], "nll": r["nll"],
            "perplexity": {k: _exp(v) for k, v in r["nll"].items()}, "objective": r["objective"],
            "seconds": r.get("seconds"), "merge_seconds": r.get("merge_seconds"),
            "prepare_seconds": r.get("prepare_seconds") or 0.0,
            "replayed": bool(r.get("replayed")), "pruned": bool(r.get("pruned")),
            "fidelity": r.get("fidelity", "full"),
            **({"full_nll": r["full_nll"], "full_objective": r["full_objective"],
                "full_perplexity": {k: _exp(v) for k, v in r["full_nll"].items()}} if "full_nll" in r else {}),
            **({"scored_share": r["scored_share"], "nll_lower_bound": r["nll_lower_bound"]} if r.get("pruned") else {})}
