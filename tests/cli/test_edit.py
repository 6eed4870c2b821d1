"""`surgery edit ...` from the command line: JSON reports, exit codes 0 / 1 (collapse, stop) / 2 / 3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import open_checkpoint
from surgery.edit.format import Edit, TensorEdit, save_edit

EMB = "model.embed_tokens.weight"


def _rank1(ckpt, name, scale, path, seed, sha_of=None):
    rows, cols = ckpt.info(name).shape
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(rows, 1, generator=g), torch.randn(cols, 1, generator=g)
    te = TensorEdit(name, u=u / u.norm(), v=v / v.norm(), s=torch.tensor([scale]))
    save_edit(Edit({name: te}, base_sha256={name: (sha_of or ckpt).tensor_sha256(name)}), path)
    return path


@pytest.fixture
def setup(fixtures_dir, tmp_path):
    from surgery.eval.perplexity import probe_text

    text = tmp_path / "probe.txt"
    text.write_text("\n".join(probe_text().splitlines()[:5]))
    base = fixtures_dir / "llama-tiny" / "base"
    ck = open_checkpoint(base)
    return base, ck, text


@pytest.mark.slow
def test_extract_apply_json(cli, setup, fixtures_dir, tmp_path):
    base, ck, text = setup
    r = cli("edit", "extract", base, fixtures_dir / "llama-tiny" / "ft-c", "-o", tmp_path / "e.safetensors",
            "--rank", 2, "--subject", "test subject", "--json")
    assert r.code == 0, r.stderr
    rep = json.loads(r.stdout)
    a = load_file(str(base / "model.safetensors"))
    c = load_file(str(fixtures_dir / "llama-tiny" / "ft-c" / "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], c[k])}
    assert {t["name"] for t in rep["tensors"]} == changed and rep["unchanged"] == len(a) - len(changed)
    assert all(t["rank"] == 2 for t in rep["tensors"] if t["kind"] == "low_rank")
    r = cli("edit", "apply", base, tmp_path / "e.safetensors", "-o", tmp_path / "out", "--text", text,
            "--on-collapse", "ignore", "--json")
    assert r.code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["output"] == str(tmp_path / "out") and len(rep["edits"]) == 1
    assert rep["baseline_perplexity"] > 0 and rep["edits"][0]["tensors"][0]["base_check"] == "base"
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(sd) == set(ck.names)
    r = cli("edit", "extract", base, fixtures_dir / "llama-tiny" / "ft-c", "-o", tmp_path / "e.safetensors")
    assert r.code == 2 and "exists; pass --force" in r.stderr


@pytest.mark.slow
def test_apply_stop_exits_1_with_report(cli, setup, tmp_path):
    base, ck, text = setup
    small = _rank1(ck, EMB, 1e-3, tmp_path / "small.safetensors", 1)
    big = _rank1(ck, EMB, 100.0, tmp_path / "big.safetensors", 2)
    r = cli("edit", "apply", base, small, big, "-o", tmp_path / "out", "--text", text, "--json",
            "--plot", tmp_path / "p.png")
    assert r.code == 1
    rep = json.loads(r.stdout)
    assert rep["stopped"] and [e["verdict"] for e in rep["edits"]] == ["ok", "collapsed (rolled back)"]
    assert "collapse detected after edit 1; wrote the last good state (1 edit(s))" in r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "p.png").is_file()
    assert rep["plot"] == str(tmp_path / "p.png")
    r = cli("edit", "apply", base, small, "-o", tmp_path / "out3", "--text", text, "--plot", tmp_path / "p.txt")
    assert r.code == 2 and "--plot" in r.stderr and "use a .png, .pdf or .svg" in r.stderr
    assert not (tmp_path / "out3").exists()
    r = cli("edit", "apply", base, small, big, "-o", tmp_path / "out2", "--text", text, "--on-collapse", "skip")
    assert r.code == 0, r.stderr
    assert "collapsed (skipped)" in r.stdout and "1 of 2 edits kept" in r.stdout


@pytest.mark.slow
def test_apply_refuses_mismatched_base(cli, setup, fixtures_dir, tmp_path):
    base, ck, text = setup
    other = open_checkpoint(fixtures_dir / "llama-tiny" / "ft-b")
    e = _rank1(ck, EMB, 1e-3, tmp_path / "e.safetensors", 1, sha_of=other)
    r = cli("edit", "apply", base, e, "-o", tmp_path / "out", "--text", text)
    assert r.code == 3 and "was made against a different 'model.embed_tokens.weight'" in r.stderr
    assert "--force-base" in r.stderr and not (tmp_path / "out").exists()
    r = cli("edit", "apply", base, e, "-o", tmp_path / "out", "--text", text, "--force-base", "--json")
    assert r.code == 0 and json.loads(r.stdout)["edits"][0]["tensors"][0]["base_check"] == "mismatch (forced)"
    r = cli("edit", "apply", base, e, "-o", tmp_path / "out", "--text", text, "--on-collapse", "maybe")
    assert r.code == 2 and "--on-collapse" in r.stderr and all(c in r.stderr for c in ("stop", "skip", "ignore"))


def test_peft_round_trip_cli(cli, setup, tmp_path):
    pytest.importorskip("peft")
    base, ck, text = setup
    n = "model.layers.1.self_attn.o_proj.weight"
    e = _rank1(ck, n, 0.5, tmp_path / "e.safetensors", 3)
    r = cli("edit", "to-peft", e, "-o", tmp_path / "ad", "--base", base, "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["tensors"][0]["layer"] == "linear"
    r = cli("edit", "from-peft", tmp_path / "ad", "-o", tmp_path / "back.safetensors", "--base", base, "--json")
    assert r.code == 0, r.stderr
    from surgery.edit.format import load_edit

    a, b = load_edit(e).tensors[n], load_edit(tmp_path / "back.safetensors").tensors[n]
    assert torch.allclose(a.delta(torch.float64), b.delta(torch.float64), atol=1e-7)
    r = cli("edit", "from-peft", tmp_path, "-o", tmp_path / "x.safetensors")
    assert r.code == 3 and "has no adapter_config.json" in r.stderr
