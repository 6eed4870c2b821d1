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

The config and the factors are parsed and validated by :mod:`surgery.checkpoint.peft`
(shared with ``surgery edit from-peft``): adapters whose initialisation rewrote the base
weights (PiSSA, OLoRA, LoftQ, CorDA) are refused unless saved converted, because their B A
was trained against a base that no longer exists on disk.
"""

from __future__ import annotations

import torch

from ..checkpoint.peft import LoraConfig, lora_modules
from ..core.errors import InputError
from .base import Adapter, Update, is_transposed, module_of, orient, out_major, replace_update

# LoRA features that are not a weight update of an existing tensor (or not supported here).
UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices", "arrow_config",
               "use_bdlora", "velora_config", "monteclora_config", "kasa_config", "alora_invocation_tokens")


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    lcfg = LoraConfig.from_config(cfg, adapter.path)   # refuses PiSSA / OLoRA / LoftQ / CorDA
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise InputError(f"adapter {adapter.path} uses {key}={cfg.get(key)!r}, which surgery fuse does not "
                             f"support; merge it with PEFT's merge_and_unload instead.", path=adapter.path)
    if cfg.get("use_qalora"):
        raise InputError(f"adapter {adapter.path} is a QA-LoRA adapter (use_qalora), which needs its quantised "
                         f"base; surgery fuse does not support it.", path=adapter.path)
    modules, others = lora_modules(lcfg, adapter.tensors)
    out: list[Update] = []
    for module, m in modules.items():
        fan = True if m.kind == "embedding" else lcfg.fan_in_fan_out
        out.append(_linear(adapter, module, m.a, m.b, m.scale, fan, m.magnitude, embedding=m.kind == "embedding"))
        if m.bias is not None:
            out.append(_bias(adapter, module, m.bias, m.scale))
    # Whole tensors: modules_to_save, bias="all"/"lora_only", saved embedding layers.
    for name in others:
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
