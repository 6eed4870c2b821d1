"""The one reader of adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``)
and the one parser of PEFT LoRA, shared by ``surgery fuse`` and ``surgery edit
from-peft / to-peft``.

:func:`read_adapter_config` validates the config of every adapter kind: it is a JSON
object, declares its kind (``peft_type``, or ``adapter_type`` for surgery's own formats),
and every known numeric or boolean field has its type and range (``r`` ≥ 1, finite alphas
and scales, ``rank_pattern`` / ``alpha_pattern`` keys that compile as regular expressions).

:class:`LoraConfig` and :func:`lora_modules` hold PEFT's LoRA semantics (Hu et al. 2021,
https://arxiv.org/abs/2106.09685): per module ``s = lora_alpha / r`` (``/ √r`` with
rsLoRA), ``r`` and ``lora_alpha`` overridden by the first matching ``rank_pattern`` /
``alpha_pattern`` key (PEFT's ``(.*\\.)?KEY$`` rule); PEFT's defaults ``r = 8`` and
``lora_alpha = 8``; ``lora_A [r, in]`` and ``lora_B [out, r]`` (embeddings:
``lora_embedding_A [r, vocab]``, ``lora_embedding_B [dim, r]``) whose ranks must agree with
each other and with the config; DoRA magnitude vectors exactly when ``use_dora`` is set;
PiSSA / OLoRA / LoftQ / CorDA adapters (whose initialisation rewrote the base weights)
refused unless saved converted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointNotFoundError, CorruptCheckpointError, InputError
from ..core.formats import field as typed_field
from ..core.formats import read_json
from .reader import Checkpoint, open_checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT's LoraConfig defaults.
DEFAULT_R = 8
DEFAULT_ALPHA = 8
# init_lora_weights values that change W itself before training.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
_MAX_PATTERN = 512
# A quantified group that itself contains a quantifier: exponential backtracking.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)\s*[+*{]")

# Known config fields of every kind: (type, minimum, exclusive minimum). None = absent.
_FIELDS: dict[str, tuple[type | tuple[type, ...], float | None, bool]] = {
    "r": (int, 1, False), "lora_alpha": (float, None, False), "alpha": (float, None, False),
    "scaling": (float, None, False), "lora_dropout": (float, 0, False), "fan_in_fan_out": (bool, None, False),
    "use_rslora": (bool, None, False), "use_dora": (bool, None, False), "curriculum_stage": (int, 0, False),
    "base_scale_init": (float, None, False), "adapter_scale_init": (float, None, False),
    "lora_scale_init": (float, None, False), "scale_range": (float, 0, False), "projection_prng_key": (int, None, False),
    "init_lora_weights": ((bool, str), None, False), "peft_type": (str, None, False), "adapter_type": (str, None, False),
    "rank_pattern": (dict, None, False), "alpha_pattern": (dict, None, False),
}


def _pattern_problem(key: str) -> str | None:
    if len(key) > _MAX_PATTERN:
        return f"it is longer than {_MAX_PATTERN} characters"
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        return f"it is not a valid regular expression ({exc})"
    if _NESTED_QUANTIFIER.search(key):
        return "it nests quantifiers (like (a+)+), which can take exponential time to match"
    return None


def validate_adapter_config(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check the type and range of every known field of an adapter config (any kind).

    Raises:
        CorruptCheckpointError: naming the file and the field.
    """
    what = "adapter config"
    for key, (kind, minimum, excl) in _FIELDS.items():
        typed_field(cfg, key, kind, path=path, what=what, default=None, minimum=minimum, exclusive_minimum=excl,
                    error=CorruptCheckpointError)
    for key, value_kind, minimum in (("rank_pattern", int, 1), ("alpha_pattern", float, None)):
        patterns = cfg.get(key) or {}
        for pat, value in patterns.items():
            problem = _pattern_problem(pat)
            if problem:
                raise CorruptCheckpointError(f"adapter config {path} has `{key}` key {pat[:60]!r}: {problem}.",
                                             path=path)
            typed_field({pat: value}, pat, value_kind, path=path, what=f"adapter config `{key}` of", minimum=minimum,
                        error=CorruptCheckpointError)
    return cfg


