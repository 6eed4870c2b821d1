"""Streaming, sharded, atomic safetensors writer.

The output plan (names, shapes, dtypes) is known before any tensor is computed, so every
shard's header is written first, each shard file is sized up front, and each tensor's
bytes go straight to their final offset when they are ready. Nothing waits in memory for a
shard to fill. The folder it writes into is the temporary sibling that
:mod:`surgery.core.output` renames into place once every tensor has been written and fsynced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UsageError
from .digest import note_read
from .format import DTYPES, TORCH_TO_CODE, TensorInfo, build_header

# Room left in every header so the final record can be written after the tensors.
HEADER_RESERVE = 64 * 1024
# Bytes per copy_file_range call of a raw tensor copy.
COPY_CHUNK = 1 << 24
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """Parse a shard size such as ``5GB`` (decimal, as transformers does), ``500MiB`` or ``1000000``."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"shard size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB.")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"shard size {text!r} must be positive.")
    return size


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor's name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[TORCH_TO_CODE[self.dtype]][1]


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Split sorted tensors into shards of at most ``shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


@dataclass(frozen=True)
class Placement:
    """Where one planned tensor's bytes go: ``file`` at byte ``offset`` (absolute), ``spec.nbytes`` long."""

    file: Path
    offset: int
    spec: TensorSpec


