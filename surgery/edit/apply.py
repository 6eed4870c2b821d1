"""Sequential edit application with perplexity collapse checks.

Background (docs/edit.md): ROME / MEMIT edits are low-rank additive updates, and one bad
edit, or a few sequential ones, can collapse a model (Yang et al. 2024, "The Butterfly
Effect of Model Editing", https://arxiv.org/abs/2402.09656). Perplexity on a small
general-text probe is the cheap surrogate that catches it.

Three parts, each testable alone:

* :class:`EditSession`: the live model, loaded once (float32, transformers); an edit is added
  to the parameters in place and removed again by subtraction; ``measure`` scores the probe.
* :func:`collapse_loop`: the policy (when to check, what a collapse is, stop / skip /
  ignore), pure over anything with ``add``, ``remove`` and ``measure``.
* :func:`output_plan`: the engine plan of the result, from the base checkpoint: tensors no
  accepted edit touches are copied as raw bytes, edited ones are computed as W + Σ ΔW in
  float32 and cast once.

Cheap pre-checks (‖ΔW‖_F/‖W‖_F, σ_max(ΔW)/σ_max(W)) run before any forward pass and force a
perplexity check when over their thresholds. :func:`apply_edits` ties them together.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.reader import hash_file
from ..core.engine import OutputTensor, cast_tensor, dtype_name, parse_dtype, write_checkpoint
from ..core.errors import IncompatibleCheckpointsError, InputError, UsageError
from ..core.output import check_output
from ..core.progress import Progress, ensure
from ..core.result import Result
from .format import Edit, TensorEdit, load_edit

ON_COLLAPSE = ("stop", "skip", "ignore")
DEFAULT_MAX_PPL_RATIO = 1.5
DEFAULT_MAX_REL_NORM = 0.1
DEFAULT_MAX_SIGMA_RATIO = 0.5


def _stored_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _validate(ckpt: Checkpoint, edits: Sequence[Edit]) -> None:
    """Names and shapes against the base, from headers and factor shapes alone; every problem at once."""
    problems: list[tuple[str, str, str]] = []
    for e in edits:
        for name, te in e.tensors.items():
            if name not in ckpt:
                problems.append((f"{e.label} edits {name!r}, which {ckpt.label} does not have", e.label, name))
                continue
            info = ckpt.info(name)
            if not info.dtype.is_floating_point:
                problems.append((f"{e.label} edits {name!r}, stored as {info.dtype} (not floating point)", e.label, name))
            elif te.shape != tuple(info.shape):
                problems.append((f"{e.label} has a {te.shape} delta for {name!r}, which is {tuple(info.shape)} in "
                                 f"{ckpt.label} (edits use the stored layout)", e.label, name))
    if problems:
        msg, path, tensor = problems[0]
        more = f" ({len(problems) - 1} more problem(s) of this kind)" if len(problems) > 1 else ""
        raise IncompatibleCheckpointsError(f"{msg}{more}; make the edit against this base.", path=path, tensor=tensor)


def _verify_bases(ckpt: Checkpoint, edits: Sequence[Edit], force_base: bool) -> list[dict[str, str]]:
    """Check each edit's recorded base sha256 against the base tensor, or against the tensor
    as the preceding edits leave it (edits made one after another on the same model).

    Returns:
        Per edit, tensor name -> "base" | "chained" | "unrecorded" | "mismatch (forced)".
    """
    base_sha: dict[str, str] = {}
    chained: dict[str, torch.Tensor] = {}  # float32 W + Σ ΔW of the edits so far
    out: list[dict[str, str]] = []
    for e in edits:
        status: dict[str, str] = {}
        for name, te in e.tensors.items():
            want = e.base_sha256.get(name)
            if want is None:
                status[name] = "unrecorded"
            else:
                if name not in base_sha:
                    base_sha[name] = ckpt.tensor_sha256(name)
                if want == base_sha[name]:
                    status[name] = "base"
                elif name in chained and want == _stored_sha(chained[name].to(ckpt.info(name).dtype)):
                    status[name] = "chained"
                elif force_base:
                    status[name] = "mismatch (forced)"
                else:
                    raise IncompatibleCheckpointsError(
                        f"{e.label} was made against a different {name!r} (sha256 {want[:12]}..., {ckpt.label} has "
                        f"{base_sha[name][:12]}...); use the base it was made for, or pass `force_base=True`.",
                        path=e.label, tensor=name)
        for name, te in e.tensors.items():
            cur = chained[name] if name in chained else ckpt.get(name)
            chained[name] = cur + te.delta()
        out.append(status)
    return out


def precheck(te: TensorEdit, stats: dict[str, float], *, max_rel_norm: float, max_sigma_ratio: float) -> dict[str, Any]:
    """‖ΔW‖_F/‖W‖_F and σ_max(ΔW)/σ_max(W) for one tensor, with the verdict against thresholds.

    Args:
        te: The update.
        stats: :func:`weight_stats` of the base tensor W.

    1-D tensors (norms, biases) get the norm ratio only (``sigma_ratio`` None).
    """
    dn = te.frobenius()
    rel = dn / stats["fro"] if stats["fro"] > 0 else math.inf
    row: dict[str, Any] = {"name": te.name, "kind": "low_rank" if te.low_rank else "dense", "rank": te.rank,
                           "delta_norm": dn, "rel_norm": rel, "sigma_ratio": None}
    if len(te.shape) == 2:
        sm = te.sigma_max()
        row["sigma_ratio"] = sm / stats["sigma_max"] if stats["sigma_max"] > 0 else math.inf
    row["over"] = bool(rel > max_rel_norm or (row["sigma_ratio"] is not None and row["sigma_ratio"] > max_sigma_ratio))
    return row


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """‖W‖_F and σ_max(W) (float64 for the norm)."""
    fro = float(w.double().norm())
    sigma = float(torch.linalg.matrix_norm(w.float(), ord=2)) if w.dim() == 2 else fro
    return {"fro": fro, "sigma_max": sigma}


# ---- the session: the live model ---------------------------------------------------------


def _param_map(model: Any, ckpt: Checkpoint, names: set[str]) -> dict[str, torch.Tensor]:
    """The live model parameter behind each edited checkpoint tensor, checked to hold the same values."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        candidates = [name, f"{prefix}.{name}" if prefix else name,
                      name.removeprefix(prefix + ".") if prefix else name]
        p = next((params[c] for c in candidates if c in params), None)
        if p is None:
            raise InputError(f"the transformers model built from {ckpt.label} has no parameter for {name!r}; "
                             f"apply can only edit tensors the model loads.", path=ckpt.root, tensor=name)
        ref = ckpt.get(name, device=p.device)
        if tuple(p.shape) != tuple(ref.shape) or not torch.equal(p.detach().float(), ref):
            raise InputError(f"transformers changes {name!r} of {ckpt.label} while loading it (shape or values differ "
                             f"from the stored tensor), so edits cannot be applied to it in place.",
                             path=ckpt.root, tensor=name)
        out[name] = p
    return out


