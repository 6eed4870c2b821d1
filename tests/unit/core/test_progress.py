"""surgery.core.progress.track: the loop every read-side analysis walks tensors with."""

from __future__ import annotations

import pytest

from surgery.core.progress import track


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def start(self, total, description):
        self.events.append(("start", total, description))

    def advance(self, n=1):
        self.events.append(("advance", n))

    def close(self):
        self.events.append(("close",))


def test_track_advances_after_every_item_including_continue():
    rec = Recorder()
    seen = []
    for x in track(["a", "b", "c"], "walk", rec):
        if x == "b":
            continue
        seen.append(x)
    assert seen == ["a", "c"]
    assert rec.events == [("start", 3, "walk"), ("advance", 1), ("advance", 1), ("advance", 1), ("close",)]


def test_track_closes_on_break_and_on_error():
    rec = Recorder()
    for x in track(range(5), "walk", rec):
        if x == 1:
            break
    assert rec.events[-1] == ("close",) and rec.events.count(("advance", 1)) == 1

    rec = Recorder()
    with pytest.raises(RuntimeError):
        for x in track(range(5), "walk", rec):
            raise RuntimeError("boom")
    assert rec.events == [("start", 5, "walk"), ("close",)]


def test_track_without_progress_and_with_total_for_generators():
    assert list(track(iter([1, 2]), "walk", None, total=2)) == [1, 2]
    rec = Recorder()
    assert list(track((i for i in range(2)), "gen", rec, total=2)) == [0, 1]
    assert rec.events[0] == ("start", 2, "gen")
