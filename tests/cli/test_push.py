"""`surgery push` and `--push-to-hub` against a loopback HTTP server that answers the
endpoints huggingface_hub calls for create_repo + create_branch + upload_folder (create repo,
branch, preupload, LFS batch + PUT for the safetensors files, commit). The real client code runs
in a subprocess with ``HF_ENDPOINT`` pointed at the server; no network is used.

The server keeps every file it receives (regular files from the base64 commit payload, LFS
files from their PUT, checked against their sha256 oid) so the tests can compare bytes with
the local folder. It serves one test at a time and shuts itself down after ``DEADLINE_S``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

TOKEN = "hf_LoopbackSecretToken0123456789"
DEADLINE_S = 120


class FakeHub:
    """State of the fake Hub: repos, branches, received requests and committed files."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.errors: list[str] = []
        self.readmes: list[str] = []
        self.fail_commit = False
        self.lock = threading.Lock()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, obj=None) -> None:
            data = json.dumps(obj if obj is not None else {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path))
                if self.headers.get("Authorization"):
                    hub.auth.add(self.headers["Authorization"])

        def do_PUT(self):  # noqa: N802 - LFS "basic" transfer upload
            self._record()
            body = self._body()
            oid = self.path.rsplit("/", 1)[-1]
            if not self.path.startswith("/lfs-upload/") or hashlib.sha256(body).hexdigest() != oid:
                hub.errors.append(f"bad LFS upload {self.path}")
                return self._send(400, {"error": "sha256 mismatch"})
            hub.lfs[oid] = body
            self._send(200)

        def do_GET(self):  # noqa: N802
            self._record()
            if self.path.startswith("/api/agent-harnesses"):  # user-agent registry; optional
                return self._send(404, {"error": "not served"})
            hub.errors.append(f"unexpected GET {self.path}")
            self._send(404, {"error": "not served"})

        def do_POST(self):  # noqa: N802
            self._record()
            body = self._body()
            path = self.path.split("?", 1)[0]
            host = f"http://{self.headers['Host']}"
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                hub.repos.setdefault(repo_id, {"visibility": req.get("visibility"), "branches": {"main"}, "files": {}})
                return self._send(200, {"url": f"{host}/{repo_id}", "name": repo_id, "id": repo_id})
            if path == "/api/validate-yaml":  # upload_folder checks a README's front matter first
                content = json.loads(body)["content"]
                hub.readmes.append(content)
                try:
                    meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    ok = isinstance(meta, dict)
                except yaml.YAMLError:
                    ok = False
                return self._send(200 if ok else 400,
                                  {"errors": [] if ok else [{"message": "invalid YAML front matter"}], "warnings": []})
            if path.endswith(".git/info/lfs/objects/batch"):
                req = json.loads(body)
                objs = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{host}/lfs-upload/{o['oid']}"}}} for o in req["objects"]]
                return self._send(200, {"transfer": "basic", "objects": objs})
            parts = path.split("/")  # /api/models/<org>/<name>/<verb>/<revision...>
            if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                repo_id, verb, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._send(404, {"error": f"Repository {repo_id} not found"})
                if verb == "branch":
                    repo["branches"].add(rev)
                    return self._send(200)
                if verb == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                              "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                             for f in files]
                    return self._send(200, {"files": modes, "commitOid": "0" * 40})
                if verb == "commit" and hub.fail_commit:
                    return self._send(403, {"error": "You don't have the rights to create a commit here"})
                if verb == "commit":
                    if rev not in repo["branches"]:
                        return self._send(404, {"error": f"Revision {rev} not found"})
                    lines = [json.loads(x) for x in body.splitlines() if x.strip()]
                    files = {}
                    for line in lines[1:]:
                        v = line["value"]
                        if line["key"] == "file":
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif line["key"] == "lfsFile":
                            if v["oid"] not in hub.lfs or len(hub.lfs[v["oid"]]) != v["size"]:
                                return self._send(400, {"error": f"LFS object for {v['path']} missing"})
                            files[v["path"]] = hub.lfs[v["oid"]]
                        else:
                            hub.errors.append(f"unexpected commit op {line['key']}")
                    oid = hashlib.sha1(body).hexdigest()
                    pr = "create_pr=1" in self.path.split("?", 1)[-1]
                    hub.commits.append({"repo": repo_id, "revision": rev, "header": lines[0]["value"],
                                        "files": files, "oid": oid, "pr": pr})
                    if not pr:  # a pull request leaves the branch as it was
                        repo["files"].update(files)
                    return self._send(200, {"commitUrl": f"{host}/{repo_id}/commit/{oid}", "commitOid": oid,
                                            "pullRequestUrl": f"{host}/{repo_id}/discussions/1" if pr else None})
            hub.errors.append(f"unexpected POST {self.path}")
            self._send(404, {"error": "not served"})

    return Handler