class EditSession:
    """The base loaded once as a float32 transformers model, with edits added to and removed
    from its parameters in place, and the probe's perplexity measured on demand.

    Build it with :meth:`open`; ``scorer`` is a :class:`surgery.eval.perplexity.Scorer`.
    """

    def __init__(self, model: Any, scorer: Any, live: dict[str, torch.Tensor], edits: Sequence[Edit]):
        self.model = model
        self.scorer = scorer
        self.live = live
        self.edits = list(edits)
        self.ppl_seconds = 0.0

    @classmethod
    def open(cls, ckpt: Checkpoint, edits: Sequence[Edit], text: str, *, corpus: bool = False, ctx: int | None = None,
             stride: int | None = None, max_sentences: int | None = None, batch_size: int = 8,
             tokenizer: str | Path | None = None, device: str = "cpu") -> "EditSession":
        """Load ``ckpt`` (float32) and tokenize ``text`` (sentence mode unless ``corpus``).

        Raises:
            InputError: The base cannot be built as a causal LM, or transformers changes an
                edited tensor while loading it.
        """
        from ..eval.perplexity import load_causal_lm, make_scorer

        model, tok = load_causal_lm(ckpt, device=device, dtype=torch.float32, tokenizer=tokenizer)
        scorer = make_scorer(model, tok, text, sentences=not corpus, ctx=ctx, stride=stride, batch_size=batch_size,
                             device=device, max_sentences=max_sentences)
        live = _param_map(model, ckpt, {n for e in edits for n in e.tensors})
        return cls(model, scorer, live, edits)

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.model.config, "vocab_size", None)

    def _add(self, i: int, sign: float) -> None:
        with torch.no_grad():
            for name, te in self.edits[i].tensors.items():
                p = self.live[name]
                p.add_(te.delta(dtype=p.dtype, device=p.device), alpha=sign)

    def add(self, i: int) -> None:
        """Add edit ``i``'s ΔW to the live parameters."""
        self._add(i, +1.0)

    def remove(self, i: int) -> None:
        """Subtract edit ``i``'s ΔW again (a rollback)."""
        self._add(i, -1.0)

    def measure(self) -> float:
        """The probe's perplexity of the live model."""
        t0 = time.perf_counter()
        value = float(self.scorer.score()["perplexity"])
        self.ppl_seconds += time.perf_counter() - t0
        return value

    def close(self) -> None:
        """Drop the model (the only whole-model allocation of ``edit apply``)."""
        self.model = self.scorer = None
        self.live = {}


