"""`surgery merge` from the command line: JSON output, recipes, continual state and resume,
exit codes, and the mergekit anchor (same recipes through `mergekit-yaml`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "fixtures" / "llama-tiny"
GPT2 = ROOT / "fixtures" / "gpt2-tiny"


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


def test_ties_json_record_and_loads_in_transformers(cli, tmp_path):
    out = tmp_path / "ties"
    r = cli("merge", "-m", "ties", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b",
            "--density", "0.5", "--weight", "1.0", "--weight", "0.5", "-o", out, "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["method"] == "ties" and rep["lambda"] is None and rep["num_tensors"] == 20
    rec = rep["record"]
    assert rec["parameters"]["model_parameters"] == [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    shas = {Path(i["label"]).name: i["sha256"] for i in rec["inputs"]}
    assert shas["base"] == open_checkpoint(LLAMA / "base").sha256()
    assert [i["role"] for i in rec["inputs"]] == ["base", "model", "model"]
    meta = json.loads(open_checkpoint(out).metadata["surgery"])
    assert meta["parameters"]["method"] == "ties"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ref = open_checkpoint(out).get("model.layers.0.mlp.up_proj.weight", dtype=None)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.detach(), ref)


def test_recipe_equals_flags(cli, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"""merge_method: task_arithmetic
base_model: {LLAMA / 'base'}
models:
  - model: {LLAMA / 'base'}
  - model: {LLAMA / 'ft-a'}
    parameters: {{weight: 0.7}}
  - model: {LLAMA / 'ft-b'}
    parameters: {{weight: 0.3}}
