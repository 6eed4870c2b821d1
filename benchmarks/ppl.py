"""Benchmark: ``surgery eval ppl`` against a plain Hugging Face loop over the same windows, and
sequential application of 20 rank-1 edits with a perplexity check after each, on SmolLM2-135M.

1. Perplexity throughput. Both tools run as whole processes under ``/usr/bin/time -v`` (wall
   clock, peak RSS), alternating, ``--repeats`` times, on the same text and the same windows:

   * corpus mode: ``--ctx 256 --stride 128`` over the built-in probe (70 sentences); the
     Hugging Face loop is the one of the docs page "Perplexity of fixed-length models"
     (one window per forward pass, ``labels`` with -100 before the new tokens);
   * sentence mode: the 70 probe sentences, the loop forwards one sentence at a time.

   Each process reports scored tokens per second of its forward passes (model loading
   excluded); the best of the repeats is compared. The two perplexities must agree to 1e-4.

2. Edits. 20 rank-1 edits (0.02 · σ_max of the weight, unit factors) on ``down_proj`` of
   layers 0..19, applied by ``surgery edit apply`` with the default check after every edit
   (mean per-sentence perplexity of the first ``--edit-sentences`` probe sentences, 20 by
   default: the shared 2-core machine is slow); total wall time, the share spent in
   perplexity, and the write time, from the command's own JSON report.

Writes docs/benchmarks/ppl.md.

    python benchmarks/ppl.py [--repeats 2] [--edit-sentences 20] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks" / "ppl.md"
sys.path.insert(0, str(HERE))

HF_LOOP = r"""
import json, math, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt, textfile, mode, ctx, stride = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, sys.argv[6])
from ppl import hf_corpus_loop   # benchmarks/ppl.py: the docs' loop, shared with the in-process comparison
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
model.eval()
tok = AutoTokenizer.from_pretrained(ckpt)
text = open(textfile, encoding="utf-8").read()
t0 = time.perf_counter()
if mode == "corpus":
    tok.model_max_length = int(1e30)
    ids = tok(text, return_tensors="pt").input_ids
    ppl, n_tokens = hf_corpus_loop(model, ids, ctx, stride)
else:
    per, n_tokens = [], 0
    for line in [l.strip() for l in text.splitlines() if l.strip()]:
        ids = tok(line, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids, labels=ids)
        per.append(math.exp(out.loss.item()))
        n_tokens += ids.size(1) - 1
    ppl = sum(per) / len(per)
