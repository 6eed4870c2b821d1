"""The GGUF file format (llama.cpp, Ollama): a validating header reader that needs neither
torch nor numpy, tensor reads by row range with dequantization through gguf-py, and the
tables that map GGUF tensors to Hugging Face names as transformers' own GGUF loader does.

Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
``"GGUF"``, version (u32, 2 or 3), tensor count (u64), key/value count (u64), the key/value
pairs, one info record per tensor (name, dims innermost first, ggml type, offset), padding
to ``general.alignment`` (32 by default), then the tensor data. Every count, length, type,
shape and offset is checked against the file before it is used; a violation is one
:class:`~surgery.core.errors.CorruptCheckpointError` naming the file (and the tensor).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import CorruptCheckpointError, IncompatibleCheckpointsError
from .digest import note_read

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Bounds that a real file never comes near and a hostile header cannot get past.
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 20
MAX_KEY_BYTES = 1 << 16

# ggml type id -> (name, elements per block, bytes per block). Facts of ggml's type table
# (tests check it against gguf-py's GGML_QUANT_SIZES); kept here so reading a header needs
# no gguf-py / numpy import.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
GGML_TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
# Types stored as plain numbers (no blocks): numpy dtype names.
PLAIN_TYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I8": "int8", "I16": "int16",
               "I32": "int32", "I64": "int64"}

# general.file_type (llama.cpp's llama_ftype): what the file says it is mostly quantized as.
FILE_TYPES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
    19: "MOSTLY_IQ2_XXS", 20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M", 28: "MOSTLY_IQ2_S",
    29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M", 32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0",
    37: "MOSTLY_TQ2_0", 38: "MOSTLY_MXFP4_MOE",
}

# Metadata value types: id -> (name, struct format or None for string/array).
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
    5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
VALUE_TYPE_IDS = {name: tid for tid, (name, _) in _VALUE_TYPES.items()}
# Arrays longer than this are decoded only when asked (tokenizer vocabularies run to 10^5).
INLINE_ARRAY = 64


def is_gguf(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, decoded on demand (``values()``); ``count`` items of ``item_type``."""

    file: Path
    item_type: str
    count: int
    offset: int  # absolute offset of the first item
    _inline: tuple | None = None

    def values(self) -> list[Any]:
        if self._inline is not None:
            return list(self._inline)
        with open(self.file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            items, _ = _read_array_items(memoryview(mm), self.offset, len(mm), self.item_type, self.count,
                                         self.file, decode=True)
        return items

    def describe(self) -> Any:
        """The values when short, otherwise ``"[N x type]"``."""
        return list(self._inline) if self._inline is not None else f"[{self.count} x {self.item_type}]"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, from its header.

    Attributes:
        name: GGUF tensor name (``blk.0.attn_q.weight``).
        shape: Shape in row-major (numpy / torch) order: ggml's dims reversed.
        ggml_type: Type name (``Q4_1``, ``F32``...).
        nbytes: Stored byte length.
        offset: Absolute byte offset of the data in ``file``.
        file: The GGUF file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    nbytes: int
    offset: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def slices(self) -> int:
        """Number of slices along dim 0 that can be read apart: ``shape[0]`` for 2-D and up
        (ggml rows and quantization blocks never cross them), 1 for a vector."""
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0."""
        return self.nbytes // self.slices if self.slices else 0


@dataclass
class GGUFFile:
    """A parsed, validated GGUF header. ``metadata`` maps keys to values (long arrays as
    :class:`GGUFArray`); ``tensors`` keeps the file's order."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int
    file_size: int
    value_types: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor(self, name: str) -> GGUFTensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise IncompatibleCheckpointsError(f"{self.path} has no tensor {name!r}.", path=self.path, tensor=name)

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)


