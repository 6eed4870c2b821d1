"""``--device cuda`` against the CPU on the fixtures: every command that takes ``--device``
computes the same result on a CUDA GPU. Skipped without one (CI has none); run it on a GPU
machine with ``python -m pytest tests/gpu``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FX = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FX / "llama-tiny"
VOLATILE = ("seconds", "per_second", "device", "output", "path", "plot", "when", "elapsed")


def _same_checkpoint(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    x, y = open_checkpoint(a), open_checkpoint(b)
    assert x.names == y.names
    for n in x.names:
        assert x.info(n).dtype == y.info(n).dtype, n
        u, v = x.get(n), y.get(n)
        assert torch.allclose(u, v, rtol=rtol, atol=atol), (n, float((u - v).abs().max()))


def _close(a, b, rtol: float, where: str = "") -> None:
    """JSON documents equal up to ``rtol`` on numbers, skipping timings and paths."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if not any(v in k for v in VOLATILE):
                _close(a[k], b[k], rtol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (p, q) in enumerate(zip(a, b)):
            _close(p, q, rtol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _both(cli, tmp_path: Path, *args, out: bool = True, json: bool = False):
    """Run ``args`` on the CPU and with --device cuda; returns the two results."""
    runs = []
    for dev in ("cpu", "cuda"):
        extra = ["-o", tmp_path / dev] if out else []
        r = cli(*args, "--device", dev, *extra, *(["--json"] if json else []), "--quiet" if not json else "--json")
        assert r.code == 0, (dev, r.stderr[-2000:])
        runs.append(r)
    return runs


MERGES = {
    "task_arithmetic": ["--weight", "0.6"],
    "ties": ["--density", "0.5"],
    "dare_ties": ["--density", "0.5", "--seed", "3"],
    "opcm": [],
    "magmax": [],
    "breadcrumbs_ties": ["-p", "density=0.5", "-p", "gamma=0.05", "-p", "rescale=true"],
    "della": ["-p", "density=0.5", "-p", "epsilon=0.2", "--seed", "3"],
    "sce": ["-p", "select_topk=0.5"],
    "ramplus_tl": ["-p", "epsilon=0.002"],
    "multislerp": [],
    "karcher": [],
    "model_stock": ["-p", "filter_wise=true"],
}
PAIR_MERGES = {      # methods of exactly two models (or one besides the base)
    "nuslerp": ["-p", "nuslerp_flatten=false", "-p", "nuslerp_row_wise=true"],
    "arcee_fusion": [],
    "nearswap": ["-p", "t=0.001"],
}


@pytest.mark.parametrize("method", list(MERGES))
def test_merge(cli, tmp_path, method):
    _both(cli, tmp_path, "merge", "-m", method, "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b",
          LLAMA / "ft-c", *MERGES[method], "--dtype", "float32")
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda")


@pytest.mark.parametrize("method", list(PAIR_MERGES))
def test_merge_pairs(cli, tmp_path, method):
    models = [LLAMA / "ft-a"] + ([LLAMA / "ft-b"] if method == "nuslerp" else [])
    _both(cli, tmp_path, "merge", "-m", method, "--base", LLAMA / "base", *models, *PAIR_MERGES[method],
          "--dtype", "float32")
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda")


def test_merge_slerp(cli, tmp_path):
    _both(cli, tmp_path, "merge", "-m", "slerp", "--base", LLAMA / "base", LLAMA / "ft-a", "--t", "0.3",
          "--dtype", "float32")
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda")


@pytest.mark.parametrize("args", [
    ("analyze", "spectrum", LLAMA / "ft-a", "--base", LLAMA / "base", "--top", "3"),
    ("analyze", "gain", FX / "llama-wide" / "base", "--vs", LLAMA / "base"),
    ("analyze", "subspace", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "--rank", "4"),
    ("eval", "ppl", LLAMA / "base", "--ctx", "32", "--stride", "16"),
    ("diff", LLAMA / "base", LLAMA / "ft-a"),
], ids=["spectrum", "gain", "subspace", "ppl", "diff"])
def test_reports(cli, tmp_path, args):
    cpu, gpu = _both(cli, tmp_path, *args, out=False, json=True)
    _close(cpu.json(), gpu.json(), rtol=2e-3)


def test_grow(cli, tmp_path):
    _both(cli, tmp_path, "grow", FX / "tokenformer-tiny", "--factor", "2")
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda", atol=1e-6)


def test_edit_extract_and_apply(cli, tmp_path):
    for dev in ("cpu", "cuda"):
        r = cli("edit", "extract", LLAMA / "base", LLAMA / "ft-c", "-o", tmp_path / f"e-{dev}.safetensors",
                "--rank", "4", "--device", dev, "--quiet")
        assert r.code == 0, r.stderr[-2000:]
        r = cli("edit", "apply", LLAMA / "base", tmp_path / f"e-{dev}.safetensors", "-o", tmp_path / dev,
                "--device", dev, "--quiet")
        assert r.code == 0, r.stderr[-2000:]
    # bf16 output: a factor computed on the GPU may round to the neighbouring bf16 value (2^-8 relative)
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda", rtol=8e-3, atol=1e-4)


def test_fuse_lora(cli, tmp_path):
    peft = pytest.importorskip("peft")
    from adapter_helpers import make_adapter  # the adapter builder the fuse tests use

    gpt2 = FX / "gpt2-tiny" / "base"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          init_lora_weights=False)
    adapter = make_adapter(gpt2, cfg, tmp_path / "lora", seed=8)
    _both(cli, tmp_path, "fuse", gpt2, adapter)
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "sce", "breadcrumbs_ties"])
def test_merge_in_small_row_blocks(cli, tmp_path, monkeypatch, method):
    """The streamed row-block paths (radix passes and tie counting, the chunk draws, the L1
    and variance passes) on the GPU, forced with tiny blocks, against the CPU."""
    from surgery.core import engine
    from surgery.merge import batch
    from surgery.merge.methods import streaming

    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(streaming, "SUB_ELEMENTS", 40)
    monkeypatch.setattr(batch, "SUB_BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(engine, "BLOCK_BYTES", 1024)
    _both(cli, tmp_path, "merge", "-m", method, "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b",
          *MERGES[method], "--dtype", "float32")
    _same_checkpoint(tmp_path / "cpu", tmp_path / "cuda")