parameters: {{lambda: 0.5}}
dtype: float32
""")
    a = cli("merge", "--config", recipe, "-o", tmp_path / "a", "--json")
    assert a.code == 0, a.stderr
    b = cli("merge", "-m", "task_arithmetic", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b",
            "-w", "0.7", "-w", "0.3", "--lambda", "0.5", "--dtype", "float32", "-o", tmp_path / "b", "--json")
    assert b.code == 0, b.stderr
    x, y = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")
    assert x.info("model.norm.weight").dtype == torch.float32
    assert all(torch.equal(x.get_raw(n), y.get_raw(n)) for n in x.names)
    assert len(a.json()["order"]) == 2           # the base listed among the models is the base


def test_opcm_state_resume_cli(cli, tmp_path):
    st = tmp_path / "state"
    one = cli("merge", "-m", "opcm", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c",
              "--dtype", "float32", "-o", tmp_path / "abc", "--json")
    assert one.code == 0, one.stderr
    r1 = cli("merge", "-m", "opcm", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "--state", st,
             "--dtype", "float32", "-o", tmp_path / "ab", "--json")
    assert r1.code == 0, r1.stderr
    r2 = cli("merge", "--resume", st, LLAMA / "ft-c", "--state", st, "--dtype", "float32", "-o", tmp_path / "abc2",
             "--json")
    assert r2.code == 0, r2.stderr
    j1, j2 = one.json(), r2.json()
    assert j2["lambda"] == pytest.approx(j1["lambda"], rel=1e-9)
    assert [s["tau_norm"] for s in j2["steps"]] == pytest.approx([s["tau_norm"] for s in j1["steps"]], rel=1e-9)
    assert [Path(p).name for p in j2["order"]] == ["ft-a", "ft-b", "ft-c"]
    a, b = open_checkpoint(tmp_path / "abc"), open_checkpoint(tmp_path / "abc2")
    assert all(torch.allclose(a.get(n), b.get(n), rtol=1e-6, atol=1e-7) for n in a.names)
    assert json.loads((st / "state.json").read_text())["count"] == 3
    human = cli("merge", "--resume", st, LLAMA / "ft-a", "-o", tmp_path / "h")
    assert human.code == 0 and "λ_t" in human.stdout and "step" in human.stdout


def test_resume_with_wrong_base_exits_3(cli, tmp_path):
    st = tmp_path / "state"
    assert cli("merge", "-m", "opcm", "--base", LLAMA / "base", LLAMA / "ft-a", "--state", st, "-o", tmp_path / "a").code == 0
    r = cli("merge", "--resume", st, "--base", LLAMA / "ft-b", LLAMA / "ft-c", "-o", tmp_path / "b")
    assert r.code == 3
    assert "is not the base of the state" in r.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, code, message", [
    (["-m", "nope", "--base", "B", "A"], 2, "unknown merge method 'nope'"),
    (["-m", "ties", str(LLAMA / "ft-a")], 2, "needs a base model"),
    (["--base", str(LLAMA / "base"), str(LLAMA / "ft-a")], 2, "choose a merge method with -m"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), str(LLAMA / "ft-b"), "-w", "1", "-w", "2",
      "-w", "3"], 2, "--weight was given 3 times for 2 model"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--alpha", "0.3"], 2,
     "does not take --alpha; it takes: weight, density, lambda, normalize, rescale, int8_mask"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--density", "-0.5"], 2,
     "--density = -0.5 is out of range; it takes (0, 1]"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--density", "1.5"], 2,
     "--density = 1.5 is out of range; it takes (0, 1]"),
    (["-m", "dare_ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--density", "0"], 2,
     "--density = 0.0 is out of range; it takes (0, 1]"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--density", "nan"], 2,
     "--density = nan is out of range"),
    (["-m", "slerp", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--t", "7"], 2,
     "--t = 7.0 is out of range; it takes [0, 1]"),
    (["-m", "task_arithmetic", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-w", "nan"], 2,
     "--weight = nan is out of range; it takes any finite number"),
    (["-m", "task_arithmetic", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--lambda", "inf"], 2,
     "--lambda = inf is out of range"),
    (["-m", "task_arithmetic", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-p", "3:weight=1"], 2,
     "the model number must be 1 to 1"),
    (["-m", "task_arithmetic", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-p", "lambda"], 2,
     "write KEY=VALUE"),
    (["-m", "task_arithmetic", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-p", "lambda=0.5",
      "--lambda", "0.3"], 2, "give it once"),
    (["-m", "opcm", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-p", "alpha=2"], 2,
     "--alpha = 2 is out of range; it takes [0, 1]"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--shuffle"], 2, "--shuffle only applies"),
    (["-m", "ties", "--base", str(LLAMA / "base"), str(GPT2 / "ft-a")], 3, "cannot merge"),
    (["-m", "ties", "--base", str(LLAMA / "base"), "/nonexistent/model"], 3, "does not exist"),
])
def test_errors_exit_codes(cli, tmp_path, args, code, message):
    r = cli("merge", *args, "-o", tmp_path / "out")
    assert r.code == code, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_recipe_errors(cli, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nmodules: {text: {}}\n")
    r = cli("merge", "--config", recipe, "-o", tmp_path / "o")
    assert r.code == 2 and "'modules' is not supported" in r.stderr
    r = cli("merge", "--config", recipe, "-m", "ties", "-o", tmp_path / "o")
    assert r.code == 2 and "drop -m" in r.stderr
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {LLAMA / 'base'}\nmodels:\n"
                      f"  - model: {LLAMA / 'ft-a'}\n    parameters: {{weight: .nan}}\n")
    r = cli("merge", "--config", recipe, "-o", tmp_path / "o")
    assert r.code == 2 and f"recipe {recipe}: model {LLAMA / 'ft-a'}: --weight = nan is out of range" in r.stderr
    recipe.write_text(f"merge_method: ties\nbase_model: {LLAMA / 'base'}\nmodels:\n"
                      f"  - model: {LLAMA / 'ft-a'}\n    parameters: {{density: [0.5, 2.0]}}\n")
    r = cli("merge", "--config", recipe, "-o", tmp_path / "o")
    assert r.code == 2 and "--density = 2.0 is out of range" in r.stderr and not (tmp_path / "o").exists()
    recipe.write_text(":\n  - [")
    r = cli("merge", "--config", recipe, "-o", tmp_path / "o")
    assert r.code == 3 and "not valid YAML" in r.stderr


def test_existing_output_refused(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    r = cli("merge", "-m", "linear", LLAMA / "ft-a", LLAMA / "ft-b", "-o", out)
    assert r.code == 2 and "--force" in r.stderr
    assert cli("merge", "-m", "linear", LLAMA / "ft-a", LLAMA / "ft-b", "-o", out, "--force").code == 0


# ---- anchor: mergekit ------------------------------------------------------------------------

from mergekit_helpers import bf16_steps as _bf16_steps  # noqa: E402  (tests/helpers)
from mergekit_helpers import mergekit_python as _mergekit_python  # noqa: E402


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {F}/ft-a\n    parameters: {{weight: 0.7}}\n"
              "  - model: {F}/ft-b\n    parameters: {{weight: [0.2, 0.5]}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {F}/base\nmodels:\n"
                       "  - model: {F}/ft-a\n    parameters: {{weight: [1.0, 0.5]}}\n"
                       "  - model: {F}/ft-b\n    parameters: {{weight: [{{filter: mlp, value: 0.2}}, {{value: 0.8}}]}}\n"
                       "parameters: {{lambda: 0.9}}\n",
    "ties": "merge_method: ties\nbase_model: {F}/base\nmodels:\n"
            "  - model: {F}/ft-a\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            "  - model: {F}/ft-b\n    parameters: {{weight: 0.6, density: 0.7}}\n",
    "slerp": "merge_method: slerp\nbase_model: {F}/ft-a\nmodels:\n  - model: {F}/ft-a\n  - model: {F}/ft-b\n"
             "parameters:\n  t: [0.1, 0.6, 0.9]\n",
}

# Outputs named *-stable run with torch.argsort replaced by a stable sort: mergekit's trim then
# breaks equal magnitudes at the threshold lowest index first, surgery's documented rule
# (torch's own CPU argsort is not stable, so which tied entries it keeps is unspecified).
MERGEKIT_DRIVER = """
import sys, torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
unstable = torch.argsort
def stable(x, dim=-1, descending=False, **kw):
    return torch.sort(x, dim=dim, descending=descending, stable=True).indices
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    torch.argsort = stable if out.endswith("-stable") else unstable
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(cfg))), out,
              options=MergeOptions(copy_tokenizer=False, quiet=True))
