"""PEFT LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) and its variants.

``W' = W + s · B A`` with ``s = lora_alpha / r`` (rsLoRA, https://arxiv.org/abs/2312.03732:
``lora_alpha / √r``); ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` per
module. Embeddings store ``lora_embedding_A [r, vocab]`` and ``lora_embedding_B [dim, r]`` and
get ``s · (B A)ᵀ``. GPT-2's ``Conv1D`` stores ``[in, out]`` (``fan_in_fan_out``): the update is
transposed.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): ``W' = m ⊙ (W + sBA) / ‖W₀ + sBA‖``
with the norm taken per output row on the *unmerged* base ``W₀`` (as PEFT merges it; for
embeddings per embedding dimension).

``lora_bias`` adds ``s · lora_B.bias`` to the base bias. ``modules_to_save``, ``bias`` other
than ``"none"`` and saved embedding layers (``base_layer.weight``) replace base tensors.

Adapters whose initialisation rewrote the base weights (PiSSA, OLoRA, LoftQ, CorDA) are
refused unless saved converted, because their B A was trained against a base that no
longer exists on disk.
"""

from __future__ import annotations

import torch

from ..core.errors import InputError
from .base import Adapter, Update, is_transposed, module_of, orient, out_major, pattern_value, replace_update, rsqrt_or_div

# init_lora_weights values that change W itself before training.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
# LoRA features that are not a weight update of an existing tensor (or not supported here).
UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices", "arrow_config",
               "use_bdlora", "velora_config", "monteclora_config", "kasa_config", "alora_invocation_tokens")
SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
            "lora_magnitude_vector")


def check_init(adapter: Adapter) -> None:
    """Refuse adapters whose initialisation rewrote the base weights (unless saved converted)."""
    init = adapter.config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise InputError(
            f"adapter {adapter.path} was initialised with init_lora_weights={init!r}, which replaced the base "
            f"weights W by a residual before training, so fusing it into the original base gives a wrong model; "
            f"save it converted with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
            f"and fuse that.", path=adapter.path)


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    check_init(adapter)
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise InputError(f"adapter {adapter.path} uses {key}={cfg.get(key)!r}, which surgery fuse does not "
                             f"support; merge it with PEFT's merge_and_unload instead.", path=adapter.path)
    if cfg.get("use_qalora"):
        raise InputError(f"adapter {adapter.path} is a QA-LoRA adapter (use_qalora), which needs its quantised "
                         f"base; surgery fuse does not support it.", path=adapter.path)
    fan = bool(cfg.get("fan_in_fan_out", False))
    rslora = bool(cfg.get("use_rslora", False))
    out: list[Update] = []
    modules: dict[str, dict[str, str]] = {}
    claimed: set[str] = set()
    for name in adapter.names:
        for suf in SUFFIXES:
            if name.endswith("." + suf):
                modules.setdefault(module_of(name, "." + suf), {})[suf] = name
                claimed.add(name)
                break
    for module, parts in sorted(modules.items()):
        r_default, a_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        r = int(pattern_value(cfg.get("rank_pattern"), module, r_default))
        alpha = float(pattern_value(cfg.get("alpha_pattern"), module, a_default))
        s = rsqrt_or_div(alpha, r, rslora)
        if "lora_A.weight" in parts and "lora_B.weight" in parts:
            a, b = parts["lora_A.weight"], parts["lora_B.weight"]
            if adapter.shape(a)[0] != r:
                raise adapter.error(f"{a} has rank {adapter.shape(a)[0]} but the config says r={r}.", tensor=a)
            if len(adapter.shape(a)) != 2:
                raise adapter.error(f"{a} is not a matrix (convolution LoRA is not supported).", tensor=a)
            out.append(_linear(adapter, module, a, b, s, fan, parts.get("lora_magnitude_vector"), embedding=False))
            if "lora_B.bias" in parts:
                out.append(_bias(adapter, module, parts["lora_B.bias"], s))
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            a, b = parts["lora_embedding_A"], parts["lora_embedding_B"]
            out.append(_linear(adapter, module, a, b, s, True, parts.get("lora_magnitude_vector"), embedding=True))
        else:
            raise adapter.error(f"module {module!r} has {sorted(parts)} but not both LoRA factors.", tensor=module)
    # Whole tensors: modules_to_save, bias="all"/"lora_only", saved embedding layers.
    for name in adapter.names:
        if name in claimed:
            continue
        if ".base_layer." in name and name.rsplit(".", 1)[1] in ("weight", "bias"):
            param = name.rsplit(".", 1)[1]
            out.append(replace_update(adapter, module_of(name, ".base_layer." + param), param, name, "saved base layer"))
        elif name.endswith(".weight") or name.endswith(".bias"):
            param = name.rsplit(".", 1)[1]
            out.append(replace_update(adapter, module_of(name, "." + param), param, name))
        else:
            raise adapter.error(f"tensor {name!r} is not a LoRA tensor surgery knows.", tensor=name)
    # A saved base layer must come before the LoRA update of the same module.
    out.sort(key=lambda u: (u.key, u.how != "saved base layer"))
    return out


def _linear(adapter: Adapter, module: str, a_name: str, b_name: str, s: float, fan: bool, mag: str | None,
            embedding: bool) -> Update:
    def delta_out_in() -> torch.Tensor:
        return (adapter.get(b_name) @ adapter.get(a_name)).mul_(s)   # [out, in] (embedding: [dim, vocab])

    out_in = (adapter.shape(b_name)[0], adapter.shape(a_name)[1])

    def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        if mag is None:
            # one fused pass: current + s·B A (or its transpose for [in, out] storage)
            t = is_transposed(out_in, tuple(current.shape), fan)
            a, b = adapter.get(a_name), adapter.get(b_name)
            if t is None:
                orient(b @ a, tuple(current.shape), fan, adapter, module)   # raises the shape error
            return torch.addmm(current, a.T, b.T, alpha=s) if t else torch.addmm(current, b, a, alpha=s)
        d = delta_out_in()
        # DoRA: norms per output unit on the unmerged base (embeddings: per embedding dimension).
        t = is_transposed(tuple(d.shape), tuple(current.shape), fan)
        if t is None:
            orient(d, tuple(current.shape), fan, adapter, module)  # raises the shape error
        w0 = out_major(original, t)
        norm = torch.linalg.norm(w0 + d, dim=1)
        m = adapter.get(mag)
        if m.shape != norm.shape:
            raise adapter.error(f"{mag} has shape {list(m.shape)}, expected [{norm.shape[0]}].", tensor=mag)
        factor = (m / norm).unsqueeze(1)
        return out_major(factor * (out_major(current, t) + d), t)

    return Update(module, "weight", ("dora" if mag else "lora") + (" (embedding)" if embedding else ""), fn,
                  out_in=out_in, fan_in_fan_out=fan)


def _bias(adapter: Adapter, module: str, name: str, s: float) -> Update:
    def fn(current, original):
        return current + s * adapter.get(name)
    return Update(module, "bias", "lora bias", fn)
