"""Sequential edit application with perplexity collapse checks.

Background (docs/edit.md, ALGORITHMS.md §3): ROME / MEMIT edits are low-rank additive
updates, and one bad edit, or a few sequential ones, can collapse a model (Yang et al. 2024,
"The Butterfly Effect of Model Editing", https://arxiv.org/abs/2402.09656). Perplexity on a
small general-text probe is the cheap surrogate that catches it.

The model is loaded once (float32, transformers). Each edit is added to the live parameters
in place; a collapsing edit is removed again by subtraction. Cheap pre-checks
(‖ΔW‖_F/‖W‖_F, σ_max(ΔW)/σ_max(W)) run before any forward pass and force a perplexity check
when over their thresholds. The output is written by the streaming engine from the base
checkpoint: tensors no accepted edit touches are copied as raw bytes, edited ones are
computed as W + Σ ΔW in float32 and cast once.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import Checkpoint, open_checkpoint
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


@dataclass
class _State:
    """Bookkeeping of the sequential loop."""

    records: list[dict[str, Any]]
    checks: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    ppl_seconds: float = 0.0


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
                        f"{base_sha[name][:12]}...); use the base it was made for, or pass --force-base.",
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
    plot: str | Path | None = None,
    progress: Progress | None = None,
) -> Result:
    """Apply edits one after another, checking perplexity, and write the result.

    Args:
        base: The checkpoint the edits apply to.
        edit_files: Edit ``.safetensors`` files, applied in this order.
        output: Output checkpoint folder.
        text: Probe text (default: the built-in probe); sentence mode unless ``corpus``.
        corpus, ctx, stride, max_sentences, batch_size: Perplexity settings (docs/eval.md).
        max_ppl_ratio: Collapse when perplexity / baseline exceeds this (default 1.5).
        max_ppl: Absolute ceiling (default: the vocabulary size, i.e. worse than uniform guessing).
        check_every: Check perplexity after every K edits (and after the last one).
        on_collapse: ``stop`` (write the last good state, report stopped), ``skip`` (drop the
            offending edit) or ``ignore`` (record and go on).
        max_rel_norm, max_sigma_ratio: Pre-check thresholds; an edit over either is checked
            immediately whatever ``check_every`` says.
        force_base: Apply edits whose recorded base sha256 does not match.
        tokenizer: Tokenizer folder when the base has none.
        device: Where the forward passes and sums run.
        dtype: Output dtype (default: each tensor's stored dtype).
        shard_size, force: Writer options.
        plot: Write a PNG of perplexity against edit index here.

    Returns:
        A Result: the written checkpoint (the last good state when a collapse stopped the run)
        and the report; ``passed`` is False when ``on_collapse == "stop"`` fired.

    Raises:
        UsageError, InputError, IncompatibleCheckpointsError (mismatched base), OutputExistsError.
    """
    from ..eval.perplexity import load_causal_lm, make_scorer, read_text

    if on_collapse not in ON_COLLAPSE:
        raise UsageError(f"--on-collapse must be one of {', '.join(ON_COLLAPSE)}, got {on_collapse!r}.")
    if not max_ppl_ratio > 1.0:
        raise UsageError(f"--max-ppl-ratio must be above 1, got {max_ppl_ratio}.")
    if check_every < 1:
        raise UsageError(f"--check-every must be at least 1, got {check_every}.")
    if max_ppl is not None and not max_ppl > 0:
        raise UsageError(f"--max-ppl must be positive, got {max_ppl}.")
    if not edit_files:
        raise UsageError("give at least one edit file.")
    target_dtype = parse_dtype(dtype)
    out = Path(output)
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise UsageError(f"--plot must name a .png file, got {plot}.")
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(str(base))
    edits = [load_edit(p) for p in edit_files]
    read_paths = [Path(p) for p in edit_files] + ([Path(text)] if text is not None else [])
    check_output(out, force=force, inputs=ckpt.input_paths() + read_paths)  # before the long loop, again at the end
    _validate(ckpt, edits)
    base_status = _verify_bases(ckpt, edits, force_base)
    body = read_text(text)
    progress = ensure(progress)

    # Pre-checks: no forward pass yet.
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

    t_start = time.perf_counter()
    model, tok = load_causal_lm(ckpt, device=device, dtype=torch.float32, tokenizer=tokenizer)
    scorer = make_scorer(model, tok, body, sentences=not corpus, ctx=ctx, stride=stride, batch_size=batch_size,
                         device=device, max_sentences=max_sentences)
    vocab = getattr(model.config, "vocab_size", None)
    ceiling = float(max_ppl) if max_ppl is not None else (float(vocab) if vocab else math.inf)
    names = {n for e in edits for n in e.tensors}
    live = _param_map(model, ckpt, names)
    state = _State(records)
    notes: list[str] = []

    def measure() -> float:
        t0 = time.perf_counter()
        value = float(scorer.score()["perplexity"])
        state.ppl_seconds += time.perf_counter() - t0
        progress.advance()
        return value

    def add(i: int, sign: float) -> None:
        with torch.no_grad():
            for name, te in edits[i].tensors.items():
                p = live[name]
                p.add_(te.delta(dtype=p.dtype, device=p.device), alpha=sign)

    progress.start(len(edits) + 1, "applying edits")
    try:
        baseline = measure()
        state.checks.append({"after_edit": None, "perplexity": baseline, "ratio": 1.0, "collapsed": False})
        if not math.isfinite(baseline):
            raise InputError(f"the perplexity of {ckpt.label} itself is {baseline}; the base is broken, "
                             f"so collapse cannot be judged.", path=ckpt.root)
        if baseline >= ceiling:
            if max_ppl is not None:
                raise UsageError(f"the base perplexity {baseline:.4g} is already above --max-ppl {max_ppl:g}; "
                                 f"raise --max-ppl or leave it out.")
            # An untrained base already guesses no better than uniform: only the ratio can judge it.
            notes.append(f"the base perplexity {baseline:.4g} is above the vocabulary size {ceiling:g}; "
                         f"the absolute ceiling is off and only --max-ppl-ratio judges collapse")
            ceiling = math.inf

        def verdict(value: float) -> tuple[float, bool]:
            ratio = value / baseline
            return ratio, (not math.isfinite(value)) or ratio > max_ppl_ratio or value > ceiling

        def check(after: int) -> tuple[float, float, bool]:
            value = measure()
            ratio, collapsed = verdict(value)
            state.checks.append({"after_edit": after, "perplexity": value, "ratio": ratio, "collapsed": collapsed})
            return value, ratio, collapsed

        pending: list[int] = []
        stopped = False
        last_good = current = baseline  # perplexity of the last passing state / of the live state
        for i in range(len(edits)):
            add(i, +1.0)
            pending.append(i)
            records[i]["verdict"] = "applied"
            due = len(pending) >= check_every or i == len(edits) - 1 or records[i]["precheck"] == "over"
            if not due:
                continue
            value, ratio, collapsed = check(i)
            for j in pending:
                records[j].update(perplexity=value, ratio=ratio, checked_after=i)
            if not collapsed:
                for j in pending:
                    records[j]["verdict"] = "ok"
                state.accepted.extend(pending)
                pending, last_good, current = [], value, value
                continue
            if on_collapse == "ignore":
                for j in pending:
                    records[j]["verdict"] = "collapsed (ignored)"
                state.accepted.extend(pending)
                pending, current = [], value
                continue
            for j in reversed(pending):
                add(j, -1.0)
            current = last_good
            if on_collapse == "stop":
                for j in pending:
                    records[j]["verdict"] = "collapsed (rolled back)"
                stopped = True
                pending = []
                break
            # skip: with one edit in the group it is the offender; with several, re-apply them
            # one at a time, checking after each, so only the offending ones are dropped.
            if len(pending) == 1:
                records[i]["verdict"] = "collapsed (skipped)"
            else:
                progress.start(len(edits) + len(pending), "applying edits (isolating the collapse)")
                for j in pending:
                    add(j, +1.0)
                    v, r, c = check(j)
                    records[j].update(perplexity=v, ratio=r, checked_after=j)
                    if c:
                        add(j, -1.0)
                        records[j]["verdict"] = "collapsed (skipped)"
                    else:
                        records[j]["verdict"] = "ok"
                        state.accepted.append(j)
                        last_good = current = v
            pending = []
    finally:
        progress.close()
    loop_seconds = time.perf_counter() - t_start
    del live, model, scorer

    accepted = sorted(state.accepted)
    report: dict[str, Any] = {
        "base": ckpt.label, "output": str(out), "edits": records, "checks": state.checks,
        "baseline_perplexity": baseline, "final_perplexity": current,
        "metric": "corpus perplexity" if corpus else "mean per-sentence perplexity",
        "thresholds": {"max_ppl_ratio": max_ppl_ratio, "max_ppl": ceiling, "max_rel_norm": max_rel_norm,
                       "max_sigma_ratio": max_sigma_ratio},
        "check_every": check_every, "on_collapse": on_collapse, "stopped": stopped,
        "accepted": len(accepted), "rejected": len(edits) - len(accepted),
        "collapsed_at": next((c["after_edit"] for c in state.checks if c["collapsed"]), None),
        "seconds": {"checks_and_edits": loop_seconds, "perplexity": state.ppl_seconds},
        "notes": notes,
    }
    # Output: W + Σ accepted ΔW, computed from the base checkpoint; untouched tensors copied raw.
    by_name: dict[str, list[TensorEdit]] = {}
    for i in accepted:
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
            plan.append(OutputTensor(name, ckpt.info(name).shape, target_dtype or ckpt.info(name).dtype,
                                     compute=lambda name=name: edited(name)))
        else:
            plan.append(cast_tensor(ckpt, name, target_dtype))
    params = {"edits": [{"file": str(e.path), "sha256": _file_sha(e.path)} for e in edits],
              "accepted": accepted, "max_ppl_ratio": max_ppl_ratio, "max_ppl": ceiling,
              "check_every": check_every, "on_collapse": on_collapse, "force_base": force_base,
              "text": str(text) if text is not None else "probe (built in)",
              "metric": report["metric"], "dtype": dtype_name(target_dtype) if target_dtype else None}
    t_write = time.perf_counter()
    written = write_checkpoint(plan, out, donor=ckpt, operation="edit-apply", parameters=params, inputs=[ckpt],
                               input_roles=["base"], input_paths=read_paths, dtype=target_dtype,
                               shard_size=shard_size, force=force, progress=progress,
                               extra_record=lambda: {"baseline_perplexity": baseline,
                                                     "final_perplexity": report["final_perplexity"],
                                                     "verdicts": [r["verdict"] for r in records]})
    report["seconds"]["write"] = time.perf_counter() - t_write
    if plot is not None:
        from .plot import plot_perplexity

        plot_perplexity(report, plot)
        report["plot"] = str(plot)
    return Result(report, written, passed=not stopped)


def _file_sha(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
