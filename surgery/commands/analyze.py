"""`surgery analyze spectrum | subspace | gain`: SVD analysis of weights and task vectors.

Reads one tensor at a time; nothing is written except an optional figure (``--plot``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import _common, _render
from ._params import DeviceOpt, JsonOpt, QuietOpt, RayOpt, add_examples, base_help, deprecated_alias

EXAMPLES = [
    "surgery analyze spectrum fixtures/llama-tiny/base --singular-values 4",
    "surgery analyze spectrum fixtures/llama-tiny/ft-a --base fixtures/llama-tiny/base --energy 0.9 --plot out/spec.png",
    "surgery analyze subspace --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b --rank 4",
    "surgery analyze gain fixtures/llama-tiny/base --json",
    "surgery analyze interference --base fixtures/llama-tiny/base fixtures/llama-tiny/ft-a fixtures/llama-tiny/ft-b fixtures/llama-tiny/ft-c",
    "surgery analyze gain fixtures/llama-wide/base --vs fixtures/llama-tiny/base --expect-exponent 0.5 --tolerance 0.15 --ignore embed --fail-on-drift",
]

analyze_app = typer.Typer(
    name="analyze",
    help="SVD analysis: per-tensor spectra and ranks, task-vector subspace overlap, top-singular-value gains.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

PlotOpt = Annotated[Optional[Path], typer.Option("--plot", metavar="FILE.png",
                                                 help="Also draw a figure (.png/.pdf/.svg; needs matplotlib).")]
ExactOpt = Annotated[bool, typer.Option("--exact", help="σ_max from a full SVD instead of Lanczos (slower, for checking).")]
TablesOpt = Annotated[int, typer.Option("--rows", metavar="N", help="Human output: show at most N tensor rows (0 = all; --json lists all).")]


def _read_paths(*specs: Optional[str]) -> list[str]:
    """What the analysis reads, for the output policy of --plot (a figure is never written over,
    into or through a link to an input): the named paths, and an index's whole folder."""
    return [str(Path(s).parent) if s.endswith(".index.json") else s for s in specs if s]


def _check_plot(plot: Optional[Path], inputs: list[str]) -> None:
    """Refuse a bad --plot path, or a missing matplotlib, before the SVDs rather than after."""
    if plot is not None:
        from surgery.analyze.plot import check_plot_path, require_matplotlib

        check_plot_path(plot, inputs)
        require_matplotlib()


def _num(x: Any, digits: int = 4) -> str:
    return _render.fmt_num(x, digits)


def _summary_table(console: Any, title: str, summary: dict[str, dict[str, Any]], fields: list[tuple[str, str]],
                   key_label: str) -> None:
    cols = [_render.Col(key_label, key=True), _render.Col("n")] + [_render.Col(label, drop=1 + i) for i, (_, label) in enumerate(fields)]
    rows = [(key, str(entry["count"]), *(_num(entry[f]["mean"]) if entry.get(f) else "-" for f, _ in fields))
            for key, entry in summary.items()]
    _render.print_table(console, cols, rows, title=title)


def _tensor_rows(rows: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], int]:
    return (rows[:limit], len(rows) - limit) if limit and len(rows) > limit else (rows, 0)


