"""``surgery grow``: grow a TokenFormer checkpoint's parameter tokens, streaming, and check
that the function is kept.

The plan: every ``*_param_tokens`` tensor of a grown kind is computed on its own (old
tokens + new ones, :mod:`surgery.grow.growth`); every other tensor is copied (or cast)
through the engine; the config's slot counts are updated. Before anything is written the
reference forward (:func:`surgery.grow.model.lm_logits`) runs on seeded random token ids
with the old and the grown tensors, each read one layer at a time; an init that should be
exact but deviates beyond float tolerance raises :class:`CheckFailedError` and nothing is
written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..core.engine import OutputTensor, cast_tensor, dtype_name, parse_dtype, write_checkpoint
from ..core.errors import CheckFailedError, InputError, UsageError
from ..core.device import check_device
from ..core.formats import read_json, read_yaml
from ..core.progress import Progress
from ..core.result import Result
from .growth import INITS, exact_for, grow_keys, grow_values, key_rank, new_scale_tokens
from .model import (EMBEDDING, KINDS, NORM_SLOT_FIELDS, SLOT_FIELDS, PattentionSite, TokenFormerConfig,
                    find_pattention, lm_logits, normalize_keys)

# Most parameter tokens a grown layer may get (released TokenFormers use a few thousand);
# checked, with the memory a grown tensor needs, before anything is allocated.
MAX_TOKENS = 2**24

# Largest relative logit deviation an exact init may show, by the dtype the grown tokens are
# stored in (the new keys of `gram` are rounded to it; `tile` and `zero` are bit-exact).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a GPT-NeoX YAML (the official ``configs/tokenformer/*.yml``) or a JSON config."""
    p = Path(path).expanduser()
    if p.suffix == ".json":
        data = read_json(p, what="config file", expect=None)
    else:
        data = read_yaml(p, what="config file", expect=None)
    if not isinstance(data, dict):
        raise InputError(f"config file {p} does not hold a mapping of settings.", path=p)
    return data


def plan_targets(current: dict[str, int], *, tokens: int | None = None, qkv_tokens: int | None = None,
                 proj_tokens: int | None = None, ffn_tokens: int | None = None,
                 factor: float | None = None) -> dict[str, int]:
    """Token counts after growth per kind (qkv / proj / ffn) from the user's options.

    Raises:
        UsageError: no size or conflicting sizes given, a count below the current one, or
            nothing to grow.
    """
    per_kind = {"qkv": qkv_tokens, "proj": proj_tokens, "ffn": ffn_tokens}
    given = [name for name, v in (("`tokens`", tokens), ("`factor`", factor)) if v is not None]
    if any(v is not None for v in per_kind.values()):
        given.append("`qkv_tokens`/`proj_tokens`/`ffn_tokens`")
    if not given:
        raise UsageError("say how many parameter tokens to grow to: `tokens`, `qkv_tokens`/`proj_tokens`/"
                         "`ffn_tokens`, or `factor`.")
    if len(given) > 1:
        raise UsageError(f"give only one of {', '.join(given)}.")
    if factor is not None and not math.isfinite(factor):
        raise UsageError(f"`factor` must be a finite number, got {factor}.")
    for flag, v in (("tokens", tokens), *((f"{k}_tokens", n) for k, n in per_kind.items())):
        if v is not None and not 1 <= v <= MAX_TOKENS:
            raise UsageError(f"`{flag}` {v} is outside 1..{MAX_TOKENS}; no TokenFormer layer has more parameter tokens.")
    if tokens is not None:
        targets = {k: int(tokens) for k in KINDS}
    elif factor is not None:
        if factor < 1:
            raise UsageError(f"`factor` {factor} would shrink the layers; growth needs a factor of at least 1.")
        targets = {k: int(round(factor * current[k])) for k in KINDS}
    else:
        targets = {k: int(per_kind[k]) if per_kind[k] is not None else current[k] for k in KINDS}
    for k in KINDS:
        if targets[k] > MAX_TOKENS:
            raise UsageError(f"`factor` {factor:g} would give {SLOT_FIELDS[k]} = {targets[k]}, above the limit of "
                             f"{MAX_TOKENS} tokens.")
        if targets[k] < current[k]:
            raise UsageError(f"{SLOT_FIELDS[k]} is {current[k]} and growth only adds tokens, so {targets[k]} "
                             f"is too few; ask for at least {current[k]} (per kind with --{k}-tokens).")
    if targets == current:
        raise UsageError(f"the checkpoint already has {', '.join(f'{SLOT_FIELDS[k]}={current[k]}' for k in KINDS)}; "
                         f"nothing to grow.")
    return targets


