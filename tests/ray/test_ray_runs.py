"""Ray runs (``--ray``) against plain runs on a local Ray instance (``ray.init(num_cpus=2)``):
every output byte for byte identical, a killed worker retried, an interrupted run resumed
with only its missing work units redone. Units are made tiny so the fixtures split into many."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ray = pytest.importorskip("ray")

from surgery.checkpoint.reader import open_checkpoint  # noqa: E402
from surgery.core.engine import OutputTensor, write_checkpoint  # noqa: E402
from surgery.core.errors import UsageError  # noqa: E402
from surgery.core.executor import RayExecutor  # noqa: E402

# one Ray instance at a time: every test that starts a cluster runs in the same xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
LLAMA = FIX / "llama-tiny"


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU Ray instance for this module, in its own short temp dir (Ray's socket
    paths must stay under 108 bytes), shut down and removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="sr-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING", _temp_dir=tmp)
    # test-module functions travel by value (workers cannot import this file)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def executor(**kw) -> RayExecutor:
    kw.setdefault("unit_bytes", 24 * 1024)        # many units from a tiny fixture
    return RayExecutor(**kw)


def assert_same_folder(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    for n in names_a:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_convert_cast_and_reshard(cluster, tmp_path):
    from surgery.convert import convert

    src = LLAMA / "base"
    local = convert(src, tmp_path / "local", dtype="float32", shard_size="100KB")
    remote = convert(src, tmp_path / "ray", dtype="float32", shard_size="100KB", executor=executor())
    assert_same_folder(tmp_path / "local", tmp_path / "ray")
    ex = remote.written.execution
    assert ex["kind"] == "ray" and ex["units"] > 5 and ex["resumed_units"] == 0
    assert local.written.execution is None and len(remote.written.files) > 1
    assert not list(tmp_path.glob(".ray.surgery-run-*"))        # the run folder became the output


def test_convert_pickle_reads_its_own_file_in_each_task(cluster, tmp_path):
    from surgery.convert import convert

    sd = {n: open_checkpoint(LLAMA / "ft-a").get_raw(n) for n in open_checkpoint(LLAMA / "ft-a").names}
    (tmp_path / "pt").mkdir()
    torch.save(sd, tmp_path / "pt" / "pytorch_model.bin")
    convert(tmp_path / "pt", tmp_path / "local", dtype="float16")
    convert(tmp_path / "pt", tmp_path / "ray", dtype="float16", executor=executor())
    assert_same_folder(tmp_path / "local", tmp_path / "ray")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    peft = pytest.importorskip("peft")
    from adapter_helpers import LLAMA as LLAMA_BASE
    from adapter_helpers import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    dora = make_adapter(LLAMA_BASE, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                    use_dora=True, init_lora_weights=False), root / "dora", seed=3)
    vera = make_adapter(LLAMA_BASE, peft.VeraConfig(r=4, target_modules=["q_proj", "k_proj", "up_proj"],
                                                    save_projection=False, projection_prng_key=7, init_weights=False),
                        root / "vera", seed=4)
    return LLAMA_BASE, dora, vera


def test_fuse_two_weighted_adapters(cluster, tmp_path, adapters):
    from surgery.fuse import fuse

    base, dora, vera = adapters
    specs = [f"{dora}:0.7", f"{vera}:0.3"]
    fuse(base, specs, tmp_path / "local", dtype="bfloat16")
    r = fuse(base, specs, tmp_path / "ray", dtype="bfloat16", executor=executor())
    assert_same_folder(tmp_path / "local", tmp_path / "ray")
    assert r.report["tensors_changed"] and r.written.execution["units"] > 3


@pytest.mark.parametrize("init", ["tile", "gram"])
def test_grow(cluster, tmp_path, init):
    from surgery.grow import grow

    src = FIX / "tokenformer-tiny"
    grow(src, tmp_path / "local", factor=2, init=init, verify=False)
    grow(src, tmp_path / "ray", factor=2, init=init, verify=False, executor=executor())
    assert_same_folder(tmp_path / "local", tmp_path / "ray")


def test_analyze_and_check_reports(cluster):
    from surgery.analyze import gain, spectrum
    from surgery.check import check

    ex = executor()
    a = spectrum(str(LLAMA / "ft-a"), base=str(LLAMA / "base"), keep_spectra=True)
    b = spectrum(str(LLAMA / "ft-a"), base=str(LLAMA / "base"), keep_spectra=True, executor=ex)
    assert json.dumps(a.report, sort_keys=True) == json.dumps(b.report, sort_keys=True)
    a = gain(str(FIX / "llama-wide" / "base"), vs=str(LLAMA / "base"), tolerance=0.15)
    b = gain(str(FIX / "llama-wide" / "base"), vs=str(LLAMA / "base"), tolerance=0.15, executor=ex)
    assert json.dumps(a.report, sort_keys=True) == json.dumps(b.report, sort_keys=True) and a.report["pairs"]
    a = check(LLAMA / "ft-a", against=LLAMA / "base", atol=1e-3)
    b = check(LLAMA / "ft-a", against=LLAMA / "base", atol=1e-3, executor=ex)
    assert a.report == b.report and not a.passed and a.report["checks"][1]["failures"]


# ---- faults -------------------------------------------------------------------------------------

def _doubled(ckpt, name: str) -> torch.Tensor:
    return ckpt.get(name) * 2


def _doubled_or_die(ckpt, name: str, victim: str, marker: str) -> torch.Tensor:
    """Kills its own worker (SIGKILL, mid-unit: earlier tensors of the unit are written) the
    first time it reaches ``victim``."""
    if name == victim and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return ckpt.get(name) * 2


def _doubled_logged(ckpt, name: str, log: str) -> torch.Tensor:
    """Appends ``RUN name`` to ``log``, RUN read from ``log + '.run'`` when called."""
    run = Path(log + ".run").read_text()
    with open(log, "a") as fh:
        fh.write(f"{run} {name}\n")
    return ckpt.get(name) * 2


def _plan(fn, *args):
    ckpt = open_checkpoint(LLAMA / "base")
    plan = [OutputTensor(n, ckpt.info(n).shape, torch.float32, compute=functools.partial(fn, ckpt, n, *args))
            for n in ckpt.names]
    return ckpt, plan


def _write(plan, ckpt, out, **kw):
    return write_checkpoint(plan, out, donor=ckpt, operation="double", parameters={"factor": 2}, inputs=[ckpt],
                            shard_size="60KB", **kw)


def test_killed_worker_is_retried_and_the_output_is_identical(cluster, tmp_path):
    ckpt, plan = _plan(_doubled)
    _write(plan, ckpt, tmp_path / "local")
    victim = ckpt.names[len(ckpt.names) // 2]
    marker = tmp_path / "killed"
    ckpt, plan = _plan(_doubled_or_die, victim, str(marker))
    r = _write(plan, ckpt, tmp_path / "ray", executor=executor())
    assert marker.exists()                      # a worker really died mid-run
    assert_same_folder(tmp_path / "local", tmp_path / "ray")
    assert r.execution["units"] > 3


class _StopAfter:
    """A Progress that interrupts the run (as Ctrl-C would) after ``n`` finished units."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


