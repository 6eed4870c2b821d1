"""inspect / diff / check / convert from the command line: values, exit codes, messages."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file


def test_inspect_json(cli, fixtures_dir):
    r = cli("inspect", fixtures_dir / "gpt2-tiny" / "base", "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    ref = load_file(str(fixtures_dir / "gpt2-tiny" / "base" / "model.safetensors"))
    assert rep["num_tensors"] == len(ref)
    assert rep["num_parameters"] == sum(t.numel() for t in ref.values())
    assert rep["total_bytes"] == sum(t.numel() * t.element_size() for t in ref.values())
    row = {t["name"]: t for t in rep["tensors"]}["transformer.h.0.attn.c_attn.weight"]
    assert row["shape"] == [64, 192] and row["dtype"] == "float32"


def test_inspect_counts_tied_head_once(cli, fixtures_dir, tmp_path):
    d = tmp_path / "tied"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", d)
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(d / "model.safetensors"))
    rep = cli("inspect", d, "--json").json()
    assert rep["num_parameters"] == sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")
    assert rep["tied_duplicates"] == ["lm_head.weight"]


def test_inspect_human(cli, fixtures_dir):
    r = cli("inspect", fixtures_dir / "llama-tiny" / "base")
    assert r.code == 0 and "parameters: 106,816" in r.stdout and "model.layers.0.mlp.up_proj.weight" in r.stdout


def test_diff_matches_independent(cli, fixtures_dir):
    a, b = fixtures_dir / "gpt2-tiny" / "base", fixtures_dir / "gpt2-tiny" / "ft-a"
    rep = cli("diff", a, b, "--json").json()
    ta = load_file(str(a / "model.safetensors"))
    tb = load_file(str(b / "model.safetensors"))
    rows = {r["name"]: r for r in rep["tensors"]}
    for name in ["transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"]:
        x, y = ta[name].double().flatten(), tb[name].double().flatten()
        assert rows[name]["rel_change"] == pytest.approx(((y - x).norm() / x.norm()).item(), rel=1e-9)
        assert rows[name]["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(x, y, dim=0).item(), rel=1e-9)
        assert rows[name]["max_abs_diff"] == pytest.approx((y - x).abs().max().item(), rel=1e-12)
    assert rep["summary"]["changed"] == len(ta) and rep["only_in_a"] == [] and rep["mismatched"] == []


def test_diff_reports_one_sided_and_mismatched(cli, fixtures_dir):
    rep = cli("diff", fixtures_dir / "llama-tiny" / "base", fixtures_dir / "llama-wide" / "base", "--json").json()
    assert {m["name"] for m in rep["mismatched"]} >= {"model.layers.0.mlp.up_proj.weight"}
    assert rep["summary"]["identical"] is False


def _with_nan(src, dst, name):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = float("nan")
    sd[name].view(-1)[4] = float("inf")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_check_pass_and_nan_fail(cli, fixtures_dir, tmp_path):
    ok = cli("check", fixtures_dir / "llama-tiny" / "base", "--config", "--json")
    assert ok.code == 0 and ok.json()["passed"] is True
    bad = _with_nan(fixtures_dir / "llama-tiny" / "base", tmp_path / "nan", "model.layers.1.mlp.down_proj.weight")
    r = cli("check", bad, "--json")
    assert r.code == 1
    integ = r.json()["checks"][0]
    assert integ["passed"] is False
    assert integ["failures"] == [{"tensor": "model.layers.1.mlp.down_proj.weight", "file": "model.safetensors", "nan": 1, "inf": 1}]


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_check_config_detects_wrong_shape(cli, fixtures_dir, tmp_path, family):
    d = tmp_path / family
    shutil.copytree(fixtures_dir / family / "base", d)
    cfg = json.loads((d / "config.json").read_text())
    key = "n_layer" if "n_layer" in cfg else "num_hidden_layers"
    assert cli("check", d, "--config").code == 0
    cfg[key] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    r = cli("check", d, "--config", "--no-integrity", "--json")
    assert r.code == 1
    fails = r.json()["checks"][0]["failures"]
    assert fails and all(f["problem"] == "missing" and ".2." in f["tensor"] for f in fails)


def test_check_against_tolerance(cli, fixtures_dir):
    base, ft = fixtures_dir / "bert-tiny" / "base", fixtures_dir / "bert-tiny" / "ft-a"
    ta, tb = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)
    r = cli("check", ft, "--against", base, "--atol", str(worst * 1.001), "--no-integrity", "--json")
    assert r.code == 0 and r.json()["checks"][0]["numbers"]["max_abs_diff"] == pytest.approx(worst)
    r = cli("check", ft, "--against", base, "--atol", str(worst * 0.5), "--no-integrity", "--json")
    assert r.code == 1 and r.json()["checks"][0]["failures"][0]["problem"] == "tolerance"


def test_check_sha256_manifest(cli, fixtures_dir, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", d)
    man = tmp_path / "SHA256SUMS"
    assert cli("check", d, "--write-sha256", man, "--no-integrity").code == 0
    import hashlib

    assert man.read_text() == f"{hashlib.sha256((d / 'model.safetensors').read_bytes()).hexdigest()}  model.safetensors\n"
    assert cli("check", d, "--sha256", man, "--no-integrity").code == 0
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "model.safetensors").write_bytes(bytes(data))
    r = cli("check", d, "--sha256", man, "--no-integrity", "--json")
    assert r.code == 1 and r.json()["checks"][0]["failures"][0]["problem"] == "sha256"


def test_usage_errors_exit_2(cli, fixtures_dir, tmp_path):
    r = cli("check", fixtures_dir / "llama-tiny" / "base", "--atol", "0.1")
    assert r.code == 2 and "only apply with --against" in r.stderr
    r = cli("convert", fixtures_dir / "llama-tiny" / "base", tmp_path / "o", "--dtype", "float8")
    assert r.code == 2 and "'float8' is not one of" in r.stderr and "bfloat16" in r.stderr
    r = cli("convert", fixtures_dir / "llama-tiny" / "base", tmp_path / "o", "--shard-size", "lots")
    assert r.code == 2 and "is not a size" in r.stderr
    r = cli("inspect", "--no-such-flag", fixtures_dir)
    assert r.code == 2


def test_existing_output_exit_2(cli, fixtures_dir, tmp_path):
    (tmp_path / "o").mkdir()
    r = cli("convert", fixtures_dir / "llama-tiny" / "base", tmp_path / "o")
    assert r.code == 2 and "already exists; pass --force" in r.stderr


def test_corrupt_input_exit_3_one_line(cli, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    for cmd in (["inspect", d], ["check", d], ["convert", d, tmp_path / "o"], ["diff", d, d]):
        r = cli(*cmd)
        assert r.code == 3, cmd
        assert r.stderr.startswith("error: tensor 'w' in ") and "truncated" in r.stderr
        assert "Traceback" not in r.stderr
    r = cli("inspect", d, "--debug")
    assert r.code == 3 and "Traceback" in r.stderr
    assert not (tmp_path / "o").exists()


def test_pickle_refused_exit_3(cli, tmp_path):
    f = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, f)
    r = cli("inspect", f)
    assert r.code == 3 and "surgery convert" in r.stderr


def test_convert_bin_weights_only(cli, fixtures_dir, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    sd = load_file(str(fixtures_dir / "gpt2-tiny" / "base" / "model.safetensors"))
    torch.save(sd, d / "pytorch_model.bin")
    shutil.copy(fixtures_dir / "gpt2-tiny" / "base" / "config.json", d)
    r = cli("convert", d, tmp_path / "st", "--dtype", "bfloat16", "--json")
    assert r.code == 0, r.stderr
    got = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k].to(torch.bfloat16)) for k in sd)
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_convert_refuses_code_in_pickle(cli, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, f)
    r = cli("convert", f, tmp_path / "o")
    assert r.code == 3 and "could not be loaded weights-only" in r.stderr and "pwned" not in r.stdout
    assert not (tmp_path / "o").exists()


def test_convert_reshard_roundtrip(cli, fixtures_dir, tmp_path):
    r = cli("convert", fixtures_dir / "llama-tiny" / "base", tmp_path / "s", "--shard-size", "50KB", "--json")
    assert r.code == 0
    assert len(r.json()["files"]) > 2
    r2 = cli("check", tmp_path / "s", "--against", fixtures_dir / "llama-tiny" / "base", "--config")
    assert r2.code == 0, r2.stdout


def test_help_does_not_import_torch():
    code = ("import sys; import surgery.commands.app; "
            "bad = [m for m in ('torch', 'transformers', 'huggingface_hub', 'rich') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_console_script_help_runs():
    r = subprocess.run([sys.executable, "-m", "surgery.commands.app", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout


@pytest.mark.realmodel
def test_smollm2_parameter_count(cli, smollm2_dir):
    rep = cli("inspect", smollm2_dir, "--json").json()
    assert rep["num_parameters"] == 134_515_008
    assert cli("check", smollm2_dir, "--config", "--no-integrity").code == 0


@pytest.mark.realmodel
def test_minilm_inspect_and_config(cli, minilm_dir):
    rep = cli("inspect", minilm_dir, "--json").json()
    ref = load_file(str(minilm_dir / "model.safetensors"))
    assert rep["num_parameters"] == sum(t.numel() for t in ref.values())
    assert cli("check", minilm_dir, "--config", "--no-integrity").code == 0