@pytest.fixture
def fake_hub():
    """A FakeHub served on 127.0.0.1 (random port); yields (hub, endpoint). Stops itself."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    stopper = threading.Timer(DEADLINE_S, server.shutdown)  # bounded even if a test hangs
    stopper.daemon = True
    stopper.start()
    try:
        yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _surgery(endpoint: str, *args, tmp_home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
               NO_PROXY="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "surgery.commands.app", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=DEADLINE_S)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def _assert_no_token(r: subprocess.CompletedProcess) -> None:
    assert TOKEN not in r.stdout and TOKEN not in r.stderr
    assert TOKEN[3:15] not in r.stdout + r.stderr


@pytest.mark.slow
def test_push_uploads_every_file_in_one_commit(fake_hub, fixtures_dir, tmp_path):
    hub, endpoint = fake_hub
    folder = fixtures_dir / "llama-tiny" / "base"
    r = _surgery(endpoint, "push", folder, "org/pushed", "--private", "--json", tmp_home=tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    _assert_no_token(r)
    assert hub.errors == []
    out = json.loads(r.stdout)
    assert out["repo_id"] == "org/pushed" and out["revision"] is None
    assert out["commit_url"].startswith(f"{endpoint}/org/pushed/commit/")
    assert hub.repos["org/pushed"]["visibility"] == "private"
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "main"
    assert hub.commits[0]["files"] == _folder_bytes(folder)  # every file, byte for byte
    assert hub.lfs  # the safetensors file went through the LFS batch + PUT path
    assert hub.auth == {f"Bearer {TOKEN}"}  # the token went to the server only


@pytest.fixture
def inproc_hub(fake_hub, monkeypatch):
    """The same server, for in-process runs: patch huggingface_hub's import-time constants."""
    from huggingface_hub import constants

    hub, endpoint = fake_hub
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return hub, endpoint


def _assert_no_token_inproc(r, capfd) -> None:
    captured = capfd.readouterr()
    for text in (r.stdout, r.stderr, captured.out, captured.err):
        assert TOKEN not in text and TOKEN[3:15] not in text


def test_push_to_branch(inproc_hub, cli, capfd, fixtures_dir):
    hub, endpoint = inproc_hub
    folder = fixtures_dir / "gpt2-tiny" / "ft-a"
    r = cli("push", folder, "org/b", "--revision", "exp-1", "-m", "try 1", "--json")
    assert r.code == 0, r.stderr
    _assert_no_token_inproc(r, capfd)
    assert hub.errors == []
    assert r.json()["revision"] == "exp-1"
    assert ("POST", "/api/models/org/b/branch/exp-1") in hub.requests
    (commit,) = hub.commits
    assert commit["revision"] == "exp-1" and commit["header"]["summary"] == "try 1"
    assert commit["files"] == _folder_bytes(folder)
    # no --private: visibility left to the Hub (the organisation's default), not forced public
    assert hub.repos["org/b"]["visibility"] is None
    assert hub.auth == {f"Bearer {TOKEN}"}


def test_convert_push_to_hub_uploads_the_output(inproc_hub, cli, capfd, fixtures_dir, tmp_path):
    hub, endpoint = inproc_hub
    out = tmp_path / "out"
    r = cli("convert", fixtures_dir / "gpt2-tiny" / "base", out, "--dtype", "bfloat16",
            "--push-to-hub", "org/converted", "--json", "--quiet")
    assert r.code == 0, r.stderr
    _assert_no_token_inproc(r, capfd)
    assert hub.errors == []
    summary = r.json()
    assert summary["pushed"].startswith(f"{endpoint}/org/converted/commit/")
    (commit,) = hub.commits
    sent = commit["files"]
    assert sent == _folder_bytes(out)
    assert {"model.safetensors", "config.json", "README.md"} <= set(sent)
    assert set(hub.readmes) == {sent["README.md"].decode()}  # the model card's front matter was validated