def test_interrupted_run_resumes_only_the_missing_units(cluster, tmp_path):
    ckpt, plan = _plan(_doubled)
    _write(plan, ckpt, tmp_path / "local")
    log = tmp_path / "computed.log"
    Path(str(log) + ".run").write_text("1")
    ckpt, plan = _plan(_doubled_logged, str(log))
    ex = executor(max_in_flight=2)
    with pytest.raises(KeyboardInterrupt):
        _write(plan, ckpt, tmp_path / "out", executor=ex, progress=_StopAfter(4))
    assert not (tmp_path / "out").exists()
    (run_dir,) = tmp_path.glob(".out.surgery-run-*")
    journal = [json.loads(x) for x in (run_dir / ".surgery-run.jsonl").read_text().splitlines()]
    assert len(journal) == 4
    kept = {n for e in journal for n in e["sha256"]}
    # damage one kept unit's bytes: its digest no longer matches, so it is redone too
    damaged = sorted(journal[0]["sha256"])[0]
    from surgery.checkpoint.format import parse_header

    part = next(h.tensors[damaged] for h in map(parse_header, sorted(run_dir.glob("*.safetensors")))
                if damaged in h.tensors)
    with open(part.file, "r+b") as fh:
        fh.seek(part.offset)
        fh.write(b"\xff\xff\xff\xff")
    redo_expected = set(journal[0]["sha256"])

    Path(str(log) + ".run").write_text("2")
    r = _write(plan, ckpt, tmp_path / "out", executor=ex)
    assert_same_folder(tmp_path / "local", tmp_path / "out")
    ex_info = r.execution
    assert ex_info["resumed_units"] == 3
    second = {line.split()[1] for line in log.read_text().splitlines() if line.startswith("2 ")}
    assert second == (set(ckpt.names) - kept) | redo_expected
    assert not list(tmp_path.glob(".out.surgery-run-*"))


