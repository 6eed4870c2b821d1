"""``surgery merge``'s entry point: validate the request from headers and declarations, then
hand the work to the batch plan (:mod:`surgery.merge.batch`) or the continual runner
(:mod:`surgery.merge.stepwise`). This module names no method: what a method is and takes
comes from its declaration (:mod:`surgery.merge.method`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..checkpoint.roles import TensorRole, role_of
from ..core.engine import dtype_name, parse_dtype, write_checkpoint
from ..core.errors import IncompatibleCheckpointsError, InputError, UsageError
from ..core.output import check_output
from ..core.progress import Progress
from ..core.result import Result
from .ahead import Ahead
from .batch import output_tensors
from .layout import layout_of
from .params import Params
from .inputs import Inputs
from .plan import plan_merge
from .recipe import MergeRequest, ModelRef
from .registry import continual_methods, get_method
from .state import ContinualState, check_state_target, load_state, state_writer
from .stepwise import StepRunner

DECOMPOSITIONS = ("gram", "svd")
TIE_RULES = ("index", "argsort")


@dataclass
class MergeOptions:
    """Options that are not merge parameters.

    Attributes:
        seed: Seed of random methods (DARE's drops...) and of ``shuffle``.
        allow_missing: Copy tensors that some models lack from the base instead of refusing.
        decomposition: Continual methods' SVDs: ``gram`` (eigh of the smaller Gram matrix,
            float64) or ``svd``.
        trim_ties: TIES: which entries tied at the trim threshold survive: ``index`` (lowest flat
            index first; O(n), streamed) or ``argsort`` (mergekit 0.1.5's torch.argsort order).
        shuffle: Shuffle the models (continual methods) with ``seed`` before merging.
        device: Where the math runs.
        state_dir: Save the continual state here.
        resume_dir: Continue the continual merge saved here.
        allow_nonfinite: Write merged tensors that hold NaN or Inf (refused by default, naming
            the input tensor that carried them).
        factor_cache: A :class:`~surgery.merge.methods.subspace.FactorCache` of decompositions
            from earlier merges of the same inputs (``surgery tune`` passes its own).
    """

    seed: int = 0
    allow_missing: bool = False
    decomposition: str = "gram"
    trim_ties: str = "index"
    shuffle: bool = False
    device: str = "cpu"
    state_dir: Path | None = None
    resume_dir: Path | None = None
    allow_nonfinite: bool = False
    factor_cache: Any = None


def _num_layers(ref: Checkpoint) -> int:
    return max(1, layout_of(ref.names, ref.config, ref.label).num_layers)



def _check_compatible(ref: Checkpoint, models: list[Checkpoint], allow_missing: bool, ref_is_base: bool) -> set[str]:
    """Report every disagreement between ``ref`` and the models from the headers; returns the
    tensors to copy from the base (missing from some model, with ``allow_missing``)."""
    problems: list[str] = []
    copy_from_base: set[str] = set()
    for m in models:
        missing = [n for n in ref.names if n not in m]
        extra = [n for n in m.names if n not in ref]
        if missing:
            if allow_missing and ref_is_base:
                copy_from_base.update(missing)
            else:
                problems.append(f"{m.label} lacks {len(missing)} tensor(s) of {ref.label}, e.g. {missing[0]!r}"
                                + (" (pass `allow_missing` to copy them from the base)" if ref_is_base else ""))
        if extra:
            problems.append(f"{m.label} has {len(extra)} tensor(s) that {ref.label} lacks, e.g. {extra[0]!r}")
        for n in ref.names:
            if n not in m:
                continue
            a, b = ref.info(n), m.info(n)
            if a.shape != b.shape:
                what = "vocabulary sizes differ" if role_of(a).role == TensorRole.EMBEDDING and a.shape[1:] == b.shape[1:] \
                    else "shapes differ"
                problems.append(f"tensor {n!r}: {what}, {tuple(a.shape)} in {ref.label} vs {tuple(b.shape)} in {m.label}")
            elif a.dtype != b.dtype:
                problems.append(f"tensor {n!r}: dtypes differ, {dtype_name(a.dtype)} in {ref.label} vs "
                                f"{dtype_name(b.dtype)} in {m.label} (convert one with surgery convert --dtype)")
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise IncompatibleCheckpointsError(f"cannot merge: {first}{more}.", path=ref.label)
    return copy_from_base


def _base_identity(base: Checkpoint) -> dict[str, str]:
    p = Path(base.label)
    return {"label": base.label, "path": str(p.resolve()) if p.exists() else base.label, "sha256": base.sha256()}


def _resume(request: MergeRequest, options: MergeOptions) -> tuple[ContinualState, Checkpoint, Checkpoint, MergeRequest]:
    state, tensors = load_state(options.resume_dir)
    if request.method and request.method != state.method:
        raise UsageError(f"the state in {options.resume_dir} continues an {state.method!r} merge; drop `method` "
                         f"{request.method} or start a new state.", path=options.resume_dir)
    for k, v in request.parameters.items():
        if k in state.parameters and state.parameters[k] != v:
            raise UsageError(f"the state in {options.resume_dir} was made with {k}={state.parameters[k]!r}; "
                             f"a resumed merge keeps it (drop the {k} setting).", path=options.resume_dir)
    where = request.base or state.base.get("path") or state.base["label"]
    try:
        base = open_checkpoint(where)
    except InputError as exc:
        raise InputError(f"the base recorded in {options.resume_dir} ({where}) cannot be opened ({exc}); pass `base` "
                         f"with its current location.", path=where) from exc
    if base.sha256() != state.base["sha256"]:
        raise IncompatibleCheckpointsError(
            f"base {base.label} (sha256 {base.sha256()[:12]}…) is not the base of the state in {options.resume_dir} "
            f"({state.base['label']}, sha256 {state.base['sha256'][:12]}…); resume with the same base.",
            path=base.label)
    req = MergeRequest(state.method, where, request.models, {**state.parameters}, request.dtype)
    return state, tensors, base, req


def _check_options(options: MergeOptions) -> None:
    if options.decomposition not in DECOMPOSITIONS:
        raise UsageError(f"unknown `decomposition` {options.decomposition!r}; choose one of {', '.join(DECOMPOSITIONS)}.")
    if options.trim_ties not in TIE_RULES:
        raise UsageError(f"unknown `trim_ties` rule {options.trim_ties!r}; choose one of {', '.join(TIE_RULES)}.")


def _same_place(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def merge(request: MergeRequest, output: str | Path | None, *, options: MergeOptions | None = None,
          dtype: str | None = None, shard_size: str | int = "5GB", force: bool = False,
          progress: Progress | None = None, dry_run: bool = False, executor: Any = None) -> Result:
    """Merge the models of ``request`` into a new checkpoint at ``output``.

    The whole request is validated first, from config files, tokenizer files and safetensors
    headers only (methods, parameters and their ranges, slices and layer ranges, tensor names
    and shapes across models, vocabularies): every problem is reported before any tensor is read.

    Args:
        request: Method, base, models or slices and parameter settings (from the CLI or a recipe).
        output: Output folder (may be None with ``dry_run``).
        options: Seed, device, continual state and resume folders, ...
        dtype: Output dtype (default: the recipe's, else each tensor's input dtype).
        shard_size: Maximum shard size.
        force: Replace an existing output.
        progress: Progress sink.
        dry_run: Plan and validate only: the report is the plan (which output tensor comes from
            which inputs by which method, output size, estimated memory); nothing is written.
        executor: Where the tensors are computed (:mod:`surgery.core.executor`; None: here). On
            Ray, continual methods' passes run as work units too (:mod:`surgery.merge.remote`).

    Returns:
        A Result: the written checkpoint (None for a dry run), and a report with the method, the
        model order, ``warnings`` (recipe settings mergekit accepts that have no effect) and
        (continual methods) the per-step norms and scalars (OPCM's λ_t).

    Raises:
        UsageError: Unknown method or parameters, values out of range, wrong number of models,
            bad slices or layer ranges, bad option combinations (named by their recipe entry).
        InputError: Unreadable inputs; IncompatibleCheckpointsError when they disagree or the
            resumed state's base does not match.
    """
    options = options or MergeOptions()
    _check_options(options)
    if options.resume_dir is None:
        method = get_method(request.method)
        if method.kind == "batch":
            return _batch(method, request, output, options=options, dtype=dtype, shard_size=shard_size, force=force,
                          progress=progress, dry_run=dry_run, executor=executor)
    return _continual(request, output, options=options, dtype=dtype, shard_size=shard_size, force=force,
                      progress=progress, dry_run=dry_run, executor=executor)


def _batch(method, request: MergeRequest, output, *, options: MergeOptions, dtype, shard_size, force, progress,
           dry_run: bool, executor: Any = None) -> Result:
    if options.state_dir:
        raise UsageError(f"`state`/`resume` need a continual method ({', '.join(continual_methods())}), not "
                         f"{method.name!r}.")
    if options.shuffle:
        raise UsageError(f"`shuffle` only applies to continual methods ({', '.join(continual_methods())}).")
    if not request.models and not request.slices:
        raise UsageError(f"merge method {method.name!r} needs at least {method.min_models} model(s) to merge.")
    with Inputs(options.device) as inputs:
        plan = plan_merge(method, request, allow_missing=options.allow_missing, dtype=dtype, device=options.device,
                          inputs=inputs)
        if dry_run:
            return Result({**plan.describe(), "dry_run": True})
        guarded = [Path(p) for p in (request.origin,) if p]
        check_output(output, force=force, inputs=plan.inputs.input_paths() + guarded)
        plan.materialize()
        return _write_plan(plan, request, output, options=options, guarded=guarded, shard_size=shard_size,
                           force=force, progress=progress, executor=executor)


def _write_plan(plan, request: MergeRequest, output, *, options: MergeOptions, guarded: list[Path], shard_size,
                force: bool, progress, executor: Any = None) -> Result:
    method = plan.method
    recorded = [ck for m in plan.models for ck in plan.inputs.recorded(m)]
    target = plan.dtype
    record: dict[str, Any] = {
        "method": method.name, "paper": method.paper, "base": request.base,
        "models": [m.location for m in request.models], "parameters": request.parameters,
        "model_parameters": [m.parameters for m in request.models], "dtype": dtype_name(target) if target else None,
        "seed": options.seed, "allow_missing": options.allow_missing, "trim_ties": options.trim_ties}
    if request.slices is not None:
        record["slices"] = plan.slices
    if request.tokenizer is not None:
        record["tokenizer"] = {"source": request.tokenizer.source, "tokens": len(plan.vocabulary.vocab),
                               "rows": plan.vocabulary.size}
    if request.chat_template is not None:
        record["chat_template"] = request.chat_template
    if request.origin:
        record["recipe"] = request.origin
    # a threaded method's tensors are computed ahead on worker threads here; Ray tasks compute
    # their own, and a FactorCache is not thread-safe
    ahead = Ahead(options.device, enabled=not getattr(executor, "remote", False) and options.factor_cache is None)
    tensors = output_tensors(plan, seed=options.seed, device=options.device, options={"trim_ties": options.trim_ties,
                                                                              "factor_cache": options.factor_cache},
                             ahead=ahead if ahead.pool.cpu else None)
    for t, out in zip(plan.tensors, tensors):     # what each computed tensor reads (work units, task memory)
        if out.source is None and out.cast_source is None:
            out.input_bytes = sum(plan.models[s.model].info(s.name).nbytes for s in t.inputs)
    base_key = plan.inputs.key(request.base) if request.base else None
    roles = [("base" if plan.inputs.key(label) == base_key else "model") if j == 0 else "adapter"
             for m, label in zip(plan.models, plan.labels) for j, _ in enumerate(plan.inputs.recorded(m))]
    tokenizer_files = _tokenizer_files(plan.tokenizer, output) if plan.tokenizer is not None else None
    with ahead:
        written = write_checkpoint(tensors, output, donor=plan.models[plan.donor], operation="merge",
                                   parameters=record, inputs=recorded, input_roles=roles, input_paths=guarded,
                                   dtype=target, shard_size=shard_size, force=force, progress=progress,
                                   config_update=plan.config_update or None, tokenizer_files=tokenizer_files,
                                   allow_nonfinite=options.allow_nonfinite, executor=executor)
    if request.slices is None:
        order = [plan.labels[s.model] for s in (plan.tensors[0].models if plan.tensors else [])]
    else:
        order = list(dict.fromkeys(src["model"] for sl in plan.slices for src in sl["sources"]))
    return Result({"method": method.name, "order": order, "lambda": None, "steps": [], "state": None,
                   "slices": plan.slices if request.slices is not None else None,
                   "config_update": plan.config_update, "warnings": plan.warnings}, written)


def _tokenizer_files(tokenizer: Any, near: str | Path) -> dict[str, bytes]:
    """The output tokenizer's files, as transformers saves them."""
    from ..checkpoint.model import quiet_transformers
    from ..core.output import scratch_dir

    with scratch_dir(Path(near).expanduser().resolve().parent) as d, quiet_transformers():
        tokenizer.save_pretrained(str(d))
        return {f.name: f.read_bytes() for f in sorted(Path(d).iterdir()) if f.is_file()}


def _continual(request: MergeRequest, output, *, options: MergeOptions, dtype, shard_size, force, progress,
               dry_run: bool, executor: Any = None) -> Result:
    state = state_tensors = None
    if options.resume_dir is not None:
        state, state_tensors, base, request = _resume(request, options)
    method = get_method(request.method)
    if request.slices is not None or request.tokenizer is not None:
        what = "slices" if request.slices is not None else "a tokenizer setting"
        raise UsageError(f"{request.where()}: the continual method {method.name!r} merges whole models; "
                         f"{what} is not supported with it.")
    if any(ModelRef.parse(m.location).lora for m in request.models) or (request.base and ModelRef.parse(request.base).lora):
        raise UsageError(f"the continual method {method.name!r} does not take model+lora inputs; fuse the adapter "
                         f"first with surgery fuse.")
    if options.resume_dir is not None:
        models = [open_checkpoint(m.location) for m in request.models]
    if not request.models:
        raise UsageError(f"merge method {method.name!r} needs at least {method.min_models} model(s) to merge.")
    if options.resume_dir is None:
        if method.base == "required" and not request.base:
            raise UsageError(f"merge method {method.name!r} needs a base model (`base` / base_model).")
        if request.base and method.base != "ignored":
            # a model listed that is the base itself is the base, not another input (mergekit recipes list it)
            keep = [m for m in request.models if not _same_place(m.location, request.base)]
            request = MergeRequest(request.method, request.base, keep, request.parameters, request.dtype,
                                   origin=request.origin)
        base = open_checkpoint(request.base) if request.base else None
        models = [open_checkpoint(m.location) for m in request.models]
    n = len(request.models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = f"exactly {method.min_models}" if method.max_models == method.min_models else f"at least {method.min_models}"
        raise UsageError(f"merge method {method.name!r} takes {want} model(s) besides the base; got {n}.")
    target = parse_dtype(dtype or request.dtype)
    if options.shuffle:
        order = list(range(n))
        random.Random(options.seed).shuffle(order)
        request = MergeRequest(request.method, request.base, [request.models[i] for i in order], request.parameters,
                               request.dtype, origin=request.origin)
        models = [models[i] for i in order]
    params = Params(method, request, _num_layers(base))
    copy_from_base = _check_compatible(base, models, options.allow_missing, True)
    if copy_from_base:
        raise UsageError(f"`allow_missing` is not supported by the continual method {method.name!r}: "
                         f"{sorted(copy_from_base)[0]!r} is missing from a model.")
    if dry_run:
        return Result({"method": method.name, "models": [m.label for m in models], "base": base.label,
                       "num_tensors": len(base.names), "output_bytes": base.total_bytes(), "dry_run": True,
                       "warnings": params.warnings + list(request.warnings)})
    guarded = [Path(p) for p in (options.resume_dir, options.state_dir, request.origin) if p]
    check_output(output, force=force, inputs=[p for ck in [base] + models for p in ck.input_paths()] + guarded)
    record: dict[str, Any] = {
        "method": method.name, "paper": method.paper, "base": base.label,
        "models": [m.location for m in request.models], "parameters": request.parameters,
        "model_parameters": [m.parameters for m in request.models], "dtype": dtype_name(target) if target else None,
        "seed": options.seed, "allow_missing": options.allow_missing}
    if request.origin:
        record["recipe"] = request.origin
    record.update({"decomposition": options.decomposition, "shuffle": options.shuffle,
                   "resume": str(options.resume_dir) if options.resume_dir else None,
                   "state": str(options.state_dir) if options.state_dir else None})
    kwargs: dict[str, Any] = dict(base_identity=state.base if state is not None else _base_identity(base),
                                  device=options.device, options={"decomposition": options.decomposition},
                                  allow_nonfinite=options.allow_nonfinite, progress=progress)
    if getattr(executor, "remote", False):
        from .remote import RemoteStepRunner

        runner: StepRunner = RemoteStepRunner(method, params, base, models, state, state_tensors, executor=executor,
                                              key_inputs=[state_tensors] if state_tensors is not None else [],
                                              record=record, **kwargs)
    else:
        runner = StepRunner(method, params, base, models, state, state_tensors, **kwargs)
    replace_ok = [Path(options.resume_dir)] if options.resume_dir else []
    state_inputs = [p for ck in [base] + models for p in ck.input_paths()] + [Path(output)] + \
        ([Path(request.origin)] if request.origin else [])

    if options.state_dir is not None:
        check_state_target(options.state_dir, replace_ok=replace_ok, inputs=state_inputs)

    def sink_factory(specs):
        return state_writer(options.state_dir, specs, replace_ok=replace_ok, inputs=state_inputs)

    result = runner.run(output, record=record, shard_size=shard_size, force=force, dtype=target,
                        state_dir=options.state_dir, guarded=guarded, sink_factory=sink_factory)
    result.report["warnings"] = params.warnings + list(request.warnings)
    return result
