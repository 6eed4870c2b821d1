"""surgery.check: each CI check against numbers computed here (NaN counts, max |diff|, sha256,
the shapes transformers builds)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.check import check, check_against, check_config, check_integrity, expected_shapes, read_manifest
from surgery.core.errors import InputError, UsageError


@pytest.fixture
def copy(fixtures_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", folder)
    return folder


def test_integrity_counts_nan_and_inf(copy):
    sd = load_file(str(copy / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    w = sd[name].clone()
    w.view(-1)[:3] = float("nan")
    w.view(-1)[10:12] = float("inf")
    sd[name] = w
    save_file(sd, str(copy / "model.safetensors"))
    res = check_integrity(open_checkpoint(copy))
    assert not res.passed and res.failures == [{"tensor": name, "file": "model.safetensors", "nan": 3, "inf": 2}]


def test_against_max_abs_diff(fixtures_dir):
    a, b = fixtures_dir / "llama-tiny" / "ft-a", fixtures_dir / "llama-tiny" / "base"
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    res = check_against(open_checkpoint(a), open_checkpoint(b), atol=worst)
    assert res.passed and res.numbers["max_abs_diff"] == worst
    res = check_against(open_checkpoint(a), open_checkpoint(b), atol=worst * 0.999)
    assert not res.passed and {f["problem"] for f in res.failures} == {"tolerance"}


def test_config_shapes_are_what_transformers_builds(fixtures_dir, copy):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((copy / "config.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(copy))
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert check_config(open_checkpoint(copy)).passed
    (copy / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    res = check_config(open_checkpoint(copy))
    assert not res.passed and {f["problem"] for f in res.failures} == {"shape"}
    assert {f["tensor"].rsplit(".", 2)[-2] for f in res.failures} == {"gate_proj", "up_proj", "down_proj"}


def test_manifest_round_trip(copy, tmp_path):
    sha = hashlib.sha256((copy / "model.safetensors").read_bytes()).hexdigest()
    res = check(copy, write_manifest_to=tmp_path / "SHA256SUMS")
    assert (tmp_path / "SHA256SUMS").read_text() == f"{sha}  model.safetensors\n" and res.passed
    assert read_manifest(tmp_path / "SHA256SUMS") == {"model.safetensors": sha}
    assert check(copy, manifest=tmp_path / "SHA256SUMS").passed
    (tmp_path / "bad.json").write_text(json.dumps({"model.safetensors": "0" * 64, "../x": "1" * 64}))
    rep = check(copy, manifest=tmp_path / "bad.json").report
    problems = {f["file"]: f["problem"] for c in rep["checks"] for f in c["failures"] if c["name"] == "sha256"}
    assert problems == {"model.safetensors": "sha256", "../x": "path outside the checkpoint"}
    (tmp_path / "broken").write_text("not a manifest line\n")
    with pytest.raises(InputError, match="line 1"):
        read_manifest(tmp_path / "broken")


def test_usage_errors(copy):
    with pytest.raises(UsageError, match="`atol` must be a finite non-negative number"):
        check(copy, against=copy, atol=-1.0)
    with pytest.raises(UsageError, match="only apply with `against`"):
        check(copy, atol=0.1)
    with pytest.raises(UsageError):
        check(copy, write_manifest_to=copy / "model.safetensors", force=True)  # never over an input