secs = time.perf_counter() - t0
print(json.dumps({"perplexity": ppl, "tokens_scored": n_tokens, "seconds": secs, "tokens_per_second": n_tokens / secs}))
"""


def measured(cmd: list[str]) -> tuple[dict, float, float]:
    """Run ``cmd`` under /usr/bin/time -v; (its JSON stdout, wall seconds, peak RSS MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return json.loads(proc.stdout), wall, rss


def surgery_cmd() -> list[str]:
    return [sys.executable, "-m", "surgery.commands.app"]


def ppl_case(ckpt: Path, text: Path, mode: str, repeats: int) -> dict:
    ctx, stride = 256, 128
    ours_cmd = [*surgery_cmd(), "eval", "ppl", str(ckpt), "--text", str(text), "--json", "--quiet"]
    ours_cmd += ["--ctx", str(ctx), "--stride", str(stride)] if mode == "corpus" else ["--sentences"]
    hf_cmd = [sys.executable, "-c", HF_LOOP, str(ckpt), str(text), mode, str(ctx), str(stride), str(HERE)]
    runs: dict[str, list] = {"surgery": [], "hf": []}
    for i in range(repeats):
        order = [("surgery", ours_cmd), ("hf", hf_cmd)] if i % 2 == 0 else [("hf", hf_cmd), ("surgery", ours_cmd)]
        for name, cmd in order:
            runs[name].append(measured(cmd))
    best = {k: max(v, key=lambda r: r[0]["tokens_per_second"]) for k, v in runs.items()}
    ours, hf = best["surgery"][0], best["hf"][0]
    rel = abs(ours["perplexity"] - hf["perplexity"]) / hf["perplexity"]
    if rel > 1e-4:
        raise RuntimeError(f"{mode}: perplexities disagree ({ours['perplexity']} vs {hf['perplexity']})")
    if ours["tokens_scored"] != hf["tokens_scored"]:
        raise RuntimeError(f"{mode}: scored tokens disagree ({ours['tokens_scored']} vs {hf['tokens_scored']})")
    return {
        "mode": mode, "ctx": ctx if mode == "corpus" else None, "stride": stride if mode == "corpus" else None,
        "tokens_scored": ours["tokens_scored"], "perplexity": ours["perplexity"], "rel_diff": rel,
        "surgery_tps": [r[0]["tokens_per_second"] for r in runs["surgery"]],
        "hf_tps": [r[0]["tokens_per_second"] for r in runs["hf"]],
        "ratio": ours["tokens_per_second"] / hf["tokens_per_second"],
        "surgery_wall": best["surgery"][1], "hf_wall": best["hf"][1],
        "surgery_rss": best["surgery"][2], "hf_rss": best["hf"][2],
    }


def make_edits(ckpt_dir: Path, out: Path, n: int = 20) -> list[Path]:
    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.edit.format import Edit, TensorEdit, save_edit

    ck = open_checkpoint(ckpt_dir)
    paths = []
    for i in range(n):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        w = ck.get(name)
        sigma = float(torch.linalg.matrix_norm(w, ord=2))
        g = torch.Generator().manual_seed(100 + i)
        u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(w.shape[1], 1, generator=g)
        te = TensorEdit(name, u=u / u.norm(), v=v / v.norm(), s=torch.tensor([0.02 * sigma]))
        p = out / f"edit{i:02d}.safetensors"
        save_edit(Edit({name: te}, base_sha256={name: ck.tensor_sha256(name)},
                       info={"description": f"benchmark rank-1 edit {i} (0.02 sigma_max)"}), p, force=True)
        paths.append(p)
    return paths


def edits_case(ckpt: Path, work: Path, sentences: int) -> dict:
    paths = make_edits(ckpt, work)
    cmd = [*surgery_cmd(), "edit", "apply", str(ckpt), *map(str, paths), "-o", str(work / "edited"),
           "--max-sentences", str(sentences), "--json", "--quiet", "--force"]
    rep, wall, rss = measured(cmd)
    return {"edits": len(paths), "sentences": sentences, "wall": wall, "rss": rss, "loop": rep["seconds"]["checks_and_edits"],
            "ppl": rep["seconds"]["perplexity"], "write": rep["seconds"]["write"], "checks": len(rep["checks"]),
            "baseline": rep["baseline_perplexity"], "final": rep["final_perplexity"],
            "verdicts": sorted({e["verdict"] for e in rep["edits"]})}


def render(cases: list[dict], ed: dict, repeats: int) -> str:
    import torch

    lines = [
        "# Benchmark: perplexity and sequential edits",
        "",
        "Script: `benchmarks/ppl.py` (run `python benchmarks/ppl.py`). Model: SmolLM2-135M-Instruct,",
        "bf16 safetensors (`benchmarks/smollm2.py`), computed in float32 on CPU by both tools.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, 24 GiB RAM, no GPU; Python {platform.python_version()}, "
        f"torch {torch.__version__}. Other agents were running on the same 2 cores during the run, so",
        "absolute times are noisy; the two tools ran alternately in the same run, and the best of",
        f"{repeats} repeats per tool is compared.",
        "",
        "## Perplexity throughput: `surgery eval ppl` vs a plain Hugging Face loop",
        "",
        "Same windows, same tokens, same perplexity (checked to 1e-4 relative). Tokens/s = scored",
        "tokens per second of forward passes (model loading excluded); wall and peak RSS are",
        "whole processes (`/usr/bin/time -v`).",
        "",
        "| mode | tokens scored | perplexity | surgery tok/s | HF loop tok/s | ratio | surgery wall / RSS | HF wall / RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cases:
        mode = f"corpus, ctx {c['ctx']}, stride {c['stride']}" if c["mode"] == "corpus" else "sentences (70, batch 8 vs 1)"
        lines.append(f"| {mode} | {c['tokens_scored']:,} | {c['perplexity']:.4f} | {max(c['surgery_tps']):.0f} | "
                     f"{max(c['hf_tps']):.0f} | **{c['ratio']:.2f}x** | {c['surgery_wall']:.1f} s / {c['surgery_rss']:.0f} MB | "
                     f"{c['hf_wall']:.1f} s / {c['hf_rss']:.0f} MB |")
    lines += [
        "",
        "All repeats (tok/s): " + "; ".join(
            f"{c['mode']}: surgery {', '.join(f'{x:.0f}' for x in c['surgery_tps'])} / HF {', '.join(f'{x:.0f}' for x in c['hf_tps'])}"
            for c in cases),
        "",
        "Reading the numbers: sentence mode gains most, because the plain loop forwards one short",
        "sentence at a time while surgery batches 8 right-padded sentences. In corpus mode a",
        "256-token window already fills the CPU's matrix multiplies, so batching windows gains",
        "little; surgery's edge there is the LM head computing logits only for the scored half of",
        "each window (`logits_to_keep`), a few percent to ~10% of the work, which is smaller than",
        "the swings the shared machine causes between runs: see the interleaved measurement below.",
        "",
        f"## {ed['edits']} sequential rank-1 edits with a check after each",
        "",
        f"`surgery edit apply BASE edit00 ... edit19 -o OUT --max-sentences {ed['sentences']}`, otherwise the defaults:",
        f"mean per-sentence perplexity of the first {ed['sentences']} probe sentences before any edit and after",
        "each of the 20 edits (a check after every edit).",
        "",
        "| total wall | checks + edits | in perplexity | share | writing the output | checks | peak RSS |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {ed['wall']:.1f} s | {ed['loop']:.1f} s | {ed['ppl']:.1f} s | **{100 * ed['ppl'] / ed['wall']:.0f}%** | "
        f"{ed['write']:.1f} s | {ed['checks']} | {ed['rss']:.0f} MB |",
        "",
        f"Perplexity {ed['baseline']:.3f} before, {ed['final']:.3f} after the 20 edits; verdicts: "
        f"{', '.join(ed['verdicts'])}. The rest of the wall time is Python and transformers start-up,",
        "loading the model once, the pre-checks (one σ_max per edited tensor) and hashing the base.",
        "",
    ]
    return "\n".join(lines)


def hf_corpus_loop(model, ids, ctx: int, stride: int) -> tuple[float, int]:
    """The docs' loop on an already loaded model (HF_LOOP's corpus branch and the in-process comparison)."""
    import math

    import torch

    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + ctx, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=target_ids)
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += out.loss.item() * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def interleaved(ckpt: Path, text: str, pairs: int) -> dict:
    """In one process, one loaded model: surgery's scorer and the docs' loop alternate ``pairs``
    times on the same windows, so load changes on a shared machine hit both alike."""
    import statistics

    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.eval.perplexity import load_causal_lm, make_scorer

    model, tok = load_causal_lm(open_checkpoint(ckpt))
    ctx, stride = 256, 128
    scorer = make_scorer(model, tok, text, ctx=ctx, stride=stride)
    ids = scorer.ids.unsqueeze(0)
    ratios, ours_tps, hf_tps = [], [], []
    for i in range(pairs):
        t0 = time.perf_counter()
        hf_ppl, n = hf_corpus_loop(model, ids, ctx, stride)
        hf = n / (time.perf_counter() - t0)
        rep = scorer.score()
        ours = rep["tokens_per_second"]
        if abs(rep["perplexity"] - hf_ppl) / hf_ppl > 1e-4 or rep["tokens_scored"] != n:
            raise RuntimeError("interleaved: surgery and the HF loop disagree")
        ratios.append(ours / hf)
        ours_tps.append(ours)
        hf_tps.append(hf)
        print(f"pair {i}: surgery {ours:.0f} tok/s, HF loop {hf:.0f} tok/s, ratio {ours / hf:.2f}", flush=True)
    return {"pairs": pairs, "ratios": ratios, "median": statistics.median(ratios), "surgery": ours_tps, "hf": hf_tps,
            "threads": torch.get_num_threads()}


def render_interleaved(r: dict) -> str:
    return "\n".join([
        "## In-process, interleaved (corpus mode)",
        "",
        "The whole-process numbers above swing with the load other agents put on the 2 cores.",
        "Here one process loads the model once and alternates the docs' loop and surgery's scorer",
        f"{r['pairs']} times on the same windows (ctx 256, stride 128, the probe), each pair run back to back.",
        "",
        "| pair | surgery tok/s | HF loop tok/s | ratio |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {i} | {a:.0f} | {b:.0f} | {c:.2f}x |" for i, (a, b, c) in enumerate(zip(r["surgery"], r["hf"], r["ratios"]))],
        "",
        f"Median ratio: **{r['median']:.2f}x**. On CPU a 256-token window already fills the matrix",
        "multiplies, so batching windows gains little; the gain is the LM head computing logits",
        "only for the scored half of each window (`logits_to_keep`), about a fifth of SmolLM2's",
        "FLOPs per token halved.",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--edit-sentences", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--interleaved-only", type=int, metavar="PAIRS", default=0,
                    help="only run the in-process interleaved corpus comparison and add its section to the page")
    args = ap.parse_args()
    if args.interleaved_only:
        from smollm2 import smollm2_checkpoint

        from surgery.eval.perplexity import probe_text

        section = render_interleaved(interleaved(smollm2_checkpoint(), probe_text(), args.interleaved_only))
        if not args.no_write:
            page = DOC.read_text() if DOC.exists() else ""
            page = page.split("## In-process, interleaved")[0].rstrip() + "\n\n" + section
            DOC.write_text(page)
            print(f"wrote {DOC}")
        return
    from smollm2 import smollm2_checkpoint

    from surgery.eval.perplexity import probe_text

    ckpt = smollm2_checkpoint()
    with tempfile.TemporaryDirectory(prefix="surgery-ppl-bench-") as tmp:
        work = Path(tmp)
        corpus = sentences = work / "probe.txt"
        sentences.write_text(probe_text())
        cases = []
        for mode, text in (("corpus", corpus), ("sentences", sentences)):
            c = ppl_case(ckpt, text, mode, args.repeats)
            print(f"{mode}: surgery {max(c['surgery_tps']):.0f} tok/s, HF loop {max(c['hf_tps']):.0f} tok/s, "
                  f"ratio {c['ratio']:.2f}x (ppl {c['perplexity']:.4f}, rel diff {c['rel_diff']:.1e})", flush=True)
            cases.append(c)
        ed = edits_case(ckpt, work, args.edit_sentences)
        print(f"edits: {ed['edits']} edits in {ed['wall']:.1f} s, perplexity {ed['ppl']:.1f} s "
              f"({100 * ed['ppl'] / ed['wall']:.0f}%), write {ed['write']:.1f} s", flush=True)
    page = render(cases, ed, args.repeats)
    if not args.no_write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(page)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