# ---- the collapse policy: pure ---------------------------------------------------------------


class LiveModel(Protocol):
    """What :func:`collapse_loop` needs: an :class:`EditSession`, or a fake in tests."""

    def add(self, i: int) -> None: ...

    def remove(self, i: int) -> None: ...

    def measure(self) -> float: ...


@dataclass(frozen=True)
class CollapsePolicy:
    """When to check perplexity, what counts as a collapse, and what to do about it.

    Args:
        max_ppl_ratio: Collapse when perplexity / baseline exceeds this.
        max_ppl: Absolute ceiling (None: the vocabulary size, i.e. worse than uniform guessing).
        check_every: Check after every K edits (and after the last one, and right after an
            edit whose pre-check is over its thresholds).
        on_collapse: ``stop`` (roll back the unchecked group and stop), ``skip`` (drop the
            offending edits, isolating them one by one within a group) or ``ignore``.
    """

    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO
    max_ppl: float | None = None
    check_every: int = 1
    on_collapse: str = "stop"

    def validate(self) -> None:
        """Raise UsageError for an out-of-range setting."""
        if self.on_collapse not in ON_COLLAPSE:
            raise UsageError(f"`on_collapse` must be one of {', '.join(ON_COLLAPSE)}, got {self.on_collapse!r}.")
        if not self.max_ppl_ratio > 1.0:
            raise UsageError(f"`max_ppl_ratio` must be above 1, got {self.max_ppl_ratio}.")
        if self.check_every < 1:
            raise UsageError(f"`check_every` must be at least 1, got {self.check_every}.")
        if self.max_ppl is not None and not self.max_ppl > 0:
            raise UsageError(f"`max_ppl` must be positive, got {self.max_ppl}.")


@dataclass
class Outcome:
    """What :func:`collapse_loop` decided.

    ``edits[i]`` has ``verdict`` (``ok``, ``collapsed (rolled back | skipped | ignored)``,
    ``not reached``), and once checked ``perplexity``, ``ratio`` and ``checked_after``;
    ``checks`` lists every measurement in order (``after_edit`` None for the baseline).
    """

    baseline: float
    final: float
    ceiling: float
    edits: list[dict[str, Any]]
    checks: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    stopped: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def collapsed_at(self) -> int | None:
        return next((c["after_edit"] for c in self.checks if c["collapsed"]), None)


