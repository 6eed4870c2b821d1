"""`surgery fuse` from the command line: JSON, --check, exit codes and messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapter_helpers import GPT2, make_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def gpt2_lora(tmp_path_factory):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          init_lora_weights=False)
    return make_adapter(GPT2, cfg, tmp_path_factory.mktemp("ad") / "lora", seed=8)


def test_json_is_one_document_with_the_facts(cli, tmp_path, gpt2_lora):
    out = tmp_path / "out"
    r = cli("fuse", GPT2, f"{gpt2_lora}:0.5", "-o", out, "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["output"] == str(out) and rep["files"] == ["model.safetensors"]
    fz = rep
    assert fz["adapters"][0]["kind"] == "LORA" and fz["adapters"][0]["weight"] == 0.5
    assert len(fz["tensors_changed"]) == 6 and fz["untied_embeddings"] is None
    assert rep["record"]["operation"] == "fuse"
    assert [i["role"] for i in rep["record"]["inputs"]] == ["base", "adapter"]
    # weight 0.5 halves the LoRA update (closed form from the stored factors)
    got, base = load_file(out / "model.safetensors"), load_file(GPT2 / "model.safetensors")
    ad = load_file(gpt2_lora / "adapter_model.safetensors")
    k = "transformer.h.1.attn.c_proj"
    delta = (ad[f"base_model.model.{k}.lora_B.weight"] @ ad[f"base_model.model.{k}.lora_A.weight"]).T * 2.0
    torch.testing.assert_close(got[f"{k}.weight"], base[f"{k}.weight"] + 0.5 * delta, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_check_passes_and_reports(cli, tmp_path, gpt2_lora):
    r = cli("fuse", GPT2, gpt2_lora, "-o", tmp_path / "out", "--check", "--json")
    assert r.code == 0, r.stderr
    c = r.json()["check"]
    assert c["passed"] and c["relative_diff"] <= 1e-4 and c["max_abs_diff"] >= 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.fuse-check"))


@pytest.mark.slow
def test_check_failure_exits_1_and_writes_nothing(cli, tmp_path, gpt2_lora, monkeypatch):
    import surgery.fuse.check as chk

    monkeypatch.setitem(chk.TOLERANCE, torch.float32, -1.0)   # nothing can pass
    r = cli("fuse", GPT2, gpt2_lora, "-o", tmp_path / "out", "--check")
    assert r.code == 1
    assert "the fused checkpoint's logits differ from PEFT's base + adapter forward pass" in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_check_needs_one_peft_adapter(cli, tmp_path, gpt2_lora):
    r = cli("fuse", GPT2, f"{gpt2_lora}:0.5", "-o", tmp_path / "out", "--check")
    assert r.code == 2
    assert "--check compares with PEFT, which runs one PEFT adapter" in r.stderr
    r = cli("fuse", GPT2, gpt2_lora, gpt2_lora, "-o", tmp_path / "out", "--check")
    assert r.code == 2 and "give a single adapter" in r.stderr


def test_human_output_and_existing_output(cli, tmp_path, gpt2_lora):
    out = tmp_path / "out"
    r = cli("fuse", GPT2, gpt2_lora, "-o", out)
    assert r.code == 0
    assert "LORA" in r.stdout and "6 tensor(s) fused, 22 copied untouched" in r.stdout
    r = cli("fuse", GPT2, gpt2_lora, "-o", out)
    assert r.code == 2 and "exists" in r.stderr
    assert cli("fuse", GPT2, gpt2_lora, "-o", out, "--force").code == 0


def test_input_errors_exit_3(cli, tmp_path, gpt2_lora):
    bad = shutil.copytree(gpt2_lora, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "olora"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = cli("fuse", GPT2, bad, "-o", tmp_path / "out")
    assert r.code == 3
    assert r.stderr.startswith("error: adapter ") and "init_lora_weights='olora'" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("fuse", GPT2, tmp_path / "missing", "-o", tmp_path / "out")
    assert r.code == 3 and "does not exist" in r.stderr


@pytest.mark.slow
def test_usage_errors_exit_2(cli, tmp_path, gpt2_lora):
    r = cli("fuse", GPT2, f"{gpt2_lora}:inf", "-o", tmp_path / "out")
    assert r.code == 2 and "must be a finite number" in r.stderr
    r = cli("fuse", GPT2, gpt2_lora, "-o", tmp_path / "out", "--dtype", "int3")
    assert r.code == 2 and "is not one of" in r.stderr and "bfloat16" in r.stderr
    r = cli("fuse", GPT2, gpt2_lora, "-o", tmp_path / "out", "--threads", "0")
    assert r.code == 2 and "--threads must be at least 1, not 0" in r.stderr
    assert not (tmp_path / "out").exists()


def test_threads_option_restores_torch_setting(cli, tmp_path, gpt2_lora):
    before = torch.get_num_threads()
    r = cli("fuse", GPT2, gpt2_lora, "-o", tmp_path / "out", "--threads", "1", "--json")
    assert r.code == 0 and torch.get_num_threads() == before
    ref = cli("fuse", GPT2, gpt2_lora, "-o", tmp_path / "ref", "--json")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(tmp_path / "ref" / "model.safetensors").keys()
    for k, v in load_file(tmp_path / "ref" / "model.safetensors").items():
        torch.testing.assert_close(load_file(tmp_path / "out" / "model.safetensors")[k], v, rtol=1e-6, atol=1e-7)
