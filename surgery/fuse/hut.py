"""HUT, Hadamard Updated Transformation (Zhang, Zhou & Chen 2024,
https://arxiv.org/abs/2409.13501): the updated weight is a Hadamard transformation of the
original weight by the product of two low-rank matrices, ``W' = W₀ ⊙ f(B A)``.

surgery reads HUT adapters in the PEFT folder layout (see docs/fuse.md, "HUT format"):
``adapter_config.json`` with ``"peft_type": "HUT"`` and per module
``base_model.model.<module>.hut_A [r, in]`` and ``.hut_B [out, r]``. The form is stated in
the config, never guessed:

- ``"hut_form": "multiplicative"``: ``W' = W₀ ⊙ (s · B A)``,
- ``"hut_form": "residual"``: ``W' = W₀ ⊙ (1 + s · B A) = W₀ + s · W₀ ⊙ (B A)`` (PEFT's HiRA form),

with ``s = scaling`` (default 1.0) and ``fan_in_fan_out`` transposing ``B A``."""

from __future__ import annotations

from ..core.errors import InputError
from .base import Adapter, Update, group_by_module, orient

FORMS = ("multiplicative", "residual")


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    form = cfg.get("hut_form")
    if form is None:
        raise InputError(f"adapter {adapter.path} does not state its HUT form; add \"hut_form\": \"multiplicative\" "
                         f"(W0 * (s B A)) or \"residual\" (W0 * (1 + s B A)) to its adapter_config.json.",
                         path=adapter.path)
    if form not in FORMS:
        raise InputError(f"adapter {adapter.path} has hut_form={form!r}; choose one of {', '.join(FORMS)}.",
                         path=adapter.path)
    s = float(cfg.get("scaling", 1.0))
    fan = bool(cfg.get("fan_in_fan_out", False))
    groups = group_by_module(adapter, ("hut_A", "hut_B"))
    extra = sorted(set(adapter.names) - {n for p in groups.values() for n in p.values()})
    if extra:
        raise adapter.error(f"tensor {extra[0]!r} is not a HUT tensor (hut_A / hut_B).", tensor=extra[0])
    out = []
    for module, parts in sorted(groups.items()):
        if len(parts) != 2:
            raise adapter.error(f"module {module!r} lacks hut_A or hut_B.", tensor=module)

        def fn(current, original, p=parts, module=module):
            m = orient(adapter.get(p["hut_B"]) @ adapter.get(p["hut_A"]), tuple(current.shape), fan, adapter, module)
            new = original * (s * m) if form == "multiplicative" else original * (1.0 + s * m)
            # the change this adapter makes to W0, applied on top of earlier adapters
            return current + (new - original)

        out.append(Update(module, "weight", f"hut ({form})", fn, out_in=(adapter.shape(parts["hut_B"])[0],
                                                                         adapter.shape(parts["hut_A"])[1]),
                          fan_in_fan_out=fan))
    return out
