"""Edit files to and from PEFT LoRA adapters (plain file conversion; the peft library is not needed).

PEFT's LoRA (https://github.com/huggingface/peft, paper: Hu et al. 2021,
https://arxiv.org/abs/2106.09685) stores, per adapted module ``M``,
``base_model.model.M.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r] with

* ``nn.Linear`` (weight [out, in]):          ΔW = scale · B A
* GPT-2 ``Conv1D`` (weight [in, out]):        ΔW = scale · (B A)ᵀ   (``fan_in_fan_out``)
* ``nn.Embedding`` (``lora_embedding_A`` [r, num], ``lora_embedding_B`` [dim, r]): ΔW = scale · (B A)ᵀ

where scale = alpha / r (alpha / √r with ``use_rslora``), alpha and r taken per module from
``alpha_pattern`` / ``rank_pattern`` when they match. The adapter is read and validated by
:mod:`surgery.checkpoint.peft`, the same parser ``surgery fuse`` uses. An edit keeps ΔW = u diag(s) vᵀ in the
stored layout, so the conversion only regroups factors.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.peft import WEIGHTS_NAME as ADAPTER_FILE_NAME, CONFIG_NAME as CONFIG_FILE_NAME, PEFT_PREFIX, LoraConfig, lora_modules, open_adapter_files
from ..core.engine import WriteResult
from ..core.determinism import svd
from ..core.errors import IncompatibleCheckpointsError, InputError, UsageError
from ..core.formats import text_safe
from ..core.result import Result
from .format import Edit, TensorEdit, load_edit, save_edit

ADAPTER_FILE = ADAPTER_FILE_NAME
CONFIG_FILE = CONFIG_FILE_NAME
# Saved full weights, not deltas: PEFT writes them next to adapted embeddings.
_IGNORED_SUFFIXES = (".base_layer.weight",)
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA adapters (use_dora) are not additive low-rank deltas",
    "lora_B.bias": "LoRA bias terms (lora_bias) are not supported",
    "modules_to_save": "modules_to_save holds whole replacement modules, not deltas",
}


def module_kinds(config: dict | None, modules: list[str]) -> dict[str, str]:
    """The layer type behind each module path ("linear", "conv1d", "embedding" or another class
    name), from a meta-device instance of the architecture in ``config`` (no weights loaded).

    Returns an empty dict when transformers cannot build the architecture.
    """
    if not config:
        return {}
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(config)
        model_type = cfg.pop("model_type")
        conf = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
    except Exception:  # an architecture transformers does not know: fall back to the adapter's own flags
        return {}
    named = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    kinds: dict[str, str] = {}
    for m in modules:
        mod = named.get(m) or (named.get(f"{prefix}.{m}") if prefix else None)
        if mod is None:
            continue
        cls = type(mod).__name__
        kinds[m] = {"Linear": "linear", "Conv1D": "conv1d", "Embedding": "embedding"}.get(cls, cls)
    return kinds


def from_peft(adapter: str | Path, output: str | Path, *, base: str | Path | Checkpoint | None = None,
              description: str = "", force: bool = False) -> Result:
    """Convert a PEFT LoRA adapter folder to an edit file.

    Args:
        adapter: Folder with adapter_config.json and adapter_model.safetensors.
        output: The edit ``.safetensors`` file to write.
        base: The base checkpoint: validates names and shapes, records the base tensors'
            sha256 (without it the edit records none and ``apply`` cannot verify the base).
        description: Free text for the metadata.
        force: Replace an existing output.

    Returns:
        A Result: the written edit file and a report (per tensor its rank and scale, and
        ignored adapter keys).
    """
    root, cfg, weights = open_adapter_files(adapter, command="surgery edit from-peft")
    lcfg = LoraConfig.from_config(cfg, root)      # one parser with fuse: validated r, alpha, patterns, init
    w_path = root / ADAPTER_FILE
    if lcfg.use_dora:
        raise InputError(f"{root} is a DoRA adapter: {_UNSUPPORTED['lora_magnitude_vector']}.", path=root)
    modules, others = lora_modules(lcfg, weights)
    ignored: list[str] = []
    for key in others:
        if key.endswith(_IGNORED_SUFFIXES):
            ignored.append(key)
            continue
        why = next((why for marker, why in _UNSUPPORTED.items() if marker in key), None)
        raise InputError(f"{w_path} has {key!r}: {why or 'it is not a LoRA factor (lora_A / lora_B / lora_embedding_*)'}.",
                         path=w_path, tensor=key)
    if not modules:
        raise InputError(f"{w_path} holds no LoRA factors.", path=w_path)
    ckpt = base if isinstance(base, Checkpoint) or base is None else open_checkpoint(str(base))
    fan_in_fan_out = lcfg.fan_in_fan_out
    arch = module_kinds(ckpt.config if ckpt is not None else None, sorted(modules))
    tensors: dict[str, TensorEdit] = {}
    rows = []
    for module, m in modules.items():
        if m.bias is not None:
            raise InputError(f"{w_path} has {m.bias!r}: {_UNSUPPORTED['lora_B.bias']}.", path=w_path, tensor=m.bias)
        a, b = weights.get(m.a), weights.get(m.b)
        r, scale = m.rank, m.scale
        if m.kind == "matrix":
            # The architecture, when known, says the layout; else PEFT's own fan_in_fan_out flag.
            layer = arch.get(module, "conv1d" if fan_in_fan_out else "linear")
            transposed = layer == "conv1d"
        else:
            layer, transposed = "embedding", True
        # Linear: ΔW = s·B·A = u diag(s) vᵀ with u = B, v = Aᵀ; Conv1D / Embedding: the transpose.
        u, v = (a.T, b) if transposed else (b, a.T)
        name = module + ".weight"
        tensors[name] = TensorEdit(name, u=u.contiguous(), v=v.contiguous(), s=torch.full((r,), scale))
        rows.append({"name": name, "layer": layer, "rank": r, "scale": scale})
    shas: dict[str, str] = {}
    if ckpt is not None:
        bad = [n for n in tensors if n not in ckpt]
        if bad:
            raise IncompatibleCheckpointsError(f"{root} adapts {bad[0]!r}, which {ckpt.label} does not have; "
                                               f"is it the adapter's base?", path=root, tensor=bad[0])
        for n, te in tensors.items():
            if te.shape != tuple(ckpt.info(n).shape):
                raise IncompatibleCheckpointsError(
                    f"{root} gives {n!r} a {te.shape} delta but it is {tuple(ckpt.info(n).shape)} in {ckpt.label}.",
                    path=root, tensor=n)
            shas[n] = ckpt.tensor_sha256(n)
    info = {"description": description or f"LoRA adapter {root.name}", "created_by": f"surgery edit from-peft {root}",
            "base": ckpt.label if ckpt is not None else str(cfg.get("base_model_name_or_path") or ""),
            "model_type": str((ckpt.config or {}).get("model_type", "")) if ckpt is not None else ""}
    edit = Edit(tensors, base_sha256=shas, info={k: v for k, v in info.items() if v},
                extra={"peft_config": json.dumps({k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora",
                                                                           "fan_in_fan_out", "target_modules")},
                                                  default=list)})
    written = save_edit(edit, output, force=force, inputs=[root] + (ckpt.input_paths() if ckpt is not None else []))
    return Result({"output": str(written.output), "adapter": str(root),
                   "base": ckpt.label if ckpt is not None else None, "base_verified": ckpt is not None,
                   "tensors": rows, "ignored": ignored}, written)


def to_peft(edit: str | Path | Edit, output: str | Path, *, base: str | Path | Checkpoint,
            rank: int | None = None, drop_vectors: bool = False, force: bool = False) -> Result:
    """Convert an edit file to a PEFT LoRA adapter folder.

    Low-rank entries convert exactly (s is split as √|s| between A and B, its sign put on B).
    Dense 2-D entries are factored by SVD: exactly at full rank, or truncated to ``rank``.
    Every module gets scale 1 (lora_alpha = r, ranks differing per module go in rank_pattern
    and alpha_pattern).

    Args:
        edit: Edit file (or loaded Edit).
        output: Adapter folder to create.
        base: The base checkpoint: its config gives each tensor's layer type (Linear,
            Conv1D, Embedding), and its label becomes base_model_name_or_path.
        rank: Truncate dense deltas to this rank (default: exact).
        drop_vectors: Leave out 1-D deltas (norms, biases), which LoRA cannot express,
            instead of refusing.
        force: Replace an existing output folder.
    """
    from ..checkpoint.writer import write_safetensors, write_text
    from ..core.output import atomic_output, check_output

    if rank is not None and rank < 1:
        raise UsageError(f"`rank` must be at least 1, got {rank}.")
    e = edit if isinstance(edit, Edit) else load_edit(edit)
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(str(base))
    out = Path(output)
    read_paths = ckpt.input_paths() + ([e.path] if e.path is not None else [])
    check_output(out, force=force, inputs=read_paths)
    modules = {n.removesuffix(".weight"): n for n in e.tensors if n.endswith(".weight")}
    kinds = module_kinds(ckpt.config, sorted(modules))
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    rows, dropped = [], []
    for name, te in sorted(e.tensors.items()):
        if len(te.shape) != 2:
            if drop_vectors:
                dropped.append(name)
                continue
            raise UsageError(f"{e.label} has a {len(te.shape)}-D delta for {name!r}, which LoRA cannot express; "
                             f"pass `drop_vectors=True` to leave such deltas out.", tensor=name)
        if name not in ckpt or tuple(ckpt.info(name).shape) != te.shape:
            raise IncompatibleCheckpointsError(f"{e.label} edits {name!r} with shape {te.shape}, which {ckpt.label} "
                                               f"does not have.", tensor=name)
        module = name.removesuffix(".weight")
        layer = kinds.get(module)
        if not name.endswith(".weight") or layer not in ("linear", "conv1d", "embedding"):
            raise UsageError(f"{name!r} is not the weight of a Linear, Conv1D or Embedding layer of "
                             f"{ckpt.label}'s architecture ({layer or 'unknown'}), so PEFT LoRA cannot adapt it.",
                             tensor=name)
        err = 0.0
        if te.low_rank:
            u, v = te.u.float(), te.v.float()  # type: ignore[union-attr]
            s = te.s.float() if te.s is not None else torch.ones(u.shape[1])
        else:
            d = te.dense.float()  # type: ignore[union-attr]
            uu, ss, vh = svd(d)   # the same bytes whatever the thread count
            r = int((ss > ss[0] * 1e-7).sum()) if ss.numel() and ss[0] > 0 else 1
            r = max(1, min(r, rank) if rank is not None else r)
            total = float((ss.double() ** 2).sum())
            err = math.sqrt(max(0.0, 1 - float((ss[:r].double() ** 2).sum()) / total)) if total > 0 else 0.0
            u, v, s = uu[:, :r], vh[:r].T, ss[:r]
        root = s.abs().sqrt()
        left, right = u * (root * torch.sign(s)), v * root  # ΔW = left · rightᵀ in the stored layout
        # Linear: B A = ΔW -> B = left, A = rightᵀ. Conv1D / Embedding: (B A)ᵀ = ΔW -> B = right, A = leftᵀ.
        b_mat, a_mat = (left, right.T) if layer == "linear" else (right, left.T)
        key = PEFT_PREFIX + module
        if layer == "embedding":
            state[key + ".lora_embedding_A"] = a_mat.contiguous()
            state[key + ".lora_embedding_B"] = b_mat.contiguous()
        else:
            state[key + ".lora_A.weight"] = a_mat.contiguous()
            state[key + ".lora_B.weight"] = b_mat.contiguous()
        ranks[module] = int(a_mat.shape[0])
        rows.append({"name": name, "layer": layer, "rank": ranks[module], "rel_error": err})
    if not state:
        raise UsageError(f"{e.label} has no matrix delta to convert.")
    r_max = max(ranks.values())
    differing = {re.escape(m): r for m, r in ranks.items() if r != r_max}
    # A local base is recorded absolute: PEFT resolves the path from wherever the adapter is
    # loaded, so "../smol" would only work from the folder this command ran in.
    named = Path(ckpt.label).expanduser()
    base_path = str(named.resolve()) if named.exists() else ckpt.label
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": r_max, "lora_alpha": r_max, "rank_pattern": differing, "alpha_pattern": dict(differing),
        "target_modules": sorted(ranks), "fan_in_fan_out": any(kinds.get(m) == "conv1d" for m in ranks),
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    with atomic_output(out, force=force, inputs=read_paths) as tmp:
        nbytes = write_safetensors(tmp / ADAPTER_FILE, state, {"format": "pt"})
        write_text(tmp / CONFIG_FILE, json.dumps(text_safe(config), indent=2) + "\n")
    out = out.expanduser()
    written = WriteResult(out, [out / ADAPTER_FILE], config, len(state), nbytes)
    return Result({"output": str(out), "edit": e.label, "base": ckpt.label, "r": r_max, "tensors": rows,
                   "dropped": dropped}, written)
