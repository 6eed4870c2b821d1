"""Perplexity of a causal language model with ``transformers`` forward passes.

Two definitions, both standard:

* **Corpus** (Hugging Face docs, "Perplexity of fixed-length models",
  https://huggingface.co/docs/transformers/perplexity): the text is tokenized once and read
  in windows of ``ctx`` tokens that start every ``stride`` tokens. Each window scores only the
  tokens no earlier window scored (labels before them are -100), so every token after the
  first is predicted exactly once, with up to ``ctx - stride`` tokens of extra context.
  PPL = exp(sum of NLL / number of scored tokens). ``stride == ctx`` gives the disjoint
  windows of lm-evaluation-harness.
* **Sentences** (Yang et al. 2024, "The Butterfly Effect of Model Editing",
  https://arxiv.org/abs/2402.09656): one sentence per line, tokenized without special tokens
  (no BOS), per-sentence perplexity exp(mean token NLL); reported as mean and median.

Both are batched, run under ``torch.inference_mode()`` and compute logits only where a token
is scored (``logits_to_keep`` where the model supports it).
"""

from __future__ import annotations

import importlib.resources
import inspect
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..core.errors import InputError, UsageError
from ..core.progress import Progress, ensure

DEFAULT_BATCH_SIZE = 8
MAX_DEFAULT_CTX = 1024


def probe_text() -> str:
    """The default probe: 70 plain English sentences written for this project, one per line."""
    return importlib.resources.files("surgery").joinpath("data/probe.txt").read_text(encoding="utf-8")


