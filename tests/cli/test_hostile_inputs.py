"""Hostile inputs at the command line: each case ends in one line and exit 2/3 (or a
check verdict), never a traceback or an "internal error"."""

from __future__ import annotations

import json
import re
import struct
import time

import pytest
import torch
from hostile_helpers import FIXTURES, LLAMA, one_line_error
from safetensors.torch import save_file


def _raw_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


SURROGATE_NAME = b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
SURROGATE_META = b'{"__metadata__":{"k":"\\udc00"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
DTYPE_OBJECT = b'{"a":{"dtype":{},"shape":[1],"data_offsets":[0,4]}}'
GAP = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}'
TRAILING = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'


@pytest.mark.parametrize("header, data, match", [
    (SURROGATE_NAME, b"\0" * 4, "lone surrogate"),
    (SURROGATE_META, b"\0" * 4, "lone surrogate"),
    (DTYPE_OBJECT, b"\0" * 4, "unknown dtype {}"),
    (GAP, b"\0" * 12, "gap"),
    (TRAILING, b"\0" * 8, "trailing bytes"),
], ids=["surrogate name", "surrogate metadata", "dtype {}", "gap", "trailing bytes"])
def test_malformed_files_in_every_reading_command(cli, tmp_path, header, data, match):
    bad = _raw_file(tmp_path / "bad.safetensors", header, data)
    good = LLAMA / "base"
    for args in (["inspect", bad], ["check", bad], ["diff", good, bad], ["convert", bad, tmp_path / "o"],
                 ["merge", "-m", "linear", bad, good, "-o", tmp_path / "o"],
                 ["fuse", bad, tmp_path / "none", "-o", tmp_path / "o"],
                 ["analyze", "spectrum", bad], ["edit", "extract", good, bad, "-o", tmp_path / "e.safetensors"]):
        line = one_line_error(cli(*args), 3)
        assert match in line and "bad.safetensors" in line, (args[0], line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_check_float8_bool_uint16(cli, tmp_path):
    f8 = torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)
    save_file({"a": f8, "b": torch.ones(2)}, str(tmp_path / "f8.safetensors"))
    res = cli("check", tmp_path / "f8.safetensors", "--json")
    assert res.code == 1 and res.json()["checks"][0]["failures"] == [
        {"tensor": "a", "file": "f8.safetensors", "nan": 1, "inf": 0}]
    save_file({"a": torch.tensor([True, False]), "u": torch.tensor([1, 2], dtype=torch.uint16)},
              str(tmp_path / "x.safetensors"))
    save_file({"a": torch.tensor([True, True]), "u": torch.tensor([1, 5], dtype=torch.uint16)},
              str(tmp_path / "y.safetensors"))
    res = cli("check", tmp_path / "x.safetensors", "--against", tmp_path / "y.safetensors", "--atol", "1", "--json")
    assert res.code == 1, res.stderr
    fails = {f["tensor"]: f for f in res.json()["checks"][1]["failures"]}
    assert fails["u"]["max_abs_diff"] == 3.0 and fails["u"]["violations"] == 1 and "a" not in fails
    assert cli("check", tmp_path / "x.safetensors", "--against", tmp_path / "x.safetensors").code == 0


def test_malformed_pickle_index(cli, tmp_path):
    for doc in ("[]", '{"weight_map": {}}', '{"weight_map": {"a": 3}}', "{", "[" * 100_000):
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "pytorch_model.bin.index.json").write_text(doc)
        line = one_line_error(cli("convert", tmp_path / "m", tmp_path / "out"), 3)
        assert "pytorch_model.bin.index.json" in line
    assert not (tmp_path / "out").exists()


