"""`surgery pull` and header-only `surgery inspect org/name` against a loopback HTTP server
that serves a repository the way the Hub API does (model info with file sizes, HEAD and GET
on /resolve/ with the commit, ETag and size headers, HTTP range requests). huggingface_hub's
real client runs in-process with its endpoint and cache pointed at the server and a temporary
folder; no network is used. The server counts the bytes it sends per file, so the tests can
say exactly how much of the weights a command downloaded."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # loopback Hub round trips / fresh interpreters

COMMIT = "c" * 8 + "0123456789abcdef0123456789abcdef"
DEADLINE_S = 120


class RepoServer:
    """One model repository (files by name) at one commit, served over HTTP."""

    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id, self.files = repo_id, files
        self.sent: dict[str, int] = {}
        self.ranges: list[tuple[str, str]] = []
        self.broken: set[str] = set()  # files whose GET fails with 500
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith((".safetensors", ".bin", ".gguf"))

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else hashlib.sha1(data).hexdigest()

    def info(self, host: str) -> dict:
        siblings = []
        for name, data in sorted(self.files.items()):
            s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if self.is_lfs(name):
                s["lfs"] = {"sha256": self.etag(name), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False, "disabled": False,
                "gated": False, "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}


def _handler(srv: RepoServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _file(self, head: bool) -> None:
            m = re.match(rf"^/{re.escape(srv.repo_id)}/resolve/([^/]+)/(.+)$", self.path.split("?", 1)[0])
            if not m or m.group(2) not in srv.files or m.group(1) not in (COMMIT, "main"):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name = m.group(2)
            if name in srv.broken and not head:
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = srv.files[name]
            start, stop, code = 0, len(data), 200
            rng = self.headers.get("Range")
            if rng and not head:
                a, b = re.match(r"bytes=(\d+)-(\d*)", rng).groups()
                start, stop, code = int(a), min(len(data), int(b) + 1 if b else len(data)), 206
                with srv.lock:
                    srv.ranges.append((name, rng))
            self.send_response(code)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{srv.etag(name)}"')
            if srv.is_lfs(name):
                self.send_header("X-Linked-Etag", f'"{srv.etag(name)}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) if head else stop - start))
            self.end_headers()
            if not head:
                self.wfile.write(data[start:stop])
                with srv.lock:
                    srv.sent[name] = srv.sent.get(name, 0) + stop - start

        def do_HEAD(self):  # noqa: N802
            with srv.lock:
                srv.requests.append(("HEAD", self.path))
            self._file(head=True)

        def do_GET(self):  # noqa: N802
            with srv.lock:
                srv.requests.append(("GET", self.path))
            path = self.path.split("?", 1)[0]
            if path in (f"/api/models/{srv.repo_id}", f"/api/models/{srv.repo_id}/revision/main",
                        f"/api/models/{srv.repo_id}/revision/{COMMIT}"):
                return self._json(200, srv.info(self.headers["Host"]))
            if path.startswith("/api/models/"):
                return self._json(404, {"error": "Repository not found"})
            self._file(head=False)

    return Handler


def _big_checkpoint(folder: Path, shards: bool = False) -> Path:
    """A Llama-named checkpoint with tensors large enough that a header is a small part of it."""
    import torch

    from surgery.convert import convert

    src = folder / "src"
    src.mkdir(parents=True)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(1024, 256, generator=g),
               "model.layers.0.mlp.up_proj.weight": torch.randn(512, 256, generator=g),
               "model.norm.weight": torch.ones(256)}, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    if not shards:
        return src
    out = folder / "sharded"
    convert(src, out, shard_size="600KB")
    return out


@pytest.fixture
def hub_repo(tmp_path, monkeypatch, request):
    """Serve a repository built from a checkpoint folder (+ a pickle and a README that pull
    must skip); point huggingface_hub at the server and an empty cache."""
    from huggingface_hub import constants

    sharded = getattr(request, "param", False)
    ckpt = _big_checkpoint(tmp_path / "make", shards=sharded)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"not really a pickle"
    files["README.md"] = b"# card\n"
    files["tokenizer.json"] = b'{"model": {}}'
    srv = RepoServer("org/name", files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(srv))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    stopper = threading.Timer(DEADLINE_S, server.shutdown)
    stopper.daemon = True
    stopper.start()
    cache = tmp_path / "hf-cache"
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.chdir(tmp_path)
    try:
        yield srv, ckpt, cache
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_pull_fetches_only_checkpoint_files_into_cache_and_folder(hub_repo, cli, tmp_path):
    srv, ckpt, cache = hub_repo
    out = tmp_path / "pulled"
    r = cli("pull", "org/name", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    doc = r.json()
    want = {"model.safetensors", "config.json", "tokenizer.json"}
    assert {f["name"] for f in doc["files"]} == want
    assert doc["revision"] == COMMIT and doc["total_bytes"] == sum(len(srv.files[n]) for n in want)
    assert "pytorch_model.bin" not in srv.sent and "README.md" not in srv.sent  # never asked for
    snap = Path(doc["snapshot"])
    assert snap.is_relative_to(cache) and snap.name == COMMIT
    for name in want:
        assert (snap / name).read_bytes() == srv.files[name] == (out / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(want)
    # a second pull is served from the cache: no file bytes move
    before = dict(srv.sent)
    again = cli("pull", "org/name", "--json", "-q")
    assert again.code == 0, again.stderr
    assert srv.sent == before


def test_pull_include_exclude(hub_repo, cli):
    srv, _, _ = hub_repo
    r = cli("pull", "org/name", "--include", "*.json", "--exclude", "tokenizer*", "--json", "-q")
    assert r.code == 0, r.stderr
    assert [f["name"] for f in r.json()["files"]] == ["config.json"]
    assert set(srv.sent) == {"config.json"}
    r = cli("pull", "org/name", "--include", "*.bin")
    assert r.code == 2 and "pickles are never fetched" in r.stderr


def test_pull_progress_counts_bytes(hub_repo):
    from surgery.checkpoint.hub import pull_files

    srv, _, _ = hub_repo
    seen = []

    class Rec:
        def start(self, total, description):
            seen.append(("start", total))

        def advance(self, n=1):
            seen.append(("advance", n))

        def close(self):
            seen.append(("close", 0))

    doc = pull_files("org/name", progress=Rec())
    assert seen[0] == ("start", doc["total_bytes"]) and seen[-1] == ("close", 0)
    assert sum(n for k, n in seen if k == "advance") == doc["total_bytes"]


@pytest.mark.parametrize("hub_repo", [False, True], indirect=True, ids=["single", "sharded"])
def test_inspect_hub_id_reads_headers_only(hub_repo, cli):
    srv, ckpt, cache = hub_repo
    r = cli("inspect", "org/name", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    local = cli("inspect", ckpt, "--json").json()
    assert doc["tensors"] == local["tensors"] and doc["num_parameters"] == local["num_parameters"]
    assert doc["shards"] == local["shards"]
    assert doc["checkpoint"] == "org/name" and doc["revision"] == COMMIT and doc["source"] == "hub"
    import struct

    for name, data in srv.files.items():
        if name.endswith(".safetensors"):
            sent = srv.sent.get(name, 0)
            header_end = 8 + struct.unpack("<Q", data[:8])[0]
            # the 8-byte length and the JSON header, fetched in at most two ranges; no tensor data
            assert 0 < sent <= max(64 * 1024, header_end) < len(data), (name, sent, header_end, len(data))
    assert all(r_[1].startswith("bytes=0-") or r_[1].startswith("bytes=") for r_ in srv.ranges)
    assert not list(cache.rglob("*.safetensors"))  # no weights in the cache either


def test_inspect_hub_header_validation_applies(hub_repo, cli):
    import struct

    srv, _, _ = hub_repo
    data = bytearray(srv.files["model.safetensors"])
    data[:8] = struct.pack("<Q", 14 * 10**9)  # a 14 GB "header"
    srv.files["model.safetensors"] = bytes(data)
    r = cli("inspect", "org/name")
    assert r.code == 3
    assert r.stderr.startswith("error: org/name/model.safetensors declares a 14000000000-byte header")
    assert len(r.stderr.strip().splitlines()) == 1
    data[:8] = struct.pack("<Q", 40)  # a header that cuts a JSON object
    srv.files["model.safetensors"] = bytes(data)
    r = cli("inspect", "org/name")
    assert r.code == 3 and "not valid JSON" in r.stderr


def test_missing_repo_is_one_line_without_offline_hint(hub_repo, cli):
    for args in (["pull", "org/missing"], ["inspect", "org/missing"]):
        r = cli(*args)
        assert r.code == 3, r.stderr
        assert r.stderr.startswith("error: ") and "org/missing" in r.stderr
        assert "HF_HUB_OFFLINE" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_range_errors_are_hub_errors(hub_repo, tmp_path):
    """A shard the repository lists but the server fails to serve: one HubError naming the file."""
    from surgery.checkpoint.hub import fetch_headers
    from surgery.core.errors import HubError

    srv, _, _ = hub_repo
    srv.broken.add("model.safetensors")
    (tmp_path / "mirror").mkdir()
    with pytest.raises(HubError, match=r"^Hub repository org/name file model.safetensors could not be read \("):
        fetch_headers("org/name", None, tmp_path / "mirror")
