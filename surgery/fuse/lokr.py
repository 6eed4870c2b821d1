"""PEFT LoKr (Kronecker product, LyCORIS / KronA, https://arxiv.org/abs/2309.14859):
``ΔW = kron(w1, w2) · alpha / r`` where ``w1`` is stored whole (``lokr_w1``) or as
``lokr_w1_a @ lokr_w1_b`` and likewise ``w2``; reshaped to the base tensor.
``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``alpha``."""

from __future__ import annotations

import torch

from ..core.errors import InputError
from .base import Adapter, Update, group_by_module, pattern_value, replace_update
from .loha import _split

SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    out: list[Update] = []
    groups = group_by_module(adapter, SUFFIXES)
    for module, parts in sorted(groups.items()):
        if "lokr_t2" in parts:
            raise InputError(f"adapter {adapter.path}: module {module!r} is a convolution LoKr (lokr_t2), which "
                             f"surgery fuse does not support.", path=adapter.path, tensor=module)
        for side in ("w1", "w2"):
            if f"lokr_{side}" not in parts and not (f"lokr_{side}_a" in parts and f"lokr_{side}_b" in parts):
                raise adapter.error(f"module {module!r} lacks lokr_{side} (or lokr_{side}_a and _b).", tensor=module)
        r = int(pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("alpha", 8)))
        scale = alpha / r

        def factor(p, side):
            if f"lokr_{side}" in p:
                return adapter.get(p[f"lokr_{side}"])
            return adapter.get(p[f"lokr_{side}_a"]) @ adapter.get(p[f"lokr_{side}_b"])

        def fn(current, original, p=parts, scale=scale, module=module):
            d = torch.kron(factor(p, "w1"), factor(p, "w2")) * scale
            if d.numel() != current.numel():
                raise adapter.error(f"module {module!r} produces {list(d.shape)} for a base tensor of "
                                    f"{list(current.shape)}.", tensor=module)
            return current + d.reshape(current.shape)

        def dims(p, side):
            if f"lokr_{side}" in p:
                return adapter.shape(p[f"lokr_{side}"])[:2]
            return adapter.shape(p[f"lokr_{side}_a"])[0], adapter.shape(p[f"lokr_{side}_b"])[1]

        (o1, i1), (o2, i2) = dims(parts, "w1"), dims(parts, "w2")
        out.append(Update(module, "weight", "lokr", fn, out_in=(o1 * o2, i1 * i2), match="numel"))
    claimed = {n for p in groups.values() for n in p.values()}
    out += [replace_update(adapter, *_split(n), n) for n in adapter.names if n not in claimed]
    return out
