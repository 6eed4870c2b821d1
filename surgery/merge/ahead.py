"""Worker threads for heavy whole-tensor merge work (decompositions), one intra-op thread each.

:class:`Pool` is the thread pool: one worker per core (torch's intra-op thread count), each on
a single intra-op thread. One matrix per core instead of every core on each small LAPACK call
is faster, far faster on a busy machine (docs/merge.md, "Threads"), and a result does not depend
on the thread count: every decomposition runs on one thread whatever the number of workers.
Off the CPU everything runs on the calling thread.

:class:`Ahead` computes the whole tensors of a ``threaded`` batch method ahead of the writer:
the engine asks for tensors in plan order; each request submits the next tensors of the plan
(a window of them, within a memory budget that keeps the largest tensor — an embedding — from
being decomposed beside another one of its size) and waits for the one asked for. Results are
consumed in plan order, so the written bytes are those of a serial run; work not consumed when
the write stops (an error) is cancelled on exit.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

import torch


def available_memory() -> int:
    """Bytes of free physical memory (8 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Pool:
    """Worker threads for heavy whole-tensor steps, one intra-op thread each.

    At most :attr:`budget` bytes of working sets are meant to be in flight (the callers
    schedule against it, :meth:`footprint` estimates one). Off the CPU, or when not
    ``enabled``, everything runs on the calling thread.
    """

    def __init__(self, device: str, enabled: bool):
        self.cpu = str(device) == "cpu" and enabled
        self.workers = max(1, torch.get_num_threads()) if self.cpu else 1
        self.window = 2 * self.workers
        self.budget = max(512 << 20, available_memory() // 4)

    @staticmethod
    def footprint(numel: int) -> int:
        """Rough working set of one step (inputs, float64 copy, factors, result)."""
        return numel * 4 * 6

    def __enter__(self) -> "Pool":
        self._previous = torch.get_num_threads()
        if self.cpu:
            torch.set_num_threads(1)
            # each worker sets its own OpenMP/MKL thread count: a new thread starts from the
            # process default, and LAPACK teams of varying size give results that vary in the last bits
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="surgery-step",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self

    def submit(self, fn: Callable, *args: Any) -> Future:
        if not self.cpu:
            f: Future = Future()
            try:
                f.set_result(fn(*args))
            except BaseException as e:          # raised where the result is asked for, as on a worker
                f.set_exception(e)
            return f
        return self._pool.submit(fn, *args)

    def __exit__(self, *exc: Any) -> None:
        if self.cpu:
            self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._previous)


class Ahead:
    """Whole tensors computed ahead on a :class:`Pool`, handed out in plan order.

    Register each job with :meth:`add` (in plan order, with its size in elements), enter the
    context around the write, and ask for results with :meth:`result`. A job is submitted once
    the ones before it are, at most :attr:`Pool.window` · 16 jobs ahead of the one asked for and
    within the memory budget: the largest job's working set plus a quarter, so that the largest
    tensor runs beside small ones but never beside another large one. A finished job not yet
    consumed counts for its result's bytes.

    Args:
        device: Where the math runs (worker threads only on the CPU).
        enabled: False runs every job on the calling thread when it is asked for.
    """

    def __init__(self, device: str, enabled: bool = True):
        self.pool = Pool(device, enabled)
        self.jobs: list[tuple[Callable[[], Any], int]] = []
        self.futures: dict[int, tuple[Future, int, int]] = {}   # index -> (future, cost, result bytes)
        self.next = 0
        self.budget: int | None = None
        self._open = False

    @property
    def active(self) -> bool:
        return self._open and self.pool.cpu

    def add(self, compute: Callable[[], Any], numel: int) -> int:
        """Register a job (its position in the plan's order of jobs is returned)."""
        self.jobs.append((compute, numel))
        return len(self.jobs) - 1

    def __enter__(self) -> "Ahead":
        if self.jobs and self.pool.cpu:         # no jobs: the write keeps the process's threads
            self.pool.__enter__()
            self._open = True
            self.budget = Pool.footprint(max(n for _, n in self.jobs)) * 5 // 4
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._open:
            self._open = False
            for f, _, _ in self.futures.values():
                f.cancel()
            self.futures.clear()
            self.pool.__exit__(*exc)

    def _in_flight(self) -> int:
        return sum(rb if f.done() else cost for f, cost, rb in self.futures.values())

    def _fill(self, want: int) -> None:
        # wide enough that the other workers keep going while one decomposes the embedding
        # (the first tensor of the plan): held results count against the budget anyway
        window = 16 * self.pool.window
        while self.next < len(self.jobs) and self.next < want + window:
            compute, numel = self.jobs[self.next]
            cost = Pool.footprint(numel)
            if self.futures and self._in_flight() + cost > self.budget:
                return
            self.futures[self.next] = (self.pool.submit(compute), cost, numel * 4)
            self.next += 1

    def result(self, i: int) -> Any:
        """Job ``i``'s result; computed on the calling thread when the pool is not running or
        when it was handed out already (asked for twice)."""
        if not self.active:
            return self.jobs[i][0]()
        for j in [j for j in self.futures if j < i]:      # jobs the writer skipped (empty tensors)
            self.futures.pop(j)[0].cancel()
        if i not in self.futures and i < self.next:
            return self.jobs[i][0]()
        self.next = max(self.next, i)
        self._fill(i)                                      # submits i at the latest
        while not self.futures[i][0].done():
            wait([f for f, _, _ in self.futures.values() if not f.done()], return_when=FIRST_COMPLETED)
            self._fill(i)
        return self.futures.pop(i)[0].result()


def run_in_order(pool: Pool, fn: Callable[[Any], Any], items: list[Any]) -> None:
    """``fn(item)`` for every item on the pool's workers (the calling thread off the CPU);
    the first error, in item order, is raised and the jobs not started are cancelled (on the
    pool's exit)."""
    futures = [pool.submit(fn, item) for item in items]
    for f in futures:
        f.result()
