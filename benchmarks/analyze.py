"""Benchmark `surgery analyze` on SmolLM2-135M against exact SVDs and WeightWatcher.

Same model, same run:

1. In-process compute time for σ_max of every 2-D tensor (211): surgery's Lanczos
   (``surgery.analyze.linalg.sigma_max``) against ``torch.linalg.matrix_norm(W, ord=2)`` per
   tensor; tensors are read (bf16 -> float32) outside the timed region. Worst relative error.
2. Whole processes (wall time and peak RSS from ``/usr/bin/time -v``, start-up included):
   - ``surgery analyze gain MODEL --json``            (σ_max by Lanczos, RMS, gain)
   - a plain Python process that streams the same tensors and calls
     ``torch.linalg.matrix_norm(ord=2)`` on each            (the exact anchor)
   - ``surgery analyze spectrum MODEL --json``        (full float32 spectra: σ_max, stable rank,
     effective rank, energy rank of every 2-D tensor)
   - WeightWatcher ``WeightWatcher(model=MODEL).analyze()`` on the same folder (its default
     analysis: float64 SVDs + power-law fits), with its per-layer ``sv_max`` and ``stable_rank``
     compared to surgery's for every layer WeightWatcher reports.

Prints the ratios and writes docs/benchmarks/analyze.md.

    python benchmarks/analyze.py [--model DIR] [--skip-ww] [--threads N] [--repeat R]

``--repeat R`` (default 3) runs the whole-process commands R times, interleaved, and reports the
median wall time (and the largest peak RSS): other jobs on the machine make single runs noisy.

``--threads N`` (default 1) sets torch's threads here and OMP/OpenBLAS/MKL threads of every
process it starts, the same for surgery and the anchors: on a 2-core machine shared with other
jobs, two OpenMP threads spin against them and make LAPACK calls 10-40x slower and erratic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
DOC = ROOT / "docs" / "benchmarks" / "analyze.md"

EXACT_SCRIPT = r"""
import json, sys, torch
from safetensors import safe_open
from pathlib import Path
out = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        for k in h.keys():
            t = h.get_tensor(k)
            if t.ndim == 2 and t.is_floating_point():
                out[k] = float(torch.linalg.matrix_norm(t.float(), ord=2))
