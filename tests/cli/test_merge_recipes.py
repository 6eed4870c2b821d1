"""The mergekit recipe language end to end: slices and frankenmerges, parameter scopes,
gradients and filters, tokenizer sources, model+lora inputs, --dry-run and the positional
form — and, marked ``anchor``, every recipe feature against mergekit 0.1.5 on the same recipe
(mergekit's own tests and examples, re-pointed at the fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "fixtures" / "llama-tiny"
GPT2 = ROOT / "fixtures" / "gpt2-tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


def _has(method: str) -> bool:
    from surgery.merge import METHODS

    return method in METHODS


needs_passthrough = pytest.mark.skipif(not _has("passthrough"), reason="the passthrough method is not registered")


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    """llama-tiny variants whose vocabularies differ (fixtures/make_vocab_variants.py)."""
    from make_vocab_variants import build

    return build(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory) -> Path:
    """A seeded PEFT LoRA on llama-tiny ft-a (q, v and down projections)."""
    from adapter_helpers import make_adapter
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return make_adapter(LLAMA / "ft-a", cfg, tmp_path_factory.mktemp("lora") / "adapter", seed=3)


def _recipe(tmp_path: Path, text: str, name: str = "r.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- slices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_frankenmerge_stacks_and_repeats_layers(cli, tmp_path, method):
    """Output layer k holds the named source layer's tensors byte for byte (one source per
    slice: passthrough, or linear of one model); the layer count in config.json follows."""
    if not _has(method):
        pytest.skip(f"{method} is not registered")
    recipe = _recipe(tmp_path, f"""slices:
  - sources: [{{model: {LLAMA / 'ft-a'}, layer_range: [0, 2]}}]
  - sources: [{{model: {LLAMA / 'ft-b'}, layer_range: [1, 2]}}]
  - sources: [{{model: {LLAMA / 'ft-a'}, layer_range: [0, 1]}}]
merge_method: {method}
""")
    out = tmp_path / "out"
    r = cli("merge", recipe, out, "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["config_update"] == {"num_hidden_layers": 4}
    assert [s["layers"] for s in doc["slices"]] == [2, 1, 1]
    merged, a, b = open_checkpoint(out), open_checkpoint(LLAMA / "ft-a"), open_checkpoint(LLAMA / "ft-b")
    source_layer = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (a, 0)}
    layer_names = [n for n in a.names if n.startswith("model.layers.0.")]
    assert len(merged.names) == 2 + 4 * len(layer_names)
    for k, (src, i) in source_layer.items():
        for n in layer_names:
            suffix = n.removeprefix("model.layers.0.")
            assert torch.equal(merged.get_raw(f"model.layers.{k}.{suffix}"), src.get_raw(f"model.layers.{i}.{suffix}"))
    # tensors before the layers come from the first slice, after them from the last
    assert torch.equal(merged.get_raw("model.embed_tokens.weight"), a.get_raw("model.embed_tokens.weight"))
    assert torch.equal(merged.get_raw("model.norm.weight"), a.get_raw("model.norm.weight"))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.slow
def test_frankenmerge_loads_and_generates(cli, tmp_path):
    method = "passthrough" if _has("passthrough") else "linear"
    recipe = _recipe(tmp_path, f"""slices:
  - sources: [{{model: {LLAMA / 'ft-a'}, layer_range: [0, 2]}}]
  - sources: [{{model: {LLAMA / 'ft-b'}, layer_range: [0, 2]}}]
merge_method: {method}
""")
    out = tmp_path / "out"
    assert cli("merge", recipe, out, "--quiet").code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(model.model.layers) == 4
    ids = tok("the model", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


def test_per_layer_config_lists_follow_the_slices(cli, tmp_path):
    """config.json's per-layer lists (layer_types) are rebuilt from the source layers."""
    import shutil

    model = tmp_path / "typed"
    shutil.copytree(LLAMA / "ft-a", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention"]
    (model / "config.json").write_text(json.dumps(cfg))
    recipe = _recipe(tmp_path, f"""merge_method: linear
slices:
  - sources: [{{model: {model}, layer_range: [0, 2]}}]
  - sources: [{{model: {model}, layer_range: [1, 2]}}]
  - sources: [{{model: {model}, layer_range: [1, 2]}}]
""")
    r = cli("merge", recipe, tmp_path / "out", "--json")
    assert r.code == 0, r.stderr
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]


