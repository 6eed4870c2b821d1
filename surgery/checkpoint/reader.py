"""Lazy, validated access to a safetensors checkpoint (folder, file or sharded index).

Opening reads only headers. Tensor bytes are read with ``pread`` into a fresh buffer when
a tensor is asked for, and nothing is cached, so memory holds only what the caller keeps.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import (CheckpointNotFoundError, ConvertFirstError, CorruptCheckpointError, HubError,
                           UnsafeFormatError)
from ..core.formats import read_json
from .digest import InputDigest, file_sha256, files_sha256, hash_file, note_read  # noqa: F401 (re-exported)
from .format import Header, TensorInfo, parse_header

if TYPE_CHECKING:  # torch is imported when a tensor is first read, not to open a checkpoint
    import torch

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_SUFFIX = ".gguf"
# A spec ending in one of these names a local file, never a Hub repository.
LOCAL_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".json", GGUF_SUFFIX, ".h5", ".msgpack", ".onnx")
HUB_PREFIX = "hf://"
# Files copied from a donor checkpoint into an output folder.
DONOR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "spiece.model",
    "preprocessor_config.json",
)


def _gguf(path: Path) -> ConvertFirstError:
    return ConvertFirstError(
        f"{path} is a GGUF file, which only `surgery convert` and `surgery inspect` read; convert it first with "
        f"`surgery convert {path} -o DIR` (dequantizes it to a safetensors checkpoint).", path=path)


def _unsafe(path: Path) -> UnsafeFormatError:
    return UnsafeFormatError(
        f"{path} is a pickle-based checkpoint, which surgery never unpickles implicitly; "
        f"convert it first with `surgery convert {path} OUT` (weights-only loading).", path=path)


def read_into(info: TensorInfo, start: int, out) -> None:
    """Fill ``out`` (a uint8 CPU tensor, a numpy array or a bytearray) with the tensor's
    stored bytes from byte ``start`` on.

    Lets callers reuse one buffer across many reads (no page faults on fresh memory).
    """
    view = memoryview(out.numpy() if hasattr(out, "numpy") else out).cast("B")
    nbytes = len(view)
    if nbytes == 0:
        return
    offset = info.offset + start
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CorruptCheckpointError(
                    f"tensor {info.name!r} in {info.file} could not be read past byte {start + done}: the file is truncated.",
                    path=info.file, tensor=info.name)
            done += n
    except OSError as exc:
        raise CorruptCheckpointError(
            f"tensor {info.name!r} in {info.file} cannot be read: {exc.strerror or exc}.",
            path=info.file, tensor=info.name) from exc
    finally:
        os.close(fd)
    note_read(info.file, offset, offset + nbytes)  # the input's sha256 is hashed from these pages


def read_bytes(info: TensorInfo, start: int, nbytes: int) -> bytearray:
    """``nbytes`` of the tensor's stored bytes from byte ``start`` on (no torch needed)."""
    buf = bytearray(nbytes)
    read_into(info, start, buf)
    return buf