def collapse_loop(live: LiveModel, n: int, policy: CollapsePolicy, *, urgent: Sequence[bool] = (),
                  vocab_size: int | None = None, label: str = "the base",
                  progress: Progress | None = None) -> Outcome:
    """Add edits 0..n-1 to ``live`` one after another, checking perplexity as ``policy`` says.

    Args:
        live: The model (``add(i)``, ``remove(i)``, ``measure() -> perplexity``).
        n: Number of edits.
        policy: The settings (validated here).
        urgent: Per edit, True to check right after it (its pre-check is over the thresholds).
        vocab_size: The default absolute ceiling when ``policy.max_ppl`` is None.
        label: The base's name, for messages.
        progress: Advanced once for the baseline and once per edit decided.

    Returns:
        The :class:`Outcome`; ``live`` is left holding exactly the accepted edits.

    Raises:
        InputError: The baseline perplexity is not finite (the base is broken).
        UsageError: The baseline is already above ``policy.max_ppl``.
    """
    policy.validate()
    progress = ensure(progress)
    urgent = list(urgent) + [False] * (n - len(urgent))
    ceiling = float(policy.max_ppl) if policy.max_ppl is not None else (float(vocab_size) if vocab_size else math.inf)
    progress.start(n + 1, "applying edits")
    try:
        baseline = live.measure()
        out = Outcome(baseline, baseline, ceiling, [{"verdict": "not reached", "perplexity": None, "ratio": None}
                                                     for _ in range(n)])
        out.checks.append({"after_edit": None, "perplexity": baseline, "ratio": 1.0, "collapsed": False})
        if not math.isfinite(baseline):
            raise InputError(f"the perplexity of {label} itself is {baseline}; the base is broken, "
                             f"so collapse cannot be judged.", path=label)
        if baseline >= ceiling:
            if policy.max_ppl is not None:
                raise UsageError(f"the base perplexity {baseline:.4g} is already above `max_ppl` "
                                 f"{policy.max_ppl:g}; raise `max_ppl` or leave it out.")
            # An untrained base already guesses no better than uniform: only the ratio can judge it.
            out.notes.append(f"the base perplexity {baseline:.4g} is above the vocabulary size {ceiling:g}; "
                             f"the absolute ceiling is off and only `max_ppl_ratio` judges collapse")
            out.ceiling = ceiling = math.inf
        progress.advance()

        def check(after: int, group: list[int]) -> bool:
            value = live.measure()
            ratio = value / baseline
            collapsed = (not math.isfinite(value)) or ratio > policy.max_ppl_ratio or value > ceiling
            out.checks.append({"after_edit": after, "perplexity": value, "ratio": ratio, "collapsed": collapsed})
            for j in group:
                out.edits[j].update(perplexity=value, ratio=ratio, checked_after=after)
            return collapsed

        def settle(group: list[int], verdict: str, accepted: bool) -> None:
            for j in group:
                out.edits[j]["verdict"] = verdict
            if accepted:
                out.accepted.extend(group)
            progress.advance(len(group))

        pending: list[int] = []
        last_good = baseline  # perplexity of the last state that passed
        for i in range(n):
            live.add(i)
            pending.append(i)
            out.edits[i]["verdict"] = "applied"
            if not (len(pending) >= policy.check_every or i == n - 1 or urgent[i]):
                continue
            group, pending = pending, []
            if not check(i, group):
                settle(group, "ok", True)
                last_good = out.final = out.checks[-1]["perplexity"]
                continue
            if policy.on_collapse == "ignore":
                settle(group, "collapsed (ignored)", True)
                out.final = out.checks[-1]["perplexity"]
                continue
            for j in reversed(group):
                live.remove(j)
            out.final = last_good
            if policy.on_collapse == "stop":
                settle(group, "collapsed (rolled back)", False)
                out.stopped = True
                break
            # skip: a group of one is the offender; a larger group is re-applied one edit at a
            # time, checking after each, so that only the offending edits are dropped.
            if len(group) == 1:
                settle(group, "collapsed (skipped)", False)
                continue
            for j in group:
                live.add(j)
                if check(j, [j]):
                    live.remove(j)
                    settle([j], "collapsed (skipped)", False)
                else:
                    settle([j], "ok", True)
                    last_good = out.final = out.checks[-1]["perplexity"]
    finally:
        progress.close()
    out.accepted.sort()
    return out