def split_sentences(text: str) -> list[str]:
    """One sentence per non-empty line, surrounding whitespace removed."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_text(path: str | Path | None) -> str:
    """The text of ``path``, or the default probe when ``path`` is None."""
    if path is None:
        return probe_text()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the text file {p} ({exc}); pass a UTF-8 text file as `text`.", path=p) from exc
    if not text.strip():
        raise InputError(f"the text file {p} is empty; pass a file with some text as `text`.", path=p)
    return text


def _exp(nll: float) -> float:
    """exp(nll), inf instead of OverflowError (a collapsed model's NLL can exceed 709)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target token, [B, T], in float32. One sequence at a time, so the
    log-softmax temporaries are 1/B of the (vocabulary-wide) logits, not a copy of them."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    for r in range(targets.shape[0]):
        out[r] = torch.nn.functional.cross_entropy(logits[r].float(), targets[r], reduction="none")
    return out


# ---- model loading -----------------------------------------------------------------------


def load_causal_lm(ckpt: Checkpoint, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   tokenizer: str | Path | None = None) -> tuple[Any, Any]:
    """The checkpoint as a ``transformers`` causal LM built from its own tensors (in ``dtype``,
    eval mode), and its tokenizer; see :mod:`surgery.checkpoint.model`.

    Args:
        ckpt: An opened checkpoint whose folder holds config.json (and usually the tokenizer).
        device: Where the model runs.
        dtype: Compute dtype of the model (float32 by default, whatever the stored dtype).
        tokenizer: Folder or Hub id of the tokenizer when the checkpoint has none.

    Raises:
        InputError: No config.json, no causal-LM head, missing tensors, or no tokenizer.
    """
    from ..checkpoint.model import build_config, load_model, load_tokenizer

    build_config(ckpt)  # the cheap failures first: no or unknown config, then no tokenizer
    tok = load_tokenizer(ckpt, tokenizer)
    return load_model(ckpt, head="causal_lm", dtype=dtype, device=device), tok


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _max_positions(model: Any) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ---- corpus mode -------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One window of the strided evaluation: tokens [begin, end), the last ``scored`` of them scored."""

    begin: int
    end: int
    scored: int


def corpus_windows(num_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The Hugging Face docs' strided windows over ``num_tokens`` tokens.

    Window k starts at ``k * stride`` and ends ``ctx`` later (or at the end of the text); it
    scores the tokens after the previous window's end. The first token of the text has no
    prediction, so the first window effectively scores ``scored - 1`` tokens.
    """
    if ctx < 2:
        raise UsageError(f"`ctx` must be at least 2 tokens, got {ctx}.")
    if not 1 <= stride <= ctx:
        raise UsageError(f"`stride` must be between 1 and `ctx` ({ctx}), got {stride}.")
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + ctx, num_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass
class Scorer:
    """A model plus the tokenized probe, ready to compute the same perplexity many times.

    Built by :func:`make_scorer`; :meth:`score` runs the forward passes (used once by
    ``eval ppl`` and after every checked edit by ``edit apply``).
    """

    model: Any
    mode: str  # "corpus" | "sentences"
    device: str
    batch_size: int
    ids: torch.Tensor | None = None            # corpus: the whole text, 1-D
    windows: list[Window] = field(default_factory=list)
    sentences: list[list[int]] = field(default_factory=list)
    skipped_sentences: int = 0
    truncated_sentences: int = 0
    ctx: int = 0
    stride: int = 0
    _keep: bool = False

    @property
    def steps(self) -> int:
        """Number of sequences forwarded per score (progress total)."""
        return len(self.windows) if self.mode == "corpus" else len(self.sentences)

    def score(self, progress: Progress | None = None) -> dict[str, Any]:
        """Run the forward passes and return the perplexity report (see docs/eval.md)."""
        progress = ensure(progress)
        progress.start(self.steps, f"perplexity ({self.mode})")
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self._corpus(progress) if self.mode == "corpus" else self._sentences(progress)
        finally:
            progress.close()
        seconds = time.perf_counter() - t0
        out["seconds"] = seconds
        out["tokens_per_second"] = out["tokens_scored"] / seconds if seconds > 0 else None
        out["forward_tokens_per_second"] = out["tokens_forwarded"] / seconds if seconds > 0 else None
        return out

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int) -> torch.Tensor:
        kw: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if self._keep and keep < input_ids.shape[1]:
            kw["logits_to_keep"] = keep
        logits = self.model(**kw).logits
        return logits[:, -keep:, :]

    def _corpus(self, progress: Progress) -> dict[str, Any]:
        assert self.ids is not None
        nll_sum = 0.0
        scored = 0
        forwarded = 0
        # Windows of equal length that score equally many tokens batch together: the first
        # window (all positions scored) and a short last one go alone, so the others only
        # need logits for their scored tail.
        def key(w: Window) -> tuple[int, int]:
            return (w.end - w.begin, w.scored)

        groups: list[list[Window]] = []
        for w in self.windows:
            if groups and key(groups[-1][0]) == key(w) and len(groups[-1]) < self.batch_size:
                groups[-1].append(w)
            else:
                groups.append([w])
        for group in groups:
            length = group[0].end - group[0].begin
            batch = torch.stack([self.ids[w.begin:w.end] for w in group]).to(self.device)
            # Window positions t in [length - scored, length) are scored (t >= 1: the very
            # first token has no prediction); the logit at t - 1 predicts token t.
            first = [max(length - w.scored, 1) for w in group]
            keep = length - (min(first) - 1)
            logits = self._logits(batch, None, keep)[:, :-1, :]  # predictors of tokens length-keep+1 .. length-1
            targets = batch[:, length - keep + 1:]
            nll = _token_nll(logits, targets)
            del logits
            pos = torch.arange(length - keep + 1, length, device=nll.device)
            mask = pos.unsqueeze(0) >= torch.tensor(first, device=nll.device).unsqueeze(1)
            nll_sum += float(nll[mask].double().sum())
            scored += int(mask.sum())
            forwarded += batch.numel()
            progress.advance(len(group))
        ppl = _exp(nll_sum / scored) if scored else float("nan")
        return {"mode": "corpus", "perplexity": ppl, "mean_nll": nll_sum / scored if scored else None,
                "ctx": self.ctx, "stride": self.stride, "num_windows": len(self.windows),
                "tokens": int(self.ids.numel()), "tokens_scored": scored, "tokens_forwarded": forwarded}

    def _sentences(self, progress: Progress) -> dict[str, Any]:
        order = sorted(range(len(self.sentences)), key=lambda i: len(self.sentences[i]))
        per: list[float] = [0.0] * len(self.sentences)
        scored = 0
        forwarded = 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            lens = [len(self.sentences[i]) for i in idx]
            width = max(lens)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :lens[r]] = torch.tensor(self.sentences[i])
                mask[r, :lens[r]] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            # Right padding: real tokens keep positions 0..n-1; padded targets are masked out.
            logits = self._logits(ids, mask if min(lens) < width else None, width)[:, :-1, :]
            targets = ids[:, 1:]
            nll = _token_nll(logits, targets).double()
            del logits
            valid = mask[:, 1:].bool()
            sums = (nll * valid).sum(dim=1)
            counts = valid.sum(dim=1)
            for r, i in enumerate(idx):
                per[i] = _exp(float(sums[r]) / int(counts[r]))
            scored += int(counts.sum())
            forwarded += sum(lens)
            progress.advance(len(idx))
        mean = statistics.fmean(per) if per else float("nan")
        return {"mode": "sentences", "perplexity": mean, "mean": mean,
                "median": statistics.median(per) if per else float("nan"),
                "ctx": self.ctx, "num_sentences": len(per), "skipped_sentences": self.skipped_sentences,
                "truncated_sentences": self.truncated_sentences, "per_sentence": per,
                "tokens_scored": scored, "tokens_forwarded": forwarded}


