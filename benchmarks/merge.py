"""Benchmark `surgery merge` on the real SmolLM2-135M workload against the anchor tools.

Runs, each as a whole process with wall time and peak RSS (``/usr/bin/time -v``):

1. ``batch``: every method mergekit 0.1.5 registers (``BATCH_METHODS``: the 20 of them, on
   base + the 3 fine-tunes unless the method takes fewer): ``mergekit-yaml`` and
   ``surgery merge --config`` on the same recipe (float32 math, bfloat16 output in both), how
   far the outputs are apart (in bf16 rounding steps; random methods are compared in
   distribution by the anchor tests instead), and ``surgery eval ppl`` of surgery's output on
   each domain's held-out text (``--skip-ppl`` leaves it out).
1b. ``synthetic``: the same recipes on a 2 GB Llama-7B-shaped checkpoint (benchmarks/io.py's,
   plus three noisy copies as the models, generated once): surgery's peak RSS against its
   SmolLM2 run (flat in model size: within 1.2×).
2. ``opcm`` over the 3 fine-tunes: surgery with the Gram eigendecomposition and with the
   exact SVD (their per-tensor relative difference), and FusionBench's own OPCM class
   (``fusion_bench.method.opcm.opcm_general.OPCM``) from the venv /work/venvs/fusionbench
   when it exists (FusionBench needs transformers<5), on the same models, alpha and order.
3. Memory as models are added: an OPCM state made from 2 models, resumed one model at a
   time up to 8 (the 3 fine-tunes cycled), peak RSS of every run.

Prints the ratios and writes docs/benchmarks/merge.md.

    python benchmarks/merge.py [--stages batch,synthetic,opcm,growth] [--methods ties,sce]
                               [--skip-ppl] [--skip-fusionbench] [--keep DIR]
    python benchmarks/merge.py --stages synthetic --synthetic-layers 1 --methods slerp   # smoke, saves nothing

Every row carries the time it was measured (``when``). The rows the page shows are kept in
docs/benchmarks/merge.json, committed with the page (and copied to
~/.cache/surgery/bench-merge.json); a run merges its new rows into them — per method (per
section for OPCM and growth) the later measurement wins — so stages can be run separately and
a partial ``--methods`` run updates only its rows, on any machine, without dropping the others.
Every method's row is saved and the page re-rendered as soon as it is measured, so a run that
dies or is stopped still keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

FUSIONBENCH_PY = Path("/work/venvs/fusionbench/bin/python")
DOC = ROOT / "docs" / "benchmarks" / "merge.md"
RESULTS = Path.home() / ".cache" / "surgery" / "bench-merge.json"
RECORD = DOC.with_suffix(".json")       # the rows the page shows, committed with it


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _when(x) -> str:
    """When a row (or a section: a dict, or a list of rows) was measured; "" when unknown."""
    if isinstance(x, list):
        return max((_when(r) for r in x), default="")
    return str(x.get("when", "")) if isinstance(x, dict) else ""


def merge_results(old: dict, new: dict) -> dict:
    """``old`` updated by ``new``: per method of a stage's rows (lists of ``{"method": ...}``)
    and per section otherwise (``opcm``, ``growth``, ``inputs_ppl``), whichever was measured
    later wins (``new`` on a tie or when neither is dated); ``when`` is the later of the two."""
    out = dict(old)
    for key, val in new.items():
        prev = out.get(key)
        if key == "when":
            out[key] = max(str(val), str(prev or ""))
        elif isinstance(val, list) and isinstance(prev, list) and all("method" in r for r in val + prev):
            by = {r["method"]: r for r in prev}
            for r in val:
                if _when(r) >= _when(by.get(r["method"], {})):
                    by[r["method"]] = r
            order = list(BATCH_METHODS)
            out[key] = sorted(by.values(), key=lambda r: (order.index(r["method"]) if r["method"] in order
                                                          else len(order), r["method"]))
        elif prev is None or _when(val) >= _when(prev):
            out[key] = val
    return out


def stamp_rows(rows: list[dict]) -> list[dict]:
    """A stage's rows after a run: the rows measured in it are already stamped (``merged``);
    rows kept from an earlier run keep their own date and commit; an undated row is dated now."""
    return [r if "when" in r else {**r, "when": _now()} for r in rows]


def load_results() -> dict:
    """The committed record merged with this machine's cache (the later row of each method wins)."""
    results: dict = {}
    for path in (RECORD, RESULTS):
        if path.is_file():
            results = merge_results(results, json.loads(path.read_text()))
    return results


def measured(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS in MB, exit code.

    With ``timeout`` (seconds), a run past it is killed with its whole process group and
    reported as ``{"timed_out": True, "wall_s": ...}`` instead of failing the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"timed_out": True, "wall_s": round(time.perf_counter() - t0, 2), "rss_mb": float("nan"),
                "stdout": ""}
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    if proc.returncode != 0:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": round(wall, 2), "rss_mb": round(rss, 1), "stdout": stdout}


