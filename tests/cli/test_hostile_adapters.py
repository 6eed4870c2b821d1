"""Hostile adapter configs and factors: `fuse` and `edit from-peft` share one parser, so
each case is refused the same way by both: exit 3, one line naming the file and field,
no output."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hostile_helpers import LLAMA, lora_adapter, one_line_error, raw_config

CASES = {
    "r: 0": ({"r": 0}, "r = 0; it must be at least 1"),
    "r: four": ({"r": "four"}, "r = 'four'; it must be an integer"),
    "r: 2.0": ({"r": 2.0}, "r = 2.0; it must be an integer"),
    "lora_alpha: x": ({"lora_alpha": "x"}, "lora_alpha = 'x'; it must be a number"),
    "lora_alpha: NaN": ({"lora_alpha": float("nan")}, "lora_alpha = nan; it must be a finite number"),
    "rank_pattern bad regex": ({"rank_pattern": {"q_proj(": 2}}, "rank_pattern key 'q_proj\\(': it is not a valid regular expression"),
    "rank_pattern nested quantifier": ({"rank_pattern": {"(a+)+": 2}}, "nests quantifiers"),
    "rank_pattern value": ({"rank_pattern": {"q_proj": "two"}}, "must be an integer"),
    "alpha_pattern inf": ({"alpha_pattern": {"q_proj": float("inf")}}, "must be a finite number"),
    "use_dora without magnitudes": ({"use_dora": True}, "use_dora|DoRA"),
    "missing peft_type": ({"peft_type": None}, "declares no peft_type"),
    "use_rslora string": ({"use_rslora": "yes"}, "use_rslora = 'yes'; it must be true or false"),
    "pissa": ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
    "rank disagrees with config": ({"r": 4}, "has rank 2 but the config says r=4"),
}


def _adapter(tmp_path, config):
    cfg = {k: v for k, v in config.items() if v is not None}
    ad = lora_adapter(tmp_path / "ad", config=cfg)
    if config.get("peft_type", "x") is None:
        doc = json.loads((ad / "adapter_config.json").read_text())
        doc.pop("peft_type")
        raw_config(ad, json.dumps(doc))
    return ad


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuse_and_from_peft_refuse_alike(cli, tmp_path, case):
    config, match = CASES[case]
    ad = _adapter(tmp_path, config)
    for args in (("fuse", LLAMA / "base", ad, "-o", tmp_path / "out"),
                 ("edit", "from-peft", ad, "-o", tmp_path / "e.safetensors", "--base", LLAMA / "base")):
        line = one_line_error(cli(*args), 3)
        assert re.search(match, line), line
        assert "adapter" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


@pytest.mark.parametrize("text, match", [
    ("[]", "holds a list, not a JSON object"),
    ('"LORA"', "holds a string"),
    ("{" * 10 + "}" * 10, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    (b'{"peft_type": "LORA", "r": 2, "x": "\xff"}', "not UTF-8"),
    ('{"peft_type": "LORA", "r": 2, "target_modules": ["\\ud800"]}', "lone surrogate"),
])
def test_malformed_config_file(cli, tmp_path, text, match):
    ad = lora_adapter(tmp_path / "ad")
    raw_config(ad, text)
    for args in (("fuse", LLAMA / "base", ad, "-o", tmp_path / "out"),
                 ("edit", "from-peft", ad, "-o", tmp_path / "e.safetensors")):
        line = one_line_error(cli(*args), 3)
        assert match in line and "adapter_config.json" in line, line


def test_factors_of_different_ranks(cli, tmp_path):
    ad = lora_adapter(tmp_path / "ad", a=torch.ones(2, 64), b=torch.ones(64, 3))
    for args in (("fuse", LLAMA / "base", ad, "-o", tmp_path / "out"),
                 ("edit", "from-peft", ad, "-o", tmp_path / "e.safetensors")):
        line = one_line_error(cli(*args), 3)
        assert "has rank 2 but" in line and "has rank 3" in line


def test_default_lora_alpha_is_peft_s(tmp_path):
    """Without lora_alpha both readers use PEFT's default 8 (scale 8 / r), not r."""
    from surgery.edit.lora import from_peft

    a, b = torch.randn(2, 64), torch.randn(64, 2)
    ad = lora_adapter(tmp_path / "ad", a=a, b=b)
    doc = json.loads((ad / "adapter_config.json").read_text())
    doc.pop("lora_alpha")
    raw_config(ad, json.dumps(doc))
    res = from_peft(ad, tmp_path / "e.safetensors")
    assert res.report["tensors"][0]["scale"] == 8 / 2
    from peft import LoraConfig

    assert LoraConfig().lora_alpha == 8   # the reference default this follows