class Checkpoint:
    """A safetensors checkpoint opened lazily.

    Build one with :func:`open_checkpoint`. See docs/architecture.md for the API.
    """

    def __init__(self, root: Path, files: list[Path], headers: list[Header], label: str,
                 index: dict | None = None):
        self.root = root
        self.files = files
        self.label = label
        self.index = index
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for h in headers:
            self.metadata.update(h.metadata)
            for name, info in h.tensors.items():
                if name in self.tensors:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} appears in both {self.tensors[name].file.name} and {h.file.name} of {root}.",
                        path=h.file, tensor=name)
                self.tensors[name] = info
        if not self.tensors:
            raise CorruptCheckpointError(f"{label} holds no tensors; it is not a model checkpoint.", path=root)
        self.names = sorted(self.tensors)
        self._digest: InputDigest | None = None
        self._config: dict | None | bool = False

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.tensors)} tensors)"

    # ---- travelling to another process (a Ray task) -----------------------------------------

    def fingerprint(self) -> str:
        """sha256 of the header facts (names, shapes, dtypes, files, offsets); cached."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            import hashlib

            h = hashlib.sha256()
            for name in self.names:
                i = self.tensors[name]
                h.update(f"{name}\0{list(i.shape)}\0{i.st_dtype}\0{i.file.name}\0{i.offset}\0{i.nbytes}\n".encode())
            fp = self._fingerprint = h.hexdigest()
        return fp

    def __reduce__(self):
        """A checkpoint travels as its paths and header fingerprint, never as data: the other
        process re-reads the headers (once per process) and checks they are the ones planned."""
        return (_reopen, (self.label, str(self.root), [str(f) for f in self.files], self.index is not None,
                          self.fingerprint()))

    def info(self, name: str) -> TensorInfo:
        """Header facts of one tensor; KeyError-free: raises an InputError naming the checkpoint."""
        try:
            return self.tensors[name]
        except KeyError:
            from ..core.errors import IncompatibleCheckpointsError

            raise IncompatibleCheckpointsError(
                f"{self.label} has no tensor {name!r}.", path=self.root, tensor=name) from None

    @property
    def config(self) -> dict | None:
        """The parsed config.json next to the weights, or None."""
        if self._config is False:
            p = self.root / "config.json"
            if p.is_file():
                self._config = read_json(p, what="config.json", error=CorruptCheckpointError)
            else:
                self._config = None
        return self._config  # type: ignore[return-value]

    def donor_files(self) -> list[Path]:
        """Config and tokenizer files to copy into an output made from this checkpoint."""
        return [self.root / n for n in DONOR_FILES if (self.root / n).is_file()]

    def input_paths(self) -> list[Path]:
        """Everything reading this checkpoint touches: its weight files, index, config and
        tokenizer files, and its folder unless the user named a single file in it (then only
        that file and the config and tokenizer files beside it are read, so a sibling output
        such as ``out/gpt2`` for ``out/gpt2.bin`` is fine). An output may be none of these,
        contain none of them, and lie inside none of them."""
        paths = list(self.files) + self.donor_files()
        if self.index is not None:
            paths.append(self.root / INDEX_NAME)
        named = Path(self.label).expanduser()
        if not named.is_file():
            paths.append(self.root)
        return paths

    # ---- reading -------------------------------------------------------------------------

    def _read_into(self, info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor:
        import torch

        buf = torch.empty(nbytes, dtype=torch.uint8)
        read_into(info, offset - info.offset, buf)
        return buf

    def get_raw(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, as a fresh CPU tensor."""
        info = self.info(name)
        buf = self._read_into(info, info.offset, info.nbytes)
        return buf.view(info.dtype).reshape(info.shape)

    def get(self, name: str, dtype: torch.dtype | None | str = "float32",
            device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor upcast to ``dtype`` (float32 by default; None keeps the stored dtype) on ``device``."""
        t = self.get_raw(name)
        if isinstance(dtype, str):
            import torch

            dtype = getattr(torch, dtype)
        if dtype is not None and (t.is_floating_point() or dtype.is_floating_point is False):
            t = t.to(dtype)
        return t.to(device) if str(device) != "cpu" else t

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0, read without touching the rest of the tensor."""
        info = self.info(name)
        if not info.shape:
            raise ValueError(f"get_rows needs a tensor with at least one dimension; {name!r} is a scalar")
        stop = min(stop, info.shape[0])
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        buf = self._read_into(info, info.offset + start * row_bytes, (stop - start) * row_bytes)
        t = buf.view(info.dtype).reshape((stop - start, *info.shape[1:]))
        if dtype is not None:
            t = t.to(dtype)
        return t.to(device) if str(device) != "cpu" else t

    def num_parameters(self) -> int:
        """Element count over all tensors (each stored tensor counted once)."""
        return sum(i.numel for i in self.tensors.values())

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    # ---- identity ------------------------------------------------------------------------

    def start_sha256(self, follow_reads: bool = True) -> None:
        """Start hashing the files on a background thread (hashlib releases the GIL).

        Args:
            follow_reads: Hash the bytes this process reads anyway, as they are read (see
                :mod:`surgery.checkpoint.digest`), so a file is read once; False when the
                tensors are read in other processes: then the files are hashed at once.
        """
        if self._digest is None:
            self._digest = InputDigest(self.files, follow_reads=follow_reads)

    def stop_sha256(self) -> None:
        """Stop a hash :meth:`start_sha256` started (the operation failed; no digest needed)."""
        if self._digest is not None and not self._digest.done:
            self._digest.cancel()
            self._digest = None

    def sha256(self) -> str:
        """Identity of the checkpoint: the sha256 of its single safetensors file (what
        ``sha256sum`` and the Hub's LFS pointer show), or for shards the sha256 of the
        ``sha256sum``-format manifest of its files. Cached; see :func:`file_sha256`."""
        if self._digest is None:
            self._digest = InputDigest(self.files, follow_reads=False)
        return self._digest.result()

    def tensor_sha256(self, name: str) -> str:
        """sha256 of one tensor's stored bytes."""
        import hashlib

        info = self.info(name)
        return hashlib.sha256(read_bytes(info, 0, info.nbytes)).hexdigest()


def _open_index(root: Path, index_path: Path, label: str) -> Checkpoint:
    index = read_json(index_path, what="safetensors index", error=CorruptCheckpointError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index_path} is not a valid safetensors index: it has no 'weight_map' object "
                                     f"mapping tensor names to shard files.", path=index_path)
    if not weight_map:
        raise CorruptCheckpointError(f"{index_path} has an empty 'weight_map': it names no tensors, so it is not a "
                                     f"model; regenerate the index.", path=index_path)
    shard_names: list[str] = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise CorruptCheckpointError(
                f"{index_path} maps tensor {tensor!r} to {shard!r}, outside the checkpoint folder; shard names must be plain file names.",
                path=index_path, tensor=tensor)
        if shard not in shard_names:
            shard_names.append(shard)
    files = [root / s for s in sorted(shard_names)]
    for f in files:
        if not f.is_file():
            raise CorruptCheckpointError(f"{index_path} names shard {f.name}, which is missing from {root}.", path=f)
    headers = [parse_header(f) for f in files]
    ckpt = Checkpoint(root, files, headers, label, index=index)
    for tensor, shard in weight_map.items():
        info = ckpt.tensors.get(tensor)
        if info is None or info.file.name != shard:
            raise CorruptCheckpointError(
                f"{index_path} maps tensor {tensor!r} to {shard}, but that shard does not hold it.",
                path=index_path, tensor=tensor)
    extra = set(ckpt.tensors) - set(weight_map)
    if extra:
        name = sorted(extra)[0]
        raise CorruptCheckpointError(
            f"{ckpt.tensors[name].file} holds tensor {name!r}, which {index_path.name} does not list.",
            path=ckpt.tensors[name].file, tensor=name)
    return ckpt


