"""The validated readers every small file goes through: each hostile document is one
InputError naming the file (and field), never a RecursionError or UnicodeError."""

from __future__ import annotations

import math

import pytest

from surgery.core.errors import InputError
from surgery.core.formats import MAX_DEPTH, field, parse_json, parse_yaml, read_json, read_text, read_yaml


def _raises(fn, match):
    with pytest.raises(InputError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return e.value


@pytest.mark.parametrize("doc, match", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
    ('{"a": "\\ud800"}', "lone surrogate"),
    ('{"\\udfff": 1}', "lone surrogate"),
    ("{", "not valid JSON"),
    ("[]", "holds a list, not a JSON object"),
    ('"text"', "holds a string"),
    ("3", "holds a number"),
])
def test_json_refusals(tmp_path, doc, match):
    p = tmp_path / "c.json"
    p.write_text(doc)
    err = _raises(lambda: read_json(p, what="config.json"), match)
    assert err.path == str(p) and str(p) in str(err)


def test_json_encoding_size_and_constants(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b'{"a": "\xff"}')
    _raises(lambda: read_json(p), r"not UTF-8 text \(invalid byte 0xff at offset 7\)")
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}')           # a BOM is fine
    assert read_json(p) == {"a": 1}
    p.write_text('{"a": NaN}')
    assert math.isnan(read_json(p)["a"])
    _raises(lambda: read_json(p, allow_nan=False), "NaN is not valid JSON")
    _raises(lambda: read_json(p, max_bytes=4), "above the 4-byte limit")
    _raises(lambda: read_json(tmp_path / "missing.json"), "does not exist")
    _raises(lambda: read_json(tmp_path), "is a folder")
    assert parse_json('{"a": [1, {"b": null}]}', expect=dict) == {"a": [1, {"b": None}]}


def test_yaml_refusals(tmp_path):
    p = tmp_path / "r.yml"
    p.write_text("a: !!python/object/apply:os.system ['true']\n")
    _raises(lambda: read_yaml(p), "not valid YAML")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p_}, *{p_}, *{p_}, *{p_}, *{p_}, *{p_}, *{p_}, *{p_}, *{p_}, *{p_}]\n"
        for p_, c in zip("abcdefgh", "bcdefghi"))
    _raises(lambda: parse_yaml(laughs, path=p, max_nodes=10_000), "more than 10000 values")
    _raises(lambda: parse_yaml("[" * 5000 + "]" * 5000, path=p), "nests too deeply|deeper than")
    _raises(lambda: parse_yaml("- 1\n- 2\n", path=p), "holds a list")
    _raises(lambda: parse_yaml('a: "\\ud800"', path=p), "lone surrogate|not valid YAML")
    assert parse_yaml("a: 1\nb: [x, y]\n") == {"a": 1, "b": ["x", "y"]}


def test_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"ok \xc3\xa9\n")
    assert read_text(p) == "ok é\n"
    p.write_bytes(b"bad \xc3(")
    _raises(lambda: read_text(p, what="text file"), "text file .* is not UTF-8")


def test_field():
    doc = {"r": 4, "alpha": 8.5, "flag": True, "nan": float("nan"), "s": "four", "b": True, "z": 0}
    kw = dict(path="cfg.json", what="adapter config")
    assert field(doc, "r", int, minimum=1, **kw) == 4
    assert field(doc, "alpha", float, **kw) == 8.5
    assert field(doc, "missing", int, default=8, **kw) == 8
    _raises(lambda: field(doc, "s", int, **kw), "`s` = 'four'; it must be an integer")
    _raises(lambda: field(doc, "b", int, **kw), "`b` = True; it must be an integer")
    _raises(lambda: field(doc, "nan", float, **kw), "must be a finite number")
    _raises(lambda: field(doc, "z", int, minimum=1, **kw), "`z` = 0; it must be at least 1")
    _raises(lambda: field(doc, "missing", int, **kw), "has no `missing` field")
