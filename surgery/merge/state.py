"""The continual-merge state: what a later run needs to merge more models without
re-reading the earlier ones.

A state folder holds ``state.json`` (method, parameters, the base's identity with sha256,
the models merged so far in order with their task-vector norms, the count and sum of
those norms, λ_t and the method's other scalars) and ``model.safetensors`` with one float32 tensor per merged tensor: the
running state (OPCM: S_t, so that θ^(t) = θ0 + S_t / λ_t; the other continual methods:
their running task vector). It is written under a temporary sibling folder and renamed
into place, so a crash never leaves half a state.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint.reader import Checkpoint, open_local
from ..checkpoint.writer import ShardedWriter, TensorSpec, write_text
from ..core.output import atomic_output, check_output
from ..core.errors import CorruptCheckpointError, InputError, UsageError
from ..core.formats import field as typed_field
from ..core.formats import read_json

STATE_FORMAT = "surgery-continual-state"
STATE_VERSION = 1
STATE_JSON = "state.json"
TENSORS_FILE = "model.safetensors"


@dataclass
class ContinualState:
    """The facts of a continual merge so far (``state.json``)."""

    method: str
    parameters: dict[str, Any]
    base: dict[str, str]                     # label, path, sha256
    order: list[dict[str, Any]] = field(default_factory=list)   # label, sha256, tau_norm
    count: int = 0
    sum_norms: float = 0.0
    lam: float = 1.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)   # the method's scalars after the last step

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path) -> "ContinualState":
        if d.get("format") != STATE_FORMAT:
            raise CorruptCheckpointError(f"{path} is not a surgery continual-merge state (format {d.get('format')!r}).",
                                         path=path)
        if d.get("version") != STATE_VERSION:
            raise CorruptCheckpointError(f"{path} has state version {d.get('version')!r}; this surgery reads version "
                                         f"{STATE_VERSION}.", path=path)
        what, err = "continual-merge state", CorruptCheckpointError

        def get(key: str, kind, **kw):
            return typed_field(d, key, kind, path=path, what=what, error=err, **kw)

        base = get("base", dict)
        order = get("order", list)
        if not all(isinstance(v, str) for v in base.values()):
            raise CorruptCheckpointError(f"{what} {path} has a 'base' whose values are not all strings.", path=path)
        if not all(isinstance(o, dict) for o in order):
            raise CorruptCheckpointError(f"{what} {path} has an 'order' entry that is not an object.", path=path)
        count = get("count", int, minimum=0)
        if count != len(order):
            raise CorruptCheckpointError(f"{what} {path} says 'count' = {count} but lists {len(order)} merged "
                                         f"models in 'order'; the state is damaged.", path=path)
        lam = float(get("lambda", float, minimum=0, exclusive_minimum=True))
        scalars = get("scalars", dict, default=None) or {"lambda": lam}
        for k in scalars:
            typed_field(scalars, k, float, path=path, what=f"{what} `scalars` of", error=err)
        return cls(method=get("method", str), parameters=get("parameters", dict), base=base, order=order,
                   count=count, sum_norms=float(get("sum_norms", float, minimum=0)), lam=lam,
                   steps=list(get("steps", list, default=[])), scalars={k: float(v) for k, v in scalars.items()})


def load_state(folder: str | Path) -> tuple[ContinualState, Checkpoint]:
    """Open a state folder: its facts and its tensors (read lazily).

    Raises:
        InputError: The folder or its files are missing; CorruptCheckpointError when damaged.
    """
    folder = Path(folder)
    meta = folder / STATE_JSON
    if not meta.is_file():
        raise InputError(f"{folder} is not a continual-merge state folder (no {STATE_JSON}); make one with "
                         f"`surgery merge ... --state DIR`.", path=folder)
    doc = read_json(meta, what="continual-merge state", error=CorruptCheckpointError)
    state = ContinualState.from_json(doc, meta)
    tensors = open_local(folder / TENSORS_FILE)
    return state, tensors


def check_state_target(folder: str | Path, *, replace_ok: list[Path] = (), inputs: list[Path] = ()) -> None:
    """Refuse a state folder that exists and is not a state (unless in ``replace_ok``), or that
    is, contains or lies inside an input or the output — before any work starts."""
    folder = Path(folder)
    if folder.exists() and not (folder / STATE_JSON).is_file() and folder.resolve() not in [p.resolve() for p in replace_ok]:
        raise UsageError(f"`state` {folder} exists and is not a continual-merge state folder; choose another path.",
                         path=folder)
    check_output(folder, force=True, inputs=inputs)


@contextmanager
def state_writer(folder: str | Path, specs: list[TensorSpec], *, replace_ok: list[Path] = (),
                 inputs: list[Path] = ()) -> Iterator["StateSink"]:
    """Write a state folder atomically: yields a sink; on a clean exit the folder replaces ``folder``.

    An existing ``folder`` is replaced only if it is itself a state folder (or listed in
    ``replace_ok``); anything else is refused, as is a folder that is, contains or lies inside
    one of ``inputs``.
    """
    check_state_target(folder, replace_ok=replace_ok, inputs=inputs)
    with atomic_output(folder, force=True, inputs=inputs) as tmp:
        sink = StateSink(tmp, specs)
        try:
            yield sink
        finally:
            sink.writer.close()
        if sink.state is None:
            raise RuntimeError("state_writer: finish() was not called")


class StateSink:
    """Receives the state tensors one at a time, then the facts."""

    def __init__(self, tmp: Path, specs: list[TensorSpec]):
        self.tmp = tmp
        self.writer = ShardedWriter(tmp, [TensorSpec(s.name, s.shape, torch.float32) for s in specs], 1 << 62,
                                    {"format": "pt"})
        self.state: ContinualState | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor.detach().to("cpu", torch.float32).contiguous())

    def write_rows(self, name: str, start: int, block: torch.Tensor) -> None:
        self.writer.write_rows(name, start, block.detach().to("cpu", torch.float32).contiguous())

    def finish(self, state: ContinualState) -> None:
        self.writer.finish({"format": "pt", "surgery": json.dumps({"operation": "merge-state", "method": state.method})})
        write_text(self.tmp / STATE_JSON, json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
        self.state = state
