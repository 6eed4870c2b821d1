"""Two Ray nodes on one machine (``ray start --head`` and a second ``ray start --address``,
each with its own CPU), driven by the command line: the work spreads over both nodes and the
output is byte for byte the plain command's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
# one Ray instance at a time: every test that starts a cluster runs in the same xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "fixtures" / "llama-tiny" / "base"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` we started (it takes its node's processes down with it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
for _ in range(120):
    if len([n for n in ray.nodes() if n["Alive"]]) >= 2:
        print("ready"); break
    time.sleep(0.5)
"""


@pytest.fixture(scope="module")
def two_nodes():
    tmp = tempfile.mkdtemp(prefix="sr-", dir="/tmp")       # Ray's socket paths must stay short
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    procs = [subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
                               f"--temp-dir={tmp}", *common], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)
        procs.append(subprocess.Popen(["ray", "start", f"--address=127.0.0.1:{port}", *common], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ready = subprocess.run([sys.executable, "-c", _NODES, f"127.0.0.1:{port}"], env=env, capture_output=True,
                               text=True, timeout=240)
        assert "ready" in ready.stdout, ready.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_job_spreads_over_both_nodes(two_nodes, tmp_path):
    address, env = two_nodes
    env = dict(env, SURGERY_RAY_UNIT_BYTES="20KB")
    cmd = [sys.executable, "-m", "surgery.commands.app", "convert", str(BASE), str(tmp_path / "ray"),
           "--dtype", "float32", "--shard-size", "100KB", "--json", "--ray", address]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    execution = json.loads(run.stdout)["execution"]
    assert len(execution["nodes"]) == 2 and all(n > 0 for n in execution["nodes"].values())
    assert sum(execution["nodes"].values()) == execution["units"] and execution["threads_per_task"] == 1
    plain = subprocess.run([sys.executable, "-m", "surgery.commands.app", "convert", str(BASE), str(tmp_path / "plain"),
                            "--dtype", "float32", "--shard-size", "100KB"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    for f in sorted((tmp_path / "plain").iterdir()):
        assert f.read_bytes() == (tmp_path / "ray" / f.name).read_bytes(), f.name
