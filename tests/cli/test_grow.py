"""`surgery grow` from the command line: JSON facts, exit codes, messages, .bin -> convert -> grow."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from make_tokenformer import build_tiny_tokenformer

from tokenformer_reference import load, reference_logits


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


@pytest.fixture(scope="session")
def tf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf-cli")
    return {norm: build_tiny_tokenformer(root / norm, norm_activation_type=norm, seed=1)
            for norm in ("l2_norm_gelu", "softmax")}


def test_tile_json(cli, tf_dirs, tmp_path):
    r = cli("grow", tf_dirs["softmax"], "-o", tmp_path / "o", "--factor", "2", "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    g = rep["growth"]
    assert rep["passed"] is True and g["init"] == "tile" and g["exact"] is True
    assert {k: (v["before"], v["after"]) for k, v in g["slots"].items()} == {"qkv": (16, 32), "proj": (16, 32), "ffn": (64, 128)}
    assert g["verify"]["passed"] is True and g["verify"]["max_rel_dev"] < 1e-5
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["qkv_slot_num"], cfg["proj_slot_num"], cfg["ffn_slot_num"]) == (32, 32, 128)
    sd = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert sd["sequential.3.attention.proj.value_param_tokens"].shape == (32, 32)
    assert rep["num_tensors"] == len(sd)


def test_human_output(cli, tf_dirs, tmp_path):
    r = cli("grow", tf_dirs["l2_norm_gelu"], "-o", tmp_path / "o", "--ffn-tokens", "100", "--init", "gram")
    assert r.code == 0, r.stderr
    assert "verify: exact" in r.stdout and "ffn_slot_num" in r.stdout and "wrote" in r.stdout


def test_random_reports_deviation_matching_independent_forward(cli, tf_dirs, tmp_path):
    r = cli("grow", tf_dirs["l2_norm_gelu"], "-o", tmp_path / "o", "--tokens", "128", "--init", "random",
            "--seed", "4", "--json")
    assert r.code == 0, r.stderr
    v = r.json()["growth"]["verify"]
    assert r.json()["growth"]["exact"] is False and v["passed"] is None
    ids = torch.randint(0, 96, (v["batch"], v["seq_len"]), generator=torch.Generator().manual_seed(4))
    sd0, c0 = load(tf_dirs["l2_norm_gelu"])
    sd1, c1 = load(tmp_path / "o")
    dev = (reference_logits(sd1, c1, ids) - reference_logits(sd0, c0, ids)).abs().max().item()
    assert dev > 1e-2 and v["max_abs_dev"] == pytest.approx(dev, rel=1e-6)
    assert "approximate" in cli("grow", tf_dirs["l2_norm_gelu"], "-o", tmp_path / "h", "--tokens", "128",
                                "--init", "random").stdout


def test_no_verify(cli, tf_dirs, tmp_path):
    r = cli("grow", tf_dirs["softmax"], "-o", tmp_path / "o", "--qkv-tokens", "32", "--no-verify", "--json")
    assert r.code == 0 and r.json()["growth"]["verify"] is None


def test_check_failure_exit_1_json(cli, tf_dirs, tmp_path):
    r = cli("grow", tf_dirs["l2_norm_gelu"], "-o", tmp_path / "o", "--ffn-tokens", "100", "--init", "gram",
            "--tolerance", "1e-15", "--json")
    assert r.code == 1
    doc = r.json()
    assert doc["passed"] is False and doc["error"]["code"] == 1
    assert doc["report"]["growth"]["verify"]["max_rel_dev"] > 1e-15
    assert "nothing was written" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,code,message", [
    (["--tokens", "8"], 2, "qkv_slot_num is 16 and growth only adds tokens, so 8 is too few"),
    (["--qkv-tokens", "40"], 2, "must become a multiple of 16, not 40"),
    (["--tokens", "128", "--init", "gram", "--softmax"], 2, "--init gram keeps the function only for norm_activation_type l2_norm_gelu"),
    (["--tokens", "64", "--factor", "2"], 2, "give only one of"),
    ([], 2, "say how many parameter tokens"),
])
def test_refusals(cli, tf_dirs, tmp_path, args, code, message):
    src = tf_dirs["softmax"] if "--softmax" in args else tf_dirs["l2_norm_gelu"]
    args = [a for a in args if a != "--softmax"]
    r = cli("grow", src, "-o", tmp_path / "o", *args)
    assert r.code == code and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_not_a_tokenformer_exit_3(cli, fixtures_dir, tmp_path):
    r = cli("grow", fixtures_dir / "llama-tiny" / "base", "-o", tmp_path / "o", "--tokens", "64")
    assert r.code == 3 and "is not a TokenFormer checkpoint" in r.stderr


def test_output_exists_refused(cli, tf_dirs, tmp_path):
    (tmp_path / "o").mkdir()
    r = cli("grow", tf_dirs["softmax"], "-o", tmp_path / "o", "--factor", "2")
    assert r.code == 2
    assert cli("grow", tf_dirs["softmax"], "-o", tmp_path / "o", "--factor", "2", "--force").code == 0


def test_bin_is_refused_then_converts_and_grows(cli, tmp_path):
    src = build_tiny_tokenformer(tmp_path / "official", fmt="bin", seed=2, norm_activation_type="l2_norm_gelu")
    r = cli("grow", src, "-o", tmp_path / "x", "--factor", "2")
    assert r.code == 3 and "surgery convert" in r.stderr
    r = cli("convert", src / "pytorch_model.bin", tmp_path / "st", "--json")
    assert r.code == 0, r.stderr
    r = cli("grow", tmp_path / "st", "-o", tmp_path / "grown", "--qkv-tokens", "32", "--ffn-tokens", "96",
            "--init", "gram", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["growth"]["verify"]["passed"] is True
    original = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd1, c1 = load(tmp_path / "grown")
    sd0 = {k: v.double() for k, v in original.items()}
    c0 = json.loads((src / "config.json").read_text())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = reference_logits(sd0, c0, ids)
    assert ((reference_logits(sd1, c1, ids) - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_committed_fixture_matches_its_builder(fixtures_dir, tmp_path):
    rebuilt = build_tiny_tokenformer(tmp_path / "t", norm_activation_type="l2_norm_gelu", seed=0)
    a = load_file(str(fixtures_dir / "tokenformer-tiny" / "model.safetensors"))
    b = load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