json.dump(out, sys.stdout)
"""

WW_SCRIPT = r"""
import json, logging, sys
logging.disable(logging.INFO)
import weightwatcher as ww
df = ww.WeightWatcher(model=sys.argv[1]).analyze()
rows = df[["name", "N", "M", "sv_max", "spectral_norm", "stable_rank", "entropy"]].to_dict(orient="records")
json.dump(rows, open(sys.argv[2], "w"))
"""


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ENV: dict = dict(os.environ)


def measured(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS in MB, stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": round(wall, 2), "rss_mb": round(int(m.group(1)) / 1024, 1) if m else None, "stdout": proc.stdout}


def repeated(cmds: dict[str, list[str]], repeat: int) -> dict[str, dict]:
    """Run every command ``repeat`` times, interleaved; median wall, max RSS, the last stdout."""
    import statistics

    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for _ in range(repeat):
        for key, cmd in cmds.items():
            runs[key].append(measured(cmd))
    out = {}
    for key, rs in runs.items():
        out[key] = {"wall_s": round(statistics.median(r["wall_s"] for r in rs), 2),
                    "walls_s": [r["wall_s"] for r in rs],
                    "rss_mb": max(r["rss_mb"] or 0 for r in rs), "stdout": rs[-1]["stdout"]}
    return out


def in_process(model: Path) -> dict:
    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.analyze.common import matrix_names
    from surgery.analyze.linalg import sigma_max

    ckpt = open_checkpoint(model)
    names = matrix_names(ckpt)
    fast_s = exact_s = 0.0
    worst, worst_name = 0.0, None
    for name in names:
        w = ckpt.get(name, dtype=torch.float32)
        t = time.perf_counter()
        s = sigma_max(w)
        fast_s += time.perf_counter() - t
        t = time.perf_counter()
        ref = float(torch.linalg.matrix_norm(w, ord=2))
        exact_s += time.perf_counter() - t
        err = abs(s - ref) / ref
        if err > worst:
            worst, worst_name = err, name
    return {"tensors": len(names), "lanczos_s": round(fast_s, 3), "exact_s": round(exact_s, 3),
            "speedup": round(exact_s / fast_s, 1), "worst_rel_err": worst, "worst_tensor": worst_name}


def surgery_cmd() -> list[str]:
    return [shutil.which("surgery") or "surgery"]


def ww_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: SmolLM2-135M bf16)")
    ap.add_argument("--skip-ww", action="store_true", help="leave WeightWatcher out")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks/analyze.md")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each whole-process command (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="math threads for every contender (0 = library defaults)")
    args = ap.parse_args()
    if args.threads > 0:
        for var in THREAD_VARS:
            ENV[var] = str(args.threads)
    if args.model is None:
        from smollm2 import smollm2_checkpoint

        args.model = smollm2_checkpoint()
    model = args.model
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"model: {model}  torch threads: {torch.get_num_threads()}", flush=True)
    res: dict = {"model": str(model), "threads": args.threads or "default", "repeat": args.repeat}

    print("1. in-process σ_max compute time ...", flush=True)
    res["in_process"] = ip = in_process(model)
    print(f"   Lanczos {ip['lanczos_s']} s vs matrix_norm(ord=2) {ip['exact_s']} s over {ip['tensors']} tensors: "
          f"{ip['speedup']}x; worst relative error {ip['worst_rel_err']:.2e} ({ip['worst_tensor']})", flush=True)

    print(f"2. whole processes (median of {args.repeat}) ...", flush=True)
    have_ww = False
    if not args.skip_ww:
        try:
            import weightwatcher  # noqa: F401

            have_ww = True
        except ImportError:
            print("   weightwatcher not installed: skipped (pip install weightwatcher)")
    with tempfile.TemporaryDirectory() as tmp:
        ww_out = Path(tmp) / "ww.json"
        cmds = {
            "startup": [sys.executable, "-c", "import torch, safetensors"],
            "gain": [*surgery_cmd(), "analyze", "gain", str(model), "--json", "-q"],
            "exact": [sys.executable, "-c", EXACT_SCRIPT, str(model)],
            "spectrum": [*surgery_cmd(), "analyze", "spectrum", str(model), "--json", "-q"],
        }
        if have_ww:
            cmds["ww"] = [sys.executable, "-c", WW_SCRIPT, str(model), str(ww_out)]
        runs = repeated(cmds, max(1, args.repeat))
        ww_rows = json.loads(ww_out.read_text()) if have_ww else None
    gain, exact, spec = runs["gain"], runs["exact"], runs["spectrum"]
    startup = runs["startup"]
    startup.pop("stdout")
    res["startup_process"] = startup
    gain_rep = json.loads(gain.pop("stdout"))
    exact_vals = json.loads(exact.pop("stdout"))
    spec_rep = json.loads(spec.pop("stdout"))
    errs = [abs(r["sigma_max"] - exact_vals[r["name"]]) / exact_vals[r["name"]] for r in gain_rep["tensors"]]
    res["gain_process"] = {**gain, "tensors": len(gain_rep["tensors"]), "worst_rel_err": max(errs)}
    res["exact_process"] = {**exact, "tensors": len(exact_vals)}
    res["process_speedup"] = round(exact["wall_s"] / gain["wall_s"], 2)
    # Both processes pay the same Python + torch start-up; the rest is reading and math.
    rest_g, rest_e = gain["wall_s"] - startup["wall_s"], exact["wall_s"] - startup["wall_s"]
    res["process_speedup_after_startup"] = round(rest_e / rest_g, 2) if rest_g > 0 else None
    print(f"   surgery analyze gain {gain['wall_s']} s ({gain['rss_mb']} MB) vs exact matrix_norm process "
          f"{exact['wall_s']} s ({exact['rss_mb']} MB): {res['process_speedup']}x; worst rel err {max(errs):.2e}",
          flush=True)
    res["spectrum_process"] = {**spec, "tensors": len(spec_rep["tensors"])}
    print(f"   surgery analyze spectrum {spec['wall_s']} s ({spec['rss_mb']} MB), {len(spec_rep['tensors'])} tensors",
          flush=True)
    if have_ww:
        ww = runs["ww"]
        ww.pop("stdout")
        ours = {ww_name(r["name"]): r for r in spec_rep["tensors"]}
        matched = [(w, ours[w["name"]]) for w in ww_rows if w["name"] in ours]
        sv_err = max(abs(o["sigma_max"] - w["sv_max"]) / w["sv_max"] for w, o in matched)
        sr_err = max(abs(o["stable_rank"] - w["stable_rank"]) / w["stable_rank"] for w, o in matched)
        res["ww_process"] = {**ww, "layers": len(ww_rows), "matched": len(matched),
                             "missing_in_surgery": [w["name"] for w in ww_rows if w["name"] not in ours],
                             "sv_max_worst_rel_diff": sv_err, "stable_rank_worst_rel_diff": sr_err,
                             "all_reported_by_surgery": all(
                                 o["sigma_max"] is not None and o["stable_rank"] is not None
                                 and o["effective_rank"] is not None for _, o in matched)}
        res["spectrum_vs_ww"] = round(ww["wall_s"] / spec["wall_s"], 2)
        res["gain_vs_ww"] = round(ww["wall_s"] / gain["wall_s"], 2)
        print(f"   weightwatcher analyze {ww['wall_s']} s ({ww['rss_mb']} MB), {len(ww_rows)} layers; "
              f"surgery spectrum is {res['spectrum_vs_ww']}x faster, gain {res['gain_vs_ww']}x; "
              f"σ_max worst rel diff {sv_err:.2e}, stable rank {sr_err:.2e}", flush=True)

    print(json.dumps(res, indent=2))
    if not args.no_doc:
        write_doc(res)


def write_doc(res: dict) -> None:
    import torch

    ip, g, e, s = res["in_process"], res["gain_process"], res["exact_process"], res["spectrum_process"]
    lines = [
        "# Benchmark: `surgery analyze` (σ_max, spectra)",
        "",
        "Produced by `python benchmarks/analyze.py` (the whole file is rewritten by each run).",
        "",
        f"Machine: {os.cpu_count()} CPU cores, 24 GiB RAM, no GPU; Python {platform.python_version()}, torch "
        f"{torch.__version__}, {res['threads']} math thread(s) for every contender (`--threads`). Other agents were running on the same 2 cores during the run, "
        "so absolute times are inflated and noisy; the ratios come from runs made back to back in one invocation.",
        f"Model: SmolLM2-135M-Instruct, bf16 safetensors ({ip['tensors']} two-dimensional tensors: 30 blocks × 7 "
        "projections + the tied embedding 49152×576).",
        "",
        "## σ_max of every 2-D tensor, compute only (in-process)",
        "",
        "| method | seconds | speed-up | worst relative error |",
        "| --- | ---: | ---: | ---: |",
        f"| `torch.linalg.matrix_norm(W, ord=2)` per tensor (exact) | {ip['exact_s']} | 1× | — |",
        f"| surgery Lanczos (`sigma_max`) | {ip['lanczos_s']} | **{ip['speedup']}×** | {ip['worst_rel_err']:.1e} |",
        "",
        "## Whole processes (start-up, reading and math; `/usr/bin/time -v`)",
        "",
        f"Median wall time of {len(g['walls_s'])} interleaved runs of each command (all runs listed under Raw results).",
        "",
        "| command | wall s | peak RSS MB | reports |",
        "| --- | ---: | ---: | --- |",
        f"| `python -c 'import torch, safetensors'` (start-up floor) | {res['startup_process']['wall_s']} | "
        f"{res['startup_process']['rss_mb']} | — |",
        f"| plain Python: stream tensors, `matrix_norm(ord=2)` each | {e['wall_s']} | {e['rss_mb']} | σ_max |",
        f"| `surgery analyze gain MODEL --json` | {g['wall_s']} | {g['rss_mb']} | σ_max, RMS, σ_max/RMS "
        f"(worst rel. err. vs exact {g['worst_rel_err']:.1e}) |",
        f"| `surgery analyze spectrum MODEL --json` | {s['wall_s']} | {s['rss_mb']} | full spectra: σ_max, ‖W‖_F, "
        "stable, effective and energy rank, top-8 σ |",
    ]
    if "ww_process" in res:
        w = res["ww_process"]
        lines.append(f"| WeightWatcher 0.7.7 `analyze()` (defaults) | {w['wall_s']} | {w['rss_mb']} | "
                     f"{w['layers']} layers: σ_max², stable rank, entropy, power-law α |")
    lines += ["", "Ratios:", "",
              f"- `analyze gain` vs exact per-tensor process: **{res['process_speedup']}×** faster (goal ≥ 4×); "
              f"{res['process_speedup_after_startup']}× once the common start-up (importing torch) is taken "
              "off both.",
              f"- in-process σ_max: **{ip['speedup']}×** faster (goal ≥ 10×) at worst relative error "
              f"{ip['worst_rel_err']:.1e} (goal ≤ 1e-3)."]
    if "ww_process" in res:
        w = res["ww_process"]
        lines += [
            f"- `analyze spectrum` vs WeightWatcher: **{res['spectrum_vs_ww']}×** faster; `analyze gain` "
            f"**{res['gain_vs_ww']}×**.",
            f"- Every one of the {w['layers']} layers WeightWatcher reports is reported by `analyze spectrum` "
            f"({w['matched']} matched by name) with σ_max, stable rank and effective rank: "
            f"{'yes' if w['all_reported_by_surgery'] and not w['missing_in_surgery'] else 'NO'}. "
            f"Largest relative difference: σ_max {w['sv_max_worst_rel_diff']:.1e}, stable rank "
            f"{w['stable_rank_worst_rel_diff']:.1e} (float32 vs WeightWatcher's float64 SVD).",
        ]
    lines += [
        "",
        "Notes:",
        "",
        "- WeightWatcher reports `spectral_norm` = σ_max² (eigenvalue units of WᵀW) and `sv_max` = σ_max; the "
        "comparison uses `sv_max`. Its `entropy` is the entropy of σ²/Σσ² divided by log(rank), not the "
        "effective rank exp(H(σ/Σσ)) that surgery reports, so it is not compared.",
        "- WeightWatcher's default analysis also fits a power law to every spectrum (its main purpose); "
        "that fit is part of its time.",
        "- Threads: an earlier run of this script with the library default of 2 threads (2026-11-27, "
        "load average ≈ 12 from other jobs) measured the exact per-tensor SVDs at 480 s against 3.2 s for "
        "Lanczos (149×), `gain` vs the exact process 4.3×, `spectrum` vs WeightWatcher 1.1×: two OpenMP "
        "threads spinning against other jobs slow LAPACK down 10-40×, which is why `--threads 1` is the default "
        "here.",
        "- `analyze spectrum` needs full spectra (effective and energy ranks), so it runs a float32 "
        "`svdvals` per tensor; `analyze gain` needs only σ_max and uses Lanczos.",
        "",
        "Raw results:",
        "",
        "```json",
        json.dumps(res, indent=2),
        "```",
        "",
    ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
