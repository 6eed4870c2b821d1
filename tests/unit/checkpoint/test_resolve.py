"""How a spec resolves: local paths that do not exist are "no such file" at once (never a Hub
lookup), Hub ids go to the Hub, ``hf://`` forces the Hub."""

from __future__ import annotations

import pytest

from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.reader import hub_spec
from surgery.core.errors import CheckpointNotFoundError, HubError


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hub."""
    from surgery.checkpoint import hub

    def boom(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(hub, "pull", boom)


@pytest.mark.parametrize("spec", ["old-model/pytorch_model.bin", "x/model.safetensors", "a/b.gguf",
                                  "org/model.safetensors.index.json", "./rel/dir", "/abs/path", "name"])
def test_missing_local_paths_are_no_such_file(spec, no_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_spec(spec) is None
    with pytest.raises(CheckpointNotFoundError) as exc:
        open_checkpoint(spec)
    assert str(exc.value).startswith(f"{spec} does not exist (no such file or folder")
    assert exc.value.exit_code == 3


def test_existing_first_component_means_local(no_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama-tiny").mkdir()
    assert hub_spec("llama-tiny/base") is None
    with pytest.raises(CheckpointNotFoundError, match=r"^llama-tiny/base does not exist \(no such file or folder\)\.$"):
        open_checkpoint("llama-tiny/base")
    assert hub_spec("hf://llama-tiny/base") == ("llama-tiny/base", None)  # the explicit Hub form


def test_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_spec("org/name") == ("org/name", None)
    assert hub_spec("org/name@v1") == ("org/name", "v1")
    assert hub_spec("org/na.me-2@refs/pr/1") == ("org/na.me-2", "refs/pr/1")


def test_cli_missing_path_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("convert", "old-model/pytorch_model.bin", "-o", "out")
    assert r.code == 3
    assert r.stderr == "error: old-model/pytorch_model.bin does not exist (no such file or folder).\n"


def test_offline_hint_only_when_offline(monkeypatch):
    import huggingface_hub

    from surgery.checkpoint import hub

    def fake(**kw):
        raise huggingface_hub.errors.RepositoryNotFoundError("404 not found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubError) as exc:
        hub.pull("org/name")
    assert "HF_HUB_OFFLINE" not in str(exc.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as exc:
        hub.pull("org/name")
    assert "HF_HUB_OFFLINE" in str(exc.value)


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 24) + 3])
def test_hash_file_equals_hashlib(tmp_path, size):
    import hashlib
    import os

    from surgery.checkpoint.reader import hash_file

    data = os.urandom(size)
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    assert hash_file(f) == hashlib.sha256(data).hexdigest()
