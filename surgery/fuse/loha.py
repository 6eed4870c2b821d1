"""PEFT LoHa (Hadamard product of two low-rank products, FedPara / LyCORIS,
https://arxiv.org/abs/2108.06098): ``ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha / r``, reshaped to the
base tensor (PEFT applies no ``fan_in_fan_out`` transpose here). ``rank_pattern`` /
``alpha_pattern`` override ``r`` / ``alpha``. Convolution (CP) factors are not supported."""

from __future__ import annotations

from ..core.errors import InputError
from .base import Adapter, Update, group_by_module, pattern_value, replace_update

SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    out: list[Update] = []
    groups = group_by_module(adapter, SUFFIXES)
    for module, parts in sorted(groups.items()):
        if "hada_t1" in parts or "hada_t2" in parts:
            raise InputError(f"adapter {adapter.path}: module {module!r} is a convolution LoHa (hada_t1/t2), which "
                             f"surgery fuse does not support.", path=adapter.path, tensor=module)
        missing = [s for s in SUFFIXES[:4] if s not in parts]
        if missing:
            raise adapter.error(f"module {module!r} lacks {missing}.", tensor=module)
        r = int(pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("alpha", 8)))
        scale = alpha / r

        def fn(current, original, p=parts, scale=scale, module=module):
            d = (adapter.get(p["hada_w1_a"]) @ adapter.get(p["hada_w1_b"])) * \
                (adapter.get(p["hada_w2_a"]) @ adapter.get(p["hada_w2_b"])) * scale
            if d.numel() != current.numel():
                raise adapter.error(f"module {module!r} produces {list(d.shape)} for a base tensor of "
                                    f"{list(current.shape)}.", tensor=module)
            return current + d.reshape(current.shape)

        out_in = (adapter.shape(parts["hada_w1_a"])[0], adapter.shape(parts["hada_w1_b"])[-1])
        out.append(Update(module, "weight", "loha", fn, out_in=out_in, match="numel"))
    claimed = {n for p in groups.values() for n in p.values()}
    out += [replace_update(adapter, *_split(n), n) for n in adapter.names if n not in claimed]
    return out


def _split(name: str) -> tuple[str, str]:
    from .base import module_of

    param = name.rsplit(".", 1)[1]
    return module_of(name, "." + param), param
