"""Scale benchmark: OPCM and TIES merges of a synthetic Llama-7B-shaped checkpoint, as a plain
`surgery merge` and with `--ray` on a local 2-CPU Ray cluster; the per-unit costs; and the
predicted wall time of full 7B and 70B merges on N workers.

Inputs (generated once under ``$SURGERY_CACHE/bench/scale-*``, streamed to disk a row block
at a time): a base and ``--models`` fine-tunes (base + seeded noise), bf16, with Llama-2-7B's
shapes (embedding and head 32000×4096, q/k/v/o 4096×4096, gate/up 11008×4096, down
4096×11008, RMSNorm vectors) and a subset of the layers: ``--layers`` (default 4, ~2.1 GB
per model) for TIES, ``--opcm-layers`` (default 1, ~0.9 GB) for OPCM, whose 4096-wide
eigendecompositions take minutes each on one core.

Each run is a whole `surgery merge` process, plain and with ``--ray ADDRESS`` alternately,
``--reps`` times each (medians reported). The Ray cluster is a head this script starts
(``ray start --head --block --num-cpus 2``) before the runs and stops after, so the driver's
peak RSS (``wait4``) is the driver's alone and cluster start-up is not counted (a cluster is
already running when one uses ``--ray ADDRESS``); each run still pays connecting, the job's
worker processes starting and importing torch. The page cache is warmed before every run, and
the two outputs are compared byte for byte.

Goals (issue #16): Ray wall <= 1.25x plain on this 2-core machine; driver peak RSS flat (the
Ray driver never holds a tensor).

Predictions: every unit's seconds and tensors come back in ``--json`` (``execution.unit_seconds``
and ``unit_tensors``, and ``passes`` for OPCM's per-model passes). A unit's seconds divided by
the flops of all the tensors it wrote give a cost per flop (OPCM's projected attention, MLP and
head matrices: m·n·k + k³ with k = min(m, n); elementwise work: m·n); per tensor class the
median is scaled to the full models' shapes, summed over the tensors, and divided over N
one-core workers per pass, with the largest single unit as a floor; the I/O bound is the bytes every pass reads and writes over an
aggregate shared-storage bandwidth (``--bandwidth`` GB/s). The page lists every assumption.

    python benchmarks/scale.py --from-json     # re-render the page from the last run's results
    python benchmarks/scale.py [--reps 1] [--cases ties,opcm] [--layers 4] [--opcm-layers 1]
                               [--models 2] [--workers 8,32,128] [--bandwidth 5] [--write-doc]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from smollm2 import CACHE  # noqa: E402

BENCH = CACHE / "bench"
DOC = ROOT / "docs" / "benchmarks" / "scale.md"
RESULTS = CACHE / "bench-scale.json"
GOAL_WALL = 1.25

# Llama-2 shapes: (hidden, intermediate, layers, vocab, kv width)
LLAMA_7B = {"hidden": 4096, "inter": 11008, "layers": 32, "vocab": 32000, "kv": 4096}
LLAMA_70B = {"hidden": 8192, "inter": 28672, "layers": 80, "vocab": 32000, "kv": 1024}


def llama_tensors(shape: dict, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint (sorted by name)."""
    h, i, v, kv = shape["hidden"], shape["inter"], shape["vocab"], shape["kv"]
    out = [("lm_head.weight", (v, h)), ("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))]
    for layer in range(shape["layers"] if layers is None else layers):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return sorted(out)


def tensor_class(name: str) -> str:
    for key in ("lm_head", "embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                "down_proj"):
        if key in name:
            return key
    return "norm"


# ----------------------------------------------------------------------------- synthetic inputs

def _write_model(dest: Path, plan: list[tuple[str, tuple[int, ...]]], seed: int | None, layers: int,
                 s: dict) -> None:
    """One bf16 model: base weights N(0, 0.02²) from seed 1234, plus (``seed``) a task vector of
    N(0, 0.002²); streamed in row blocks of ~32 MB."""
    import torch

    header: dict = {"__metadata__": {"format": "pt", "generator": "benchmarks/scale.py"}}
    pos = 0
    for name, shape in plan:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base_gen = torch.Generator().manual_seed(1234)
    noise_gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with open(tmp / "model.safetensors", "wb") as fh:
        fh.write(len(hbytes).to_bytes(8, "little"))
        fh.write(hbytes)
        for name, shape in plan:
            if len(shape) == 1:
                block = torch.ones(shape)
                if noise_gen is not None:
                    block += 0.002 * torch.randn(shape, generator=noise_gen)
                fh.write(block.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
                continue
            rows, cols = shape
            step = max(1, (32 << 20) // (cols * 4))
            for a in range(0, rows, step):
                block = torch.randn(min(step, rows - a), cols, generator=base_gen).mul_(0.02)
                if noise_gen is not None:
                    block += 0.002 * torch.randn(block.shape, generator=noise_gen)
                fh.write(block.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
           "intermediate_size": s["inter"], "num_hidden_layers": layers, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": s["vocab"], "dtype": "bfloat16", "tie_word_embeddings": False,
           "note": "synthetic benchmark checkpoint (benchmarks/scale.py)"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def bench_shape(shrink: int) -> dict:
    """Llama-7B's shapes, or (``--shrink F``, for a quick end-to-end check) every width / F."""
    if shrink == 1:
        return dict(LLAMA_7B)
    return {k: (v if k == "layers" else max(8, v // shrink)) for k, v in LLAMA_7B.items()}


def synthetic_models(layers: int, models: int, shape: dict) -> list[Path]:
    """The base and ``models`` fine-tunes with ``layers`` Llama-7B-shaped layers (made once)."""
    tag = "" if shape == LLAMA_7B else f"-h{shape['hidden']}"
    root = BENCH / f"scale-llama7b{tag}-{layers}layers"
    plan = llama_tensors(shape, layers)
    out = []
    for k in range(models + 1):
        dest = root / ("base" if k == 0 else f"ft-{k}")
        if not (dest / "model.safetensors").is_file():
            print(f"generating {dest} ...", flush=True)
            _write_model(dest, plan, None if k == 0 else 100 + k, layers, shape)
        out.append(dest)
    return out


# ----------------------------------------------------------------------------- the cluster

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A 2-CPU Ray head started with ``ray start --head --block`` (stopped with the process)."""

    def __init__(self, cpus: int = 2, unit_bytes: int | None = None):
        self.tmp = tempfile.mkdtemp(prefix="sc-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if unit_bytes:
            self.env["SURGERY_RAY_UNIT_BYTES"] = str(unit_bytes)
        self.proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={self.port}",
                                      "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--include-dashboard=false",
                                      f"--temp-dir={self.tmp}", "--disable-usage-stats"], env=self.env,
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); print('ok')"
        for _ in range(60):
            r = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True,
                               text=True)
            if "ok" in r.stdout:
                return
            time.sleep(2)
        self.stop()
        raise SystemExit(f"the Ray head did not come up: {r.stderr[-1500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- measuring

def measured(cmd: list[str], env: dict, out_file: Path) -> dict:
    """Run ``cmd`` (stdout to ``out_file``); wall seconds and peak RSS (MiB) from ``wait4``."""
    with open(out_file, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:6])} ...\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "rss_mib": round(usage.ru_maxrss / 1024, 1),
            "doc": json.loads(out_file.read_text())}


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in sorted(p.rglob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    for n in names:
        with open(a / n, "rb") as fa, open(b / n, "rb") as fb:
            while True:
                x, y = fa.read(1 << 24), fb.read(1 << 24)
                if x != y:
                    return False
                if not x:
                    break
    return True


def run_case(case: str, models: list[Path], cluster: LocalCluster, reps: int, work: Path) -> dict:
    args = {"ties": ["-m", "ties", "-p", "density=0.5"], "opcm": ["-m", "opcm"]}[case]
    base, fts = models[0], models[1:]
    cmd = [sys.executable, "-m", "surgery.commands.app", "merge", *args, "--base", str(base), *map(str, fts),
           "--quiet", "--json", "--force"]
    runs: dict[str, list[dict]] = {"plain": [], "ray": []}
    for rep in range(reps):
        for mode in ("plain", "ray"):
            out = work / f"{case}-{mode}"
            extra = ["--ray", cluster.address] if mode == "ray" else []
            warm(models)
            print(f"  {case} {mode} (rep {rep + 1}/{reps}) ...", flush=True)
            r = measured(cmd + ["-o", str(out), *extra], cluster.env, work / f"{case}-{mode}.json")
            runs[mode].append(r)
    identical = same_bytes(work / f"{case}-plain", work / f"{case}-ray")
    med = {m: {"wall_s": statistics.median(r["wall_s"] for r in rs), "rss_mib": statistics.median(r["rss_mib"] for r in rs)}
           for m, rs in runs.items()}
    doc = runs["ray"][-1]["doc"]
    units: dict[str, float] = dict(doc.get("execution", {}).get("unit_seconds", {}))
    members: dict[str, list[str]] = dict(doc.get("execution", {}).get("unit_tensors", {}))
    pass_units: dict[str, float] = {}
    pass_members: dict[str, list[str]] = {}
    for p in doc.get("passes", []):
        pass_units.update(p.get("unit_seconds", {}))
        pass_members.update(p.get("unit_tensors", {}))
    return {"case": case, "models": [str(m) for m in models], "reps": reps, "plain": med["plain"], "ray": med["ray"],
            "all_runs": {m: [{k: v for k, v in r.items() if k != "doc"} for r in rs] for m, rs in runs.items()},
            "identical": identical, "output_unit_seconds": units, "pass_unit_seconds": pass_units,
            "output_unit_tensors": members, "pass_unit_tensors": pass_members,
            "passes": len(doc.get("passes", [])), "threads_per_task": doc.get("execution", {}).get("threads_per_task"),
            "lambda": doc.get("lambda")}


# ----------------------------------------------------------------------------- predictions

def flops(shape: tuple[int, ...], projected: bool) -> float:
    if len(shape) < 2 or not projected:
        return float(math.prod(shape))
    m, n = shape
    k = min(m, n)
    return float(m * n * k + k ** 3)


def projected(cls: str) -> bool:
    """The tensors OPCM projects (whole-matrix decompositions): every matrix and the head."""
    return cls not in ("embed_tokens", "norm")


def class_costs(unit_seconds: dict[str, float], layers: int, use_projection: bool, shape: dict,
                unit_tensors: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Seconds per unit and flop-normalised cost per tensor class.

    Units are keyed by their largest tensor; ``unit_tensors`` (``execution.unit_tensors``) lists
    every tensor a unit wrote, so a unit's seconds are divided by the flops of all its tensors
    (two equal 4096×4096 matrices in one unit cost twice one). A class's cost per flop is the
    median over the units that wrote a tensor of that class; its seconds are those of the units
    it is the largest tensor of. Without ``unit_tensors`` (results of an older run) a unit is
    taken to be its largest tensor alone, which overstates that class's cost.
    """
    shapes = dict(llama_tensors(shape, layers))
    per_flop: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    members_of: dict[str, list[str]] = {}
    for key, secs in unit_seconds.items():
        if key not in shapes:
            continue
        members = [n for n in (unit_tensors or {}).get(key, [key]) if n in shapes]
        unit_flops = sum(flops(shapes[n], use_projection and projected(tensor_class(n))) for n in members)
        for cls in sorted({tensor_class(n) for n in members}):
            per_flop.setdefault(cls, []).append(secs / unit_flops)
        cls = tensor_class(key)
        seconds.setdefault(cls, []).append(secs)
        members_of.setdefault(cls, sorted({tensor_class(n) for n in members} - {cls}))
    out = {}
    for cls, v in sorted(per_flop.items()):
        out[cls] = {"seconds": statistics.median(seconds[cls]) if cls in seconds else None,
                    "per_flop": statistics.median(v), "units": len(seconds.get(cls, [])),
                    "with": members_of.get(cls, []),
                    "shape": list(next(shapes[n] for n in shapes if tensor_class(n) == cls))}
    return out


def predict(costs: dict[str, dict], shape: dict, *, passes: int, use_projection: bool, inputs: int,
            workers: list[int], bandwidth_gbs: float, overhead_s: float) -> dict:
    """Predicted wall time of one pass structure over a full model on N one-core workers."""
    tensors = llama_tensors(shape)
    # a class the measured layers lack costs what the measured classes of its kind cost per flop
    # (a projected matrix like the projected ones, elementwise work like the elementwise ones)
    fallback = {}
    for kind in (True, False):
        same = [c["per_flop"] for k, c in costs.items() if (use_projection and projected(k)) == kind]
        fallback[kind] = statistics.median(same) if same else 0.0
    total, largest = 0.0, 0.0
    for name, shp in tensors:
        cls = tensor_class(name)
        proj = use_projection and projected(cls)
        per_flop = costs[cls]["per_flop"] if cls in costs else fallback[proj]
        secs = per_flop * flops(shp, proj)
        total += secs
        largest = max(largest, secs)
    params = sum(math.prod(s) for _, s in tensors)
    # bytes per pass: read every input (bf16) and S_{t-1} (fp32), write S_t (fp32); the output pass
    # reads base + S_T and writes bf16
    if use_projection:
        step_io = params * (2 * 2 + 4 + 4)
        out_io = params * (2 + 4 + 2)
        io_bytes = step_io * passes + out_io
        compute = total * passes
    else:
        io_bytes = params * (2 * inputs + 2)
        compute = total
    io_s = io_bytes / (bandwidth_gbs * 1e9)
    rows = {}
    for n in workers:
        # passes run one after the other (each ends in a whole-model reduction on the driver)
        wall_compute = (passes if use_projection else 1) * max(total / n, largest) + overhead_s
        rows[n] = {"compute_s": round(wall_compute, 1), "io_s": round(io_s, 1), "wall_s": round(max(wall_compute, io_s), 1)}
    return {"params": params, "tensors": len(tensors), "compute_core_s": round(compute, 1),
            "largest_unit_s": round(largest, 1), "io_bytes": io_bytes, "by_workers": rows}


def add_predictions(results: dict, args: argparse.Namespace) -> None:
    """Per-class costs of every case and the 7B/70B predictions, from the measured units."""
    shape = bench_shape(args.shrink)
    results["predictions"] = []
    for r in results["cases"]:
        r["pass_costs"] = class_costs(r["pass_unit_seconds"], r["layers"], True, shape, r.get("pass_unit_tensors"))
        r["output_costs"] = class_costs(r["output_unit_seconds"], r["layers"], False, shape,
                                        r.get("output_unit_tensors"))
    for r in results["cases"]:
        overhead = max(0.0, r["ray"]["wall_s"] - r["plain"]["wall_s"])
        for model, shape in (("7B", LLAMA_7B), ("70B", LLAMA_70B)):
            if r["case"] == "opcm":
                pred = predict(r["pass_costs"], shape, passes=args.models - 1, use_projection=True, inputs=2,
                               workers=args.workers, bandwidth_gbs=args.bandwidth, overhead_s=overhead)
                out = predict(r["output_costs"], shape, passes=1, use_projection=False, inputs=1,
                              workers=args.workers, bandwidth_gbs=args.bandwidth, overhead_s=0.0)
                for n in args.workers:
                    a, b = pred["by_workers"][n], out["by_workers"][n]
                    a["compute_s"] += b["compute_s"]
                    a["wall_s"] = round(max(a["compute_s"], a["io_s"]), 1)
                pred["compute_core_s"] += out["compute_core_s"]
            else:
                pred = predict(r["output_costs"], shape, passes=1, use_projection=False, inputs=args.models + 1,
                               workers=args.workers, bandwidth_gbs=args.bandwidth, overhead_s=overhead)
            pred["by_workers"] = {str(k): v for k, v in pred["by_workers"].items()}
            results["predictions"].append({"merge": f"{r['case']} (base + {args.models})", "model": model, **pred})


# ----------------------------------------------------------------------------- report

def command_line(args: argparse.Namespace) -> str:
    return (f"python benchmarks/scale.py --reps {args.reps} --cases {args.cases} --layers {args.layers} "
            f"--opcm-layers {args.opcm_layers} --models {args.models}")


def render(results: dict, args: argparse.Namespace) -> str:
    runs = sorted({(c.get("when", results["when"]), c.get("command") or results.get("command") or command_line(args))
                   for c in results["cases"]})
    lines = ["# Scale benchmark: `--ray` (benchmarks/scale.py)", "",
             *[f"Run {when} on {results['machine']}: `{cmd}`." for when, cmd in runs], "",
             "Each run is a whole `surgery merge` process (median of the reps); `--ray` runs connect to a 2-CPU",
             "Ray head started before the runs (connecting, the job's workers starting and importing torch are",
             "counted; cluster start-up is not). Peak RSS is the driver process's own (`wait4`).", "",
             "| case | plain wall | `--ray` wall | ratio (goal ≤ 1.25×) | plain driver RSS | `--ray` driver RSS | same bytes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in results["cases"]:
        p, r = c["plain"], c["ray"]
        lines.append(f"| {c['case']} ({len(c['models']) - 1} fine-tunes, {c['layers']} layers) | {p['wall_s']:.1f} s | "
                     f"{r['wall_s']:.1f} s | {r['wall_s'] / p['wall_s']:.2f}× | {p['rss_mib']:.0f} MiB | "
                     f"{r['rss_mib']:.0f} MiB | {'yes' if c['identical'] else 'NO'} |")
    lines += ["", "## Per-unit cost (one task, seconds)", "",
              "A unit is keyed by its largest tensor; \"with\" lists the other tensor classes the same unit wrote",
              "(work units group consecutive tensors up to a byte bound, so two 4096×4096 matrices can share one).",
              "The cost per flop divides a unit's seconds by the flops of all its tensors.", "",
              "| case | tensor class | with | shape | units | median s/unit | s per Gflop |",
              "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for c in results["cases"]:
        for kind, costs in (("pass", c.get("pass_costs", {})), ("output", c.get("output_costs", {}))):
            for cls, v in costs.items():
                secs = "—" if v["seconds"] is None else f"{v['seconds']:.3f}"
                lines.append(f"| {c['case']} {kind} | {cls} | {', '.join(v.get('with', [])) or '—'} | "
                             f"{'×'.join(map(str, v['shape']))} | {v['units']} | {secs} | {v['per_flop'] * 1e9:.3f} |")
    lines += ["", "## Predicted wall time on N one-core workers", "",
              "| merge | model | core-seconds | largest unit | I/O bound | " +
              " | ".join(f"N={n}" for n in args.workers) + " |",
              "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in args.workers) + " |"]
    for p in results["predictions"]:
        cells = " | ".join(f"{p['by_workers'][str(n)]['wall_s'] / 60:.1f} min" for n in args.workers)
        lines.append(f"| {p['merge']} | {p['model']} | {p['compute_core_s'] / 3600:.2f} h | {p['largest_unit_s']:.0f} s | "
                     f"{p['by_workers'][str(args.workers[0])]['io_s']:.0f} s | {cells} |")
    lines += ["", "Assumptions:", "",
              f"- Llama-2 shapes (7B: hidden 4096, MLP 11008, 32 layers; 70B: hidden 8192, MLP 28672, 80 layers, "
              f"grouped k/v 1024×8192; vocabulary 32000), bf16 inputs, OPCM with base + {args.models} fine-tunes "
              f"({args.models - 1} per-model pass(es) + the output pass), TIES with base + {args.models} fine-tunes.",
              "- A tensor class's cost per flop is the median over the measured units that wrote it (one task",
              "  = one core: OPCM's steps run on one thread; TIES tasks ran with the driver's thread count, see",
              "  `threads_per_task`), scaled to other shapes by m·n·k + k³ (k = min(m, n)) for OPCM's projected",
              "  matrices and by m·n for elementwise work; a class the measured layers lack costs the median of",
              "  the measured classes of its kind. Workers are as fast as this machine's cores.",
              "- Wall(N) = passes × max(core-seconds per pass / N, largest unit) + the Ray overhead measured",
              "  above (driver start,",
              "  connecting, workers importing torch), and at least the I/O bound: every pass reads its inputs",
              "  (bf16) and S_{t−1} and writes S_t (float32), the output pass reads θ0 and S_T and writes bf16,",
              f"  over {args.bandwidth:g} GB/s of aggregate shared-storage bandwidth.",
              "- Not modelled: the driver hashing the inputs for the record (sequential, once per file and cached),",
              "  stragglers, and memory: a 70B MLP projection holds about 6 × 4 × 28672 × 8192 bytes ≈ 5.6 GB.",
              ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cases", default="ties,opcm")
    ap.add_argument("--layers", type=int, default=4, help="Llama-7B layers in the TIES checkpoints (~2.1 GB with 4)")
    ap.add_argument("--opcm-layers", type=int, default=1, help="Llama-7B layers in the OPCM checkpoints")
    ap.add_argument("--models", type=int, default=2, help="fine-tunes merged (OPCM: one pass per model after the first)")
    ap.add_argument("--workers", default="8,32,128")
    ap.add_argument("--bandwidth", type=float, default=5.0, help="aggregate shared-storage GB/s for the I/O bound")
    ap.add_argument("--work", type=Path, default=None, help="where outputs go (default: a temporary folder in the cache)")
    ap.add_argument("--shrink", type=int, default=1, help="divide every width by F: a quick end-to-end check "
                    "(the page is not written)")
    ap.add_argument("--write-doc", action="store_true", help=f"write {DOC.relative_to(ROOT)}")
    ap.add_argument("--from-json", action="store_true",
                    help=f"run nothing: recompute the costs and predictions from {RESULTS} and render the page")
    args = ap.parse_args()
    args.workers = [int(x) for x in args.workers.split(",")]
    if args.from_json:
        results = json.loads(RESULTS.read_text())
        add_predictions(results, args)
        return report(results, args)
    cases = [c for c in args.cases.split(",") if c]
    shape = bench_shape(args.shrink)
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-", dir=BENCH if BENCH.exists() else None))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
                     "command": command_line(args), "cases": [], "predictions": []}
    # shrunk tensors keep one big tensor per work unit, as the full-size ones are
    cluster = LocalCluster(cpus=2, unit_bytes=(256 << 20) // args.shrink ** 2 if args.shrink > 1 else None)
    try:
        for case in cases:
            layers = args.opcm_layers if case == "opcm" else args.layers
            models = synthetic_models(layers, args.models, shape)
            print(f"{case}: {layers} layer(s), base + {args.models} fine-tunes", flush=True)
            r = run_case(case, models, cluster, args.reps, work)
            r["layers"] = layers
            results["cases"].append(r)
            print(f"  plain {r['plain']}  ray {r['ray']}  identical={r['identical']}", flush=True)
    finally:
        cluster.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    # cases not re-run keep their last measurement (each case records its own command and time)
    for c in results["cases"]:
        c.update({"when": results["when"], "command": results["command"]})
    if RESULTS.is_file():
        ran = {c["case"] for c in results["cases"]}
        kept = [c for c in json.loads(RESULTS.read_text()).get("cases", []) if c["case"] not in ran]
        results["cases"] = sorted(results["cases"] + kept, key=lambda c: c["case"] != "ties")
    add_predictions(results, args)
    return report(results, args)


def report(results: dict, args: argparse.Namespace) -> int:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    page = render(results, args)
    print(page)
    ok = all(c["identical"] and c["ray"]["wall_s"] <= GOAL_WALL * c["plain"]["wall_s"] for c in results["cases"])
    if args.write_doc and args.shrink == 1:
        DOC.write_text(page)
        print(f"wrote {DOC}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
