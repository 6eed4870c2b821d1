"""The one per-tensor streaming loop every writing operation runs on.

An operation describes its output as a list of :class:`OutputTensor` and calls
:func:`write_checkpoint`. The engine plans shards from the shapes alone, then for each
tensor in sorted order computes it (or copies its stored bytes untouched), casts it to the
planned dtype, writes it at its final offset and drops it. Peak memory is a few tensors.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ..checkpoint.card import make_record, render_card
from ..checkpoint.format import TensorInfo
from ..checkpoint.reader import Checkpoint, read_into
from ..checkpoint.writer import ShardedWriter, TensorSpec, parse_size, write_text
from .output import atomic_output, resumable_output
from .errors import NonFiniteError, UsageError
from .formats import text_safe
from .progress import Progress, ensure

# Donor files that are not the tokenizer's (kept when an operation writes its own tokenizer).
NON_TOKENIZER_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")

# Row blocks of at most this many bytes (in float32) when a tensor is processed in pieces.
BLOCK_BYTES = 64 * 1024 * 1024

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map a user dtype name (``bfloat16``, ``bf16``, ``float16``, ``float32``...) to torch."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(set(DTYPE_NAMES)))}.") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class OutputTensor:
    """One tensor of the output and how to produce it (exactly one of the three ways).

    Attributes:
        name, shape, dtype: What is written.
        compute: Returns the whole tensor (any float dtype, any device); cast on write.
        rows: ``rows(start, stop)`` returns that row block; lets big tensors stream in pieces.
        source: Stored bytes copied verbatim (same dtype and shape), never decoded.
        cast_source: A stored tensor cast to ``dtype`` in row blocks through buffers the
            engine reuses for the whole write (the fast path of :func:`cast_tensor`).
        sources: The stored input tensors the result is computed from, searched for the
            NaN/Inf when it is not finite (default: the same-named tensor of every input).
        input_bytes: Stored bytes ``compute`` / ``rows`` read (all inputs together), a hint for
            executors that group tensors into work units and size their memory (default: the
            output's own size).
        block_rows: Rows per ``rows`` call (default: 64 MB of float32 per block). An operation
            whose per-block statistics are summed must fix it to reproduce a given order.

    ``compute`` and ``rows`` may return a :class:`Computed` instead of a tensor to report
    per-tensor statistics (norms for a whole-model scalar); the engine combines a tensor's row
    blocks' statistics in row order (numbers are added, lists concatenated) and returns them in
    ``WriteResult.stats``. They must read their own inputs (closures over checkpoints, names and
    parameters, never over tensors), so an executor can run them in another process.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor] | None = None
    rows: Callable[[int, int], torch.Tensor] | None = None
    source: TensorInfo | None = None
    cast_source: TensorInfo | None = None
    sources: tuple[TensorInfo, ...] | None = None
    input_bytes: int | None = None
    block_rows: int | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        if sum(x is not None for x in (self.compute, self.rows, self.source, self.cast_source)) != 1:
            raise ValueError(f"OutputTensor {self.name!r} needs exactly one of compute, rows, source, cast_source")


@dataclass
class Computed:
    """A computed tensor (or row block) with statistics about it, e.g. ``{"sq_norm": ...}``."""

    tensor: torch.Tensor
    stats: dict[str, Any]


def _split(value: Any) -> tuple[torch.Tensor, dict[str, Any] | None]:
    return (value.tensor, value.stats) if isinstance(value, Computed) else (value, None)


def copy_tensor(ckpt: Checkpoint, name: str, new_name: str | None = None) -> OutputTensor:
    """Copy a tensor's stored bytes unchanged (no decode)."""
    info = ckpt.info(name)
    return OutputTensor(new_name or name, info.shape, info.dtype, source=info)