def surgery_cmd() -> list[str]:
    return [shutil.which("surgery") or "surgery"]


def bf16_steps(a_dir: Path, b_dir: Path) -> dict:
    """Largest |a − b| in units of the bf16 spacing at max(|a|, |b|) (one rounding step = 1),
    and the share of entries that differ at all."""
    import torch

    from surgery.checkpoint import open_checkpoint

    a, b = open_checkpoint(a_dir), open_checkpoint(b_dir)
    worst, differ, total = 0.0, 0, 0
    for n in a.names:
        x, y = a.get(n), b.get(n)
        if a.info(n).dtype != torch.bfloat16:
            continue
        big = torch.maximum(x.abs(), y.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
        spacing = torch.exp2(torch.floor(torch.log2(big)) - 7)      # bf16 keeps 7 explicit mantissa bits
        steps = (x - y).abs() / spacing
        worst = max(worst, float(steps.max()))
        differ += int((x != y).sum())
        total += x.numel()
    return {"max_bf16_steps": worst, "share_differing": differ / max(total, 1)}


def relative_per_tensor(a_dir: Path, b_dir: Path, base_dir: Path | None = None) -> dict:
    """Max over tensors of ‖a − b‖ / ‖b‖ (float32); with ``base_dir``, of ‖a − b‖ / ‖b − base‖
    (relative to b's task vector: far stricter when the task vectors are small)."""
    import torch

    from surgery.checkpoint import open_checkpoint

    a, b = open_checkpoint(a_dir), open_checkpoint(b_dir)
    base = open_checkpoint(base_dir) if base_dir is not None else None
    worst, where = 0.0, None
    for n in b.names:
        if n not in a:
            continue
        x, y = a.get(n), b.get(n)
        ref = y if base is None else y - base.get(n)
        rel = float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
        if rel > worst:
            worst, where = rel, n
    return {"max_rel": worst, "tensor": where}


# Every mergekit method on the workload: the recipe both tools run (float32 math, bf16 output).
# "models" picks fine-tunes by index (0 code, 1 license, 2 prose) with per-model parameters;
# "base" is the SmolLM2 base, a fine-tune index, or None.
THIRD = 1.0 / 3
BATCH_METHODS: dict[str, dict] = {
    "linear": {"base": None, "models": [(i, {"weight": 1.0}) for i in range(3)], "parameters": {}},
    "task_arithmetic": {"models": [(i, {"weight": THIRD}) for i in range(3)], "parameters": {"lambda": 1.0}},
    "ties": {"models": [(i, {"weight": 1.0, "density": 0.5}) for i in range(3)],
             "parameters": {"lambda": 1.0, "normalize": True}},
    "dare_linear": {"models": [(i, {"weight": THIRD, "density": 0.5}) for i in range(3)], "parameters": {}},
    "dare_ties": {"models": [(i, {"weight": 1.0, "density": 0.5}) for i in range(3)], "parameters": {}},
    "breadcrumbs": {"models": [(i, {"weight": THIRD, "density": 0.9, "gamma": 0.01}) for i in range(3)],
                    "parameters": {}},
    "breadcrumbs_ties": {"models": [(i, {"weight": 1.0, "density": 0.9, "gamma": 0.01}) for i in range(3)],
                         "parameters": {"normalize": True}},
    "della": {"models": [(i, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}) for i in range(3)], "parameters": {}},
    "della_linear": {"models": [(i, {"weight": THIRD, "density": 0.5, "epsilon": 0.1}) for i in range(3)],
                     "parameters": {}},
    "sce": {"models": [(i, {}) for i in range(3)], "parameters": {"select_topk": 0.5}},
    "ram": {"models": [(i, {}) for i in range(3)], "parameters": {}},
    "ramplus_tl": {"models": [(i, {}) for i in range(3)], "parameters": {}},
    "slerp": {"base": 0, "models": [(0, {}), (2, {})], "parameters": {"t": 0.5}},
    "nuslerp": {"models": [(0, {"weight": 0.5}), (2, {"weight": 0.5})], "parameters": {}},
    # no base: with one, the tensors no fine-tune changed have all-zero task vectors, which
    # mergekit refuses ("the weighted sum of the input tensors is zero")
    "multislerp": {"base": None, "models": [(i, {"weight": 1.0}) for i in range(3)], "parameters": {}},
    "karcher": {"base": None, "models": [(i, {}) for i in range(3)], "parameters": {}},
    "model_stock": {"models": [(i, {}) for i in range(3)], "parameters": {}},
    "nearswap": {"models": [(0, {})], "parameters": {"t": 0.0001}},
    "arcee_fusion": {"models": [(0, {})], "parameters": {}},
    "passthrough": {"base": None, "models": [(0, {})], "parameters": {}},
}
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
DOMAINS = ("code", "license", "prose")


