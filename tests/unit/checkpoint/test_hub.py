"""Hub pull through a pre-filled Hugging Face cache with ``HF_HUB_OFFLINE=1`` (no network),
and the small pure helpers of ``surgery.checkpoint.hub``.

huggingface_hub reads ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` into module constants at import
time: one test runs the real CLI in a subprocess with those variables set (the path a user
takes); the others run in-process with the constants patched, which is much faster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

MAIN_SHA = "a" * 8 + "1234567890abcdef1234567890abcdef"  # 40 hex digits, like a git commit
V1_SHA = "b" * 8 + "fedcba0987654321fedcba0987654321"


def _add_snapshot(repo_dir: Path, commit: str, src: Path) -> Path:
    """Lay out ``src``'s files as huggingface_hub does: blobs by hash, snapshot symlinks to them."""
    blobs = repo_dir / "blobs"
    snap = repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, fixtures_dir):
    """A cache holding org/name: main -> llama-tiny/base, branch v1 -> llama-tiny/ft-a."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    repo = cache / "models--org--name"
    snaps = {
        "main": _add_snapshot(repo, MAIN_SHA, fixtures_dir / "llama-tiny" / "base"),
        "v1": _add_snapshot(repo, V1_SHA, fixtures_dir / "llama-tiny" / "ft-a"),
    }
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN_SHA)
    (repo / "refs" / "v1").write_text(V1_SHA)
    return home, cache, snaps


def _surgery(home: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on :9
    return subprocess.run([sys.executable, "-m", "surgery.commands.app", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """In-process: point huggingface_hub's import-time constants at the cache, offline."""
    from huggingface_hub import constants

    home, cache, snaps = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return snaps


@pytest.mark.slow
def test_inspect_repo_id_resolves_main_from_cache(hub_cache, cli, fixtures_dir):
    home, cache, snaps = hub_cache
    r = _surgery(home, cache, "inspect", "org/name", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert Path(rep["root"]).resolve() == snaps["main"].resolve()
    local = cli("inspect", fixtures_dir / "llama-tiny" / "base", "--json").json()
    assert rep["num_parameters"] == local["num_parameters"] == 106816
    assert rep["tensors"] == local["tensors"]


@pytest.mark.slow
def test_revision_by_commit_and_branch_selects_that_snapshot(offline, cli, fixtures_dir):
    for spec in (f"org/name@{V1_SHA}", "org/name@v1"):
        r = cli("inspect", spec, "--json")
        assert r.code == 0, r.stderr
        assert Path(r.json()["root"]).resolve() == offline["v1"].resolve()
    # the bytes served for @v1 are ft-a's, not base's: diff against the local folders
    same = cli("diff", "org/name@v1", fixtures_dir / "llama-tiny" / "ft-a", "--json").json()
    assert same["summary"]["identical"] is True and same["summary"]["compared"] == 20
    other = cli("diff", "org/name", "org/name@v1", "--json").json()
    assert other["summary"]["changed"] == 20 and other["summary"]["max_rel_change"] > 0.01


def _main(*args: str) -> tuple[int, str, str]:
    from surgery.commands.app import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_missing_repo_offline_is_input_error(offline):
    code, out, stderr = _main("inspect", "org/missing")
    assert code == 3
    assert out == ""
    err = stderr.strip().splitlines()
    assert err[0].startswith("error: org/missing is not a local path")
    assert "Hub repository org/missing could not be fetched" in err[0]
    assert "HF_HUB_OFFLINE" in err[0]
    assert "Traceback" not in stderr


def test_missing_revision_offline_is_input_error(offline):
    code, out, err = _main("inspect", "org/name@nope", "--json")
    assert code == 3
    doc = json.loads(out)  # --json on failure: one error document on stdout
    assert doc["error"]["code"] == 3 and doc["error"]["type"] == "HubError" and doc["passed"] is False
    assert "org/name at revision nope could not be fetched" in err and doc["error"]["message"] in err


def test_pull_raises_hub_error_in_process(monkeypatch, tmp_path):
    """The library call itself: HubError (exit code 3) naming the repo and revision."""
    import huggingface_hub

    from surgery.checkpoint import hub
    from surgery.core.errors import HubError

    def fake_snapshot_download(**kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached; token hf_abcdefghijklmnop was used")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(HubError) as exc:
        hub.pull("org/name", revision="r1")
    assert exc.value.exit_code == 3
    msg = str(exc.value)
    assert msg.startswith("Hub repository org/name at revision r1 could not be fetched (LocalEntryNotFoundError")
    assert "hf_abcdefghijklmnop" not in msg and "hf_***" in msg


def test_pull_asks_only_for_safe_files(monkeypatch):
    import huggingface_hub

    from surgery.checkpoint import hub

    seen = {}

    def fake_snapshot_download(**kw):
        seen.update(kw)
        return "/somewhere"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.pull("org/name") == Path("/somewhere")
    from huggingface_hub.utils import filter_repo_objects

    files = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "config.json", "tokenizer.json", "tokenizer.model", "pytorch_model.bin", "model.pt",
             "flax_model.msgpack", "tf_model.h5", "model.ckpt", "chat_template.jinja"]
    kept = set(filter_repo_objects(files, allow_patterns=seen["allow_patterns"]))
    assert kept == {"model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                    "config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja"}


@pytest.mark.parametrize("text,ok", [
    ("org/name", True), ("org/name@main", True), ("org/name@" + MAIN_SHA, True), ("org/na.me-2@refs/pr/1", True),
    ("name", False), ("/abs/path", False), ("./rel/dir", False), ("a/b/c", False), ("org/", False),
])
def test_looks_like_repo_id(text, ok):
    from surgery.checkpoint.hub import looks_like_repo_id

    assert looks_like_repo_id(text) is ok


def test_scrub_hides_tokens():
    from surgery.checkpoint.hub import _scrub

    assert _scrub("401 for token hf_AbCdEfGhIjKl0123 on org/x\nsecond line") == "401 for token hf_*** on org/x"
    assert _scrub("") == ""