def test_merged_slices_resolve_parameters_per_slice_and_source(cli, tmp_path):
    """A slice with several sources is merged with the method; a source's parameters beat the
    slice's, which beat the top level; gradients run over the slice's own layers (one-layer
    slices sit at t = 1); per-model filters see the source tensor's name."""
    fa, fb = LLAMA / "ft-a", LLAMA / "ft-b"
    recipe = _recipe(tmp_path, f"""merge_method: linear
slices:
  - sources:
      - {{model: {fa}, layer_range: [0, 1], parameters: {{weight: 3.0}}}}
      - {{model: {fb}, layer_range: [1, 2]}}
    parameters: {{weight: 2.0}}
  - sources:
      - {{model: {fa}, layer_range: [1, 2]}}
      - {{model: {fb}, layer_range: [0, 1], parameters: {{weight: [{{filter: layers.0.mlp, value: 5.0}}, {{value: [0.0, 4.0]}}]}}}}
parameters: {{weight: 1.0, normalize: true}}
dtype: float32
""")
    out = tmp_path / "out"
    r = cli("merge", recipe, out, "--json")
    assert r.code == 0, r.stderr
    m, a, b = open_checkpoint(out), open_checkpoint(fa), open_checkpoint(fb)

    def expect(wa: float, wb: float, na: str, nb: str) -> torch.Tensor:
        return (wa * a.get(na) + wb * b.get(nb)) / (wa + wb)

    # slice 0 (output layer 0): ft-a layer 0 at weight 3 (source), ft-b layer 1 at weight 2 (slice)
    n = "self_attn.q_proj.weight"
    assert torch.allclose(m.get(f"model.layers.0.{n}"), expect(3, 2, f"model.layers.0.{n}", f"model.layers.1.{n}"))
    # slice 1 (output layer 1, a one-layer slice: t = 1): ft-a at 1 (top level); ft-b layer 0's
    # mlp matches the filter "layers.0.mlp" by its input name (weight 5), attention takes the
    # gradient's end (4)
    n = "mlp.up_proj.weight"
    assert torch.allclose(m.get(f"model.layers.1.{n}"), expect(1, 5, f"model.layers.1.{n}", f"model.layers.0.{n}"))
    n = "self_attn.v_proj.weight"
    assert torch.allclose(m.get(f"model.layers.1.{n}"), expect(1, 4, f"model.layers.1.{n}", f"model.layers.0.{n}"))
    # the embedding (before the layers) is slice 0's at t = 0: 3 and 2
    e = "model.embed_tokens.weight"
    assert torch.allclose(m.get(e), expect(3, 2, e, e))