def _as_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def grow(source: str | Path, output: str | Path, *, tokens: int | None = None, qkv_tokens: int | None = None,
         proj_tokens: int | None = None, ffn_tokens: int | None = None, factor: float | None = None,
         init: str = "tile", seed: int = 0, verify: bool = True, tolerance: float | None = None,
         config_file: str | Path | None = None, dtype: str | None = None, shard_size: str = "5GB",
         force: bool = False, device: str = "cpu", verify_batch: int = 2, verify_seq_len: int = 32,
         progress: Progress | None = None, executor: Any = None) -> Result:
    """Grow the parameter tokens of a TokenFormer checkpoint (Wang et al. 2024, arXiv 2410.23168).

    Args:
        source: A safetensors TokenFormer checkpoint (official ``pytorch_model.bin`` files go
            through ``surgery convert`` first).
        output: Output folder.
        tokens: New token count for every kind (qkv, proj, ffn).
        qkv_tokens, proj_tokens, ffn_tokens: New counts per kind (others unchanged).
        factor: Multiply every kind's count by this.
        init: ``tile``, ``gram``, ``zero`` or ``random`` (:mod:`surgery.grow.growth`).
        seed: Seed of the random parts (gram's rotation, random init, verification ids).
        verify: Compare logits before and after on seeded random ids.
        tolerance: Largest relative deviation an exact init may show (default by dtype).
        config_file: GPT-NeoX YAML/JSON config, for checkpoints without a config.json.
        dtype: Output dtype (default: each tensor's own).
        shard_size, force, progress: As for every writing operation.
        device: Where the verification forward runs.
        verify_batch, verify_seq_len: Size of the random verification batch.
        executor: Where the output tensors are computed (:mod:`surgery.core.executor`; None:
            here). The verification forward always runs here, before anything is written.

    Returns:
        A Result: the written checkpoint and ``report["growth"]`` (slots before and after,
        the verification's deviations, notes).

    Raises:
        UsageError: bad sizes, tile with a non-multiple, gram on a norm it cannot keep.
        InputError: not a TokenFormer checkpoint, missing or inconsistent config.
        CheckFailedError: an exact init changed the logits beyond tolerance (nothing written).
    """
    if init not in INITS:
        raise UsageError(f"unknown `init` {init!r}; choose one of {', '.join(INITS)}.")
    target_dtype = parse_dtype(dtype)
    if verify:
        check_device(device)
    ckpt = open_checkpoint(str(source))
    sites = find_pattention(ckpt.names, label=ckpt.label)
    raw_cfg = normalize_keys(dict(ckpt.config or {}))
    if config_file is not None:
        raw_cfg.update(normalize_keys(load_config_file(config_file)))
    elif ckpt.config is None:
        raise InputError(f"{ckpt.label} has no config.json; pass the model's GPT-NeoX config as `config_file` "
                         f"(e.g. configs/tokenformer/150M_eval.yml from the TokenFormer repository).", path=ckpt.root)
    where = str(config_file) if config_file is not None else f"{ckpt.label}/config.json"
    config = TokenFormerConfig.from_dict(raw_cfg, where=where)
    current = {k: config.slots(k) for k in KINDS}
    _check_shapes(ckpt, sites, config, where)

    targets = plan_targets(current, tokens=tokens, qkv_tokens=qkv_tokens, proj_tokens=proj_tokens,
                           ffn_tokens=ffn_tokens, factor=factor)
    grown_kinds = [k for k in KINDS if targets[k] != current[k]]
    _check_memory(ckpt, sites, targets, grown_kinds)
    norm_type = config.norm_activation_type
    if init == "tile":
        for k in grown_kinds:
            if targets[k] % current[k]:
                raise UsageError(f"`init='tile'` repeats the {current[k]} old {k} tokens, so {SLOT_FIELDS[k]} must "
                                 f"become a multiple of {current[k]}, not {targets[k]}; use `init='gram'` for other sizes.")
    if init == "gram" and norm_type != "l2_norm_gelu":
        raise UsageError(f"`init='gram'` keeps the function only for norm_activation_type l2_norm_gelu (the norm is "
                         f"taken before the GeLU, so matching the key Gram matrix matches ‖A‖); this model uses "
                         f"{norm_type}: use `init='tile'`, which is exact for every normalisation.")
    n_eff = {k: float(config.scale_tokens(k) or current[k]) for k in KINDS}
    new_eff = {k: (new_scale_tokens(init, current[k], targets[k], n_eff[k]) if k in grown_kinds else n_eff[k])
               for k in KINDS}
    if init == "gram":
        _check_gram_ranks(ckpt, sites, current, targets)

    by_key = {s.key_name: s for s in sites if s.kind in grown_kinds}
    by_value = {s.value_name: s for s in sites if s.kind in grown_kinds}

    def out_dtype(name: str) -> torch.dtype:
        info = ckpt.info(name)
        return target_dtype if (target_dtype is not None and info.dtype.is_floating_point) else info.dtype

    def grown(name: str) -> torch.Tensor:
        if name in by_key:
            s = by_key[name]
            return grow_keys(ckpt.get(name, dtype=torch.float64), targets[s.kind], init, n_eff=n_eff[s.kind],
                             seed=seed, name=name)
        s = by_value[name]
        return grow_values(ckpt.get(name, dtype=torch.float64), targets[s.kind], init, seed=seed, name=name,
                           num_layers=config.num_layers, hidden_size=config.hidden_size)

    frozen_after = {k: new_eff[k] for k in KINDS if new_eff[k] != targets[k]}
    config_after = dataclasses.replace(config, qkv_slot_num=targets["qkv"], proj_slot_num=targets["proj"],
                                       ffn_slot_num=targets["ffn"], norm_slot_num=frozen_after)
    cfg_update: dict[str, Any] = dict(raw_cfg) if config_file is not None else {}
    cfg_update.update({SLOT_FIELDS[k]: targets[k] for k in KINDS})
    for k in KINDS:
        if k in frozen_after or NORM_SLOT_FIELDS[k] in raw_cfg:
            cfg_update[NORM_SLOT_FIELDS[k]] = _as_number(new_eff[k])

    exact = exact_for(init, norm_type)
    notes = _notes(init, norm_type, frozen_after)
    report: dict[str, Any] = {
        "init": init, "seed": seed, "norm_activation_type": norm_type, "exact": exact,
        "slots": {k: {"field": SLOT_FIELDS[k], "before": current[k], "after": targets[k],
                      "tensors": 2 * sum(1 for s in sites if s.kind == k),
                      "scale_tokens_before": _as_number(n_eff[k]), "scale_tokens_after": _as_number(new_eff[k])}
                  for k in KINDS},
        "frozen_scale": {NORM_SLOT_FIELDS[k]: _as_number(v) for k, v in frozen_after.items()},
        "notes": notes,
    }

    if verify:
        tol = tolerance if tolerance is not None else _default_tolerance(
            [out_dtype(s.key_name) for s in sites if s.kind in grown_kinds])
        report["verify"] = _verify(ckpt, sites, config, config_after, out_dtype, grown, set(by_key) | set(by_value),
                                   raw_cfg, seed=seed, batch=verify_batch, seq_len=verify_seq_len, device=device,
                                   tolerance=tol, exact=exact)
        if exact and not report["verify"]["passed"]:
            v = report["verify"]
            raise CheckFailedError(
                f"`init='{init}'` should keep the function of {ckpt.label} but the logits moved by {v['max_rel_dev']:.3g} "
                f"(relative; max abs {v['max_abs_dev']:.3g}), above the tolerance {tol:.3g}; nothing was written.",
                report={"growth": report}, path=ckpt.root)
    else:
        report["verify"] = None

    plan: list[OutputTensor] = []
    for name in ckpt.names:
        if name in by_key or name in by_value:
            info = ckpt.info(name)
            s = by_key.get(name) or by_value[name]
            plan.append(OutputTensor(name, (targets[s.kind], info.shape[1]), out_dtype(name),
                                     compute=(lambda name=name: grown(name))))
        else:
            plan.append(cast_tensor(ckpt, name, target_dtype))
    params = {"init": init, "seed": seed, "dtype": dtype_name(target_dtype) if target_dtype else None,
              **{SLOT_FIELDS[k]: {"from": current[k], "to": targets[k]} for k in KINDS}}
    result = write_checkpoint(plan, output, donor=ckpt, operation="grow", parameters=params, inputs=[ckpt],
                              input_roles=["base"], input_paths=[config_file] if config_file is not None else (),
                              dtype=target_dtype, shard_size=shard_size, force=force, progress=progress,
                              config_update=cfg_update, extra_record=lambda: {"growth": report}, executor=executor)
    return Result({"growth": report}, result)


