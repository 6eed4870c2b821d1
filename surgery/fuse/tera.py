"""TeRA, vector-based random tensor network for high-rank adaptation (Gu, Zhou, Iacovides &
Mandic 2025, https://arxiv.org/abs/2509.03234, code github.com/guyuxuan9/TeRA): the weight
update, reshaped to a tensor, is a Tucker-like network whose large random factors are frozen
and shared by all layers of one shape, while each layer trains only diagonal scaling vectors.

Accepted format (docs/fuse.md, "TeRA format"), in the PEFT folder layout:
``adapter_config.json`` with ``"peft_type": "TERA"``, ``scaling`` (default 1.0),
``fan_in_fan_out`` (default false) and ``groups``: one entry per shared factor set::

    "groups": {"attn": {"out_in": [64, 64], "tensor_shape": [8, 8, 8, 8], "ranks": [4, 4, 4, 4],
                        "generator": {"seed": 0, "distribution": "normal", "std": 1.0,
                                      "sha256": "<hex>"}}}

A module belongs to the group whose ``out_in`` equals its ``[out, in]``. The shared core
``G [R_1..R_N]`` and factors ``U_k [n_k, R_k]`` are stored as ``tera.<group>.core`` and
``tera.<group>.factor_<k>``, or regenerated from ``generator``: a CPU ``torch.Generator``
seeded with ``seed`` draws the core and then ``factor_0 .. factor_{N-1}`` in that order
(``normal``: ``randn · std``; ``uniform``: ``U(-bound, bound)``); the sha256 of their
float32 bytes in that order must equal ``sha256``, otherwise the recipe is refused. Each
module stores ``base_model.model.<module>.tera_lambda_<k> [R_k]`` for every mode ``k``, and

    ΔW = s · reshape(G ×_1 (U_1 diag λ_1) ×_2 … ×_N (U_N diag λ_N), [out, in])

(row-major reshape; ``fan_in_fan_out`` transposes).
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

from ..core.errors import InputError
from .base import Adapter, Update, module_of, orient

LAMBDA = re.compile(r"^(?P<module>.+)\.tera_lambda_(?P<k>\d+)$")
SHARED = re.compile(r"^tera\.(?P<group>[^.]+)\.(?P<what>core|factor_\d+)$")


def generate(spec: dict, generator_spec: dict) -> dict[str, torch.Tensor]:
    """The shared core and factors of one group, drawn from its generator recipe."""
    shape, ranks = [int(x) for x in spec["tensor_shape"]], [int(x) for x in spec["ranks"]]
    g = torch.Generator(device="cpu").manual_seed(int(generator_spec["seed"]))
    dist = generator_spec.get("distribution", "normal")
    shapes = [("core", tuple(ranks))] + [(f"factor_{k}", (n, r)) for k, (n, r) in enumerate(zip(shape, ranks))]
    out = {}
    for name, shp in shapes:
        if dist == "normal":
            out[name] = torch.randn(shp, generator=g) * float(generator_spec.get("std", 1.0))
        elif dist == "uniform":
            b = float(generator_spec.get("bound", 1.0))
            out[name] = torch.empty(shp).uniform_(-b, b, generator=g)
        else:
            raise ValueError(dist)
    return out


def recipe_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the float32 bytes of core, factor_0, factor_1, ... in that order."""
    h = hashlib.sha256()
    for name in ["core"] + sorted((k for k in tensors if k != "core"), key=lambda k: int(k.split("_")[1])):
        h.update(tensors[name].contiguous().to(torch.float32).numpy().tobytes())
    return h.hexdigest()


