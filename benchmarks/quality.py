"""Merge quality on the real SmolLM2-135M workload: every merge method at its defaults, a few
methods tuned by `surgery tune`, held-out perplexity per domain, wall time and peak RSS.

Rows (each merge or tune a whole process under ``/usr/bin/time -v``):

- *reference*: the base and each fine-tune (ft-code, ft-license, ft-prose), unmerged;
- *default*: ``surgery merge -m METHOD [--base BASE] ft-code ft-license ft-prose`` with no
  parameters, for every registered method that merges three models onto a base (batch methods
  that take ≥ 3 models; the continual ones merge the three in order); ``linear`` ignores a
  base, so it merges the three fine-tunes alone;
- *baseline*: task arithmetic λ = 0.5 (``-p lambda=0.5``), the issue's reference merge;
- *tuned*: ``surgery tune METHOD --base BASE ft-... --probe code=... --probe license=...
  --probe prose=... --budget B --ctx 128`` (``--tune-methods``; ``auto`` searches tune's
  default methods), then its written merge is evaluated like every other row.

Held-out perplexity is ``surgery eval ppl --ctx 128 --stride 128`` on each domain's held-out
windows (benchmarks/workload.py's ``chunks``: the last 4 windows of code and license text, the
last window of prose; never trained on), the same numbers benchmarks/merge.py reports. The
geometric mean is over those three domains. One more column, *prose (unseen)*, scores
benchmarks/data/prose-heldout.txt, prose that neither the fine-tunes nor tune ever saw.

The probes tune searches on come from the *training* side of the split only: ``--probe-windows``
windows (default 16) evenly spaced over each domain's training windows, decoded to text. Tune
splits each probe into a search half and a report half of its own; the table reports on the
workload's held-out windows, which tune never sees.

Checks printed at the end (issue #15's goals): each tuned merge's geometric mean against task
arithmetic λ = 0.5 (≥ 5 % lower) and per domain within 15 % of that domain's own fine-tune;
tune's whole process within ``--budget``; each trial after the first ≤ 0.3× one ``surgery
merge`` + ``surgery eval ppl`` run, timed in the same invocation (the task-arithmetic merge and
one ``eval ppl`` of the probes' search halves, concatenated: the text a trial scores).

    python benchmarks/quality.py [--methods all|none|M1,M2] [--tune-methods task_arithmetic,ties,dare_ties,tsv,auto]
                                 [--budget 10m] [--probe-windows 16] [--out docs/benchmarks/quality.md]

Only the tune row and its reference (one merge + one eval ppl, and task arithmetic λ = 0.5):
``python benchmarks/quality.py --methods none --tune-methods auto --budget 10m`` (kept rows of
other methods stay on the page).

Rows are kept in ~/.cache/surgery/bench-quality.json (``--results``) by label, so subsets can
be run separately; the page (and quality.png beside it) is rendered from all kept rows.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from merge import DOMAINS, _commit, heldout_ppl, heldout_texts, machine, measured, surgery_cmd  # noqa: E402

DOC = ROOT / "docs" / "benchmarks" / "quality.md"
RESULTS = Path.home() / ".cache" / "surgery" / "bench-quality.json"
UNSEEN = HERE / "data" / "prose-heldout.txt"
TUNE_METHODS = ("task_arithmetic", "ties", "dare_ties", "tsv", "auto")
BASELINE = "task_arithmetic λ=0.5"
KINDS = ("reference", "baseline", "default", "tuned")
GOAL_GAIN, GOAL_FT, GOAL_TRIAL = 0.05, 1.15, 0.3


# left out of `--methods all` (still run when named): hours at their defaults on 2 cores
SLOW = {"dop"}


def default_methods() -> list[str]:
    """Registered methods that merge the three fine-tunes (batch: ≥ 3 models allowed; continual: all)."""
    from surgery.merge.registry import METHODS

    return [n for n, m in METHODS.items() if (m.max_models is None or m.max_models >= 3) and n not in SLOW]


def geomean(ppl: dict[str, float]) -> float:
    vals = [ppl.get(d, math.nan) for d in DOMAINS]
    if any(not (v > 0) for v in vals):
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def probe_files(work: Path, base: Path, windows: int) -> tuple[dict[str, Path], Path]:
    """Each domain's probe (``windows`` training windows evenly spaced, decoded) and one file
    with the first half of every probe (about what tune's search parts hold)."""
    import torch
    from transformers import AutoTokenizer
    from workload import chunks, domain_text

    tok = AutoTokenizer.from_pretrained(base)
    probes, halves = {}, []
    for name in DOMAINS:
        train, _ = chunks(tok, domain_text(name))
        k = min(windows, len(train))
        idx = torch.linspace(0, len(train) - 1, k).round().long().unique()
        ids = train[idx].reshape(-1)
        probes[name] = work / f"probe-{name}.txt"
        probes[name].write_text(tok.decode(ids.tolist()))
        halves.append(tok.decode(ids[: ids.numel() // 2].tolist()))
    search = work / "probe-search-halves.txt"
    search.write_text("\n\n".join(halves))
    return probes, search


def evaluate(ckpt: Path, texts: dict[str, Path]) -> dict:
    ppl = heldout_ppl(ckpt, texts)
    return {"ppl": ppl, "geomean": geomean(ppl)}


def merge_row(method: str, label: str, params: list[str], work: Path, base: Path, fts: list[Path],
              texts: dict[str, Path]) -> dict:
    from surgery.merge.registry import get_method

    m = get_method(method)
    out = work / f"merge-{label.replace(' ', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    base_args = [] if m.base == "ignored" else ["--base", str(base)]
    r = measured([*surgery_cmd(), "merge", "-m", method, *base_args, *map(str, fts), "-o", str(out), "--quiet",
                  *params])
    r.pop("stdout", None)
    row = {"label": label, "kind": "baseline" if label == BASELINE else "default", "method": method,
           "settings": " ".join(params[1::2]) or "defaults", **r, **evaluate(out, texts)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def tune_row(target: str, work: Path, base: Path, fts: list[Path], probes: dict[str, Path], texts: dict[str, Path],
             budget: str, seed: int) -> dict:
    out = work / f"tune-{target}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*surgery_cmd(), "tune", target, "--base", str(base), *map(str, fts),
           *[a for name, p in probes.items() for a in ("--probe", f"{name}={p}")],
           "-o", str(out), "--budget", budget, "--ctx", "128", "--seed", str(seed), "--json", "--quiet"]
    r = measured(cmd)
    rep = json.loads(r.pop("stdout"))
    ran = [t for t in rep["trials"] if not t.get("replayed") and t.get("seconds") is not None]
    fresh = [t["seconds"] for t in ran]
    later = sorted(fresh[1:])
    # the slowest trial after the first, and what it was (method, phase, settings, its merge's share)
    slow = max(ran[1:], key=lambda t: t["seconds"], default=None)
    slowest = None if slow is None else (
        f"{slow['method']} ({slow['phase']}"
        + (", pruned" if slow.get("pruned") else "") + "): "
        + ", ".join(f"{k}={v:g}" for k, v in slow["settings"].items())
        + f"; merge {slow.get('merge_seconds', float('nan')):.1f} s of {slow['seconds']:.1f} s")
    best = rep["best"]
    settings = ", ".join(f"{k}={v:g}" for k, v in best["settings"].items())
    row = {"label": f"tune {target}", "kind": "tuned", "method": best["method"], "settings": settings, **r,
           "budget": budget, "tune_seconds": rep.get("seconds"), "trials": rep["trials_evaluated"],
           "stopped": rep["stopped"], "first_trial_s": fresh[0] if fresh else None,
           "trial_median_s": later[len(later) // 2] if later else None, "trial_max_s": later[-1] if later else None,
           "prepare_s": rep.get("prepare_seconds", 0.0), "pruned": rep.get("trials_pruned", 0),
           "slowest_trial": slowest,
           "rescore_s": rep.get("rescore_seconds", 0.0), "rescored": len(rep.get("rescored") or []),
           "recipe": rep.get("recipe"), **evaluate(out / "model", texts)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def merge_eval_baseline(work: Path, base: Path, fts: list[Path], search: Path) -> dict:
    """One `surgery merge` (task arithmetic λ=0.5) + one `surgery eval ppl` of the probes' search halves."""
    out = work / "baseline-merge"
    shutil.rmtree(out, ignore_errors=True)
    m = measured([*surgery_cmd(), "merge", "-m", "task_arithmetic", "--base", str(base), *map(str, fts), "-o", str(out),
                  "-p", "lambda=0.5", "--quiet"])
    e = measured([*surgery_cmd(), "eval", "ppl", str(out), "--text", str(search), "--ctx", "128", "--stride", "128",
                  "--json", "--quiet"])
    shutil.rmtree(out, ignore_errors=True)
    return {"merge_s": m["wall_s"], "eval_s": e["wall_s"], "total_s": m["wall_s"] + e["wall_s"]}


# ---- checks ---------------------------------------------------------------------------------------

def checks(results: dict) -> list[str]:
    """Issue #15's goals, one line each, from the kept rows."""
    rows = {r["label"]: r for r in results.get("rows", [])}
    ta, out = rows.get(BASELINE), []
    fts = {d: rows.get(f"ft-{d}") for d in DOMAINS}
    per_trial = results.get("merge_eval_baseline")
    for r in (r for r in rows.values() if r["kind"] == "tuned"):
        name = r["label"]
        if ta and ta["geomean"] > 0:
            gain = 1 - r["geomean"] / ta["geomean"]
            out.append(f"{name}: geometric mean {r['geomean']:.3f} vs {BASELINE} {ta['geomean']:.3f}: "
                       f"{100 * gain:+.1f}% lower (goal ≥ {100 * GOAL_GAIN:.0f}%): "
                       f"{'ok' if gain >= GOAL_GAIN else 'MISSED'}")
        if all(fts.values()):
            ratios = {d: r["ppl"][d] / fts[d]["ppl"][d] for d in DOMAINS}
            out.append(f"{name}: vs each domain's own fine-tune " + ", ".join(f"{d} {x:.3f}×" for d, x in ratios.items())
                       + f" (goal ≤ {GOAL_FT:.2f}×): {'ok' if max(ratios.values()) <= GOAL_FT else 'MISSED'}")
        from surgery.tune import parse_duration

        limit = parse_duration(r["budget"])
        out.append(f"{name}: --budget {r['budget']}: whole process {r['wall_s']:.0f} s, {r['trials']} trial(s), stopped "
                   f"because {r['stopped']}: {'ok' if limit is None or r['wall_s'] <= limit else 'MISSED'}")
        if per_trial and r.get("trial_max_s") is not None:
            t = per_trial["total_s"]
            out.append(f"{name}: trials after the first: median {r['trial_median_s']:.1f} s ({r['trial_median_s'] / t:.2f}×), "
                       f"max {r['trial_max_s']:.1f} s ({r['trial_max_s'] / t:.2f}×) of one merge + eval ppl "
                       f"({t:.1f} s) (goal ≤ {GOAL_TRIAL}×): {'ok' if r['trial_max_s'] <= GOAL_TRIAL * t else 'MISSED'}")
    return out


# ---- page ------------------------------------------------------------------------------------------

def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def ordered(rows: list[dict]) -> list[dict]:
    order = {"base": 0, **{f"ft-{d}": i + 1 for i, d in enumerate(DOMAINS)}}
    return sorted(rows, key=lambda r: (KINDS.index(r["kind"]), order.get(r["label"], 9),
                                       r["geomean"] if r["geomean"] == r["geomean"] else math.inf))


def same_merges(rows: list[dict]) -> dict[str, str]:
    """Rows whose held-out perplexities equal an earlier row's exactly -> that row's label: the
    same merge reached by two methods (at density 1 DARE and breadcrumbs drop nothing, so
    dare_ties and breadcrumbs_ties are TIES' sign election without normalizing, and della is ties)."""
    seen: dict[tuple, str] = {}
    out = {}
    for r in rows:
        if r["kind"] == "reference":
            continue
        key = tuple(sorted(r["ppl"].items()))
        if key in seen:
            out[r["label"]] = seen[key]
        else:
            seen[key] = r["label"]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ordered(rows) if r["geomean"] == r["geomean"]]
    panels = [*DOMAINS, "geomean"]
    colors = {"reference": "#7f7f7f", "baseline": "#d62728", "default": "#1f77b4", "tuned": "#2ca02c"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.3 * len(rows) + 1.5), sharey=True)
    y = list(range(len(rows)))[::-1]
    base = next((r for r in rows if r["label"] == "base"), None)
    for ax, panel in zip(axes, panels):
        vals = [r["geomean"] if panel == "geomean" else r["ppl"][panel] for r in rows]
        # a merge that broke the model would squash the rest: clip at twice the base's value
        top = 2 * (base["geomean"] if panel == "geomean" else base["ppl"][panel]) if base else max(vals)
        for yi, v, r in zip(y, vals, rows):
            ax.hlines(yi, 0, min(v, top), color="#dddddd", lw=0.8)
            ax.plot(min(v, top), yi, ">" if v > top else "o", color=colors[r["kind"]], ms=6)
        ax.set_xlim(0.9 * min(vals), 1.05 * min(max(vals), top))
        ax.set_title(f"held-out ppl: {panel}" if panel != "geomean" else "geometric mean")
        ft = next((r for r in rows if r["label"] == f"ft-{panel}"), None)
        if ft:
            ax.axvline(ft["ppl"][panel] * GOAL_FT, color="k", ls="--", lw=0.8)
        ta = next((r for r in rows if r["label"] == BASELINE), None)
        if panel == "geomean" and ta:
            ax.axvline(ta["geomean"] * (1 - GOAL_GAIN), color="k", ls="--", lw=0.8)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([r["label"] for r in rows], fontsize=8)
    fig.suptitle("SmolLM2-135M workload: lower is better (dashed: goals; grey reference, red task arithmetic "
                 "λ=0.5, blue defaults, green tuned; ▶ beyond twice the base)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(results: dict, out: Path) -> None:
    rows = ordered(results.get("rows", []))
    png = out.with_suffix(".png")
    lines = ["# Merge quality on the SmolLM2 workload", "", "Produced by:", "", "```", results.get("command", ""), "```",
             "", "SmolLM2-135M-Instruct (bf16) and its three full fine-tunes from `benchmarks/workload.py` (code: the "
             "stdlib `json` and `email` sources; license: /usr/share/common-licenses; prose: the project's prose). "
             "Held-out perplexity is `surgery eval ppl --ctx 128 --stride 128` on each domain's held-out windows "
             "(never trained on, never probed; the last 4 windows of code and license, the last window of prose); "
             "*geo. mean* is over those three; *prose (unseen)* scores benchmarks/data/prose-heldout.txt, prose no "
             "model or probe saw. Wall time and peak RSS are each whole process's (`/usr/bin/time -v`): one "
             "`surgery merge`, or one whole `surgery tune` run (search, held-out report and the final merge). "
             "Lower is better everywhere.", "",
             f"Machine: {results.get('machine', '?')}. Last updated {results.get('when', '?')}.", ""]
    if rows:
        lines += [f"![held-out perplexity per row]({png.name})", ""]
    lines += ["| row | kind | method: settings | wall | peak RSS | code | license | prose | geo. mean | prose (unseen) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    same = same_merges(rows)
    for r in rows:
        wall = f"{r['wall_s']:.1f} s" if "wall_s" in r else "–"
        rss = f"{r['rss_mb']:.0f} MB" if "rss_mb" in r else "–"
        what = "–" if r["kind"] == "reference" else f"`{r['method']}`: {r['settings']}"
        if r["label"] in same:
            what += f" (the same numbers as {same[r['label']]})"
        lines.append(f"| {r['label']} | {r['kind']} | {what} | {wall} | {rss} | "
                     + " | ".join(_num(r["ppl"].get(d)) for d in DOMAINS)
                     + f" | {_num(r['geomean'])} | {_num(r['ppl'].get('prose-unseen'))} |")
    if not rows:
        lines.append("| (numbers: run the command above) | | | | | | | | | |")
    tuned = [r for r in rows if r["kind"] == "tuned"]
    if tuned:
        lines += ["", "## Tune runs", "", "| row | budget | whole process | trials (pruned) | first trial | later trials "
                  "(median / max) | decompositions | full re-scoring | stopped because |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in tuned:
            lines.append(f"| {r['label']} | {r['budget']} | {r['wall_s']:.0f} s | {r['trials']} ({r.get('pruned', '–')}) | "
                         f"{_num(r['first_trial_s'], '.1f')} s | {_num(r['trial_median_s'], '.1f')} s / "
                         f"{_num(r['trial_max_s'], '.1f')} s | {_num(r.get('prepare_s'), '.1f')} s | "
                         f"{r.get('rescored', '–')} in {_num(r.get('rescore_s'), '.1f')} s | {r['stopped']} |")
        for r in tuned:
            if r.get("slowest_trial"):
                lines += ["", f"{r['label']}: the slowest trial after the first was {r['slowest_trial']}."]
        b = results.get("merge_eval_baseline")
        if b:
            lines += ["", f"One `surgery merge` (task arithmetic λ=0.5, {b['merge_s']:.1f} s) + one `surgery eval ppl` of "
                      f"the probes' search halves ({b['eval_s']:.1f} s), timed in the same run: {b['total_s']:.1f} s."]
    lines += ["", "## Goals (issue #15)", ""]
    goal_lines = checks(results)
    lines += [f"- {c}" for c in goal_lines] if goal_lines else ["- (numbers: run the command above)"]
    lines += ["", "## How the rows are made", "",
              "- *default*: `surgery merge -m METHOD --base BASE ft-code ft-license ft-prose` with no `-p` (mergekit's "
              "and the papers' defaults: task arithmetic and TIES add the three task vectors at weight 1, TIES keeps "
              "every entry at density 1, ...); the continual methods merge the three in that order. Methods that "
              "take one or two models (slerp, nuslerp, nearswap, arcee_fusion, passthrough) are left out, and so is `dop` "
              "unless named in `--methods`: at its defaults (200 Adam steps per matrix and merge step) it runs "
              "for hours on 2 cores (at 10 steps it took 183 s: [literature](literature.md)). `linear` "
              "ignores a base and averages the three fine-tunes. Rows marked *the same numbers as* are the same "
              "merge: at density 1 (mergekit's default) DARE and breadcrumbs drop nothing (DARE's rescale is 1/1, "
              "breadcrumbs' outlier cut applies only below density 1), so dare_ties and breadcrumbs_ties are TIES' "
              "sign election without normalizing the weights, and della (normalizing, like ties) is ties.",
              "- *tuned*: `surgery tune` on probes cut from the training side of each domain's text (`--probe-windows` "
              "windows evenly spaced over the training windows, decoded): tune searches on the first half of each "
              "probe and reports on the second, and this page reports on the workload's held-out windows, which tune "
              "never sees. `--ctx 128` as in the held-out evaluation; seed 0. `tune auto` searches "
              "task_arithmetic, ties, breadcrumbs_ties and tsv, with weights and λ up to 1 (tune's default; the probes are "
              "the fine-tunes' training text, which rewards larger scales that held-out text does not: docs/tune.md, "
              "*Why the scales stop at 1*). See [docs/tune.md](../tune.md).",
              "- The trial-cost goal compares tune's median and slowest trial after the first (an in-memory merge and "
              "the scoring of its surrogate: 3 of the 8 windows of each probe's search half, evenly spaced, "
              "`--search-windows 3`, the default) with one `surgery merge` plus one `surgery eval ppl` of the same "
              "text, both whole processes timed in the same run. *decompositions* is the one-time time tune spent "
              "computing TSV-M's factors (kept for every later trial), which trial times leave out; *pruned* trials "
              "were stopped early, provably unable to beat the best (docs/tune.md, Racing). *full re-scoring*: the best "
              "3 trials by the surrogate scored on the whole search halves before the winner is chosen on that score "
              "(docs/tune.md, Multi-fidelity); it is part of the whole process's time, not of the trials'."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if rows:
        try:
            plot(rows, png)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="all", help="Default-setting rows: all, none, or comma-separated methods.")
    ap.add_argument("--tune-methods", default=",".join(TUNE_METHODS),
                    help="`surgery tune` targets (methods, or auto), comma-separated; none for no tuned rows.")
    ap.add_argument("--budget", default="10m", help="--budget of every tune run (10m, 90s, ...).")
    ap.add_argument("--probe-windows", type=int, default=16, help="Training windows (128 tokens) per domain's probe.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DOC, help="The page (quality.png is written beside it).")
    ap.add_argument("--results", type=Path, default=RESULTS, help="Where rows are kept between runs.")
    ap.add_argument("--keep", type=Path, help="Work folder to keep (default: a temporary one, removed).")
    args = ap.parse_args(argv)
    allowed = default_methods()
    methods = (allowed if args.methods == "all" else [] if args.methods == "none"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    runnable = allowed + sorted(SLOW)
    bad = [m for m in methods if m not in runnable]
    if bad:
        ap.error(f"--methods: {', '.join(bad)} cannot merge three models onto a base; choose from {', '.join(runnable)}")
    tune_targets = [] if args.tune_methods == "none" else [t.strip() for t in args.tune_methods.split(",") if t.strip()]
    from workload import build_workload

    w = build_workload(log=print)
    base, fts = Path(w["base"]), [Path(p) for p in w["finetunes"]]
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results.update({"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    work = args.keep or Path(tempfile.mkdtemp(prefix="surgery-bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    kept = {r["label"]: r for r in results.get("rows", [])}

    def add(row: dict) -> None:
        row["commit"] = _commit()
        kept[row["label"]] = row
        results["rows"] = list(kept.values())
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2, default=str))
        write_doc(results, args.out)
        ppl = " ".join(f"{d} {row['ppl'].get(d, math.nan):.2f}" for d in DOMAINS)
        cost = f"{row['wall_s']:6.1f} s {row['rss_mb']:6.0f} MB | " if "wall_s" in row else ""
        print(f"{row['label']:28s} {cost}{ppl} | geo. mean {row['geomean']:.3f}", flush=True)

    try:
        texts = heldout_texts(work, base)
        texts["prose-unseen"] = UNSEEN
        for i, ck in enumerate([base, *fts]):
            add({"label": "base" if i == 0 else ck.name, "kind": "reference", "method": "", "settings": "",
                 **evaluate(ck, texts)})
        probes, search = probe_files(work, base, args.probe_windows)
        if tune_targets or BASELINE not in kept or methods:
            add(merge_row("task_arithmetic", BASELINE, ["-p", "lambda=0.5"], work, base, fts, texts))
        for m in methods:
            add(merge_row(m, m, [], work, base, fts, texts))
        if tune_targets:
            results["merge_eval_baseline"] = merge_eval_baseline(work, base, fts, search)
            print(f"one merge + eval ppl of the probes' search halves: {results['merge_eval_baseline']['total_s']:.1f} s")
        for t in tune_targets:
            add(tune_row(t, work, base, fts, probes, texts, args.budget, args.seed))
        for line in checks(results):
            print(line)
        write_doc(results, args.out)
        print(f"wrote {args.out}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