def _check_shapes(ckpt: Checkpoint, sites: list[PattentionSite], config: TokenFormerConfig, where: str) -> None:
    """Every param-token tensor pair is 2-D, agrees on n, and n is the config's slot count;
    the checkpoint has as many blocks as the config's num_layers."""
    blocks = {s.block for s in sites}
    if len(blocks) != config.num_layers:
        raise InputError(f"{ckpt.label} has Pattention tensors in {len(blocks)} block(s) but {where} says num_layers = "
                         f"{config.num_layers}; the config does not describe this checkpoint, fix it.", path=ckpt.root)
    for s in sites:
        k, v = ckpt.info(s.key_name), ckpt.info(s.value_name)
        if len(k.shape) != 2 or len(v.shape) != 2 or k.shape[0] != v.shape[0]:
            raise InputError(f"{ckpt.label}: {s.key_name} {tuple(k.shape)} and {s.value_name} {tuple(v.shape)} are not "
                             f"a pair of [n, d] token matrices with the same n.", tensor=s.key_name)
        if k.shape[0] != config.slots(s.kind):
            raise InputError(f"{ckpt.label}: {s.key_name} holds {k.shape[0]} tokens but {where} says "
                             f"{SLOT_FIELDS[s.kind]} = {config.slots(s.kind)}; fix the config.", tensor=s.key_name)


