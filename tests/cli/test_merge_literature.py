"""``surgery merge`` with the literature methods (tsv, iso_c, iso_cts, dop, wudi) on the tiny
fixtures: the written tensors equal the tensor functions applied to the checkpoints, DOP's
state resumes to the all-at-once merge, and (anchor) every method equals FusionBench's own
implementation within 1e-3 relative per tensor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.merge.methods import dop, isotropic, tsv, wudi

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "fixtures" / "llama-tiny"
MODELS = [LLAMA / n for n in ("ft-a", "ft-b", "ft-c")]
DRIVER = ROOT / "benchmarks" / "fusionbench_driver.py"


def _fusionbench_python() -> Path | None:
    for p in (os.environ.get("SURGERY_FUSIONBENCH_PY"), "/work/venvs/fusionbench/bin/python",
              "/work/venvs/fusion/bin/python"):
        if p and Path(p).is_file():
            return Path(p)
    return None


def _merge(cli, method: str, out: Path, *extra: str, models=MODELS) -> None:
    res = cli("merge", "-m", method, "--base", LLAMA / "base", *models, "-o", out, "--dtype", "float32", "--quiet",
              *extra)
    assert res.code == 0, res.stderr


def _taus(name: str) -> list[torch.Tensor]:
    base = open_checkpoint(LLAMA / "base").get(name)
    return [open_checkpoint(m).get(name) - base for m in MODELS]


@pytest.mark.parametrize("method,fn", [
    ("tsv", lambda taus: tsv.tsv_matrix(taus)),
    ("iso_c", lambda taus: isotropic.iso_c_matrix(sum(taus))),
    ("iso_cts", lambda taus: isotropic.iso_cts_matrix(taus, 0.8)),
])
def test_written_tensors_are_the_tensor_functions(cli, tmp_path, method, fn, one_thread):
    _merge(cli, method, tmp_path / "out")
    out, base = open_checkpoint(tmp_path / "out"), open_checkpoint(LLAMA / "base")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert torch.allclose(out.get(name), base.get(name) + fn(_taus(name)), atol=1e-6)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(out.get(norm), base.get(norm) + sum(_taus(norm)) / 3, atol=1e-6)


def test_weights_and_scale_parameters(cli, tmp_path, one_thread):
    _merge(cli, "tsv", tmp_path / "tsv", "-p", "alpha=0.5")
    _merge(cli, "iso_c", tmp_path / "iso", "-p", "scaling_factor=2")
    name = "model.layers.1.mlp.up_proj.weight"
    base = open_checkpoint(LLAMA / "base").get(name)
    assert torch.allclose(open_checkpoint(tmp_path / "tsv").get(name), base + 0.5 * tsv.tsv_matrix(_taus(name)),
                          atol=1e-6)
    assert torch.allclose(open_checkpoint(tmp_path / "iso").get(name),
                          base + 2 * isotropic.iso_c_matrix(sum(_taus(name))), atol=1e-6)


@pytest.mark.slow
def test_wudi_and_dop_write_their_tensor_functions(cli, tmp_path, one_thread):
    _merge(cli, "wudi", tmp_path / "wudi", "-p", "iter_num=20")
    _merge(cli, "dop", tmp_path / "dop", "-p", "num_steps=5", models=MODELS[:2])
    name = "model.layers.0.mlp.down_proj.weight"
    base = open_checkpoint(LLAMA / "base").get(name)
    taus = _taus(name)
    assert torch.allclose(open_checkpoint(tmp_path / "wudi").get(name), base + wudi.wudi_matrix(taus, iter_num=20),
                          atol=1e-6)
    assert torch.allclose(open_checkpoint(tmp_path / "dop").get(name),
                          base + dop.dop_matrix(taus[0], taus[1], num_steps=5), atol=1e-6)
    emb = "model.embed_tokens.weight"      # averaged with the previous merge, like every non-projection
    e = _taus(emb)
    assert torch.allclose(open_checkpoint(tmp_path / "dop").get(emb),
                          open_checkpoint(LLAMA / "base").get(emb) + (e[0] + e[1]) / 2, atol=1e-6)


@pytest.mark.slow
def test_dop_state_resumes_to_the_all_at_once_merge(cli, tmp_path):
    state = tmp_path / "state"
    _merge(cli, "dop", tmp_path / "ab", "-p", "num_steps=5", "--state", state, models=MODELS[:2])
    res = cli("merge", "--resume", state, MODELS[2], "-o", tmp_path / "abc", "--dtype", "float32", "--quiet")
    assert res.code == 0, res.stderr
    _merge(cli, "dop", tmp_path / "all", "-p", "num_steps=5")
    a, b = open_checkpoint(tmp_path / "abc"), open_checkpoint(tmp_path / "all")
    for n in b.names:
        assert torch.equal(a.get_raw(n), b.get_raw(n)), n


def test_unknown_dop_space_is_a_usage_error(cli, tmp_path):
    res = cli("merge", "-m", "dop", "--base", LLAMA / "base", *MODELS, "-o", tmp_path / "o", "-p",
              "svd_proj_space=w")
    assert res.code == 2 and "svd_proj_space" in res.stderr


@pytest.mark.parametrize("method,param", [("dop", "num_steps"), ("wudi", "iter_num"), ("karcher", "max_iter")])
def test_iteration_counts_are_bounded(cli, tmp_path, method, param):
    """A step count no one can wait for (a typo, a hostile recipe) is refused at once, naming
    the bound, instead of running for days."""
    res = cli("merge", "-m", method, "--base", LLAMA / "base", *MODELS, "-o", tmp_path / "o", "-p",
              f"{param}=1000000000000")
    assert res.code == 2 and f"-p {param}" in res.stderr and "[0, 100000]" in res.stderr
    assert not (tmp_path / "o").exists()


# ---- anchors: FusionBench's own implementations ----------------------------------------------------

ANCHORS = [
    ("tsv", [], []),
    ("iso_c", [], []),
    ("iso_cts", [], []),
    ("wudi", ["-p", "iter_num=100"], ["--param", "iter_num=100"]),
    # 200 Adam steps per matrix take FusionBench about an hour on a busy 2-core machine: 10 here
    ("dop", ["-p", "num_steps=10"], ["--param", "num_steps=10"]),
]


@pytest.mark.anchor
@pytest.mark.slow
@pytest.mark.parametrize("method,ours,theirs", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_equals_fusionbench(cli, tmp_path, method, ours, theirs):
    py = _fusionbench_python()
    if py is None:
        pytest.skip("no FusionBench venv (set SURGERY_FUSIONBENCH_PY or see benchmarks/fusionbench_driver.py)")
    fb = tmp_path / "fb"
    run = subprocess.run([str(py), str(DRIVER), method, str(LLAMA / "base"), str(fb), *map(str, MODELS),
                          "--dtype", "float32", *theirs], capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    _merge(cli, method, tmp_path / "ours", *ours)
    a, b, base = open_checkpoint(tmp_path / "ours"), open_checkpoint(fb), open_checkpoint(LLAMA / "base")
    assert set(a.names) == set(b.names)
    for n in b.names:
        x, y, z = a.get(n), b.get(n), base.get(n)
        assert float((x - y).norm() / y.norm()) <= 1e-3, n
        # the task vectors too (a far stricter test: they are ~1% of the weights here)
        assert float((x - y).norm() / (y - z).norm().clamp_min(1e-30)) <= 1e-3, n
