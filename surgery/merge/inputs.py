"""The models a merge reads, opened once each from their headers: local checkpoints, Hub ids
(``org/name@revision``) and ``model+lora`` references, whose adapter is fused one tensor at a
time when a tensor is read (surgery/fuse), never as a whole model.

A Hub model is planned from its config, tokenizer files and safetensors headers alone (HTTP
range requests: :func:`surgery.checkpoint.hub.fetch_headers`); its weights are downloaded by
:meth:`Inputs.materialize`, at the revision the headers came from, only after the whole
merge has been validated. With ``HF_HUB_OFFLINE`` the cached snapshot is used as it is.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint, hub_spec, open_checkpoint, open_local
from ..core.errors import HubError, InputError
from .recipe import ModelRef


# Small files fetched whole for a Hub model before planning (config and tokenizer).
SMALL_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
                  "merges.txt", "chat_template.jinja", "chat_template.json", "spiece.model"]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]


def _hub(text: str) -> tuple[str, str | None] | None:
    """(repo, revision) when ``text`` is a Hub id rather than a local path."""
    return None if Path(text).expanduser().exists() else hub_spec(text)


def _snapshot(repo: str, revision: str | None, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    from ..checkpoint.hub import _hub_error, _quiet_hub

    try:
        with _quiet_hub():
            return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot have it"
        raise _hub_error(f"{what} could not be fetched", repo, revision, exc) from exc


def adapter_folder(text: str) -> str:
    """A local adapter folder for ``text`` (a folder, or a Hub id whose adapter files are fetched)."""
    hub = _hub(text)
    if hub is None:
        return text
    return str(_snapshot(hub[0], hub[1], ADAPTER_PATTERNS, "adapter"))


@dataclasses.dataclass(frozen=True)
class FusedInfo:
    """Header facts of a tensor an adapter changes (it has no stored bytes)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