def _check_memory(ckpt: Checkpoint, sites: list[PattentionSite], targets: dict[str, int], grown: list[str]) -> None:
    """Refuse a growth whose largest grown tensor (built in float64) would not fit in half of
    this machine's memory, before anything is allocated."""
    need = max((targets[s.kind] * ckpt.info(s.key_name).shape[1] * 8 for s in sites if s.kind in grown), default=0)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if need > total // 2:
        raise UsageError(f"growing to {max(targets.values())} tokens needs {need / 2**30:.1f} GiB for one grown tensor "
                         f"(float64), more than half of this machine's {total / 2**30:.1f} GiB; ask for fewer tokens.")


def _check_gram_ranks(ckpt: Checkpoint, sites: list[PattentionSite], current: dict[str, int],
                      targets: dict[str, int]) -> None:
    """gram needs m ≥ rank(K) new tokens; check from shapes, read keys only when in doubt."""
    for s in sites:
        m = targets[s.kind] - current[s.kind]
        if m == 0:
            continue
        n, d = ckpt.info(s.key_name).shape
        if m >= min(n, d):
            continue
        r = key_rank(ckpt.get(s.key_name, dtype=torch.float64))
        if m < r:
            raise UsageError(
                f"`init='gram'` needs at least rank(K) = {r} new tokens for {s.key_name} (K_newᵀK_new must equal a "
                f"multiple of K_oldᵀK_old, which has rank {r}), but {SLOT_FIELDS[s.kind]} {current[s.kind]} -> "
                f"{targets[s.kind]} adds {m}; grow to at least {current[s.kind] + r} or use `init='tile'`.",
                tensor=s.key_name)


