"""The adapter kinds ``surgery fuse`` knows: one explicit table, and detection from the files.

Adding a kind: write one module with ``updates(adapter) -> list[Update]`` and add one line
to :data:`KINDS`.
"""

from __future__ import annotations

from typing import Callable

from ..checkpoint.peft import no_kind_error
from ..core.errors import InputError
from . import curriculum, hira, hut, ia3, loha, lokr, lora, tera, vera
from .base import Adapter, Update

ShapeOf = Callable[[str], tuple[int, ...]]

# kind (PEFT's peft_type spelling) -> updates(adapter, shape_of)
KINDS: dict[str, Callable[[Adapter, ShapeOf], list[Update]]] = {
    "LORA": lambda a, shape_of: lora.updates(a),
    "LOHA": lambda a, shape_of: loha.updates(a),
    "LOKR": lambda a, shape_of: lokr.updates(a),
    "IA3": lambda a, shape_of: ia3.updates(a),
    "VERA": vera.updates,
    "HIRA": lambda a, shape_of: hira.updates(a),
    "HUT": lambda a, shape_of: hut.updates(a),
    "TERA": lambda a, shape_of: tera.updates(a),
    "CURRICULUM_LORA": lambda a, shape_of: curriculum.updates(a),
}

# Tensor-name endings that suggest a kind when the config does not declare one (first match wins).
SIGNATURES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "LORA"), (".lora_embedding_A", "LORA"), (".hada_w1_a", "LOHA"),
    (".lokr_w1", "LOKR"), (".lokr_w1_a", "LOKR"), (".ia3_l", "IA3"), (".vera_lambda_b", "VERA"),
    (".hira_A", "HIRA"), (".hut_A", "HUT"), (".tera_lambda_0", "TERA"), (".base_weight_scale.logit", "CURRICULUM_LORA"),
)


def detect(adapter: Adapter) -> str:
    """The adapter's kind: ``peft_type`` (or ``adapter_type``) from its config.

    Raises:
        InputError: The kind is unknown, or not declared (the error names the kind the
            tensor names suggest).
    """
    declared = adapter.config.get("peft_type") or adapter.config.get("adapter_type")
    if declared:
        kind = str(declared).upper()
        if kind not in KINDS:
            raise InputError(f"adapter {adapter.path} has peft_type {declared!r}, which surgery fuse does not know; "
                             f"known kinds: {', '.join(sorted(KINDS))}.", path=adapter.path)
        return kind
    raise no_kind_error(adapter.path, next((kind for name in adapter.names for suffix, kind in SIGNATURES
                                            if name.endswith(suffix)), None))