@analyze_app.command("spectrum")
def spectrum(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint to analyze (folder, file or Hub id).")],
    base: Annotated[Optional[str], typer.Option("--base", metavar="BASE", help=base_help("analyze the task vector CHECKPOINT − BASE instead of the weights."))] = None,
    energy: Annotated[float, typer.Option("--energy", metavar="E", help="Energy rank: smallest k holding this share of Σσ².")] = 0.9,
    top: Annotated[int, typer.Option("--singular-values", metavar="K", help="List the K largest singular values of each tensor.")] = 8,
    top_old: Annotated[Optional[int], typer.Option("--top", hidden=True, help="Deprecated spelling of --singular-values.")] = None,
    plot: PlotOpt = None,
    rows: TablesOpt = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = None,
) -> None:
    """Per 2-D tensor: σ_max, ‖W‖_F, stable rank, effective rank, energy rank and the top singular values; summaries per layer type and depth."""
    from surgery.analyze import spectrum as run
    from surgery.core.executor import executor_for

    if top_old is not None:
        deprecated_alias("--top", "--singular-values")
        top = top_old
    _check_plot(plot, _read_paths(checkpoint, base))
    with executor_for(ray, device=device) as executor:
        result = run(checkpoint, base=base, energy=energy, top=top, keep_spectra=plot is not None, device=device,
                     progress=_render.progress(quiet), executor=executor)
    report = result.report
    report["plot"] = None
    if plot is not None:
        from surgery.analyze.plot import plot_spectrum

        report["plot"] = str(plot_spectrum(report, plot, _read_paths(checkpoint, base)))
    report.pop("spectra", None)

    def human(console: Any, report: dict[str, Any]) -> None:
        what = f"task vector {report['checkpoint']} − {report['base']}" if report["base"] else report["checkpoint"]
        shown, more = _tensor_rows(report["tensors"], rows)
        cols = [_render.Col("tensor", key=True), _render.Col("type", "left", drop=3), _render.Col("shape", drop=2),
                _render.Col("σ_max"), _render.Col("‖W‖_F", drop=4), _render.Col("stable rank"),
                _render.Col("eff. rank", drop=5), _render.Col(f"rank@{energy:g}"),
                _render.Col(f"top {min(top, 4)} σ", drop=6)]
        cells = []
        for r in shown:
            shape = "×".join(map(str, r["shape"]))
            if not r["finite"]:
                cells.append((r["name"], r["sublayer"], shape, "[bold red]non-finite[/]", "-", "-", "-", "-",
                              str(r["nonfinite"])))
                continue
            cells.append((r["name"], r["sublayer"], shape, _num(r["sigma_max"]), _num(r["frobenius"]),
                          _num(r["stable_rank"]), _num(r["effective_rank"]), str(r["energy_rank"]),
                          " ".join(_num(v, 3) for v in r["top_singular_values"][:4])))
        _render.print_table(console, cols, cells, title=f"spectrum of {what}")
        if more:
            console.print(f"... {more} more tensors (--rows 0 or --json lists all)")
        fields = [("sigma_max", "σ_max"), ("stable_rank", "stable rank"), ("effective_rank", "eff. rank"),
                  ("effective_rank_ratio", "eff. rank / min(m,n)"), ("energy_rank", f"rank@{energy:g}")]
        _summary_table(console, "mean per layer type", report["by_type"], fields, "type")
        _summary_table(console, "mean per depth", report["by_depth"], fields, "block")
        if report["non_finite"]:
            console.print(f"[bold red]{len(report['non_finite'])} tensor(s) hold NaN/Inf[/]: " + ", ".join(report["non_finite"]))
        for s in report["skipped"]:
            console.print(f"[yellow]skipped[/] {s['name']}: {s['reason']}")
        if report["plot"]:
            console.print(f"figure: {report['plot']}")

    _common.finish(result, as_json=as_json, human=human)


