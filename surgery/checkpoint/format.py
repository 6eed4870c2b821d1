"""The safetensors file format: dtype table, header parsing and validation.

Validation follows the order the reference Rust implementation uses and is at least as
strict: length prefix, size cap, UTF-8 JSON, per-tensor dtype/shape/offsets, shape × dtype
size equal to the span, and the spans tiling the data section exactly. Every violation raises CorruptCheckpointError naming
the file and, where it applies, the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..core.errors import CorruptCheckpointError
from ..core.formats import check_text, text_safe

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element). Reading and validating a
# header needs only the sizes, so commands that do no tensor math never import torch.
DTYPE_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
}


class _TorchDtypes(Mapping):
    """code -> (torch dtype, bytes per element), the torch half built on first value access."""

    _table: dict | None = None

    def _load(self) -> dict:
        if self._table is None:
            import torch

            type(self)._table = {code: (getattr(torch, name), size) for code, (name, size) in DTYPE_TABLE.items()
                                 if hasattr(torch, name)}
        return self._table

    def __getitem__(self, code: str) -> tuple[torch.dtype, int]:
        return self._load()[code]

    def __contains__(self, code: object) -> bool:
        return code in DTYPE_TABLE

    def __iter__(self) -> Iterator[str]:
        return iter(DTYPE_TABLE)

    def __len__(self) -> int:
        return len(DTYPE_TABLE)


DTYPES: Mapping[str, tuple[torch.dtype, int]] = _TorchDtypes()


def __getattr__(name: str) -> Any:
    if name == "TORCH_TO_CODE":  # torch dtype -> code; imports torch
        return {v[0]: k for k, v in DTYPES._load().items()}  # type: ignore[attr-defined]
    raise AttributeError(name)


# A header larger than this is refused before it is read (the reference uses 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Our limits beyond the reference's: no real tensor comes near them, and bounding every
# dimension keeps every loop over rows short even for zero-element tensors.
MAX_NDIM = 32
MAX_DIM = 2**40


def _no_constant(token: str) -> object:
    raise ValueError(f"{token} is not valid JSON")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the header alone.

    Attributes:
        name: Tensor name as stored.
        shape: Shape.
        st_dtype: safetensors dtype code ("BF16", ...); ``dtype`` is the torch dtype.
        nbytes: Byte length.
        file: The safetensors file holding it.
        offset: Absolute byte offset of its data in ``file``.
    """

    name: str
    shape: tuple[int, ...]
    st_dtype: str
    nbytes: int
    file: Path
    offset: int

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        try:
            return DTYPES[self.st_dtype][0]
        except KeyError:
            raise CorruptCheckpointError(
                f"tensor {self.name!r} in {self.file} is {self.st_dtype}, which this torch build cannot hold; "
                f"upgrade torch.", path=self.file, tensor=self.name) from None

    @property
    def dtype_name(self) -> str:
        """The dtype's name (``bfloat16``), without importing torch."""
        return DTYPE_TABLE[self.st_dtype][0]

    @property
    def is_floating_point(self) -> bool:
        return self.st_dtype.startswith(("F", "BF"))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    file: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _pairs_no_duplicates(file: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise CorruptCheckpointError(
                    f"{file} has a header that names {k!r} twice; the file is ambiguous (rewrite it with one entry per "
                    f"name).", path=file, tensor=k if isinstance(k, str) else None)
            out[k] = v
        return out
    return hook


def _nonneg_int(x: object, limit: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= limit


def parse_header(file: Path) -> Header:
    """Read and validate the header of one safetensors file.

    Checks, in the reference implementation's order and at least as strictly: the length
    prefix, the size cap, UTF-8 and JSON (no duplicate names, no NaN tokens, no lone
    surrogates), ``__metadata__`` a string-to-string map, each entry's dtype, shape and
    offsets (integers within our limits: at most :data:`MAX_NDIM` dimensions of at most
    :data:`MAX_DIM` each), shape × dtype size equal to the span, and the spans, sorted by
    offset, tiling the data section exactly: starting at 0, no gap, no overlap (also behind
    zero-length tensors), ending at the end of the file.

    Args:
        file: Path of a ``.safetensors`` file.

    Returns:
        The validated header.

    Raises:
        CorruptCheckpointError: On any violation of the format.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(
                    f"{file} is not a safetensors file: it has {size} bytes, fewer than the 8-byte header length.",
                    path=file)
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > MAX_HEADER_BYTES:
                raise CorruptCheckpointError(
                    f"{file} declares a {hlen}-byte header, above the {MAX_HEADER_BYTES}-byte limit: the file is corrupt or not safetensors.",
                    path=file)
            if 8 + hlen > size:
                raise CorruptCheckpointError(
                    f"{file} declares a {hlen}-byte header but the file has only {size} bytes: it is truncated or not safetensors.",
                    path=file)
            raw = fh.read(hlen)
    except OSError as exc:
        raise CorruptCheckpointError(f"{file} cannot be read: {exc.strerror or exc}.", path=file) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{file} has a header that is not UTF-8 (invalid byte at offset {8 + exc.start}).",
                                     path=file) from None
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_no_duplicates(file), parse_constant=_no_constant)
    except RecursionError:
        raise CorruptCheckpointError(f"{file} has a header nested too deeply to be safetensors.", path=file) from None
    except ValueError as exc:
        if isinstance(exc, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{file} has a header that is not valid JSON ({exc}).", path=file) from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{file} has a header that is not a JSON object.", path=file)
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptCheckpointError(f"{file} has __metadata__ that is not a string-to-string map.", path=file)
    for k, v in metadata.items():
        check_text(k, path=file, what="safetensors file", error=CorruptCheckpointError)
        check_text(v, path=file, what="safetensors file", error=CorruptCheckpointError)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        check_text(name, path=file, what="safetensors file", error=CorruptCheckpointError)
        where = f"tensor {name!r} in {file}"
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{where} has a header entry that is not an object.", path=file, tensor=name)
        code = entry.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            shown = code if isinstance(code, str) else json.dumps(code)[:40]
            raise CorruptCheckpointError(
                f"{where} has unknown dtype {shown if not isinstance(code, str) else repr(code)}; known: {', '.join(sorted(DTYPES))}.", path=file, tensor=name)
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_nonneg_int(d, 2**64 - 1) for d in shape):
            raise CorruptCheckpointError(f"{where} has an invalid shape {str(shape)[:80]}.", path=file, tensor=name)
        if len(shape) > MAX_NDIM or any(d > MAX_DIM for d in shape):
            raise CorruptCheckpointError(
                f"{where} has shape {str(shape)[:80]}, beyond surgery's limits ({MAX_NDIM} dimensions of at most "
                f"{MAX_DIM} each); no real tensor is that large, so the header is corrupt.", path=file, tensor=name)
        offs = entry.get("data_offsets")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_nonneg_int(o, 2**64 - 1) for o in offs):
            raise CorruptCheckpointError(f"{where} has invalid data_offsets {str(offs)[:80]}.", path=file, tensor=name)
        begin, end = offs
        if begin > end:
            raise CorruptCheckpointError(f"{where} has data_offsets {offs} that end before they begin.", path=file, tensor=name)
        itemsize = DTYPE_TABLE[code][1]
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise CorruptCheckpointError(
                f"{where} spans {end - begin} bytes but shape {shape} of {code} needs {expected}.", path=file, tensor=name)
        if end > data_len:
            raise CorruptCheckpointError(
                f"{where} ends at byte {end} of the data area, past its end at {data_len}: the file is truncated.",
                path=file, tensor=name)
        tensors[name] = TensorInfo(name, tuple(shape), code, expected, file, data_start + begin)
        spans.append((begin, end, name))
    # The spans, in offset order, must tile the data section exactly (as the reference
    # checks): each starts where the previous ended, the first at 0, the last at the end.
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin != pos:
            if begin > pos:
                what = (f"leaves bytes {pos}-{begin} of the data area unused before tensor {name!r}" if prev is None else
                        f"leaves a gap (bytes {pos}-{begin}) between tensors {prev!r} and {name!r}")
            else:
                what = f"has tensors {prev!r} and {name!r} overlapping (tensor {name!r} starts at byte {begin}, before {pos})"
            raise CorruptCheckpointError(f"{file} {what}; safetensors requires contiguous tensors.", path=file, tensor=name)
        pos, prev = end, name
    if pos != data_len:
        raise CorruptCheckpointError(
            f"{file} has {data_len - pos} trailing bytes after its last tensor (data ends at byte {pos} of {data_len}); "
            f"the file is corrupt or was appended to.", path=file)
    return Header(file, tensors, metadata, data_start, size)


def build_header(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str],
                 min_size: int = 0) -> bytes:
    """Serialise a header: ``entries`` are (name, dtype code, shape, begin, end).

    The JSON is padded with spaces so the data starts 8-byte aligned and the header is at
    least ``min_size`` bytes (room to rewrite the metadata later without moving data).

    Returns:
        The 8-byte length prefix followed by the padded JSON.
    """
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = text_safe(metadata)   # a path with non-UTF-8 bytes in a record
    for name, code, shape, begin, end in entries:
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    n = max(len(raw), min_size)
    n += (-(8 + n)) % 8
    raw = raw + b" " * (n - len(raw))
    return struct.pack("<Q", n) + raw