def tucker(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``G ×_1 F_1 ×_2 … ×_N F_N`` with ``F_k [n_k, R_k]``: contract mode k of the core with F_k."""
    t = core
    for f in factors:
        # contract the leading rank axis; the new n_k axis goes last, so after N steps the
        # axes are (n_1, ..., n_N) again
        t = torch.tensordot(t, f, dims=([0], [1]))
    return t


def updates(adapter: Adapter) -> list[Update]:
    cfg = adapter.config
    groups = cfg.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"adapter {adapter.path}: a TeRA config needs a non-empty 'groups' table (docs/fuse.md).",
                         path=adapter.path)
    s = float(cfg.get("scaling", 1.0))
    fan = bool(cfg.get("fan_in_fan_out", False))
    for gname, spec in groups.items():
        for key in ("out_in", "tensor_shape", "ranks"):
            if key not in spec:
                raise InputError(f"adapter {adapter.path}: TeRA group {gname!r} needs {key!r}.", path=adapter.path)
        if math.prod(spec["tensor_shape"]) != math.prod(spec["out_in"]) or len(spec["ranks"]) != len(spec["tensor_shape"]):
            raise InputError(f"adapter {adapter.path}: TeRA group {gname!r} has tensor_shape {spec['tensor_shape']} "
                             f"and ranks {spec['ranks']}, which do not fit out_in {spec['out_in']}.", path=adapter.path)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def shared(gname: str) -> dict[str, torch.Tensor]:
        if gname not in cache:
            spec = groups[gname]
            n_modes = len(spec["tensor_shape"])
            names = ["core"] + [f"factor_{k}" for k in range(n_modes)]
            if all(f"tera.{gname}.{n}" in adapter.names for n in names):
                cache[gname] = {n: adapter.tensors.get(f"tera.{gname}.{n}", dtype=torch.float32, device=adapter.device)
                                for n in names}
            elif spec.get("generator"):
                gen = spec["generator"]
                if gen.get("distribution", "normal") not in ("normal", "uniform"):
                    raise InputError(f"adapter {adapter.path}: TeRA group {gname!r} asks for distribution "
                                     f"{gen.get('distribution')!r}; choose normal or uniform.", path=adapter.path)
                tensors = generate(spec, gen)
                got = recipe_sha256(tensors)
                if got != gen.get("sha256"):
                    raise InputError(f"adapter {adapter.path}: TeRA group {gname!r}'s generator recipe gives factors "
                                     f"with sha256 {got[:16]}…, not the recorded {str(gen.get('sha256'))[:16]}…; the "
                                     f"shared factors cannot be rebuilt on this setup, so save them explicitly "
                                     f"(tera.{gname}.core / factor_k).", path=adapter.path)
                cache[gname] = {n: t.to(adapter.device) for n, t in tensors.items()}
            else:
                raise InputError(f"adapter {adapter.path}: TeRA group {gname!r} has neither stored factors "
                                 f"(tera.{gname}.core, factor_k) nor a generator recipe.", path=adapter.path)
            expect = {"core": tuple(spec["ranks"])} | {f"factor_{k}": (n, r) for k, (n, r) in
                                                       enumerate(zip(spec["tensor_shape"], spec["ranks"]))}
            for n, shp in expect.items():
                if tuple(cache[gname][n].shape) != tuple(int(x) for x in shp):
                    raise adapter.error(f"TeRA group {gname!r}: {n} has shape {list(cache[gname][n].shape)}, "
                                        f"expected {list(shp)}.", tensor=f"tera.{gname}.{n}")
        return cache[gname]

    modules: dict[str, dict[int, str]] = {}
    for name in adapter.names:
        if SHARED.match(name):
            g = SHARED.match(name)["group"]
            if g not in groups:
                raise adapter.error(f"{name!r} belongs to group {g!r}, which the config does not declare.", tensor=name)
            continue
        m = LAMBDA.match(name)
        if not m:
            raise adapter.error(f"tensor {name!r} is not a TeRA tensor (tera_lambda_<k> or tera.<group>.*).", tensor=name)
        modules.setdefault(module_of(m["module"], ""), {})[int(m["k"])] = name

    out = []
    for module, lams in sorted(modules.items()):
        def fn(current, original, lams=lams, module=module):
            stored = tuple(current.shape)
            cands = [g for g, spec in groups.items()
                     if tuple(spec["out_in"]) in (stored, stored[::-1]) and len(spec["ranks"]) == len(lams)]
            if len(cands) > 1:
                exact = [g for g in cands if tuple(groups[g]["out_in"]) == (stored[::-1] if fan else stored)]
                cands = exact or cands
            if not cands:
                raise adapter.error(f"module {module!r} (base tensor {list(stored)}) matches no TeRA group.", tensor=module)
            gname = cands[0]
            spec, sh = groups[gname], shared(cands[0])
            factors = []
            for k in range(len(spec["ranks"])):
                if k not in lams:
                    raise adapter.error(f"module {module!r} lacks tera_lambda_{k}.", tensor=module)
                lam = adapter.get(lams[k])
                if lam.shape != (int(spec["ranks"][k]),):
                    raise adapter.error(f"{lams[k]} has shape {list(lam.shape)}, expected [{spec['ranks'][k]}].",
                                        tensor=lams[k])
                factors.append(sh[f"factor_{k}"] * lam.unsqueeze(0))
            d = tucker(sh["core"], factors).reshape(tuple(spec["out_in"])) * s
            return current + orient(d, stored, fan, adapter, module)

        out.append(Update(module, "weight", "tera", fn))
    return out
