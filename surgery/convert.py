"""``surgery convert``: pickled state dicts to safetensors (weights-only loading),
re-casting / re-sharding of safetensors checkpoints through the engine, GGUF files to
Hugging Face folders (dequantized tensor by tensor), and Llama checkpoints to GGUF."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint.reader import GGUF_SUFFIX, PICKLE_SUFFIXES, Checkpoint, open_checkpoint
from .core.engine import OutputTensor, WriteResult, cast_tensor, dtype_name, parse_dtype, write_checkpoint
from .core.formats import parse_json, read_json
from .core.errors import CheckpointNotFoundError, CorruptCheckpointError, InputError, UnsafeFormatError, UsageError
from .core.progress import Progress, ensure
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
            wm = read_json(idx, what="pickle index", error=CorruptCheckpointError).get("weight_map")
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise CorruptCheckpointError(f"{idx} is not a valid index: it needs a non-empty 'weight_map' object "
                                             f"mapping tensor names to shard file names.", path=idx)
            names = sorted(set(wm.values()))
            for n in names:
                if not n or "/" in n or "\\" in n or n in ("..", "."):
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


class _FileSource:
    """A stand-in donor/input for checkpoints that are not safetensors (pickles, GGUF): their
    files (hashed for the record), config and tokenizer files in ``root``, and what an
    output may not touch (``root`` too when the user named a folder)."""

    def __init__(self, root: Path, files: list[Path], label: str, guard_root: bool = True,
                 reads_reported: bool = False):
        self.root, self.files, self.label, self.guard_root = root, files, label, guard_root
        self.reads_reported = reads_reported  # GGUF's row reader reports its reads; torch.load does not
        self._digest = None

    def start_sha256(self, follow_reads: bool = True) -> None:
        Checkpoint.start_sha256(self, follow_reads=follow_reads and self.reads_reported)  # type: ignore[arg-type]

    def __getstate__(self) -> dict:
        """Travels to other processes (Ray tasks) without the input digest running here: its
        thread and queue belong to this process, which alone records the sha256."""
        return {**self.__dict__, "_digest": None}

    stop_sha256 = Checkpoint.stop_sha256
    sha256 = Checkpoint.sha256

    def donor_files(self) -> list[Path]:
        return Checkpoint.donor_files(self)  # type: ignore[arg-type]

    def input_paths(self) -> list[Path]:
        return list(self.files) + self.donor_files() + ([self.root] if self.guard_root else [])

    @property
    def config(self) -> dict | None:
        p = self.root / "config.json"
        return read_json(p, what="config.json", error=CorruptCheckpointError) if p.is_file() else None


FORMATS = ("safetensors", "gguf")


def is_gguf_file(path: Path) -> bool:
    """A local file that is GGUF (by suffix or by its magic bytes)."""
    from .checkpoint.gguf import is_gguf

    return path.is_file() and (path.suffix.lower() == GGUF_SUFFIX or is_gguf(path))


_LOADED: dict[Path, dict[str, torch.Tensor]] = {}


def _pickled_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor of a pickle file, for a task in another process: the file is loaded
    weights-only (memory-mapped where the format allows) once per process, the last one kept."""
    if file not in _LOADED:
        _LOADED.clear()
        _LOADED[file] = load_weights_only(file)
    return _LOADED[file][name]