_REOPENED: dict[tuple, Checkpoint] = {}


def _reopen(label: str, root: str, files: list[str], sharded: bool, fingerprint: str) -> Checkpoint:
    """A pickled :class:`Checkpoint` in another process (a Ray worker): the same files' headers,
    parsed once per process. On a node without those paths, a Hub checkpoint is resolved again
    from that node's Hugging Face cache at the same commit."""
    key = (label, root, tuple(files), sharded, fingerprint)
    ckpt = _REOPENED.get(key)
    if ckpt is not None:
        return ckpt
    root_p, paths = Path(root), [Path(f) for f in files]
    missing = next((f for f in paths if not f.is_file()), None)
    if missing is not None:
        from .hub import looks_like_repo_id, pull

        commit = root_p.name if root_p.parent.name == "snapshots" else None
        if commit is None or not looks_like_repo_id(label):
            import socket

            raise CheckpointNotFoundError(
                f"{missing} is not on node {socket.gethostname()}; put the checkpoint on storage every node mounts "
                f"at the same path, or give it as a Hub id so each node reads its own cache.", path=missing)
        local = pull(label.partition("@")[0], revision=commit)
        paths = [local / f.relative_to(root_p) for f in paths]
        root_p = local
    ckpt = Checkpoint(root_p, paths, [parse_header(f) for f in paths], label, index={} if sharded else None)
    if ckpt.fingerprint() != fingerprint:
        raise CorruptCheckpointError(
            f"{label} changed since this run was planned (its headers differ); run the command again.", path=root_p)
    if len(_REOPENED) >= 64:
        _REOPENED.pop(next(iter(_REOPENED)))
    _REOPENED[key] = ckpt
    return ckpt