def test_push_library_call_returns_commit_url(inproc_hub, fixtures_dir):
    from surgery.checkpoint.hub import push

    hub, endpoint = inproc_hub
    url = push(fixtures_dir / "bert-tiny" / "base", "org/lib", commit_message="m")
    (commit,) = hub.commits
    assert url == f"{endpoint}/org/lib/commit/{commit['oid']}"
    assert commit["header"]["summary"] == "m"
    assert commit["files"] == _folder_bytes(fixtures_dir / "bert-tiny" / "base")


def test_push_refuses_a_folder_that_is_not_a_checkpoint(inproc_hub, cli, tmp_path):
    hub, _ = inproc_hub
    (tmp_path / "empty").mkdir()
    r = cli("push", tmp_path / "empty", "org/x")
    assert r.code == 3
    assert "empty" in r.stderr
    assert hub.requests == []  # refused before any request


def test_push_library_refuses_a_file(tmp_path):
    from surgery.checkpoint.hub import push
    from surgery.core.errors import UsageError

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UsageError) as exc:
        push(f, "org/x")
    assert exc.value.exit_code == 2
    assert str(exc.value) == f"{f} is not a folder; push uploads a checkpoint folder."


def test_push_unreachable_hub_is_hub_error_without_token(inproc_hub, cli, capfd, fixtures_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # connection refused
    r = cli("push", fixtures_dir / "llama-tiny" / "base", "org/ok")
    assert r.code == 3
    _assert_no_token_inproc(r, capfd)
    assert r.stderr.startswith(f"error: pushing {fixtures_dir / 'llama-tiny' / 'base'} to org/ok failed (")


def test_push_server_error_is_hub_error(inproc_hub, cli, capfd, fixtures_dir):
    hub, _ = inproc_hub
    hub.fail_commit = True
    r = cli("push", fixtures_dir / "llama-tiny" / "base", "org/denied")
    assert r.code == 3
    _assert_no_token_inproc(r, capfd)
    assert "to org/denied failed (HfHubHTTPError" in r.stderr
    assert hub.commits == []


@pytest.mark.slow
def test_push_include_exclude_and_create_pr(inproc_hub, cli, capfd, fixtures_dir):
    hub, endpoint = inproc_hub
    folder = fixtures_dir / "llama-tiny" / "base"
    r = cli("push", folder, "org/pr", "--create-pr", "--exclude", "tokenizer*", "--json")
    assert r.code == 0, r.stderr
    _assert_no_token_inproc(r, capfd)
    assert hub.errors == []
    doc = r.json()
    assert doc["create_pr"] is True and doc["commit_url"] == f"{endpoint}/org/pr/discussions/1"
    (commit,) = hub.commits
    assert commit["pr"] is True and commit["revision"] == "main"
    want = {k: v for k, v in _folder_bytes(folder).items() if not k.startswith("tokenizer")}
    assert commit["files"] == want and want
    assert hub.repos["org/pr"]["files"] == {}  # the branch itself is untouched
    assert not any(p.endswith("/branch/main") for _, p in hub.requests)
    r = cli("push", folder, "org/pr", "--include", "*.json", "--revision", "dev", "--json")
    assert r.code == 0, r.stderr
    assert set(hub.commits[-1]["files"]) == {k for k in _folder_bytes(folder) if k.endswith(".json")}
    assert hub.commits[-1]["revision"] == "dev" and hub.commits[-1]["pr"] is False


@pytest.mark.slow
def test_failed_push_after_write_says_output_is_on_disk(inproc_hub, cli, capfd, fixtures_dir, tmp_path):
    hub, _ = inproc_hub
    hub.fail_commit = True
    out = tmp_path / "out"
    r = cli("convert", fixtures_dir / "gpt2-tiny" / "base", "-o", out, "--push-to-hub", "org/denied", "--private",
            "--quiet")
    assert r.code == 3
    _assert_no_token_inproc(r, capfd)
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: wrote {out}, but pushing {out} to org/denied failed (")
    assert line.endswith(f"the output is on disk: push it again with `surgery push {out} org/denied --private`.")
    assert (out / "model.safetensors").is_file()  # the local result stays