def cast_tensor(ckpt: Checkpoint, name: str, dtype: torch.dtype | None, new_name: str | None = None) -> OutputTensor:
    """Copy a tensor, casting floating tensors to ``dtype`` in row blocks (raw copy when already that dtype)."""
    info = ckpt.info(name)
    if dtype is None or dtype == info.dtype or not info.dtype.is_floating_point:
        return copy_tensor(ckpt, name, new_name)
    if not info.shape:
        return OutputTensor(new_name or name, info.shape, dtype, compute=lambda: ckpt.get_raw(name))
    return OutputTensor(new_name or name, info.shape, dtype, cast_source=info)


@dataclass
class WriteResult:
    """What :func:`write_checkpoint` (or a single-file writer) produced.

    Attributes:
        output: The output folder or file, now in place.
        files: The weight files written (for a single-file output: that file).
        record: The provenance record written into the card and ``__metadata__``.
        num_tensors, total_bytes: How much was written.
        verified: What the ``verify`` step returned, if one ran.
        stats: Per-tensor statistics the plan's :class:`Computed` results reported.
        execution: How the tensors were computed on an executor other than this process
            (``kind``, work units, units resumed from an interrupted run, units per node).
    """

    output: Path
    files: list[Path]
    record: dict[str, Any]
    num_tensors: int
    total_bytes: int
    verified: Any = None
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    execution: dict[str, Any] | None = None