class _Cursor:
    """Bounds-checked little-endian reads from the header bytes."""

    def __init__(self, buf: memoryview, size: int, file: Path):
        self.buf, self.size, self.file, self.pos = buf, size, file, 0

    def fail(self, what: str, tensor: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.file} is not a valid GGUF file: {what}.", path=self.file, tensor=tensor)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (byte {self.pos} + {n} > {self.size})")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", what)
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long, above the {limit}-byte limit")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _read_array_items(buf: memoryview, pos: int, size: int, item_type: str, count: int, file: Path,
                      decode: bool) -> tuple[list[Any], int]:
    """Walk ``count`` items of ``item_type`` from ``pos``; returns (items or [], end position)."""
    cur = _Cursor(buf, size, file)
    cur.pos = pos
    tid = VALUE_TYPE_IDS[item_type]
    fmt = _VALUE_TYPES[tid][1]
    if fmt is not None:
        width = struct.calcsize(fmt)
        cur.need(width * count, f"an array of {count} {item_type}")
        items = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)) if decode else []
        return items, pos + width * count
    if item_type == "string":
        items: list[Any] = []
        end = size
        p = pos
        unpack = struct.unpack_from
        for _ in range(count):
            if p + 8 > end:
                raise cur.fail(f"an array of {count} strings runs past the end of the file")
            (n,) = unpack("<Q", buf, p)
            p += 8
            if n > end - p:
                raise cur.fail(f"an array of {count} strings runs past the end of the file")
            if decode:
                items.append(bytes(buf[p:p + n]).decode("utf-8", errors="replace"))
            p += n
        return items, p
    raise cur.fail("nested metadata arrays are not supported")


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[Any, str]:
    if vtype not in _VALUE_TYPES:
        raise cur.fail(f"metadata key {key!r} has unknown value type {vtype}")
    name, fmt = _VALUE_TYPES[vtype]
    if fmt is not None:
        return cur.unpack(fmt, f"the value of {key!r}"), name
    if name == "string":
        return cur.string(f"the value of {key!r}"), name
    item = cur.unpack("<I", f"the array type of {key!r}")
    count = cur.unpack("<Q", f"the array length of {key!r}")
    if item not in _VALUE_TYPES or _VALUE_TYPES[item][0] == "array":
        raise cur.fail(f"metadata array {key!r} has unsupported item type {item}")
    item_name = _VALUE_TYPES[item][0]
    start = cur.pos
    inline = count <= INLINE_ARRAY
    items, end = _read_array_items(cur.buf, start, cur.size, item_name, count, cur.file, decode=inline)
    cur.pos = end
    return GGUFArray(cur.file, item_name, count, start, tuple(items) if inline else None), f"array[{item_name}]"


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read and validate the header of a GGUF file; no tensor data is read.

    Raises:
        CorruptCheckpointError: Any violation of the format.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        if size < 24:
            raise CorruptCheckpointError(f"{file} is not a valid GGUF file: it has only {size} bytes.", path=file)
        with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(view, size, file)
            finally:
                view.release()
    except OSError as exc:
        raise CorruptCheckpointError(f"{file} cannot be read: {exc.strerror or exc}.", path=file) from exc


