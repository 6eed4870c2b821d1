"""`surgery eval ppl` from the command line: one JSON document, same numbers as the library, exit codes."""

from __future__ import annotations

import json

import pytest

from surgery.eval.perplexity import perplexity, probe_text


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "probe8.txt"
    p.write_text("\n".join(probe_text().splitlines()[:8]) + "\n")
    return p


@pytest.mark.slow
def test_ppl_json_matches_library(cli, fixtures_dir, text):
    base = fixtures_dir / "llama-tiny" / "base"
    r = cli("eval", "ppl", base, "--text", text, "--ctx", 32, "--stride", 16, "--batch-size", 2, "--json")
    assert r.code == 0, r.stderr
    rep = json.loads(r.stdout)  # exactly one document
    lib = perplexity(base, text=text, ctx=32, stride=16)
    assert rep["mode"] == "corpus" and rep["ctx"] == 32 and rep["stride"] == 16
    assert rep["perplexity"] == pytest.approx(lib["perplexity"], rel=1e-6)
    assert rep["tokens_scored"] == lib["tokens_scored"] and rep["tokens_per_second"] > 0


def test_ppl_sentences_default_probe_human(cli, fixtures_dir):
    r = cli("eval", "ppl", fixtures_dir / "gpt2-tiny" / "base", "--sentences", "--max-sentences", 5)
    assert r.code == 0, r.stderr
    assert "sentences: 5" in r.stdout and "perplexity: mean" in r.stdout and "median" in r.stdout


@pytest.mark.slow
def test_ppl_errors(cli, fixtures_dir, tmp_path):
    base = fixtures_dir / "gpt2-tiny" / "base"
    r = cli("eval", "ppl", base, "--ctx", 4096)
    assert r.code == 2 and "exceeds the model's 128 positions; pass --ctx 128 or less" in r.stderr
    r = cli("eval", "ppl", base, "--sentences", "--stride", 4)
    assert r.code == 2 and "--stride applies to corpus perplexity only" in r.stderr
    r = cli("eval", "ppl", base, "--max-sentences", 4)
    assert r.code == 2 and "--max-sentences applies to --sentences mode only" in r.stderr
    r = cli("eval", "ppl", tmp_path / "missing-model")
    assert r.code == 3 and r.stdout == ""
    r = cli("eval", "ppl", base, "--text", tmp_path / "nope.txt")
    assert r.code == 3 and "cannot read the text file" in r.stderr
    r = cli("eval", "ppl", fixtures_dir / "bert-tiny" / "base", "--json")
    assert r.code == 3 and r.json()["error"]["type"] == "InputError" and "no causal-LM head" in r.json()["error"]["message"]