def write_recipe(path: Path, method: str, base: Path, fts: list[Path]) -> Path:
    """The benchmark recipe of ``method`` (BATCH_METHODS) as mergekit YAML."""
    spec = BATCH_METHODS[method]
    which = spec.get("base", "base")
    lines = [f"merge_method: {method}"]
    if which is not None:
        lines.append(f"base_model: {base if which == 'base' else fts[which]}")
    lines.append("models:")
    for i, params in spec["models"]:
        lines.append(f"  - model: {fts[i]}")
        if params:
            lines.append(f"    parameters: {json.dumps(params)}")
    if spec["parameters"]:
        lines.append(f"parameters: {json.dumps(spec['parameters'])}")
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    path.write_text("\n".join(lines) + "\n")
    return path


def heldout_texts(work: Path, base: Path) -> dict[str, Path]:
    """Each domain's held-out windows (never trained on, benchmarks/workload.py) as a text file."""
    from transformers import AutoTokenizer
    from workload import chunks, domain_text

    tok = AutoTokenizer.from_pretrained(base)
    out = {}
    for name in DOMAINS:
        _, held = chunks(tok, domain_text(name))
        out[name] = work / f"heldout-{name}.txt"
        out[name].write_text(tok.decode(held.reshape(-1).tolist()))
    return out


def heldout_ppl(ckpt: Path, texts: dict[str, Path]) -> dict[str, float]:
    """`surgery eval ppl` on each domain's held-out text (disjoint 128-token windows)."""
    res = {}
    for name, text in texts.items():
        p = subprocess.run([*surgery_cmd(), "eval", "ppl", str(ckpt), "--text", str(text), "--ctx", "128",
                            "--stride", "128", "--json", "--quiet"], capture_output=True, text=True)
        res[name] = json.loads(p.stdout)["perplexity"] if p.returncode == 0 else float("nan")
    return res