def _parse(buf: memoryview, size: int, file: Path) -> GGUFFile:
    cur = _Cursor(buf, size, file)
    if bytes(buf[:4]) != MAGIC:
        raise cur.fail("it does not start with the GGUF magic")
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version in (1,):
        raise cur.fail("it is GGUF version 1, which has 32-bit counts; re-convert it with a current llama.cpp")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            raise cur.fail("it is a big-endian GGUF; only little-endian files are supported")
        raise cur.fail(f"it has version {version}; versions 2 and 3 are supported")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the metadata count")
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"it declares {n_tensors} tensors, above the {MAX_TENSORS} limit")
    if n_kv > MAX_KEYS:
        raise cur.fail(f"it declares {n_kv} metadata keys, above the {MAX_KEYS} limit")
    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key", limit=MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.unpack("<I", f"the value type of {key!r}")
        metadata[key], types[key] = _read_value(cur, vtype, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1) or alignment > 1 << 20):
        raise cur.fail(f"general.alignment is {alignment!r}; it must be a power of two")
    raw: list[tuple[str, tuple[int, ...], str, int, int]] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name", limit=MAX_KEY_BYTES)
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice", tensor=name)
        names.add(name)
        n_dims = cur.unpack("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}", tensor=name)
        dims = [cur.unpack("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        tid = cur.unpack("<I", f"the type of tensor {name!r}")
        if tid not in GGML_TYPES:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {tid}", tensor=name)
        tname, block, tsize = GGML_TYPES[tid]
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the {tname} "
                           f"block of {block}", tensor=name)
        offset = cur.unpack("<Q", f"the offset of tensor {name!r}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment "
                           f"{alignment}", tensor=name)
        numel = math.prod(dims)
        if numel > size * block:  # cannot fit; also bounds the byte count below
            raise cur.fail(f"tensor {name!r} has shape {dims[::-1]}, larger than the file", tensor=name)
        nbytes = numel // block * tsize
        raw.append((name, tuple(reversed(dims)), tname, offset, nbytes))
    data_start = cur.pos + (-cur.pos) % alignment
    data_len = size - data_start
    if data_len < 0:
        raise cur.fail("the tensor data area starts past the end of the file")
    tensors: list[GGUFTensorInfo] = []
    spans = []
    for name, shape, tname, offset, nbytes in raw:
        if offset + nbytes > data_len:
            raise cur.fail(f"tensor {name!r} ends at byte {offset + nbytes} of the data area, past its end at "
                           f"{data_len}: the file is truncated", tensor=name)
        tensors.append(GGUFTensorInfo(name, shape, tname, nbytes, data_start + offset, file))
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise cur.fail(f"tensors {n0!r} and {n1!r} overlap (bytes {b0}-{e0} and {b1}-{e1})", tensor=n1)
    return GGUFFile(file, version, metadata, tensors, alignment, data_start, size, types)


# ------------------------------------------------------------------------------ inspection

def describe_metadata(gf: GGUFFile) -> dict[str, Any]:
    """Metadata as JSON-able values; long arrays (vocabularies, merges) as ``"[N x type]"``."""
    return {k: (v.describe() if isinstance(v, GGUFArray) else v) for k, v in gf.metadata.items()}


def summarize(gf: GGUFFile) -> dict[str, Any]:
    """What ``surgery inspect`` reports for a GGUF file (header only)."""
    arch = gf.architecture or "?"
    quant: dict[str, dict[str, int]] = {}
    for t in gf.tensors:
        q = quant.setdefault(t.ggml_type, {"tensors": 0, "parameters": 0, "bytes": 0})
        q["tensors"] += 1
        q["parameters"] += t.numel
        q["bytes"] += t.nbytes
    ftype = gf.get("general.file_type")
    keys = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "rope.freq_base", "vocab_size", "expert_count")
    config = {k: gf.get(f"{arch}.{k}") for k in keys if gf.get(f"{arch}.{k}") is not None}
    tokens = gf.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, GGUFArray):
        config["vocab_size"] = tokens.count
    total = sum(t.nbytes for t in gf.tensors)
    return {
        "checkpoint": str(gf.path),
        "format": "gguf",
        "root": str(gf.path.parent),
        "gguf_version": gf.version,
        "architecture": gf.architecture,
        "name": gf.get("general.name"),
        "file_type": FILE_TYPES.get(ftype, ftype) if ftype is not None else None,
        "num_tensors": len(gf.tensors),
        "num_parameters": gf.num_parameters(),
        "tied_duplicates": [],
        "total_bytes": total,
        "dtypes": {k: v["bytes"] for k, v in sorted(quant.items())},
        "quant_types": dict(sorted(quant.items())),
        "bits_per_weight": round(8 * total / max(1, gf.num_parameters()), 3),
        "shards": [{"file": gf.path.name, "bytes": gf.file_size}],
        "tokenizer": {"model": gf.get("tokenizer.ggml.model"), "pre": gf.get("tokenizer.ggml.pre"),
                      "tokens": tokens.count if isinstance(tokens, GGUFArray) else None},
        "metadata": describe_metadata(gf),
        "config": config,
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.ggml_type, "bytes": t.nbytes,
                     "file": gf.path.name} for t in gf.tensors],
    }


# ------------------------------------------------------------------------------ tensor data

def read_rows_raw(info: GGUFTensorInfo, start: int, stop: int):
    """Stored bytes of slices ``[start, stop)`` along dim 0 as a numpy uint8 array of shape
    ``(stop - start, row_bytes)`` (no mmap: only this block is ever resident)."""
    import numpy as np

    stop = min(stop, info.slices)
    rb = info.row_bytes
    n = (stop - start) * rb
    out = np.empty(n, dtype=np.uint8)
    view = memoryview(out)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], info.offset + start * rb + done)
            if got <= 0:
                raise CorruptCheckpointError(f"tensor {info.name!r} in {info.file} could not be read: the file is "
                                             f"truncated.", path=info.file, tensor=info.name)
            done += got
    except OSError as exc:
        raise CorruptCheckpointError(f"tensor {info.name!r} in {info.file} cannot be read: {exc.strerror or exc}.",
                                     path=info.file, tensor=info.name) from exc
    finally:
        os.close(fd)
    note_read(info.file, info.offset + start * rb, info.offset + start * rb + n)  # the input's sha256
    return out.reshape(stop - start, rb)


