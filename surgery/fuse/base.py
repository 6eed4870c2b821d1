"""What every adapter kind shares: the opened adapter, the per-tensor update it yields,
and small helpers (pattern lookup, orientation of a ``[out, in]`` update).

An adapter kind turns one adapter folder into a list of :class:`Update`: one per base
tensor it changes. An update is a pure function ``(current, original) -> new`` over float32
tensors in the checkpoint's stored layout; ``current`` already holds the adapters fused
before this one, ``original`` is the untouched base tensor (multiplicative forms such as
DoRA and HiRA are defined on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.peft import (CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, module_of,  # noqa: F401 (re-exported)
                               open_adapter_files, pattern_value)
from ..checkpoint.reader import Checkpoint
from ..core.errors import IncompatibleCheckpointsError


UpdateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Update:
    """One base tensor an adapter changes.

    Attributes:
        module: Module path as the adapter names it (``model.layers.0.self_attn.q_proj``).
        param: ``weight`` or ``bias``.
        how: Short description recorded in the report (``lora``, ``dora``, ``replace``...).
        fn: ``fn(current, original) -> new`` in float32, stored layout. For a tensor the
            base does not have (a new head), ``current`` and ``original`` are None.
        shape: The stored shape the update produces, when known without the base (replacements).
        optional: Skip silently when the base lacks the tensor.
        out_in: The update's ``[out, in]`` shape as the adapter's headers give it, checked against
            the base before anything is read (None: checked when the tensor is computed).
        fan_in_fan_out: The config flag that settles square matrices.
        match: ``orient`` (stored as ``[out, in]`` or ``[in, out]``) or ``numel`` (reshaped to fit).
    """

    module: str
    param: str
    how: str
    fn: UpdateFn
    shape: tuple[int, ...] | None = None
    optional: bool = False          # skipped when the base has no such tensor (IA3 on a bias-free layer)
    out_in: tuple[int, int] | None = None   # [out, in] of the update, from the headers (validation)
    fan_in_fan_out: bool = False
    match: str = "orient"           # "orient": the stored tensor is [out, in] or [in, out]; "numel": reshaped

    @property
    def key(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass
class Adapter:
    """An adapter folder opened lazily: its config and its tensors (headers only until read)."""

    path: Path
    config: dict[str, Any]
    tensors: Checkpoint
    weight: float = 1.0
    kind: str = ""
    device: str = "cpu"
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def names(self) -> list[str]:
        return self.tensors.names

    def get(self, name: str) -> torch.Tensor:
        """An adapter tensor in float32 (a fresh copy; nothing is kept)."""
        return self.tensors.get(name, dtype=torch.float32, device=self.device)

    def shared(self, name: str) -> torch.Tensor:
        """A tensor many modules use (VeRA / TeRA factors), read once and kept."""
        if name not in self._cache:
            self._cache[name] = self.tensors.get(name, dtype=torch.float32, device=self.device)
        return self._cache[name]

    def scalar(self, name: str) -> float:
        """A stored scalar (a 0-d or 1-element tensor)."""
        return float(self.get(name).reshape(()))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors.info(name).shape)

    def error(self, message: str, tensor: str | None = None) -> IncompatibleCheckpointsError:
        return IncompatibleCheckpointsError(f"adapter {self.path}: {message}", path=self.path, tensor=tensor)


def open_adapter(path: str | Path, weight: float = 1.0) -> Adapter:
    """Open an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    through the shared validating reader (:mod:`surgery.checkpoint.peft`).

    Raises:
        CheckpointNotFoundError: No such folder or no weights file in it.
        CorruptCheckpointError: The config is malformed (named field) or the weights are.
    """
    folder, config, tensors = open_adapter_files(path, command="surgery fuse")
    return Adapter(folder, config, tensors, weight=weight)


def group_by_module(adapter: Adapter, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Map module path -> {suffix: tensor name} for every tensor ending in one of ``suffixes``."""
    out: dict[str, dict[str, str]] = {}
    for name in adapter.names:
        for suf in suffixes:
            if name.endswith("." + suf):
                out.setdefault(module_of(name, "." + suf), {})[suf] = name
                break
    return out


def header_problem(update: Update, stored: tuple[int, ...], adapter_path) -> str | None:
    """Why ``update`` cannot apply to a base tensor of shape ``stored`` (None when it fits)."""
    if update.out_in is None:
        return None
    o, i = update.out_in
    if update.match == "numel":
        fits = o * i == math.prod(stored)
    else:
        fits = is_transposed((o, i), stored, update.fan_in_fan_out) is not None
    if fits:
        return None
    return (f"adapter {adapter_path}: module {update.module!r} produces an update of shape [{o}, {i}] but the base "
            f"tensor is {list(stored)}; the adapter was trained on a different model")


def orient(delta: torch.Tensor, stored: tuple[int, ...], fan_in_fan_out: bool, adapter: Adapter, module: str) -> torch.Tensor:
    """Lay an ``[out, in]`` update out like the stored tensor: as is for ``nn.Linear``
    ``[out, in]``, transposed for GPT-2's ``Conv1D`` ``[in, out]`` (``fan_in_fan_out``).
    The shapes decide; the config flag only settles square matrices."""
    shape = tuple(delta.shape)
    fits, fits_t = shape == stored, shape[::-1] == stored
    if fits and (not fits_t or not fan_in_fan_out):
        return delta
    if fits_t:
        return delta.T
    raise adapter.error(f"module {module!r} produces an update of shape {list(shape)} but the base tensor is "
                        f"{list(stored)}; the adapter was trained on a different model.", tensor=module)


def out_major(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.T if transposed else t


def is_transposed(out_in: tuple[int, int], stored: tuple[int, ...], fan_in_fan_out: bool) -> bool | None:
    """Whether a stored 2-D tensor is ``[in, out]``; None when it fits neither way."""
    fits, fits_t = tuple(out_in) == tuple(stored), tuple(out_in)[::-1] == tuple(stored)
    if fits and (not fits_t or not fan_in_fan_out):
        return False
    if fits_t:
        return True
    return None


def replace_update(adapter: Adapter, module: str, param: str, name: str, how: str = "replace") -> Update:
    """A tensor the adapter stores whole (``modules_to_save``, ``bias``, saved embedding layers)."""
    def fn(current, original, name=name):
        return adapter.get(name)
    return Update(module, param, how, fn, shape=adapter.shape(name))