@pytest.mark.parametrize("text, code, message", [
    ("slices:\n  - sources: [{{model: {a}, layer_range: [0, 3]}}]\nmerge_method: linear\n", 2,
     "slices[0]: layer_range [0, 3] of {a} is out of range; it has 2 layers"),
    ("slices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 1]}}]\n"
     "merge_method: linear\n", 2, "every source of a slice must have the same number of layers"),
    ("slices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [0, 2]}}]\n"
     "merge_method: linear\n", 2, "is listed twice"),
    ("slices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\nbase_model: {base}\nmerge_method: task_arithmetic\n",
     2, "slices[0]: the base model {base} is not among the sources"),
    ("slices:\n  - sources: [{{model: {a}, layer_range: [0, 1]}}, {{model: {b}, layer_range: [0, 1]}}]\n"
     "  - sources: [{{model: {a}, layer_range: [1, 2]}}, {{model: {g}, layer_range: [1, 2]}}]\nmerge_method: linear\n",
     3, "cannot merge"),
    ("models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: linear\nparameters: {{weight: [0.5, 1.5]}}\n"
     "tokenizer: {{source: union, tokens: {{'<x>': {{source: {g}}}}}}}\n", 2, "which is not an input of this tensor"),
], ids=["layer-range", "slice-lengths", "twice", "base-not-in-slice", "shapes", "token-source"])
def test_recipe_errors_name_the_entry_before_anything_is_read(cli, tmp_path, monkeypatch, text, code, message):
    from surgery.checkpoint.reader import Checkpoint

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read before the recipe was validated")

    monkeypatch.setattr(Checkpoint, "get_raw", no_reads)
    monkeypatch.setattr(Checkpoint, "get_rows", no_reads)
    fmt = dict(a=LLAMA / "ft-a", b=LLAMA / "ft-b", base=LLAMA / "base", g=GPT2 / "ft-a")
    recipe = _recipe(tmp_path, text.format(**fmt))
    r = cli("merge", recipe, tmp_path / "out")
    assert r.code == code, r.stderr
    assert message.format(**fmt) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_vocabulary_sizes_that_differ_need_a_tokenizer_setting(cli, tmp_path, vocab_models):
    v = vocab_models
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {v['base']}}}, {{model: {v['chatml']}}}]\n")
    r = cli("merge", recipe, tmp_path / "out")
    assert r.code == 3 and "vocabulary sizes differ" in r.stderr and "tokenizer_source: base" in r.stderr


def test_dry_run_plans_from_headers_and_writes_nothing(cli, tmp_path, monkeypatch):
    from surgery.checkpoint.reader import Checkpoint

    def no_reads(*a, **k):
        raise AssertionError("--dry-run read a tensor")

    monkeypatch.setattr(Checkpoint, "get_raw", no_reads)
    monkeypatch.setattr(Checkpoint, "get_rows", no_reads)
    recipe = _recipe(tmp_path, f"""merge_method: task_arithmetic
base_model: {LLAMA / 'base'}
models:
  - model: {LLAMA / 'ft-a'}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {LLAMA / 'ft-b'}
parameters: {{lambda: 0.5}}
out_dtype: bfloat16
""")
    r = cli("merge", recipe, "--dry-run", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["dry_run"] and doc["num_tensors"] == 20 and "output" not in doc
    base = open_checkpoint(LLAMA / "base")
    assert doc["output_bytes"] == base.total_bytes()            # bf16 in, bf16 out
    assert doc["estimated_memory_bytes"] > 0
    q1 = next(t for t in doc["tensors"] if t["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert q1["how"] == "task_arithmetic" and q1["t"] == 1.0
    assert q1["base"] == {"model": str(LLAMA / "base"), "tensor": "model.layers.1.self_attn.q_proj.weight"}
    assert [p["weight"] for p in q1["model_parameters"]] == [pytest.approx(0.8), 1.0]
    assert q1["parameters"]["lambda"] == 0.5
    human = cli("merge", recipe, "--dry-run")
    assert human.code == 0 and "nothing written" in human.stdout and "q_proj" in human.stdout


def test_positional_recipe_and_output(cli, tmp_path):
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {LLAMA / 'ft-a'}}}, {{model: {LLAMA / 'ft-b'}}}]\n")
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("merge", recipe, a, "--quiet").code == 0
    assert cli("merge", "--config", recipe, "-o", b, "--quiet").code == 0
    x, y = open_checkpoint(a), open_checkpoint(b)
    assert all(torch.equal(x.get_raw(n), y.get_raw(n)) for n in x.names)
    r = cli("merge", recipe)
    assert r.code == 2 and "name the output folder" in r.stderr