def dequantize_rows(info: GGUFTensorInfo, start: int, stop: int):
    """Slices ``[start, stop)`` along dim 0 as a numpy array: float32 for every floating or
    quantized type (through gguf-py's dequantizers), the stored dtype for integer types.

    Raises:
        IncompatibleCheckpointsError: gguf-py cannot dequantize this type.
    """
    import numpy as np

    raw = read_rows_raw(info, start, stop)
    shape = (raw.shape[0], *info.shape[1:]) if len(info.shape) >= 2 else info.shape
    t = info.ggml_type
    if t in PLAIN_TYPES:
        arr = raw.reshape(-1).view(np.dtype(PLAIN_TYPES[t]).newbyteorder("<"))
        if t in ("F16", "F64"):
            arr = arr.astype(np.float32)
        return arr.reshape(shape)
    if t == "BF16":
        return (raw.reshape(-1).view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError as exc:
        raise IncompatibleCheckpointsError(
            f"{info.file} holds {t} tensors; dequantizing them needs gguf-py: pip install gguf.",
            path=info.file) from exc
    tid = GGML_TYPE_IDS[t]
    _, block, tsize = GGML_TYPES[tid]
    try:
        out = dequantize(raw.reshape(-1, info.shape[-1] // block * tsize), GGMLQuantizationType(tid))
    except (NotImplementedError, ValueError) as exc:
        raise IncompatibleCheckpointsError(
            f"tensor {info.name!r} in {info.file} is {t}, which this gguf-py cannot dequantize; upgrade gguf "
            f"(pip install -U gguf) or re-quantize the file.", path=info.file, tensor=info.name) from exc
    return out.reshape(shape)


def iter_row_blocks(info: GGUFTensorInfo, max_elements: int) -> Iterator[tuple[int, int]]:
    """Ranges of dim-0 slices holding at most ``max_elements`` values each."""
    rows = info.slices
    per = max(1, info.numel // max(1, rows))
    step = max(1, max_elements // per)
    for s in range(0, rows, step):
        yield s, min(rows, s + step)


# ------------------------------------------------------------------------------ writing

def tensor_nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    """Stored size of a tensor of ``shape`` (row-major) in ``ggml_type``."""
    _, block, size = GGML_TYPES[GGML_TYPE_IDS[ggml_type]]
    if shape and shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values do not fill whole {ggml_type} blocks of {block}")
    return math.prod(shape) // block * size


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, vtype: str) -> bytes:
    if vtype.startswith("array[") and vtype.endswith("]"):
        item = vtype[6:-1]
        head = struct.pack("<IQ", VALUE_TYPE_IDS[item], len(value))
        if item == "string":
            return head + b"".join(_encode_string(v) for v in value)
        fmt = _VALUE_TYPES[VALUE_TYPE_IDS[item]][1]
        return head + struct.pack(f"<{len(value)}{fmt[1]}", *value)
    if vtype == "string":
        return _encode_string(value)
    return struct.pack(_VALUE_TYPES[VALUE_TYPE_IDS[vtype]][1], value)


def encode_header(metadata: list[tuple[str, Any, str]], tensors: list[tuple[str, tuple[int, ...], str]],
                  alignment: int = DEFAULT_ALIGNMENT) -> tuple[bytes, list[int]]:
    """The header of a GGUF v3 file, padded to the data start, and each tensor's offset in
    the data area (each tensor aligned).

    Args:
        metadata: (key, value, value type) with value types as :func:`read_gguf` names them
            (``uint32``, ``float32``, ``string``, ``bool``, ``array[string]``...).
        tensors: (name, row-major shape, ggml type) in file order.
    """
    kv = [(k, v, t) for k, v, t in metadata]
    if alignment != DEFAULT_ALIGNMENT:
        kv.append(("general.alignment", alignment, "uint32"))
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv))]
    for key, value, vtype in kv:
        base = "array" if vtype.startswith("array[") else vtype
        parts += [_encode_string(key), struct.pack("<I", VALUE_TYPE_IDS[base]), _encode_value(value, vtype)]
    offsets, pos = [], 0
    for name, shape, gtype in tensors:
        dims = list(reversed(shape)) or [1]
        parts += [_encode_string(name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                  struct.pack("<IQ", GGML_TYPE_IDS[gtype], pos)]
        offsets.append(pos)
        pos += tensor_nbytes(shape, gtype)
        pos += (-pos) % alignment
    header = b"".join(parts)
    return header + b"\0" * ((-len(header)) % alignment), offsets