"""


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    """Every anchor recipe on both fixture families through mergekit, in one interpreter
    (the `mergekit-yaml` entry point runs this same run_merge)."""
    py = _mergekit_python()
    if py is None:
        pytest.skip("mergekit is not installed (pip install mergekit==0.1.5)")
    root = tmp_path_factory.mktemp("mergekit")
    args = []
    for family in ("llama-tiny", "gpt2-tiny"):
        for name, text in RECIPES.items():
            recipe = root / f"{family}-{name}.yml"
            recipe.write_text(text.format(F=ROOT / "fixtures" / family) + "dtype: float32\nout_dtype: bfloat16\n")
            args += [str(recipe), str(root / f"mk-{family}-{name}")]
            if name == "ties":
                args += [str(recipe), str(root / f"mk-{family}-{name}-stable")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([py, "-c", MERGEKIT_DRIVER, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.mark.anchor
@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_mergekit_anchor(cli, mergekit_outputs, family, name):
    """linear / task_arithmetic / ties / slerp equal mergekit's output within one bf16 step
    (mergekit computes in float32 with dtype: float32 and writes out_dtype: bfloat16); for
    ties, mergekit with a stable argsort (the same tie rule as surgery's trim)."""
    root = mergekit_outputs
    out = root / f"s-{family}-{name}"
    r = cli("merge", "--config", root / f"{family}-{name}.yml", "-o", out, "--quiet")
    assert r.code == 0, r.stderr
    suffix = "-stable" if name == "ties" else ""
    ours, theirs = open_checkpoint(out), open_checkpoint(root / f"mk-{family}-{name}{suffix}")
    assert set(ours.names) == set(theirs.names)
    for n in ours.names:
        assert ours.info(n).dtype == theirs.info(n).dtype == torch.bfloat16, n
        worst = float(_bf16_steps(ours.get(n), theirs.get(n)).max())
        assert worst <= 1.0, (n, worst)


@pytest.mark.anchor
@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
def test_ties_differs_from_plain_mergekit_only_at_threshold_ties(cli, mergekit_outputs, family):
    """Against mergekit as shipped (unstable argsort), every entry more than one bf16 step
    apart is one where some model's |τ| equals that model's trim threshold exactly."""
    root = mergekit_outputs
    out = root / f"s-{family}-ties-plain"
    r = cli("merge", "--config", root / f"{family}-ties.yml", "-o", out, "--quiet")
    assert r.code == 0, r.stderr
    ours, theirs = open_checkpoint(out), open_checkpoint(root / f"mk-{family}-ties")
    fx = ROOT / "fixtures" / family
    base = open_checkpoint(fx / "base")
    models = [(open_checkpoint(fx / "ft-a"), 0.5), (open_checkpoint(fx / "ft-b"), 0.7)]   # the recipe's densities
    differing = 0
    for n in ours.names:
        far = _bf16_steps(ours.get(n), theirs.get(n)) > 1.0
        if not far.any():
            continue
        at_tie = torch.zeros_like(far)
        for m, density in models:
            mag = (m.get(n) - base.get(n)).abs()
            k = max(1, int(density * mag.numel()))
            at_tie |= mag == mag.reshape(-1).sort(descending=True).values[k - 1]
        assert not (far & ~at_tie).any(), n
        differing += int(far.sum())
    if family == "llama-tiny":   # bf16 fine-tunes: equal magnitudes at the threshold, so the check above ran
        assert differing > 0


@pytest.mark.anchor
@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
def test_trim_ties_argsort_reproduces_stock_mergekit(cli, mergekit_outputs, family):
    """--trim-ties argsort keeps mergekit's own choice among tied magnitudes: within one bf16
    step of mergekit as shipped, on the fixtures where the default rule differs from it."""
    root = mergekit_outputs
    out = root / f"s-{family}-ties-argsort"
    r = cli("merge", "--config", root / f"{family}-ties.yml", "--trim-ties", "argsort", "-o", out, "--quiet")
    assert r.code == 0, r.stderr
    ours, theirs = open_checkpoint(out), open_checkpoint(root / f"mk-{family}-ties")
    for n in ours.names:
        assert float(_bf16_steps(ours.get(n), theirs.get(n)).max()) <= 1.0, n
    assert json.loads(open_checkpoint(out).metadata["surgery"])["parameters"]["trim_ties"] == "argsort"


def test_trim_ties_rejects_an_unknown_rule(cli, tmp_path):
    r = cli("merge", "-m", "ties", "--base", ROOT / "fixtures/llama-tiny/base", ROOT / "fixtures/llama-tiny/ft-a",
            "--trim-ties", "random", "-o", tmp_path / "o")
    assert r.code == 2 and "'index', 'argsort'" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp", "opcm", "magmax"])
def test_nonfinite_input_is_refused_unless_allowed(cli, tmp_path, method):
    """A NaN entry in a model flows into the merge: refused (exit 3, naming the input tensor that
    carried it) unless --allow-nonfinite, and then the output does hold it."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(LLAMA / "ft-a", bad)
    sd = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name][3, 5] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    args = ["merge", "-m", method, "--base", LLAMA / "base", bad]
    r = cli(*args, "-o", tmp_path / "o")
    assert r.code == 3 and name in r.stderr and str(bad) in r.stderr and not (tmp_path / "o").exists()
    r = cli(*args, "--allow-nonfinite", "-o", tmp_path / "o")
    assert r.code == 0, r.stderr
    assert not torch.isfinite(open_checkpoint(tmp_path / "o").get(name)).all()