def test_model_plus_lora_is_fused_on_read(cli, tmp_path, lora_adapter):
    """ft-a+LORA in a recipe merges what PEFT's merge_and_unload of the adapter gives (rounded to
    the model's dtype, as a merged-and-saved model holds it), without a fused copy on disk."""
    from adapter_helpers import peft_reference

    recipe = _recipe(tmp_path, f"""merge_method: task_arithmetic
base_model: {LLAMA / 'base'}
models:
  - model: {LLAMA / 'ft-a'}+{lora_adapter}
    parameters: {{weight: 0.5}}
dtype: float32
""")
    out = tmp_path / "out"
    r = cli("merge", recipe, out, "--json")
    assert r.code == 0, r.stderr
    merged_ref, _ = peft_reference(LLAMA / "ft-a", lora_adapter)
    base, m = open_checkpoint(LLAMA / "base"), open_checkpoint(out)
    for n in m.names:
        fused = merged_ref[n].to(torch.bfloat16).float()
        expect = base.get(n) + 0.5 * (fused - base.get(n))
        assert torch.allclose(m.get(n), expect, atol=2e-3, rtol=1e-2), n
    roles = [i["role"] for i in r.json()["record"]["inputs"]]
    assert roles == ["base", "model", "adapter"]


# ---- anchor: mergekit on the same recipes ------------------------------------------------------

def _families() -> dict[str, Path]:
    return {"llama-tiny": LLAMA, "gpt2-tiny": GPT2}


