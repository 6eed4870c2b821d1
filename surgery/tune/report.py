"""The human side of a tuning run's report: a Markdown page and a figure (the Pareto front
across probes and the search's progress). The facts themselves are the JSON report."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from ..core.figures import new_figure, save_figure


def _ppl(nll: float | None) -> str:
    if nll is None:
        return "—"
    try:
        return f"{math.exp(nll):.3f}"
    except OverflowError:
        return "inf"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (best merge, held-out numbers, references, every trial)."""
    probes = [p["name"] for p in report["probes"]]
    best = report["best"]
    lines = [f"# surgery tune: {best['method']}", "",
             f"Objective: {report['objective']} of the probes' log perplexities on their search parts "
             f"({report['trials_evaluated']} trials evaluated, {report.get('trials_pruned', 0)} of them stopped early "
             f"as they could not beat the best, {report['trials_replayed']} replayed from the log, "
             f"{report['seconds']:.0f} s; stopped because {report['stopped']}).", "",
             "Re-run the merge with `surgery merge --config recipe.yml -o OUT`.", ""]
    sw = report.get("search_windows")
    if sw:
        lines += [f"Trials were ranked on a surrogate: "
                  + ", ".join(f"{k} {v['scored']} of {v['of']}" for k, v in sw.items())
                  + " search windows (evenly spaced, placed by the seed); trials "
                  f"({', '.join(map(str, report['rescored']))}) were then scored on the whole search parts and the "
                  f"winner chosen on those ({report['rescore_seconds']:.0f} s). Trial perplexities and objectives "
                  "below are the surrogate's; the *full* column is the whole search parts' objective.", ""]
    lines += [

             "## Held-out perplexity (report parts, never searched)", "",
             "| candidate | " + " | ".join(probes) + " | objective |",
             "| --- | " + " | ".join("---:" for _ in probes) + " | ---: |"]
    for row in report["held_out"]:
        cells = [_ppl(row["nll"].get(p)) for p in probes]
        obj = f"{row['objective']:.4f}" if row.get("objective") is not None else "—"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {obj} |")
    lines += ["", "## Probes", "", "| probe | file | tokens | search / report tokens | weight |",
              "| --- | --- | ---: | ---: | ---: |"]
    for p in report["probes"]:
        lines.append(f"| {p['name']} | `{p['path']}` | {p['tokens']} | {p['search_tokens']} / {p['report_tokens']} "
                     f"| {p['weight']:g} |")
    front = set(report["pareto"])
    lines += ["", "## Trials (search parts)", "",
              "| # | phase | method | settings | " + " | ".join(probes) + " | objective | full | Pareto |",
              "| ---: | --- | --- | --- | " + " | ".join("---:" for _ in probes) + " | ---: | ---: | :---: |"]
    for i, t in enumerate(report["trials"]):
        settings = ", ".join(f"{k}={v:g}" for k, v in t["settings"].items())
        mark = "★" if i == best["trial"] else ("•" if i in front else "")
        obj = f"{t['objective']:.4f}"
        full = f"{t['full_objective']:.4f}" if "full_objective" in t else ("" if t.get("fidelity") == "surrogate" else obj)
        if t.get("pruned"):      # stopped early: partial perplexities, the objective a lower bound
            obj = f"≥ {obj} (pruned at {100 * t['scored_share']:.0f}%)"
        lines.append(f"| {i} | {t['phase']} | {t['method']} | {settings} | "
                     + " | ".join(_ppl(t["nll"].get(p)) for p in probes) + f" | {obj} | {full} | {mark} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path, inputs: list[Path]) -> Path:
    """Pairwise search-part perplexities of every trial (Pareto front and winner marked,
    references shown) and the best objective against trial number."""
    probes = [p["name"] for p in report["probes"]]
    pairs = list(itertools.combinations(probes, 2))[:3]
    fig, axes = new_figure(1, len(pairs) + 1, (4.2 * (len(pairs) + 1), 4))
    trials = report["trials"]
    front = set(report["pareto"])
    refs = [r for r in report["held_out"] if r["kind"] == "reference"]

    def ppl(v: float) -> float:
        try:
            return math.exp(v)
        except OverflowError:
            return math.inf

    for ax, (a, b) in zip(axes[0], pairs):
        xs = [ppl(t["nll"][a]) for t in trials]
        ys = [ppl(t["nll"][b]) for t in trials]
        ax.scatter(xs, ys, s=12, color="tab:gray", alpha=0.6, label="trials")
        pf = sorted((xs[i], ys[i]) for i in front)
        ax.plot([p[0] for p in pf], [p[1] for p in pf], "o-", color="tab:blue", ms=4, label="Pareto front")
        w = report["best"]["trial"]
        ax.scatter([xs[w]], [ys[w]], marker="*", s=160, color="tab:red", zorder=3, label="best")
        for r in refs:
            if a in r.get("search_nll", {}) and b in r.get("search_nll", {}):
                ax.scatter([ppl(r["search_nll"][a])], [ppl(r["search_nll"][b])], marker="x", color="black")
                ax.annotate(r["label"], (ppl(r["search_nll"][a]), ppl(r["search_nll"][b])), fontsize=7)
        ax.set_xlabel(f"{a} perplexity (search part)")
        ax.set_ylabel(f"{b} perplexity (search part)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    ax = axes[0][-1]
    running, best = [], math.inf
    for t in trials:
        best = min(best, t["objective"])
        running.append(best)
    ax.plot(range(len(trials)), [t["objective"] for t in trials], ".", color="tab:gray", label="trial")
    ax.plot(range(len(trials)), running, "-", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective ({report['objective']} log perplexity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path, dpi=100, inputs=inputs)
