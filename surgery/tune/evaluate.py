"""Score a merge candidate without writing a checkpoint.

The base and the models are read once into memory in their stored dtype (a bf16 135M model
is 270 MB each). A candidate — a :class:`~surgery.merge.recipe.MergeRequest` — is merged by
the same batch plan ``surgery merge`` runs (:func:`surgery.merge.batch.plan_batch`, the same
per-tensor functions, blocks and seeds), each merged tensor rounded to the dtype ``merge``
would write, and copied into one ``transformers`` model built once from the base. The probes
are tokenized once and split into a search part and a report part; scoring a part is the
corpus perplexity of ``surgery eval ppl`` (:class:`surgery.eval.perplexity.Scorer`). So a
trial's numbers are those ``merge`` + ``eval ppl`` would give for the written checkpoint, at a
fraction of the cost: no checkpoint is written or read back, no model is rebuilt, no text is
re-tokenized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.reader import Checkpoint
from ..core.errors import IncompatibleCheckpointsError, UsageError
from ..eval.perplexity import Scorer, _token_nll, corpus_windows, load_causal_lm, make_scorer
from ..merge.ahead import Pool, run_in_order
from ..merge.batch import output_tensors
from ..merge.inputs import Inputs
from ..merge.methods import fused
from ..merge.methods.select import SortedCache
from ..merge.methods.subspace import FactorCache
from ..merge.plan import plan_merge
from ..merge.recipe import MergeRequest, ModelRef
from ..merge.registry import get_method


class MemoryCheckpoint:
    """A checkpoint (or a ``model+lora`` fused one) whose tensors are held in memory in their
    stored dtype; reads return fresh copies, as :class:`~surgery.checkpoint.reader.Checkpoint`'s
    do (methods modify them). Everything else (names, headers, config, files) is the wrapped
    checkpoint's."""

    def __init__(self, ckpt: Any):
        self.ckpt = ckpt
        self._data = {n: ckpt.get_raw(n) for n in ckpt.names}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.ckpt, attr)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def get_raw(self, name: str) -> torch.Tensor:
        return self._data[name].clone()

    def get(self, name: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"):
        t = self._data[name]
        out = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
        return out

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        t = self._data[name][start:stop]
        return t.to(device=device, dtype=dtype if dtype is not None else t.dtype, copy=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())


@dataclass
class Probe:
    """One probe text: its name, weight in the objective, and its two scored parts."""

    name: str
    path: str
    weight: float
    sha256: str
    tokens: int
    search: Scorer
    report: Scorer
    chunks: list[Scorer] = dataclasses.field(default_factory=list)   # the surrogate, RACE_WINDOWS at a time
    search_scored: int = 0                      # tokens the surrogate scores
    surrogate: Scorer | None = None             # the windows of the search part a trial scores
    windows: list[int] = dataclasses.field(default_factory=list)    # their indices in the search part


# windows per step of a race (:meth:`Evaluator.race`): small enough that a hopeless candidate
# stops early, large enough that the forward passes stay batched
RACE_WINDOWS = 2


def surrogate_windows(total: int, wanted: int | None, seed: int) -> list[int]:
    """Indices of the search windows a trial scores: ``wanted`` of the ``total``, evenly spaced
    with an offset drawn from ``seed`` (all of them when ``wanted`` is 0/None or not below ``total``)."""
    if not wanted or wanted >= total:
        return list(range(total))
    u = random.Random(seed).random()
    return sorted({min(total - 1, int((k + u) * total / wanted)) for k in range(wanted)})


def split_point(num_tokens: int, holdout: float) -> int:
    """Tokens in the search part: the first (1 − holdout) of the text (at least 2 in each part)."""
    cut = int(round(num_tokens * (1.0 - holdout)))
    return max(2, min(num_tokens - 2, cut))


class Evaluator:
    """The model, the inputs and the probes of one tuning run, ready to score candidates.

    Args:
        base: θ0's reference (path, Hub id; mergekit's string form).
        models: The references of the models to merge (their tensors must match the base's).
        probes: ``(name, path, text, weight)`` per probe.
        holdout: Share of each probe's tokens kept for the report.
        ctx, stride, batch_size: Corpus windows (default: ``eval ppl``'s ctx, disjoint windows).
        search_windows: Windows of each probe's search part a trial scores (the surrogate;
            0/None: all of them, exact); see :func:`surrogate_windows`.
        seed: Places the surrogate's windows.
        device: Where the forward passes and the merge math run.
        sorted_cache_bytes: Cap of :attr:`sorted_cache` (default: the models' size in float32).

    Attributes:
        factor_cache: Decompositions kept across trials (TSV-M's factors).
        sorted_cache: Sorted task-vector magnitudes kept across trials (magnitude and outlier trimming).
    """

    def __init__(self, base: str, models: list[str], probes: list[tuple[str, str, str, float]], *,
                 holdout: float = 0.5, ctx: int | None = None, stride: int | None = None, batch_size: int = 8,
                 search_windows: int | None = None, seed: int = 0, device: str = "cpu",
                 sorted_cache_bytes: int | None = None):
        t0 = time.perf_counter()
        self.device = device
        opened = Inputs(device)
        base_ck = opened.open(base, "base")
        model_cks = [opened.open(m, f"model {m}") for m in models]
        self.base_ckpt = base_ck
        for m in model_cks:
            bad = [n for n in base_ck.names if n not in m or m.info(n).shape != base_ck.info(n).shape]
            extra = [n for n in m.names if n not in base_ck]
            if bad or extra:
                raise IncompatibleCheckpointsError(
                    f"cannot tune a merge of {m.label} onto {base_ck.label}: tensor {(bad or extra)[0]!r} is missing "
                    f"or has another shape; tune needs models with the base's tensors.", path=m.label,
                    tensor=(bad or extra)[0])
        self.model, tok = load_causal_lm(base_ck if isinstance(base_ck, Checkpoint) else base_ck.base, device=device)
        self.names = [n for n in base_ck.names if base_ck.info(n).dtype.is_floating_point]
        self.targets = self._targets(self.names)
        # the planner finds every input already open, in memory
        self.inputs = Inputs(device)
        self.base = MemoryCheckpoint(base_ck)
        self.models = [MemoryCheckpoint(m) for m in model_cks]
        for text, mem in [(base, self.base), *zip(models, self.models)]:
            ref = ModelRef.parse(text)
            self.inputs.models[ref.key] = mem
            self.inputs.refs[ref.key] = ref
        # decompositions that depend only on the task vectors (TSV-M's factors), kept across
        # trials: at most twice the models' size in float32 (one model: 540 MB for 135M)
        fp32 = sum(self.base._data[n].numel() for n in self.names) * 4
        self.factor_cache = FactorCache(2 * fp32)
        # every model's |τ| sorted (int32 bit patterns), kept across trials: trimming at any
        # density is then two binary searches per tensor instead of two radix passes; at most
        # the models' size in float32 (1.6 GB for three 135M models), the rest uses the passes
        self.sorted_cache = SortedCache(len(models) * fp32 if sorted_cache_bytes is None else sorted_cache_bytes)
        self.probes = [self._probe(tok, name, path, text, weight, holdout, ctx, stride, batch_size,
                                   search_windows, seed) for name, path, text, weight in probes]
        # the surrogate is the exact search score when it keeps every window of every probe
        self.exact = all(len(p.windows) == len(p.search.windows) for p in self.probes)
        self.setup_seconds = time.perf_counter() - t0

    def _targets(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(dict(self.model.named_buffers(remove_duplicate=False)))
        missing = [n for n in names if n not in params]
        if missing:
            raise UsageError(f"tune cannot place tensor {missing[0]!r} of {self.base_ckpt.label} into the "
                             f"transformers model (its name changes on loading); tune a checkpoint saved by "
                             f"transformers' save_pretrained.", path=self.base_ckpt.label, tensor=missing[0])
        return {n: params[n] for n in names}

    def _probe(self, tok: Any, name: str, path: str, text: str, weight: float, holdout: float, ctx: int | None,
               stride: int | None, batch_size: int, search_windows: int | None, seed: int) -> Probe:
        whole = make_scorer(self.model, tok, text, ctx=ctx, batch_size=batch_size, device=self.device)
        stride = whole.ctx if stride is None else stride
        if not 1 <= stride <= whole.ctx:
            raise UsageError(f"`stride` must be between 1 and `ctx` ({whole.ctx}), got {stride}.")
        ids = whole.ids
        assert ids is not None
        if ids.numel() < 8:
            raise UsageError(f"probe {name!r} ({path}) has {ids.numel()} tokens; give at least a few sentences "
                             f"(both its search and its report part need text).", path=path)
        cut = split_point(int(ids.numel()), holdout)

        def part(t: torch.Tensor) -> Scorer:
            return dataclasses.replace(whole, ids=t, stride=stride,
                                       windows=corpus_windows(int(t.numel()), whole.ctx, stride))

        search = part(ids[:cut])
        picked = surrogate_windows(len(search.windows), search_windows, seed)
        surrogate = dataclasses.replace(search, windows=[search.windows[i] for i in picked])
        chunks = [dataclasses.replace(search, windows=surrogate.windows[i:i + RACE_WINDOWS])
                  for i in range(0, len(surrogate.windows), RACE_WINDOWS)]
        # a window scores its last `scored` tokens, except the very first token of a window
        scored = sum(min(w.scored, w.end - w.begin - 1) for w in surrogate.windows)
        return Probe(name, path, weight, hashlib.sha256(text.encode()).hexdigest(), int(ids.numel()),
                     search, part(ids[cut:]), chunks, scored, surrogate, picked)

    # ---- candidates ---------------------------------------------------------------------------

    def cache_state(self) -> tuple[int, int]:
        """(entries computed, entries dropped) so far by the caches kept across trials
        (decompositions, sorted magnitudes, the compiled TIES loop of :mod:`..merge.methods.fused`):
        a merge that changed the first but not the second filled them for good, and the next
        merge of the same request finds everything cached."""
        return (self.factor_cache.fills + self.sorted_cache.fills + fused.compiled(), self.factor_cache.evictions)

    def load(self, request: MergeRequest, *, seed: int = 0) -> None:
        """Merge ``request`` in memory and put the result into the model (rounded to the dtype
        ``surgery merge`` would write)."""
        method = get_method(request.method)
        if method.kind != "batch":
            raise UsageError(f"tune searches batch merge methods; {method.name!r} is continual "
                             f"(merge it with surgery merge).")
        plan = plan_merge(method, request, device=self.device, inputs=self.inputs)
        target = plan.dtype
        options = {"trim_ties": "index", "factor_cache": self.factor_cache, "sorted_cache": self.sorted_cache,
                   "fused": True}
        # tensors copied from an input unmerged have no rows: the model holds the base's already
        outs = [o for o in output_tensors(plan, seed=seed, device=self.device, options=options, copies=False)
                if o.rows is not None]

        def put(out: Any) -> None:
            with torch.inference_mode():
                param = self.targets[out.name]
                merged = out.rows(0, out.shape[0] if out.shape else 1)
                param.copy_(merged.to(target or out.dtype).reshape(param.shape))

        # whole tensors on one worker per core, one intra-op thread each (ahead.Pool): a
        # tensor's bytes do not depend on the thread count, and the small steps of the many
        # small tensors overlap instead of waiting on each other
        with Pool(self.device, enabled=True) as pool:
            run_in_order(pool, put, outs)

    def load_checkpoint(self, ckpt: MemoryCheckpoint) -> None:
        """Put one of the inputs (base or a model) into the model, for reference numbers."""
        with torch.inference_mode():
            for n in self.names:
                self.targets[n].copy_(ckpt.get(n, dtype=None).reshape(self.targets[n].shape))

    def score(self, part: str) -> dict[str, float]:
        """Mean token NLL of every probe's ``search`` or ``report`` part for the loaded weights."""
        got = self._score_together([(p.name, getattr(p, part)) for p in self.probes])
        return {name: total / n if n else float("nan") for name, (total, n) in got.items()}

    def race(self, give_up: Callable[[dict[str, float]], bool]) -> tuple[dict[str, float], dict[str, float], float]:
        """Score the surrogate (the chosen windows of the search parts) a few windows at a time, the probes in turn, and stop as soon
        as ``give_up(lower)`` is true for the lower bounds of the probes' mean NLLs: the tokens
        not scored yet count 0, as a token's NLL is never negative, so a candidate is only
        stopped when no rest of the text could make it good enough.

        Returns:
            (mean NLL per probe over the tokens scored — :meth:`score`'s numbers when the race
            ran to the end —, the lower bounds, the share of the search tokens scored).
        """
        sums = {p.name: 0.0 for p in self.probes}
        counts = {p.name: 0 for p in self.probes}
        lower = {p.name: 0.0 for p in self.probes}
        rounds = max(len(p.chunks) for p in self.probes)
        for r in range(rounds):
            # every probe's windows of this round in shared forward passes: a forward pass has a
            # cost of its own (reading the weights) that one probe's two windows would not cover
            for name, (nll_sum, n) in self._score_together([(p.name, p.chunks[r]) for p in self.probes
                                                            if r < len(p.chunks)]).items():
                sums[name] += nll_sum
                counts[name] += n
            for p in self.probes:
                lower[p.name] = sums[p.name] / p.search_scored
            if r < rounds - 1 and give_up(lower):
                break
        total = sum(p.search_scored for p in self.probes)
        nll = {k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}
        return nll, lower, sum(counts.values()) / total

    def _score_together(self, parts: list[tuple[str, Scorer]]) -> dict[str, tuple[float, int]]:
        """(NLL sum, tokens scored) per name of the windows of several corpus scorers, forwarded
        in batches of up to ``batch_size`` windows across scorers (the windows of
        :meth:`Scorer.score`, scored the same way: windows of one length and one scored tail
        batch together)."""
        out = {name: (0.0, 0) for name, _ in parts}
        items = [(name, sc, w) for name, sc in parts for w in sc.windows]
        if not items:
            return out
        first_sc = parts[0][1]
        groups: dict[tuple[int, int], list[tuple[str, Scorer, Any]]] = {}
        for it in items:
            groups.setdefault((it[2].end - it[2].begin, it[2].scored), []).append(it)
        with torch.inference_mode():
            for (length, _), members in groups.items():
                for i in range(0, len(members), first_sc.batch_size):
                    group = members[i:i + first_sc.batch_size]
                    batch = torch.stack([sc.ids[w.begin:w.end] for _, sc, w in group]).to(self.device)
                    first = [max(length - w.scored, 1) for _, _, w in group]
                    keep = length - (min(first) - 1)
                    logits = first_sc._logits(batch, None, keep)[:, :-1, :]
                    nll = _token_nll(logits, batch[:, length - keep + 1:])
                    del logits
                    pos = torch.arange(length - keep + 1, length, device=nll.device)
                    mask = pos.unsqueeze(0) >= torch.tensor(first, device=nll.device).unsqueeze(1)
                    row_sums = (nll.double() * mask).sum(dim=1).tolist()
                    row_counts = mask.sum(dim=1).tolist()
                    for (name, _, _), rs, rc in zip(group, row_sums, row_counts):
                        total, n = out[name]
                        out[name] = (total + rs, n + int(rc))
        return out

    def tokens(self, part: str) -> int:
        """Tokens forwarded per score of ``search``, ``report`` or ``surrogate`` over all probes."""
        if part == "surrogate":
            return sum(sum(w.end - w.begin for w in p.surrogate.windows) for p in self.probes if p.surrogate)
        return sum(int(getattr(p, part).ids.numel()) for p in self.probes)


def file_identity(path: str | Path) -> dict[str, Any]:
    """What a log remembers of an input file: its path, size and modification time."""
    p = Path(path)
    try:
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime": int(st.st_mtime)}
    except OSError:
        return {"path": str(p)}
