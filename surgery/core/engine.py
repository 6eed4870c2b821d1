"""The one per-tensor streaming loop every writing operation runs on.

An operation describes its output as a list of :class:`OutputTensor` and calls
:func:`write_checkpoint`. The engine plans shards from the shapes alone, then for each
tensor in sorted order computes it (or copies its stored bytes untouched), casts it to the
planned dtype, writes it at its final offset and drops it. Peak memory is a few tensors.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..checkpoint.card import make_record, render_card
from ..checkpoint.format import TensorInfo
from ..checkpoint.reader import Checkpoint, read_into
from ..checkpoint.writer import ShardedWriter, TensorSpec, atomic_output, parse_size, write_text
from .errors import UsageError
from .progress import Progress, ensure

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
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor] | None = None
    rows: Callable[[int, int], torch.Tensor] | None = None
    source: TensorInfo | None = None
    cast_source: TensorInfo | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        if sum(x is not None for x in (self.compute, self.rows, self.source, self.cast_source)) != 1:
            raise ValueError(f"OutputTensor {self.name!r} needs exactly one of compute, rows, source, cast_source")


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
    """What :func:`write_checkpoint` produced."""

    output_dir: Path
    files: list[Path]
    record: dict[str, Any]
    num_tensors: int
    total_bytes: int
    tensor_stats: dict[str, Any] = field(default_factory=dict)


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


def _cast_rows(writer: ShardedWriter, out: OutputTensor, scratch: _Scratch) -> None:
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
        writer.write_rows(out.name, start, dst)


def _write_one(writer: ShardedWriter, out: OutputTensor, scratch: _Scratch) -> None:
    if out.source is not None:
        writer.copy_raw(out.name, out.source)
        return
    if out.cast_source is not None:
        _cast_rows(writer, out, scratch)
        return
    if out.rows is not None:
        n = out.shape[0] if out.shape else 1
        step = _block_rows(out.shape)
        for start in range(0, n, step):
            block = out.rows(start, min(n, start + step))
            writer.write_rows(out.name, start, block.to(out.dtype))
            del block
        return
    t = out.compute()
    if tuple(t.shape) != out.shape:
        raise ValueError(f"operation produced {tuple(t.shape)} for {out.name!r}, planned {out.shape}")
    writer.write(out.name, t.to(device="cpu", dtype=out.dtype))


def write_checkpoint(
    plan: Iterable[OutputTensor],
    output: str | Path,
    *,
    donor: Checkpoint | None,
    operation: str,
    parameters: dict[str, Any],
    inputs: list[Checkpoint] | None = None,
    input_roles: list[str] | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: Progress | None = None,
    config_update: dict[str, Any] | None = None,
    extra_record: Callable[[], dict[str, Any]] | None = None,
    extra_files: dict[str, str] | None = None,
) -> WriteResult:
    """Stream ``plan`` into a new checkpoint folder, atomically.

    Args:
        plan: The output tensors.
        output: Output folder (refused if it exists unless ``force``; never an input).
        donor: Checkpoint whose config.json and tokenizer files are copied.
        operation: Operation name recorded in the card and metadata.
        parameters: JSON-able parameters recorded.
        inputs: Input checkpoints recorded with their sha256 (hashed in the background).
        input_roles: Optional role per input (``base``, ``model``...).
        shard_size: Max bytes of tensor data per shard (``5GB`` by default).
        force: Replace an existing output.
        progress: Receives one step per output byte.
        config_update: Keys merged into the copied config.json.
        extra_record: Called after all tensors are written; its dict lands under ``results``.
        extra_files: Extra text files (name -> content) written into the output.

    Returns:
        A WriteResult.
    """
    plan = sorted(plan, key=lambda o: o.name)
    inputs = list(inputs or [])
    for ck in inputs:
        ck.start_sha256()
    size = parse_size(shard_size)
    progress = ensure(progress)
    roots = [ck.root for ck in inputs] + ([donor.root] if donor is not None else [])
    specs = [TensorSpec(o.name, o.shape, o.dtype) for o in plan]
    total = sum(s.nbytes for s in specs)
    with atomic_output(Path(output), force=force, inputs=roots) as tmp:
        placeholder = {"format": "pt", "surgery": json.dumps({"operation": operation})}
        writer = ShardedWriter(tmp, specs, size, placeholder)
        try:
            progress.start(total, f"writing {Path(output).name}")
            scratch = _Scratch()
            for out in plan:
                _write_one(writer, out, scratch)
                progress.advance(TensorSpec(out.name, out.shape, out.dtype).nbytes)
            extra = extra_record() if extra_record else None
            roles = input_roles or ["input"] * len(inputs)
            rec_inputs = [{"role": r, "label": ck.label, "sha256": ck.sha256()} for r, ck in zip(roles, inputs)]
            record = make_record(operation, parameters, rec_inputs, extra)
            files = writer.finish({"format": "pt", "surgery": json.dumps(record, sort_keys=True, default=str)})
        finally:
            writer.close()
            progress.close()
        if donor is not None:
            for f in donor.donor_files():
                if f.name == "config.json":
                    continue
                shutil.copyfile(f, tmp / f.name)
            cfg = donor.config
            if cfg is not None or config_update:
                cfg = dict(cfg or {})
                cfg.update(config_update or {})
                write_text(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
        base_label = inputs[0].label if inputs and not Path(inputs[0].label).exists() else None
        write_text(tmp / "README.md", render_card(record, base_model=base_label))
    out_dir = Path(output)
    return WriteResult(out_dir, [out_dir / f.name for f in files], record, len(plan), total)
