"""surgery.grow.grow end to end on tiny checkpoints: outputs checked with the independent forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surgery.core.errors import CheckFailedError, InputError, UnsafeFormatError, UsageError
from surgery.grow import grow
from make_tokenformer import build_tiny_tokenformer
from tokenformer_reference import load, reference_logits

IDS = torch.randint(0, 96, (3, 13), generator=torch.Generator().manual_seed(11))


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("norm,init,kw", [
    ("l2_norm_gelu", "tile", dict(factor=2)),
    ("gelu_l2_norm", "tile", dict(qkv_tokens=48)),
    ("softmax", "tile", dict(tokens=64)),
    ("l2_norm_gelu", "gram", dict(qkv_tokens=40, proj_tokens=17 + 16, ffn_tokens=100)),
    ("l2_norm_gelu", "zero", dict(tokens=70)),
    ("gelu_l2_norm", "zero", dict(ffn_tokens=65)),
])
def test_exact_inits_keep_the_logits(tokenformers, tmp_path, norm, init, kw):
    src = tokenformers[norm]
    res = grow(src, tmp_path / "out", init=init, **kw)
    sd0, cfg0 = load(src)
    sd1, cfg1 = load(tmp_path / "out")
    assert res.report["growth"]["exact"] is True and res.report["growth"]["verify"]["passed"] is True
    assert res.report["growth"]["verify"]["max_rel_dev"] < 1e-5
    # independent check on the written files, other ids than the verifier's
    assert _max_rel(reference_logits(sd1, cfg1, IDS), reference_logits(sd0, cfg0, IDS)) < 1e-5
    # config slot counts and shapes updated; old tokens kept bit for bit
    for kind in ("qkv", "proj", "ffn"):
        assert cfg1[f"{kind}_slot_num"] == res.report["growth"]["slots"][kind]["after"]
    for name, t in sd0.items():
        if name.endswith("param_tokens"):
            kind = "ffn" if ".mlp." in name else ("proj" if ".proj." in name else "qkv")
            assert sd1[name].shape == (cfg1[f"{kind}_slot_num"], t.shape[1])
            assert torch.equal(sd1[name][: t.shape[0]], t)
            if name.endswith("value_param_tokens"):
                assert not sd1[name][t.shape[0]:].any()
        else:
            assert torch.equal(sd1[name], t)


def test_zero_records_frozen_scale_which_the_released_forward_ignores(tokenformers, tmp_path):
    src = tokenformers["l2_norm_gelu"]
    res = grow(src, tmp_path / "z", init="zero", qkv_tokens=24)
    sd0, cfg0 = load(src)
    sd1, cfg1 = load(tmp_path / "z")
    assert cfg1["qkv_norm_slot_num"] == 16 and "ffn_norm_slot_num" not in cfg1
    assert res.report["growth"]["frozen_scale"] == {"qkv_norm_slot_num": 16}
    assert any("does not read it" in n for n in res.report["growth"]["notes"])
    ref = reference_logits(sd0, cfg0, IDS)
    assert _max_rel(reference_logits(sd1, cfg1, IDS), ref) < 1e-5
    assert _max_rel(reference_logits(sd1, cfg1, IDS, honour_frozen=False), ref) > 1e-3


@pytest.mark.parametrize("norm,init", [("l2_norm_gelu", "random"), ("softmax", "zero"), ("softmax", "random")])
def test_approximate_inits_report_their_deviation(tokenformers, tmp_path, norm, init):
    src = tokenformers[norm]
    res = grow(src, tmp_path / "a", init=init, tokens=80, seed=7)
    v = res.report["growth"]["verify"]
    assert res.report["growth"]["exact"] is False and v["passed"] is None
    sd0, cfg0 = load(src)
    sd1, cfg1 = load(tmp_path / "a")
    # the reported deviation is the one an independent forward sees on the verifier's ids
    ids = torch.randint(0, 96, (v["batch"], v["seq_len"]), generator=torch.Generator().manual_seed(7))
    dev = (reference_logits(sd1, cfg1, ids) - reference_logits(sd0, cfg0, ids)).abs().max().item()
    assert dev > 1e-2 and v["max_abs_dev"] == pytest.approx(dev, rel=1e-6)


def test_grow_twice_keeps_the_function(tokenformers, tmp_path):
    src = tokenformers["l2_norm_gelu"]
    grow(src, tmp_path / "g1", init="zero", qkv_tokens=24, ffn_tokens=80)
    grow(tmp_path / "g1", tmp_path / "g2", init="tile", qkv_tokens=48, ffn_tokens=160)
    res = grow(tmp_path / "g2", tmp_path / "g3", init="gram", qkv_tokens=80, proj_tokens=48)
    sd0, cfg0 = load(src)
    sd3, cfg3 = load(tmp_path / "g3")
    assert (cfg3["qkv_slot_num"], cfg3["proj_slot_num"], cfg3["ffn_slot_num"]) == (80, 48, 160)
    # zero froze qkv at 16 and ffn at 64; tile doubled both; gram added 32 qkv tokens
    assert (cfg3["qkv_norm_slot_num"], cfg3["ffn_norm_slot_num"]) == (64, 128)
    assert res.report["growth"]["slots"]["qkv"]["scale_tokens_before"] == 32
    assert _max_rel(reference_logits(sd3, cfg3, IDS), reference_logits(sd0, cfg0, IDS)) < 1e-5


def test_bfloat16_output_gram_within_default_tolerance(tokenformers, tmp_path):
    res = grow(tokenformers["l2_norm_gelu"], tmp_path / "bf", init="gram", ffn_tokens=96, dtype="bfloat16")
    v = res.report["growth"]["verify"]
    assert v["passed"] and 0 < v["max_rel_dev"] < v["tolerance"] == 2e-2
    with safe_open(str(tmp_path / "bf" / "model.safetensors"), "pt") as f:
        assert f.get_slice("sequential.2.mlp.key_param_tokens").get_dtype() == "BF16"


def test_exact_mode_over_tolerance_fails_and_writes_nothing(tokenformers, tmp_path):
    with pytest.raises(CheckFailedError, match="should keep the function .* above the tolerance 1e-14; nothing was written") as e:
        grow(tokenformers["l2_norm_gelu"], tmp_path / "f", init="gram", ffn_tokens=100, tolerance=1e-14)
    assert e.value.exit_code == 1 and e.value.report["growth"]["verify"]["passed"] is False
    assert not (tmp_path / "f").exists()


def test_model_card_and_metadata_record_growth(tokenformers, tmp_path):
    grow(tokenformers["softmax"], tmp_path / "c", init="tile", factor=3, seed=2)
    card = (tmp_path / "c" / "README.md").read_text()
    assert "grow" in card and "tile" in card
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        rec = json.loads(f.metadata()["surgery"])
    assert rec["operation"] == "grow" and rec["parameters"]["qkv_slot_num"] == {"from": 16, "to": 48}
    assert rec["results"]["growth"]["verify"]["passed"] is True


def test_no_verify(tokenformers, tmp_path):
    res = grow(tokenformers["softmax"], tmp_path / "nv", init="random", tokens=64, verify=False)
    assert res.report["growth"]["verify"] is None
    assert load_file(str(tmp_path / "nv" / "model.safetensors"))["sequential.3.mlp.key_param_tokens"].shape == (64, 32)


# ---- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    (dict(init="tile", tokens=20), "ffn_slot_num is 64 and growth only adds tokens, so 20 is too few"),
    (dict(init="tile", qkv_tokens=8), "qkv_slot_num is 16 and growth only adds tokens, so 8 is too few"),
    (dict(init="tile", qkv_tokens=40), "must become a multiple of 16, not 40; use `init='gram'`"),
    (dict(init="tile", factor=1.5), "must become a multiple of 16, not 24"),
    (dict(init="gram", qkv_tokens=24), r"needs at least rank\(K\) = 16 new tokens for sequential.2.attention.query.key_param_tokens"),
    (dict(init="tile"), "say how many parameter tokens"),
    (dict(init="tile", tokens=64, factor=2.0), "give only one of `tokens`, `factor`"),
    (dict(init="tile", factor=0.5), "would shrink"),
    (dict(init="tile", qkv_tokens=16), "nothing to grow"),
    (dict(init="bogus", tokens=64), "unknown `init` 'bogus'; choose one of tile, gram, zero, random"),
    (dict(tokens=64, device="gpu0"), "`device` 'gpu0' is not a device name"),
])
def test_usage_refusals(tokenformers, tmp_path, kw, message):
    with pytest.raises(UsageError, match=message) as e:
        grow(tokenformers["l2_norm_gelu"], tmp_path / "x", **kw)
    assert e.value.exit_code == 2 and not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_usage_error(tokenformers, tmp_path):
    with pytest.raises(UsageError, match="`device` cuda asked for a CUDA GPU but torch sees none"):
        grow(tokenformers["l2_norm_gelu"], tmp_path / "x", tokens=64, device="cuda")


@pytest.mark.parametrize("norm", ["gelu_l2_norm", "softmax"])
def test_gram_refused_for_other_norms(tokenformers, tmp_path, norm):
    with pytest.raises(UsageError, match=f"keeps the function only for norm_activation_type l2_norm_gelu.*uses {norm}"):
        grow(tokenformers[norm], tmp_path / "x", init="gram", tokens=128)


def test_input_refusals(fixtures_dir, tokenformers, tmp_path):
    with pytest.raises(InputError, match="is not a TokenFormer checkpoint") as e:
        grow(fixtures_dir / "llama-tiny" / "base", tmp_path / "x", tokens=64)
    assert e.value.exit_code == 3
    bare = build_tiny_tokenformer(tmp_path / "bare")
    (bare / "config.json").unlink()
    with pytest.raises(InputError, match="has no config.json; pass the model's GPT-NeoX config as `config_file`"):
        grow(bare, tmp_path / "x", tokens=64)
    wrong = build_tiny_tokenformer(tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["ffn_slot_num"] = 32
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="sequential.2.mlp.key_param_tokens holds 64 tokens but .* ffn_slot_num = 32"):
        grow(wrong, tmp_path / "x", tokens=64)
    binary = build_tiny_tokenformer(tmp_path / "bin", fmt="bin")
    with pytest.raises(UnsafeFormatError, match="surgery convert"):
        grow(binary, tmp_path / "x", tokens=64)


def test_official_yaml_config_for_a_bare_checkpoint(tmp_path):
    bare = build_tiny_tokenformer(tmp_path / "bare", norm_activation_type="gelu_l2_norm")
    cfg = json.loads((bare / "config.json").read_text())
    (bare / "config.json").unlink()
    yml = tmp_path / "tiny_eval.yml"
    # the official files are YAML with comments, hyphenated keys and Python-style booleans
    lines = ["{", '  "num-layers": 2,'] + [
        f'  "{k}": {json.dumps(v) if not isinstance(v, bool) else str(v)},'
        for k, v in cfg.items() if k != "num_layers"] + ['  "norm_activation_type": "gelu_l2_norm", # "l2_norm_gelu", "softmax"', "}"]
    yml.write_text("\n".join(lines) + "\n")
    res = grow(bare, tmp_path / "out", tokens=128, config_file=yml)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["qkv_slot_num"] == 128 and out_cfg["num_layers"] == 2 and out_cfg["no_weight_tying"] is False
    assert res.report["growth"]["verify"]["passed"] is True


def test_config_file_errors(tokenformers, tmp_path):
    src = tokenformers["l2_norm_gelu"]
    with pytest.raises(InputError, match="config file .*missing.yml does not exist") as e:
        grow(src, tmp_path / "x", tokens=64, config_file=tmp_path / "missing.yml")
    assert e.value.exit_code == 3
    bad = tmp_path / "bad.yml"
    bad.write_text("{ this is: [not yaml\n")
    with pytest.raises(InputError, match="bad.yml is not valid YAML"):
        grow(src, tmp_path / "x", tokens=64, config_file=bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="does not hold a mapping"):
        grow(src, tmp_path / "x", tokens=64, config_file=tmp_path / "list.json")
    (tmp_path / "typo.json").write_text('{"no_weight_tying": "maybe"}')
    with pytest.raises(InputError, match="has a value of the wrong type"):
        grow(src, tmp_path / "x", tokens=64, config_file=tmp_path / "typo.json")
