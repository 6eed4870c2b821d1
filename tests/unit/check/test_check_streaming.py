"""check and diff read tensors in blocks: the numbers equal whole-tensor computations, the
integrity check finds exactly the NaN/Inf torch finds, for every floating dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import open_checkpoint


def _pair(tmp_path, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(37, 29, generator=g), "v": torch.randn(11, generator=g), "s": torch.tensor(2.5),
         "e": torch.randn(3, 5, 7, generator=g), "z": torch.zeros(0, 4)}
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    for name, sd in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    return open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("block", [1, 29, 100, 10**9])
def test_stream_diff_equals_whole_tensor(tmp_path, block):
    from surgery.diff import stream_diff

    a, b = _pair(tmp_path)
    for name in a.names:
        ta, tb = a.get(name, dtype=torch.float64), b.get(name, dtype=torch.float64)
        got = stream_diff(a, b, name, max_elements=block)
        d = (tb - ta).reshape(-1)
        assert got["norm_diff"] == pytest.approx(float(d.norm()), rel=1e-12, abs=1e-300)
        assert got["norm_a"] == pytest.approx(float(ta.norm()), rel=1e-12, abs=1e-300)
        assert got["max_abs_diff"] == (float(d.abs().max()) if d.numel() else 0.0)
        if ta.numel():
            cos = float(ta.reshape(-1) @ tb.reshape(-1) / (ta.norm() * tb.norm()))
            assert got["cosine"] == pytest.approx(cos, rel=1e-12)


@pytest.mark.parametrize("block", [1, 50, 10**9])
def test_compare_blocks_equals_whole_tensor(tmp_path, block):
    from surgery.check import compare_blocks

    a, b = _pair(tmp_path)
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
