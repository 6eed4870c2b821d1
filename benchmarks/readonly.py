"""Read-side commands on SmolLM2-135M: peak memory and wall time against the script a user
would otherwise write, on the same input in the same run.

Cases (each a whole process; peak RSS is the child's ``ru_maxrss`` from ``os.wait4``, wall
time is measured around the process; sides alternate order, medians of ``--reps``):

* ``diff``: ``surgery diff BASE FT --json`` vs a script that ``load_file``s both checkpoints
  and computes the same per-tensor numbers in float64 with torch. Goal (issue #14):
  surgery's peak RSS <= 0.5 GB (it was 1.13 GB before streaming).
* ``check``: ``surgery check FT --against BASE --atol 1 --json`` vs the same load_file script
  comparing every tensor within the tolerance. Goal: <= 0.5 GB (was 1.35 GB).
* ``inspect``: ``surgery inspect`` of the bf16 safetensors folder (``--json``, and the tensor
  table as printed to a pipe) and of the Q4_1 GGUF file (``--json``) vs
  ``safe_open(...).keys()`` + shapes (safetensors) and gguf-py's ``GGUFReader`` (GGUF). Goal:
  surgery inspect <= 0.5 s whole-process on SmolLM2; torch is not imported (the script also
  reports which heavy modules each surgery process loaded).
* ``startup``: ``surgery --version``, ``surgery --help`` and ``surgery merge --help`` against
  the interpreter alone (``python -c pass``): what start-up costs beyond Python itself.

FT (``diff`` and ``check`` only) is the ``code`` fine-tune of benchmarks/workload.py when it is
built (or ``--ft DIR``); otherwise a perturbed copy of the base made here (``--quick``), which
exercises the same code paths. Usage::

    python benchmarks/readonly.py --reps 3            # real workload (builds it if needed)
    python benchmarks/readonly.py --cases inspect,startup --reps 10   # start-up only (no fine-tune)
    python benchmarks/readonly.py --quick --reps 1    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from smollm2 import CACHE, gguf_path, smollm2_checkpoint  # noqa: E402

GOAL_RSS_MB = 500
GOAL_INSPECT_S = 0.5

DIFF_ANCHOR = r"""
import sys, torch
from safetensors.torch import load_file
a = load_file(sys.argv[1] + "/model.safetensors"); b = load_file(sys.argv[2] + "/model.safetensors")
rows = []
for k in sorted(a):
    x, y = a[k].double().reshape(-1), b[k].double().reshape(-1)
    d = y - x
    rows.append((k, float(d.norm() / x.norm()), float(x @ y / (x.norm() * y.norm())), float(d.abs().max())))
print(len(rows))
"""
CHECK_ANCHOR = r"""
import sys, torch
from safetensors.torch import load_file
a = load_file(sys.argv[1] + "/model.safetensors"); b = load_file(sys.argv[2] + "/model.safetensors")
atol = float(sys.argv[3])
bad = [k for k in sorted(a) if bool(((a[k].double() - b[k].double()).abs() > atol).any())]
print(len(bad))
"""
ST_INSPECT_ANCHOR = r"""
import sys
from safetensors import safe_open
with safe_open(sys.argv[1] + "/model.safetensors", "np") as f:
    n = 0
    for k in f.keys():
        n += 1; f.get_slice(k).get_shape()
print(n)
"""
GGUF_INSPECT_ANCHOR = r"""
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
print(sum(int(t.n_elements) for t in r.tensors))
"""
PROBE = ("import sys, json; from surgery.commands.app import main; code = main(sys.argv[1:]); "
         "sys.stderr.write('MODULES ' + json.dumps(sorted(m for m in ('torch', 'transformers', 'numpy', 'gguf', "
         "'pydantic', 'rich') if m in sys.modules)) + '\\n'); sys.exit(code)")


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` under ``/usr/bin/time``: wall seconds, peak RSS (MB) and the modules line.

    The peak RSS comes from GNU time's own child, not from this process's ``wait4``: Linux
    carries a forked child's RSS high-water mark across exec, so a child forked from a
    benchmark process that has imported torch would report torch's ~220 MB as its own."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    err = proc.stderr
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}): {err[-2000:]}")
    rss = [int(ln.split()[1]) for ln in err.splitlines() if ln.startswith("MAXRSS_KB ")]
    mods = [ln.split(" ", 1)[1] for ln in err.splitlines() if ln.startswith("MODULES ")]
    return {"wall_s": wall, "rss_mb": rss[-1] / 1024 if rss else float("nan"),
            "modules": json.loads(mods[-1]) if mods else None}


def surgery(*args: str) -> list[str]:
    return [sys.executable, "-c", PROBE, *args]


QUICK_FT = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
sd = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype)
      for k, v in load_file(str(base / "model.safetensors")).items()}
save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
for f in base.iterdir():
    if f.suffix != ".safetensors":
        (out / f.name).write_bytes(f.read_bytes())
"""


