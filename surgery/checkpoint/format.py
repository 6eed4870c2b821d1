"""The safetensors file format: dtype table, header parsing and validation.

Validation follows the order the reference Rust implementation uses: length prefix,
size cap, JSON, per-tensor dtype/shape/offsets with checked arithmetic, offsets inside
the data area and non-overlapping. Every violation raises CorruptCheckpointError naming
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


def parse_header(file: Path) -> Header:
    """Read and validate the header of one safetensors file.

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
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{file} has a header that is not valid JSON ({exc}).", path=file) from exc
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{file} has a header that is not a JSON object.", path=file)
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptCheckpointError(f"{file} has __metadata__ that is not a string-to-string map.", path=file)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        where = f"tensor {name!r} in {file}"
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{where} has a header entry that is not an object.", path=file, tensor=name)
        code = entry.get("dtype")
        if code not in DTYPES:
            raise CorruptCheckpointError(
                f"{where} has unknown dtype {code!r}; known: {', '.join(sorted(DTYPES))}.", path=file, tensor=name)
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CorruptCheckpointError(f"{where} has an invalid shape {shape!r}.", path=file, tensor=name)
        offs = entry.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
            raise CorruptCheckpointError(f"{where} has invalid data_offsets {offs!r}.", path=file, tensor=name)
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
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise CorruptCheckpointError(
                f"tensors {n0!r} and {n1!r} in {file} overlap (bytes {b0}-{e0} and {b1}-{e1}).", path=file, tensor=n1)
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
        obj["__metadata__"] = metadata
    for name, code, shape, begin, end in entries:
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    n = max(len(raw), min_size)
    n += (-(8 + n)) % 8
    raw = raw + b" " * (n - len(raw))
    return struct.pack("<Q", n) + raw
