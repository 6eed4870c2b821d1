"""`surgery analyze spectrum | subspace | gain` from the command line: JSON, tables, plots, exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


@pytest.fixture
def fx(fixtures_dir):
    return lambda p: str(fixtures_dir / p)


def _nan_copy(fixtures_dir: Path, dest: Path, name: str) -> Path:
    dest.mkdir()
    state = load_file(str(fixtures_dir / "llama-tiny/base/model.safetensors"))
    state[name][0, 1] = float("nan")
    save_file(state, str(dest / "model.safetensors"))
    (dest / "config.json").write_text((fixtures_dir / "llama-tiny/base/config.json").read_text())
    return dest


# ---------------------------------------------------------------- spectrum

def test_spectrum_json_matches_svdvals(cli, fx):
    r = cli("analyze", "spectrum", fx("llama-tiny/ft-a"), "--base", fx("llama-tiny/base"), "--top", "3", "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["of"] == "task_vector" and rep["top"] == 3 and rep["plot"] is None
    row = next(x for x in rep["tensors"] if x["name"] == "model.layers.1.mlp.down_proj.weight")
    a = load_file(fx("llama-tiny/ft-a") + "/model.safetensors")[row["name"]].double()
    b = load_file(fx("llama-tiny/base") + "/model.safetensors")[row["name"]].double()
    s = torch.linalg.svdvals(a - b)
    assert row["top_singular_values"] == pytest.approx(s[:3].tolist(), rel=1e-5)
    assert set(rep["by_type"]) == {"embed", "q", "k", "v", "o", "gate", "up", "down"}


def test_spectrum_human_tables(cli, fx):
    r = cli("analyze", "spectrum", fx("gpt2-tiny/base"), "--rows", "2")
    assert r.code == 0, r.stderr
    assert "stable rank" in r.stdout and "mean per layer type" in r.stdout and "mean per depth" in r.stdout
    assert "qkv" in r.stdout and "pos_embed" in r.stdout and "more tensors" in r.stdout


@pytest.mark.slow
def test_spectrum_plot(cli, fx, tmp_path):
    out = tmp_path / "spec.png"
    r = cli("analyze", "spectrum", fx("llama-tiny/base"), "--plot", out, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["plot"] == str(out) and "spectra" not in r.json()
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20_000


def test_plot_without_matplotlib_is_a_usage_error(cli, fx, tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    r = cli("analyze", "gain", fx("llama-tiny/base"), "--plot", tmp_path / "g.png")
    assert r.code == 2
    assert "--plot needs matplotlib" in r.stderr and "pip install" in r.stderr
    assert not (tmp_path / "g.png").exists()


def test_plot_path_errors(cli, fx, tmp_path):
    r = cli("analyze", "spectrum", fx("llama-tiny/base"), "--plot", tmp_path / "fig.txt")
    assert r.code == 2 and "use a .png, .pdf or .svg" in r.stderr
    (tmp_path / "file").write_text("")
    r = cli("analyze", "spectrum", fx("llama-tiny/base"), "--plot", tmp_path / "file" / "fig.png")
    assert r.code == 2 and "is not a folder" in r.stderr


@pytest.mark.slow
def test_plot_folder_is_created_like_every_output(cli, fx, tmp_path):
    pytest.importorskip("matplotlib")
    fig = tmp_path / "new" / "deeper" / "fig.png"
    r = cli("analyze", "spectrum", fx("llama-tiny/base"), "--plot", fig, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["plot"] == str(fig) and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in fig.parent.iterdir()] == ["fig.png"]  # no temporary left beside it


def test_spectrum_nonfinite(cli, fixtures_dir, tmp_path):
    bad = _nan_copy(fixtures_dir, tmp_path / "bad", "model.layers.0.self_attn.v_proj.weight")
    r = cli("analyze", "spectrum", bad, "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["non_finite"] == ["model.layers.0.self_attn.v_proj.weight"]
    row = next(x for x in rep["tensors"] if x["name"] == "model.layers.0.self_attn.v_proj.weight")
    assert row["finite"] is False and row["sigma_max"] is None and row["nonfinite"]["nan"] == 1
    human = cli("analyze", "spectrum", bad)
    assert "non-finite" in human.stdout and "hold NaN/Inf" in human.stdout


def test_spectrum_usage_and_input_errors(cli, fx):
    r = cli("analyze", "spectrum", fx("llama-tiny/base"), "--energy", "1.5")
    assert r.code == 2 and "--energy must be in (0, 1]" in r.stderr
    r = cli("analyze", "spectrum", fx("llama-wide/base"), "--base", fx("llama-tiny/base"))
    assert r.code == 3 and "share no 2-D tensor of the same shape" in r.stderr
    r = cli("analyze", "spectrum", "/nonexistent/ckpt")
    assert r.code == 3


# ---------------------------------------------------------------- subspace

def test_subspace_json(cli, fx):
    r = cli("analyze", "subspace", "--base", fx("llama-tiny/base"), fx("llama-tiny/ft-a"), fx("llama-tiny/ft-b"),
            "--rank", "2", "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["rank"] == 2 and rep["energy"] is None and rep["frozen_rule"] == "fixed_fraction"
    t = rep["tensors"][0]
    assert t["k_a"] == t["k_b"] == 2 and len(t["left"]["angles_deg"]) == 2
    assert 0 <= t["overlap_left"] <= 1 and 0 <= t["leakage_a"]["total"] <= 1
    assert rep["suggested_frozen_ranks"]["model.layers.0.self_attn.q_proj.weight"] == round(0.45 * 64)
    same = cli("analyze", "subspace", "--base", fx("llama-tiny/base"), fx("llama-tiny/ft-c"), fx("llama-tiny/ft-c"),
               "--json").json()
    assert all(abs(x["overlap_left"] - 1) < 1e-5 and abs(x["overlap_right"] - 1) < 1e-5 for x in same["tensors"])


def test_subspace_human_and_importance_rule(cli, fx, tmp_path):
    text = tmp_path / "probe.txt"
    text.write_text(Path(__file__).resolve().parents[2].joinpath("surgery/data/probe.txt").read_text()[:2000])
    r = cli("analyze", "subspace", "--base", fx("llama-tiny/base"), fx("llama-tiny/ft-a"), fx("llama-tiny/ft-b"),
            "--text", text, "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["frozen_rule"] == "importance" and set(rep["importance"]) == {"0", "1"}
    # two blocks, min-max normalised: one gets importance 1 (trr), the other 0 (mrr)
    assert sorted(rep["importance"].values()) == [0.0, 1.0]
    fr = {x["name"]: x["frozen_fraction"] for x in rep["tensors"]}
    assert sorted({fr["model.layers.0.mlp.up_proj.weight"], fr["model.layers.1.mlp.up_proj.weight"]}) == \
        pytest.approx([0.1, 0.8])
    human = cli("analyze", "subspace", "--base", fx("llama-tiny/base"), fx("llama-tiny/ft-a"), fx("llama-tiny/ft-b"))
    assert human.code == 0 and "cos² left" in human.stdout and "fixed-fraction rule" in human.stdout


def test_subspace_errors(cli, fx, tmp_path):
    base, a, b = fx("llama-tiny/base"), fx("llama-tiny/ft-a"), fx("llama-tiny/ft-b")
    r = cli("analyze", "subspace", "--base", base, a, b, "--rank", "2", "--energy", "0.5")
    assert r.code == 2 and "either --rank or --energy" in r.stderr
    r = cli("analyze", "subspace", "--base", base, a, b, "--text", tmp_path / "missing.txt")
    assert r.code == 2 and "no such file" in r.stderr
    r = cli("analyze", "subspace", "--base", base, a, fx("llama-wide/base"))
    assert r.code == 3 and "share no 2-D tensor" in r.stderr
    r = cli("analyze", "subspace", a, b)
    assert r.code == 2  # --base is required


# ---------------------------------------------------------------- gain

def test_gain_json_and_exact(cli, fx):
    fast = cli("analyze", "gain", fx("llama-tiny/base"), "--json")
    exact = cli("analyze", "gain", fx("llama-tiny/base"), "--json", "--exact")
    assert fast.code == 0 and exact.code == 0
    f, e = fast.json(), exact.json()
    assert f["method"] == "lanczos" and e["method"] == "svd" and "pairs" not in f
    w = load_file(fx("llama-tiny/base") + "/model.safetensors")
    for rf, re_ in zip(f["tensors"], e["tensors"]):
        t = w[rf["name"]].double()
        s = float(torch.linalg.svdvals(t)[0])
        assert rf["sigma_max"] == pytest.approx(s, rel=1e-4) and re_["sigma_max"] == pytest.approx(s, rel=1e-5)
        rms = float(t.norm()) / (t.shape[0] * t.shape[1]) ** 0.5
        assert rf["rms"] == pytest.approx(rms, rel=1e-6) and rf["gain"] == pytest.approx(s / rms, rel=1e-4)


@pytest.mark.slow
def test_gain_vs_proxy_drift_exit_codes(cli, fx):
    wide, tiny = fx("llama-wide/base"), fx("llama-tiny/base")
    r = cli("analyze", "gain", wide, "--vs", tiny, "--json")
    assert r.code == 0, r.stderr  # reporting only
    rep = r.json()
    assert rep["widths"] == {"target": 128, "proxy": 64} and len(rep["pairs"]) == 15 and rep["within_tolerance"] is False and rep["passed"] is True
    failing = cli("analyze", "gain", wide, "--vs", tiny, "--fail-on-drift", "--json")
    assert failing.code == 1
    assert json.loads(failing.stdout)["passed"] is False  # still exactly one JSON document on stdout
    assert "drift beyond tolerance 0.1" in failing.stderr and "model.layers.0" in failing.stderr
    ok = cli("analyze", "gain", wide, "--vs", tiny, "--expect-exponent", "0.5", "--tolerance", "0.2",
             "--ignore", "embed", "--fail-on-drift")
    assert ok.code == 0, ok.stdout + ok.stderr
    assert "no drift" in ok.stdout and "ignored" in ok.stdout


@pytest.mark.slow
def test_gain_plot_with_proxy(cli, fx, tmp_path):
    out = tmp_path / "gain.png"
    r = cli("analyze", "gain", fx("llama-wide/base"), "--vs", fx("llama-tiny/base"), "--plot", out)
    assert r.code == 0, r.stderr
    assert out.read_bytes()[:8] == PNG and f"figure: {out}" in r.stdout


def test_gain_nonfinite_fails_drift_check(cli, fixtures_dir, fx, tmp_path):
    bad = _nan_copy(fixtures_dir, tmp_path / "bad", "model.layers.1.mlp.up_proj.weight")
    r = cli("analyze", "gain", bad, "--vs", fx("llama-tiny/base"), "--fail-on-drift", "--json")
    assert r.code == 1
    rep = json.loads(r.stdout)
    assert rep["drifted"] == ["model.layers.1.mlp.up_proj.weight"]  # identical otherwise: ratio 1
    pair = next(p for p in rep["pairs"] if p["name"] == "model.layers.1.mlp.up_proj.weight")
    assert pair["ratio"] is None and pair["reason"] == "non-finite target"


def test_gain_errors(cli, fx):
    r = cli("analyze", "gain", fx("llama-tiny/base"), "--fail-on-drift")
    assert r.code == 2 and "--fail-on-drift needs --vs" in r.stderr
    r = cli("analyze", "gain", fx("llama-tiny/base"), "--vs", fx("llama-tiny/base"), "--ignore", "embed,mlp")
    assert r.code == 2 and "unknown sublayer type" in r.stderr and "mlp" in r.stderr
    r = cli("analyze", "gain", fx("llama-tiny/base"), "--tolerance", "0")
    assert r.code == 2 and "--tolerance must be a positive number" in r.stderr
    r = cli("analyze", "gain", fx("llama-tiny/base"), "--vs", fx("bert-tiny/base"))
    assert r.code == 3 and "pairs with one of" in r.stderr


def test_help_lists_the_three_commands(cli):
    r = cli("analyze", "--help")
    assert r.code == 0
    assert all(c in r.stdout for c in ("spectrum", "subspace", "gain"))


def test_subspace_text_needs_a_loadable_base(cli, fixtures_dir, fx, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((fixtures_dir / "llama-tiny/base/model.safetensors").read_bytes())
    text = tmp_path / "t.txt"
    text.write_text("Some text to run the model on.")
    r = cli("analyze", "subspace", "--base", bare, fx("llama-tiny/ft-a"), fx("llama-tiny/ft-b"), "--text", text)
    assert r.code == 3
    assert "cannot load" in r.stderr and "to compute activations for --text" in r.stderr and "drop --text" in r.stderr