def no_kind_error(path: Path, guess: str | None = None) -> CorruptCheckpointError:
    """The error for a config that declares no kind (PEFT itself cannot load such an adapter)."""
    hint = f"its tensors look like {guess}: add \"peft_type\": \"{guess}\"" if guess else \
        "add the kind, e.g. \"peft_type\": \"LORA\""
    return CorruptCheckpointError(f"adapter config {path / CONFIG_NAME} declares no `peft_type`, which PEFT saves "
                                  f"with every adapter; {hint}.", path=path)


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder, validated (:func:`validate_adapter_config`)."""
    path = Path(folder) / CONFIG_NAME
    cfg = read_json(path, what="adapter config", error=CorruptCheckpointError)
    return validate_adapter_config(cfg, path)


def adapter_folder(path: str | Path, *, command: str) -> Path:
    """The adapter folder named by ``path`` (or by one of its two files), checked to hold
    both files; a pickled ``adapter_model.bin`` points to ``surgery convert``."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    if not p.is_dir():
        raise CheckpointNotFoundError(f"adapter folder {p} does not exist.", path=p)
    if not (p / CONFIG_NAME).is_file():
        raise InputError(f"{p} has no {CONFIG_NAME}; {command} reads adapter folders saved by PEFT's "
                         f"save_pretrained.", path=p)
    if not (p / WEIGHTS_NAME).is_file():
        if (p / "adapter_model.bin").is_file():
            raise InputError(f"{p} holds adapter_model.bin, a pickle surgery never opens implicitly; convert it "
                             f"with `surgery convert {p / 'adapter_model.bin'} TMP` and rename TMP/model.safetensors "
                             f"to {WEIGHTS_NAME}.", path=p)
        raise CheckpointNotFoundError(f"{p} has no {WEIGHTS_NAME}.", path=p)
    return p


