"""``surgery convert``: pickled state dicts to safetensors (weights-only loading), and
re-casting / re-sharding of safetensors checkpoints through the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint.reader import PICKLE_SUFFIXES, Checkpoint, files_sha256, open_checkpoint
from .core.engine import OutputTensor, cast_tensor, dtype_name, parse_dtype, write_checkpoint
from .core.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeFormatError
from .core.progress import Progress
from .core.result import Result

PICKLE_INDEX = "pytorch_model.bin.index.json"


def _pickle_files(path: Path) -> list[Path] | None:
    """The pickle files that make up ``path``, or None when it is a safetensors checkpoint."""
    if path.is_file():
        return [path] if path.suffix in PICKLE_SUFFIXES else None
    if path.is_dir():
        if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
            return None
        idx = path / PICKLE_INDEX
        if idx.is_file():
            wm = json.loads(idx.read_text())["weight_map"]
            names = sorted(set(wm.values()))
            for n in names:
                if "/" in n or "\\" in n or n in ("..", "."):
                    raise CorruptCheckpointError(f"{idx} names shard {n!r} outside the folder.", path=idx)
            return [path / n for n in names]
        found = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        return found or None
    return None


def load_weights_only(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict with ``torch.load(weights_only=True)``: no code runs."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise UnsafeFormatError(
            f"{file} could not be loaded weights-only ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"it may contain code, which surgery refuses to run.", path=file) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{file} does not hold a flat state dict of tensors.", path=file)
    return obj


class _PickleSource:
    """A stand-in donor/input for pickle checkpoints (config and tokenizer files, sha256)."""

    def __init__(self, root: Path, files: list[Path], label: str):
        self.root, self.files, self.label = root, files, label

    def start_sha256(self) -> None:
        pass

    def sha256(self) -> str:
        return files_sha256(self.files)

    def donor_files(self) -> list[Path]:
        return Checkpoint.donor_files(self)  # type: ignore[arg-type]

    def input_paths(self) -> list[Path]:
        return list(self.files) + self.donor_files() + [self.root]

    @property
    def config(self) -> dict | None:
        p = self.root / "config.json"
        return json.loads(p.read_text()) if p.is_file() else None


def convert(source: str | Path, output: str | Path, *, dtype: str | None = None, shard_size: str = "5GB",
            force: bool = False, progress: Progress | None = None) -> Result:
    """Convert a checkpoint to safetensors, casting floating tensors to ``dtype`` and re-sharding.

    Args:
        source: A ``.bin``/``.pt`` file or folder (weights-only loading), or any safetensors checkpoint.
        output: Output folder.
        dtype: Target dtype for floating tensors (None keeps each tensor's dtype).
        shard_size: Maximum shard size.
        force: Replace an existing output.

    Returns:
        A Result whose ``written`` is the new checkpoint.
    """
    target = parse_dtype(dtype)
    path = Path(source).expanduser()
    params: dict[str, Any] = {"dtype": dtype_name(target) if target else None, "shard_size": shard_size}
    pickles = _pickle_files(path) if path.exists() else None
    if pickles is None:
        ckpt = open_checkpoint(str(source))
        plan = [cast_tensor(ckpt, n, target) for n in ckpt.names]
        return Result({}, write_checkpoint(plan, output, donor=ckpt, operation="convert", parameters=params,
                                           inputs=[ckpt], input_roles=["source"], dtype=target,
                                           shard_size=shard_size, force=force, progress=progress))
    if not pickles:
        raise CheckpointNotFoundError(f"{source} holds no checkpoint to convert.", path=source)
    tensors: dict[str, torch.Tensor] = {}
    for f in pickles:
        tensors.update(load_weights_only(f))
    plan = []
    for name, t in sorted(tensors.items()):
        out_dtype = target if (target is not None and t.is_floating_point()) else t.dtype
        plan.append(OutputTensor(name, tuple(t.shape), out_dtype, compute=(lambda t=t: t)))
    root = path if path.is_dir() else path.parent
    src = _PickleSource(root, pickles, str(source))
    return Result({}, write_checkpoint(plan, output, donor=src, operation="convert", parameters=params,  # type: ignore[list-item]
                                       inputs=[src], input_roles=["source"], dtype=target, shard_size=shard_size,
                                       force=force, progress=progress))
