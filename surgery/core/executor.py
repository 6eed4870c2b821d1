"""Where an operation's per-tensor work runs: in this process, or as tasks on a Ray cluster.

Every writing operation hands the engine a plan of :class:`~surgery.core.engine.OutputTensor`
entries; read-only operations (``analyze``, ``check``) map a function over tensor names. By
default both run here, one tensor at a time. A :class:`RayExecutor` runs the same plan on a
Ray cluster (https://docs.ray.io), and the output is byte for byte the same:

- The driver plans from headers only and groups the output tensors, in sorted order, into
  *work units* of bounded input bytes (:func:`plan_units`). A unit travels as a pickle of its
  plan entries: closures over checkpoint paths, tensor names and the operation's parameters.
  Checkpoints pickle as their paths and header fingerprint
  (:meth:`surgery.checkpoint.reader.Checkpoint.__reduce__`); a captured tensor is refused
  (:func:`dumps_unit`), so no array ever travels to a task.
- The driver creates and pre-sizes the shard files (the engine's usual shard plan); each task
  reads its own inputs and writes its tensors at their final offsets in those files (on
  storage every node mounts), fsyncs, and returns only names, digests and statistics.
- At most ``max_in_flight`` units are submitted at a time (backpressure); each asks Ray for
  ``memory=`` from its header sizes and, with ``device='cuda'``, one GPU.
- A task that fails or whose worker dies is retried by Ray (writing the same bytes at the
  same offsets is idempotent). The run's folder (a hidden sibling of the output, see
  :func:`surgery.core.output.resumable_output`) keeps a journal of finished units with their
  digests; a run interrupted as a whole resumes by re-running only the units whose bytes do
  not match their journal entry. The output still appears in one rename at the end.

Nothing here imports ray until a :class:`RayExecutor` is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .errors import ClusterError, SurgeryError, UsageError
from .progress import Progress, ensure

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint.writer import ShardedWriter
    from .engine import OutputTensor

# A work unit reads at most about this many bytes of stored input (a larger tensor is a unit of its own).
UNIT_BYTES = 256 << 20
# Memory a task asks Ray for on top of its tensors' working set (the worker's own footprint).
TASK_MEMORY = 512 << 20
# A captured tensor with more elements than this in a work unit is a defect of the operation.
MAX_SHIPPED_ELEMENTS = 1024
# How often Ray retries a unit whose task failed or whose worker died.
MAX_RETRIES = 3
ENV_ADDRESS = "SURGERY_RAY_ADDRESS"
ENV_UNIT_BYTES = "SURGERY_RAY_UNIT_BYTES"
JOURNAL = ".surgery-run.jsonl"
RESUME_MODES = ("auto", "require", "never")

_ADDRESS_RE = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9][A-Za-z0-9.\-]*:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5})$")


def looks_like_address(text: str) -> bool:
    """True for what ``--ray`` takes as a cluster address: ``auto``, ``local``, ``host:port``,
    ``[v6]:port`` or ``ray://host:port`` (anything else after a bare ``--ray`` is a positional)."""
    return bool(_ADDRESS_RE.match(text))


# ---- work units ---------------------------------------------------------------------------------

def input_bytes(out: "OutputTensor") -> int:
    """Stored bytes a plan entry reads: its source's size, the operation's hint, or its output size."""
    info = out.source if out.source is not None else out.cast_source
    if info is not None:
        return int(info.nbytes)
    if out.input_bytes is not None:
        return int(out.input_bytes)
    return _numel(out.shape) * _itemsize(out.dtype)


def memory_bytes(out: "OutputTensor") -> int:
    """Working memory of one plan entry: its inputs and two float32 copies of the result (raw
    copies stream through the kernel, casts through 64 MB row blocks)."""
    if out.source is not None:
        return 16 << 20
    if out.cast_source is not None:
        return 2 * (64 << 20)
    return 2 * input_bytes(out) + 2 * 4 * _numel(out.shape)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


def plan_units(plan: Sequence["OutputTensor"], unit_bytes: int = UNIT_BYTES) -> list[list["OutputTensor"]]:
    """Consecutive plan entries (in plan order) grouped so that each group reads at most
    ``unit_bytes`` of input; an entry larger than that forms a group of its own."""
    groups = _weighted_units([input_bytes(o) for o in plan], unit_bytes)
    return [[plan[i] for i in g] for g in groups]


