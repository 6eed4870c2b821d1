"""A ``transformers`` model built from a Checkpoint's tensors: the one loader every operation
that runs forward passes uses (``eval ppl``, ``edit apply``, ``analyze subspace --text``,
``fuse --check``).

The model is built from ``config.json`` and exactly the tensors the user named, never from
whatever files transformers would find beside them: a folder whose ``model.safetensors`` the
user named may also hold a ``pytorch_model.bin`` (or the user may name one shard-less file of
several), and ``from_pretrained(folder)`` would pick its own. Here the tensors are read
through the validated reader and handed to ``from_pretrained(None, config=..., state_dict=...)``,
so transformers still applies its key renames, prefix handling and weight tying. Tensors the
architecture needs but the checkpoint lacks are an :class:`InputError`, never a silent random
initialisation.

transformers' logging verbosity and progress bars are changed only for the duration of a load
and restored afterwards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from ..core.errors import InputError
from .reader import Checkpoint

Head = Literal["causal_lm", "base", "auto"]

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars inside the block, then restore both.

    The library draws nothing on the terminal; what transformers would warn about at load
    time (missing or unexpected keys) is checked and raised by :func:`load_model` instead.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_config(ckpt: Checkpoint) -> Any:
    """The ``transformers`` config object of ``ckpt``'s config.json.

    Raises:
        InputError: No config.json, no ``model_type``, or one transformers does not know
            (remote code is never run).
    """
    from transformers import CONFIG_MAPPING

    cfg = ckpt.config
    if cfg is None:
        raise InputError(f"{ckpt.label} has no config.json; running the model needs its config next to the weights.",
                         path=ckpt.root)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InputError(f"config.json of {ckpt.label} has model_type {model_type!r}, which this transformers "
                         f"does not know (remote code is never run); use a checkpoint of a built-in architecture.",
                         path=ckpt.root)
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(cfg))
    except Exception as exc:  # transformers validates configs with many exception types
        raise InputError(f"transformers rejects the config.json of {ckpt.label} "
                         f"({type(exc).__name__}: {_first_line(exc)}).", path=ckpt.root) from exc


def wants_causal_lm(config: dict[str, Any] | None) -> bool:
    """True when config.json's ``architectures`` names a causal-LM class (``...ForCausalLM``,
    ``...LMHeadModel``)."""
    return any(str(a).endswith(CAUSAL_SUFFIXES) for a in (config or {}).get("architectures") or [])


def model_class(ckpt: Checkpoint, config: Any, head: Head) -> type:
    """The transformers class for ``head``: the causal-LM class of the config's type, the bare
    model class, or (``auto``) the causal LM when ``architectures`` names one, else the bare model.

    Raises:
        InputError: The checkpoint has no causal-LM head, or transformers has no class for it.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    if head == "auto":
        head = "causal_lm" if wants_causal_lm(ckpt.config) else "base"
    archs = (ckpt.config or {}).get("architectures") or []
    if head == "causal_lm":
        if archs and not wants_causal_lm(ckpt.config):
            raise InputError(f"{ckpt.label} is a {archs[0]}, which has no causal-LM head; perplexity and edits "
                             f"need a causal language model (…ForCausalLM / …LMHeadModel).", path=ckpt.root)
        mapping, what = MODEL_FOR_CAUSAL_LM_MAPPING, "causal-LM"
    else:
        mapping, what = MODEL_MAPPING, "base-model"
    try:
        return mapping[type(config)]
    except KeyError:
        raise InputError(f"transformers has no {what} class for model_type {config.model_type!r} of {ckpt.label}.",
                         path=ckpt.root) from None


def load_model(ckpt: Checkpoint, *, head: Head = "causal_lm", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Any:
    """Build the transformers model of ``ckpt`` from its config and its own tensors, in eval mode.

    Args:
        ckpt: An opened checkpoint with config.json.
        head: ``causal_lm`` (``AutoModelForCausalLM``'s class), ``base`` (``AutoModel``'s) or
            ``auto`` (causal LM when config.json's architectures names one).
        dtype: Dtype of the floating parameters (float32 by default, whatever is stored).
        device: Where the model runs.

    Returns:
        The model, its parameters holding exactly the checkpoint's values (cast to ``dtype``).

    Raises:
        InputError: No or unknown config, no causal-LM head where one is needed, tensors the
            architecture needs are missing or have the wrong shape, or transformers fails to
            build the model.
    """
    config = build_config(ckpt)
    cls = model_class(ckpt, config, head)
    state = {name: ckpt.get(name, dtype=dtype) for name in ckpt.names}
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                              output_loading_info=True)
    except Exception as exc:  # transformers raises many types for unsupported / broken checkpoints
        raise InputError(f"transformers cannot build {ckpt.label} as {cls.__name__} "
                         f"({type(exc).__name__}: {_first_line(exc)}).", path=ckpt.root) from exc
    del state
    problems = sorted(info.get("missing_keys") or []) + sorted(f"{k} (shape)" for k in
                                                              _names(info.get("mismatched_keys")))
    if problems:
        archs = (ckpt.config or {}).get("architectures") or ["?"]
        raise InputError(f"{ckpt.label} lacks {len(problems)} tensor(s) that {cls.__name__} needs, first "
                         f"{problems[0]!r} (the checkpoint is a {archs[0]}); name a checkpoint with the full "
                         f"{'causal-LM head' if head == 'causal_lm' else 'model'}.", path=ckpt.root,
                         tensor=problems[0])
    model.to(device)
    model.eval()
    return model


def load_tokenizer(ckpt: Checkpoint, tokenizer: str | Path | None = None) -> Any:
    """The tokenizer in ``ckpt``'s folder, or in ``tokenizer`` (a folder or Hub id) when given.

    Raises:
        InputError: No usable tokenizer there.
    """
    from transformers import AutoTokenizer

    src = str(tokenizer) if tokenizer is not None else str(ckpt.root)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        raise InputError(f"no usable tokenizer in {src} ({type(exc).__name__}); "
                         f"pass `tokenizer` with a folder or Hub id that has one.", path=src) from exc


def _names(keys: Any) -> list[str]:
    """Key names of a loading-info entry (transformers lists mismatched keys as tuples)."""
    return [k[0] if isinstance(k, tuple) else str(k) for k in (keys or [])]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
