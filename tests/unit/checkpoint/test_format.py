"""Header validation: hand-crafted malformed files give the exact error, naming file and tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import open_checkpoint, parse_header
from surgery.checkpoint.format import build_header
from surgery.core.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeFormatError


def _write(path, header_obj, data: bytes = b"", raw_header: bytes | None = None, declared: int | None = None):
    raw = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    n = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_parse_matches_safetensors_library(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.tensor(3, dtype=torch.int64)}
    f = tmp_path / "x.safetensors"
    save_file(tensors, str(f), metadata={"k": "v"})
    h = parse_header(f)
    assert h.metadata == {"k": "v"}
    assert h.tensors["a"].shape == (2, 3) and h.tensors["a"].dtype == torch.float32
    assert h.tensors["b"].st_dtype == "BF16" and h.tensors["b"].nbytes == 8
    assert h.tensors["c"].shape == () and h.tensors["c"].nbytes == 8
    ck = open_checkpoint(f)
    for k, v in tensors.items():
        assert torch.equal(ck.get_raw(k), v)


def test_too_short(tmp_path):
    f = tmp_path / "s.safetensors"
    f.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match="fewer than the 8-byte header length") as e:
        parse_header(f)
    assert e.value.path == str(f)


def test_header_longer_than_file(tmp_path):
    f = _write(tmp_path / "t.safetensors", {}, declared=1000)
    with pytest.raises(CorruptCheckpointError, match="declares a 1000-byte header but the file has only"):
        parse_header(f)


def test_header_over_cap(tmp_path):
    f = _write(tmp_path / "t.safetensors", {}, declared=200_000_000)
    with pytest.raises(CorruptCheckpointError, match="above the 100000000-byte limit"):
        parse_header(f)


def test_bad_json(tmp_path):
    f = _write(tmp_path / "t.safetensors", None, raw_header=b"{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        parse_header(f)


def test_unknown_dtype_names_tensor(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"w": {"dtype": "F13", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w' .* unknown dtype 'F13'") as e:
        parse_header(f)
    assert e.value.tensor == "w"


def test_shape_size_mismatch(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match=r"spans 8 bytes but shape \[2, 2\] of F32 needs 16"):
        parse_header(f)


def test_offsets_past_end(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="past its end at 8: the file is truncated"):
        parse_header(f)


def test_reversed_offsets(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="end before they begin"):
        parse_header(f)


def test_overlap(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    f = _write(tmp_path / "t.safetensors", hdr, b"\0" * 12)
    with pytest.raises(CorruptCheckpointError, match="'a' and 'b' overlapping"):
        parse_header(f)


def test_negative_shape(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})
    with pytest.raises(CorruptCheckpointError, match="invalid shape"):
        parse_header(f)


def test_metadata_must_be_strings(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"__metadata__": {"a": 1}})
    with pytest.raises(CorruptCheckpointError, match="__metadata__"):
        parse_header(f)


def test_build_header_is_aligned_and_padded():
    h = build_header([("x", "F32", (2,), 0, 8)], {"m": "v"}, min_size=100)
    (n,) = struct.unpack("<Q", h[:8])
    assert (8 + n) % 8 == 0 and n >= 100
    assert json.loads(h[8:]) == {"__metadata__": {"m": "v"}, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def test_pickle_refused_with_pointer_to_convert(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, f)
    with pytest.raises(UnsafeFormatError, match=r"surgery convert .*pytorch_model.bin OUT"):
        open_checkpoint(f)
    with pytest.raises(UnsafeFormatError, match="never unpickles"):
        open_checkpoint(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no safetensors checkpoint"):
        open_checkpoint(tmp_path / "empty")


def _sharded(tmp_path, weight_map_override=None):
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "model-00002-of-00002.safetensors"))
    wm = weight_map_override or {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


def test_sharded_index_reads(tmp_path):
    ck = open_checkpoint(_sharded(tmp_path))
    assert ck.names == ["a", "b"] and torch.equal(ck.get("b"), torch.zeros(3))


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_confined_to_folder(tmp_path, bad):
    d = _sharded(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": bad})
    with pytest.raises(CorruptCheckpointError, match=r"maps tensor 'b' to .* outside the checkpoint folder"):
        open_checkpoint(d)


def test_index_wrong_shard(tmp_path):
    d = _sharded(tmp_path, {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="that shard does not hold it"):
        open_checkpoint(d)
