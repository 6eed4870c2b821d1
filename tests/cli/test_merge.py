"""`surgery merge` from the command line: JSON output, recipes, continual state and resume,
exit codes, and the mergekit anchor (same recipes through `mergekit-yaml`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint

from mergekit_helpers import bf16_steps, mergekit_python, run_mergekit  # tests/helpers (on sys.path)

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

def _run_mergekit(runs: list[tuple[Path, Path]]) -> None:
    """Every (recipe, output) pair through mergekit's run_merge in one interpreter (what the
    `mergekit-yaml` entry point runs; outputs named *-stable with stable sorts, see
    tests/helpers/mergekit_helpers.py); skips the test when mergekit is not installed."""
    py = mergekit_python()
    if py is None:
        pytest.skip("mergekit is not installed (pip install mergekit==0.1.5)")
    cache = runs[0][1].parent / "lora-cache"
    run_mergekit(py, runs, cache, timeout=1800)


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    """Every anchor recipe on both fixture families through mergekit."""
    root = tmp_path_factory.mktemp("mergekit")
    runs = []
    for family in ("llama-tiny", "gpt2-tiny"):
        for name, text in RECIPES.items():
            recipe = root / f"{family}-{name}.yml"
            recipe.write_text(text.format(F=ROOT / "fixtures" / family) + "dtype: float32\nout_dtype: bfloat16\n")
            runs.append((recipe, root / f"mk-{family}-{name}"))
            if name == "ties":
                runs.append((recipe, root / f"mk-{family}-{name}-stable"))
    _run_mergekit(runs)
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
        worst = float(bf16_steps(ours.get(n), theirs.get(n)).max())
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
        far = bf16_steps(ours.get(n), theirs.get(n)) > 1.0
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
        assert float(bf16_steps(ours.get(n), theirs.get(n)).max()) <= 1.0, n
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


# ---- anchor: the other mergekit methods -------------------------------------------------------

# mergekit's own tests (tests/test_basic_merges.py: every method with weights 0.6 / 0.4, which the
# methods without weights ignore) and examples, plus the cases they leave out. {F} is the fixture
# family; a recipe that names ft-c runs on llama-tiny only (gpt2-tiny has two fine-tunes).
_TWO = "models:\n  - model: {F}/ft-a\n    parameters: {{weight: 0.6}}\n  - model: {F}/ft-b\n    parameters: {{weight: 0.4}}\n"
METHOD_RECIPES = {
    "passthrough-scale": "merge_method: passthrough\nmodels:\n  - model: {F}/ft-a\n    parameters:\n      scale:\n"
                         "        - {{filter: o_proj, value: 0}}\n        - {{filter: c_proj, value: 0.5}}\n"
                         "        - {{value: 1}}\n",
    "breadcrumbs-default": "merge_method: breadcrumbs\nbase_model: {F}/base\n" + _TWO,
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {F}/base\nmodels:\n"
                   "  - model: {F}/ft-a\n    parameters: {{weight: 1.0, density: 0.6, gamma: 0.05}}\n"
                   "  - model: {F}/ft-b\n    parameters: {{weight: 0.5, density: 0.7, gamma: 0.1}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {F}/base\nmodels:\n"
                        "  - model: {F}/ft-a\n    parameters: {{weight: 1.0, density: 0.4, gamma: 0.01}}\n"
                        "  - model: {F}/ft-b\n    parameters: {{weight: 0.6, density: [0.9, 0.5], gamma: 0.2}}\n"
                        "parameters: {{lambda: 0.8, normalize: true, rescale: true}}\n",
    "ties-rescale": "merge_method: ties\nbase_model: {F}/base\nmodels:\n"
                    "  - model: {F}/ft-a\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                    "  - model: {F}/ft-b\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                    "parameters: {{rescale: true, normalize: false, int8_mask: true}}\n",
    "sce": "merge_method: sce\nbase_model: {F}/base\n" + _TWO + "parameters: {{select_topk: 0.5}}\n",
    "sce-3": "merge_method: sce\nbase_model: {F}/base\nmodels:\n  - model: {F}/ft-a\n  - model: {F}/ft-b\n"
             "  - model: {F}/ft-c\nparameters: {{select_topk: 0.3}}\n",
    "sce-all": "merge_method: sce\nbase_model: {F}/base\n" + _TWO,
    "ram": "merge_method: ram\nbase_model: {F}/base\n" + _TWO + "parameters: {{epsilon: 0.002}}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {F}/base\n" + _TWO + "parameters: {{r: 0.05, alpha: 1.0}}\n",
    "ramplus_tl-eps": "merge_method: ramplus_tl\nbase_model: {F}/base\n" + _TWO +
                      "parameters: {{r: 0.5, alpha: 0.3, epsilon: 0.002}}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {F}/base\n" + _TWO,
    "multislerp-3": "merge_method: multislerp\nmodels:\n  - model: {F}/ft-a\n    parameters: {{weight: 1.0}}\n"
                    "  - model: {F}/ft-b\n    parameters: {{weight: 2.0}}\n"
                    "  - model: {F}/ft-c\n    parameters: {{weight: 0.5}}\nparameters: {{normalize_weights: false}}\n",
    "karcher": "merge_method: karcher\nbase_model: {F}/base\n" + _TWO + "parameters: {{max_iter: 5, tol: 1.0e-5}}\n",
    "karcher-no-base": "merge_method: karcher\nmodels:\n  - model: {F}/ft-a\n  - model: {F}/ft-b\n",
    "model_stock": "merge_method: model_stock\nbase_model: {F}/ft-a\n"
                   "models:\n  - model: {F}/ft-b\n    parameters: {{weight: 0.6}}\n  - model: {F}/base\n"
                   "    parameters: {{weight: 0.4}}\n",
    "model_stock-3": "merge_method: model_stock\nbase_model: {F}/base\nmodels:\n  - model: {F}/ft-a\n"
                     "  - model: {F}/ft-b\n  - model: {F}/ft-c\n",
    "model_stock-filter_wise": "merge_method: model_stock\nbase_model: {F}/ft-a\nmodels:\n  - model: {F}/ft-b\n"
                               "  - model: {F}/base\nparameters: {{filter_wise: true}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {F}/ft-a\n" + _TWO.replace("ft-b", "base"),
    "nearswap": "merge_method: nearswap\nbase_model: {F}/base\nmodels:\n  - model: {F}/base\n  - model: {F}/ft-a\n"
                "parameters: {{t: 0.0001}}\n",
    "nearswap-gradient": "merge_method: nearswap\nbase_model: {F}/base\nmodels:\n  - model: {F}/ft-b\n"
                         "parameters: {{t: [0.001, 0.01]}}\n",
}
for _base in ("", "base_model: {F}/base\n"):
    for _rows in (False, True):
        for _flat in (False, True):
            METHOD_RECIPES[f"nuslerp{'-base' if _base else ''}{'-rows' if _rows else ''}{'-flat' if _flat else ''}"] = (
                "merge_method: nuslerp\n" + _base + _TWO +
                f"parameters: {{{{nuslerp_row_wise: {str(_rows).lower()}, nuslerp_flatten: {str(_flat).lower()}}}}}\n")
METHOD_RECIPES["nuslerp-zero-sum"] = ("merge_method: nuslerp\nbase_model: {F}/ft-c\nmodels:\n  - model: {F}/ft-a\n"
                                      "    parameters: {{weight: -0.5}}\n  - model: {F}/ft-b\n"
                                      "    parameters: {{weight: 0.5}}\n"
                                      "parameters: {{nuslerp_row_wise: false, nuslerp_flatten: false}}\n")


def _family_recipes(root: Path, recipes: dict[str, str], tail: str) -> list[tuple[str, str, Path]]:
    out = []
    for family in ("llama-tiny", "gpt2-tiny"):
        for name, text in recipes.items():
            if family == "gpt2-tiny" and "ft-c" in text:
                continue
            recipe = root / f"{family}-{name}.yml"
            recipe.write_text(text.format(F=ROOT / "fixtures" / family) + tail)
            out.append((family, name, recipe))
    return out


@pytest.fixture(scope="module")
def mergekit_method_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit-methods")
    recipes = _family_recipes(root, METHOD_RECIPES, "dtype: float32\nout_dtype: bfloat16\n")
    _run_mergekit([(r, root / f"mk-{family}-{name}-stable") for family, name, r in recipes])
    return root, recipes


def _within_one_bf16_step(ours: Path, theirs: Path, inputs: list[Path]) -> None:
    """Every entry within one bf16 rounding step, or — where the result cancels to almost
    nothing (θ0 + τ ≈ 0) — within 2^-20 of the inputs' largest magnitude in that tensor (float32
    rounding of the intermediate values, which relative steps cannot measure)."""
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(a.names) == set(b.names)
    srcs = [open_checkpoint(p) for p in inputs]
    for n in a.names:
        assert a.info(n).dtype == b.info(n).dtype == torch.bfloat16, n
        x, y = a.get(n), b.get(n)
        scale = max(float(s.get(n).abs().max()) for s in srcs if n in s)
        bad = (bf16_steps(x, y) > 1.0) & ((x - y).abs() > scale * 2.0 ** -20)
        assert not bad.any(), (n, float(bf16_steps(x, y).max()), int(bad.sum()))


@pytest.mark.anchor
@pytest.mark.slow
def test_mergekit_methods_anchor(cli, mergekit_method_outputs):
    """Every deterministic mergekit method on mergekit's own test recipes and edge cases equals
    `mergekit-yaml` within one bf16 step on both fixture families (mergekit with stable sorts:
    surgery's documented order among equal magnitudes; it matters for breadcrumbs and SCE)."""
    root, recipes = mergekit_method_outputs
    failures = []
    for family, name, recipe in recipes:
        out = root / f"s-{family}-{name}"
        r = cli("merge", "--config", recipe, "-o", out, "--quiet")
        assert r.code == 0, (name, r.stderr)
        fx = ROOT / "fixtures" / family
        try:
            _within_one_bf16_step(out, root / f"mk-{family}-{name}-stable",
                                  [fx / m for m in ("base", "ft-a", "ft-b", "ft-c") if (fx / m).exists()])
        except AssertionError as exc:
            failures.append((family, name, exc.args))
    assert not failures, failures


# Random methods: mergekit draws from torch's global RNG, surgery by flat position from --seed,
# so the two agree in distribution. float32 outputs, so task vectors are not lost to bf16 rounding.
RANDOM_RECIPES = {
    "dare_linear": "merge_method: dare_linear\nbase_model: {F}/base\nmodels:\n"
                   "  - model: {F}/ft-a\n    parameters: {{weight: 1.0, density: 0.3}}\n",
    "della_linear": "merge_method: della_linear\nbase_model: {F}/base\nmodels:\n"
                    "  - model: {F}/ft-a\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.3}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {F}/base\n" + _TWO + "parameters: {{density: 0.66}}\n",
    "della": "merge_method: della\nbase_model: {F}/base\n" + _TWO +
             "parameters: {{density: 0.66, epsilon: 0.05, lambda: 0.5}}\n",
}


def _kept_statistics(out: Path, fx: Path) -> dict[str, float]:
    """Over every 2-D tensor: the share of entries the merge moved, the share moved among each
    row's top and bottom third of |τ_a|, the L1 ratio Σ|θ − θ0| / Σ|τ_a|, and the share of moved
    entries whose sign is the sign of τ_a + τ_b (sign election)."""
    o, base, a = open_checkpoint(out), open_checkpoint(fx / "base"), open_checkpoint(fx / "ft-a")
    b = open_checkpoint(fx / "ft-b")
    moved = total = top = top_n = bottom = bottom_n = agree = 0
    l1_out = l1_tau = 0.0
    for n in base.names:
        if len(base.info(n).shape) != 2:
            continue
        t0 = base.get(n).double()
        delta = o.get(n).double() - t0
        ta = a.get(n).double() - t0
        tb = b.get(n).double() - t0
        m = delta != 0
        moved += int(m.sum())
        total += m.numel()
        ranks = ta.abs().argsort(1).argsort(1)
        third = ta.shape[1] // 3
        hi, lo = ranks >= ta.shape[1] - third, ranks < third
        top, top_n = top + int((m & hi).sum()), top_n + int(hi.sum())
        bottom, bottom_n = bottom + int((m & lo).sum()), bottom_n + int(lo.sum())
        l1_out, l1_tau = l1_out + float(delta.abs().sum()), l1_tau + float(ta.abs().sum())
        agree += int((m & (torch.sign(delta) == torch.sign(ta + tb))).sum())
    return {"moved": moved / total, "top": top / top_n, "bottom": bottom / bottom_n, "l1": l1_out / l1_tau,
            "sign": agree / max(moved, 1)}


@pytest.mark.anchor
@pytest.mark.slow
def test_random_methods_match_mergekit_in_distribution(cli, tmp_path):
    """DARE and DELLA: the share of entries kept (overall and by magnitude rank within rows),
    the L1 rescaling and the sign election agree with mergekit's within sampling noise; the
    merge is reproducible from --seed."""
    recipes = _family_recipes(tmp_path, RANDOM_RECIPES, "dtype: float32\n")
    _run_mergekit([(r, tmp_path / f"mk-{family}-{name}") for family, name, r in recipes])
    for family, name, recipe in recipes:
        fx = ROOT / "fixtures" / family
        runs = []
        for seed in (1, 1, 2):
            out = tmp_path / f"s-{family}-{name}-{len(runs)}"
            r = cli("merge", "--config", recipe, "--seed", seed, "-o", out, "--quiet")
            assert r.code == 0, r.stderr
            runs.append(out)
        x, y, z = (open_checkpoint(p) for p in runs)
        assert all(torch.equal(x.get_raw(n), y.get_raw(n)) for n in x.names), name
        assert not all(torch.equal(x.get_raw(n), z.get_raw(n)) for n in x.names), name
        ours, theirs = _kept_statistics(runs[0], fx), _kept_statistics(tmp_path / f"mk-{family}-{name}", fx)
        for key in ("moved", "top", "bottom", "sign"):
            assert abs(ours[key] - theirs[key]) < 0.03, (family, name, key, ours, theirs)
        assert abs(ours["l1"] - theirs["l1"]) < 0.02 * theirs["l1"], (family, name, ours, theirs)
        if name.endswith("_linear"):           # one model, weight 1: the L1 rescale keeps τ's norm exactly
            assert ours["l1"] == pytest.approx(1.0, abs=1e-4) and theirs["l1"] == pytest.approx(1.0, abs=1e-4)
        if name == "della_linear":             # keep probability 0.5 ± 0.3 by rank: top third ≈ 0.7, bottom ≈ 0.3
            assert ours["top"] > 0.6 > 0.4 > ours["bottom"], ours


def test_della_epsilon_out_of_range_exits_2_before_reading(cli, tmp_path):
    """mergekit's own test: density 0.66 with epsilon 1.35 is refused."""
    r = cli("merge", "-m", "della", "--base", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "-p", "density=0.66",
            "-p", "epsilon=1.35", "-o", tmp_path / "o")
    assert r.code == 2 and "epsilon = 1.35 with --density = 0.66" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["-m", "nearswap", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a")], "needs --t"),
    (["-m", "nearswap", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), str(LLAMA / "ft-b"), "-p", "t=0.1"],
     "exactly 1 model"),
    (["-m", "breadcrumbs", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-p", "gamma=1.5"],
     "gamma = 1.5 is out of range; it takes [0, 1]"),
    (["-m", "sce", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-p", "select_topk=-0.1"],
     "select_topk = -0.1 is out of range"),
    (["-m", "karcher", str(LLAMA / "ft-a"), str(LLAMA / "ft-b"), "-p", "max_iter=2.5"], "must be a whole number"),
    (["-m", "model_stock", "--base", str(LLAMA / "base"), str(LLAMA / "ft-a")], "at least 2 model"),
    (["-m", "multislerp", str(LLAMA / "ft-a"), str(LLAMA / "ft-b"), "-p", "1:weight=1", "-p", "2:weight=-1"],
     "weights sum to zero"),
    (["-m", "passthrough", str(LLAMA / "ft-a"), str(LLAMA / "ft-b")], "exactly 1 model"),
])
def test_method_parameter_errors_exit_2(cli, tmp_path, args, message):
    r = cli("merge", *args, "-o", tmp_path / "o")
    assert r.code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