class _TensorSink:
    """Writes planned tensors at their final offsets; subclasses say where each one goes."""

    def _target(self, name: str) -> tuple[int, int, TensorSpec]:  # (fd, absolute offset, spec)
        raise NotImplementedError

    def _done(self, name: str, nbytes: int) -> None:
        pass

    def spec(self, name: str) -> TensorSpec:
        return self._target(name)[2]

    @staticmethod
    def _pwrite(fd: int, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (already in the planned dtype and shape)."""
        spec = self.spec(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, start: int, block: torch.Tensor) -> None:
        """Write rows ``[start, start + len(block))`` of a planned tensor."""
        fd, offset, spec = self._target(name)
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else spec.nbytes
        data = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if start * row_bytes + len(data) > spec.nbytes:
            raise ValueError(f"tensor {name!r}: rows past the end")
        self._pwrite(fd, memoryview(data), offset + start * row_bytes)
        self._done(name, len(data))

    def copy_raw(self, name: str, src: TensorInfo) -> None:
        """Copy a tensor's stored bytes from a source file without decoding them."""
        fd_out, offset, spec = self._target(name)
        if src.nbytes != spec.nbytes or src.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: raw copy needs the same dtype and size")
        fd_in = os.open(src.file, os.O_RDONLY)
        try:
            done = 0
            while done < src.nbytes:
                # in pieces, so the input's sha256 (hashed from the pages just copied) keeps pace
                want = min(COPY_CHUNK, src.nbytes - done)
                try:
                    n = os.copy_file_range(fd_in, fd_out, want, src.offset + done, offset + done)
                except OSError:
                    n = 0
                if n <= 0:  # not supported across these files: fall back to read/write in chunks
                    chunk = os.pread(fd_in, want, src.offset + done)
                    if not chunk:
                        raise OSError(f"short read copying {name!r} from {src.file}")
                    n = os.pwrite(fd_out, chunk, offset + done)
                note_read(src.file, src.offset + done, src.offset + done + n)
                done += n
        finally:
            os.close(fd_in)
        self._done(name, spec.nbytes)


class ShardedWriter(_TensorSink):
    """Writes a planned set of tensors into pre-sized shard files at their final offsets.

    Args:
        folder: Folder to create the files in (a temporary folder; see :func:`surgery.core.output.atomic_output`).
        specs: Every output tensor; written in sorted name order.
        shard_size: Maximum bytes of tensor data per shard.
        metadata: ``__metadata__`` for every shard (may be replaced in :meth:`finish`).
        reuse: Write into existing files of exactly the planned size in place (their pages are
            already allocated, and bytes already written stay); used for scratch files rewritten
            tensor by tensor and for resumed runs.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], shard_size: int, metadata: dict[str, str],
                 reuse: bool = False):
        for s in specs:
            if s.dtype not in TORCH_TO_CODE:
                raise UsageError(f"tensor {s.name!r}: dtype {s.dtype} cannot be stored in safetensors.", tensor=s.name)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted(n for n in names if names.count(n) > 1)[0]
            raise UsageError(f"tensor {dup!r} is planned twice for the output.", tensor=dup)
        self.folder = folder
        specs = sorted(specs, key=lambda s: s.name)
        self.shards = plan_shards(specs, shard_size)
        self.files = [folder / n for n in shard_names(len(self.shards))]
        self.location: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (shard idx, abs offset, spec)
        self._header_len: list[int] = []
        self._entries: list[list] = []
        self._remaining: dict[str, int] = {}
        self._fds: list[int] = []
        for i, (shard, path) in enumerate(zip(self.shards, self.files)):
            entries, pos = [], 0
            for s in shard:
                entries.append((s.name, TORCH_TO_CODE[s.dtype], s.shape, pos, pos + s.nbytes))
                pos += s.nbytes
            header = build_header(entries, metadata, min_size=_json_len(entries, metadata) + HEADER_RESERVE)
            same = reuse and path.is_file() and path.stat().st_size == len(header) + pos
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if same else os.O_TRUNC), 0o644)
            self._fds.append(fd)
            if not same:
                os.ftruncate(fd, len(header) + pos)
            os.pwrite(fd, header, 0)
            self._header_len.append(len(header))
            self._entries.append(entries)
            for (name, _, _, begin, _), s in zip(entries, shard):
                self.location[name] = (i, len(header) + begin, s)
                self._remaining[name] = s.nbytes

    def _target(self, name: str) -> tuple[int, int, TensorSpec]:
        shard, offset, spec = self.location[name]
        return self._fds[shard], offset, spec

    def _done(self, name: str, nbytes: int) -> None:
        self._remaining[name] -= nbytes

    def placements(self, names: list[str] | None = None) -> dict[str, Placement]:
        """Where each named tensor (default: all) goes, for a :class:`PlacedWriter` in another process."""
        wanted = self.location if names is None else {n: self.location[n] for n in names}
        return {n: Placement(self.files[i], off, spec) for n, (i, off, spec) in wanted.items()}

    def mark_written(self, names: list[str]) -> None:
        """Record tensors another process wrote through :meth:`placements` (and fsynced)."""
        for n in names:
            self._remaining[n] = 0

    def missing(self) -> list[str]:
        return sorted(n for n, r in self._remaining.items() if r != 0)

    def sync_data(self) -> None:
        """Make the tensor bytes written so far durable (:meth:`finish` then only has the
        headers left to sync). Lets a caller overlap this disk wait with other work, such
        as the inputs' sha256 still being hashed on another thread."""
        for fd in self._fds:
            os.fdatasync(fd)

    def finish(self, metadata: dict[str, str]) -> list[Path]:
        """Rewrite the headers with the final metadata, write the index, fsync, close.

        Raises:
            ValueError: A planned tensor was never written (a bug in the operation).
        """
        missing = self.missing()
        if missing:
            raise ValueError(f"planned tensors were not written: {missing[:5]}")
        for i, entries in enumerate(self._entries):
            header = build_header(entries, metadata, min_size=self._header_len[i] - 8)
            if len(header) != self._header_len[i]:  # record outgrew the reserve: keep a pointer
                slim = {k: v for k, v in metadata.items() if k != "surgery"}
                slim["surgery"] = json.dumps({"record": "see README.md (too large for the header)"})
                header = build_header(entries, slim, min_size=self._header_len[i] - 8)
            os.pwrite(self._fds[i], header, 0)
            os.fsync(self._fds[i])
        self.close()
        if len(self.files) > 1:
            total = sum(s.nbytes for shard in self.shards for s in shard)
            weight_map = {s.name: f.name for shard, f in zip(self.shards, self.files) for s in shard}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_text(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


class PlacedWriter(_TensorSink):
    """Writes tensors into shard files another :class:`ShardedWriter` created and sized, at the
    placements it handed out: lets separate processes (Ray tasks) each write their own tensors
    into the same pre-sized files. Files are opened on first use; :meth:`close` fsyncs them.
    """

    def __init__(self, placements: dict[str, Placement]):
        self.placements = placements
        self._fds: dict[Path, int] = {}

    def _target(self, name: str) -> tuple[int, int, TensorSpec]:
        p = self.placements[name]
        fd = self._fds.get(p.file)
        if fd is None:
            fd = self._fds[p.file] = os.open(p.file, os.O_RDWR)
        return fd, p.offset, p.spec

    def digest(self, name: str) -> str:
        """sha256 of the bytes now stored for ``name``."""
        p = self.placements[name]
        return bytes_sha256(p.file, p.offset, p.spec.nbytes)

    def close(self, sync: bool = True) -> None:
        try:
            for fd in self._fds.values():
                if sync:
                    os.fsync(fd)
        finally:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds = {}


def bytes_sha256(path: Path, offset: int, nbytes: int) -> str:
    """sha256 of ``nbytes`` bytes of ``path`` from ``offset`` (read in 16 MB chunks)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, min(1 << 24, nbytes - done), offset + done)
            if not chunk:
                raise OSError(f"{path} ends before byte {offset + nbytes}")
            h.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _json_len(entries, metadata) -> int:
    return len(build_header(entries, metadata)) - 8


def write_text(path: Path, text: str) -> None:
    # backslashreplace: a lone surrogate (a path's non-UTF-8 bytes) is written as its escape
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write one small safetensors file with sorted tensor names and metadata keys, so the
    same tensors always give the same bytes (safetensors' own writer orders metadata by hash).

    Returns:
        The number of tensor-data bytes written.
    """
    names = sorted(tensors)
    entries, blobs, pos = [], [], 0
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in TORCH_TO_CODE:
            raise UsageError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors.", tensor=name)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append((name, TORCH_TO_CODE[t.dtype], tuple(t.shape), pos, pos + len(data)))
        blobs.append(data)
        pos += len(data)
    header = build_header(entries, dict(sorted((metadata or {}).items())))
    with open(path, "wb") as fh:
        fh.write(header)
        for data in blobs:
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return pos
