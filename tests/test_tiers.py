"""The test tiers of tests/conftest.py: what the default run leaves out, and that CI runs the
README's full-suite command."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
# tests/conftest.py by path: several conftest.py files exist, so `import conftest` is ambiguous.
_spec = importlib.util.spec_from_file_location("tests_root_conftest", ROOT / "tests" / "conftest.py")
conftest = sys.modules.setdefault("tests_root_conftest", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(conftest)


class FakeItem:
    def __init__(self, path, fixtures=(), marks=()):
        self.path = ROOT / path
        self.fixturenames = list(fixtures)
        self.marks = set(marks)

    def add_marker(self, mark):
        self.marks.add(mark.name)

    def get_closest_marker(self, name):
        return name if name in self.marks else None


class FakeConfig:
    def __init__(self, all_tiers=False, markexpr="", args=()):
        self.option = SimpleNamespace(markexpr=markexpr)
        self.args = list(args)
        self._all = all_tiers
        self.deselected = []
        self.hook = SimpleNamespace(pytest_deselected=lambda items: self.deselected.extend(items))

    def getoption(self, name):
        assert name == "all_tiers"
        return self._all


def _items():
    return {
        "fast": FakeItem("tests/unit/core/test_progress.py"),
        "slow": FakeItem("tests/unit/x.py", marks={"slow"}),
        "anchor": FakeItem("tests/cli/test_merge.py", marks={"anchor"}),
        "smollm2": FakeItem("tests/unit/x.py", fixtures={"smollm2_dir", "tmp_path"}),
        "minilm": FakeItem("tests/unit/x.py", fixtures={"minilm_dir"}),
        "gpu": FakeItem("tests/gpu/test_cuda.py"),
    }


def test_default_run_keeps_only_the_fast_tier():
    items = _items()
    kept = list(items.values())
    config = FakeConfig()
    conftest.pytest_collection_modifyitems(config, kept)
    assert kept == [items["fast"]]
    assert {id(i) for i in config.deselected} == {id(items[k]) for k in items if k != "fast"}
    assert "realmodel" in items["smollm2"].marks and "realmodel" in items["minilm"].marks
    assert "gpu" in items["gpu"].marks and "gpu" not in items["fast"].marks


@pytest.mark.parametrize("config", [FakeConfig(all_tiers=True), FakeConfig(markexpr="realmodel"),
                                    FakeConfig(args=["tests/unit/x.py::test_y"])])
def test_all_or_an_explicit_selection_keeps_everything(config):
    items = list(_items().values())
    conftest.pytest_collection_modifyitems(config, items)
    assert len(items) == 6 and not config.deselected


def test_every_tier_is_a_registered_marker():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0] for m in cfg["markers"]}
    assert set(conftest.TIERS) <= registered and "--strict-markers" in cfg["addopts"]


def test_ci_runs_the_readme_full_suite_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if re.match(r"\s*python -m pytest", line)]
    assert ci == ["python -m pytest -q --all"]
    assert f"{ci[0]}          # every tier: what CI runs" in (ROOT / "README.md").read_text()


class FakeXdistConfig:
    def __init__(self, numprocesses=None, args=("tests",), collectonly=False, worker=False, xdist=True):
        self.option = SimpleNamespace(numprocesses=numprocesses, collectonly=collectonly, usepdb=False, dist="no")
        self.args = list(args)
        self.pluginmanager = SimpleNamespace(hasplugin=lambda name: xdist and name == "xdist")
        if worker:
            self.workerinput = {"workerid": "gw0"}


def test_default_run_spreads_over_two_workers(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    config = FakeXdistConfig()
    conftest.pytest_cmdline_main(config)
    assert (config.option.numprocesses, config.option.dist) == (2, "loadgroup")


@pytest.mark.parametrize("config", [FakeXdistConfig(numprocesses=0), FakeXdistConfig(worker=True),
                                    FakeXdistConfig(xdist=False), FakeXdistConfig(collectonly=True),
                                    FakeXdistConfig(args=["tests/unit/x.py::test_y"])],
                         ids=["-n 0", "a worker", "no xdist", "--co", "one test"])
def test_workers_only_when_nothing_else_was_asked(config, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    before = config.option.numprocesses
    conftest.pytest_cmdline_main(config)
    assert config.option.numprocesses == before and config.option.dist == "no"