def batch(work: Path, base: Path, fts: list[Path], only: list[str] | None = None, ppl: bool = True,
          on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Every method of BATCH_METHODS (or of ``only``) against mergekit-yaml; ``on_row(row)`` as each finishes."""
    rows = []
    texts = heldout_texts(work, base) if ppl else {}
    for method in BATCH_METHODS:
        if only and method not in only:
            continue
        recipe = write_recipe(work / f"{method}.yml", method, base, fts)
        load_before = os.getloadavg()[0]
        mk = measured([shutil.which("mergekit-yaml"), str(recipe), str(work / f"mk-{method}")])
        ours = measured([*surgery_cmd(), "merge", "--config", str(recipe), "-o", str(work / f"s-{method}"), "--quiet"])
        diff = bf16_steps(work / f"s-{method}", work / f"mk-{method}")
        extra: dict = {"random": method in RANDOM_METHODS}
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties", "sce"):
            # mergekit keeps entries through torch.argsort / sort / topk, which are not stable on CPU:
            # which of the entries tied at a threshold it keeps is unspecified. Re-run it (untimed)
            # with stable sorts, the tie rule surgery documents, and compare again.
            subprocess.run([sys.executable, "-c", STABLE_MERGEKIT, str(recipe), str(work / "mk-stable")], check=True)
            stable = bf16_steps(work / f"s-{method}", work / "mk-stable")
            extra.update({"stable_max_bf16_steps": stable["max_bf16_steps"],
                          "stable_share_differing": stable["share_differing"]})
            shutil.rmtree(work / "mk-stable", ignore_errors=True)
        if ppl:
            extra["ppl"] = heldout_ppl(work / f"s-{method}", texts)
        rows.append({"method": method, "surgery": ours, "mergekit": mk, **diff, **extra,
                     "load_before": round(load_before, 2),
                     "wall_ratio": ours["wall_s"] / mk["wall_s"], "rss_ratio": ours["rss_mb"] / mk["rss_mb"]})
        print(f"{method:16s} surgery {ours['wall_s']:6.1f} s {ours['rss_mb']:7.0f} MB | mergekit {mk['wall_s']:6.1f} s "
              f"{mk['rss_mb']:7.0f} MB | wall x{rows[-1]['wall_ratio']:.2f} rss x{rows[-1]['rss_ratio']:.2f} | "
              + ("random: compared in distribution by the anchor tests" if extra["random"] else
                 f"max {diff['max_bf16_steps']:.2f} bf16 step(s), {100 * diff['share_differing']:.4f}% entries differ")
              + (" | ppl " + " ".join(f"{k} {v:.2f}" for k, v in extra["ppl"].items()) if ppl else ""))
        for d in (f"mk-{method}", f"s-{method}"):
            shutil.rmtree(work / d, ignore_errors=True)
        for r in (ours, mk):
            r.pop("stdout", None)
        if on_row is not None:
            on_row(rows[-1])
    return rows


def inputs_ppl(work: Path, base: Path, fts: list[Path]) -> dict[str, dict[str, float]]:
    """Held-out perplexity of the base and of each fine-tune (the reference rows of the table)."""
    texts = heldout_texts(work, base)
    return {("base" if i == 0 else p.name): heldout_ppl(p, texts) for i, p in enumerate([base, *fts])}


# ---- RSS flat in model size: the same recipes on a 2 GB Llama-7B-shaped checkpoint --------------

def _bench_io():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_io", HERE / "io.py")    # benchmarks/io.py (not stdlib io)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_models(n: int = 3, scale: float = 2e-3, layers: int | None = None) -> tuple[Path, list[Path]]:
    """The 2 GB Llama-7B-shaped bf16 checkpoint of benchmarks/io.py as the base, and ``n``
    "fine-tunes" of it (base + seeded Gaussian noise of std ``scale``, bf16), generated once and
    streamed to disk one row block at a time."""
    import torch

    from surgery.checkpoint import open_checkpoint

    bio = _bench_io()
    if layers:
        bio.LAYERS = layers             # a smaller checkpoint of the same shapes (its own cache folder)
    base = bio.synthetic_checkpoint("bfloat16")
    src = open_checkpoint(base)
    header = json.loads((base / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (base / "model.safetensors").read_bytes()[:8], "little")])
    outs = []
    for i in range(n):
        dest = base.with_name(f"{base.name}-ft{i}")
        outs.append(dest)
        if (dest / "model.safetensors").is_file():
            continue
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        gen = torch.Generator().manual_seed(100 + i)
        raw = (base / "model.safetensors").open("rb")
        hlen = int.from_bytes(raw.read(8), "little")
        with open(tmp / "model.safetensors", "wb") as fh:
            fh.write(hlen.to_bytes(8, "little"))
            fh.write(raw.read(hlen))
            for name in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]):
                rows, cols = header[name]["shape"]
                step = max(1, (32 << 20) // (cols * 4))
                for a in range(0, rows, step):
                    x = src.get_rows(name, a, min(rows, a + step), dtype=torch.float32)
                    x.add_(torch.randn(x.shape, generator=gen), alpha=scale)
                    fh.write(x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        raw.close()
        shutil.copy(base / "config.json", tmp / "config.json")
        tmp.rename(dest)
    return base, outs


def synthetic(work: Path, smollm2_rows: list[dict], only: list[str] | None = None,
              on_row: Callable[[dict], None] | None = None, layers: int | None = None) -> list[dict]:
    """Every method's recipe on the 7B-shaped checkpoint: surgery's peak RSS against its SmolLM2 run."""
    base, fts = synthetic_models(layers=layers)
    by_method = {r["method"]: r for r in smollm2_rows}
    rows = []
    for method in BATCH_METHODS:
        if only and method not in only:
            continue
        recipe = write_recipe(work / f"syn-{method}.yml", method, base, fts)
        r = measured([*surgery_cmd(), "merge", "--config", str(recipe), "-o", str(work / f"syn-{method}"), "--quiet"])
        r.pop("stdout", None)
        shutil.rmtree(work / f"syn-{method}", ignore_errors=True)
        small = by_method.get(method, {}).get("surgery", {}).get("rss_mb")
        rows.append({"method": method, "synthetic": r, "smollm2_rss_mb": small,
                     "rss_growth": r["rss_mb"] / small if small else None})
        print(f"{method:16s} 7B-shaped: {r['wall_s']:6.1f} s {r['rss_mb']:7.0f} MB"
              + (f" | x{rows[-1]['rss_growth']:.2f} the SmolLM2 run's peak RSS" if small else ""))
        if on_row is not None:
            on_row(rows[-1])
    return rows


STABLE_MERGEKIT = r'''
import sys, torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
_sort = torch.sort
torch.sort = lambda x, dim=-1, descending=False, stable=None, **kw: _sort(x, dim=dim, descending=descending, stable=True, **kw)
torch.argsort = lambda x, dim=-1, descending=False, **kw: _sort(x, dim=dim, descending=descending, stable=True).indices
def _topk(x, k, dim=-1, largest=True, sorted=True, **kw):
    r = _sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((r.values.narrow(dim, 0, k), r.indices.narrow(dim, 0, k)))
torch.topk = _topk
run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]))), sys.argv[2],
          options=MergeOptions(copy_tokenizer=False, quiet=True))
'''


# The work no OPCM implementation at surgery's accuracy can skip: per merge step after the
# first, a float64 Gram matrix and its full eigendecomposition for every projected matrix
# (float32 eigh loses the small singular directions: 1.3e-3 relative error on a real
# q_proj with sigma_min/sigma_max = 2e-4), plus the two float32 products of the matrix's
# size that any projection needs (the new task vector's coordinates, the correction). Timed on the first fine-tune's task vectors
# (the same shapes as every step's M), the matrices already in memory, laid out as surgery
# runs them (one worker per core, one intra-op thread each).
DECOMPOSITION_FLOOR = r'''
import json, sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from surgery.checkpoint import open_checkpoint
from surgery.merge.methods.opcm import projected
base, ft, steps = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2]), int(sys.argv[3])
mats = [ft.get(n) - base.get(n) for n in base.names
        if base.info(n).dtype.is_floating_point and projected(n, base.info(n).shape, {"project_embeddings": False})]
workers = torch.get_num_threads()
torch.set_num_threads(1)
def floor(m):
    t = m if m.shape[0] >= m.shape[1] else m.mT       # tall: Gram n x n
    g = t.double()
    evals, evecs = torch.linalg.eigh(g.mT @ g)
    w = evecs.float()
    return t.mT @ t, t @ w          # stand-ins of the same sizes: coordinates of tau (M^T tau), correction (M W)
with ThreadPoolExecutor(workers) as pool:
    t = time.perf_counter()
    for _ in range(steps):
        list(pool.map(floor, mats))
    print(json.dumps({"seconds": time.perf_counter() - t, "matrices": len(mats), "steps": steps, "workers": workers}))
'''


FUSIONBENCH_DRIVER = r'''
import sys, time, torch
from transformers import AutoModelForCausalLM
from fusion_bench.method.opcm.opcm_general import OPCM
from fusion_bench.modelpool import BaseModelPool
base, out, fts = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_grad_enabled(False)
def load(p):
    m = AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32)
    # SmolLM2 ties lm_head to embed_tokens. FusionBench walks leaf modules: it would treat the tied
    # head as a Linear (projecting the embedding) and count it twice in every task-vector norm.
    # The checkpoints hold the embedding once, so the head is dropped here (no parameters of its own).
    if m.config.tie_word_embeddings:
        m.lm_head = torch.nn.Identity()
    return m
pool = BaseModelPool({"_pretrained_": load(base), **{f"m{i}": load(p) for i, p in enumerate(fts)}})
algo = OPCM(alpha=0.5, shuffle_order=False, seed=0, save_on_every_step=False, evaluate_on_every_step=False)
merged = algo.run(pool)
merged.to(torch.bfloat16).save_pretrained(out)
'''


def opcm(work: Path, base: Path, fts: list[Path], fusionbench: bool) -> dict:
    res: dict = {}
    args = ["merge", "-m", "opcm", "--base", str(base), *map(str, fts), "--quiet"]
    res["gram"] = measured([*surgery_cmd(), *args, "-o", str(work / "opcm-gram"), "--json"])
    res["svd"] = measured([*surgery_cmd(), *args, "--decomposition", "svd", "-o", str(work / "opcm-svd"), "--json"])
    res["lambda"] = json.loads(res["gram"]["stdout"])["lambda"]
    res["gram_vs_svd"] = relative_per_tensor(work / "opcm-gram", work / "opcm-svd")
    for k in ("gram", "svd"):
        res[k].pop("stdout")
    print(f"opcm (gram)      surgery {res['gram']['wall_s']:6.1f} s {res['gram']['rss_mb']:7.0f} MB; "
          f"(svd) {res['svd']['wall_s']:6.1f} s {res['svd']['rss_mb']:7.0f} MB; gram vs svd max rel "
          f"{res['gram_vs_svd']['max_rel']:.2e}; lambda_3 = {res['lambda']:.4f}")
    floor = subprocess.run([sys.executable, "-c", DECOMPOSITION_FLOOR, str(base), str(fts[0]), str(len(fts) - 1)],
                           capture_output=True, text=True, check=True)
    res["floor"] = json.loads(floor.stdout.strip().splitlines()[-1])
    print(f"opcm compute floor (float64 Gram + eigh + 2 float32 products per projected matrix, {len(fts) - 1} steps, "
          f"{res['floor']['workers']} workers x 1 thread): {res['floor']['seconds']:.2f} s")
    if fusionbench and FUSIONBENCH_PY.exists():
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        fb = measured([str(FUSIONBENCH_PY), "-c", FUSIONBENCH_DRIVER, str(base), str(work / "opcm-fb"), *map(str, fts)], env)
        fb.pop("stdout")
        res["fusionbench"] = fb
        res["vs_fusionbench"] = relative_per_tensor(work / "opcm-gram", work / "opcm-fb")
        res["wall_ratio"] = res["gram"]["wall_s"] / fb["wall_s"]
        res["rss_ratio"] = res["gram"]["rss_mb"] / fb["rss_mb"]
        print(f"opcm FusionBench {fb['wall_s']:6.1f} s {fb['rss_mb']:7.0f} MB | wall x{res['wall_ratio']:.2f} "
              f"rss x{res['rss_ratio']:.2f} | max rel per tensor {res['vs_fusionbench']['max_rel']:.2e} "
              f"({res['vs_fusionbench']['tensor']})")
    return res


def memory_growth(work: Path, base: Path, fts: list[Path], upto: int = 8) -> list[dict]:
    st = work / "state"
    rows = []
    r = measured([*surgery_cmd(), "merge", "-m", "opcm", "--base", str(base), str(fts[0]), str(fts[1]),
                  "--state", str(st), "-o", str(work / "grow-2"), "--quiet"])
    rows.append({"models": 2, "wall_s": r["wall_s"], "rss_mb": r["rss_mb"]})
    for k in range(3, upto + 1):
        m = fts[(k - 1) % len(fts)]
        out = work / f"grow-{k}"
        r = measured([*surgery_cmd(), "merge", "--resume", str(st), str(m), "--state", str(st), "-o", str(out), "--quiet"])
        rows.append({"models": k, "wall_s": r["wall_s"], "rss_mb": r["rss_mb"]})
        shutil.rmtree(work / f"grow-{k - 1}", ignore_errors=True)
    for row in rows:
        print(f"opcm state with {row['models']} models: {row['wall_s']:5.1f} s, peak RSS {row['rss_mb']:6.0f} MB")
    print(f"peak RSS at {upto} / at 2 models: x{rows[-1]['rss_mb'] / rows[0]['rss_mb']:.3f}")
    return rows


def machine() -> str:
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 ** 2:.0f} GiB"
    except Exception:
        pass
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem} RAM, no GPU; "
            f"python {platform.python_version()}, torch {torch.__version__}")


def _ppl_cells(ppl: dict | None) -> str:
    return " | ".join(f"{ppl[d]:.2f}" if ppl and d in ppl else "–" for d in DOMAINS)


def _load(r: dict) -> str:
    return f"{r['load_before']:.2f}" if isinstance(r.get("load_before"), (int, float)) else "–"


def write_doc(results: dict) -> None:
    b = [r for r in results.get("batch", []) if "surgery" in r]
    lines = ["# `surgery merge` benchmark", "",
             "Produced by `python benchmarks/merge.py` (SmolLM2-135M-Instruct in bf16 as the base, the three "
             "full fine-tunes of `benchmarks/workload.py`: code, license, prose). Every tool runs as a whole "
             "process; wall time and peak RSS come from `/usr/bin/time -v`; within a section both tools ran back "
             "to back in the same invocation (sections may come from separate invocations: `--stages`).", "",
             f"Machine: {results['machine']}. On 2 cores, other processes slow the multi-threaded tools far more "
             "than surgery, so each section records the 1-minute load average before it started; "
             "ratios come from runs made back to back.", "",
             f"Last updated {results['when']}.", "",
             "## Every mergekit method vs mergekit-yaml (SmolLM2 base + fine-tunes)", "",
             "Same recipe for both tools (`BATCH_METHODS` in benchmarks/merge.py: the three fine-tunes unless the "
             "method takes fewer): float32 math (`dtype: float32`), bfloat16 output (`out_dtype: bfloat16`). "
             "Perplexity is `surgery eval ppl` of surgery's output on each domain's held-out windows (never "
             "trained on; disjoint 128-token windows); lower is better.", "",
             "| method | surgery wall | surgery peak RSS | mergekit wall | mergekit peak RSS | wall ratio | RSS ratio "
             "| max diff vs mergekit | entries differing | ppl code | ppl license | ppl prose | load before "
             "| measured |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in b:
        if r.get("random"):
            diff = "random: in distribution (anchor tests)", "–"
        else:
            diff = f"{r['max_bf16_steps']:.2f} bf16 step(s)", f"{100 * r['share_differing']:.4f}%"
        lines.append(f"| {r['method']} | {r['surgery']['wall_s']:.1f} s | {r['surgery']['rss_mb']:.0f} MB | "
                     f"{r['mergekit']['wall_s']:.1f} s | {r['mergekit']['rss_mb']:.0f} MB | {r['wall_ratio']:.2f}× | "
                     f"{r['rss_ratio']:.2f}× | {diff[0]} | {diff[1]} | {_ppl_cells(r.get('ppl'))} | "
                     f"{_load(r)} | {r.get('when', '–')} |")
    for name, ppl in results.get("inputs_ppl", {}).items():
        lines.append(f"| *{name}* (input) | | | | | | | | | {_ppl_cells(ppl)} | | |")
    commits = sorted({r["commit"] for r in b if r.get("commit")}) or ["?"]
    miss = [r["method"] for r in b if r["wall_ratio"] > 0.5 or r["rss_ratio"] > 0.4]
    dates = sorted({r.get("when", "?") for r in b})
    lines += ["", f"Targets from the issue: wall ≤ 0.5×, peak RSS ≤ 0.4× mergekit's"
              + (f" (missed by: {', '.join(miss)})" if miss else " (met by every method in the table)")
              + f". (surgery commit {', '.join(commits)}.)"
              + (f" The rows come from {len(dates)} runs (the *measured* column; both tools of a row always ran "
                 "back to back); a run with `--methods` replaces only its methods' rows." if len(dates) > 1 else "")
              + " Held-out perplexities of every method are in [quality.md](quality.md)."]
    stable = [r for r in b if "stable_max_bf16_steps" in r]
    if stable:
        lines += ["", "mergekit keeps entries through `torch.argsort` (ties), `torch.sort` (breadcrumbs) and "
                  "`torch.topk` (sce), which are not stable on CPU, so which of the entries tied at a threshold "
                  "survive is unspecified (bf16 fine-tunes have many equal magnitudes). surgery breaks such ties by "
                  "flat index (docs/merge.md). With mergekit re-run (untimed) using stable sorts, the outputs "
                  "differ by at most: " + "; ".join(
                      f"`{r['method']}` {r['stable_max_bf16_steps']:.2f} bf16 step(s) in "
                      f"{100 * r['stable_share_differing']:.4f}% of the entries" for r in stable)
                  + ". The CI anchor tests check every method entry by entry on the fixtures."]
    syn = results.get("synthetic", [])
    if syn:
        lines += ["", "## Peak memory flat in model size (2 GB Llama-7B-shaped checkpoint)", "",
                  "The same recipes on benchmarks/io.py's synthetic checkpoint (5 layers of 4096×4096 attention "
                  "and 4096×11008 MLP matrices, bf16) as the base and three noisy copies of it as the models, "
                  "against surgery's run on SmolLM2 above (target: within 1.2×).", "",
                  "| method | 7B-shaped wall | 7B-shaped peak RSS | SmolLM2 peak RSS | ratio | measured |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in syn:
            ratio = f"{r['rss_growth']:.2f}×" if r.get("rss_growth") else "–"
            small = f"{r['smollm2_rss_mb']:.0f} MB" if r.get("smollm2_rss_mb") else "–"
            lines.append(f"| {r['method']} | {r['synthetic']['wall_s']:.1f} s | {r['synthetic']['rss_mb']:.0f} MB | "
                         f"{small} | {ratio} | {r.get('when', '–')} |")
    if "opcm" in results:
        lines += _opcm_lines(results["opcm"])
    if "growth" in results:
        lines += _growth_lines(results["growth"])
    lines += ["", "## Notes", "",
              "- FusionBench's `OPCM` walks the model's leaf modules. SmolLM2 ties `lm_head` to `embed_tokens`, so it "
              "would treat the tied head as a Linear layer (projecting the embedding) and count the embedding twice in "
              "every task-vector norm; the driver replaces the tied head by `Identity` (it has no parameters of its "
              "own), which makes both tools merge exactly the tensors the checkpoints hold.",
              "- Multi-threaded LAPACK on matrices this small spins at its barriers when the cores are busy: surgery "
              "runs one projection per core, each on one intra-op thread (docs/merge.md). FusionBench runs with "
              "torch's defaults.",
              "- \"bf16 steps\" is |a − b| divided by the bf16 spacing at max(|a|, |b|); a difference of one rounding "
              "step is 1. (A first version of this script compared bit patterns, which explodes across zero: a "
              "table made with it shows thousands of steps for entries that differ in the last bit around 0.)",
              "- Both merge outputs are bf16; FusionBench's model is merged in float32 and cast on save.",
              "- `multislerp`: mergekit's float32 `torch.norm` of a whole large tensor is low on CPU "
              "(pytorch/pytorch#169237; -0.15% for SmolLM2's 28M-entry embedding), which shrinks its embedding by "
              "about 0.36%: nearly all of its differing entries (docs/merge.md, \"`multislerp` on large tensors\")."]
    DOC.write_text("\n".join(lines) + "\n")


def _opcm_lines(o: dict) -> list[str]:
    lines = ["",
              "## OPCM over 3 fine-tunes (alpha 0.5, command-line order)", "",
              f"Measured {o.get('when', '–')}.", "",
              "| run | wall | peak RSS |", "| --- | --- | --- |",
              f"| surgery, `--decomposition gram` (default) | {o['gram']['wall_s']:.1f} s | {o['gram']['rss_mb']:.0f} MB |",
              f"| surgery, `--decomposition svd` | {o['svd']['wall_s']:.1f} s | {o['svd']['rss_mb']:.0f} MB |"]
    if "fusionbench" in o:
        fb = o["fusionbench"]
        lines += [f"| FusionBench `OPCM` (float32 models in memory) | {fb['wall_s']:.1f} s | {fb['rss_mb']:.0f} MB |", "",
                  f"Ratios surgery (gram) / FusionBench: wall {o['wall_ratio']:.2f}×, peak RSS {o['rss_ratio']:.2f}× "
                  "(targets 0.2× and 0.25×). Largest per-tensor relative difference of the outputs: "
                  f"{o['vs_fusionbench']['max_rel']:.2e} (`{o['vs_fusionbench']['tensor']}`; target 1e-3)."]
        if "floor" in o:
            fl = o["floor"]
            lines += ["", f"Compute floor: the float64 Gram products and eigendecompositions plus two float32 products "
                      "of each matrix's size (the new task vector's coordinates, the correction) — "
                      f"{fl['matrices']} projected matrices × {fl['steps']} steps, already in memory, "
                      f"{fl['workers']} workers × 1 thread — take {fl['seconds']:.2f} s, "
                      f"{fl['seconds'] / fb['wall_s']:.2f}× FusionBench's whole run. No way of projecting "
                      "that decomposes every matrix this accurately does less math, before reading and writing anything; "
                      "float32 eigh would cut it but loses the small "
                      "singular directions (1.3e-3 relative error on a real q_proj with σ_min/σ_max = 2e-4)."]
    else:
        lines += ["", "FusionBench was not run (no /work/venvs/fusionbench): no ratio against it in this run."]
    lines += ["", f"Gram eigendecomposition vs exact SVD, largest per-tensor relative difference of the merged "
              f"model: {o['gram_vs_svd']['max_rel']:.2e} (`{o['gram_vs_svd']['tensor']}`; target 1e-3). "
              f"Final λ_3 = {o['lambda']:.4f}. (surgery commit {o.get('commit', '?')}.)"]
    return lines


def _growth_lines(g: list) -> list[str]:
    lines = ["", "## Memory as models are added (OPCM state resumed from 2 to 8 models)", "",
             f"Measured {_when(g) or '–'}.", "",
             "| models in the state | wall | peak RSS |", "| --- | --- | --- |"]
    for r in g:
        lines.append(f"| {r['models']} | {r['wall_s']:.1f} s | {r['rss_mb']:.0f} MB |")
    lines += ["", f"Peak RSS at 8 models / at 2 models: {g[-1]['rss_mb'] / g[0]['rss_mb']:.3f}× (target ≤ 1.1×). "
              "Each resume reads only the base, the state and the one new model (the three fine-tunes "
              "are cycled). The wall column is informational (resuming is not one of the issue's speed targets).", ""]
    return lines


def _commit() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="batch,synthetic,opcm,growth",
                    help="Comma-separated: batch, synthetic, opcm, growth.")
    ap.add_argument("--skip-ppl", action="store_true", help="Batch stage: no held-out perplexity (faster).")
    ap.add_argument("--skip-fusionbench", action="store_true")
    ap.add_argument("--methods", "--batch-methods", dest="methods", default="",
                    help="Comma-separated: only these methods in the batch and synthetic stages "
                         "(the others keep their cached rows).")
    ap.add_argument("--synthetic-layers", type=int, default=None,
                    help="Smoke test of the synthetic stage on a checkpoint of this many 7B-shaped layers (1: "
                         "400 MB) instead of benchmarks/io.py's 5 (2 GB): rows are printed, nothing is saved.")
    ap.add_argument("--render-only", action="store_true", help="Rewrite the page from the cached numbers.")
    ap.add_argument("--keep", type=Path, help="Keep the outputs in this folder.")
    args = ap.parse_args()
    if args.render_only:
        write_doc(load_results())
        return
    from workload import build_workload

    w = build_workload(log=print)
    base, fts = Path(w["base"]), [Path(p) for p in w["finetunes"]]
    work = args.keep or Path(tempfile.mkdtemp(prefix="surgery-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = load_results()
        results.update({"machine": machine(), "when": _now()})
        only = [m for m in args.methods.split(",") if m]
        unknown = [m for m in only if m not in BATCH_METHODS]
        if unknown:
            sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BATCH_METHODS)}")

        def merged(stage: str, new: list[dict]) -> list[dict]:
            new = [{"when": _now(), **r, "commit": _commit()} for r in new]
            return merge_results({stage: results.get(stage, [])}, {stage: new})[stage]

        def save() -> None:
            text = json.dumps(results, indent=2, default=str) + "\n"
            for path in (RESULTS, RECORD):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            write_doc(results)

        def keep(stage: str):
            """Merge one finished method's row into the cached stage and re-render the page."""
            def on_row(row: dict) -> None:
                results[stage] = merged(stage, [row])
                save()
            return on_row

        def run_batch() -> list[dict]:
            if not args.skip_ppl:
                results["inputs_ppl"] = inputs_ppl(work, base, fts)
            return merged("batch", batch(work, base, fts, only or None, ppl=not args.skip_ppl, on_row=keep("batch")))

        if args.synthetic_layers:
            synthetic(work, results.get("batch", []), only or None, layers=args.synthetic_layers)
            return
        stages = {"batch": run_batch,
                  "synthetic": lambda: merged("synthetic", synthetic(work, results.get("batch", []), only or None,
                                                                     on_row=keep("synthetic"))),
                  "opcm": lambda: opcm(work, base, fts, not args.skip_fusionbench),
                  "growth": lambda: memory_growth(work, base, fts)}
        for stage in args.stages.split(","):
            results[stage] = stages[stage]()
            if isinstance(results[stage], dict):
                results[stage].update({"commit": _commit(), "when": _now()})
            else:
                results[stage] = stamp_rows(results[stage])
            save()
            print(f"wrote {DOC}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
