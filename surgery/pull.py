"""``surgery pull``: a Hub checkpoint's safetensors, config, tokenizer and generation files into
the Hugging Face cache (and a folder if asked), headers validated. No torch."""

from __future__ import annotations

import shutil
from pathlib import Path

from .core.errors import UsageError
from .core.progress import Progress
from .core.result import Result


def pull(spec: str, output: str | Path | None = None, *, revision: str | None = None,
         include: list[str] | None = None, exclude: list[str] | None = None, force: bool = False,
         progress: Progress | None = None) -> Result:
    """Download a Hub repository's checkpoint files.

    Args:
        spec: ``org/name`` or ``org/name@revision`` (``hf://`` prefix allowed).
        output: Also copy the files into this folder (atomically; refused if it exists
            unless ``force``).
        revision: Overrides one given with ``@``.
        include, exclude: Glob patterns (default: safetensors, index, config, generation
            and tokenizer files; pickles are never fetched).
        progress: Receives the bytes downloaded.

    Returns:
        A Result whose report lists the files, the commit and the cache folder; when the
        files include safetensors weights their headers were validated.

    Raises:
        UsageError: ``spec`` is not a repository id; the patterns select nothing.
        HubError: The repository, revision or a file cannot be had.
        CorruptCheckpointError: A downloaded safetensors header is invalid.
    """
    from .checkpoint.hub import looks_like_repo_id, pull_files
    from .checkpoint.reader import HUB_PREFIX, open_local

    text = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    if not looks_like_repo_id(text):
        raise UsageError(f"{spec} is not a Hub repository id; give org/name or org/name@revision.", path=spec)
    repo_id, _, rev = text.partition("@")
    report = pull_files(repo_id, revision or rev or None, include=include, exclude=exclude, progress=progress)
    snapshot = Path(report["snapshot"])
    names = [f["name"] for f in report["files"]]
    if any(n.endswith(".safetensors") for n in names) and ("model.safetensors" in names
                                                            or "model.safetensors.index.json" in names):
        ckpt = open_local(snapshot, label=spec)  # validates every header; reads no tensor
        report["num_tensors"] = len(ckpt.tensors)
        report["num_parameters"] = ckpt.num_parameters()
    if output is not None:
        from .core.output import atomic_output

        with atomic_output(Path(output), force=force, inputs=[snapshot]) as tmp:
            for name in names:
                dst = tmp / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(snapshot / name, dst)  # a copy, never a link into the cache
        report["output"] = str(Path(output).expanduser())
    return Result(report)