def test_resume_run_without_an_interrupted_run_is_refused(cluster, tmp_path):
    ckpt, plan = _plan(_doubled)
    with pytest.raises(UsageError, match="no interrupted run"):
        _write(plan, ckpt, tmp_path / "out", executor=executor(resume="require"))
    assert not list(tmp_path.glob(".out.surgery-run-*"))


def test_cli_ray_flag(cluster, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_RAY_UNIT_BYTES", "30KB")
    r = cli("convert", "--ray", LLAMA / "base", tmp_path / "ray", "--dtype", "float16", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["execution"]["kind"] == "ray" and doc["execution"]["units"] > 3
    # each unit's tensors are reported under its largest tensor: together, every output tensor once
    members = doc["execution"]["unit_tensors"]
    assert sorted(members) == sorted(doc["execution"]["unit_seconds"]) and len(members) == doc["execution"]["units"]
    assert all(key in names for key, names in members.items())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ray" / "model.safetensors"), "pt") as fh:
        assert sorted(n for names in members.values() for n in names) == sorted(fh.keys())
    assert cli("convert", LLAMA / "base", tmp_path / "local", "--dtype", "float16").code == 0
    assert_same_folder(tmp_path / "local", tmp_path / "ray")
    r = cli("analyze", "gain", LLAMA / "base", "--json", "--ray")
    assert r.code == 0, r.stderr
    assert r.json()["tensors"]


_INTERRUPTED_FUSE = """
import sys
from surgery.core.executor import RayExecutor
from surgery.fuse import fuse

class StopAfter:
    seen = 0
    def start(self, total, description): pass
    def advance(self, n=1):
        self.seen += 1
        if self.seen == 3:
            raise KeyboardInterrupt
    def close(self): pass

base, out, address, *adapters = sys.argv[1:]
try:
    fuse(base, adapters, out, dtype="bfloat16", progress=StopAfter(), executor=RayExecutor(address))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_new_process_resumes_what_another_left(cluster, tmp_path, adapters):
    """The unit keys (digests of the pickled units) are the same in every process, whatever its
    string hash seed, so a rerun of the command in a new process finds the finished units."""
    import subprocess

    from surgery.fuse import fuse

    base, dora, vera = adapters
    specs = [f"{dora}:0.7", f"{vera}:0.3"]
    fuse(base, specs, tmp_path / "local", dtype="bfloat16")
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(ROOT), SURGERY_RAY_UNIT_BYTES="24KB", PYTHONHASHSEED="1")
    first = subprocess.run([sys.executable, "-c", _INTERRUPTED_FUSE, str(base), str(tmp_path / "out"), address, *specs],
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 130, first.stderr[-2000:]
    assert list(tmp_path.glob(".out.surgery-run-*")) and not (tmp_path / "out").exists()
    env["PYTHONHASHSEED"] = "2"
    second = subprocess.run([sys.executable, "-m", "surgery.commands.app", "fuse", str(base), *specs, "-o",
                             str(tmp_path / "out"), "--dtype", "bfloat16", "--json", "--ray", address, "--resume-run"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["execution"]["resumed_units"] == 3
    assert_same_folder(tmp_path / "local", tmp_path / "out")


# ---- merge --------------------------------------------------------------------------------------

def _merge(method: str, models: list[str], out: Path, *, executor=None, state=None, resume=None, **params):
    from surgery.merge import MergeOptions, MergeRequest, ModelEntry, merge

    request = MergeRequest(method if resume is None else "", str(LLAMA / "base") if resume is None else None,
                           [ModelEntry(str(LLAMA / m), {}) for m in models], params)
    options = MergeOptions(seed=3, state_dir=state, resume_dir=resume)
    return merge(request, out, options=options, executor=executor)


def _twice(tmp_path: Path, run: Callable[[Any], Any], names: tuple[str, ...] = ("out",)) -> tuple[Any, Any]:
    """Run once plainly and once on Ray with the same paths (records name them), keeping the plain
    run's folders as NAME-local; returns both results."""
    local = run(None)
    for n in names:
        (tmp_path / n).rename(tmp_path / f"{n}-local")
    remote = run(executor())
    for n in names:
        assert_same_folder(tmp_path / f"{n}-local", tmp_path / n)
    return local, remote


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.6}),
                                           ("slerp", {"t": 0.3}), ("della", {"density": 0.6, "epsilon": 0.1}),
                                           ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05}),
                                           ("model_stock", {}), ("karcher", {}), ("sce", {"select_topk": 0.5}),
                                           ("tsv", {}), ("iso_cts", {})])