# name -> (recipe text, families, method needed); {F} is the family folder, {V} the vocab variants,
# {L} the LoRA adapter. Every recipe gets dtype: float32 and out_dtype: bfloat16 unless it sets them.
ANCHOR_RECIPES: dict[str, tuple[str, tuple[str, ...], str]] = {
    # mergekit tests/test_basic_merges.py: test_gpt2_stack (a model stacked on itself)
    "stack": ("slices:\n  - sources: [{{model: {F}/ft-a, layer_range: [0, 2]}}]\n"
              "  - sources: [{{model: {F}/ft-a, layer_range: [0, 2]}}]\nmerge_method: passthrough\n",
              ("llama-tiny", "gpt2-tiny"), "passthrough"),
    # mergekit examples/orcamini-platy-44layer.yml: two models, overlapping ranges
    "frankenmerge": ("slices:\n  - sources:\n    - model: {F}/ft-a\n      layer_range: [0, 2]\n"
                     "  - sources:\n    - model: {F}/ft-b\n      layer_range: [1, 2]\nmerge_method: passthrough\n",
                     ("llama-tiny", "gpt2-tiny"), "passthrough"),
    # mergekit tests: test_passthrough_scale
    "passthrough-scale": ("merge_method: passthrough\nmodels:\n  - model: {F}/ft-a\n    parameters:\n"
                          "      scale:\n        - filter: o_proj\n          value: 0\n        - filter: c_proj\n"
                          "          value: 0.5\n        - value: 1\n", ("llama-tiny", "gpt2-tiny"), "passthrough"),
    # mergekit examples/gradient-slerp.yml
    "gradient-slerp": ("slices:\n  - sources:\n      - model: {F}/ft-a\n        layer_range: [0, 2]\n"
                       "      - model: {F}/ft-b\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: {F}/ft-a\n"
                       "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                       "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n",
                       ("llama-tiny", "gpt2-tiny"), "slerp"),
    # mergekit tests: test_slerp_merge with a weight mergekit accepts and slerp does not use
    "slerp-weights": ("merge_method: slerp\nbase_model: {F}/ft-a\nmodels:\n  - model: {F}/ft-a\n"
                      "    parameters: {{weight: 0.6}}\n  - model: {F}/ft-b\n    parameters: {{weight: 0.4}}\n"
                      "parameters: {{t: 0.35}}\n", ("llama-tiny", "gpt2-tiny"), "slerp"),
    # mergekit examples/ties.yml: density and weight gradients, a weight filter (stable argsort)
    "ties-gradients-stable": ("models:\n  - model: {F}/ft-a\n    parameters:\n      density: [1, 0.7, 0.1]\n"
                              "      weight: 1.0\n  - model: {F}/ft-b\n    parameters:\n      density: 0.5\n"
                              "      weight: [0, 0.3, 0.7, 1]\n  - model: {F}/base\n    parameters:\n"
                              "      density: 0.33\n      weight:\n        - filter: mlp\n          value: 0.5\n"
                              "        - value: 0\nmerge_method: ties\nbase_model: {F}/base\n"
                              "parameters:\n  normalize: true\n  int8_mask: true\n", ("llama-tiny", "gpt2-tiny"), "ties"),
    # slices merged by task arithmetic, each with the base among its sources, slice-level parameters
    "task-arithmetic-slices": ("merge_method: task_arithmetic\nbase_model: {F}/base\nslices:\n"
                               "  - sources:\n      - {{model: {F}/base, layer_range: [0, 1]}}\n"
                               "      - {{model: {F}/ft-a, layer_range: [0, 1], parameters: {{weight: 0.8}}}}\n"
                               "      - {{model: {F}/ft-b, layer_range: [0, 1]}}\n"
                               "    parameters: {{weight: 0.3, lambda: 0.7}}\n"
                               "  - sources:\n      - {{model: {F}/base, layer_range: [1, 2]}}\n"
                               "      - {{model: {F}/ft-a, layer_range: [1, 2]}}\n"
                               "    parameters: {{weight: [{{filter: mlp, value: 1.5}}, {{value: 0.4}}]}}\n"
                               "parameters: {{lambda: 1.2}}\n", ("llama-tiny", "gpt2-tiny"), "task_arithmetic"),
    # a frankenmerge whose slices merge two models each, one of them reversed
    "linear-slices": ("merge_method: linear\nslices:\n  - sources:\n      - {{model: {F}/ft-a, layer_range: [0, 2]}}\n"
                      "      - {{model: {F}/ft-b, layer_range: [0, 2], parameters: {{weight: [0.2, 0.9]}}}}\n"
                      "  - sources:\n      - {{model: {F}/ft-c, layer_range: [1, 2]}}\n"
                      "      - {{model: {F}/ft-a, layer_range: [0, 1]}}\nparameters: {{weight: 0.5}}\n",
                      ("llama-tiny",), "linear"),
    # a base model not listed among models is merged as one more input (mergekit adds it)
    "linear-base-added": ("merge_method: linear\nbase_model: {F}/base\nmodels:\n  - model: {F}/ft-a\n"
                          "    parameters: {{weight: 2.0}}\n  - model: {F}/ft-b\nparameters: {{weight: 0.5}}\n",
                          ("llama-tiny", "gpt2-tiny"), "linear"),
    # model+lora (mergekit merges the adapter with PEFT first)
    "lora": ("merge_method: task_arithmetic\nbase_model: {F}/base\nmodels:\n  - model: {F}/ft-a+{L}\n"
             "    parameters: {{weight: 0.7}}\n  - model: {F}/ft-b\n    parameters: {{weight: 0.5}}\n",
             ("llama-tiny",), "task_arithmetic"),
    # mergekit tests/test_tokenizer.py, on llama-tiny variants with different vocabularies
    "tokenizer-base-stable": ("merge_method: ties\nbase_model: {V}/base\nmodels:\n"
                              "  - model: {V}/padded\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                              "  - model: {V}/chatml\n    parameters: {{weight: 0.7, density: 0.6}}\n"
                              "tokenizer_source: base\n", ("vocab",), "ties"),
    "tokenizer-union": ("merge_method: linear\nbase_model: {V}/base\nmodels:\n"
                        "  - model: {V}/base\n    parameters: {{weight: 1.0}}\n"
                        "  - model: {V}/padded\n    parameters: {{weight: 1.0}}\n"
                        "  - model: {V}/chatml\n    parameters: {{weight: 1.0}}\n"
                        "  - model: {V}/renamed\n    parameters: {{weight: 0.5}}\n"
                        "tokenizer_source: union\n", ("vocab",), "linear"),
    "tokenizer-model": ("merge_method: linear\nbase_model: {V}/base\nmodels:\n"
                        "  - model: {V}/base\n    parameters: {{weight: 1.0}}\n"
                        "  - model: {V}/padded\n    parameters: {{weight: 1.0}}\n"
                        "  - model: {V}/chatml\n    parameters: {{weight: 1.0}}\n"
                        "tokenizer_source: {V}/chatml\n", ("vocab",), "linear"),
    "tokenizer-slerp-union": ("merge_method: slerp\nbase_model: {V}/base\nmodels:\n  - model: {V}/base\n"
                              "  - model: {V}/chatml\nparameters: {{t: 0.5}}\ntokenizer_source: union\n",
                              ("vocab",), "slerp"),
    "tokenizer-tokens": ("merge_method: linear\nbase_model: {V}/base\nmodels:\n"
                         "  - model: {V}/base\n    parameters: {{weight: 1.0}}\n"
                         "  - model: {V}/chatml\n    parameters: {{weight: 1.0}}\n"
                         "tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n  tokens:\n"
                         "    \"Ġthe\": {{source: {V}/chatml, force: true}}\n"
                         "    \"<s>\": {{source: {V}/base, force: true}}\n"
                         "    \"</s>\": {{source: {{kind: model_token, model: {V}/chatml, token_id: 512}}, force: true}}\n"
                         "    \"<|im_end|>\": {{source: {{kind: model_token, model: {V}/base, token: \"<pad>\"}}}}\n"
                         "    \"<new_token>\": {{source: {{kind: zero}}}}\n", ("vocab",), "linear"),
    "tokenizer-base-pad": ("merge_method: linear\nbase_model: {V}/chatml\nmodels:\n  - model: {V}/chatml\n"
                           "    parameters: {{weight: 1.0}}\ntokenizer:\n  source: base\n  pad_to_multiple_of: 16\n",
                           ("vocab",), "linear"),
}


