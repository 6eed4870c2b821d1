"""Property-based tests of the readers (hypothesis): generated safetensors headers and
files, mutated files, indexes, configs, adapter configs and edit files either read into a
valid result or raise the project's one-line input error, never anything else.

``SURGERY_FUZZ_EXAMPLES`` sets the examples per property (default 10, fast enough for the
default tier; CI's long profile runs more, see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from surgery.checkpoint.format import DTYPES, MAX_DIM, MAX_NDIM, parse_header
from surgery.core.errors import InputError

EXAMPLES = int(os.environ.get("SURGERY_FUZZ_EXAMPLES", "10"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("SURGERY_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# The dtype codes the reference knows (ours plus a few torch cannot hold) and some junk.
REFERENCE_DTYPES = sorted(DTYPES) + ["F4", "F6_E2M3", "F6_E3M2", "E8M0", "C64"]
names = st.text(min_size=0, max_size=12)
dims = st.one_of(st.integers(0, 4), st.integers(0, 2**70), st.sampled_from([-1, 2**40, 2**40 + 1, 2**64]),
                 st.booleans(), st.floats(allow_nan=False, allow_infinity=False))
entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(REFERENCE_DTYPES), st.text(max_size=4), st.integers(), st.none(),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)),
    "shape": st.one_of(st.lists(dims, max_size=4), st.lists(st.integers(0, 3), max_size=MAX_NDIM + 2), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-2, 64), min_size=0, max_size=3), st.none()),
})
metadata = st.one_of(st.none(), st.dictionaries(names, st.one_of(names, st.integers()), max_size=3),
                     st.lists(names, max_size=2))


def _reference_accepts(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_slice(k)
        return True
    except Exception:  # the reference's verdict, whatever its exception type
        return False


def _check_header(path) -> None:
    """Our verdict: a valid header whose spans tile the data section, or one InputError line;
    never a pass where the reference refuses."""
    try:
        h = parse_header(path)
    except InputError as exc:
        assert "\n" not in str(exc) and exc.path == str(path)
        return
    assert _reference_accepts(path), "we accepted a file the reference refuses"
    spans = sorted((i.offset - h.data_start, i.offset - h.data_start + i.nbytes) for i in h.tensors.values())
    pos = 0
    for b, e in spans:
        assert b == pos
        pos = e
    assert pos == h.file_size - h.data_start


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))   # two reference checks per example
@given(st.dictionaries(names, entry, max_size=4), metadata, st.integers(0, 96))
def test_generated_headers(tmp_path_factory, tensors, meta, data_len):
    header = dict(tensors)
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    _check_header(path)
    # and the other direction: what the reference accepts we accept, within our limits
    if _reference_accepts(path):
        within = all(isinstance(e.get("dtype"), str) and e["dtype"] in DTYPES and len(e["shape"]) <= MAX_NDIM
                     and all(d <= MAX_DIM for d in e["shape"]) for e in tensors.values())
        if within:
            parse_header(path)


def _valid_file() -> bytes:
    raw = json.dumps({"__metadata__": {"format": "pt"},
                      "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                      "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
                      "z": {"dtype": "I8", "shape": [0], "data_offsets": [22, 22]}}).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(22))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6), st.integers(0, 220))
def test_mutated_files(tmp_path_factory, flips, cut):
    data = bytearray(_valid_file())
    for pos, byte in flips:
        if pos < len(data):
            data[pos] = byte
    path = tmp_path_factory.mktemp("m") / "x.safetensors"
    path.write_bytes(bytes(data[: max(cut, 0)] if cut < len(data) else data))
    _check_header(path)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=12)


@FUZZ
@given(st.one_of(json_values, st.fixed_dictionaries({"weight_map": json_values}),
                 st.fixed_dictionaries({"weight_map": st.dictionaries(names, st.one_of(names, st.just("model.safetensors")),
                                                                      max_size=3)})))
def test_generated_indexes_and_configs(tmp_path_factory, doc):
    from safetensors.torch import save_file
    import torch

    from surgery.checkpoint import open_checkpoint

    d = tmp_path_factory.mktemp("i")
    save_file({"a": torch.ones(1)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(doc))
    try:
        cfg = open_checkpoint(d).config
        assert isinstance(cfg, dict)
    except InputError as exc:
        assert "\n" not in str(exc) and "config.json" in str(exc)
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    try:
        ck = open_checkpoint(d)
        assert ck.names == ["a"]
    except InputError as exc:
        assert "\n" not in str(exc)


ADAPTER_FIELDS = ["r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                  "init_lora_weights", "peft_type", "target_modules"]


@FUZZ
@given(st.dictionaries(st.sampled_from(ADAPTER_FIELDS),
                       st.one_of(json_values, st.integers(-2, 9), st.sampled_from(["LORA", "pissa", "IA3"]),
                                 st.dictionaries(st.sampled_from(["q_proj", "(", "a+", ".*", "(a+)+"]),
                                                 st.integers(-1, 4), max_size=2)),
                       max_size=6),
       st.integers(1, 3), st.integers(1, 3))
def test_generated_adapter_configs(tmp_path_factory, cfg, ra, rb):
    import torch
    from safetensors.torch import save_file

    from surgery.checkpoint.peft import LoraConfig, lora_modules, open_adapter_files

    d = tmp_path_factory.mktemp("a")
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({m + ".lora_A.weight": torch.ones(ra, 8), m + ".lora_B.weight": torch.ones(8, rb)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    try:
        folder, config, tensors = open_adapter_files(d, command="test")
        lcfg = LoraConfig.from_config(config, folder)
        modules, _ = lora_modules(lcfg, tensors)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    mod = modules["model.layers.0.self_attn.q_proj"]
    assert ra == rb == mod.rank >= 1 and mod.scale == mod.scale  # accepted only when consistent, never NaN


@FUZZ
@given(st.dictionaries(st.one_of(names, st.sampled_from(["w.delta_u", "w.delta_v", "w.delta_s", "w.delta", "x.delta"])),
                       st.tuples(st.sampled_from(["F32", "F16", "I32", "BOOL"]), st.lists(st.integers(0, 3), max_size=3)),
                       min_size=1, max_size=4),
       st.dictionaries(st.sampled_from(["format", "format_version", "base_sha256", "description"]),
                       st.one_of(names, st.just("{}"), st.just("[]"), st.just("surgery-edit")), max_size=3))
def test_generated_edit_files(tmp_path_factory, entries, meta):
    import torch
    from safetensors.torch import save_file

    from surgery.edit.format import load_edit

    dt = {"F32": torch.float32, "F16": torch.float16, "I32": torch.int32, "BOOL": torch.bool}
    tensors = {k: torch.zeros(shape, dtype=dt[code]) for k, (code, shape) in entries.items()}
    p = tmp_path_factory.mktemp("e") / "e.safetensors"
    try:
        save_file(tensors, str(p), metadata=meta)
    except Exception:  # names safetensors itself cannot write
        assume(False)
    try:
        edit = load_edit(p)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    for te in edit.tensors.values():
        assert te.delta().shape == te.shape