def test_empty_weight_map_fails_check(cli, tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    assert "empty 'weight_map'" in one_line_error(cli("check", tmp_path), 3)


@pytest.mark.parametrize("device, match", [("cuda", "CUDA GPU"), ("gpu0", "not a device name"),
                                           ("cuda:7", "CUDA GPU|names GPU 7"), ("meta", "does not run on")])
def test_devices(cli, tmp_path, device, match):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPU")
    base = LLAMA / "base"
    for args in (["diff", base, LLAMA / "ft-a"], ["analyze", "spectrum", base],
                 ["merge", "-m", "linear", LLAMA / "ft-a", LLAMA / "ft-b", "-o", tmp_path / "o"],
                 ["fuse", base, tmp_path / "ad", "-o", tmp_path / "o"],
                 ["grow", FIXTURES / "tokenformer-tiny", "-o", tmp_path / "o", "--factor", "2"]):
        line = one_line_error(cli(*args, "--device", device), 2)
        assert "--device" in line and re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, match", [
    (["--factor", "nan"], "--factor must be a finite number"),
    (["--factor", "inf"], "--factor must be a finite number"),
    (["--tokens", "1000000000"], "--tokens 1000000000 is outside"),
    (["--ffn-tokens", "0"], "--ffn_tokens 0 is outside|--ffn-tokens 0 is outside"),
    (["--factor", "1e7"], "above the limit"),
])
def test_grow_sizes_refused_at_once(cli, tmp_path, args, match):
    t0 = time.perf_counter()
    line = one_line_error(cli("grow", FIXTURES / "tokenformer-tiny", "-o", tmp_path / "o", *args), 2)
    assert re.search(match, line), line
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "o").exists()


def test_grow_layer_count_must_match(cli, tmp_path):
    import shutil

    tf = tmp_path / "tf"
    shutil.copytree(FIXTURES / "tokenformer-tiny", tf)
    cfg = json.loads((tf / "config.json").read_text())
    for value, match in ((cfg["num_layers"] + 1, "num_layers"), ("two", "num_layers = 'two'"), (0, "positive integer")):
        (tf / "config.json").write_text(json.dumps({**cfg, "num_layers": value}))
        line = one_line_error(cli("grow", tf, "-o", tmp_path / "o", "--factor", "2"), 3)
        assert match in line
    assert not (tmp_path / "o").exists()


def test_empty_dimension_does_not_loop(cli, tmp_path):
    h = json.dumps({"e": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
                    "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
        _raw_file(tmp_path / n / "model.safetensors", h, struct.pack("<2f", 1.0, 2.0))
    t0 = time.perf_counter()
    res = cli("merge", "-m", "linear", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "o", "--json")
    assert time.perf_counter() - t0 < 60
    assert res.code in (0, 2, 3), res.stderr
    if res.code:
        one_line_error(res, (2, 3))
    assert "internal error" not in res.stderr


def test_paths_with_non_utf8_bytes(cli, tmp_path):
    """A folder named with non-UTF-8 bytes (a lone surrogate in Python) reads and writes:
    records, cards and adapter configs carry its escaped name, never a UnicodeEncodeError."""
    import os
    import shutil

    src = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"in\xfe"))
    shutil.copytree(LLAMA / "base", src)
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"out\xfd"))
    res = cli("convert", src, out, "--json")
    assert res.code == 0, res.stderr
    from surgery.checkpoint import open_checkpoint

    record = json.loads(open_checkpoint(out).metadata["surgery"])
    assert record["inputs"][0]["label"].endswith("in\\udcfe")
    ed = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"e\xfd.safetensors"))
    assert cli("edit", "extract", src, LLAMA / "ft-a", "-o", ed, "--rank", "1", "--json").code == 0
    ad = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"ad\xfd"))
    assert cli("edit", "to-peft", ed, "--base", src, "-o", ad, "--drop-vectors", "--json").code == 0
    assert cli("edit", "from-peft", ad, "-o", tmp_path / "back.safetensors", "--json").code == 0


@pytest.mark.parametrize("text, match", [
    ("a: " + "[" * 300 + "]" * 300, "nests too deeply|deeper than"),
    (b"merge_method: linear\n\xff: 1\n", "not UTF-8"),
    ("merge_method: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("- 1\n- 2\n", "must be a mapping"),
], ids=["deep", "non-UTF-8", "python tag", "a list"])
def test_malformed_recipes(cli, tmp_path, text, match):
    r = tmp_path / "r.yml"
    r.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_line_error(cli("merge", "--config", r, "-o", tmp_path / "o"), (2, 3))
    assert re.search(match, line) and "r.yml" in line, line
    assert not (tmp_path / "o").exists()


def test_edit_metadata_nested_too_deeply(cli, tmp_path):
    save_file({"w.delta": torch.ones(2)}, str(tmp_path / "e.safetensors"),
              metadata={"format": "surgery-edit", "base_sha256": "[" * 100_000 + "]" * 100_000})
    line = one_line_error(cli("edit", "apply", LLAMA / "base", tmp_path / "e.safetensors", "-o", tmp_path / "o"), 3)
    assert "base_sha256" in line