def _default_tolerance(dtypes: list[torch.dtype]) -> float:
    return max((TOLERANCE.get(dt, 1e-5) for dt in dtypes), default=1e-5)


def _notes(init: str, norm_type: str, frozen: dict[str, float]) -> list[str]:
    notes = []
    if init == "zero":
        if norm_type == "softmax":
            notes.append("zero keys are not exact with softmax: each adds exp(0) = 1 to the denominator.")
        notes.append("zero keeps the function only for a forward that scales by the recorded "
                     + ", ".join(NORM_SLOT_FIELDS[k] for k in frozen)
                     + " instead of the live token count; the released TokenFormer code does not read it.")
    if init == "random":
        notes.append("random follows the released code (keys N(0, 0.02²), values N(0, (2/(L·√d))²)) and changes "
                     "the function; continue training to recover.")
    return notes


def _verify(ckpt: Checkpoint, sites: list[PattentionSite], before: TokenFormerConfig, after: TokenFormerConfig,
            out_dtype: Callable[[str], torch.dtype], grown: Callable[[str], torch.Tensor], grown_names: set[str],
            raw_cfg: dict[str, Any], *, seed: int, batch: int, seq_len: int, device: str, tolerance: float,
            exact: bool) -> dict[str, Any]:
    """Logits of the model before and after growth on the same seeded ids, both with every
    tensor rounded to its output dtype, so the comparison isolates the growth."""
    compute = torch.float32 if str(device).startswith("mps") else torch.float64
    vocab = ckpt.info(EMBEDDING).shape[0] if EMBEDDING in ckpt else None
    if vocab is None:
        raise InputError(f"{ckpt.label} has no {EMBEDDING}; the reference forward cannot run, use `verify=False`.",
                         tensor=EMBEDDING)
    max_len = raw_cfg.get("max_position_embeddings") or raw_cfg.get("seq_length") or seq_len
    seq = max(1, min(seq_len, int(max_len)))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))

    def get_before(name: str) -> torch.Tensor:
        return ckpt.get(name, dtype=None).to(out_dtype(name)).to(device=device, dtype=compute)

    def get_after(name: str) -> torch.Tensor:
        if name in grown_names:
            return grown(name).to(out_dtype(name)).to(device=device, dtype=compute)
        return get_before(name)

    def rows(name: str, start: int, stop: int) -> torch.Tensor:  # embedding / head: never grown
        return ckpt.get_rows(name, start, stop, dtype=None).to(out_dtype(name)).to(device=device, dtype=compute)

    has = ckpt.__contains__
    with torch.no_grad():
        ref = lm_logits(get_before, has, sites, before, ids, get_rows=rows, vocab_size=vocab)
        new = lm_logits(get_after, has, sites, after, ids, get_rows=rows, vocab_size=vocab)
    dev = (new - ref).abs()
    max_abs = float(dev.max())
    scale = float(ref.abs().max())
    max_rel = max_abs / scale if scale > 0 else max_abs
    return {"batch": batch, "seq_len": seq, "seed": seed, "compute_dtype": dtype_name(compute),
            "max_abs_dev": max_abs, "max_rel_dev": max_rel, "max_abs_logit": scale,
            "mean_abs_dev": float(dev.mean()), "tolerance": tolerance, "exact_expected": exact,
            "passed": (max_rel <= tolerance) if exact else None}