@analyze_app.command("subspace")
def subspace(
    a: Annotated[str, typer.Argument(metavar="A", help="First fine-tuned checkpoint.")],
    b: Annotated[str, typer.Argument(metavar="B", help="Second fine-tuned checkpoint.")],
    base: Annotated[str, typer.Option("--base", metavar="BASE", help=base_help("the task vectors are A − BASE and B − BASE."))],
    rank: Annotated[Optional[int], typer.Option("--rank", metavar="K", help="Compare the top-K singular subspaces of every tensor.")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", metavar="E", help="K per task vector = its energy rank at E (default 0.9 when --rank is not given).")] = None,
    frozen_fraction: Annotated[Optional[float], typer.Option("--frozen-fraction", metavar="F", help="Fixed-fraction rule: the base's frozen rank is F·min(m,n) (default (mrr+trr)/2 = 0.45).")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", metavar="FILE", help="Text to run the base on: per-block importance sets the frozen ranks (importance rule).")] = None,
    mrr: Annotated[float, typer.Option("--mrr", metavar="R", help="Importance rule: minimum retention ratio.")] = 0.1,
    trr: Annotated[float, typer.Option("--trr", metavar="R", help="Importance rule: target retention ratio.")] = 0.8,
    rows: TablesOpt = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Overlap (principal angles, mean cos²) of two task vectors' top singular subspaces, their leakage into the base's top subspace, and suggested frozen ranks."""
    from surgery.analyze import subspace as run

    if text is not None and not as_json:
        _render.log(f"computing per-block importance on {text} ...")
    result = run(a, b, base=base, rank=rank, energy=energy, frozen_fraction=frozen_fraction, text=text, mrr=mrr,
                 trr=trr, device=device, progress=_render.progress(quiet))

    def human(console: Any, report: dict[str, Any]) -> None:
        k_desc = f"k = {report['rank']}" if report["rank"] else f"k = energy rank at {report['energy']:g}"
        cols = [_render.Col("tensor", key=True), _render.Col("type", "left", drop=5), _render.Col("k_A", drop=3),
                _render.Col("k_B", drop=3), _render.Col("cos² left"), _render.Col("cos² right", drop=2),
                _render.Col("chance", drop=6), _render.Col("min angle°", drop=7), _render.Col("frozen r", drop=4),
                _render.Col("leak A", drop=1), _render.Col("leak B", drop=1)]
        cells = []
        shown, more = _tensor_rows(report["tensors"], rows)
        for r in shown:
            if not r["finite"]:
                cells.append((r["name"], r["sublayer"], "-", "-", "[bold red]non-finite[/] in " + ",".join(r["non_finite_in"]),
                              "-", "-", "-", str(r["frozen_rank"]), "-", "-"))
                continue
            angles = r["left"]["angles_deg"]
            cells.append((r["name"], r["sublayer"], str(r["k_a"]), str(r["k_b"]), _num(r["overlap_left"], 3),
                          _num(r["overlap_right"], 3), _num(r["left"]["chance"], 2), _num(min(angles), 3) if angles else "-",
                          str(r["frozen_rank"]), _num(r["leakage_a"]["total"], 3), _num(r["leakage_b"]["total"], 3)))
        _render.print_table(console, cols, cells,
                            title=f"{report['a']} vs {report['b']} (task vectors vs {report['base']}, {k_desc})")
        if more:
            console.print(f"... {more} more tensors (--rows 0 or --json lists all)")
        fields = [("overlap_left", "cos² left"), ("overlap_right", "cos² right"), ("leakage_a", "leak A"),
                  ("leakage_b", "leak B"), ("frozen_fraction", "frozen share")]
        _summary_table(console, "mean per layer type", report["by_type"], fields, "type")
        _summary_table(console, "mean per depth", report["by_depth"], fields, "block")
        rule = report["frozen_rule"]
        console.print(f"frozen ranks by the {rule.replace('_', '-')} rule"
                      + (f" (importance per block: {', '.join(f'{k}: {v:.2f}' for k, v in report['importance'].items())})"
                         if report["importance"] else f" (fraction {report['frozen_fraction']:g})")
                      + "; leak = share of ‖τ‖² not orthogonal to the base's frozen subspace.")
        for s in report["skipped"]:
            console.print(f"[yellow]skipped[/] {s['name']}: {s['reason']}")

    _common.finish(result, as_json=as_json, human=human)


@analyze_app.command("gain")
def gain(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint to analyze (the target width with --vs).")],
    vs: Annotated[Optional[str], typer.Option("--vs", metavar="PROXY", help="Proxy checkpoint of another width: pair tensors by name and relative depth.")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", metavar="T", help="A pair drifts when its σ_max ratio leaves [expected/(1+T), expected·(1+T)].")] = 0.1,
    expect_exponent: Annotated[float, typer.Option("--expect-exponent", metavar="X", help="Expected ratio is (d_target/d_proxy)^X; 0 = width-invariant gains.")] = 0.0,
    ignore: Annotated[Optional[str], typer.Option("--ignore", metavar="TYPES", help="Comma-separated sublayer types left out of the drift verdict (still reported), e.g. embed,lm_head.")] = None,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="Exit 1 when any pair drifts or is non-finite (for CI).")] = False,
    exact: ExactOpt = False,
    plot: PlotOpt = None,
    rows: TablesOpt = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = None,
) -> None:
    """Per matrix σ_max, RMS ‖W‖_F/√(mn) and σ_max/RMS; with --vs, σ_max ratios and implied width exponents against a proxy."""
    from surgery.analyze import gain as run
    from surgery.core.executor import executor_for

    _check_plot(plot, _read_paths(checkpoint, vs))
    ignore_types = [t.strip() for t in ignore.split(",") if t.strip()] if ignore else []
    with executor_for(ray, device=device) as executor:
        result = run(checkpoint, vs=vs, tolerance=tolerance, expect_exponent=expect_exponent,
                     ignore_types=ignore_types, exact=exact, fail_on_drift=fail_on_drift, device=device,
                     progress=_render.progress(quiet), executor=executor)
    report = result.report
    proxy = vs
    report["plot"] = None
    if plot is not None:
        from surgery.analyze.plot import plot_gain

        report["plot"] = str(plot_gain(report, plot, _read_paths(checkpoint, vs)))

    def human(console: Any, report: dict[str, Any]) -> None:
        if proxy is None:
            cols = [_render.Col("tensor", key=True), _render.Col("type", "left", drop=2), _render.Col("shape", drop=1),
                    _render.Col("σ_max"), _render.Col("RMS"), _render.Col("σ_max/RMS")]
            shown, more = _tensor_rows(report["tensors"], rows)
            cells = []
            for r in shown:
                shape = "×".join(map(str, r["shape"]))
                if not r["finite"]:
                    cells.append((r["name"], r["sublayer"], shape, "[bold red]non-finite[/]", "-", str(r["nonfinite"])))
                else:
                    cells.append((r["name"], r["sublayer"], shape, _num(r["sigma_max"]), _num(r["rms"]), _num(r["gain"])))
            _render.print_table(console, cols, cells,
                                title=f"gains of {report['checkpoint']} (σ_max by {report['method']})")
            if more:
                console.print(f"... {more} more tensors (--rows 0 or --json lists all)")
            fields = [("sigma_max", "σ_max"), ("rms", "RMS"), ("gain", "σ_max/RMS")]
            _summary_table(console, "mean per layer type", report["by_type"], fields, "type")
            _summary_table(console, "mean per depth", report["by_depth"], fields, "block")
        else:
            w = report["widths"]
            cols = [_render.Col("tensor", key=True), _render.Col("proxy tensor", "left", drop=4),
                    _render.Col("σ_max", drop=2), _render.Col("proxy σ_max", drop=3), _render.Col("ratio"),
                    _render.Col("exponent", drop=1), _render.Col("", "left", wrap=True)]
            shown, more = _tensor_rows(report["pairs"], rows)
            cells = []
            for p in shown:
                mark = "[green]ok[/]" if p["within_tolerance"] else f"[bold red]drift[/] {p.get('reason') or ''}"
                mark = mark if p["judged"] else "[dim]ignored[/]"
                cells.append((p["name"], p["proxy_name"], _num(p["sigma_max"]), _num(p["proxy_sigma_max"]),
                              _num(p["ratio"]), _num(p["exponent"], 3), mark))
            _render.print_table(
                console, cols, cells,
                title=f"{report['checkpoint']} (d={w['target']}) vs proxy {report['proxy']} (d={w['proxy']})")
            if more:
                console.print(f"... {more} more pairs (--rows 0 or --json lists all)")
            fields = [("ratio", "σ_max ratio"), ("exponent", "width exponent")]
            _summary_table(console, "mean per layer type", report["pairs_by_type"], fields, "type")
            for n in report["unpaired"]:
                console.print(f"[yellow]unpaired[/] {n}")
            lo, hi = report["bounds"]
            verdict = "[bold green]no drift[/]" if report["within_tolerance"] else f"[bold red]{len(report['drifted'])} pair(s) drift[/]"
            console.print(f"{verdict} (tolerance {report['tolerance']:g}: ratio/expected within [{lo:.4g}, {hi:.4g}], "
                          f"expected exponent {report['expect_exponent']:g})")
        if report["non_finite"]:
            console.print(f"[bold red]{len(report['non_finite'])} tensor(s) hold NaN/Inf[/]: " + ", ".join(report["non_finite"]))
        if report["plot"]:
            console.print(f"figure: {report['plot']}")

    failure = None
    if not result.passed:
        failure = (f"{len(report['drifted'])} of {len(report['pairs'])} tensor pairs of {report['checkpoint']} vs "
                   f"{report['proxy']} drift beyond tolerance {tolerance:g}: first {report['drifted'][0]}.")
    _common.finish(result, as_json=as_json, human=human, failure=failure)


@analyze_app.command("interference")
def interference(
    models: Annotated[list[str], typer.Argument(help="Two or more fine-tunes of BASE.")],
    base: Annotated[str, typer.Option("--base", metavar="BASE", help=base_help("task vectors are MODEL − BASE."))],
    energy: Annotated[float, typer.Option("--energy", help="Subspace rank of each task vector: its energy rank at this share of Σσ².")] = 0.9,
    rows: TablesOpt = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """What predicts a merge's loss, per layer: task-vector cosine, sign conflicts, subspace overlap, effective rank."""
    from surgery.analyze import interference as run

    result = run(models, base=base, energy=energy, device=device, progress=_render.progress(quiet))

    def human(console: Any, doc: dict[str, Any]) -> None:
        from rich.table import Table

        console.print(f"base: {doc['base']}   models: {', '.join(doc['models'])}")
        pairs = Table(title="whole-model task-vector cosine")
        pairs.add_column("model A")
        pairs.add_column("model B")
        pairs.add_column("cosine", justify="right")
        for p in doc["pairs"]:
            pairs.add_row(p["a"], p["b"], _num(p["cosine"]))
        console.print(pairs)
        t = doc["totals"]
        console.print(f"sign conflict over all tensors: {_num(t['sign_conflict'])}   ‖τ‖/‖θ0‖: "
                      + ", ".join(_num(x) for x in t["relative_norms"]))
        table = Table(title="per layer (means over the layer's tensors; overlap: mean cos² of principal angles, "
                            "chance = what random subspaces give)")
        for col in ("layer", "cosine", "sign conflict", "overlap out", "overlap in", "chance", "eff. rank / min(m,n)",
                    "‖τ‖/‖θ0‖"):
            table.add_column(col, justify="right")
        shown, more = _tensor_rows(doc["layers"], rows)
        for r in shown:
            table.add_row(str(r["layer"]), _num(r["cosine"]), _num(r["sign_conflict"]), _num(r["overlap_left"]),
                          _num(r["overlap_right"]), _num(r["overlap_chance"]), _num(r["effective_rank"]),
                          _num(r["relative_norm"]))
        console.print(table)
        if more:
            console.print(f"... {more} more layers (--rows 0 or --json for all)")
        _summary_table(console, "per sublayer type", doc["by_type"],
                       [("cosine", "cosine"), ("sign_conflict", "sign conflict"), ("overlap_left", "overlap out"),
                        ("overlap_right", "overlap in"), ("effective_rank", "eff. rank")], "type")
        if doc["non_finite"]:
            console.print(f"[red]{len(doc['non_finite'])} tensor(s) hold NaN/Inf and were skipped[/], e.g. "
                          f"{doc['non_finite'][0]}")

    _common.finish(result, as_json=as_json, human=human)


def register(app: typer.Typer) -> None:
    """Add ``surgery analyze spectrum|subspace|gain|interference`` to the app."""
    app.add_typer(analyze_app, name="analyze")


for _f in (spectrum, subspace, gain, interference):
    add_examples(_f, [e for e in EXAMPLES if f" {_f.__name__} " in e])