def convert(source: str | Path, output: str | Path, *, dtype: str | None = None, shard_size: str = "5GB",
            force: bool = False, progress: Progress | None = None, to: str = "safetensors",
            quant: str | None = None, executor: Any = None) -> Result:
    """Convert a checkpoint: to safetensors (casting floating tensors to ``dtype`` and
    re-sharding), or with ``to="gguf"`` to one GGUF file.

    Args:
        source: A ``.bin``/``.pt`` file or folder (weights-only loading), a GGUF file
            (dequantized), or any safetensors checkpoint.
        output: Output folder (a ``.gguf`` file with ``to="gguf"``).
        dtype: Target dtype for floating tensors (None keeps each tensor's dtype; float32
            for a GGUF source).
        shard_size: Maximum shard size.
        force: Replace an existing output.
        to: ``safetensors`` or ``gguf``.
        quant: With ``to="gguf"``: ``f16`` (default), ``bf16``, ``q8_0`` or ``f32``.
        executor: Where the tensors are written (:mod:`surgery.core.executor`; None: here).
            Not for a GGUF output, which is one file written in order.

    Returns:
        A Result whose ``written`` is the new checkpoint (or GGUF file).
    """
    fmt = (to or "safetensors").lower()
    if fmt not in FORMATS:
        raise UsageError(f"`to` must be one of {', '.join(FORMATS)}, got {to!r}.")
    if fmt == "gguf":
        if dtype is not None or str(shard_size).upper() not in ("5GB", "5000000000"):
            raise UsageError("`dtype` and `shard_size` do not apply to a GGUF output; choose its types with `quant`.")
        if getattr(executor, "remote", False):
            raise UsageError("`ray` computes safetensors outputs; a GGUF output is one file written in order, on "
                             "this machine: drop `ray`.")
        return convert_to_gguf(source, output, quant=quant or "f16", force=force, progress=progress)
    if quant is not None:
        raise UsageError("`quant` applies only to a GGUF output (`to` gguf); use `dtype` for safetensors.")
    path = Path(source).expanduser()
    if is_gguf_file(path):
        return convert_from_gguf(path, output, dtype=dtype, shard_size=shard_size, force=force, progress=progress,
                                 label=str(source), executor=executor)
    target = parse_dtype(dtype)
    params: dict[str, Any] = {"dtype": dtype_name(target) if target else None, "shard_size": shard_size}
    pickles = _pickle_files(path) if path.exists() else None
    if pickles is None:
        ckpt = open_checkpoint(str(source))
        plan = [cast_tensor(ckpt, n, target) for n in ckpt.names]
        return Result({}, write_checkpoint(plan, output, donor=ckpt, operation="convert", parameters=params,
                                           inputs=[ckpt], input_roles=["source"], dtype=target,
                                           shard_size=shard_size, force=force, progress=progress,
                                           executor=executor))
    if not pickles:
        raise CheckpointNotFoundError(f"{source} holds no checkpoint to convert.", path=source)
    tensors: dict[str, torch.Tensor] = {}
    file_of: dict[str, Path] = {}
    for f in pickles:
        loaded = load_weights_only(f)
        tensors.update(loaded)
        file_of.update(dict.fromkeys(loaded, f))
    remote = getattr(executor, "remote", False)
    plan = []
    for name, t in sorted(tensors.items()):
        out_dtype = target if (target is not None and t.is_floating_point()) else t.dtype
        # another process cannot share this one's tensors: it loads the file itself
        compute = functools.partial(_pickled_tensor, file_of[name], name) if remote else (lambda t=t: t)
        plan.append(OutputTensor(name, tuple(t.shape), out_dtype, compute=compute, input_bytes=t.nbytes))
    if remote:
        del tensors, loaded
    root = path if path.is_dir() else path.parent
    src = _FileSource(root, pickles, str(source), guard_root=path.is_dir())  # a named file: its folder is not read
    return Result({}, write_checkpoint(plan, output, donor=src, operation="convert", parameters=params,  # type: ignore[list-item]
                                       inputs=[src], input_roles=["source"], dtype=target, shard_size=shard_size,
                                       force=force, progress=progress, executor=executor))


# ------------------------------------------------------------------------------ GGUF -> safetensors

