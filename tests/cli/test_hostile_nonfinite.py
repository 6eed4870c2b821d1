"""Silent NaN/Inf: a fused tensor that is not finite fails with exit 3 naming the input
tensor that carried it, unless --allow-nonfinite."""

from __future__ import annotations

import pytest
import torch
from hostile_helpers import LLAMA, Q_PROJ, copy_model, lora_adapter, one_line_error
from safetensors.torch import load_file


def test_fuse_nan_in_adapter_is_refused_naming_it(cli, tmp_path):
    b = 0.1 * torch.ones(64, 2)
    b[3, 1] = float("nan")
    ad = lora_adapter(tmp_path / "ad", b=b)
    out = tmp_path / "out"
    line = one_line_error(cli("fuse", LLAMA / "base", ad, "-o", out), 3)
    assert f"base_model.model.{Q_PROJ}.lora_B.weight" in line and "--allow-nonfinite" in line
    assert not out.exists()
    res = cli("fuse", LLAMA / "base", ad, "-o", out, "--allow-nonfinite", "--json")
    assert res.code == 0, res.stderr
    q = load_file(str(out / "model.safetensors"))[Q_PROJ + ".weight"].float()
    assert bool(torch.isnan(q[3]).all()) and bool(torch.isfinite(q[:3]).all())


def test_fuse_inf_in_base_names_the_base_tensor(cli, tmp_path):
    def poison(t):
        t[Q_PROJ + ".weight"][0, 0] = float("inf")

    base = copy_model(LLAMA / "base", tmp_path / "base", poison)
    ad = lora_adapter(tmp_path / "ad")
    line = one_line_error(cli("fuse", base, ad, "-o", tmp_path / "out"), 3)
    assert f"input tensor '{Q_PROJ}.weight'" in line and str(base) in line


@pytest.mark.slow
def test_edit_apply_nan_delta_is_a_collapse(cli, tmp_path):
    from surgery.edit.format import Edit, TensorEdit, save_edit

    n = Q_PROJ + ".weight"
    u = torch.ones(64, 1)
    u[0, 0] = float("nan")
    save_edit(Edit({n: TensorEdit(n, u=u, v=torch.ones(64, 1))}), tmp_path / "nan.safetensors")
    res = cli("edit", "apply", LLAMA / "base", tmp_path / "nan.safetensors", "-o", tmp_path / "out", "--json")
    assert res.code == 1, res.stderr
    doc = res.json()
    assert doc["passed"] is False and "internal error" not in res.stderr
    assert any(c["collapsed"] for c in doc["checks"])