class FusedCheckpoint:
    """A checkpoint with adapters fused on read (mergekit's ``model+lora``), with the reading
    interface of :class:`~surgery.checkpoint.reader.Checkpoint`.

    A tensor an adapter changes is computed whole in float32 when first read and rounded to the
    base tensor's stored dtype, as a merged-and-saved model would hold it; the last one is kept
    so a row-block reader computes it once. Every other tensor is read from the base.
    """

    def __init__(self, base: Checkpoint, adapter: str, device: str = "cpu"):
        from ..fuse.run import plan_fusion

        self.base = base
        self.fusion = plan_fusion(base, [adapter_folder(adapter)], device)
        self.device = device
        self.label = f"{base.label}+{adapter}"
        self.root = base.root
        self.metadata = base.metadata
        self.tensors: dict[str, Any] = dict(base.tensors)
        for name in list(self.fusion.steps) + list(self.fusion.new_from):
            start = self.fusion.start(name)
            dtype = base.info(start).dtype if start else torch.float32
            self.tensors[name] = FusedInfo(name, self.fusion.shape(name), dtype)
        self.names = sorted(self.tensors)
        self._cached: tuple[str, torch.Tensor] | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> Any:
        return self.tensors[name] if name in self.tensors else self.base.info(name)

    @property
    def config(self) -> dict | None:
        cfg = self.base.config
        if cfg is not None and self.fusion.untied:
            cfg = {**cfg, "tie_word_embeddings": False}
        return cfg

    def changed(self, name: str) -> bool:
        """True when an adapter changes tensor ``name`` (its bytes are not the base's)."""
        return name in self.fusion.steps or name in self.fusion.new_from

    def _fused(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None
            fused = self.fusion.compute(name, self.device).to(self.tensors[name].dtype)
            self._cached = (name, fused)
        return self._cached[1]

    def get(self, name: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        if not self.changed(name):
            return self.base.get(name, dtype=dtype, device=device)
        t = self._fused(name)
        return t.to(device=device, dtype=dtype or t.dtype, copy=True)

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        if not self.changed(name):
            return self.base.get_rows(name, start, stop, dtype=dtype, device=device)
        t = self._fused(name)[start:stop]
        return t.to(device=device, dtype=dtype or t.dtype, copy=True)

    def get_raw(self, name: str) -> torch.Tensor:
        return self.get(name, dtype=None)

    def input_paths(self) -> list[Path]:
        return self.base.input_paths() + [a.path for a in self.fusion.adapters]

    def donor_files(self) -> list[Path]:
        return self.base.donor_files()

    def recorded(self) -> list[Checkpoint]:
        """The checkpoints whose sha256 the output's record lists (base, then adapter weights)."""
        return [self.base] + [a.tensors for a in self.fusion.adapters]


Model = Checkpoint | FusedCheckpoint


@dataclasses.dataclass
class Inputs:
    """Every model of a merge, opened once per distinct reference (headers only); a context
    manager that removes the Hub header mirrors it made.

    Attributes:
        models: Reference key -> opened model.
        refs: Reference key -> the reference as first written.
        mirrored: Reference key -> (repo, commit) of a Hub model opened from its headers only.
    """

    device: str = "cpu"
    models: dict[tuple, Model] = dataclasses.field(default_factory=dict)
    refs: dict[tuple, ModelRef] = dataclasses.field(default_factory=dict)
    mirrored: dict[tuple, tuple[str, str]] = dataclasses.field(default_factory=dict)
    _stack: ExitStack = dataclasses.field(default_factory=ExitStack)
    _scratch: Path | None = None

    def __enter__(self) -> "Inputs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def open(self, text: str, where: str = "") -> Model:
        """The model ``text`` (mergekit's string form), opened on first use."""
        ref = ModelRef.parse(text, where or "model")
        key = ref.key
        if key not in self.models:
            try:
                ck = self._headers(key, ref.location)
                model: Model = FusedCheckpoint(ck, ref.lora_location, self.device) if ref.lora else ck
            except InputError as exc:
                if where and not str(exc).startswith(where):
                    raise type(exc)(f"{where}: {exc}", path=exc.path, tensor=exc.tensor) from exc
                raise
            self.models[key] = model
            self.refs[key] = ref
        return self.models[key]

    def _headers(self, key: tuple, location: str) -> Checkpoint:
        """A local checkpoint, or a Hub one mirrored from its headers and small files."""
        from ..checkpoint.hub import fetch_headers, offline

        hub = _hub(location)
        if hub is None or offline():
            return open_checkpoint(location)
        if self._scratch is None:
            from ..core.output import scratch_dir

            self._scratch = self._stack.enter_context(scratch_dir(Path(tempfile.gettempdir()) / "surgery-hub-headers"))
        folder = self._scratch / str(len(self.mirrored))
        folder.mkdir()
        repo, rev = hub
        facts = fetch_headers(repo, rev, folder)
        small = _snapshot(repo, facts["revision"], SMALL_PATTERNS, "config and tokenizer files")
        for f in small.iterdir():
            if f.is_file() and not (folder / f.name).exists():
                shutil.copyfile(f, folder / f.name)
        self.mirrored[key] = (repo, facts["revision"])
        return open_local(folder, label=location)

    def materialize(self) -> dict[tuple, Model]:
        """Download the weights of every Hub model planned from its headers (at the planned
        commit) and reopen it; returns the models that changed, by key."""
        from ..checkpoint.hub import pull

        changed = {}
        for key, (repo, commit) in self.mirrored.items():
            ref = self.refs[key]
            try:
                ck = open_local(pull(repo, revision=commit), label=ref.location)
            except HubError as exc:
                raise HubError(f"{ref.location}: {exc}", path=ref.location) from exc
            old = self.models[key]
            old = old.base if isinstance(old, FusedCheckpoint) else old
            if [(n, tuple(old.info(n).shape)) for n in old.names] != [(n, tuple(ck.info(n).shape)) for n in ck.names]:
                raise HubError(f"{ref.location}: the downloaded weights do not match the headers the merge was "
                               f"planned from; run it again.", path=ref.location)
            model = FusedCheckpoint(ck, ref.lora_location, self.device) if ref.lora else ck
            self.models[key] = changed[key] = model
        self.mirrored.clear()
        return changed

    def key(self, text: str) -> tuple:
        return ModelRef.parse(text).key

    def recorded(self, model: Model) -> list[Checkpoint]:
        return model.recorded() if isinstance(model, FusedCheckpoint) else [model]

    def input_paths(self) -> list[Path]:
        return [p for m in self.models.values() for p in m.input_paths()]

    def describe(self) -> list[dict[str, Any]]:
        return [{"model": str(self.refs[k]), "label": m.label, "tensors": len(m.names)} for k, m in self.models.items()]