def _quiet_transformers():
    """transformers' own warnings (unused GGUF keys...) silenced for the call; restored after."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)

    return ctx()


def _gguf_tensor(entry: Any, arch: str, cfg: dict, dtype: torch.dtype) -> OutputTensor:
    """One planned output tensor read from a GGUF tensor: dequantized in row blocks when its
    transform (if any) is elementwise and the shapes agree, else as a whole."""
    import numpy as np

    from .checkpoint.gguf import dequantize_rows

    info, tr = entry.source, entry.transform
    src_int = info.ggml_type in ("I8", "I16", "I32", "I64")
    out_dtype = torch.from_numpy(np.empty(0, dtype={"I8": np.int8, "I16": np.int16, "I32": np.int32,
                                                    "I64": np.int64}[info.ggml_type])).dtype if src_int else dtype

    def finish(arr):
        if tr is not None:
            arr = tr.fn(arr, info.name, cfg)
        return torch.from_numpy(np.ascontiguousarray(arr))

    if (tr is None or tr.elementwise) and len(info.shape) >= 2 and tuple(entry.shape) == tuple(info.shape):
        return OutputTensor(entry.hf_name, entry.shape, out_dtype, rows=lambda s, t: finish(dequantize_rows(info, s, t)))
    return OutputTensor(entry.hf_name, entry.shape, out_dtype,
                        compute=lambda: finish(dequantize_rows(info, 0, info.slices).reshape(info.shape))
                        .reshape(entry.shape))


def _gguf_tokenizer(path: Path, folder: Path, cfg: dict) -> str:
    """Save the tokenizer transformers builds from the GGUF (and a generation config) into
    ``folder``; returns what happened, for the report."""
    import transformers

    try:
        with _quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tok.save_pretrained(str(folder))
    except Exception as exc:  # the weights are still worth having; say why the tokenizer is not
        return f"not written: transformers could not build it ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    try:
        config = transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
        gen = transformers.GenerationConfig.from_model_config(config)
        if gen.to_diff_dict():
            gen.save_pretrained(str(folder))
    except Exception:
        pass  # generation defaults are optional
    return f"{type(tok).__name__} with {len(tok)} tokens"


def convert_from_gguf(path: Path, output: str | Path, *, dtype: str | None = None, shard_size: str = "5GB",
                      force: bool = False, progress: Progress | None = None, label: str | None = None,
                      executor: Any = None) -> Result:
    """A GGUF file as a Hugging Face folder: every tensor dequantized (any type gguf-py can
    dequantize), renamed and un-permuted as transformers' GGUF loader does, written through
    the engine one tensor (or row block) at a time; config and tokenizer from the metadata.

    Args:
        path: The GGUF file.
        output: Output folder.
        dtype: Output dtype of floating tensors (default float32, what the loader gives).

    Raises:
        CorruptCheckpointError: A malformed file; IncompatibleCheckpointsError: an
            architecture or tensor type that cannot be converted.
    """
    from .checkpoint.gguf import read_gguf
    from .checkpoint.gguf_hf import hf_config, read_plan
    from .core.output import check_output, scratch_dir

    label = label or str(path)
    target = parse_dtype(dtype) or torch.float32
    gf = read_gguf(path)
    check_output(output, force=force, inputs=[path], kind="folder")
    with _quiet_transformers():
        cfg = hf_config(gf)
    entries, dropped = read_plan(gf, cfg)
    arch = gf.architecture or ""
    src = _FileSource(path.parent, [path], label, guard_root=False, reads_reported=True)
    with scratch_dir(output) as scratch:
        (scratch / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        tokenizer = _gguf_tokenizer(path, scratch, cfg)
        donor = _FileSource(scratch, [], "GGUF metadata")
        plan = [_gguf_tensor(e, arch, cfg, target) for e in entries]
        params = {"from": "gguf", "dtype": dtype_name(target), "shard_size": shard_size}
        if isinstance(gf.get("tokenizer.ggml.pre"), str):  # transformers' tokenizer cannot say it; --to gguf reads it
            params["gguf_tokenizer_pre"] = gf.get("tokenizer.ggml.pre")
        written = write_checkpoint(plan, output, donor=donor, operation="convert", parameters=params,  # type: ignore[arg-type]
                                   inputs=[src], input_roles=["source"], dtype=target, shard_size=shard_size,  # type: ignore[list-item]
                                   force=force, progress=progress, executor=executor)
    types: dict[str, int] = {}
    for e in entries:
        types[e.source.ggml_type] = types.get(e.source.ggml_type, 0) + 1
    return Result({"source_format": "gguf", "architecture": arch, "model_type": cfg.get("model_type"),
                   "gguf_types": dict(sorted(types.items())), "dropped": dropped, "tokenizer": tokenizer}, written)


# ------------------------------------------------------------------------------ safetensors -> GGUF

def _gguf_bytes(t: torch.Tensor, ggml_type: str) -> bytes:
    """A float tensor (rows of whole blocks) encoded as ``ggml_type``."""
    if ggml_type == "F32":
        return t.to(torch.float32).contiguous().numpy().tobytes()
    if ggml_type == "F16":
        return t.to(torch.float16).contiguous().numpy().tobytes()
    if ggml_type == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(t.to(torch.float32).contiguous().numpy(), GGMLQuantizationType[ggml_type]).tobytes()


def _recorded_pre(ckpt: Checkpoint) -> str | None:
    """The llama.cpp pre-tokenizer name a folder converted from GGUF recorded, if any."""
    try:
        rec = parse_json(ckpt.metadata.get("surgery", "{}"), what="surgery record", expect=dict)
        pre = rec.get("parameters", {}).get("gguf_tokenizer_pre")
    except (InputError, AttributeError):
        return None
    return pre if isinstance(pre, str) else None


def convert_to_gguf(source: str | Path | Checkpoint, output: str | Path, *, quant: str = "f16", force: bool = False,
                    progress: Progress | None = None) -> Result:
    """A Llama checkpoint as one GGUF file for llama.cpp / Ollama: llama.cpp's tensor names,
    Q/K row permutation and metadata, the tokenizer as GGUF arrays, matrices in ``quant``
    (``f16``, ``bf16``, ``q8_0`` or ``f32``; vectors stay F32), streamed one row block at a
    time into a temporary file renamed into place. The provenance record (inputs' sha256,
    parameters) is stored under the ``surgery.record`` key.

    Raises:
        UsageError: Not a Llama checkpoint, unknown ``quant``.
        IncompatibleCheckpointsError: No usable tokenizer files beside the weights.
    """
    from .checkpoint.card import make_record
    from .checkpoint.gguf import encode_header
    from .checkpoint.gguf_hf import WRITE_QUANTS, llama_metadata, model_name, tokenizer_metadata, write_plan
    from .core.engine import row_ranges
    from .core.output import atomic_file, check_output

    quant = quant.lower()
    if quant not in WRITE_QUANTS:
        raise UsageError(f"`quant` must be one of {', '.join(WRITE_QUANTS)}, got {quant!r}.")
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(str(source))
    check_output(output, force=force, inputs=ckpt.input_paths(), kind="file")
    cfg = ckpt.config
    if cfg is None:
        raise UsageError(f"{ckpt.label} has no config.json; a GGUF file needs the architecture it describes.",
                         path=ckpt.root)
    plan, skipped = write_plan({n: ckpt.info(n).shape for n in ckpt.names}, cfg, quant, ckpt.label)
    for e in plan:
        if not ckpt.info(e.hf_name).is_floating_point:
            raise UsageError(f"tensor {e.hf_name!r} of {ckpt.label} is {ckpt.info(e.hf_name).dtype_name}; GGUF "
                             f"export takes floating tensors.", tensor=e.hf_name)
    metadata = [("general.architecture", "llama", "string"), ("general.type", "model", "string")]
    metadata += llama_metadata(cfg, model_name(ckpt.label), quant)
    metadata += tokenizer_metadata(ckpt.root, int(cfg["vocab_size"]), pre=_recorded_pre(ckpt))
    params = {"to": "gguf", "quant": quant}

    def record(sha: str) -> str:
        rec = make_record("convert", params, [{"role": "source", "label": ckpt.label, "sha256": sha}])
        return json.dumps(rec, sort_keys=True, default=str)

    tensors = [(e.gguf_name, e.shape, e.ggml_type) for e in plan]
    placeholder = metadata + [("surgery.record", record("0" * 64), "string")]
    header, offsets = encode_header(placeholder, tensors)
    from .checkpoint.gguf import tensor_nbytes

    total = sum(tensor_nbytes(e.shape, e.ggml_type) for e in plan)
    progress = ensure(progress)
    out = Path(output).expanduser()
    with atomic_file(out, force=force, inputs=ckpt.input_paths()) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            progress.start(total, f"writing {out.name}")
            try:
                ckpt.start_sha256()  # hashed from the reads below
                for e, off in zip(plan, offsets):
                    fh.seek(len(header) + off)
                    info = ckpt.info(e.hf_name)
                    if e.permute_heads is not None or len(info.shape) < 2:
                        t = ckpt.get(e.hf_name)
                        if e.permute_heads is not None:
                            from .checkpoint.gguf_hf import _forward_permute

                            t = _forward_permute(t, e.permute_heads)
                        fh.write(_gguf_bytes(t, e.ggml_type))
                    else:
                        cols = math.prod(info.shape[1:])
                        for s, t_ in row_ranges(0, info.shape[0], cols, 16 * 1024 * 1024):
                            fh.write(_gguf_bytes(ckpt.get_rows(e.hf_name, s, t_, dtype=torch.float32), e.ggml_type))
                    progress.advance(tensor_nbytes(e.shape, e.ggml_type))
                end = len(header) + (offsets[-1] + tensor_nbytes(plan[-1].shape, plan[-1].ggml_type) if plan else 0)
                fh.truncate(end)
                fh.flush()
                os.fdatasync(fh.fileno())  # the disk flush overlaps what is left of the input's hashing
                rec = record(ckpt.sha256())
                final, _ = encode_header(metadata + [("surgery.record", rec, "string")], tensors)
                assert len(final) == len(header)  # same-length sha256: the header is rewritten in place
                fh.seek(0)
                fh.write(final)
                fh.flush()
            finally:
                ckpt.stop_sha256()  # a failed write: stop hashing (a finished digest is kept)
                progress.close()
    written = WriteResult(out, [out], json.loads(rec), len(plan), total)
    return Result({"format": "gguf", "quant": quant, "skipped": skipped,
                   "gguf_types": {t: sum(1 for e in plan if e.ggml_type == t) for t in sorted({e.ggml_type for e in plan})}},
                  written)
