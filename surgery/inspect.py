"""What is in a checkpoint: tensors, parameter count, shards, metadata (headers only)."""

from __future__ import annotations

from typing import Any

from .checkpoint.format import TensorInfo
from .core.errors import InputError
from .core.formats import parse_json
from .checkpoint.reader import Checkpoint
from .core.result import Result

# Output heads that share storage with the input embedding when embeddings are tied.
TIED_PAIRS = [("lm_head.weight", "model.embed_tokens.weight"), ("lm_head.weight", "transformer.wte.weight"),
              ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")]


def tied_duplicates(ckpt: Checkpoint) -> list[str]:
    """Names stored twice only because embeddings are tied (counted once in the parameter count)."""
    cfg = ckpt.config or {}
    if not cfg.get("tie_word_embeddings", True if cfg else False):
        return []
    out = []
    for head, emb in TIED_PAIRS:
        if head in ckpt and emb in ckpt and ckpt.info(head).shape == ckpt.info(emb).shape:
            out.append(head)
    return out


def _tensor_row(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "shape": list(info.shape), "dtype": info.dtype_name,
            "bytes": info.nbytes, "file": info.file.name}


def inspect_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """Summarise a checkpoint from its headers.

    Returns:
        ``tensors`` (name, shape, dtype, bytes, file), ``num_parameters`` (tied heads counted
        once), ``num_tensors``, ``total_bytes``, ``dtypes`` (bytes per dtype), ``shards``
        (file name and size), ``metadata`` (``surgery`` record decoded), ``config`` summary.
    """
    tied = set(tied_duplicates(ckpt))
    params = sum(i.numel for n, i in ckpt.tensors.items() if n not in tied)
    dtypes: dict[str, int] = {}
    for i in ckpt.tensors.values():
        dtypes[i.dtype_name] = dtypes.get(i.dtype_name, 0) + i.nbytes
    metadata: dict[str, Any] = dict(ckpt.metadata)
    if "surgery" in metadata:
        try:
            metadata["surgery"] = parse_json(metadata["surgery"], what="surgery record")
        except InputError:
            pass
    cfg = ckpt.config or {}
    return {
        "checkpoint": ckpt.label,
        "format": "safetensors",
        "root": str(ckpt.root),
        "num_tensors": len(ckpt.tensors),
        "num_parameters": params,
        "tied_duplicates": sorted(tied),
        "total_bytes": ckpt.total_bytes(),
        "dtypes": dtypes,
        "shards": [{"file": f.name, "bytes": f.stat().st_size} for f in ckpt.files],
        "metadata": metadata,
        "config": {k: cfg[k] for k in ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                                       "vocab_size", "n_embd", "n_layer") if k in cfg},
        "tensors": [_tensor_row(ckpt.tensors[n]) for n in ckpt.names],
    }


def inspect(location: str | Checkpoint) -> Result:
    """``surgery inspect``: what is in a checkpoint, from its headers alone.

    A safetensors checkpoint (folder, file, index or Hub id) gives :func:`inspect_checkpoint`;
    a GGUF file gives its metadata and tensor table (architecture, quantization types,
    parameter count; :func:`surgery.checkpoint.gguf.summarize`); a Hub id is read over
    HTTP range requests, headers only, no weights downloaded (from the cache when
    ``HF_HUB_OFFLINE`` is set).
    """
    from pathlib import Path

    from .checkpoint.reader import HUB_PREFIX, hub_spec, open_checkpoint

    if not isinstance(location, Checkpoint):
        text = str(location)
        path = Path(text).expanduser()
        if path.is_file() and (path.suffix.lower() == ".gguf" or _is_gguf(path)):
            from .checkpoint.gguf import read_gguf, summarize

            return Result(summarize(read_gguf(path)))
        hub = None if path.exists() and not text.startswith(HUB_PREFIX) else hub_spec(text)
        if hub is not None:
            from .checkpoint.hub import offline

            if not offline():
                return Result(inspect_hub(text, *hub))
    ckpt = location if isinstance(location, Checkpoint) else open_checkpoint(location)
    return Result(inspect_checkpoint(ckpt))


def inspect_hub(label: str, repo_id: str, revision: str | None) -> dict[str, Any]:
    """:func:`inspect_checkpoint` of a Hub checkpoint from its safetensors headers, fetched
    with HTTP range requests (see :func:`surgery.checkpoint.hub.fetch_headers`): no tensor
    data is downloaded, and the headers go through the same validation as local files."""
    import tempfile
    from pathlib import Path

    from .checkpoint.hub import fetch_headers
    from .checkpoint.reader import open_local
    from .core.errors import SurgeryError
    from .core.output import scratch_dir

    with scratch_dir(Path(tempfile.gettempdir()) / "surgery-hub-headers") as folder:
        try:
            facts = fetch_headers(repo_id, revision, folder)
            report = inspect_checkpoint(open_local(folder, label=label))
        except SurgeryError as exc:  # name the remote file, not the local mirror
            exc.message = str(exc).replace(f"{folder}/", f"{repo_id}/").replace(str(folder), repo_id)
            exc.args = (exc.message,)
            if exc.path is not None:
                exc.path = exc.path.replace(str(folder), repo_id)
            raise
    report.update(root=f"hf://{repo_id}@{facts['revision']}", source="hub", revision=facts["revision"],
                  header_bytes=facts["header_bytes"])
    return report


def _is_gguf(path) -> bool:
    from .checkpoint.gguf import is_gguf

    return is_gguf(path)