def _anchor_cases() -> list:
    cases = []
    for name, (_, families, method) in ANCHOR_RECIPES.items():
        for family in families:
            cases.append(pytest.param(name, family, method, id=f"{family}-{name}"))
    return cases


@pytest.fixture(scope="module")
def mergekit_recipes(tmp_path_factory, vocab_models, lora_adapter):
    """Every anchor recipe through mergekit, in one interpreter (mergekit-yaml runs the same run_merge)."""
    from mergekit_helpers import mergekit_python, run_mergekit

    py = mergekit_python()
    if py is None:
        pytest.skip("mergekit is not installed (pip install mergekit==0.1.5)")
    root = tmp_path_factory.mktemp("mergekit-recipes")
    jobs = []
    for name, (text, families, _) in ANCHOR_RECIPES.items():
        for family in families:
            folder = _families().get(family, vocab_models["base"].parent)
            body = text.format(F=folder, V=vocab_models["base"].parent, L=lora_adapter)
            if "dtype:" not in body:
                body += "dtype: float32\nout_dtype: bfloat16\n"
            recipe = root / f"{family}-{name}.yml"
            recipe.write_text(body)
            jobs.append((recipe, root / f"mk-{family}-{name}"))
    run_mergekit(py, jobs, root / "lora-cache")
    return root


@pytest.mark.anchor
@pytest.mark.slow
@pytest.mark.parametrize("name, family, method", _anchor_cases())
def test_recipe_equals_mergekit(cli, mergekit_recipes, name, family, method):
    """The same recipe through surgery and mergekit: the same tensors, layer count, vocabulary
    and tokenizer, every entry within one bf16 step (TIES against mergekit with a stable argsort,
    surgery's documented tie rule)."""
    from mergekit_helpers import compare_outputs

    if not _has(method):
        pytest.skip(f"{method} is not registered")
    root = mergekit_recipes
    out = root / f"s-{family}-{name}"
    r = cli("merge", root / f"{family}-{name}.yml", out, "--quiet", "--force")
    assert r.code == 0, r.stderr
    compare_outputs(out, root / f"mk-{family}-{name}")