def open_adapter_files(path: str | Path, *, command: str) -> tuple[Path, dict[str, Any], Checkpoint]:
    """An adapter folder's path, validated config and weights (headers validated, read lazily)."""
    folder = adapter_folder(path, command=command)
    return folder, read_adapter_config(folder), open_checkpoint(str(folder / WEIGHTS_NAME))


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` with
    ``module`` matching ``(.*\\.)?k$`` wins (PEFT ``get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_of(key: str, suffix: str) -> str:
    """``base_model.model.X.<suffix>`` -> ``X`` (the prefix is optional)."""
    mod = key[: -len(suffix)] if suffix and key.endswith(suffix) else key
    return mod[len(PEFT_PREFIX):] if mod.startswith(PEFT_PREFIX) else mod


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA settings of one adapter (validated), with per-module rank, alpha and scale."""

    path: Path
    r: int = DEFAULT_R
    lora_alpha: float = DEFAULT_ALPHA
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], path: str | Path) -> "LoraConfig":
        """Build from a config read by :func:`read_adapter_config`; refuses non-LoRA kinds and
        base-changing initialisations.

        Raises:
            InputError: not LoRA, or PiSSA / OLoRA / LoftQ / CorDA not saved converted.
        """
        path = Path(path)
        kind = str(cfg.get("peft_type") or cfg.get("adapter_type") or "").upper()
        if not kind:
            raise no_kind_error(path, "LORA")
        if kind != "LORA":
            raise InputError(f"adapter {path} is a {kind} adapter, not LoRA.", path=path)
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            raise InputError(
                f"adapter {path} was initialised with init_lora_weights={init!r}, which replaced the base weights W "
                f"by a residual before training, so adding it to the original base gives a wrong model; save it "
                f"converted with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) and use "
                f"that.", path=path)
        return cls(path=path, r=cfg.get("r") or DEFAULT_R,
                   lora_alpha=float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else float(DEFAULT_ALPHA),
                   use_rslora=bool(cfg.get("use_rslora")), use_dora=bool(cfg.get("use_dora")),
                   fan_in_fan_out=bool(cfg.get("fan_in_fan_out")), rank_pattern=dict(cfg.get("rank_pattern") or {}),
                   alpha_pattern=dict(cfg.get("alpha_pattern") or {}))

    def rank(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale(self, module: str) -> float:
        """``lora_alpha / r`` (``/ √r`` with rsLoRA) for ``module``."""
        r = self.rank(module)
        return self.alpha(module) / math.sqrt(r) if self.use_rslora else self.alpha(module) / r


# Tensor-name suffix -> (module kind, part).
LORA_SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("matrix", "A"), ".lora_B.weight": ("matrix", "B"), ".lora_B.bias": ("matrix", "bias"),
    ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": ("any", "magnitude"), ".lora_magnitude_vector.weight": ("any", "magnitude"),
}


@dataclass
class LoraModule:
    """The LoRA tensors of one adapted module (names in the adapter file)."""

    module: str
    kind: str                       # "matrix" or "embedding"
    a: str
    b: str
    rank: int
    out_in: tuple[int, int]         # [out, in] of B·A (embeddings: [dim, vocab])
    scale: float
    bias: str | None = None
    magnitude: str | None = None


def lora_modules(cfg: LoraConfig, tensors: Checkpoint) -> tuple[dict[str, LoraModule], list[str]]:
    """Group an adapter's LoRA tensors per module and check them against the config from the
    headers alone: both factors present, 2-D, ranks of A and B equal to each other and to
    the config's rank for the module, magnitude vectors exactly when ``use_dora``.

    Returns:
        (modules by name, the adapter's other tensor names: whole tensors it stores).

    Raises:
        IncompatibleCheckpointsError / CorruptCheckpointError: naming the adapter and tensor.
    """
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    others: list[str] = []
    for name in tensors.names:
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            others.append(name)
            continue
        module = module_of(name, suffix)
        kind, part = LORA_SUFFIXES[suffix]
        parts.setdefault(module, {})[part] = name
        if kind != "any":
            kinds[module] = kind

    def bad(msg: str, tensor: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"adapter {cfg.path}: {msg}", path=cfg.path, tensor=tensor)

    out: dict[str, LoraModule] = {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise bad(f"module {module!r} has {sorted(p)} but not both LoRA factors (lora_A and lora_B).", module)
        a, b = tensors.info(p["A"]), tensors.info(p["B"])
        if a.ndim != 2 or b.ndim != 2:
            raise bad(f"{p['A']} {list(a.shape)} and {p['B']} {list(b.shape)} must both be matrices "
                      f"(convolution LoRA is not supported).", p["A"])
        if a.shape[0] != b.shape[1]:
            raise bad(f"{p['A']} has rank {a.shape[0]} but {p['B']} has rank {b.shape[1]}; the factors do not "
                      f"belong together.", p["B"])
        r = cfg.rank(module)
        if a.shape[0] != r:
            raise bad(f"{p['A']} has rank {a.shape[0]} but the config says r={r} for {module!r} ('r' / "
                      f"'rank_pattern').", p["A"])
        if cfg.use_dora and "magnitude" not in p:
            raise bad(f"the config sets use_dora but module {module!r} has no lora_magnitude_vector; the DoRA "
                      f"magnitudes are missing.", module)
        if not cfg.use_dora and "magnitude" in p:
            raise bad(f"{p['magnitude']} is a DoRA magnitude vector but the config does not set use_dora.",
                      p["magnitude"])
        if "magnitude" in p and tensors.info(p["magnitude"]).numel != b.shape[0]:
            raise bad(f"{p['magnitude']} has {tensors.info(p['magnitude']).numel} entries, expected "
                      f"{b.shape[0]}.", p["magnitude"])
        if "bias" in p and tuple(tensors.info(p["bias"]).shape) != (b.shape[0],):
            raise bad(f"{p['bias']} has shape {list(tensors.info(p['bias']).shape)}, expected [{b.shape[0]}].", p["bias"])
        out[module] = LoraModule(module, kinds.get(module, "matrix"), p["A"], p["B"], r, (b.shape[0], a.shape[1]),
                                 cfg.scale(module), bias=p.get("bias"), magnitude=p.get("magnitude"))
    return out, others