def test_batch_merges(cluster, tmp_path, method, params):
    models = ["ft-a"] if method == "slerp" else ["ft-a", "ft-b", "ft-c"]
    local, remote = _twice(tmp_path, lambda ex: _merge(method, models, tmp_path / "out", executor=ex, **params))
    assert remote.written.execution["units"] > 3


def test_opcm_with_a_state_then_resumed_with_one_more_model(cluster, tmp_path):
    state, state2 = tmp_path / "state", tmp_path / "state2"
    local, remote = _twice(tmp_path, lambda ex: _merge("opcm", ["ft-a", "ft-b"], tmp_path / "out", executor=ex,
                                                       state=state), ("out", "state"))
    assert remote.report["lambda"] == local.report["lambda"] and remote.report["steps"] == local.report["steps"]
    shutil.rmtree(tmp_path / "state-local")
    (tmp_path / "state").rename(tmp_path / "state-first")

    def resumed(ex):
        shutil.copytree(tmp_path / "state-first", state)
        try:
            return _merge("opcm", ["ft-c"], tmp_path / "out2", executor=ex, state=state2, resume=state)
        finally:
            shutil.rmtree(state)

    local, remote = _twice(tmp_path, resumed, ("out2", "state2"))
    assert [s["step"] for s in remote.report["steps"]] == [1, 2, 3]
    assert not list(tmp_path.glob(".*surgery-steps-*")) and not list(tmp_path.glob(".*surgery-run-*"))


@pytest.mark.parametrize("method,models", [("opcm", ["ft-a"]), ("continual_task_arithmetic", ["ft-a", "ft-b"]),
                                           ("magmax", ["ft-b", "ft-c"]), ("dop", ["ft-a", "ft-b"])])
def test_continual_single_pass_methods_with_a_state(cluster, tmp_path, method, models):
    """The paths where S_T is computed in the output pass (a fresh first model, folded models):
    on Ray it is materialised first so the state can be copied."""
    local, remote = _twice(tmp_path, lambda ex: _merge(method, models, tmp_path / "out", executor=ex,
                                                       state=tmp_path / "state"), ("out", "state"))
    assert remote.report["steps"] == local.report["steps"]
    _twice(tmp_path, lambda ex: _merge(method, models, tmp_path / "plain", executor=ex), ("plain",))


def test_an_interrupted_opcm_resumes_at_its_last_step(cluster, tmp_path, monkeypatch):
    from surgery.merge import remote

    models = ["ft-a", "ft-b", "ft-c"]                       # passes for steps 2 and 3, then the output
    _merge("opcm", models, tmp_path / "local")
    ran: list[tuple[str, int]] = []
    real = remote.RemoteStepRunner._run_plan

    def counting(self, folder, plan, description):
        stats = real(self, folder, plan, description)
        journal = [json.loads(x) for x in (folder / ".surgery-run.jsonl").read_text().splitlines()]
        ran.append((folder.name, len(journal)))
        return stats

    monkeypatch.setattr(remote.RemoteStepRunner, "_run_plan", counting)
    ex = executor(max_in_flight=1)
    from surgery.core.executor import plan_units

    n_units = len(plan_units(sorted(_opcm_like_plan(), key=lambda o: o.name), ex.unit_bytes))
    with pytest.raises(KeyboardInterrupt):
        from surgery.merge import MergeOptions, MergeRequest, ModelEntry, merge

        request = MergeRequest("opcm", str(LLAMA / "base"), [ModelEntry(str(LLAMA / m), {}) for m in models], {})
        merge(request, tmp_path / "out", options=MergeOptions(seed=3), executor=ex, progress=_StopAfter(n_units + 2))
    (root,) = tmp_path.glob(".out.surgery-steps-*")
    assert json.loads((root / "steps.json").read_text()).keys() == {"2"}
    assert len((root / "step-3" / ".surgery-run.jsonl").read_text().splitlines()) == 2
    ran.clear()
    _merge("opcm", models, tmp_path / "out", executor=ex)
    assert [name for name, _ in ran] == ["step-3"]            # step 2 was not run again
    assert_same_folder(tmp_path / "local", tmp_path / "out")
    assert not list(tmp_path.glob(".out.surgery-*"))


