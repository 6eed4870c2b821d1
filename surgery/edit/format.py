"""The edit file: one safetensors file of weight deltas keyed by checkpoint tensor names.

An edit (ROME, MEMIT, a fine-tune difference, a LoRA) is a set of additive updates
ΔW to named tensors of a base checkpoint. For each tensor ``NAME`` the file holds either

* low-rank factors ``NAME.delta_u`` [rows, r], ``NAME.delta_v`` [cols, r] and optionally
  ``NAME.delta_s`` [r], with ΔW = u · diag(s) · vᵀ (s = 1 when absent), or
* a dense ``NAME.delta`` of the tensor's shape,

always in the tensor's *stored* layout (GPT-2 Conv1D weights are [in, out], Linear weights
[out, in]). The safetensors ``__metadata__`` holds ``format`` = ``surgery-edit``,
``format_version``, ``base_sha256`` (JSON: tensor name -> sha256 of the base tensor's
stored bytes the edit was made against), ``description`` and optional ``subject``,
``prompt``, ``target``, ``base``, ``model_type``, ``created_by``. Full spec: docs/edit-format.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.engine import WriteResult
from ..core.errors import CorruptCheckpointError, InputError
from ..core.formats import parse_json

FORMAT = "surgery-edit"
FORMAT_VERSION = 1
SUFFIX_U, SUFFIX_V, SUFFIX_S, SUFFIX_DENSE = ".delta_u", ".delta_v", ".delta_s", ".delta"
# Longest first so ".delta_u" is not read as ".delta" + "_u".
_SUFFIXES = (SUFFIX_U, SUFFIX_V, SUFFIX_S, SUFFIX_DENSE)
# Free-text metadata keys carried through unchanged.
TEXT_KEYS = ("description", "subject", "prompt", "target", "base", "model_type", "created_by")


@dataclass
class TensorEdit:
    """The update to one tensor: low-rank factors (u, v, optional s) or a dense delta."""

    name: str
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    s: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def low_rank(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int | None:
        """r of the factors (None for a dense delta)."""
        return None if self.u is None else int(self.u.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW (the base tensor's stored shape)."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.u is not None and self.v is not None
        return (int(self.u.shape[0]), int(self.v.shape[0]))

    def delta(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """ΔW materialised in the stored layout."""
        if self.dense is not None:
            return self.dense.to(device=device, dtype=dtype)
        assert self.u is not None and self.v is not None
        u = self.u.to(device=device, dtype=dtype)
        if self.s is not None:
            u = u * self.s.to(device=device, dtype=dtype)
        return u @ self.v.to(device=device, dtype=dtype).T

    def _core(self) -> torch.Tensor:
        """A small matrix with the same singular values as ΔW (float64)."""
        if self.dense is not None:
            d = self.dense.double()
            return d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(1, -1)
        assert self.u is not None and self.v is not None
        u, v = self.u.double(), self.v.double()
        if u.shape[1] > min(u.shape[0], v.shape[0]):
            return self.delta(torch.float64)
        ru = torch.linalg.qr(u, mode="r").R
        rv = torch.linalg.qr(v, mode="r").R
        s = self.s.double() if self.s is not None else torch.ones(u.shape[1], dtype=torch.float64)
        return (ru * s) @ rv.T

    def finite(self) -> bool:
        """Whether every stored entry of the delta is finite."""
        parts = [self.dense] if self.dense is not None else [self.u, self.v, self.s]
        return all(bool(torch.isfinite(p.float()).all()) for p in parts if p is not None)

    def frobenius(self) -> float:
        """‖ΔW‖_F without materialising ΔW (inf when the delta holds NaN or Inf)."""
        if not self.finite():
            return math.inf
        return float(torch.linalg.matrix_norm(self._core(), ord="fro"))

    def sigma_max(self) -> float:
        """σ_max(ΔW) without materialising ΔW (for low-rank factors; inf when the delta holds
        NaN or Inf, where a decomposition would not converge)."""
        if not self.finite():
            return math.inf
        core = self._core()
        return float(torch.linalg.matrix_norm(core, ord=2)) if core.numel() else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The entries this edit contributes to the file."""
        if self.dense is not None:
            return {self.name + SUFFIX_DENSE: self.dense}
        out = {self.name + SUFFIX_U: self.u, self.name + SUFFIX_V: self.v}
        if self.s is not None:
            out[self.name + SUFFIX_S] = self.s
        return out  # type: ignore[return-value]


