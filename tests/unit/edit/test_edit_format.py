"""The edit file format: round trip, ΔW = u diag(s) vᵀ, norms without materialising, malformed files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from surgery.edit.format import FORMAT, Edit, TensorEdit, load_edit, parse_edit, save_edit
from surgery.core.errors import CorruptCheckpointError, InputError, OutputExistsError


def _factors(rows=12, cols=7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, r, generator=g), torch.randn(cols, r, generator=g), torch.randn(r, generator=g))


def test_round_trip_and_metadata(tmp_path):
    u, v, s = _factors()
    d = torch.randn(5)
    e = Edit({"a.weight": TensorEdit("a.weight", u=u, v=v, s=s), "b.bias": TensorEdit("b.bias", dense=d)},
             base_sha256={"a.weight": "ab" * 32}, info={"description": "move the Eiffel Tower", "subject": "Eiffel Tower"})
    p = save_edit(e, tmp_path / "e.safetensors").output
    back = load_edit(p)
    assert set(back.tensors) == {"a.weight", "b.bias"}
    assert torch.equal(back.tensors["a.weight"].u, u) and torch.equal(back.tensors["b.bias"].dense, d)
    assert back.base_sha256 == {"a.weight": "ab" * 32}
    assert back.info["subject"] == "Eiffel Tower" and back.description == "move the Eiffel Tower"
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
        keys = sorted(f.keys())
    assert meta["format"] == FORMAT and meta["format_version"] == "1"
    assert json.loads(meta["base_sha256"]) == {"a.weight": "ab" * 32}
    assert keys == ["a.weight.delta_s", "a.weight.delta_u", "a.weight.delta_v", "b.bias.delta"]
    with pytest.raises(OutputExistsError, match="exists; pass `force=True`"):
        save_edit(e, p)


def test_delta_and_norms_match_dense_float64():
    u, v, s = _factors(40, 25, 4)
    te = TensorEdit("w", u=u, v=v, s=s)
    dense = u.double() @ torch.diag(s.double()) @ v.double().T
    assert torch.allclose(te.delta(torch.float64), dense, rtol=1e-6, atol=1e-6)
    assert te.frobenius() == pytest.approx(torch.linalg.matrix_norm(dense).item(), rel=1e-6)
    assert te.sigma_max() == pytest.approx(torch.linalg.matrix_norm(dense, ord=2).item(), rel=1e-6)
    no_s = TensorEdit("w", u=u, v=v)
    assert torch.allclose(no_s.delta(torch.float64), u.double() @ v.double().T, atol=1e-6)
    assert te.shape == (40, 25) and te.rank == 4


def _write(tmp_path, tensors, meta=None):
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p), metadata=meta)
    return p


@pytest.mark.parametrize("tensors,meta,message", [
    ({"w.delta_u": torch.ones(3, 1)}, None, "'w' needs both w.delta_u and w.delta_v"),
    ({"w.other": torch.ones(3)}, None, "does not end in .delta_u, .delta_v, .delta_s or .delta"),
    ({"w.delta": torch.ones(3, 2), "w.delta_u": torch.ones(3, 1), "w.delta_v": torch.ones(2, 1)}, None,
     "has both a dense .delta and low-rank factors"),
    ({"w.delta_u": torch.ones(3, 2), "w.delta_v": torch.ones(2, 1)}, None, "factors must be u \\[rows, r\\] and v \\[cols, r\\]"),
    ({"w.delta_u": torch.ones(3, 1), "w.delta_v": torch.ones(2, 1), "w.delta_s": torch.ones(2)}, None,
     "w.delta_s must have shape \\[1\\]"),
    ({"w.delta": torch.ones(3, dtype=torch.int32)}, None, "deltas must be floating point"),
    ({"w.delta": torch.ones(3)}, {"format_version": "9"}, "format_version 9 is newer than this surgery reads"),
    ({"w.delta": torch.ones(3)}, {"base_sha256": json.dumps({"x": "00"})}, "base_sha256 names 'x'"),
    ({"w.delta": torch.ones(3)}, {"base_sha256": "[1]"}, "base_sha256 metadata is not a JSON object"),
    ({"w.delta": torch.ones(3)}, {"format": "gguf"}, "expected 'surgery-edit'"),
])
def test_malformed_files_are_refused(tmp_path, tensors, meta, message):
    p = _write(tmp_path, tensors, meta)
    with pytest.raises(CorruptCheckpointError, match=message) as exc:
        load_edit(p)
    assert exc.value.exit_code == 3 and str(p) in str(exc.value)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(InputError, match="does not exist; make one with `surgery edit extract`"):
        load_edit(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x01\x02not safetensors")
    with pytest.raises(CorruptCheckpointError, match="not safetensors"):
        load_edit(junk)
    with pytest.raises(CorruptCheckpointError, match="holds no tensors"):
        parse_edit({}, {}, "x")


def test_non_finite_delta_has_infinite_norms():
    """A NaN/Inf delta gets infinite pre-check norms (so apply checks it and calls it a
    collapse) instead of a decomposition that cannot converge."""
    n = "w"
    u = torch.ones(4, 1)
    u[1, 0] = float("nan")
    for te in (TensorEdit(n, u=u, v=torch.ones(3, 1)), TensorEdit(n, dense=torch.full((4, 3), float("inf")))):
        assert not te.finite() and te.frobenius() == float("inf") and te.sigma_max() == float("inf")
    ok = TensorEdit(n, u=torch.ones(4, 1), v=torch.ones(3, 1))
    assert ok.finite() and abs(ok.sigma_max() - (4 * 3) ** 0.5) < 1e-6
