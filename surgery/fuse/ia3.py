"""PEFT (IA)³ (Liu et al. 2022, https://arxiv.org/abs/2205.05638): a learned vector ``l``
rescales the weight. ``ia3_l`` of shape ``[out, 1]`` scales output rows (and the bias, as
PEFT merges it); ``[1, in]`` (``feedforward_modules``) scales input columns. In the
``[out, in]`` view: ``W' = W ⊙ l`` (broadcast); GPT-2 ``Conv1D`` is handled by transposing."""

from __future__ import annotations

from .base import Adapter, Update, group_by_module, is_transposed, out_major, replace_update
from .loha import _split


def updates(adapter: Adapter) -> list[Update]:
    fan = bool(adapter.config.get("fan_in_fan_out", False))
    out: list[Update] = []
    groups = group_by_module(adapter, ("ia3_l",))
    for module, parts in sorted(groups.items()):
        name = parts["ia3_l"]
        shape = adapter.shape(name)
        if len(shape) != 2 or 1 not in shape:
            raise adapter.error(f"{name} has shape {list(shape)}; expected [out, 1] or [1, in].", tensor=name)
        feedforward = shape[0] == 1 and shape[1] != 1

        def fn(current, original, name=name, feedforward=feedforward, module=module):
            vec = adapter.get(name).flatten()
            n = len(vec)
            if current.ndim != 2 or current.numel() % n:
                raise adapter.error(f"{name} has {n} entries; the base tensor is {list(current.shape)}.", tensor=name)
            out_in = (current.numel() // n, n) if feedforward else (n, current.numel() // n)
            t = is_transposed(out_in, tuple(current.shape), fan)
            if t is None:
                raise adapter.error(f"{name} has {n} entries; the base tensor is {list(current.shape)}.", tensor=name)
            v = out_major(current, t)
            v = v * (vec.unsqueeze(0) if feedforward else vec.unsqueeze(1))
            return out_major(v, t)

        out.append(Update(module, "weight", "ia3 (feed-forward)" if feedforward else "ia3", fn))
        if not feedforward:
            out.append(Update(module, "bias", "ia3", lambda cur, orig, name=name: cur * adapter.get(name).flatten(),
                              optional=True))
    claimed = {n for p in groups.values() for n in p.values()}
    out += [replace_update(adapter, *_split(n), n) for n in adapter.names if n not in claimed]
    return out
