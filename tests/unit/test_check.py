"""surgery.check: each CI check against numbers computed here (NaN counts, max |diff|, sha256,
the shapes transformers builds)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
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


# ---- streaming and the torch-free integrity check

def _stream_pair(tmp_path, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(37, 29, generator=g), "v": torch.randn(11, generator=g), "s": torch.tensor(2.5),
         "e": torch.randn(3, 5, 7, generator=g), "z": torch.zeros(0, 4)}
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    for name, sd in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    return open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("block", [1, 50, 10**9])
def test_compare_blocks_equals_whole_tensor(tmp_path, block):
    from surgery.check import compare_blocks

    a, b = _stream_pair(tmp_path)
    for name in a.names:
        ta, tb = a.get(name, dtype=torch.float64), b.get(name, dtype=torch.float64)
        diff = (ta - tb).abs()
        for atol, rtol in ((0.0, 0.0), (0.01, 0.0), (0.005, 0.1)):
            m, bad = compare_blocks(a, b, name, atol, rtol, max_elements=block)
            assert m == (float(diff.max()) if diff.numel() else 0.0)
            assert bad == int((diff > atol + rtol * tb.abs()).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e5m2, torch.float8_e4m3fn])
def test_nonfinite_counts_by_bit_pattern(tmp_path, dtype, monkeypatch):
    from surgery import check

    g = torch.Generator().manual_seed(1)
    t = torch.randn(1000, generator=g)
    t[torch.randperm(1000, generator=g)[:17]] = float("nan")
    t[torch.randperm(1000, generator=g)[:9]] = float("inf")
    t[torch.randperm(1000, generator=g)[:4]] = -float("inf")
    t = t.to(dtype)  # e4m3fn turns Inf into NaN; the expected counts come from torch itself
    f = tmp_path / "x.safetensors"
    save_file({"t": t}, str(f))
    monkeypatch.setattr(check, "READ_BLOCK_BYTES", 64)  # many blocks
    info = open_checkpoint(f).info("t")
    up = t.to(torch.float32)
    assert check.nonfinite_counts(info) == (int(torch.isnan(up).sum()), int(torch.isinf(up).sum()))


def test_integrity_check_reads_integer_tensors_and_reports(tmp_path):
    from surgery.check import check_integrity

    f = tmp_path / "m.safetensors"
    save_file({"i": torch.arange(10), "w": torch.tensor([1.0, float("nan"), float("inf")])}, str(f))
    r = check_integrity(open_checkpoint(f))
    assert not r.passed and r.failures == [{"tensor": "w", "file": "m.safetensors", "nan": 1, "inf": 1}]
