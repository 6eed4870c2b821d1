"""The collapse policy of ``edit apply`` on its own: a fake model whose perplexity is known in
closed form (baseline × the product of each applied edit's factor), against an independent
brute-force statement of each policy."""

from __future__ import annotations

import math

import pytest

from surgery.core.errors import InputError, UsageError
from surgery.edit.apply import CollapsePolicy, collapse_loop

BASE = 10.0


class FakeModel:
    """Perplexity = BASE × Π factor[i] over the applied edits; records every call."""

    def __init__(self, factors):
        self.factors = factors
        self.applied: list[int] = []
        self.calls: list[tuple] = []

    def add(self, i):
        assert i not in self.applied
        self.applied.append(i)
        self.calls.append(("add", i))

    def remove(self, i):
        self.applied.remove(i)
        self.calls.append(("remove", i))

    def measure(self):
        self.calls.append(("measure",))
        return BASE * math.prod(self.factors[i] for i in self.applied)


def run(factors, **kw):
    urgent = kw.pop("urgent", ())
    model = FakeModel(factors)
    out = collapse_loop(model, len(factors), CollapsePolicy(**kw), urgent=urgent, vocab_size=kw.pop("vocab", 1000))
    return model, out


def verdicts(out):
    return [e["verdict"] for e in out.edits]


def test_check_every_edit_stop_keeps_the_prefix():
    factors = [1.1, 1.2, 5.0, 1.0]
    model, out = run(factors, max_ppl_ratio=1.5, on_collapse="stop")
    assert verdicts(out) == ["ok", "ok", "collapsed (rolled back)", "not reached"]
    assert model.applied == out.accepted == [0, 1] and out.stopped and out.collapsed_at == 2
    assert out.final == pytest.approx(BASE * 1.1 * 1.2) and out.baseline == BASE
    assert [c["after_edit"] for c in out.checks] == [None, 0, 1, 2]
    assert out.edits[2]["ratio"] == pytest.approx(1.1 * 1.2 * 5.0)


@pytest.mark.parametrize("factors", [[1.1, 9.0, 1.2, 0.9, 3.0, 1.1], [2.0, 2.0, 2.0], [1.0, 1.0]])
@pytest.mark.parametrize("check_every", [1, 2, 3])
def test_skip_keeps_exactly_the_greedy_survivors(factors, check_every):
    """skip: an edit survives when the survivors before it times it stay within the ratio (the
    greedy rule, computed here independently). Grouping does not change that for these lists, where
    no group passes as a whole while one of its prefixes collapses (a check between edits sees
    only the group's end state, by design)."""
    expected, prod = [], 1.0
    for i, f in enumerate(factors):
        if prod * f <= 1.5:
            expected.append(i)
            prod *= f
    model, out = run(factors, max_ppl_ratio=1.5, on_collapse="skip", check_every=check_every)
    assert out.accepted == model.applied == expected and not out.stopped
    assert out.final == pytest.approx(BASE * prod)
    assert [v == "ok" for v in verdicts(out)] == [i in expected for i in range(len(factors))]


def test_check_every_groups_and_urgent_edits():
    factors = [1.0] * 7
    model, out = run(factors, check_every=3, urgent=[False, True, False, False, False, False, False])
    # checks after edit 1 (urgent), then every 3 (edit 4), then after the last (edit 6)
    assert [c["after_edit"] for c in out.checks] == [None, 1, 4, 6]
    assert [e["checked_after"] for e in out.edits] == [1, 1, 4, 4, 4, 6, 6]
    assert verdicts(out) == ["ok"] * 7


def test_stop_rolls_back_the_whole_unchecked_group():
    model, out = run([1.0, 1.0, 1.0, 9.0, 1.0], check_every=2, on_collapse="stop")
    # groups {0,1} ok, {2,3} collapses: both rolled back, 4 never applied
    assert verdicts(out) == ["ok", "ok", "collapsed (rolled back)", "collapsed (rolled back)", "not reached"]
    assert model.applied == [0, 1] and ("add", 4) not in model.calls


def test_ignore_keeps_everything_and_measures_the_live_state():
    model, out = run([3.0, 1.0], on_collapse="ignore")
    assert verdicts(out) == ["collapsed (ignored)", "collapsed (ignored)"]
    assert model.applied == out.accepted == [0, 1] and out.final == pytest.approx(30.0) and not out.stopped


def test_absolute_ceiling_and_non_finite():
    _, out = run([1.2, 1.0], max_ppl=11.0, on_collapse="skip")  # 12 > 11 although the ratio is fine
    assert verdicts(out) == ["collapsed (skipped)", "ok"] and out.ceiling == 11.0
    _, out = run([math.inf, 1.0], on_collapse="skip")
    assert verdicts(out) == ["collapsed (skipped)", "ok"]
    # vocabulary size is the default ceiling; a base already above it switches the ceiling off
    model = FakeModel([1.2])
    out = collapse_loop(model, 1, CollapsePolicy(), vocab_size=5)
    assert out.ceiling == math.inf and out.notes and verdicts(out) == ["ok"]


def test_broken_base_and_bad_settings():
    class Broken(FakeModel):
        def measure(self):
            return math.nan

    with pytest.raises(InputError, match="the base is broken"):
        collapse_loop(Broken([1.0]), 1, CollapsePolicy())
    with pytest.raises(UsageError, match="already above `max_ppl` 5"):
        collapse_loop(FakeModel([1.0]), 1, CollapsePolicy(max_ppl=5.0))
    for kw, msg in [({"on_collapse": "panic"}, "`on_collapse` must be one of"),
                    ({"max_ppl_ratio": 1.0}, "`max_ppl_ratio` must be above 1"),
                    ({"check_every": 0}, "`check_every` must be at least 1"),
                    ({"max_ppl": 0.0}, "`max_ppl` must be positive")]:
        with pytest.raises(UsageError, match=msg):
            collapse_loop(FakeModel([1.0]), 1, CollapsePolicy(**kw))


def test_progress_total_is_exact():
    class Rec:
        def __init__(self):
            self.total, self.done, self.closed = None, 0, False

        def start(self, total, description):
            self.total = total

        def advance(self, n=1):
            self.done += n

        def close(self):
            self.closed = True

    for policy in (CollapsePolicy(on_collapse="skip", check_every=3), CollapsePolicy(on_collapse="ignore")):
        rec = Rec()
        collapse_loop(FakeModel([1.0, 9.0, 1.0, 1.0]), 4, policy, progress=rec)
        assert rec.total == rec.done == 5 and rec.closed
