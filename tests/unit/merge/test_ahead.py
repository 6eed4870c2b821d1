"""Whole tensors computed ahead on worker threads (surgery.merge.ahead): results in plan order,
the same bytes whatever the number of workers or the memory budget, failures cancel the rest."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.merge import MergeRequest, ModelEntry, merge
from surgery.merge import ahead as ahead_mod
from surgery.merge.ahead import Ahead, Pool

LLAMA = Path(__file__).resolve().parents[3] / "fixtures" / "llama-tiny"
FTS = [LLAMA / f"ft-{c}" for c in "abc"]


def _req(method):
    params = {"iter_num": 5} if method == "wudi" else {}
    return MergeRequest(method, str(LLAMA / "base"), [ModelEntry(str(m)) for m in FTS], params)


def _threads(n: int):
    class _Set:
        def __enter__(self):
            self.previous = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.previous)
    return _Set()


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", pytest.param("wudi", marks=pytest.mark.slow)])
def test_bytes_do_not_depend_on_the_worker_count(tmp_path, monkeypatch, method):
    """1 worker, 2 workers, 2 workers with room for one tensor in flight, and no pool at all
    (each tensor computed when the writer asks for it) write the same bytes."""
    outs = []
    for workers in (1, 2):
        with _threads(workers):
            merge(_req(method), tmp_path / f"w{workers}", dtype="float32")
        outs.append(tmp_path / f"w{workers}")
    real_enter = Ahead.__enter__

    def tight(self):
        real_enter(self)
        self.budget = 1                      # one job in flight at a time
        return self

    monkeypatch.setattr(Ahead, "__enter__", tight)
    with _threads(2):
        merge(_req(method), tmp_path / "tight", dtype="float32")
    outs.append(tmp_path / "tight")
    monkeypatch.setattr(Ahead, "__enter__", real_enter)
    real_init = Pool.__init__

    def serial(self, device, enabled):
        real_init(self, device, False)

    monkeypatch.setattr(Pool, "__init__", serial)
    merge(_req(method), tmp_path / "serial", dtype="float32")
    outs.append(tmp_path / "serial")
    ref = open_checkpoint(outs[0])
    for o in outs[1:]:
        other = open_checkpoint(o)
        assert other.names == ref.names
        for n in ref.names:
            assert torch.equal(ref.get_raw(n), other.get_raw(n)), (o.name, n)


def test_results_come_in_plan_order_within_the_budget():
    """Jobs run ahead on the workers, never more than the budget allows at once, and each
    result is the one asked for, also when the writer skips a job."""
    running, peak, lock = [0], [0], threading.Lock()

    def job(i):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.01 * (i % 3))
            with lock:
                running[0] -= 1
            return i
        return run

    with _threads(2):
        ah = Ahead("cpu")
        sizes = [1000, 10, 10, 10, 1000, 10, 10]
        for i, n in enumerate(sizes):
            ah.add(job(i), n)
        with ah:
            assert ah.active and ah.pool.workers == 2
            assert ah.budget == Pool.footprint(1000) * 5 // 4
            got = [ah.result(i) for i in (0, 1, 2, 4, 5, 6)]      # 3 skipped (an empty tensor)
            assert ah.result(6) == 6                                # asked twice: computed again
        assert not ah.futures
    assert got == [0, 1, 2, 4, 5, 6]
    assert peak[0] <= 2


def test_a_failing_job_raises_where_asked_and_cancels_the_rest():
    ran = []

    def ok(i):
        return lambda: ran.append(i) or i

    def bad():
        raise ValueError("tensor 'x' is broken")

    with _threads(1):
        ah = Ahead("cpu")
        ah.add(bad, 10)
        for i in range(1, 40):
            ah.add(ok(i), 10)
        with pytest.raises(ValueError, match="broken"):
            with ah:
                ah.result(0)
        # the window never reached the end of the plan, and nothing runs after the exit
        assert len(ran) < 39 and not ah.futures
        assert torch.get_num_threads() == 1


def test_off_the_pool_jobs_run_when_asked():
    """Not entered (surgery tune, Ray tasks) or disabled: each job runs on the calling thread."""
    calls = []
    ah = Ahead("cpu", enabled=False)
    ah.add(lambda: calls.append(threading.current_thread().name) or 7, 5)
    with ah:
        assert not ah.active
        assert ah.result(0) == 7
    assert calls == [threading.current_thread().name]
    assert ahead_mod.available_memory() > 0


def test_run_in_order_raises_the_first_failure():
    def fn(i):
        if i == 2:
            raise ValueError("two")
        return i

    with Pool("cpu", True) as pool, pytest.raises(ValueError, match="two"):
        ahead_mod.run_in_order(pool, fn, [0, 1, 2, 3])
