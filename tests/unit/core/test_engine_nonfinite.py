"""The engine's non-finite check: a computed tensor that is NaN/Inf fails the write (no
output) and names the input tensor that carried it; ``allow_nonfinite`` writes it anyway."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.core.engine import OutputTensor, cast_tensor, write_checkpoint
from surgery.core.errors import NonFiniteError


@pytest.fixture
def ckpts(tmp_path):
    clean = {"w": torch.ones(4, 3), "v": torch.full((3,), 70000.0)}
    bad = {"w": torch.ones(4, 3), "v": torch.ones(3)}
    bad["w"][1, 2] = float("nan")
    save_file(clean, str(tmp_path / "clean.safetensors"))
    save_file(bad, str(tmp_path / "bad.safetensors"))
    return open_checkpoint(tmp_path / "clean.safetensors"), open_checkpoint(tmp_path / "bad.safetensors")


def _sum_plan(a, b):
    return [OutputTensor(n, a.info(n).shape, torch.float32, compute=lambda n=n: a.get(n) + b.get(n)) for n in a.names]


def test_names_the_input_tensor_and_writes_nothing(tmp_path, ckpts):
    a, b = ckpts
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"'w' is not finite because the input tensor 'w' of .*bad") as e:
        write_checkpoint(_sum_plan(a, b), out, donor=None, operation="t", parameters={}, inputs=[a, b])
    assert e.value.tensor == "w" and e.value.path.endswith("bad.safetensors")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.safetensors", "clean.safetensors"]


def test_allow_nonfinite_writes_it(tmp_path, ckpts):
    a, b = ckpts
    write_checkpoint(_sum_plan(a, b), tmp_path / "out", donor=None, operation="t", parameters={}, inputs=[a, b],
                     allow_nonfinite=True)
    w = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert torch.isnan(w[1, 2]) and int(torch.isnan(w).sum()) == 1


def test_finite_inputs_that_overflow(tmp_path, ckpts):
    a, _ = ckpts
    plan = [OutputTensor("w", (4, 3), torch.float32, compute=lambda: a.get("w") / 0.0)]
    with pytest.raises(NonFiniteError, match="although its stored inputs are finite"):
        write_checkpoint(plan, tmp_path / "o", donor=None, operation="t", parameters={}, inputs=[a])
    # a cast that overflows float16 (70000 > 65504), both the computed and the row-block cast paths
    with pytest.raises(NonFiniteError, match="overflows float16"):
        write_checkpoint([cast_tensor(a, "v", torch.float16)], tmp_path / "o", donor=None, operation="t",
                         parameters={}, inputs=[a])
    with pytest.raises(NonFiniteError, match="overflows float16"):
        write_checkpoint([OutputTensor("v", (3,), torch.float16, compute=lambda: a.get("v"))], tmp_path / "o",
                         donor=None, operation="t", parameters={}, inputs=[a])
    assert not (tmp_path / "o").exists()


def test_zero_element_tensor_with_a_huge_dimension_is_not_looped_over(tmp_path):
    import json
    import struct
    import time

    h = json.dumps({"e": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
                    "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    ck = open_checkpoint(tmp_path / "m.safetensors")
    t0 = time.perf_counter()
    plan = [cast_tensor(ck, "e", torch.float16), cast_tensor(ck, "w", torch.float16),
            OutputTensor("r", (2**40, 0), torch.float32, rows=lambda s, t: torch.empty(t - s, 0))]
    write_checkpoint(plan, tmp_path / "o", donor=None, operation="t", parameters={}, inputs=[ck])
    assert time.perf_counter() - t0 < 5
    assert open_checkpoint(tmp_path / "o").info("e").shape == (2**40, 0)


def test_a_cast_carries_a_stored_nan_like_a_copy(tmp_path, ckpts):
    """Copies and plain casts carry the input's own values (check reports them); only what
    the operation computes, and casts that overflow, are refused."""
    _, b = ckpts
    write_checkpoint([cast_tensor(b, "w", torch.float16)], tmp_path / "o", donor=None, operation="t",
                     parameters={}, inputs=[b])
    w = load_file(str(tmp_path / "o" / "model.safetensors"))["w"]
    assert w.dtype == torch.float16 and int(torch.isnan(w).sum()) == 1
