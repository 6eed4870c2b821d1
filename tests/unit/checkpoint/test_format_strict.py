"""Safetensors validation at least as strict as the reference implementation: each
hand-made malformed file is cross-checked against ``safetensors.safe_open`` (what a user
would otherwise load it with), so our verdict matches the library's."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from surgery.checkpoint import open_checkpoint, parse_header
from surgery.checkpoint.format import MAX_DIM
from surgery.core.errors import CorruptCheckpointError


def _file(header=None, data: bytes = b"", raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _f32(shape, offs):
    return {"dtype": "F32", "shape": shape, "data_offsets": offs}


_A = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
# name -> (file bytes, our verdict: "ok" or a regex the error must match)
CASES = {
    "valid": (_file({"a": _f32([2], [0, 8])}, b"\0" * 8), "ok"),
    "gap": (_file({"a": _f32([1], [0, 4]), "b": _f32([1], [8, 12])}, b"\0" * 12), "gap .*'a' and 'b'"),
    "leading gap": (_file({"a": _f32([1], [4, 8])}, b"\0" * 8), "bytes 0-4 .* unused before tensor 'a'"),
    "trailing bytes": (_file({"a": _f32([1], [0, 4])}, b"\0" * 8), "4 trailing bytes"),
    "duplicate key": (_file(raw=_A + b',"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', data=b"\0" * 8),
                      "names 'a' twice"),
    "metadata list": (_file({"__metadata__": [], "a": _f32([1], [0, 4])}, b"\0" * 4), "string-to-string"),
    "metadata int value": (_file({"__metadata__": {"x": 1}, "a": _f32([1], [0, 4])}, b"\0" * 4), "string-to-string"),
    "metadata null": (_file({"__metadata__": None, "a": _f32([1], [0, 4])}, b"\0" * 4), "ok"),
    "overlap behind zero-length": (_file({"a": _f32([2], [0, 8]), "z": _f32([0], [4, 4]), "b": _f32([1], [4, 8])},
                                         b"\0" * 8), "overlapping"),
    "zero-length between": (_file({"a": _f32([1], [0, 4]), "z": _f32([0], [4, 4]), "b": _f32([1], [4, 8])},
                                  b"\0" * 8), "ok"),
    "zero-length at end": (_file({"a": _f32([1], [0, 4]), "z": _f32([0], [4, 4])}, b"\0" * 4), "ok"),
    "dimension 2**70": (_file({"a": _f32([2**70, 0], [0, 0])}), "invalid shape"),
    "lone surrogate name": (_file(raw=b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', data=b"\0" * 4),
                            "lone surrogate"),
    "lone surrogate metadata": (_file(raw=b'{"__metadata__":{"a":"\\udc00"},' + _A[1:] + b"}", data=b"\0" * 4),
                                "lone surrogate"),
    "dtype object": (_file({"a": {"dtype": {}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    "float in shape": (_file({"a": _f32([1.0], [0, 4])}, b"\0" * 4), "invalid shape"),
    "float offset": (_file({"a": _f32([1], [0, 4.0])}, b"\0" * 4), "invalid data_offsets"),
    "bool in shape": (_file({"a": _f32([True], [0, 4])}, b"\0" * 4), "invalid shape"),
    "three offsets": (_file({"a": _f32([1], [0, 4, 4])}, b"\0" * 4), "invalid data_offsets"),
    "missing shape": (_file({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4), "invalid shape"),
    "NaN token": (_file(raw=_A + b',"b":NaN}', data=b"\0" * 4), "not valid JSON"),
    "trailing NUL in header": (_file(raw=_A + b"}\0", data=b"\0" * 4), "not valid JSON"),
    "header is a list": (_file(raw=b"[]"), "not a JSON object"),
    "non-UTF-8 header": (_file(raw=b'{"\xff":1}'), "not UTF-8"),
    "deeply nested": (_file(raw=b'{"__metadata__":' + b"[" * 100000 + b"]" * 100000 + b"}"), "nested too deeply|string-to-string"),
    "size mismatch": (_file({"a": _f32([2], [0, 4])}, b"\0" * 4), "needs 8"),
    "header past end": (struct.pack("<Q", 100) + b"{}", "declares a 100-byte header"),
    "header too large": (struct.pack("<Q", 2**63) + b"{}", "above the 100000000-byte limit"),
    "too short": (b"abc", "fewer than the 8-byte"),
    "scalar": (_file({"a": _f32([], [0, 4])}, b"\0" * 4), "ok"),
    "unsorted offsets": (_file({"b": _f32([1], [4, 8]), "a": _f32([1], [0, 4])}, b"\0" * 8), "ok"),
    "unknown extra field": (_file({"a": {**_f32([1], [0, 4]), "x": 1}}, b"\0" * 4), "ok"),
    "leading whitespace": (_file(raw=b" " + _A + b"}", data=b"\0" * 4), "ok"),
}


def _reference_accepts(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # the reference's verdict, whatever its exception type
        return False


@pytest.mark.parametrize("case", sorted(CASES))
def test_verdict_matches_safetensors(tmp_path, case):
    data, verdict = CASES[case]
    f = tmp_path / "x.safetensors"
    f.write_bytes(data)
    assert _reference_accepts(f) == (verdict == "ok"), "the case table disagrees with the reference"
    if verdict == "ok":
        parse_header(f)
        return
    with pytest.raises(CorruptCheckpointError, match=verdict) as e:
        parse_header(f)
    assert e.value.path == str(f)
    assert "\n" not in str(e.value)


def test_stricter_than_the_reference_on_purpose(tmp_path):
    """Documented limits beyond the reference: a repeated identical entry (ambiguous), a
    dimension above MAX_DIM (no real tensor; bounds every loop), an empty checkpoint."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(_file(raw=_A + b"," + _A[1:] + b"}", data=b"\0" * 4))
    assert _reference_accepts(f)
    with pytest.raises(CorruptCheckpointError, match="twice"):
        parse_header(f)
    f.write_bytes(_file({"a": _f32([MAX_DIM + 1, 0], [0, 0])}))
    with pytest.raises(CorruptCheckpointError, match="beyond surgery's limits"):
        parse_header(f)
    f.write_bytes(_file({"a": _f32([MAX_DIM, 0], [0, 0])}))
    assert parse_header(f).tensors["a"].shape == (MAX_DIM, 0)
    f.write_bytes(_file({}))
    assert _reference_accepts(f) and parse_header(f).tensors == {}
    with pytest.raises(CorruptCheckpointError, match="holds no tensors"):
        open_checkpoint(f)


def test_zero_length_tensors_read_back(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(_file({"a": _f32([1], [0, 4]), "z": _f32([0, 3], [4, 4]), "b": _f32([1], [4, 8])},
                        struct.pack("<2f", 1.5, -2.0)))
    ck = open_checkpoint(f)
    assert ck.get("a").tolist() == [1.5] and ck.get("b").tolist() == [-2.0]
    assert ck.get("z").shape == (0, 3)


def test_empty_weight_map_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(CorruptCheckpointError, match="empty 'weight_map'"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("index", ["[]", '"x"', "3", '{"weight_map": []}', '{"weight_map": {"a": 3}}',
                                   "[" * 50000 + "]" * 50000, '{"weight_map": {"\\ud800": "x.safetensors"}}'])
def test_malformed_index_is_one_error(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CorruptCheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


@pytest.mark.parametrize("config", ["[]", '"llama"', "3", "{", "[" * 50000, b"\xff\xfe{}"])
def test_malformed_config_is_one_error(tmp_path, config):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    p = tmp_path / "config.json"
    p.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(CorruptCheckpointError) as e:
        open_checkpoint(tmp_path).config
    assert str(p) in str(e.value)
