"""Perplexity against plain, unbatched forward passes written here (float64 log-softmax)."""

from __future__ import annotations

import math
import shutil
import statistics

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.core.errors import InputError, UsageError
from surgery.eval.perplexity import (corpus_windows, load_causal_lm, make_scorer, perplexity, probe_text,
                                         split_sentences)


@pytest.fixture(scope="module")
def llama(fixtures_dir):
    ckpt = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    return load_causal_lm(ckpt)


@pytest.fixture(scope="module")
def gpt2(fixtures_dir):
    ckpt = open_checkpoint(fixtures_dir / "gpt2-tiny" / "base")
    return load_causal_lm(ckpt)


def hf_docs_windows(n, ctx, stride):
    """The loop of the Hugging Face 'Perplexity of fixed-length models' page, verbatim in spirit."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def reference_corpus(model, ids, ctx, stride):
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, trg in hf_docs_windows(len(ids), ctx, stride):
            x = ids[begin:end].unsqueeze(0)
            labels = x.clone()
            labels[:, :-trg] = -100
            logp = torch.log_softmax(model(x).logits.double(), -1)[0, :-1]
            tgt = labels[0, 1:]
            keep = tgt != -100
            nll -= logp[keep].gather(1, tgt[keep].unsqueeze(1)).sum().item()
            count += int(keep.sum())
    return math.exp(nll / count), count


def reference_sentences(model, tok, sentences):
    per = []
    with torch.no_grad():
        for s in sentences:
            ids = torch.tensor(tok(s, add_special_tokens=False)["input_ids"]).unsqueeze(0)
            logp = torch.log_softmax(model(ids).logits.double(), -1)[0, :-1]
            nll = -logp.gather(1, ids[0, 1:].unsqueeze(1)).mean().item()
            per.append(math.exp(nll))
    return per


def test_windows_match_hf_docs_loop():
    for n, ctx, stride in [(10, 4, 2), (11, 4, 4), (100, 16, 5), (3, 8, 4), (16, 16, 16)]:
        got = [(w.begin, w.end, w.scored) for w in corpus_windows(n, ctx, stride)]
        assert got == hf_docs_windows(n, ctx, stride)


def test_window_parameters_are_checked():
    with pytest.raises(UsageError, match="`stride` must be between 1 and `ctx`"):
        corpus_windows(10, 4, 5)
    with pytest.raises(UsageError, match="`ctx` must be at least 2"):
        corpus_windows(10, 1, 1)


@pytest.mark.parametrize("which,ctx,stride,batch", [("llama", 64, 24, 3), ("llama", 48, 48, 4), ("gpt2", 40, 16, 8)])
@pytest.mark.slow
def test_corpus_equals_plain_forward_passes(llama, gpt2, which, ctx, stride, batch):
    model, tok = llama if which == "llama" else gpt2
    text = "\n".join(probe_text().splitlines()[:12])
    sc = make_scorer(model, tok, text, ctx=ctx, stride=stride, batch_size=batch)
    got = sc.score()
    ids = torch.tensor(tok(text)["input_ids"])
    ref, count = reference_corpus(model, ids, ctx, stride)
    # Every token but the first is scored once; disjoint windows also lose each window's first token.
    assert got["tokens_scored"] == count == len(ids) - (1 if stride < ctx else got["num_windows"])
    assert got["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert got["num_windows"] == len(hf_docs_windows(len(ids), ctx, stride))


@pytest.mark.slow
def test_sentences_equal_plain_forward_passes(llama, gpt2):
    sentences = probe_text().splitlines()[:9]
    for model, tok in (llama, gpt2):
        got = make_scorer(model, tok, "\n".join(sentences), sentences=True, batch_size=4).score()
        ref = reference_sentences(model, tok, sentences)
        assert got["per_sentence"] == pytest.approx(ref, rel=1e-4)
        assert got["mean"] == pytest.approx(statistics.fmean(ref), rel=1e-4)
        assert got["median"] == pytest.approx(statistics.median(ref), rel=1e-4)
        assert got["perplexity"] == got["mean"]


def test_probe_ships_with_the_package():
    sentences = split_sentences(probe_text())
    assert len(sentences) >= 60
    assert len(set(sentences)) == len(sentences)


def test_perplexity_entry_point_reports(fixtures_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(probe_text().splitlines()[:5]))
    rep = perplexity(fixtures_dir / "gpt2-tiny" / "base", text=text, sentences=True, batch_size=2)
    assert rep["num_sentences"] == 5 and rep["tokens_per_second"] > 0 and rep["dtype"] == "float32"
    assert rep["tokens_scored"] == rep["tokens_forwarded"] - 5  # the first token of each sentence is context


def test_errors(fixtures_dir, tmp_path, llama):
    model, tok = llama
    with pytest.raises(UsageError, match="exceeds the model's 256 positions; pass `ctx=256`"):
        make_scorer(model, tok, "hello world", ctx=1000)
    with pytest.raises(UsageError, match="`batch_size` must be at least 1"):
        make_scorer(model, tok, "hello world", batch_size=0)
    with pytest.raises(UsageError, match="no sentence of two or more tokens"):
        make_scorer(model, tok, "a\n\n", sentences=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="is empty; pass a file with some text as `text`"):
        perplexity(fixtures_dir / "llama-tiny" / "base", text=empty)
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(fixtures_dir / "llama-tiny" / "base" / f, no_tok / f)
    with pytest.raises(InputError, match="no usable tokenizer .* pass `tokenizer`"):
        perplexity(no_tok)
    # ...and --tokenizer fixes it
    assert perplexity(no_tok, tokenizer=fixtures_dir / "llama-tiny" / "base", sentences=True,
                      max_sentences=2)["num_sentences"] == 2
    (no_tok / "config.json").unlink()
    with pytest.raises(InputError, match="has no config.json"):
        perplexity(no_tok)