# ---- the output plan ---------------------------------------------------------------------------


def output_plan(ckpt: Checkpoint, edits: Sequence[Edit], accepted: Sequence[int], *,
                dtype: torch.dtype | None = None, device: str = "cpu") -> list[OutputTensor]:
    """The engine plan of base + the accepted edits: W + Σ ΔW in float32 for every edited
    tensor (cast once to ``dtype`` or the stored dtype), every other tensor cast or copied raw."""
    by_name: dict[str, list[TensorEdit]] = {}
    for i in sorted(accepted):
        for name, te in edits[i].tensors.items():
            by_name.setdefault(name, []).append(te)

    def edited(name: str) -> torch.Tensor:
        w = ckpt.get(name, device=device)
        for te in by_name[name]:
            w += te.delta(device=device)
        return w

    plan = []
    for name in ckpt.names:
        if name in by_name:
            plan.append(OutputTensor(name, ckpt.info(name).shape, dtype or ckpt.info(name).dtype,
                                     compute=lambda name=name: edited(name)))
        else:
            plan.append(cast_tensor(ckpt, name, dtype))
    return plan


# ---- the entry point ---------------------------------------------------------------------------


def _prechecks(ckpt: Checkpoint, edits: Sequence[Edit], base_status: list[dict[str, str]], *, max_rel_norm: float,
               max_sigma_ratio: float) -> list[dict[str, Any]]:
    """One report record per edit with its per-tensor pre-checks; no forward pass."""
    w_stats: dict[str, dict[str, float]] = {}
    records: list[dict[str, Any]] = []
    for i, e in enumerate(edits):
        rows = []
        for name, te in e.tensors.items():
            if name not in w_stats:
                w_stats[name] = weight_stats(ckpt.get(name))
            row = precheck(te, w_stats[name], max_rel_norm=max_rel_norm, max_sigma_ratio=max_sigma_ratio)
            row["base_check"] = base_status[i][name]
            rows.append(row)
        records.append({"index": i, "file": str(e.path), "description": e.description,
                        "subject": e.info.get("subject"), "tensors": rows,
                        "precheck": "over" if any(r["over"] for r in rows) else "ok",
                        "perplexity": None, "ratio": None, "verdict": "not reached"})
    return records


