"""PEFT VeRA (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454):
``ΔW = diag(λ_b) B diag(λ_d) A`` with ``A [r, in_max]`` and ``B [out_max, r]`` shared by all
layers and sliced to each layer (``A[:, :in]``, ``B[:out]``); ``fan_in_fan_out`` transposes.

The shared matrices are read from the adapter (``save_projection=True``, PEFT's default) or
regenerated exactly as PEFT does: a CPU ``torch.Generator`` seeded with
``projection_prng_key`` draws ``A`` then ``B`` from Kaiming-uniform
(``bound = √3 · √2 / √fan_in``), with ``(out_max, in_max)`` the largest shape among the
adapted layers of the base."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .base import Adapter, Update, group_by_module, orient, replace_update
from .loha import _split

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def updates(adapter: Adapter, shape_of: Callable[[str], tuple[int, ...]] | None = None) -> list[Update]:
    """``shape_of(module)`` gives the stored base weight shape; needed only to regenerate A and B."""
    cfg = adapter.config
    fan = bool(cfg.get("fan_in_fan_out", False))
    groups = group_by_module(adapter, ("vera_lambda_b", "vera_lambda_d"))
    r = int(cfg.get("r", 256))
    shared: dict[str, torch.Tensor] = {}

    def projections() -> tuple[torch.Tensor, torch.Tensor]:
        if not shared:
            if SHARED_A in adapter.names and SHARED_B in adapter.names:
                shared["A"] = adapter.tensors.get(SHARED_A, dtype=torch.float32, device=adapter.device)
                shared["B"] = adapter.tensors.get(SHARED_B, dtype=torch.float32, device=adapter.device)
            else:
                if shape_of is None:
                    raise adapter.error("the shared VeRA matrices are not saved (save_projection=False) and no base "
                                        "shapes were given to regenerate them.")
                out_max = in_max = 0
                for module in groups:
                    shape = shape_of(module)
                    n_out = adapter.shape(groups[module]["vera_lambda_b"])[0]
                    n_in = math.prod(shape) // n_out
                    out_max, in_max = max(out_max, n_out), max(in_max, n_in)
                g = torch.Generator(device="cpu").manual_seed(int(cfg.get("projection_prng_key", 0)))
                shared["A"] = _kaiming((r, in_max), g).to(adapter.device)
                shared["B"] = _kaiming((out_max, r), g).to(adapter.device)
        return shared["A"], shared["B"]

    out: list[Update] = []
    for module, parts in sorted(groups.items()):
        if len(parts) != 2:
            raise adapter.error(f"module {module!r} lacks vera_lambda_b or vera_lambda_d.", tensor=module)

        def fn(current, original, p=parts, module=module):
            a, b = projections()
            lam_b, lam_d = adapter.get(p["vera_lambda_b"]), adapter.get(p["vera_lambda_d"])
            n_out = len(lam_b)
            n_in = current.numel() // n_out
            if n_in > a.shape[1] or n_out > b.shape[0]:
                raise adapter.error(f"module {module!r} needs A[:, :{n_in}] and B[:{n_out}] but the shared matrices "
                                    f"are {list(a.shape)} and {list(b.shape)}.", tensor=module)
            d = (lam_b.unsqueeze(1) * b[:n_out]) @ (lam_d.unsqueeze(1) * a[:, :n_in])
            return current + orient(d, tuple(current.shape), fan, adapter, module)

        out.append(Update(module, "weight", "vera", fn))
    claimed = {n for p in groups.values() for n in p.values()} | {SHARED_A, SHARED_B}
    out += [replace_update(adapter, *_split(n), n) for n in adapter.names if n not in claimed]
    return out
