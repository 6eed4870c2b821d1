"""``--device cuda --ray``: each Ray task asks for one GPU and computes there; the output is the
bytes of the plain ``--device cuda`` run. Skipped without a CUDA GPU or without Ray."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.xdist_group("ray")]      # one Ray instance at a time (tests/conftest.py)
ray = pytest.importorskip("ray")

LLAMA = Path(__file__).resolve().parents[2] / "fixtures" / "llama-tiny"


@pytest.fixture(scope="module")
def gpu_cluster():
    tmp = tempfile.mkdtemp(prefix="sg-", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             _temp_dir=tmp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("args", [
    ["merge", "-m", "ties", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "-p", "density=0.5"],
    ["merge", "-m", "opcm", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c"],
], ids=["ties", "opcm"])
def test_cuda_tasks_give_the_plain_cuda_bytes(gpu_cluster, cli, tmp_path, monkeypatch, args):
    monkeypatch.setenv("SURGERY_RAY_UNIT_BYTES", "24KB")
    out = tmp_path / "out"
    assert cli(*args, "--device", "cuda", "-o", out, "--quiet").code == 0
    out.rename(tmp_path / "plain")
    r = cli(*args, "--device", "cuda", "-o", out, "--json", "--ray")
    assert r.code == 0, r.stderr[-2000:]
    assert r.json()["execution"]["units"] > 3
    for f in sorted((tmp_path / "plain").iterdir()):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name
