"""Determinism: every writing command writes byte-identical files run after run and at one
or two threads (each run in a fresh process with OMP_NUM_THREADS / torch threads set)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_helpers import FIXTURES, LLAMA, lora_adapter

ROOT = Path(__file__).resolve().parents[2]


def _digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _commands(tmp: Path) -> dict[str, list[str]]:
    base, a, b = (str(LLAMA / n) for n in ("base", "ft-a", "ft-b"))
    ad = str(lora_adapter(tmp / "lora"))
    edit = str(tmp / "seed.edit.safetensors")
    return {
        "convert": ["convert", base, "{out}", "--dtype", "float32", "--shard-size", "100KB"],
        "merge ties": ["merge", "-m", "ties", "--base", base, a, b, "--density", "0.5", "-o", "{out}"],
        "merge dare_ties": ["merge", "-m", "dare_ties", "--base", base, a, b, "--density", "0.5", "-o", "{out}"],
        "merge opcm": ["merge", "-m", "opcm", "--base", base, a, b, "-o", "{out}"],
        "merge opcm svd": ["merge", "-m", "opcm", "--base", base, a, b, "--decomposition", "svd", "-o", "{out}"],
        "fuse": ["fuse", base, ad, "-o", "{out}"],
        "edit extract": ["edit", "extract", base, a, "-o", "{out}.safetensors", "--rank", "2"],
        "edit from-peft": ["edit", "from-peft", ad, "--base", base, "-o", "{out}.safetensors"],
        "edit to-peft": ["edit", "to-peft", edit, "--base", base, "-o", "{out}", "--drop-vectors"],
        "edit apply": ["edit", "apply", base, edit, "-o", "{out}"],
        "grow gram": ["grow", str(FIXTURES / "tokenformer-tiny"), "-o", "{out}", "--ffn-tokens", "100", "--init", "gram"],
        "grow random": ["grow", str(FIXTURES / "tokenformer-tiny"), "-o", "{out}", "--factor", "2", "--init", "random"],
        "check --write-sha256": ["check", base, "--write-sha256", "{out}.txt"],
    }


def _run(args: list[str], threads: int, out: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               SURGERY_NO_HASH_CACHE="1")
    args = [a.replace("{out}", str(out)) for a in args]
    code = ("import sys, torch; torch.set_num_threads(%d); from surgery.commands.app import main; "
            "sys.exit(main(sys.argv[1:]))" % threads)
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    produced = next(p for p in out.parent.iterdir() if p.name.startswith(out.name))
    return _digests(produced)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_commands(Path("/x"))))
def test_byte_identical_across_runs_and_threads(tmp_path, name):
    from surgery.edit.extract import extract_edit

    extract_edit(LLAMA / "base", LLAMA / "ft-a", tmp_path / "seed.edit.safetensors", rank=2)
    args = _commands(tmp_path)[name]
    runs = [_run(args, threads, tmp_path / f"run{i}" / "out") for i, threads in enumerate((1, 1, 2))
            if (tmp_path / f"run{i}").mkdir() is None]
    strip = [{k.split("/", 1)[-1]: v for k, v in r.items()} for r in runs]
    assert strip[0] == strip[1], f"{name}: two runs differ"
    assert strip[0] == strip[2], f"{name}: one thread and two threads differ"