def open_local(path: Path, label: str | None = None) -> Checkpoint:
    """Open a local folder, ``.safetensors`` file or index JSON."""
    label = label or str(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _unsafe(path)
        if path.suffix.lower() == GGUF_SUFFIX or _is_gguf(path):
            raise _gguf(path)
        if path.name.endswith(".index.json"):
            return _open_index(path.parent, path, label)
        return Checkpoint(path.parent, [path], [parse_header(path)], label)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            return _open_index(path, index, label)
        single = path / "model.safetensors"
        if single.is_file():
            return Checkpoint(path, [single], [parse_header(single)], label)
        others = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(others) == 1:
            return Checkpoint(path, others, [parse_header(others[0])], label)
        if len(others) > 1:
            raise CorruptCheckpointError(
                f"{path} holds {len(others)} .safetensors files but no {INDEX_NAME} saying how they form one model; "
                f"name one file instead.", path=path)
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _unsafe(pickles[0])
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
        if ggufs:
            raise _gguf(ggufs[0])
        raise CheckpointNotFoundError(f"{path} holds no safetensors checkpoint (no model.safetensors or {INDEX_NAME}).", path=path)
    raise CheckpointNotFoundError(f"{path} does not exist (no such file or folder).", path=path)


def _is_gguf(path: Path) -> bool:
    from .gguf import is_gguf

    return is_gguf(path)


def hub_spec(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` names a Hub repository rather than a local path.

    A spec is local when it exists, when it ends in a file suffix (``.bin``, ``.gguf``,
    ``.safetensors``...), or when its first component is an existing folder here
    (``llama-tiny/base`` with ``llama-tiny/`` present): such a spec that does not exist is
    "no such file", never a Hub lookup. ``hf://org/name`` always means the Hub.
    """
    from .hub import looks_like_repo_id

    forced = text.startswith(HUB_PREFIX)
    spec = text[len(HUB_PREFIX):] if forced else text
    if not looks_like_repo_id(spec):
        return None
    if not forced:
        name = spec.partition("@")[0]
        if Path(name).suffix.lower() in LOCAL_SUFFIXES or Path(name.split("/", 1)[0]).expanduser().is_dir():
            return None
    repo_id, _, rev = spec.partition("@")
    return repo_id, rev or None


def open_checkpoint(spec: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint from a folder, a file, an index JSON or a Hub id ``org/name[@rev]``.

    Args:
        spec: Local path, or a Hugging Face Hub repository id with an optional ``@revision``.
        revision: Hub revision; overrides one given with ``@``.

    Returns:
        The opened checkpoint (headers validated, no tensor data read).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeFormatError, HubError.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists() and not text.startswith(HUB_PREFIX):
        return open_local(path, label=text)
    hub = hub_spec(text)
    if hub is None:
        if "/" in text.rstrip("/") or path.suffix:
            raise CheckpointNotFoundError(f"{text} does not exist (no such file or folder).", path=text)
        raise CheckpointNotFoundError(
            f"{text} does not exist (no such file or folder; a Hub repository id has the form org/name[@revision]).", path=text)
    from .hub import pull

    repo_id, rev = hub
    try:
        local = pull(repo_id, revision=revision or rev)
    except HubError as exc:
        raise HubError(f"{text} is not a local path, and as a Hub repository id: {exc}", path=text) from exc
    return open_local(local, label=text)


def matrix_like(info: TensorInfo) -> bool:
    """True for floating 2-D tensors (weight matrices and embeddings)."""
    return info.ndim == 2 and info.dtype.is_floating_point and math.prod(info.shape) > 0