def _weighted_units(weights: Sequence[int], unit_bytes: int) -> list[list[int]]:
    """Indices of consecutive items grouped so that each group weighs at most ``unit_bytes``
    (an item heavier than that is a group of its own)."""
    groups: list[list[int]] = []
    used = 0
    for i, w in enumerate(weights):
        if groups and used + w <= unit_bytes:
            groups[-1].append(i)
            used += w
        else:
            groups.append([i])
            used = w
    return groups


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads (None: unchanged), restoring the setting after."""
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dumps_unit(obj: Any) -> bytes:
    """Pickle a work unit (plan entries, or a function and its tensor names) for a task.

    Closures pickle by value (cloudpickle), checkpoints as their paths, sets in sorted order (so
    the same unit gives the same bytes in every process: its digest is its key in the run
    journal). A tensor or array of
    more than :data:`MAX_SHIPPED_ELEMENTS` elements captured anywhere in the unit is refused:
    tasks read their own inputs, and arrays never travel.

    Raises:
        TypeError: The unit captured a tensor (a defect of the operation that planned it).
    """
    import torch

    try:
        from ray import cloudpickle
    except ImportError:  # pragma: no cover - ray vendors cloudpickle; the standalone one works the same
        import cloudpickle  # type: ignore[no-redef]

    class _Guarded(cloudpickle.CloudPickler):
        def reducer_override(self, o: Any) -> Any:
            size = None
            if isinstance(o, torch.Tensor):
                size = o.numel()
            elif type(o).__module__ == "numpy" and hasattr(o, "size") and hasattr(o, "shape"):
                size = int(o.size)
            if size is not None and size > MAX_SHIPPED_ELEMENTS:
                raise TypeError(f"a work unit captured an array of shape {tuple(o.shape)}; tasks receive paths, "
                                f"names and parameters and read their own inputs (fix the operation's plan).")
            return super().reducer_override(o)

        def persistent_id(self, o: Any) -> Any:
            # Sets travel in sorted order: their iteration order depends on the process's string
            # hash seed, and a unit's key (the digest of its pickle) must be the same in every run.
            # (The C pickler writes sets before reducer_override could see them.)
            if type(o) in (set, frozenset):
                try:
                    items = sorted(o)
                except TypeError:
                    items = sorted(o, key=repr)
                return (_SET_TAG, type(o) is frozenset, items)
            return None

    buf = io.BytesIO()
    _Guarded(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


_SET_TAG = "surgery-set"


class _UnitUnpickler(pickle.Unpickler):
    """Reads what :func:`dumps_unit` wrote (sets come back from their sorted items)."""

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 3 and pid[0] == _SET_TAG:
            return frozenset(pid[2]) if pid[1] else set(pid[2])
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a work unit")


def loads_unit(payload: bytes) -> Any:
    """The inverse of :func:`dumps_unit` (in the task's process)."""
    return _UnitUnpickler(io.BytesIO(payload)).load()


# ---- executors ----------------------------------------------------------------------------------

@dataclass
class UnitOutcome:
    """What one work unit reports back: digests and statistics of its tensors, never data."""

    digests: dict[str, str]
    stats: dict[str, dict[str, float]]
    node: str | None = None
    skipped: bool = False
    seconds: float = 0.0


@dataclass
class Execution:
    """How a write ran (``WriteResult.execution``): where, how many units, how many resumed, units
    per node, the seconds each computed unit took in its task (keyed by its largest tensor) and the
    tensors each such unit wrote (same key), so a cost can be attributed to all of a unit's work."""

    kind: str
    threads: int | None = None
    units: int = 0
    resumed_units: int = 0
    nodes: dict[str, int] = field(default_factory=dict)
    unit_seconds: dict[str, float] = field(default_factory=dict)   # the unit's largest tensor -> seconds
    unit_tensors: dict[str, list[str]] = field(default_factory=dict)  # the unit's largest tensor -> its tensors

    def to_json(self) -> dict[str, Any]:
        secs = sorted(self.unit_seconds.values())
        return {"kind": self.kind, "threads_per_task": self.threads, "units": self.units,
                "resumed_units": self.resumed_units,
                "nodes": dict(sorted(self.nodes.items())),
                "unit_seconds_median": secs[len(secs) // 2] if secs else None,
                "unit_seconds": {k: round(v, 4) for k, v in self.unit_seconds.items()},
                "unit_tensors": {k: list(v) for k, v in self.unit_tensors.items()}}


class LocalExecutor:
    """The default: every plan entry in this process, in plan order (the engine's own loop)."""

    remote = False
    resumable = False

    def write(self, writer: "ShardedWriter", plan: Sequence["OutputTensor"], progress: Progress,
              journal: "Journal | None" = None, finite: Any = None,
              threads: int | None = None) -> tuple[dict[str, dict[str, float]], Execution]:
        from .engine import NO_CHECK, TensorSpec, _Scratch, _write_one

        stats: dict[str, dict[str, float]] = {}
        scratch = _Scratch()
        for out in plan:
            s = _write_one(writer, out, scratch, finite or NO_CHECK)
            if s:
                stats[out.name] = s
            progress.advance(TensorSpec(out.name, out.shape, out.dtype).nbytes)
        return stats, Execution("local", units=len(plan))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, weights: Sequence[int] | None = None,
            progress: Progress | None = None) -> list[Any]:
        progress = ensure(progress)
        out = []
        for item in items:
            out.append(fn(item))
            progress.advance()
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


LOCAL = LocalExecutor()


def map_items(fn: Callable[[Any], Any], items: Sequence[Any], description: str, progress: Progress | None = None, *,
              executor: "LocalExecutor | RayExecutor | None" = None,
              weights: Sequence[int] | None = None) -> list[Any]:
    """``[fn(x) for x in items]`` on ``executor`` (here when None), in order, with ``progress``
    started, advanced per item and closed like :func:`surgery.core.progress.track`.

    ``fn`` reads its own inputs from the item (a tensor name), so with Ray it is pickled once
    per work unit of items (grouped by ``weights``, the bytes each item reads) and runs in a
    task; only its return values (rows of numbers) travel back.
    """
    progress = ensure(progress)
    progress.start(len(items), description)
    try:
        return (executor or LOCAL).map(fn, items, weights=weights, progress=progress)
    finally:
        progress.close()


# ---- the run journal (resume) -------------------------------------------------------------------

class Journal:
    """Finished work units of one run, appended as JSON lines in the run folder.

    An entry is written (and fsynced) only after the unit's task fsynced its bytes, and holds
    the unit's key (the sha256 of its pickled plan entries), its tensors' digests and statistics.
    A resumed run sends each unit's recorded digests with it; the task re-hashes the bytes on
    disk and skips the unit when they all match.
    """

    def __init__(self, folder: Path):
        self.path = folder / JOURNAL
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["unit"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line of a killed run: that unit is simply redone
        self._fh = open(self.path, "a", encoding="utf-8")

    def expected(self, key: str, names: list[str]) -> dict[str, str] | None:
        entry = self.done.get(key)
        if entry is None or sorted(entry.get("sha256", {})) != sorted(names):
            return None
        return entry["sha256"]

    def stats(self, key: str) -> dict[str, dict[str, float]]:
        return (self.done.get(key) or {}).get("stats", {})

    def record(self, key: str, outcome: UnitOutcome) -> None:
        entry = {"unit": key, "sha256": outcome.digests, "stats": outcome.stats}
        self._fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done[key] = entry

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


# ---- tasks (run in Ray workers) -----------------------------------------------------------------

def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests call the task bodies directly)
        return None


def _check_version(version: str) -> None:
    from surgery import __version__

    if version != __version__:
        import socket

        raise UsageError(f"node {socket.gethostname()} runs surgery {__version__} but the driver runs {version}; "
                         f"install the same surgery version on every node.")


def _use_threads(threads: int) -> None:
    """Run this task's torch ops on the driver's thread count: reductions and decompositions
    split their work by thread count, so the same count gives the same bits."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_unit(payload: bytes, placements: dict, expected: dict[str, str] | None, version: str,
             threads: int = 1, finite: Any = None) -> UnitOutcome:
    """A work unit's task: write its tensors into the pre-sized files at their placements
    (``finite``: the engine's non-finite check, run here on what the task computes).

    With ``expected`` (a resumed run) the unit is skipped when the bytes on disk already have
    those digests. Returns the tensors' digests and statistics.
    """
    from ..checkpoint.writer import PlacedWriter
    from .engine import NO_CHECK, _Scratch, _write_one

    _check_version(version)
    _use_threads(threads)
    start = time.perf_counter()
    writer = PlacedWriter(placements)
    if expected is not None:
        try:
            if all(writer.digest(n) == d for n, d in expected.items()):
                return UnitOutcome(dict(expected), {}, _node_id(), skipped=True, seconds=time.perf_counter() - start)
        finally:
            writer.close(sync=False)
        writer = PlacedWriter(placements)
    outs = loads_unit(payload)
    stats: dict[str, dict[str, float]] = {}
    scratch = _Scratch()
    try:
        for out in outs:
            s = _write_one(writer, out, scratch, finite or NO_CHECK)
            if s:
                stats[out.name] = s
    finally:
        writer.close(sync=True)
    digests = {out.name: writer.digest(out.name) for out in outs}
    return UnitOutcome(digests, stats, _node_id(), seconds=time.perf_counter() - start)


def run_map(payload: bytes, version: str, threads: int = 1) -> tuple[list[Any], str | None, float]:
    """A read-only work unit's task: ``[fn(x) for x in items]``."""
    _check_version(version)
    _use_threads(threads)
    start = time.perf_counter()
    fn, items = loads_unit(payload)
    return [fn(x) for x in items], _node_id(), time.perf_counter() - start


# ---- Ray ----------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UsageError('`ray` needs Ray installed: pip install "surgery[ray]" (or pip install ray).') from exc
    return ray


class RayExecutor:
    """Runs plans and maps as Ray tasks (see the module docstring for the design).

    Args:
        address: The cluster: ``host:port``, ``ray://host:port``, ``auto`` (the cluster this
            machine belongs to) or None (``$SURGERY_RAY_ADDRESS`` if set, else a new local Ray
            instance, shut down again when the executor closes). An already initialised Ray
            (``ray.init`` called by the program) is used as it is.
        device: The ``device`` the operation runs its math on; ``cuda`` makes each task ask Ray
            for one GPU (Ray picks which; ``cuda:N`` is refused).
        resume: ``auto`` (continue an interrupted run of the same command when one is found),
            ``require`` (refuse to start without one) or ``never`` (start over).
        max_in_flight: Units submitted at a time (default: twice the cluster's CPUs, at least 2).
        unit_bytes: Input bytes per work unit (see :func:`plan_units`; default
            ``$SURGERY_RAY_UNIT_BYTES`` or 256 MiB). Smaller units spread a small model over
            more workers; larger ones cost less scheduling.
        max_retries: Retries of a failed unit (a dead worker, a killed task) before giving up.
        threads: Torch intra-op threads per task, and the CPUs each task asks Ray for (default:
            the driver's ``torch.get_num_threads()``, capped at the largest node's CPUs). Sums
            and decompositions split their work by thread count, so the output is byte for
            byte that of a plain run with this many threads.
    """

    remote = True
    resumable = True

    def __init__(self, address: str | None = None, *, device: str = "cpu", resume: str = "auto",
                 max_in_flight: int | None = None, unit_bytes: int | str | None = None,
                 max_retries: int = MAX_RETRIES, threads: int | None = None):
        if resume not in RESUME_MODES:
            raise UsageError(f"`resume_run` must be one of {', '.join(RESUME_MODES)}, not {resume!r}.")
        dev = str(device)
        if dev.startswith("cuda:"):
            raise UsageError(f"`device` {dev} names one GPU, but with `ray` each task gets the GPU Ray assigns it; "
                             f"use `device='cuda'`.")
        if dev not in ("cpu", "cuda"):
            raise UsageError(f"`device` {dev} is not available on Ray workers; use cpu or cuda.")
        if threads is not None and threads < 1:
            raise UsageError(f"`threads` must be at least 1, not {threads}.")
        if max_in_flight is not None and max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, not {max_in_flight}.")
        address = address or os.environ.get(ENV_ADDRESS) or None
        if address is not None and not looks_like_address(address):
            raise UsageError(f"`ray` address {address!r} is not host:port, ray://host:port, auto or local.")
        self.address = address
        self.device = dev
        self.resume = resume
        self.max_in_flight = max_in_flight
        from ..checkpoint.writer import parse_size

        if unit_bytes is None and os.environ.get(ENV_UNIT_BYTES):
            try:
                unit_bytes = parse_size(os.environ[ENV_UNIT_BYTES])
            except UsageError:
                raise UsageError(f"${ENV_UNIT_BYTES}={os.environ[ENV_UNIT_BYTES]!r} is not a size; use e.g. 64MB or "
                                 f"1GiB.") from None
        self.unit_bytes = parse_size(unit_bytes if unit_bytes is not None else UNIT_BYTES)
        self.max_retries = max_retries
        self.threads = threads
        self._ray = None
        self._owned = False
        self._remote_unit = None
        self._remote_map = None

    # -- connection --

    def connect(self):
        """Connect to (or start) the cluster once; returns the ray module."""
        if self._ray is not None:
            return self._ray
        ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         logging_level="WARNING", configure_logging=True)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
                where = self.address or "a new local instance"
                raise ClusterError(f"cannot start or reach the Ray cluster at {where}: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}; check the address (ray status "
                                   f"on the head node prints it).") from exc
            self._owned = True
        self._ray = ray
        self._remote_unit = ray.remote(run_unit)
        self._remote_map = ray.remote(run_map)
        return ray

    def close(self) -> None:
        """Shut down the local Ray instance this executor started (a cluster it joined keeps running)."""
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray = None
        self._owned = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _in_flight(self, ray, threads: int) -> int:
        if self.max_in_flight is not None:
            return self.max_in_flight
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(2, 2 * cpus // threads)

    def _largest_node(self, ray, resource: str) -> float:
        sizes = [n.get("Resources", {}).get(resource, 0) for n in ray.nodes() if n.get("Alive")]
        return max(sizes) if sizes else 0

    def _threads(self, ray) -> int:
        """Threads per task: as asked, else the driver's torch setting; at most the largest node's CPUs."""
        import torch

        want = self.threads or torch.get_num_threads()
        cap = int(self._largest_node(ray, "CPU"))
        return max(1, min(want, cap)) if cap else want

    def _options(self, ray, memory: int, threads: int) -> dict[str, Any]:
        cap = int(self._largest_node(ray, "memory"))
        mem = min(memory + TASK_MEMORY, cap) if cap else memory + TASK_MEMORY
        # SPREAD: units are independent and read their own inputs, so spreading them over the nodes
        # spreads the I/O as well as the compute
        opts: dict[str, Any] = {"num_cpus": threads, "memory": int(mem), "max_retries": self.max_retries,
                                "retry_exceptions": [OSError], "scheduling_strategy": "SPREAD"}
        if self.device == "cuda":
            opts["num_gpus"] = 1
        return opts

    # -- running --

    def _drain(self, ray, submit: Iterable[tuple[Any, Callable[[], Any]]], on_done: Callable[[Any, Any], None],
               describe: Callable[[Any], str], threads: int) -> None:
        """Submit ``(tag, start)`` pairs with at most ``max_in_flight`` running; ``on_done(tag, result)``."""
        limit = self._in_flight(ray, threads)
        pending = iter(submit)      # units are pickled as they are submitted, not all up front
        running: dict[Any, Any] = {}
        more = True
        try:
            while more or running:
                while more and len(running) < limit:
                    nxt = next(pending, None)
                    if nxt is None:
                        more = False
                        break
                    tag, start = nxt
                    running[start()] = tag
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    tag = running.pop(ref)
                    on_done(tag, self._get(ray, ref, describe(tag)))
        except BaseException:
            for ref in running:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            raise

    def _get(self, ray, ref, what: str) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SurgeryError):
                raise cause from None
            if isinstance(cause, BaseException) and not isinstance(cause, OSError):
                raise cause from exc
            raise ClusterError(f"{what} failed after {self.max_retries} retries: {cause or exc}; rerun the same "
                               f"command to resume.") from exc
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                ray.exceptions.TaskCancelledError) as exc:
            raise ClusterError(f"{what} was lost ({type(exc).__name__}) after {self.max_retries} retries; rerun the "
                               f"same command to resume.") from exc

    def write(self, writer: "ShardedWriter", plan: Sequence["OutputTensor"], progress: Progress,
              journal: Journal | None = None, finite: Any = None,
              threads: int | None = None) -> tuple[dict[str, dict[str, float]], Execution]:
        """Write ``plan`` into ``writer``'s pre-sized files with one task per work unit.

        ``finite``: the engine's non-finite check (run in the tasks). ``threads``: torch threads
        (and CPUs) per task for a plan whose bytes do not depend on the thread count (continual
        passes, whose steps run on one thread by design); default: the driver's count (see
        :class:`RayExecutor`).
        """
        from surgery import __version__

        from .engine import TensorSpec

        ray = self.connect()
        threads = threads or self._threads(ray)
        execution = Execution("ray", threads=threads)
        stats: dict[str, dict[str, float]] = {}
        units = plan_units(plan, self.unit_bytes)
        execution.units = len(units)

        def start_for(unit: list[OutputTensor]):
            names = [o.name for o in unit]
            payload = dumps_unit(unit)
            key = hashlib.sha256(payload).hexdigest()
            expected = journal.expected(key, names) if journal is not None else None
            memory = max(memory_bytes(o) for o in unit)
            placements = writer.placements(names)

            def start():
                return self._remote_unit.options(**self._options(ray, memory, threads)).remote(
                    payload, placements, expected, __version__, threads, finite)

            largest = max(unit, key=input_bytes).name
            return (key, names, sum(TensorSpec(o.name, o.shape, o.dtype).nbytes for o in unit), largest), start

        def on_done(tag, outcome: UnitOutcome) -> None:
            key, names, nbytes, largest = tag
            if outcome.skipped:
                execution.resumed_units += 1
                outcome.stats = journal.stats(key) if journal is not None else {}
            elif journal is not None:
                journal.record(key, outcome)
            if outcome.node:
                execution.nodes[outcome.node] = execution.nodes.get(outcome.node, 0) + 1
            if not outcome.skipped:
                execution.unit_seconds[largest] = outcome.seconds
                execution.unit_tensors[largest] = list(names)
            stats.update(outcome.stats)
            writer.mark_written(names)
            progress.advance(nbytes)

        def describe(tag) -> str:
            names = tag[1]
            return f"the work unit of {names[0]!r}" + (f" (+{len(names) - 1} more tensors)" if len(names) > 1 else "")

        self._drain(ray, (start_for(u) for u in units), on_done, describe, threads)
        return stats, execution

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, weights: Sequence[int] | None = None,
            progress: Progress | None = None) -> list[Any]:
        """``[fn(x) for x in items]`` as tasks over work units of items, in order."""
        from surgery import __version__

        ray = self.connect()
        threads = self._threads(ray)
        progress = ensure(progress)
        weights = list(weights) if weights is not None else [1] * len(items)
        groups = _weighted_units(weights, self.unit_bytes)
        results: list[Any] = [None] * len(items)

        def start_for(group: list[int]):
            payload = dumps_unit((fn, [items[i] for i in group]))
            memory = 3 * 4 * max(weights[i] for i in group)

            def start():
                return self._remote_map.options(**self._options(ray, memory, threads)).remote(
                    payload, __version__, threads)

            return group, start

        def on_done(group: list[int], res) -> None:
            values = res[0]
            for i, v in zip(group, values):
                results[i] = v
            progress.advance(len(group))

        self._drain(ray, (start_for(g) for g in groups), on_done, lambda g: f"the work unit of {items[g[0]]!r}",
                    threads)
        return results


def executor_for(ray: str | None, *, device: str = "cpu", resume_run: bool = False) -> "LocalExecutor | RayExecutor":
    """The executor a command's ``--ray [ADDRESS]`` / ``--resume-run`` flags ask for: local when
    ``ray`` is None (ray is not imported), else a :class:`RayExecutor` (``ray`` == ``""``: the
    default address)."""
    if ray is None:
        if resume_run:
            raise UsageError("`resume_run` continues an interrupted `ray` run; add `ray`.")
        return LOCAL
    return RayExecutor(ray or None, device=device, resume="require" if resume_run else "auto")