def apply_edits(
    base: str | Path | Checkpoint,
    edit_files: Sequence[str | Path],
    output: str | Path,
    *,
    text: str | Path | None = None,
    corpus: bool = False,
    ctx: int | None = None,
    stride: int | None = None,
    max_sentences: int | None = None,
    batch_size: int = 8,
    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO,
    max_ppl: float | None = None,
    check_every: int = 1,
    on_collapse: str = "stop",
    max_rel_norm: float = DEFAULT_MAX_REL_NORM,
    max_sigma_ratio: float = DEFAULT_MAX_SIGMA_RATIO,
    force_base: bool = False,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: str = "5GB",
    force: bool = False,
    progress: Progress | None = None,
) -> Result:
    """Apply edits one after another, checking perplexity, and write the result.

    Args:
        base: The checkpoint the edits apply to.
        edit_files: Edit ``.safetensors`` files, applied in this order.
        output: Output checkpoint folder.
        text: Probe text (default: the built-in probe); sentence mode unless ``corpus``.
        corpus, ctx, stride, max_sentences, batch_size: Perplexity settings (docs/eval.md).
        max_ppl_ratio, max_ppl, check_every, on_collapse: The :class:`CollapsePolicy`.
        max_rel_norm, max_sigma_ratio: Pre-check thresholds; an edit over either is checked
            immediately whatever ``check_every`` says.
        force_base: Apply edits whose recorded base sha256 does not match.
        tokenizer: Tokenizer folder when the base has none.
        device: Where the forward passes and sums run.
        dtype: Output dtype (default: each tensor's stored dtype).
        shard_size, force: Writer options.

    Returns:
        A Result: the written checkpoint (the last good state when a collapse stopped the run)
        and the report (the command layer draws ``--plot`` from it); ``passed`` is False when
        ``on_collapse == "stop"`` fired.

    Raises:
        UsageError, InputError, IncompatibleCheckpointsError (mismatched base), OutputExistsError.
    """
    from ..eval.perplexity import read_text

    policy = CollapsePolicy(max_ppl_ratio=max_ppl_ratio, max_ppl=max_ppl, check_every=check_every,
                            on_collapse=on_collapse)
    policy.validate()
    if not edit_files:
        raise UsageError("give at least one edit file.")
    target_dtype = parse_dtype(dtype)
    out = Path(output)
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(str(base))
    edits = [load_edit(p) for p in edit_files]
    read_paths = [Path(p) for p in edit_files] + ([Path(text)] if text is not None else [])
    check_output(out, force=force, inputs=ckpt.input_paths() + read_paths)  # before the long loop, again at the end
    _validate(ckpt, edits)
    records = _prechecks(ckpt, edits, _verify_bases(ckpt, edits, force_base), max_rel_norm=max_rel_norm,
                         max_sigma_ratio=max_sigma_ratio)
    body = read_text(text)

    t_start = time.perf_counter()
    session = EditSession.open(ckpt, edits, body, corpus=corpus, ctx=ctx, stride=stride, max_sentences=max_sentences,
                               batch_size=batch_size, tokenizer=tokenizer, device=device)
    try:
        outcome = collapse_loop(session, len(edits), policy, urgent=[r["precheck"] == "over" for r in records],
                                vocab_size=session.vocab_size, label=ckpt.label, progress=progress)
    finally:
        session.close()
    loop_seconds = time.perf_counter() - t_start
    for record, decided in zip(records, outcome.edits):
        record.update(decided)

    report: dict[str, Any] = {
        "base": ckpt.label, "output": str(out), "edits": records, "checks": outcome.checks,
        "baseline_perplexity": outcome.baseline, "final_perplexity": outcome.final,
        "metric": "corpus perplexity" if corpus else "mean per-sentence perplexity",
        "thresholds": {"max_ppl_ratio": max_ppl_ratio, "max_ppl": outcome.ceiling, "max_rel_norm": max_rel_norm,
                       "max_sigma_ratio": max_sigma_ratio},
        "check_every": check_every, "on_collapse": on_collapse, "stopped": outcome.stopped,
        "accepted": len(outcome.accepted), "rejected": len(edits) - len(outcome.accepted),
        "collapsed_at": outcome.collapsed_at,
        "seconds": {"checks_and_edits": loop_seconds, "perplexity": session.ppl_seconds},
        "notes": outcome.notes,
    }
    params = {"edits": [{"file": str(e.path), "sha256": hash_file(e.path) if e.path else None} for e in edits],
              "accepted": outcome.accepted, "max_ppl_ratio": max_ppl_ratio, "max_ppl": outcome.ceiling,
              "check_every": check_every, "on_collapse": on_collapse, "force_base": force_base,
              "text": str(text) if text is not None else "probe (built in)",
              "metric": report["metric"], "dtype": dtype_name(target_dtype) if target_dtype else None}
    t_write = time.perf_counter()
    written = write_checkpoint(output_plan(ckpt, edits, outcome.accepted, dtype=target_dtype, device=device), out,
                               donor=ckpt, operation="edit-apply", parameters=params, inputs=[ckpt],
                               input_roles=["base"], input_paths=read_paths, dtype=target_dtype,
                               shard_size=shard_size, force=force, progress=progress,
                               extra_record=lambda: {"baseline_perplexity": outcome.baseline,
                                                     "final_perplexity": outcome.final,
                                                     "verdicts": [r["verdict"] for r in records]})
    report["seconds"]["write"] = time.perf_counter() - t_write
    return Result(report, written, passed=not outcome.stopped)
