"""PEFT HiRA (Hadamard High-Rank Adaptation, Huang et al., ICLR 2025,
https://openreview.net/forum?id=TwJrTz9cRS): the additive Hadamard form
``W' = W + W₀ ⊙ (B A)``, no scaling, ``B = hira_B [out, r]``, ``A = hira_A [r, in]``;
``fan_in_fan_out`` transposes ``B A``."""

from __future__ import annotations

from .base import Adapter, Update, group_by_module, orient, replace_update
from .loha import _split


def updates(adapter: Adapter) -> list[Update]:
    fan = bool(adapter.config.get("fan_in_fan_out", False))
    out: list[Update] = []
    groups = group_by_module(adapter, ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"))
    for module, parts in sorted(groups.items()):
        if "hira_A" not in parts or "hira_B" not in parts:
            raise adapter.error(f"module {module!r} has {sorted(parts)}; only linear HiRA (hira_A, hira_B) is "
                                f"supported.", tensor=module)

        def fn(current, original, p=parts, module=module):
            ba = adapter.get(p["hira_B"]) @ adapter.get(p["hira_A"])
            return current + original * orient(ba, tuple(current.shape), fan, adapter, module)

        out.append(Update(module, "weight", "hira", fn, out_in=(adapter.shape(parts["hira_B"])[0],
                                                                adapter.shape(parts["hira_A"])[1]),
                          fan_in_fan_out=fan))
    claimed = {n for p in groups.values() for n in p.values()}
    out += [replace_update(adapter, *_split(n), n) for n in adapter.names if n not in claimed]
    return out
