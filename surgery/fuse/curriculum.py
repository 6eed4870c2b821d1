"""Curriculum LoRA as in ScaleZero's ``CurriculumLoRALinear`` (opendilab/LightZero,
https://github.com/opendilab/LightZero, the UniZero world-model transformer).

At curriculum stage ``s ≥ 1`` the effective weight is
``W = α₀ W₀ + Σ_{j<s} α_j · (lora_alpha / r) · B_j A_j`` (the bias is not scaled); at stage 0
it is ``W₀``. Each ``α`` is a ``LearnableScale``: ``α = init + range · tanh(logit)``, with
``init`` 1.0 for ``α₀`` (``base_scale_init``) and ``lora_scale_init`` for the adapters, and
``range`` 0.2; only the logits are parameters, so the inits and range come from the config.

Accepted format (docs/fuse.md, "Curriculum LoRA format"): ``adapter_config.json`` with
``"peft_type": "CURRICULUM_LORA"``, ``r``, ``lora_alpha``, ``curriculum_stage`` (default: the
number of stored adapters), optional ``base_scale_init`` (1.0), ``adapter_scale_init`` (1.0),
``scale_range`` (0.2); ``adapter_model.safetensors`` with the module's state-dict entries
``<module>.base_weight_scale.logit``, ``<module>.adapters.<j>.lora_A [r, in]``,
``<module>.adapters.<j>.lora_B [out, r]``, ``<module>.adapter_scales.<j>.logit`` (an optional
``base_model.model.`` prefix is ignored; ``<module>.weight`` / ``.bias`` are ignored: the
base comes from BASE)."""

from __future__ import annotations

import math
import re

from ..core.errors import InputError
from .base import Adapter, Update, module_of

KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<base>base_weight_scale\.logit)|adapters\.(?P<j>\d+)\.(?P<ab>lora_A|lora_B)"
                 r"|adapter_scales\.(?P<sj>\d+)\.logit)$")


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise InputError(f"adapter {adapter.path}: the curriculum LoRA config needs {key!r}.", path=adapter.path)
    scaling = float(cfg["lora_alpha"]) / int(cfg["r"])
    base_init = float(cfg.get("base_scale_init", 1.0))
    ad_init = float(cfg.get("adapter_scale_init", cfg.get("lora_scale_init", 1.0)))
    rng = float(cfg.get("scale_range", 0.2))
    modules: dict[str, dict] = {}
    for name in adapter.names:
        m = KEY.match(name)
        if not m:
            if name.endswith(".weight") or name.endswith(".bias"):
                continue  # the module's own W0 / bias: the base comes from BASE
            raise adapter.error(f"tensor {name!r} is not a CurriculumLoRALinear entry.", tensor=name)
        mod = modules.setdefault(module_of(m["module"], ""), {"adapters": {}, "scales": {}})
        if m["base"]:
            mod["base"] = name
        elif m["j"] is not None:
            mod["adapters"].setdefault(int(m["j"]), {})[m["ab"]] = name
        else:
            mod["scales"][int(m["sj"])] = name
    out = []
    for module, parts in sorted(modules.items()):
        n = len(parts["adapters"])
        stage = int(cfg.get("curriculum_stage", n))
        if not 0 <= stage <= n:
            raise InputError(f"adapter {adapter.path}: curriculum_stage={stage} but module {module!r} has {n} "
                             f"adapters (stages 0..{n}).", path=adapter.path)
        if stage == 0:
            continue
        for j in range(stage):
            if set(parts["adapters"].get(j, {})) != {"lora_A", "lora_B"} or j not in parts["scales"]:
                raise adapter.error(f"module {module!r} lacks adapters.{j}.lora_A/lora_B or adapter_scales.{j}.logit.",
                                    tensor=module)
        if "base" not in parts:
            raise adapter.error(f"module {module!r} lacks base_weight_scale.logit.", tensor=module)

        def fn(current, original, p=parts, stage=stage):
            alpha0 = base_init + rng * math.tanh(adapter.scalar(p["base"]))
            new = alpha0 * original
            for j in range(stage):
                aj = ad_init + rng * math.tanh(adapter.scalar(p["scales"][j]))
                ab = p["adapters"][j]
                new = new + (aj * scaling) * (adapter.get(ab["lora_B"]) @ adapter.get(ab["lora_A"]))
            return current + (new - original)

        first = parts["adapters"][0]
        out.append(Update(module, "weight", f"curriculum lora (stage {stage})", fn,
                          out_in=(adapter.shape(first["lora_B"])[0], adapter.shape(first["lora_A"])[1])))
    return out
