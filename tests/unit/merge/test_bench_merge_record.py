"""benchmarks/merge.py keeps every measured row: a partial run updates only its methods."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_merge", ROOT / "benchmarks" / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_partial_run_replaces_only_its_rows_and_keeps_the_other_sections():
    m = _bench()
    old = {"when": "2026-11-30 10:54 UTC", "machine": "old box",
           "batch": [{"method": "ties", "x": 1, "when": "2026-11-30 10:54 UTC"},
                     {"method": "linear", "x": 2, "when": "2026-11-30 10:54 UTC"},
                     {"method": "slerp", "x": 3, "when": "2026-11-30 10:54 UTC"}],
           "opcm": {"wall": 16.0, "when": "2026-11-27"},
           "growth": [{"models": 2, "when": "2026-11-27"}]}
    new = {"when": "2026-11-30 17:40 UTC", "machine": "quiet box",
           "batch": [{"method": "slerp", "x": 30, "when": "2026-11-30 17:40 UTC"},
                     {"method": "dare_ties", "x": 40, "when": "2026-11-30 17:41 UTC"}]}
    got = m.merge_results(old, new)
    assert [(r["method"], r["x"]) for r in got["batch"]] == [("linear", 2), ("ties", 1), ("dare_ties", 40),
                                                             ("slerp", 30)]   # BATCH_METHODS order
    assert got["opcm"] == old["opcm"] and got["growth"] == old["growth"]
    assert got["when"] == "2026-11-30 17:40 UTC" and got["machine"] == "quiet box"
    # an older measurement (a stale cache on another machine) never replaces a newer one
    stale = {"batch": [{"method": "ties", "x": -1, "when": "2026-11-29 09:00 UTC"}],
             "opcm": {"wall": -1, "when": "2026-11-26"}, "when": "2026-11-29 09:00 UTC"}
    again = m.merge_results(got, stale)
    assert again["batch"] == got["batch"] and again["opcm"] == old["opcm"] and again["when"] == got["when"]


def test_the_committed_record_renders_every_method(tmp_path, monkeypatch):
    m = _bench()
    monkeypatch.setattr(m, "RESULTS", tmp_path / "absent.json")     # a machine without the cache
    monkeypatch.setattr(m, "DOC", tmp_path / "merge.md")
    results = m.load_results()
    m.write_doc(results)
    page = (tmp_path / "merge.md").read_text()
    for method in m.BATCH_METHODS:
        assert f"\n| {method} | " in page
    assert "## OPCM over 3 fine-tunes" in page and "## Memory as models are added" in page


def test_rows_kept_from_an_earlier_run_keep_their_date_and_commit():
    m = _bench()
    rows = [{"method": "linear", "when": "2026-11-30 10:54 UTC"},              # kept, no commit recorded
            {"method": "slerp", "when": "2026-11-30 17:11 UTC", "commit": "abc1234"},   # measured now
            {"method": "ties"}]                                                # undated
    out = m.stamp_rows(rows)
    assert out[0] == {"method": "linear", "when": "2026-11-30 10:54 UTC"}
    assert out[1] == rows[1]
    assert out[2]["when"] == m._now() and "commit" not in out[2]
