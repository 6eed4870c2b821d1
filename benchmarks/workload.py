"""The real workload every later benchmark uses, built once and cached.

``build_workload()`` returns::

    {"base": Path,            # SmolLM2-135M-Instruct, bf16 safetensors (benchmarks/smollm2.py)
     "finetunes": [Path]*3,   # full fine-tunes of base: code, license text, prose (bf16 folders)
     "lora": Path,            # a PEFT LoRA adapter on base (r=16, alpha=32, all projections)
     "record": Path}          # workload.json: data, steps, learning rates, losses, timings

Every fine-tune starts from the bf16 base upcast to float32 and runs a few dozen AdamW steps
(sequence 128, batch 2, seeded) on text that exists offline on any Debian/Ubuntu machine with
Python: the ``json`` and ``email`` packages of the standard library (code), the license texts
in ``/usr/share/common-licenses`` (legal English), and project prose
(``surgery/data/probe.txt`` + ``benchmarks/data/prose.txt``). The result is saved back in bf16
with the same tensor names as the base (tied ``lm_head`` left out, as in the base) and the
base's config and tokenizer files. The LoRA adapter is trained a few steps on the prose text with
a large learning rate so that its B matrices are clearly non-zero, and saved with PEFT's
``save_pretrained`` (needs ``pip install peft``).

Layout under ``$SURGERY_CACHE/workload`` (default ``~/.cache/surgery/workload``)::

    ft-code/ ft-license/ ft-prose/ lora-prose/ workload.json

Each artifact is written to a temporary sibling and renamed into place, so a folder that exists
is complete; ``workload.json`` is written last and marks the whole workload as built. A lock
file serialises concurrent builders. ``python benchmarks/workload.py`` builds it and prints the
paths and timings (see docs/benchmarks/workload.md for how long each part takes).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from smollm2 import CACHE, smollm2_checkpoint  # noqa: E402

MARKER = "workload.json"
SEQ = 128
BATCH = 2
STEPS = int(os.environ.get("SURGERY_WORKLOAD_STEPS", 30))  # override only for smoke tests
EVAL_CHUNKS = 4
THREADS = 2
# name, learning rate, seed
FINETUNES = [("code", 5e-5, 11), ("license", 3e-5, 12), ("prose", 4e-5, 13)]
LORA = {"name": "prose", "r": 16, "alpha": 32, "lr": 1e-3, "steps": min(10, STEPS), "seed": 21,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")


def default_cache() -> Path:
    """``$SURGERY_CACHE/workload`` (``~/.cache/surgery/workload`` by default)."""
    return CACHE / "workload"


def paths(cache: Path | None = None) -> dict:
    """Where the artifacts live (whether or not they are built yet)."""
    cache = Path(cache) if cache else default_cache()
    return {"base": CACHE / "smollm2-135m-bfloat16",
            "finetunes": [cache / f"ft-{name}" for name, _, _ in FINETUNES],
            "lora": cache / f"lora-{LORA['name']}",
            "record": cache / MARKER}


def is_built(cache: Path | None = None) -> bool:
    """True when the marker file exists (everything was built)."""
    return paths(cache)["record"].is_file()


# ----------------------------------------------------------------------------- text

def domain_text(name: str) -> str:
    """The training text of one domain, deterministic for a given machine."""
    if name == "code":
        import email
        import json as json_pkg

        files = []
        for pkg in (json_pkg, email):
            files += sorted(Path(pkg.__file__).parent.rglob("*.py"))
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if name == "license":
        root = Path("/usr/share/common-licenses")
        files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
        if not files:  # fall back to package copyright files
            files = sorted(Path("/usr/share/doc").glob("*/copyright"))[:200]
        seen, texts = set(), []
        for f in files:
            real = f.resolve()
            if real in seen:
                continue
            seen.add(real)
            texts.append(real.read_text(encoding="utf-8", errors="replace"))
        if not texts:
            raise RuntimeError("no license texts found under /usr/share/common-licenses or /usr/share/doc")
        return "\n\n".join(texts)
    if name == "prose":
        return "\n\n".join(p.read_text(encoding="utf-8") for p in
                           (ROOT / "surgery" / "data" / "probe.txt", HERE / "data" / "prose.txt"))
    raise ValueError(name)


def chunks(tokenizer, text: str, seq: int = SEQ):
    """Token ids of ``text`` cut into non-overlapping windows of ``seq`` tokens: (train, held-out)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq
    windows = torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)
    held = max(1, min(EVAL_CHUNKS, n // 10))
    return windows[:-held], windows[-held:]


# ----------------------------------------------------------------------------- training

def _batches(train, steps: int, seed: int):
    """``steps`` batches of BATCH windows, a seeded shuffle repeated as often as needed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(train), generator=g)])
        idx, order = order[:BATCH], order[BATCH:]
        yield train[idx]


def _eval_loss(model, held) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=held[i:i + 1], labels=held[i:i + 1]).loss.item() for i in range(len(held)))
    model.train()
    return loss / len(held)


def _train(model, params, train, *, steps: int, lr: float, seed: int, log=None) -> list[float]:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in _batches(train, steps, seed):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if log and (len(losses) % 10 == 0 or len(losses) == steps):
            log(f"    step {len(losses)}/{steps} loss {losses[-1]}")
    del opt
    return losses


def _load_base(base: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    return model, tok


def _copy_non_weights(base: Path, dest: Path) -> None:
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, dest / f.name)


def _atomic_dir(dest: Path) -> Path:
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish_dir(tmp: Path, dest: Path) -> None:
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def build_finetune(base: Path, name: str, lr: float, seed: int, dest: Path, log=None) -> dict:
    """Fine-tune ``base`` on one domain and save it as a bf16 safetensors folder at ``dest``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    model, tok = _load_base(base)
    train, held = chunks(tok, domain_text(name))
    before = _eval_loss(model, held)
    t1 = time.perf_counter()
    losses = _train(model, list(model.parameters()), train, steps=STEPS, lr=lr, seed=seed, log=log)
    t2 = time.perf_counter()
    after = _eval_loss(model, held)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        base_names = set(f.keys())
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k in base_names}
    missing = base_names - set(state)
    if missing:
        raise RuntimeError(f"fine-tuned model lacks base tensors: {sorted(missing)[:5]}")
    tmp = _atomic_dir(dest)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _copy_non_weights(base, tmp)
    _finish_dir(tmp, dest)
    del model, state
    return {"path": str(dest), "domain": name, "lr": lr, "seed": seed, "steps": STEPS, "batch": BATCH,
            "seq": SEQ, "train_windows": len(train), "heldout_windows": len(held),
            "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "heldout_loss_base": round(before, 4), "heldout_loss_finetuned": round(after, 4),
            "seconds_train": round(t2 - t1, 1), "seconds_total": round(time.perf_counter() - t0, 1)}


def build_lora(base: Path, dest: Path, log=None) -> dict:
    """Train a PEFT LoRA adapter a few steps on the prose text and save it at ``dest``."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model, tok = _load_base(base)
    train, held = chunks(tok, domain_text(LORA["name"]))
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"],
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    before = _eval_loss(model, held)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = _train(model, params, train, steps=LORA["steps"], lr=LORA["lr"], seed=LORA["seed"], log=log)
    after = _eval_loss(model, held)
    b_norm = sum(float(p.detach().norm() ** 2) for n, p in model.named_parameters() if "lora_B" in n) ** 0.5
    if b_norm == 0.0:
        raise RuntimeError("LoRA B matrices are still zero after training")
    tmp = _atomic_dir(dest)
    model.save_pretrained(str(tmp))
    _finish_dir(tmp, dest)
    return {"path": str(dest), "domain": LORA["name"], "r": LORA["r"], "lora_alpha": LORA["alpha"],
            "target_modules": LORA["targets"], "lr": LORA["lr"], "steps": LORA["steps"], "seed": LORA["seed"],
            "trainable_params": sum(p.numel() for p in params), "lora_B_norm": round(b_norm, 4),
            "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "heldout_loss_base": round(before, 4), "heldout_loss_adapted": round(after, 4),
            "seconds_total": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- entry point

def _info_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".info.json")


def _build_artifact(kind: str, base: Path, dest: Path, log=None) -> dict:
    """Build one artifact (``ft-<name>`` or ``lora``) and store its info next to it."""
    if kind == "lora":
        info = build_lora(base, dest, log=log)
    else:
        name, lr, seed = next(f for f in FINETUNES if f[0] == kind)
        info = build_finetune(base, name, lr, seed, dest, log=log)
    _info_path(dest).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _reused(dest: Path) -> dict:
    ip = _info_path(dest)
    info = json.loads(ip.read_text()) if ip.is_file() else {"path": str(dest)}
    return {**info, "reused": True}


def build_workload(cache: Path | None = None, *, log=None, jobs: int = 1) -> dict:
    """Build (once) and return the workload: base, three fine-tunes, one LoRA adapter.

    Args:
        cache: Folder for the artifacts; default ``$SURGERY_CACHE/workload``.
        log: Optional callable taking a progress line (the script passes ``print``).
        jobs: Artifacts built at once, each in its own process with ``2 // jobs`` (at least
            1) torch threads; on a busy shared machine several processes get more CPU.

    Returns:
        ``{"base": Path, "finetunes": [Path, Path, Path], "lora": Path, "record": Path}``.
    """
    p = paths(cache)
    if p["record"].is_file():
        return p
    import torch

    torch.set_num_threads(THREADS)
    say = log or (lambda _msg: None)
    root = p["record"].parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the marker
        if p["record"].is_file():
            return p
        t0 = time.perf_counter()
        base = smollm2_checkpoint()
        record: dict = {"base": {"path": str(base), "seconds": round(time.perf_counter() - t0, 1)}}
        say(f"base      {base}  ({record['base']['seconds']} s)")
        todo = [(name, dest) for (name, _, _), dest in zip(FINETUNES, p["finetunes"])] + [("lora", p["lora"])]
        missing = [(k, d) for k, d in todo if not d.is_dir()]
        for k, d in todo:
            if d.is_dir():
                say(f"{d.name:<11}{d}  (already built)")
        infos: dict[str, dict] = {}
        if jobs > 1 and len(missing) > 1:
            env = {**os.environ, "SURGERY_WORKLOAD_THREADS": str(max(1, THREADS // jobs))}
            pending = list(missing)
            running: dict = {}
            while pending or running:
                while pending and len(running) < jobs:
                    k, d = pending.pop(0)
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", k, str(root)]
                    running[k] = (subprocess.Popen(cmd, env=env), d)
                    say(f"{d.name:<11}started in process {running[k][0].pid}")
                for k, (proc, d) in list(running.items()):
                    if proc.poll() is not None:
                        del running[k]
                        if proc.returncode != 0:
                            raise RuntimeError(f"building {d.name} failed (exit {proc.returncode})")
                        infos[k] = json.loads(_info_path(d).read_text())
                        say(f"{d.name:<11}{d}  ({infos[k]['seconds_total']} s)")
                time.sleep(2)
        else:
            for k, d in missing:
                infos[k] = _build_artifact(k, base, d, log=log)
                say(f"{d.name:<11}{d}  ({infos[k]['seconds_total']} s)")
        record["finetunes"] = [infos.get(k) or _reused(d) for k, d in todo[:-1]]
        record["lora"] = infos.get("lora") or _reused(p["lora"])
        record["seconds_total"] = round(time.perf_counter() - t0, 1)
        record["jobs"] = jobs
        tmp = p["record"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(p["record"])  # the marker, written last
        say(f"total      {record['seconds_total']} s; record in {p['record']}")
    return p


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the cached SmolLM2 workload (see the module docstring).")
    ap.add_argument("cache", nargs="?", type=Path, default=None, help="Folder (default $SURGERY_CACHE/workload).")
    ap.add_argument("--jobs", type=int, default=1, help="Artifacts built at once, one process each.")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: build one artifact
    args = ap.parse_args(argv)
    say = lambda m: print(m, flush=True)  # noqa: E731
    if args.one:
        import torch

        torch.set_num_threads(int(os.environ.get("SURGERY_WORKLOAD_THREADS", THREADS)))
        cache = args.cache or default_cache()
        dest = cache / ("lora-" + LORA["name"] if args.one == "lora" else f"ft-{args.one}")
        _build_artifact(args.one, paths(cache)["base"], dest, log=lambda m: say(f"[{dest.name}] {m.strip()}"))
        return 0
    start = time.perf_counter()
    out = build_workload(args.cache, log=say, jobs=args.jobs)
    print(json.dumps({k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in out.items()}, indent=2))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
