"""The executor layer without a Ray cluster: work units, what travels to a task (paths, never
arrays; the same bytes in every process), the run journal, the resumable run folder, the
``--ray [ADDRESS]`` flag, statistics from the engine, and that nothing imports ray unless asked."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.checkpoint.reader import open_checkpoint
from surgery.checkpoint.writer import PlacedWriter, ShardedWriter, TensorSpec
from surgery.commands.app import expand_ray
from surgery.core.engine import Computed, OutputTensor, copy_tensor, write_checkpoint
from surgery.core.errors import CheckpointNotFoundError, CorruptCheckpointError, UsageError
from surgery.core.executor import (LOCAL, Journal, RayExecutor, UnitOutcome, dumps_unit, executor_for, input_bytes,
                                   loads_unit, looks_like_address, plan_units)
from surgery.core.output import run_folder, resumable_output

ROOT = Path(__file__).resolve().parents[3]
BASE = ROOT / "fixtures" / "llama-tiny" / "base"


def _out(name: str, numel: int) -> OutputTensor:
    return OutputTensor(name, (numel,), torch.float32, compute=lambda: torch.zeros(numel))


def test_units_group_consecutive_tensors_up_to_the_byte_bound():
    plan = [_out("a", 10), _out("b", 10), _out("c", 30), _out("d", 5), _out("e", 100), _out("f", 1)]
    units = plan_units(plan, unit_bytes=160)     # float32: 40, 40, 120, 20, 400, 4 bytes
    assert [[o.name for o in u] for u in units] == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    hinted = OutputTensor("g", (4,), torch.bfloat16, compute=lambda: torch.zeros(4), input_bytes=1000)
    assert input_bytes(hinted) == 1000
    ckpt = open_checkpoint(BASE)
    assert input_bytes(copy_tensor(ckpt, ckpt.names[0])) == ckpt.info(ckpt.names[0]).nbytes


def test_a_unit_that_captured_a_tensor_is_refused():
    big = torch.ones(2048)
    with pytest.raises(TypeError, match=r"captured an array of shape \(2048,\)"):
        dumps_unit([OutputTensor("x", (2048,), torch.float32, compute=lambda: big * 2)])
    small = torch.ones(3)
    assert loads_unit(dumps_unit(lambda: small + 1))().tolist() == [2.0, 2.0, 2.0]


def test_a_checkpoint_travels_as_its_paths_and_fingerprint(tmp_path):
    ckpt = open_checkpoint(BASE)
    data = pickle.dumps(ckpt)
    assert len(data) < 1000                              # paths and a digest, no headers, no tensors
    again = pickle.loads(data)
    assert again.fingerprint() == ckpt.fingerprint() and again.names == ckpt.names
    torch.testing.assert_close(again.get(ckpt.names[0]), ckpt.get(ckpt.names[0]))

    copy = tmp_path / "c"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((BASE / "model.safetensors").read_bytes())
    data = pickle.dumps(open_checkpoint(copy))
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="storage every node mounts"):
        pickle.loads(data)
    other = ROOT / "fixtures" / "llama-tiny" / "ft-a" / "model.safetensors"
    (copy / "model.safetensors").write_bytes(other.read_bytes())
    from surgery.checkpoint import reader

    reader._REOPENED.clear()
    assert pickle.loads(data).fingerprint() == open_checkpoint(copy).fingerprint()   # same layout: accepted
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (copy / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    reader._REOPENED.clear()
    with pytest.raises(CorruptCheckpointError, match="changed since this run was planned"):
        pickle.loads(data)


_SET_DIGEST = """
import hashlib, sys
from surgery.core.executor import dumps_unit
names = {f"model.layers.{i}.mlp.weight" for i in range(50)}
print(hashlib.sha256(dumps_unit((names, frozenset(names)))).hexdigest())
"""


@pytest.mark.slow
def test_a_unit_pickles_to_the_same_bytes_whatever_the_hash_seed():
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        run = subprocess.run([sys.executable, "-c", _SET_DIGEST], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1
    names = {"b", "a", "c"}
    assert loads_unit(dumps_unit((names, frozenset(names)))) == (names, frozenset(names))


def test_journal_reads_back_entries_and_ignores_a_torn_line(tmp_path):
    j = Journal(tmp_path)
    j.record("k1", UnitOutcome({"a": "00", "b": "11"}, {"a": {"sq": 2.0}}))
    j.close()
    with open(tmp_path / ".surgery-run.jsonl", "a") as fh:
        fh.write('{"unit": "k2", "sha2')                 # a run killed mid-line
    j = Journal(tmp_path)
    assert j.expected("k1", ["b", "a"]) == {"a": "00", "b": "11"}
    assert j.expected("k1", ["a"]) is None and j.expected("k2", ["x"]) is None
    assert j.stats("k1") == {"a": {"sq": 2.0}}
    j.close()


def test_resumable_output_keeps_an_interrupted_run_and_commits_a_finished_one(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with resumable_output(out, key="a" * 64, force=False) as (folder, resumed):
            assert not resumed
            (folder / "part").write_text("1")
            raise KeyboardInterrupt
    assert run_folder(out, "a" * 64).is_dir() and not out.exists()
    with pytest.raises(UsageError, match="no interrupted run"):
        with resumable_output(out, key="b" * 64, force=False, require=True):
            pass
    assert run_folder(out, "a" * 64).is_dir()               # a refused resume removes nothing
    with resumable_output(out, key="a" * 64, force=False, require=True) as (folder, resumed):
        assert resumed and (folder / "part").read_text() == "1"
        # the same command running concurrently is refused
        with pytest.raises(UsageError, match="same command right now"):
            with resumable_output(out, key="a" * 64, force=False):
                pass
    assert (out / "part").read_text() == "1"
    assert not (out / ".surgery-run.lock").exists() and not list(tmp_path.glob(".out.surgery-run-*"))


def test_resumable_output_removes_failed_and_stale_runs(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with resumable_output(out, key="c" * 64, force=False):
            raise ValueError("a defect")
    assert not list(tmp_path.glob(".out.surgery-run-*"))
    with pytest.raises(KeyboardInterrupt):
        with resumable_output(out, key="d" * 64, force=False):
            raise KeyboardInterrupt
    with resumable_output(out, key="e" * 64, force=False) as (_, resumed):  # another command: the old run goes
        assert not resumed and not run_folder(out, "d" * 64).exists()


def test_placed_writers_fill_the_files_a_sharded_writer_sized(tmp_path):
    specs = [TensorSpec(n, (3, 4), torch.float32) for n in "abc"]
    values = {n: torch.arange(12, dtype=torch.float32).reshape(3, 4) + i for i, n in enumerate("abc")}
    (tmp_path / "direct").mkdir()
    (tmp_path / "placed").mkdir()
    direct = ShardedWriter(tmp_path / "direct", specs, 100, {"format": "pt"})
    for n, t in values.items():
        direct.write(n, t)
    direct.finish({"format": "pt"})
    driver = ShardedWriter(tmp_path / "placed", specs, 100, {"format": "pt"})
    for n in "ca":                                   # two "tasks", each with its own placements
        w = PlacedWriter(pickle.loads(pickle.dumps(driver.placements([n]))))
        w.write(n, values[n])
        w.close()
        assert w.digest(n) == hashlib.sha256(values[n].numpy().tobytes()).hexdigest()
    w = PlacedWriter(driver.placements(["b"]))
    w.write_rows("b", 1, values["b"][1:])
    w.write_rows("b", 0, values["b"][:1])
    w.close()
    driver.mark_written(["a", "b", "c"])
    driver.finish({"format": "pt"})
    for f in sorted((tmp_path / "direct").iterdir()):
        assert f.read_bytes() == (tmp_path / "placed" / f.name).read_bytes()


def test_statistics_come_back_from_compute_and_row_blocks(tmp_path, monkeypatch):
    import surgery.core.engine as engine

    monkeypatch.setattr(engine, "BLOCK_BYTES", 3 * 4 * 4)      # 3 rows of 4 float32 per block
    ckpt = open_checkpoint(BASE)
    w = torch.arange(40, dtype=torch.float32).reshape(10, 4)

    def rows(a: int, b: int) -> Computed:
        return Computed(w[a:b] * 1, {"sum": float(w[a:b].sum()), "rows": float(b - a)})

    plan = [OutputTensor("r", (10, 4), torch.float32, rows=rows),
            OutputTensor("c", (2,), torch.float32, compute=lambda: Computed(torch.ones(2), {"n": 2.0}))]
    seen = {}
    res = write_checkpoint(plan, tmp_path / "o", donor=None, operation="t", parameters={}, inputs=[ckpt],
                           extra_record=lambda stats: seen.update(stats) or {"k": 1})
    assert res.stats == {"r": {"sum": 780.0, "rows": 10.0}, "c": {"n": 2.0}} == seen
    assert res.execution is None and res.record["results"] == {"k": 1}


def test_ray_flag_takes_an_address_only_when_one_follows():
    assert expand_ray(["convert", "--ray", "src", "out"]) == ["convert", "--ray=", "src", "out"]
    assert expand_ray(["convert", "src", "out", "--ray", "10.0.0.1:6379"]) == ["convert", "src", "out",
                                                                             "--ray=10.0.0.1:6379"]
    assert expand_ray(["x", "--ray", "ray://head:10001", "--json"]) == ["x", "--ray=ray://head:10001", "--json"]
    assert expand_ray(["x", "--ray"]) == ["x", "--ray="]
    assert expand_ray(["x", "--", "--ray"]) == ["x", "--", "--ray"]
    for good in ("auto", "local", "head:6379", "[::1]:6379", "ray://h:1"):
        assert looks_like_address(good)
    for bad in ("fixtures/llama-tiny/base", "out", "model:latest", "a:b:c", "./x:1"):
        assert not looks_like_address(bad)


def test_executor_options_are_checked_before_any_work(monkeypatch):
    assert executor_for(None) is LOCAL
    with pytest.raises(UsageError, match="`resume_run` continues an interrupted `ray` run"):
        executor_for(None, resume_run=True)
    with pytest.raises(UsageError, match="use `device='cuda'`"):
        RayExecutor(device="cuda:1")
    with pytest.raises(UsageError, match="not host:port"):
        RayExecutor("somewhere")
    monkeypatch.setenv("SURGERY_RAY_ADDRESS", "head:6379")
    monkeypatch.setenv("SURGERY_RAY_UNIT_BYTES", "1MB")
    ex = executor_for("", resume_run=True)
    assert (ex.address, ex.resume, ex.unit_bytes) == ("head:6379", "require", 10**6)
    monkeypatch.setenv("SURGERY_RAY_UNIT_BYTES", "lots")
    with pytest.raises(UsageError, match="SURGERY_RAY_UNIT_BYTES"):
        RayExecutor()


_NO_RAY = """
import sys
from surgery.commands.app import main
code = main(["convert", sys.argv[1], sys.argv[2], "--dtype", "float16", "--quiet"])
assert code == 0, code
print("ray" in sys.modules)
"""


@pytest.mark.slow
def test_without_the_flag_nothing_imports_ray(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", _NO_RAY, str(BASE), str(tmp_path / "o")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
