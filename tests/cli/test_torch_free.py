"""Commands that do no tensor math never import torch (a 1-3 s import): inspect (safetensors
and GGUF), check --sha256 and the integrity check, push, pull, --version. Each runs in a fresh
interpreter, the way a user runs it, and reports which heavy modules it loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # loopback Hub round trips / fresh interpreters

PROBE = ("import sys, json; from surgery.commands.app import main; code = main(sys.argv[1:]); "
         "sys.stderr.write('\\nMODULES ' + json.dumps(sorted(m for m in ('torch', 'transformers', 'numpy') "
         "if m in sys.modules)) + '\\n'); sys.exit(code)")


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    line = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return r.returncode, set(json.loads(line.split(" ", 1)[1])), r


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, fixtures_dir):
    from surgery.checkpoint.reader import hash_file

    p = tmp_path_factory.mktemp("m") / "SHA256SUMS"
    f = fixtures_dir / "llama-tiny" / "base" / "model.safetensors"
    p.write_text(f"{hash_file(f)}  model.safetensors\n")
    return p


def test_inspect_and_version_import_no_torch(fixtures_dir):
    for args in (["inspect", fixtures_dir / "llama-tiny" / "base", "--json"], ["--version"]):
        code, mods, r = _run(*args)
        assert code == 0, r.stderr
        assert "torch" not in mods and "transformers" not in mods, (args, mods)


def test_inspect_gguf_imports_no_torch_or_numpy(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(np.ones((4, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, mods, r = _run("inspect", path, "--json")
    assert code == 0, r.stderr
    assert mods == set(), mods


def test_check_sha256_and_integrity_import_no_torch(fixtures_dir, manifest):
    code, mods, r = _run("check", fixtures_dir / "llama-tiny" / "base", "--sha256", manifest, "--json")
    assert code == 0, r.stderr
    assert "torch" not in mods, mods
    doc = json.loads(r.stdout)
    assert [c["name"] for c in doc["checks"]] == ["integrity", "sha256"] and doc["passed"]


def test_push_imports_no_torch(fixtures_dir):
    code, mods, r = _run("push", fixtures_dir / "llama-tiny" / "base", "org/x", env_extra={"HF_TOKEN": "hf_x"})
    assert code == 3  # nothing listens on the endpoint
    assert "torch" not in mods, mods


def test_pull_imports_no_torch(tmp_path):
    code, mods, r = _run("pull", "org/not-cached", env_extra={"HF_HOME": str(tmp_path)})
    assert code == 3 and "HF_HUB_OFFLINE is set" in r.stderr
    assert "torch" not in mods, mods