def make_scorer(model: Any, tokenizer: Any, text: str, *, sentences: bool = False, ctx: int | None = None,
                stride: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu",
                max_sentences: int | None = None) -> Scorer:
    """Tokenize ``text`` for ``model`` and plan the forward passes.

    Args:
        model, tokenizer: From :func:`load_causal_lm`.
        text: The probe text (one sentence per line in sentence mode).
        sentences: Sentence mode instead of corpus mode.
        ctx: Window length in tokens (default: the model's maximum positions, at most 1024);
            in sentence mode, longer sentences are cut to ``ctx`` tokens.
        stride: Corpus mode window step (default ``ctx // 2``, the docs' setting).
        batch_size: Sequences per forward pass.
        max_sentences: Use only the first N sentences (sentence mode).

    Raises:
        UsageError: Bad ctx / stride / batch size, or a text too short to score.
    """
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}.")
    limit = _max_positions(model)
    if ctx is None:
        ctx = min(limit or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)
    if limit is not None and ctx > limit:
        raise UsageError(f"`ctx` {ctx} exceeds the model's {limit} positions; pass `ctx={limit}` or less.")
    if ctx < 2:
        raise UsageError(f"`ctx` must be at least 2 tokens, got {ctx}.")
    scorer = Scorer(model=model, mode="sentences" if sentences else "corpus", device=str(device),
                    batch_size=batch_size, ctx=ctx, _keep=_supports_logits_to_keep(model))
    if sentences:
        lines = split_sentences(text)
        if max_sentences is not None:
            lines = lines[:max_sentences]
        for line in lines:
            toks = tokenizer(line, add_special_tokens=False)["input_ids"]
            if len(toks) < 2:
                scorer.skipped_sentences += 1
                continue
            if len(toks) > ctx:
                toks = toks[:ctx]
                scorer.truncated_sentences += 1
            scorer.sentences.append(list(toks))
        if not scorer.sentences:
            raise UsageError("the text has no sentence of two or more tokens to score; give one sentence per line.")
        return scorer
    scorer.stride = ctx // 2 if stride is None else stride
    # The whole text is one sequence longer than the model's window on purpose: silence
    # the tokenizer's "sequence length is longer than the maximum" warning.
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    if ids.numel() < 2:
        raise UsageError("the text is shorter than two tokens; give a longer `text`.")
    scorer.ids = ids
    scorer.windows = corpus_windows(int(ids.numel()), ctx, scorer.stride)
    return scorer


def perplexity(checkpoint: str | Path | Checkpoint, *, text: str | Path | None = None, sentences: bool = False,
               ctx: int | None = None, stride: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               device: str = "cpu", dtype: str = "float32", tokenizer: str | Path | None = None,
               max_sentences: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity of a checkpoint on a text file (default: the shipped probe).

    Args:
        checkpoint: Folder, file or Hub id (or an opened Checkpoint).
        text: Path of a UTF-8 text file; None uses the shipped probe (``surgery/data/probe.txt``).
        sentences: Per-sentence perplexity (mean and median) instead of corpus perplexity.
        ctx, stride, batch_size, max_sentences: See :func:`make_scorer`.
        device: Where the forward passes run.
        dtype: Compute dtype (float32, bfloat16, float16).
        tokenizer: Tokenizer folder or Hub id when the checkpoint has none.

    Returns:
        The report of :meth:`Scorer.score` plus ``checkpoint``, ``text``, ``dtype``, ``device``
        and ``load_seconds``.
    """
    from ..core.engine import parse_dtype

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(str(checkpoint))
    body = read_text(text)
    compute = parse_dtype(dtype) or torch.float32
    t0 = time.perf_counter()
    model, tok = load_causal_lm(ckpt, device=device, dtype=compute, tokenizer=tokenizer)
    load_seconds = time.perf_counter() - t0
    scorer = make_scorer(model, tok, body, sentences=sentences, ctx=ctx, stride=stride, batch_size=batch_size,
                         device=device, max_sentences=max_sentences)
    report = scorer.score(progress)
    report.update({"checkpoint": ckpt.label, "text": str(text) if text is not None else "probe (built in)",
                   "dtype": str(compute).removeprefix("torch."), "device": str(device), "batch_size": batch_size,
                   "load_seconds": load_seconds})
    return report
