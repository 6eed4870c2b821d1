"""The models a merge reads, opened once each from their headers: local checkpoints, Hub ids
(``org/name@revision``) and ``model+lora`` references, whose adapter is fused one tensor at a
time when a tensor is read (surgery/fuse), never as a whole model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.format import TensorInfo
from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..core.errors import InputError
from .recipe import ModelRef


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
        self.fusion = plan_fusion(base, [adapter], device)
        self.device = device
        self.label = f"{base.label}+{adapter}"
        self.root = base.root
        self.metadata = base.metadata
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        for name in list(self.fusion.steps) + list(self.fusion.new_from):
            start = self.fusion.start(name)
            dtype = base.info(start).dtype if start else torch.float32
            shape = self.fusion.shape(name)
            self.tensors[name] = TensorInfo(name, shape, dtype, "", torch.empty(0, dtype=dtype).element_size()
                                            * int(torch.Size(shape).numel()), base.root, -1)
        self.names = sorted(self.tensors)
        self._cached: tuple[str, torch.Tensor] | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
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
    """Every model of a merge, opened once per distinct reference (headers only).

    Attributes:
        models: Reference key -> opened model.
        refs: Reference key -> the reference as first written.
    """

    device: str = "cpu"
    models: dict[tuple, Model] = dataclasses.field(default_factory=dict)
    refs: dict[tuple, ModelRef] = dataclasses.field(default_factory=dict)

    def open(self, text: str, where: str = "") -> Model:
        """The model ``text`` (mergekit's string form), opened on first use."""
        ref = ModelRef.parse(text, where or "model")
        key = ref.key
        if key not in self.models:
            try:
                ck = open_checkpoint(ref.location)
                model: Model = FusedCheckpoint(ck, ref.lora_location, self.device) if ref.lora else ck
            except InputError as exc:
                if where and not str(exc).startswith(where):
                    raise type(exc)(f"{where}: {exc}", path=exc.path, tensor=exc.tensor) from exc
                raise
            self.models[key] = model
            self.refs[key] = ref
        return self.models[key]

    def key(self, text: str) -> tuple:
        return ModelRef.parse(text).key

    def recorded(self, model: Model) -> list[Checkpoint]:
        return model.recorded() if isinstance(model, FusedCheckpoint) else [model]

    def input_paths(self) -> list[Path]:
        return [p for m in self.models.values() for p in m.input_paths()]

    def describe(self) -> list[dict[str, Any]]:
        return [{"model": str(self.refs[k]), "label": m.label, "tensors": len(m.names)} for k, m in self.models.items()]
