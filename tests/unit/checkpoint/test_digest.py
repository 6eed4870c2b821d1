"""surgery.checkpoint.digest: an input's sha256 hashed from the reads the operation makes
(in file order, gaps and header padding included) equals hashlib's digest of the file."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import digest as digest_module
from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.digest import InputDigest, note_read
from surgery.core.engine import cast_tensor, write_checkpoint
from surgery.core.errors import NonFiniteError


@pytest.fixture(autouse=True)
def _no_digest_cache(monkeypatch):
    monkeypatch.setenv("SURGERY_NO_HASH_CACHE", "1")
    monkeypatch.setattr(digest_module, "HASH_CHUNK", 4096 + 24)  # many chunks, none page-aligned


def _out_of_order_file(path: Path, nan: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file whose tensors are stored in reverse name order (mixed dtypes, a
    zero-size tensor) behind a header padded with spaces to an odd, multi-page length."""
    g = torch.Generator().manual_seed(7)
    tensors = {
        "a.weight": torch.randn(300, 37, generator=g),
        "b.bias": torch.randn(1001, generator=g).to(torch.bfloat16),
        "c.empty": torch.zeros(0, 5),
        "d.ids": torch.arange(999, dtype=torch.int32),
        "e.weight": torch.randn(64, 129, generator=g).to(torch.float16),
    }
    if nan:
        tensors["a.weight"][3, 4] = float("nan")
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}
    header, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors, reverse=True):
        data = tensors[name].contiguous().view(torch.uint8).numpy().tobytes() if tensors[name].numel() else b""
        header[name] = {"dtype": codes[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (9000 - len(raw))  # padding: the data starts mid-page
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return tensors


@pytest.mark.parametrize("dtype", [None, torch.float32])  # raw copies (copy_file_range) / casts (preadv)
def test_recorded_sha256_of_an_out_of_order_padded_file(tmp_path, dtype):
    src = tmp_path / "src.safetensors"
    tensors = _out_of_order_file(src)
    ck = open_checkpoint(src)
    assert [ck.info(n).offset for n in ck.names] == sorted((ck.info(n).offset for n in ck.names), reverse=True)
    written = write_checkpoint([cast_tensor(ck, n, dtype) for n in ck.names], tmp_path / "out", donor=ck,
                               operation="convert", parameters={}, inputs=[ck])
    assert written.record["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    out = open_checkpoint(tmp_path / "out")
    for name, t in tensors.items():  # and the copy itself is unchanged by the hashing
        assert torch.equal(out.get(name, dtype=None), t if dtype is None or not t.is_floating_point() else t.to(dtype))
    assert digest_module._FOLLOWED == {}


def test_hash_follows_the_reads_in_file_order(tmp_path):
    src = tmp_path / "src.safetensors"
    _out_of_order_file(src)
    ck = open_checkpoint(src)
    d = InputDigest(ck.files, follow_reads=True)
    try:
        first = ck.info(ck.names[-1])  # stored first in the file: hashed with the header before it
        ck.get_raw(first.name)
        deadline = time.monotonic() + 30
        while (0 not in d._hashes or d._hashes[0].pos < first.offset + first.nbytes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d._hashes[0].pos == first.offset + first.nbytes  # hashed on the read, not at the end
        # reads out of file order, overlapping, repeated and past the end: still the file's digest
        size = src.stat().st_size
        for start, stop in [(size - 10, size), (5, 100), (first.offset, first.offset + 8), (size - 1, size + 50)]:
            note_read(src, start, stop)
    finally:
        got = d.result()
    assert got == hashlib.sha256(src.read_bytes()).hexdigest()
    assert digest_module._FOLLOWED == {}


def test_shards_and_unread_files_hash_to_the_manifest(tmp_path):
    files = []
    for i, payload in enumerate([b"x" * 70000, b"", b"yz" * 5]):
        f = tmp_path / f"model-{i + 1:05d}-of-00003.safetensors"
        f.write_bytes(payload)
        files.append(f)
    want = hashlib.sha256("".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
                                  for f in files).encode()).hexdigest()
    for follow in (True, False):
        d = InputDigest(list(reversed(files)), follow_reads=follow)
        note_read(files[0], 1000, 2000)
        assert d.result() == want


def test_a_failed_write_stops_following_its_inputs(tmp_path):
    src = tmp_path / "src.safetensors"
    _out_of_order_file(src, nan=True)
    ck = open_checkpoint(src)
    plan = [cast_tensor(ck, n, None) for n in ck.names if n != "a.weight"]
    from surgery.core.engine import OutputTensor

    plan.append(OutputTensor("a.weight", (300, 37), torch.float32, compute=lambda: ck.get("a.weight") * 2))
    with pytest.raises(NonFiniteError):
        write_checkpoint(plan, tmp_path / "out", donor=ck, operation="t", parameters={}, inputs=[ck])
    assert digest_module._FOLLOWED == {} and ck._digest is None
    assert ck.sha256() == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.slow  # builds the tokenizer with transformers
def test_gguf_source_hashed_from_its_row_reads(tmp_path, fixtures_dir, monkeypatch):
    """convert X.gguf: the GGUF row reader reports its reads (stored in another order than the
    output's names), and the recorded digest is still the file's."""
    from surgery.convert import convert

    src = fixtures_dir / "llama-tiny" / "base.q8_0.gguf"
    fed = []
    real_note = digest_module.InputDigest.feed
    monkeypatch.setattr(digest_module.InputDigest, "feed", lambda self, *a: (fed.append(a), real_note(self, *a)))
    written = convert(src, tmp_path / "hf").written
    assert written.record["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    from surgery.checkpoint.gguf import read_gguf

    assert sum(b - a for _, a, b in fed) >= sum(t.nbytes for t in read_gguf(src).tensors)  # every tensor reported
    assert digest_module._FOLLOWED == {}


def test_a_cached_digest_is_not_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SURGERY_NO_HASH_CACHE")
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 5000)
    first = InputDigest(files)
    assert first._thread is not None and digest_module._FOLLOWED
    want = first.result()
    again = InputDigest(files)  # both digests come from the cache: nothing to hash, nothing followed
    assert again._thread is None and not digest_module._FOLLOWED
    assert again.result() == want == hashlib.sha256("".join(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files).encode()).hexdigest()


def test_cancel_stops_a_whole_file_hash(tmp_path, monkeypatch):
    f = tmp_path / "big.safetensors"
    f.write_bytes(b"\1" * (8 << 20))
    monkeypatch.setattr(digest_module, "HASH_CHUNK", 1 << 16)  # 128 chunks of 20 ms: 2.6 s uncancelled
    real_advance = digest_module._FileHash.advance
    monkeypatch.setattr(digest_module._FileHash, "advance", lambda self, stop: (time.sleep(0.02), real_advance(self, stop)))
    d = InputDigest([f], follow_reads=False)
    time.sleep(0.1)
    thread = d._thread
    d.cancel()
    thread.join(timeout=1.0)
    assert not thread.is_alive() and d._hashes[0].pos < f.stat().st_size


def test_a_pickle_source_travels_to_tasks_without_its_running_digest(tmp_path, monkeypatch):
    # the engine's non-finite check sends its inputs to Ray tasks; a source whose digest is
    # running here (a thread and a queue) must still pickle, and its sha256 stays the file's
    import pickle

    from surgery.convert import _FileSource

    monkeypatch.setenv("SURGERY_NO_HASH_CACHE", "1")
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0)}, file)
    src = _FileSource(tmp_path, [file], "pt")
    src.start_sha256()
    copy = pickle.loads(pickle.dumps(src))
    assert copy._digest is None and copy.files == [file]
    assert src.sha256() == hashlib.sha256(file.read_bytes()).hexdigest()
