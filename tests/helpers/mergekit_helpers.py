"""Running mergekit as the anchor of the merge tests: find an interpreter that has it, run many
recipes in one process (mergekit-yaml's own run_merge), and compare outputs in bf16 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Outputs whose name ends in "-stable" run with torch.argsort, torch.sort and torch.topk made
# stable: mergekit's trims (TIES), outlier cuts (breadcrumbs) and variance selection (SCE) then
# break equal values by flat index, surgery's documented rules (torch's own CPU sorts are not
# stable, so which tied entries they keep is unspecified). The others run mergekit as shipped.
# Torch's global RNG, which mergekit's random methods draw from, is seeded before every recipe.
DRIVER = """
import sys, torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
shipped = torch.sort, torch.argsort, torch.topk
_sort = shipped[0]
def sort(x, dim=-1, descending=False, stable=None, **kw):
    return _sort(x, dim=dim, descending=descending, stable=True, **kw)
def argsort(x, dim=-1, descending=False, **kw):
    return _sort(x, dim=dim, descending=descending, stable=True).indices
def topk(x, k, dim=-1, largest=True, sorted=True, **kw):
    r = _sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((r.values.narrow(dim, 0, k), r.indices.narrow(dim, 0, k)))
cache = sys.argv[1]
for cfg, out in zip(sys.argv[2::2], sys.argv[3::2]):
    torch.sort, torch.argsort, torch.topk = (sort, argsort, topk) if out.endswith("-stable") else shipped
    torch.manual_seed(0)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(cfg))), out,
              options=MergeOptions(quiet=True, lora_merge_cache=cache, copy_tokenizer=True))
"""


def mergekit_python() -> str | None:
    """The interpreter with mergekit: this one, else /work/venvs/mergekit (or $SURGERY_MERGEKIT_PYTHON)."""
    cands = [os.environ.get("SURGERY_MERGEKIT_PYTHON"), sys.executable, "/work/venvs/mergekit/bin/python"]
    for c in cands:
        if c and Path(c).exists() and subprocess.run([c, "-c", "import mergekit.merge"], capture_output=True).returncode == 0:
            return c
    return None


def run_mergekit(python: str, jobs: list[tuple[Path, Path]], cache: Path, timeout: int = 1200) -> None:
    """Run every (recipe, output) pair through mergekit in one interpreter, one thread."""
    args = [str(cache)] + [str(x) for job in jobs for x in job]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-c", DRIVER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the bf16 spacing at max(|a|, |b|) (7 explicit mantissa bits)."""
    big = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
    return (a - b).abs() / torch.exp2(torch.floor(torch.log2(big)) - 7)


def vocabulary(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def compare_outputs(ours: Path, theirs: Path, vocab_tensors: tuple[str, ...] = ("embed", "lm_head", "wte")) -> None:
    """Assert two merge outputs agree: the same tensors, the config's layer and vocabulary counts,
    the same tokenizer vocabulary, and every entry within one bf16 step — embedding and LM-head
    rows compared token by token (mergekit orders some added tokens by hash)."""
    from surgery.checkpoint import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(a.names) == set(b.names), (sorted(set(a.names) ^ set(b.names)))
    ca, cb = json.loads((ours / "config.json").read_text()), json.loads((theirs / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "vocab_size"):
        assert ca.get(key) == cb.get(key), (key, ca.get(key), cb.get(key))
    va = vb = None
    if (theirs / "tokenizer.json").exists():
        va, vb = vocabulary(ours), vocabulary(theirs)
        assert set(va) == set(vb)
    for n in a.names:
        x, y = a.get(n), b.get(n)
        assert x.shape == y.shape, (n, x.shape, y.shape)
        if va is not None and any(v in n for v in vocab_tensors) and va != vb:
            rows = torch.tensor([vb[t] for t, _ in sorted(va.items(), key=lambda kv: kv[1])])
            y = torch.cat([y[rows], y[len(vb):]])
        worst = float(bf16_steps(x, y).max()) if x.numel() else 0.0
        assert worst <= 1.0, (n, worst)