def row_ranges(start: int, stop: int, row_elems: int, max_elements: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` split into consecutive ranges of at most ``max_elements`` entries
    (at least one row each; ``row_elems`` entries per row). Empty when the range is."""
    step = max(1, max_elements // max(1, row_elems))
    return [(s, min(stop, s + step)) for s in range(start, stop, step)]


def rows_in_blocks(shape: tuple[int, ...], start: int, stop: int, max_elements: int,
                   block: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor of ``shape``, computed by ``block(s, t)`` over ranges
    of at most ``max_elements`` entries in order and stacked (a single range: its result as is)."""
    ranges = row_ranges(start, stop, math.prod(shape[1:]), max_elements) or [(start, stop)]
    if len(ranges) == 1:
        return block(*ranges[0])
    out = None
    for s, t in ranges:
        part = block(s, t)
        if out is None:
            out = torch.empty((stop - start, *shape[1:]), dtype=part.dtype, device=part.device)
        out[s - start:t - start] = part
    return out


def _block_rows(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:]) * 4 if len(shape) > 1 else 4
    return max(1, BLOCK_BYTES // max(row, 1))


class _Scratch:
    """Two grow-only byte buffers reused by every cast in one write (read side, write side)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, kind: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(kind)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[kind] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def finite_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype ``torch.isfinite`` supports (float8 has no kernels: upcast)."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry of ``t`` is finite (integer and bool tensors always are)."""
    return not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(finite_view(t)).all())


class _Finite:
    """The engine's non-finite check: one ``isfinite`` pass over every computed or cast
    tensor. Raw copies and casts of a stored tensor carry the input's own values (a NaN
    there is the input's, and ``surgery check`` reports it); what is refused is a NaN/Inf
    the operation computed (named with the input tensor that carried it into the math) and
    a cast that overflowed finite values."""

    def __init__(self, inputs: list[Checkpoint], allow: bool):
        self.inputs = inputs
        self.allow = allow

    def check(self, out: OutputTensor, written: torch.Tensor, computed: torch.Tensor | None = None,
              cast_only: bool = False) -> None:
        if self.allow or all_finite(written):
            return
        if cast_only and computed is not None and not all_finite(computed):
            return  # a stored NaN/Inf carried through a dtype cast, like a raw copy
        bad = _nonfinite_input(out, self.inputs)
        if bad is not None:
            info, label = bad
            raise NonFiniteError(
                f"output tensor {out.name!r} is not finite because the input tensor {info.name!r} of {label} holds "
                f"NaN or Inf; fix that input, or pass `allow_nonfinite` to write it anyway.",
                path=info.file, tensor=info.name)
        if computed is not None and computed.dtype != written.dtype and all_finite(computed):
            raise NonFiniteError(
                f"output tensor {out.name!r} overflows {dtype_name(written.dtype)} (values beyond its range became "
                f"Inf when cast); choose a wider `dtype`, or pass `allow_nonfinite` to write it anyway.", tensor=out.name)
        raise NonFiniteError(
            f"output tensor {out.name!r} came out NaN or Inf although its stored inputs are finite (the computation "
            f"overflowed, or an operand such as an edit delta held NaN/Inf); check the parameters and deltas, or pass "
            f"`allow_nonfinite` to write it anyway.",
            tensor=out.name)


def _nonfinite_input(out: OutputTensor, inputs: list[Checkpoint]) -> tuple[TensorInfo, str] | None:
    """The first stored input tensor of ``out`` that holds NaN or Inf (read only on failure)."""
    if out.sources is not None:
        candidates = [(info, str(info.file)) for info in out.sources]
    else:
        candidates = [(ck.info(out.name), ck.label) for ck in inputs if out.name in ck]
        if out.cast_source is not None:
            candidates.insert(0, (out.cast_source, str(out.cast_source.file)))
    for info, label in candidates:
        if not info.dtype.is_floating_point or info.numel == 0:
            continue
        if not all_finite(read_tensor(info)):
            return info, label
    return None


def _cast_rows(writer: ShardedWriter, out: OutputTensor, scratch: _Scratch, finite: _Finite) -> None:
    info = out.cast_source
    assert info is not None
    rows = info.shape[0]
    if rows == 0:
        return
    row_elems = info.numel // rows
    in_row = info.nbytes // rows
    out_item = torch.empty(0, dtype=out.dtype).element_size()
    step = _block_rows(info.shape)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        raw = scratch.get("read", n * in_row)
        read_into(info, start * in_row, raw)
        dst = scratch.get("write", n * row_elems * out_item).view(out.dtype)
        dst.copy_(raw.view(info.dtype))
        finite.check(out, dst, raw.view(info.dtype), cast_only=True)
        writer.write_rows(out.name, start, dst)


NO_CHECK = _Finite([], allow=True)


def _write_one(writer: Any, out: OutputTensor, scratch: _Scratch, finite: _Finite = NO_CHECK) -> dict[str, Any] | None:
    """Produce one plan entry and write it through ``writer`` (a ShardedWriter, or a
    PlacedWriter in an executor's task); returns its statistics (row blocks' combined in row
    order) or None."""
    if math.prod(out.shape) == 0:
        return None  # nothing to write (and no loop over a huge empty dimension)
    if out.source is not None:
        writer.copy_raw(out.name, out.source)
        return None
    if out.cast_source is not None:
        _cast_rows(writer, out, scratch, finite)
        return None
    if out.rows is not None:
        n = out.shape[0] if out.shape else 1
        step = out.block_rows or _block_rows(out.shape)
        total: dict[str, Any] | None = None
        for start in range(0, n, step):
            block, stats = _split(out.rows(start, min(n, start + step)))
            cast = block.to(out.dtype)
            finite.check(out, cast, block)
            writer.write_rows(out.name, start, cast)
            del block, cast
            if stats is not None:
                # numbers add up, lists (per-block values, for callers that need a given
                # summation order) concatenate
                total = dict(stats) if total is None else {k: total[k] + v if k in total else v
                                                           for k, v in stats.items()}
        return total
    t, stats = _split(out.compute())
    if tuple(t.shape) != out.shape:
        raise ValueError(f"operation produced {tuple(t.shape)} for {out.name!r}, planned {out.shape}")
    cast = t.to(device="cpu", dtype=out.dtype)
    finite.check(out, cast, t)
    writer.write(out.name, cast)
    return stats


def _retarget(out: OutputTensor, dtype: torch.dtype | None) -> OutputTensor:
    """``out`` written in ``dtype`` when it is a floating tensor (raw copies become casts)."""
    if dtype is None or out.dtype == dtype or not out.dtype.is_floating_point:
        return out
    if out.source is not None:
        if not out.shape:
            info = out.source
            return OutputTensor(out.name, out.shape, dtype, compute=lambda: read_tensor(info), sources=(info,))
        return OutputTensor(out.name, out.shape, dtype, cast_source=out.source)
    return OutputTensor(out.name, out.shape, dtype, compute=out.compute, rows=out.rows, cast_source=out.cast_source,
                        sources=out.sources, input_bytes=out.input_bytes, block_rows=out.block_rows)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """A stored tensor in its own dtype (fresh CPU copy)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    read_into(info, 0, buf)
    return buf.view(info.dtype).reshape(info.shape)


def config_with_dtype(config: dict[str, Any] | None, dtype: torch.dtype | None) -> dict[str, Any] | None:
    """``config`` with its dtype field (``torch_dtype`` or transformers 5's ``dtype``) set to ``dtype``."""
    if config is None or dtype is None:
        return config
    config = dict(config)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = dtype_name(dtype)
    return config


def write_checkpoint(
    plan: Iterable[OutputTensor],
    output: str | Path,
    *,
    donor: Checkpoint | None,
    operation: str,
    parameters: dict[str, Any],
    inputs: list[Checkpoint] | None = None,
    input_roles: list[str] | None = None,
    input_paths: Iterable[str | Path] = (),
    dtype: str | torch.dtype | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: Progress | None = None,
    config_update: dict[str, Any] | None = None,
    extra_record: Callable[..., dict[str, Any]] | None = None,
    extra_files: dict[str, str] | None = None,
    verify: Callable[[Path], Any] | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
    allow_nonfinite: bool = False,
    executor: Any = None,
) -> WriteResult:
    """Stream ``plan`` into a new checkpoint folder, atomically.

    Args:
        plan: The output tensors.
        output: Output folder (refused if it exists unless ``force``; never an input, never
            inside or around one).
        donor: Checkpoint whose config.json and tokenizer files are copied.
        operation: Operation name recorded in the card and metadata.
        parameters: JSON-able parameters recorded.
        inputs: Input checkpoints, recorded with their sha256 (hashed in the background from
            the bytes the plan reads; see :mod:`surgery.checkpoint.digest`).
        input_roles: Optional role per input (``base``, ``model``...).
        input_paths: Other files and folders the operation reads (adapters, recipes, states,
            edit files, texts): the output may not touch them either.
        dtype: Target dtype of every floating tensor (None: as planned); config.json's dtype
            field follows it.
        shard_size: Max bytes of tensor data per shard (``5GB`` by default).
        force: Replace an existing output.
        progress: Receives one step per output byte.
        config_update: Keys merged into the copied config.json.
        extra_record: Called after all tensors are written (with no argument, or with the
            per-tensor statistics when it takes one); its dict lands under ``results``.
        extra_files: Extra text files (name -> content) written into the output.
        verify: Called with the finished temporary folder before it is renamed into place;
            raising (e.g. CheckFailedError) leaves no output. Its return value is kept in
            ``WriteResult.verified``.
        tokenizer_files: Tokenizer files (name -> bytes) written instead of the donor's (a
            merge that builds its own vocabulary); config and generation files still come
            from the donor.
        allow_nonfinite: Write computed tensors that hold NaN or Inf. By default every
            computed or cast tensor is checked (one ``isfinite`` pass) and a non-finite one
            raises NonFiniteError naming the input tensor that carried it, before any
            output appears. Raw copies and plain casts carry a stored tensor's own values
            and are refused only when the cast overflows finite values.
        executor: Where the tensors are computed (:mod:`surgery.core.executor`): None for this
            process, or a RayExecutor (same bytes; the run folder is kept on interruption and
            a rerun of the same command resumes it).

    Returns:
        A WriteResult.

    Raises:
        NonFiniteError: A computed tensor is not finite and ``allow_nonfinite`` is False.
    """
    from .executor import LOCAL, Journal

    executor = executor or LOCAL
    target = parse_dtype(dtype)
    plan = sorted((_retarget(o, target) for o in plan), key=lambda o: o.name)
    inputs = list(inputs or [])
    size = parse_size(shard_size)
    progress = ensure(progress)
    guarded = [p for ck in inputs + ([donor] if donor is not None else []) for p in ck.input_paths()]
    guarded += [Path(p) for p in input_paths]
    specs = [TensorSpec(o.name, o.shape, o.dtype) for o in plan]
    total = sum(s.nbytes for s in specs)
    verified = None
    if executor.resumable:
        key = run_key(operation, parameters, size, specs, inputs, input_paths)
        place = resumable_output(Path(output), key=key, force=force, inputs=guarded,
                                 require=executor.resume == "require", fresh=executor.resume == "never")
    else:
        place = _plain(atomic_output(Path(output), force=force, inputs=guarded))
    with place as (tmp, resumed):
        placeholder = {"format": "pt", "surgery": json.dumps({"operation": operation})}
        writer = ShardedWriter(tmp, specs, size, placeholder, reuse=resumed)
        journal = Journal(tmp) if executor.resumable else None
        try:
            for ck in inputs:  # hashed from the bytes the plan reads here; a remote executor reads elsewhere
                ck.start_sha256(follow_reads=not executor.remote)
            progress.start(total, f"writing {Path(output).name}")
            finite = _Finite(inputs + ([donor] if donor is not None and donor not in inputs else []), allow_nonfinite)
            stats, execution = executor.write(writer, plan, progress, journal, finite=finite)
            extra = None
            if extra_record is not None:
                extra = extra_record(stats) if _takes_argument(extra_record) else extra_record()
            writer.sync_data()  # the disk flush overlaps what is left of the inputs' hashing
            roles = input_roles or ["input"] * len(inputs)
            rec_inputs = [{"role": r, "label": ck.label, "sha256": ck.sha256()} for r, ck in zip(roles, inputs)]
            record = text_safe(make_record(operation, parameters, rec_inputs, extra))
            files = writer.finish({"format": "pt", "surgery": json.dumps(record, sort_keys=True, default=str)})
        finally:
            for ck in inputs:
                ck.stop_sha256()  # a failed write: stop hashing (a finished digest is kept)
            writer.close()
            progress.close()
            if journal is not None:
                journal.close()
        if donor is not None:
            for f in donor.donor_files():
                if f.name == "config.json" or (tokenizer_files is not None and f.name not in NON_TOKENIZER_FILES):
                    continue
                shutil.copyfile(f, tmp / f.name)
            cfg = config_with_dtype(donor.config, target) if donor.config is not None else None
            if cfg is not None or config_update:
                cfg = dict(cfg or {})
                cfg.update(config_update or {})
                write_text(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        for name, data in (tokenizer_files or {}).items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
        base_label = inputs[0].label if inputs and not Path(inputs[0].label).exists() else None
        write_text(tmp / "README.md", render_card(record, base_model=base_label))
        if verify is not None:
            verified = verify(tmp)
    out_dir = Path(output).expanduser()
    return WriteResult(out_dir, [out_dir / f.name for f in files], record, len(plan), total, verified, stats,
                       execution.to_json() if execution.kind != "local" else None)


@contextmanager
def _plain(ctx: Any) -> Iterator[tuple[Path, bool]]:
    with ctx as tmp:
        yield tmp, False


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False


def run_key(operation: str, parameters: dict[str, Any], shard_size: int, specs: list[TensorSpec],
            inputs: list[Any], input_paths: Iterable[str | Path] = ()) -> str:
    """A digest of everything that decides a write's tensor bytes and layout: the operation and
    its parameters, the shard plan, and the inputs' identities (header fingerprints, file sizes
    and modification times). A rerun of the same command on the same inputs gets the same key."""
    def stat(p: Path) -> list[Any]:
        try:
            st = Path(p).stat()
            return [str(p), st.st_size, st.st_mtime_ns]
        except OSError:
            return [str(p), None, None]

    ident = {
        "operation": operation, "parameters": parameters, "shard_size": shard_size,
        "specs": [[s.name, list(s.shape), str(s.dtype)] for s in specs],
        "inputs": [[getattr(ck, "label", None), ck.fingerprint() if hasattr(ck, "fingerprint") else None,
                    [stat(f) for f in getattr(ck, "files", [])]] for ck in inputs],
        "paths": [stat(Path(p)) for p in input_paths],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