def _opcm_like_plan():
    """One float32 entry per floating base tensor: the units of one OPCM pass."""
    ckpt = open_checkpoint(LLAMA / "base")
    return [OutputTensor(n, ckpt.info(n).shape, torch.float32, compute=lambda: None,
                         input_bytes=ckpt.info(n).nbytes * 5) for n in ckpt.names if ckpt.info(n).dtype.is_floating_point]


def test_cli_merge_with_ray(cluster, cli, tmp_path):
    args = ["merge", "-m", "ties", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "-p", "density=0.4",
            "-o", tmp_path / "out", "--json"]
    assert cli(*args).code == 0
    (tmp_path / "out").rename(tmp_path / "out-local")
    r = cli(*args, "--ray")
    assert r.code == 0, r.stderr
    assert r.json()["execution"]["kind"] == "ray"
    assert_same_folder(tmp_path / "out-local", tmp_path / "out")


# ---- recipes ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory):
    """llama-tiny variants with different vocabularies, and a LoRA on ft-a."""
    peft = pytest.importorskip("peft")
    from adapter_helpers import make_adapter
    from make_vocab_variants import build

    root = tmp_path_factory.mktemp("recipes")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return {"vocab": build(root / "vocab"), "lora": make_adapter(LLAMA / "ft-a", cfg, root / "lora", seed=3)}


RECIPES = {
    "slices": """merge_method: linear
slices:
  - sources:
      - {{model: {L}/ft-a, layer_range: [0, 1], parameters: {{weight: 3.0}}}}
      - {{model: {L}/ft-b, layer_range: [1, 2]}}
    parameters: {{weight: 2.0}}
  - sources:
      - {{model: {L}/ft-a, layer_range: [1, 2]}}
      - {{model: {L}/ft-b, layer_range: [0, 1], parameters: {{weight: [{{filter: layers.0.mlp, value: 5.0}}, {{value: [0.0, 4.0]}}]}}}}
parameters: {{weight: 1.0, normalize: true}}
""",
    "tokenizer-union": """merge_method: ties
base_model: {V}/base
models:
  - model: {V}/base
  - model: {V}/chatml
    parameters: {{weight: 0.7, density: 0.6}}
parameters: {{density: 0.5}}
tokenizer_source: union
""",
    "model+lora": """merge_method: task_arithmetic
base_model: {L}/base
models:
  - model: {L}/ft-a+{A}
    parameters: {{weight: 0.5}}
  - model: {L}/ft-b
    parameters: {{weight: 0.5}}
""",
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_recipes(cluster, cli, tmp_path, recipe_inputs, case):
    text = RECIPES[case].format(L=LLAMA, V=recipe_inputs["vocab"]["base"].parent, A=recipe_inputs["lora"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    r = cli("merge", recipe, tmp_path / "out", "--json", "--quiet")
    assert r.code == 0, r.stderr
    (tmp_path / "out").rename(tmp_path / "out-local")
    os.environ["SURGERY_RAY_UNIT_BYTES"] = "24KB"
    try:
        r = cli("merge", recipe, tmp_path / "out", "--json", "--quiet", "--ray")
    finally:
        del os.environ["SURGERY_RAY_UNIT_BYTES"]
    assert r.code == 0, r.stderr
    assert r.json()["execution"]["units"] > 3
    assert_same_folder(tmp_path / "out-local", tmp_path / "out")
