"""Property-based tests at the command line (hypothesis): generated safetensors files,
adapter configs, recipes and edit files fed to the commands. Each run exits 0 with a valid
result, or 2/3 with one line: never a traceback or an internal error, never an output on
failure. ``SURGERY_FUZZ_EXAMPLES`` / 5 examples per property (4 by default: each runs whole commands)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hostile_helpers import LLAMA, lora_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow   # whole commands per example: the readers' properties run in the default tier

EXAMPLES = max(1, int(os.environ.get("SURGERY_FUZZ_EXAMPLES", "20")) // 5)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("SURGERY_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _contract(res, out: Path | None = None) -> None:
    assert res.code in (0, 1, 2, 3), (res.code, res.stderr[-500:])
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr[-500:]
    if res.code in (2, 3):
        assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr
        if out is not None:
            assert not out.exists() and not [p for p in out.parent.iterdir() if ".surgery-tmp-" in p.name]
    elif out is not None and res.code == 0:
        from surgery.checkpoint import open_checkpoint

        assert open_checkpoint(out).names


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "U16", "F4", "x"]),
    "shape": st.lists(st.integers(0, 3), max_size=3),
    "data_offsets": st.lists(st.integers(0, 40), min_size=2, max_size=2),
})


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=6), entry, min_size=1, max_size=3),
       st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
       st.integers(0, 48), st.booleans())
def test_generated_checkpoints(cli, tensors, meta, data_len, contiguous):
    header = dict(tensors)
    if contiguous:  # make the offsets valid more often, so later checks get exercised too
        pos = 0
        sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "BOOL": 1, "F8_E4M3": 1, "U16": 2}
        for e in header.values():
            n = sizes.get(e["dtype"], 1)
            for d in e["shape"]:
                n *= d
            e["data_offsets"] = [pos, pos + n]
            pos += n
        data_len = pos
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        f = d / "m.safetensors"
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256))[:data_len] * 1)
        for args, out in ((["inspect", f], None), (["check", f, "--quiet"], None), (["diff", f, f], None),
                          (["convert", f, d / "o1", "--dtype", "float32", "--quiet"], d / "o1"),
                          (["merge", "-m", "linear", f, f, "-o", d / "o2", "--quiet"], d / "o2"),
                          (["analyze", "spectrum", f, "--quiet"], None)):
            _contract(cli(*args), out)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(), st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=2),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=2)),
                           max_leaves=6)
adapter_cfg = st.dictionaries(
    st.sampled_from(["peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
                     "alpha_pattern", "init_lora_weights", "bias", "modules_to_save"]),
    st.one_of(json_values, st.sampled_from(["LORA", "LOHA", "IA3", "pissa", 2, 4, True]),
              st.dictionaries(st.sampled_from(["q_proj", "(", ".*", "(a+)+"]), st.integers(-1, 4), max_size=2)),
    max_size=6)


@FUZZ
@given(adapter_cfg, st.integers(1, 3))
def test_generated_adapter_configs(cli, cfg, r):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ad = lora_adapter(d / "ad", r=r)
        (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg}))
        _contract(cli("fuse", LLAMA / "base", ad, "-o", d / "o", "--quiet"), d / "o")
        _contract(cli("edit", "from-peft", ad, "--base", LLAMA / "base", "-o", d / "e.safetensors"))


recipe = st.fixed_dictionaries({
    "merge_method": st.sampled_from(["linear", "task_arithmetic", "ties", "slerp", "dare_linear", "opcm", "nope"]),
}, optional={
    "base_model": st.sampled_from(["BASE", "nowhere", 3]),
    "models": st.lists(st.one_of(st.fixed_dictionaries({"model": st.sampled_from(["A", "B", "nowhere"])},
                                                       optional={"parameters": st.dictionaries(
                                                           st.sampled_from(["weight", "density", "t", "lambda"]),
                                                           st.one_of(st.floats(), st.integers(-2, 3), st.text(max_size=3),
                                                                     st.lists(st.floats(0, 1), max_size=2)),
                                                           max_size=2)}),
                                   json_values), max_size=3),
    "parameters": st.dictionaries(st.sampled_from(["weight", "density", "t", "lambda", "normalize"]),
                                  st.one_of(st.floats(), st.integers(-2, 3), st.booleans()), max_size=2),
    "dtype": st.sampled_from(["bfloat16", "float32", "int8", 3]),
})


@FUZZ
@given(recipe)
def test_generated_recipes(cli, doc):
    names = {"BASE": str(LLAMA / "base"), "A": str(LLAMA / "ft-a"), "B": str(LLAMA / "ft-b")}

    def subst(x):
        if isinstance(x, str):
            return names.get(x, x)
        if isinstance(x, list):
            return [subst(v) for v in x]
        if isinstance(x, dict):
            return {k: subst(v) for k, v in x.items()}
        return x

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "r.yml").write_text(yaml.safe_dump(subst(doc)))
        _contract(cli("merge", "--config", d / "r.yml", "-o", d / "o", "--quiet"), d / "o")


@FUZZ
@given(st.dictionaries(st.sampled_from(["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "nope.weight",
                                        "lm_head.weight"]),
                       st.tuples(st.sampled_from(["u", "dense"]), st.integers(1, 3),
                                 st.sampled_from([1.0, 0.0, float("nan"), float("inf")])),
                       min_size=1, max_size=2))
def test_generated_edit_files(cli, edits):
    import torch

    from surgery.edit.format import Edit, TensorEdit, save_edit

    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.norm.weight": (64,),
              "nope.weight": (3, 3), "lm_head.weight": (512, 64)}
    tensors = {}
    for name, (kind, r, fill) in edits.items():
        shape = shapes[name]
        if kind == "dense" or len(shape) == 1:
            tensors[name] = TensorEdit(name, dense=torch.full(shape, fill))
        else:
            tensors[name] = TensorEdit(name, u=torch.full((shape[0], r), fill), v=torch.ones(shape[1], r))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_edit(Edit(tensors), d / "e.safetensors")
        _contract(cli("edit", "to-peft", d / "e.safetensors", "--base", LLAMA / "base", "-o", d / "ad",
                      "--drop-vectors"))
        shutil.rmtree(d / "ad", ignore_errors=True)
