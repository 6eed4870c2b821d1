"""``surgery fuse``: fold adapters into a base checkpoint, one tensor at a time.

For each base tensor an adapter changes, the base tensor is read in float32, every
adapter's update is applied in command-line order (each scaled by its weight:
``W ← W + w · (f(W) − W)``), and the result is written in the base tensor's dtype (or
``--dtype``). Every other tensor is copied byte for byte. Peak memory is one base tensor,
its adapter factors and the shared factors of VeRA / TeRA.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..core.engine import OutputTensor, cast_tensor, copy_tensor, dtype_name, parse_dtype, write_checkpoint
from ..core.device import check_device
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..core.executor import torch_threads as _threads
from ..core.progress import Progress
from ..core.result import Result
from .base import PEFT_PREFIX, Adapter, Update, header_problem, open_adapter
from .registry import KINDS, detect

# Below this many elements a tensor's fusion runs on one intra-op thread: a cast or a rank-r
# product of a few million elements takes milliseconds, and splitting it across threads costs
# more in synchronisation than it saves (tens of times more when the cores are busy).
PARALLEL_MIN_ELEMENTS = 4 * 1024 * 1024

# (output embedding, input embedding) tensor names of models that may tie them.
TIED_EMBEDDINGS: tuple[tuple[str, str], ...] = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
    ("lm_head.weight", "transformer.word_embeddings.weight"),
    ("lm_head.weight", "embed_tokens.weight"),
)


@dataclass
class AdapterSpec:
    """An adapter on the command line: ``PATH`` or ``PATH:WEIGHT``."""

    path: str
    weight: float = 1.0


def parse_adapter_spec(text: str) -> AdapterSpec:
    """``PATH[:WEIGHT]``; a suffix that is not a number stays part of the path.

    Raises:
        UsageError: The weight is not finite.
    """
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            w = float(tail)
        except ValueError:
            return AdapterSpec(text)
        if w != w or w in (float("inf"), float("-inf")):
            raise UsageError(f"adapter weight in {text!r} must be a finite number.")
        return AdapterSpec(path, w)
    return AdapterSpec(text)


class KeyMap:
    """Maps adapter module paths (as PEFT names them under ``base_model.model.``) to the
    checkpoint's tensor names, whatever prefix the checkpoint uses.

    Candidate rules (data, not scattered regexes): the name as is; with 1 or 2 leading
    components dropped (adapter trained on ``LlamaForCausalLM``, base saved as ``LlamaModel``);
    with a prefix added (the other way round). The rule that resolves the most of the
    adapter's tensors wins; ties go to the earlier rule.
    """

    def __init__(self, names: set[str], keys: list[str]):
        self.names = names
        rules: list[tuple[str, int, str]] = [("as is", 0, ""), ("drop 1", 1, ""), ("drop 2", 2, "")]
        for key in keys:
            for n in names:
                if n.endswith("." + key):
                    prefix = n[: -len(key)]
                    if ("add", 0, prefix) not in rules:
                        rules.append(("add", 0, prefix))
        best, best_hits = rules[0], -1
        for rule in rules:
            hits = sum(self._apply(rule, k) in names for k in keys)
            if hits > best_hits:
                best, best_hits = rule, hits
        self.rule = best

    @staticmethod
    def _apply(rule: tuple[str, int, str], key: str) -> str:
        _, drop, prefix = rule
        parts = key.split(".")
        if drop and len(parts) > drop + 1:
            parts = parts[drop:]
        return prefix + ".".join(parts)

    def __call__(self, key: str) -> str:
        return self._apply(self.rule, key)

    def describe(self) -> str:
        kind, drop, prefix = self.rule
        return {"as is": "names as in the adapter", "drop 1": "first name component dropped",
                "drop 2": "first two name components dropped"}.get(kind, f"prefix {prefix!r} added")


@dataclass
class _Step:
    adapter: Adapter
    update: Update


def _tied_pair(base: Checkpoint) -> tuple[str, str] | None:
    cfg = base.config or {}
    if not cfg.get("tie_word_embeddings", True):
        return None
    for out_name, in_name in TIED_EMBEDDINGS:
        if out_name not in base and in_name in base:
            return out_name, in_name
    return None


def fuse(base: str | Path, adapters: list[AdapterSpec | str], output: str | Path, *, dtype: str | None = None,
         shard_size: str = "5GB", force: bool = False, device: str = "cpu", check: bool = False,
         threads: int | None = None, allow_nonfinite: bool = False, progress: Progress | None = None,
         executor: Any = None) -> Result:
    """Fuse ``adapters`` into ``base`` and write the result to ``output``.

    Args:
        base: The base checkpoint (folder, file or Hub id).
        adapters: Adapter folders, each optionally with a weight (``AdapterSpec``).
        output: Output folder.
        dtype: Output dtype for floating tensors (default: each base tensor's own).
        shard_size: Maximum shard size.
        force: Replace an existing output.
        device: Where the math runs.
        check: Before the output appears, compare its logits with PEFT's forward pass of
            base + adapter (one PEFT adapter at weight 1); a failure leaves no output.
        threads: Intra-op threads for the math while fusing (restored afterwards); None keeps
            torch's setting. The per-tensor products are small, so one thread avoids
            oversubscription on a busy machine.
        allow_nonfinite: Write fused tensors that hold NaN or Inf instead of refusing them.
        progress: Progress sink.
        executor: Where the tensors are computed (:mod:`surgery.core.executor`; None: here).

    Returns:
        A Result: the written checkpoint and a report (adapters, kinds, changed tensors, tying,
        the check's numbers).

    Raises:
        UsageError: No adapters; ``check`` with adapters PEFT cannot run.
        OutputExistsError: The output exists and ``force`` is not set.
        CheckFailedError: ``check`` found the logits too far from PEFT's.
        NonFiniteError: A fused tensor is NaN/Inf (named with the input tensor that carried
            it) and ``allow_nonfinite`` is False.
        InputError: An adapter is unknown, refused (PiSSA/OLoRA/LoftQ/CorDA), malformed, or
            names a module the base does not have, or whose shape does not fit.
    """
    if not adapters:
        raise UsageError("give at least one adapter to fuse: surgery fuse BASE ADAPTER[:WEIGHT]... -o OUT.")
    check_device(device)
    if threads is not None and threads < 1:
        raise UsageError(f"`threads` must be at least 1, not {threads}.")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fuse(base, adapters, output, dtype=dtype, shard_size=shard_size, force=force, device=device,
                     check=check, progress=progress, auto_threads=threads is None, allow_nonfinite=allow_nonfinite,
                     executor=executor)
    finally:
        torch.set_num_threads(previous)


@dataclass
class FusionPlan:
    """What fusing adapters into one base changes, from the headers alone.

    Attributes:
        ckpt: The base.
        steps: Output tensor name -> the updates applied to it, in order.
        new_from: Tensors the base lacks -> the base tensor each starts from ("" for none).
        untied: ``{"output", "input"}`` names when an update unties tied embeddings, else None.
        adapters: The opened adapters, in order.
        report: Per adapter: path, kind, weight, key mapping and the tensors it changes.
    """

    ckpt: Checkpoint
    steps: dict[str, list[_Step]]
    new_from: dict[str, str]
    untied: dict[str, str] | None
    adapters: list[Adapter]
    report: list[dict[str, Any]]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of output tensor ``name``."""
        start = name if name in self.ckpt else self.new_from.get(name) or None
        shape = tuple(self.ckpt.info(start).shape) if start else None
        for st in self.steps.get(name, []):
            if st.update.shape is not None:
                shape = tuple(st.update.shape)
        if shape is None:
            raise IncompatibleCheckpointsError(f"cannot plan tensor {name!r}.", tensor=name)
        return shape

    def start(self, name: str) -> str | None:
        """The base tensor output tensor ``name`` starts from (None: made by the adapter alone)."""
        return name if name in self.ckpt else self.new_from.get(name) or None

    def compute(self, name: str, device: str = "cpu") -> torch.Tensor:
        """Output tensor ``name`` in float32: its base tensor with every update applied in order."""
        start = self.start(name)
        original = self.ckpt.get(start, dtype=torch.float32, device=device) if start else None
        current = original
        for st in self.steps.get(name, []):
            new = st.update.fn(current, original)
            if current is None or tuple(new.shape) != tuple(current.shape) or st.adapter.weight == 1.0:
                current = new
            else:
                current = current + st.adapter.weight * (new - current)
            if st.update.shape is not None:
                original = current      # a replaced base is the base later updates see
        return current


def plan_fusion(ckpt: Checkpoint, adapters: list[AdapterSpec | str], device: str = "cpu") -> FusionPlan:
    """Open ``adapters``, match their modules to ``ckpt``'s tensors and check every update's
    shape from the headers (nothing is read).

    Raises:
        InputError: An adapter is unknown, refused, malformed, or does not fit the base.
    """
    names = set(ckpt.names)
    tied = _tied_pair(ckpt)
    specs = [parse_adapter_spec(a) if isinstance(a, str) else a for a in adapters]

    steps: dict[str, list[_Step]] = {}        # output tensor name -> updates in order
    new_from: dict[str, str] = {}             # new tensor -> base tensor it starts from
    report_adapters: list[dict[str, Any]] = []
    opened: list[Adapter] = []
    for spec in specs:
        ad = open_adapter(spec.path, spec.weight)
        ad.device = device
        ad.kind = detect(ad)
        opened.append(ad)
        holder: dict[str, KeyMap] = {}

        def shape_of(module: str, holder=holder) -> tuple[int, ...]:
            return tuple(ckpt.info(holder["map"](module + ".weight")).shape)

        ups = KINDS[ad.kind](ad, shape_of)
        if not ups:
            raise IncompatibleCheckpointsError(f"adapter {ad.path} changes no tensor (no {ad.kind} tensors found).",
                                               path=ad.path)
        keymap = KeyMap(names, [u.key for u in ups])
        holder["map"] = keymap
        changed: dict[str, str] = {}
        for u in ups:
            name = keymap(u.key)
            if name not in names and name not in new_from:
                if u.optional:
                    continue
                if tied and name == tied[0]:
                    new_from[name] = tied[1]         # the untied head starts from the shared embedding
                elif u.shape is not None:
                    new_from[name] = ""              # a tensor the base lacks, stored whole by the adapter
                else:
                    raise IncompatibleCheckpointsError(
                        f"adapter {ad.path} changes {u.module!r} ({u.key}), but the base {ckpt.label} has no tensor "
                        f"{name!r}; is the adapter for another model?", path=ad.path, tensor=u.key)
            steps.setdefault(name, []).append(_Step(ad, u))
            changed[name] = u.how
        report_adapters.append({"path": str(ad.path), "kind": ad.kind, "weight": ad.weight,
                                "key_mapping": keymap.describe(), "tensors_changed": len(changed),
                                "changes": dict(sorted(changed.items()))})

    # Tied input/output embeddings: the adapter's forward pass uses the embedding for the input
    # and the same tensor for the output head; an update to one of them unties them.
    untied = None
    if tied and (tied[0] in steps or tied[1] in steps):
        untied = {"output": tied[0], "input": tied[1]}
        if tied[0] not in steps:
            new_from[tied[0]] = tied[1]

    _validate(ckpt, steps, new_from)
    return FusionPlan(ckpt, steps, new_from, untied, opened, report_adapters)


def _fuse(base, adapters, output, *, dtype, shard_size, force, device, check, progress, auto_threads,
          allow_nonfinite=False, executor=None):
    target = parse_dtype(dtype)
    ckpt = open_checkpoint(str(base))
    fusion = plan_fusion(ckpt, adapters, device)
    steps, new_from, untied, opened = fusion.steps, fusion.new_from, fusion.untied, fusion.adapters
    report_adapters = fusion.report

    def out_dtype(src_dtype: torch.dtype) -> torch.dtype:
        return target if (target is not None and src_dtype.is_floating_point) else src_dtype

    def computed(name: str, start: str | None) -> OutputTensor:
        base_dtype = ckpt.info(start).dtype if start else (target or _dominant_dtype(ckpt))
        shape = fusion.shape(name)
        final_dtype = out_dtype(base_dtype)
        small = auto_threads and math.prod(shape) < PARALLEL_MIN_ELEMENTS

        def run() -> torch.Tensor:
            with _threads(1 if small else None):
                return fusion.compute(name, device).to(final_dtype)  # cast here, under the same thread setting

        sources = tuple([ckpt.info(start)] if start else []) + tuple(
            info for st in steps[name] for info in _adapter_sources(st.adapter, st.update.module))
        return OutputTensor(name, shape, final_dtype, compute=run, sources=sources)

    plan: list[OutputTensor] = []
    for name in ckpt.names:
        if name in steps:
            plan.append(computed(name, name))
        else:
            plan.append(cast_tensor(ckpt, name, target))
    for name, start in new_from.items():
        if name in steps:
            plan.append(computed(name, start or None))
        else:
            plan.append(cast_tensor(ckpt, start, target, new_name=name) if target else copy_tensor(ckpt, start, new_name=name))

    config_update = {"tie_word_embeddings": False} if untied else None
    params = {"adapters": [{"path": str(a.path), "kind": a.kind, "weight": a.weight} for a in opened],
              "dtype": dtype_name(target) if target else None, "untied_embeddings": untied}
    adapter_ckpts = [a.tensors for a in opened]
    verify = None
    if check:
        if len(opened) != 1:
            raise UsageError("check compares with PEFT's forward pass of one adapter; give a single adapter.")
        from .check import check_against_peft

        def verify(folder: Path) -> dict[str, Any]:
            return check_against_peft(ckpt, params["adapters"][0], folder, out_dtype(_dominant_dtype(ckpt)))

    result = write_checkpoint(plan, output, donor=ckpt, operation="fuse", parameters=params,
                              inputs=[ckpt, *adapter_ckpts], input_roles=["base"] + ["adapter"] * len(opened),
                              input_paths=[a.path for a in opened], dtype=target, shard_size=shard_size, force=force,
                              progress=progress, config_update=config_update, verify=verify,
                              allow_nonfinite=allow_nonfinite, executor=executor)
    check_report = result.verified
    report = {"base": ckpt.label, "adapters": report_adapters,
              "tensors_changed": sorted(steps), "tensors_added": sorted(new_from),
              "tensors_copied": sum(1 for o in plan if o.source is not None),
              "tensors_cast": sum(1 for o in plan if o.source is None and o.name not in steps),
              "untied_embeddings": untied, "check": check_report}
    return Result(report, result)


def _adapter_sources(adapter: Adapter, module: str) -> list:
    """The adapter's stored tensors for ``module`` (searched when a fused tensor is not finite)."""
    prefixes = (module + ".", PEFT_PREFIX + module + ".")
    return [adapter.tensors.info(n) for n in adapter.names if n.startswith(prefixes)]


def _validate(ckpt: Checkpoint, steps: dict[str, list[_Step]], new_from: dict[str, str]) -> None:
    """Check every update's shape against the base from the headers alone, before anything is
    written or any tensor is read, and report every problem at once."""
    problems: list[str] = []
    for name, chain in steps.items():
        start = name if name in ckpt else new_from.get(name) or None
        stored = tuple(ckpt.info(start).shape) if start else None
        for st in chain:
            if st.update.shape is not None:      # a replacement sets the shape later updates see
                stored = tuple(st.update.shape)
                continue
            problem = header_problem(st.update, stored, st.adapter.path) if stored is not None else None
            if problem:
                problems.append(problem)
                break
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])}{'…' if len(problems) > 4 else ''})" \
            if len(problems) > 1 else ""
        raise IncompatibleCheckpointsError(problems[0] + more + ".", path=ckpt.root)


def _dominant_dtype(ckpt: Checkpoint) -> torch.dtype:
    counts = Counter(ckpt.info(n).dtype for n in ckpt.names if ckpt.info(n).dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32