def test_chat_template_is_written_into_the_output_tokenizer(cli, tmp_path):
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }};{% endfor %}"
    models = f"models: [{{model: {LLAMA / 'ft-a'}}}, {{model: {LLAMA / 'ft-b'}}}]\n"
    recipe = _recipe(tmp_path, f"merge_method: linear\n{models}chat_template: \"{template}\"\n")
    out = tmp_path / "out"
    r = cli("merge", recipe, out, "--quiet")
    assert r.code == 0, r.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>hi;"
    for value, message in [("chatml", "bundled templates"), ("hello", "is not a chat template")]:
        recipe = _recipe(tmp_path, f"merge_method: linear\n{models}chat_template: {value}\n", f"{value}.yml")
        r = cli("merge", recipe, tmp_path / value)
        assert r.code == 2 and message in r.stderr, r.stderr


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A Hub serving the llama-tiny fixtures as org/<name>: header mirrors, small-file snapshots and
    full pulls are recorded, so a test can tell what was downloaded when."""
    import shutil

    import huggingface_hub

    from surgery.checkpoint import hub

    calls: list[tuple[str, str, str | None]] = []

    def fetch_headers(repo, revision, folder):
        calls.append(("headers", repo, revision))
        src = LLAMA / repo.split("/")[1]
        data = (src / "model.safetensors").read_bytes()
        n = int.from_bytes(data[:8], "little")
        with open(folder / "model.safetensors", "wb") as fh:      # the header, then zeros: as fetch_headers does
            fh.write(data[:8 + n])
            fh.truncate(len(data))
        shutil.copyfile(src / "config.json", folder / "config.json")
        return {"revision": f"commit-of-{revision or 'main'}", "header_bytes": 8 + n, "files": []}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append(("small", repo_id, revision))
        assert "*.safetensors" not in (allow_patterns or [])
        return str(LLAMA / repo_id.split("/")[1])

    def pull(repo, revision=None):
        calls.append(("pull", repo, revision))
        return LLAMA / repo.split("/")[1]

    monkeypatch.setattr(hub, "fetch_headers", fetch_headers)
    monkeypatch.setattr(hub, "pull", pull)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    return calls


def test_hub_models_are_planned_from_headers_and_downloaded_after_validation(cli, tmp_path, fake_hub):
    recipe = _recipe(tmp_path, f"""merge_method: task_arithmetic
base_model: org/base@v1
models:
  - model: org/ft-a
    parameters: {{weight: 0.7}}
  - model: {LLAMA / 'ft-b'}
    parameters: {{weight: 0.2}}
dtype: float32
""")
    r = cli("merge", recipe, "--dry-run", "--json")
    assert r.code == 0, r.stderr
    assert ("headers", "org/base", "v1") in fake_hub and ("headers", "org/ft-a", None) in fake_hub
    assert ("small", "org/base", "commit-of-v1") in fake_hub
    assert not [c for c in fake_hub if c[0] == "pull"]            # no weights for a dry run
    bad = _recipe(tmp_path, recipe.read_text().replace("weight: 0.7", "weight: .nan"), "bad.yml")
    fake_hub.clear()
    r = cli("merge", bad, tmp_path / "bad-out")
    assert r.code == 2 and "out of range" in r.stderr
    assert not [c for c in fake_hub if c[0] == "pull"]            # refused before any weight file
    fake_hub.clear()
    r = cli("merge", recipe, tmp_path / "out", "--quiet")
    assert r.code == 0, r.stderr
    assert sorted(c for c in fake_hub if c[0] == "pull") == [("pull", "org/base", "commit-of-v1"),
                                                             ("pull", "org/ft-a", "commit-of-main")]
    local = _recipe(tmp_path, recipe.read_text().replace("org/base@v1", str(LLAMA / "base"))
                    .replace("org/ft-a", str(LLAMA / "ft-a")), "local.yml")
    assert cli("merge", local, tmp_path / "local-out", "--quiet").code == 0
    x, y = open_checkpoint(tmp_path / "out"), open_checkpoint(tmp_path / "local-out")
    assert all(torch.equal(x.get_raw(n), y.get_raw(n)) for n in x.names)
