"""`surgery edit extract --rank 8` of a SmolLM2-135M fine-tune against a task-arithmetic merge
of the same two models (the anchor: the same reads of the same inputs, plus a write), whole
processes on the same input in the same run, sides alternating, medians of ``--reps``.

Sides:

* **extract**: ``surgery edit extract BASE FT -o e.safetensors --rank 8`` (randomized SVD,
  the exact error of what is stored reported per tensor);
* **extract --exact**: the same with full SVDs (the old path), for reference;
* **merge**: ``surgery merge -m task_arithmetic --base BASE FT -o OUT``.

Goal (issue #14): extract wall <= 3x the merge's (it was 5.6x with full SVDs). The script also
prints the worst relative error of the randomized factors against the exact SVD's, per run.

FT is the ``code`` fine-tune of benchmarks/workload.py (built when missing), or ``--ft DIR``,
or with ``--quick`` a perturbed copy of the base. Usage::

    python benchmarks/extract.py --reps 3
    python benchmarks/extract.py --quick --reps 1     # smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from readonly import base_and_finetune, run_measured  # noqa: E402

GOAL = 3.0


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgery.commands.app", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ft", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    base, ft = base_and_finetune(args.ft, args.quick)
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-extract-"))
    sides = {
        "extract": cmd("edit", "extract", str(base), str(ft), "-o", str(work / "r.safetensors"), "--rank",
                       str(args.rank), "--force", "-q"),
        "extract --exact": cmd("edit", "extract", str(base), str(ft), "-o", str(work / "x.safetensors"), "--rank",
                               str(args.rank), "--exact", "--force", "-q"),
        "merge": cmd("merge", "-m", "task_arithmetic", "--base", str(base), str(ft), "-o", str(work / "m"),
                     "--force", "-q"),
    }
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    try:
        for rep in range(args.reps):
            order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
            for side in order:
                r = run_measured(sides[side])
                runs[side].append(r)
                print(f"  rep {rep + 1} {side:<16} wall {r['wall_s']:7.2f} s  peak RSS {r['rss_mb']:7.0f} MB", flush=True)
        errs = compare_errors(work / "r.safetensors", work / "x.safetensors")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "rss_mb")} for k, v in runs.items()}
    ratio = med["extract"]["wall_s"] / med["merge"]["wall_s"]
    exact_ratio = med["extract --exact"]["wall_s"] / med["merge"]["wall_s"]
    print()
    print("| side | wall | peak RSS | wall / merge |")
    print("| --- | ---: | ---: | ---: |")
    for k, m in med.items():
        print(f"| {k} | {m['wall_s']:.2f} s | {m['rss_mb']:.0f} MB | {m['wall_s'] / med['merge']['wall_s']:.2f}x |")
    print()
    print(f"extract --rank {args.rank}: {ratio:.2f}x the merge (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'MISSED'}); "
          f"--exact: {exact_ratio:.2f}x")
    print(f"energy captured by the randomized factors / by the exact SVD's: worst {errs['worst_ratio']:.5f} "
          f"({errs['worst_tensor']}), mean {errs['mean_ratio']:.5f} over {errs['tensors']} low-rank tensors")
    if args.json:
        args.json.write_text(json.dumps({"median": med, "ratio": ratio, "exact_ratio": exact_ratio, "errors": errs},
                                        indent=2) + "\n")
    return 0


def compare_errors(randomized: Path, exact: Path) -> dict:
    """Per low-rank tensor: the share of ‖ΔW‖² the randomized rank-r factors capture over the
    share the exact SVD's capture (1.0 = optimal; never above 1 by Eckart–Young)."""
    from surgery.edit.format import load_edit

    r, x = load_edit(randomized), load_edit(exact)
    ratios = {name: float(te.s.double().pow(2).sum() / x.tensors[name].s.double().pow(2).sum())
              for name, te in r.tensors.items()
              if te.low_rank and name in x.tensors and x.tensors[name].low_rank}
    if not ratios:
        return {"worst_ratio": 1.0, "worst_tensor": None, "mean_ratio": 1.0, "tensors": 0}
    worst = min(ratios, key=ratios.get)
    return {"worst_ratio": ratios[worst], "worst_tensor": worst, "mean_ratio": statistics.mean(ratios.values()),
            "tensors": len(ratios)}


if __name__ == "__main__":
    sys.exit(main())
