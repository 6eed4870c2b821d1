"""Provenance: the recorded sha256 is the file's true digest. The cache key includes ctime,
so a same-size in-place edit with the mtime restored is hashed again."""

from __future__ import annotations

import hashlib
import os

from surgery.checkpoint.reader import file_sha256


def test_same_size_edit_with_mtime_restored_is_rehashed(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SURGERY_NO_HASH_CACHE", raising=False)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"A" * 4096)
    first = file_sha256(f)
    assert first == hashlib.sha256(b"A" * 4096).hexdigest()
    assert (tmp_path / "cache" / "sha256.json").is_file()
    st = os.stat(f)
    with open(f, "r+b") as fh:          # same size, in place (same inode)
        fh.write(b"B")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(f)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert file_sha256(f) == hashlib.sha256(b"B" + b"A" * 4095).hexdigest() != first


def test_cache_hit_when_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SURGERY_NO_HASH_CACHE", raising=False)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"xyz")
    digest = file_sha256(f)
    import surgery.checkpoint.digest as digest_module

    monkeypatch.setattr(digest_module, "hash_file", lambda p: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert file_sha256(f) == digest