@dataclass
class Edit:
    """A whole edit file: tensor updates plus provenance."""

    tensors: dict[str, TensorEdit]
    base_sha256: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)   # TEXT_KEYS present
    extra: dict[str, str] = field(default_factory=dict)  # other metadata, kept verbatim
    path: Path | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<edit>"

    @property
    def description(self) -> str:
        return self.info.get("description", "")

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (all values are strings)."""
        meta = dict(self.extra)
        meta.update({"format": FORMAT, "format_version": str(FORMAT_VERSION),
                     "base_sha256": json.dumps(dict(sorted(self.base_sha256.items())))})
        meta.update({k: v for k, v in self.info.items() if v})
        return meta


def _split_key(key: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def parse_edit(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: str | Path | None = None) -> Edit:
    """Validate raw file contents and build an :class:`Edit`.

    Raises:
        CorruptCheckpointError: Unknown keys, missing or mis-shaped factors, bad metadata.
    """
    label = str(path) if path is not None else "the edit"
    meta = dict(metadata or {})

    def bad(msg: str, tensor: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{label} is not a valid surgery edit file: {msg}", path=path, tensor=tensor)

    fmt = meta.pop("format", None)
    if fmt not in (None, "pt", FORMAT):
        raise bad(f"its metadata says format {fmt!r}, expected {FORMAT!r}.")
    version = meta.pop("format_version", str(FORMAT_VERSION))
    try:
        if int(version) > FORMAT_VERSION:
            raise bad(f"format_version {version} is newer than this surgery reads ({FORMAT_VERSION}); upgrade surgery.")
    except ValueError:
        raise bad(f"format_version {version!r} is not an integer.") from None
    try:
        sha = parse_json(meta.pop("base_sha256", "{}"), path=path, what="base_sha256 metadata of")
        if not isinstance(sha, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sha.items()):
            raise ValueError("not an object of strings")
    except (ValueError, InputError) as exc:
        raise bad(f"base_sha256 metadata is not a JSON object of name -> sha256 ({exc}).") from None
    info = {k: meta.pop(k) for k in TEXT_KEYS if k in meta}

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, suffix = _split_key(key)
        if not suffix:
            raise bad(f"tensor {key!r} does not end in .delta_u, .delta_v, .delta_s or .delta.", key)
        if not t.is_floating_point():
            raise bad(f"tensor {key!r} has dtype {t.dtype}; deltas must be floating point.", key)
        parts.setdefault(name, {})[suffix] = t
    if not parts:
        raise bad("it holds no tensors.")
    edits: dict[str, TensorEdit] = {}
    for name, p in sorted(parts.items()):
        if SUFFIX_DENSE in p:
            if len(p) > 1:
                raise bad(f"{name!r} has both a dense .delta and low-rank factors; keep one.", name)
            edits[name] = TensorEdit(name, dense=p[SUFFIX_DENSE])
            continue
        u, v, s = p.get(SUFFIX_U), p.get(SUFFIX_V), p.get(SUFFIX_S)
        if u is None or v is None:
            raise bad(f"{name!r} needs both {name}.delta_u and {name}.delta_v.", name)
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
            raise bad(f"{name!r} factors must be u [rows, r] and v [cols, r]; got {tuple(u.shape)} and {tuple(v.shape)}.", name)
        if s is not None and tuple(s.shape) != (u.shape[1],):
            raise bad(f"{name}.delta_s must have shape [{u.shape[1]}], got {tuple(s.shape)}.", name)
        edits[name] = TensorEdit(name, u=u, v=v, s=s)
    unknown_sha = sorted(set(sha) - set(edits))
    if unknown_sha:
        raise bad(f"base_sha256 names {unknown_sha[0]!r}, which the file has no delta for.", unknown_sha[0])
    return Edit(edits, base_sha256=sha, info=info, extra=meta, path=Path(path) if path is not None else None)


def load_edit(path: str | Path) -> Edit:
    """Read and validate an edit file.

    Raises:
        InputError: The file is missing or unreadable; CorruptCheckpointError when invalid.
    """
    from ..checkpoint.reader import open_local

    p = Path(path)
    if not p.is_file():
        raise InputError(f"edit file {p} does not exist; make one with `surgery edit extract` or `surgery edit from-peft`.",
                         path=p)
    # The validated checkpoint reader (strict header checks, no pickle), not a bare safe_open.
    ck = open_local(p)
    meta = dict(ck.metadata)
    tensors = {k: ck.get_raw(k) for k in ck.names}
    return parse_edit(tensors, meta, p)


def save_edit(edit: Edit, path: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> WriteResult:
    """Write ``edit`` atomically (see :func:`surgery.core.output.atomic_file`), with sorted
    names and metadata so the same edit always gives the same bytes.

    Args:
        edit: The edit.
        path: The ``.safetensors`` file to write.
        force: Replace an existing file.
        inputs: What the command read (the file may be none of them).

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
        UsageError: ``path`` is a folder or one of ``inputs``.
    """
    from ..checkpoint.writer import write_safetensors
    from ..core.output import atomic_file

    tensors: dict[str, Any] = {}
    for te in edit.tensors.values():
        tensors.update(te.tensors())
    metadata = edit.metadata()
    with atomic_file(path, force=force, inputs=inputs) as tmp:
        nbytes = write_safetensors(tmp, tensors, metadata)
    p = Path(path).expanduser()
    edit.path = p
    return WriteResult(p, [p], dict(metadata), len(tensors), nbytes)