def quick_finetune(base: Path) -> Path:
    """A perturbed copy of the base (every tensor + 1e-3·N(0,1)), cached. Made in a child
    process: the benchmark's own process stays small, so children do not start from its
    memory (ru_maxrss counts a forked child from its parent's size)."""
    out = CACHE / "bench" / "smollm2-perturbed"
    if not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c", QUICK_FT, str(base), str(out)], check=True)
    return out


def base_and_finetune(ft: Path | None, quick: bool) -> tuple[Path, Path]:
    """SmolLM2's base and the fine-tune to compare with it: ``ft`` if given, else a perturbed
    copy (``quick``), else the workload's ``code`` fine-tune (built when missing)."""
    base = smollm2_checkpoint()
    if ft is not None:
        return base, ft
    if quick:
        return base, quick_finetune(base)
    from workload import build_workload

    return base, build_workload()["finetunes"][0]


def compare(name: str, sides: dict[str, list[str]], reps: int) -> dict:
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    order = list(sides)
    for rep in range(reps):
        for side in (order if rep % 2 == 0 else order[::-1]):
            r = run_measured(sides[side])
            runs[side].append(r)
            print(f"  {name:<14} rep {rep + 1} {side:<10} wall {r['wall_s']:6.2f} s  peak RSS {r['rss_mb']:7.0f} MB"
                  + (f"  modules {r['modules']}" if r["modules"] is not None else ""), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "rss_mb")} for k, v in runs.items()}
    return {"case": name, "median": med, "modules": runs["surgery"][-1]["modules"],
            "wall_ratio": med["surgery"]["wall_s"] / med["anchor"]["wall_s"],
            "rss_ratio": med["surgery"]["rss_mb"] / med["anchor"]["rss_mb"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ft", type=Path, default=None, help="Fine-tune to compare with the base.")
    ap.add_argument("--quick", action="store_true", help="Use a perturbed copy of the base instead of the workload.")
    ap.add_argument("--cases", default="diff,check,inspect,startup")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cases = args.cases.split(",")
    if "diff" in cases or "check" in cases:
        base, ft = base_and_finetune(args.ft, args.quick)
    else:
        base, ft = smollm2_checkpoint(), None
    results = []
    if "diff" in cases:
        results.append(compare("diff", {"surgery": surgery("diff", str(base), str(ft), "--json", "-q"),
                                        "anchor": [sys.executable, "-c", DIFF_ANCHOR, str(base), str(ft)]}, args.reps))
    if "check" in cases:
        results.append(compare("check --against", {
            "surgery": surgery("check", str(ft), "--against", str(base), "--atol", "1", "--no-integrity", "--json",
                               "-q"),
            "anchor": [sys.executable, "-c", CHECK_ANCHOR, str(ft), str(base), "1"]}, args.reps))
    if "inspect" in cases:
        results.append(compare("inspect st", {"surgery": surgery("inspect", str(base), "--json"),
                                              "anchor": [sys.executable, "-c", ST_INSPECT_ANCHOR, str(base)]},
                               args.reps))
        results.append(compare("inspect st table", {"surgery": surgery("inspect", str(base)),
                                                    "anchor": [sys.executable, "-c", ST_INSPECT_ANCHOR, str(base)]},
                               args.reps))
        g = gguf_path()
        if g is not None:
            results.append(compare("inspect gguf", {"surgery": surgery("inspect", str(g), "--json"),
                                                    "anchor": [sys.executable, "-c", GGUF_INSPECT_ANCHOR, str(g)]},
                                   args.reps))
    if "startup" in cases:
        for argv in (["--version"], ["--help"], ["merge", "--help"]):
            results.append(compare(f"startup {' '.join(argv)}", {"surgery": surgery(*argv),
                                                                  "anchor": [sys.executable, "-c", "pass"]}, args.reps))
    print()
    print("| case | surgery wall | anchor wall | wall ratio | surgery peak RSS | anchor peak RSS | RSS ratio | goal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        s, a = r["median"]["surgery"], r["median"]["anchor"]
        if r["case"].startswith("startup"):
            goal = f"anchor: python -c pass; torch {'imported' if 'torch' in (r['modules'] or []) else 'not imported'}"
        elif r["case"].startswith("inspect"):
            goal = (f"wall <= {GOAL_INSPECT_S} s: {'met' if s['wall_s'] <= GOAL_INSPECT_S else 'MISSED'}; "
                    f"torch {'imported' if 'torch' in (r['modules'] or []) else 'not imported'}")
        else:
            goal = f"RSS <= {GOAL_RSS_MB} MB: {'met' if s['rss_mb'] <= GOAL_RSS_MB else 'MISSED'}"
        print(f"| {r['case']} | {s['wall_s']:.2f} s | {a['wall_s']:.2f} s | {r['wall_ratio']:.2f}x | "
              f"{s['rss_mb']:.0f} MB | {a['rss_mb']:.0f} MB | {r['rss_ratio']:.2f}x | {goal} |")
    if args.json:
        args.json.write_text(json.dumps({"base": str(base), "ft": str(ft) if ft else None, "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
