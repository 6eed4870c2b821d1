"""The streaming entry point on the fixture checkpoints: OPCM against a direct in-memory
implementation of OPCM as docs/merge.md states it, the resume invariant, batch methods against float64
references, and the input checks."""

from __future__ import annotations

import os

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import open_checkpoint
from surgery.core.errors import IncompatibleCheckpointsError, InputError, UsageError
from surgery.merge import MergeOptions, MergeRequest, ModelEntry, load_recipe, merge
from surgery.merge.recipe import evaluate

LLAMA = Path(__file__).resolve().parents[3] / "fixtures" / "llama-tiny"
GPT2 = Path(__file__).resolve().parents[3] / "fixtures" / "gpt2-tiny"


def _load64(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.get(n, dtype=torch.float64) for n in ck.names}


def _req(method, base, models, **params):
    return MergeRequest(method, str(base) if base else None, [ModelEntry(str(m)) for m in models], params)


def _opcm_reference(base, finetunes, alpha, projected):
    """OPCM as docs/merge.md states it, literally: whole models in memory, float64, full SVD."""
    theta0 = base
    merged = dict(finetunes[0])
    norms = [math.sqrt(sum(float(((finetunes[0][n] - theta0[n]) ** 2).sum()) for n in theta0))]
    lam_prev, lambdas = 1.0, [1.0]
    for ft in finetunes[1:]:
        norms.append(math.sqrt(sum(float(((ft[n] - theta0[n]) ** 2).sum()) for n in theta0)))
        s_t = {}
        for n in theta0:
            m = merged[n] - theta0[n]
            tau = ft[n] - theta0[n]
            if projected(n):
                u, s, vh = torch.linalg.svd(m, full_matrices=True)
                v = vh.T
                frac = (torch.cumsum(s, 0) / s.sum()).clamp(max=1.0)
                above = (frac > alpha).nonzero()
                r = int(above[0]) if len(above) else 0
                p = u.T @ tau @ v
                p.diagonal().zero_()
                p[:r, :r] = 0
                tau = u @ p @ v.T
            s_t[n] = lam_prev * m + tau
        total = math.sqrt(sum(float((x ** 2).sum()) for x in s_t.values()))
        lam = total / (sum(norms) / len(norms))
        merged = {n: theta0[n] + s_t[n] / lam for n in theta0}
        lam_prev = lam
        lambdas.append(lam)
    return merged, lambdas, norms


def _projected_llama(name: str) -> bool:
    return name.endswith("_proj.weight")


@pytest.mark.parametrize("decomposition", ["svd", "gram"])
def test_opcm_equals_direct_implementation(tmp_path, decomposition):
    fts = [LLAMA / f"ft-{c}" for c in "abc"]
    res = merge(_req("opcm", LLAMA / "base", fts, alpha=0.5), tmp_path / "out", dtype="float32",
                options=MergeOptions(decomposition=decomposition))
    ref, lambdas, norms = _opcm_reference(_load64(LLAMA / "base"), [_load64(f) for f in fts], 0.5, _projected_llama)
    out = open_checkpoint(tmp_path / "out")
    for n, want in ref.items():
        got = out.get(n, dtype=torch.float64)
        assert float((got - want).norm() / want.norm()) < 1e-5, n
    assert [s["lambda"] for s in res.report["steps"]] == pytest.approx(lambdas, rel=1e-5)
    assert [s["tau_norm"] for s in res.report["steps"]] == pytest.approx(norms, rel=1e-5)
    assert res.report["lambda"] == pytest.approx(lambdas[-1], rel=1e-5)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "lambda" in card and "ft-c" in card


def test_opcm_alpha_one_removes_only_the_diagonal(tmp_path):
    fts = [LLAMA / "ft-a", LLAMA / "ft-b"]
    merge(_req("opcm", LLAMA / "base", fts, alpha=1.0), tmp_path / "out", dtype="float32",
          options=MergeOptions(decomposition="svd"))
    ref, _, _ = _opcm_reference(_load64(LLAMA / "base"), [_load64(f) for f in fts], 1.0, _projected_llama)
    out = open_checkpoint(tmp_path / "out")
    for n, want in ref.items():
        assert float((out.get(n, dtype=torch.float64) - want).norm() / want.norm()) < 1e-5, n


def test_resume_equals_one_run_and_state_contents(tmp_path):
    fts = [LLAMA / f"ft-{c}" for c in "abc"]
    merge(_req("opcm", LLAMA / "base", fts), tmp_path / "abc", dtype="float32")
    merge(_req("opcm", LLAMA / "base", fts[:2]), tmp_path / "ab", dtype="float32",
          options=MergeOptions(state_dir=tmp_path / "state"))
    res = merge(_req("", None, fts[2:]), tmp_path / "abc2", dtype="float32",
                options=MergeOptions(resume_dir=tmp_path / "state", state_dir=tmp_path / "state"))
    one, two = open_checkpoint(tmp_path / "abc"), open_checkpoint(tmp_path / "abc2")
    for n in one.names:
        assert torch.allclose(one.get(n), two.get(n), rtol=1e-6, atol=1e-7), n
    st = json.loads((tmp_path / "state" / "state.json").read_text())
    base_sha = open_checkpoint(LLAMA / "base").sha256()
    assert st["base"]["sha256"] == base_sha
    assert st["count"] == 3 and [Path(o["label"]).name for o in st["order"]] == ["ft-a", "ft-b", "ft-c"]
    assert st["sum_norms"] == pytest.approx(sum(o["tau_norm"] for o in st["order"]))
    assert st["lambda"] == pytest.approx(res.report["lambda"]) and st["parameters"]["alpha"] == 0.5
    assert [s["step"] for s in res.report["steps"]] == [1, 2, 3]


@pytest.mark.parametrize("method", ["continual_task_arithmetic", "continual_weight_average", "magmax"])
def test_continual_baselines_resume_and_reference(tmp_path, method):
    fts = [LLAMA / f"ft-{c}" for c in "abc"]
    merge(_req(method, LLAMA / "base", fts[:1]), tmp_path / "a", dtype="float32",
          options=MergeOptions(state_dir=tmp_path / "st"))
    merge(_req("", None, fts[1:]), tmp_path / "abc", dtype="float32", options=MergeOptions(resume_dir=tmp_path / "st"))
    base = _load64(LLAMA / "base")
    taus = [{n: x - base[n] for n, x in _load64(f).items()} for f in fts]
    out = open_checkpoint(tmp_path / "abc")
    for n in base:
        stack = torch.stack([t[n] for t in taus])
        if method == "continual_task_arithmetic":
            want = base[n] + 0.3 * stack.sum(0)
        elif method == "continual_weight_average":
            want = base[n] + stack.mean(0)
        else:
            rev = stack.flip(0)                        # argmax takes the first maximum; MagMax the last
            want = base[n] + 0.5 * rev.gather(0, rev.abs().argmax(0, keepdim=True))[0]
        assert torch.allclose(out.get(n, dtype=torch.float64), want, atol=1e-6), n


def test_resume_with_another_base_is_refused(tmp_path):
    merge(_req("opcm", LLAMA / "base", [LLAMA / "ft-a"]), tmp_path / "a", options=MergeOptions(state_dir=tmp_path / "st"))
    req = MergeRequest("", str(LLAMA / "ft-b"), [ModelEntry(str(LLAMA / "ft-c"))], {})
    with pytest.raises(IncompatibleCheckpointsError, match="is not the base of the state") as e:
        merge(req, tmp_path / "x", options=MergeOptions(resume_dir=tmp_path / "st"))
    assert e.value.exit_code == 3
    with pytest.raises(UsageError, match="made with alpha=0.5"):
        merge(_req("", None, [LLAMA / "ft-b"], alpha=0.7), tmp_path / "y", options=MergeOptions(resume_dir=tmp_path / "st"))
    with pytest.raises(UsageError, match="continues an 'opcm' merge"):
        merge(_req("magmax", None, [LLAMA / "ft-b"]), tmp_path / "y", options=MergeOptions(resume_dir=tmp_path / "st"))
    with pytest.raises(InputError, match="not a continual-merge state folder"):
        merge(_req("", None, [LLAMA / "ft-b"]), tmp_path / "y", options=MergeOptions(resume_dir=tmp_path))


def test_batch_methods_against_float64_reference(tmp_path):
    base = _load64(LLAMA / "base")
    fts = [_load64(LLAMA / f"ft-{c}") for c in "ab"]
    merge(MergeRequest("task_arithmetic", str(LLAMA / "base"),
                       [ModelEntry(str(LLAMA / "ft-a"), {"weight": [1.0, 0.0]}), ModelEntry(str(LLAMA / "ft-b"), {"weight": 0.5})],
                       {"lambda": 0.8}), tmp_path / "ta", dtype="float32")
    out = open_checkpoint(tmp_path / "ta")
    for n in base:
        d = n.split(".")
        layer_t = int(d[2]) / 1.0 if d[1] == "layers" else 0.0          # two layers: t = 0 and 1
        w_a = 1.0 - layer_t
        want = base[n] + 0.8 * (w_a * (fts[0][n] - base[n]) + 0.5 * (fts[1][n] - base[n]))
        assert torch.allclose(out.get(n, dtype=torch.float64), want, atol=1e-6), n
    merge(_req("linear", None, [LLAMA / "ft-a", LLAMA / "ft-b"]), tmp_path / "lin", dtype="float32")
    out = open_checkpoint(tmp_path / "lin")
    for n in base:
        assert torch.allclose(out.get(n, dtype=torch.float64), (fts[0][n] + fts[1][n]) / 2, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "della", "slerp"])
@pytest.mark.slow
def test_row_blocked_batch_merges_equal_whole_tensor_ones(tmp_path, monkeypatch, method):
    """Elementwise methods in sub-blocks and the streamed statistics (TIES' thresholds, L1
    sums, slerp's norms; tiny blocks forced, several per tensor and several engine blocks per
    tensor) give the same bytes as one block per tensor."""
    from surgery.core import engine
    from surgery.merge import batch
    from surgery.merge.methods import streaming

    extra = {"density": 0.4} if method in ("ties", "dare_linear", "dare_ties", "della") else {}
    models = [LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c"]
    if method == "slerp":
        models, extra = models[:1], {"t": 0.3}
    req = lambda: _req(method, None if method == "linear" else LLAMA / "base", models, **extra)  # noqa: E731
    merge(req(), tmp_path / "whole", dtype="float32")
    monkeypatch.setattr(batch, "SUB_BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(streaming, "SUB_ELEMENTS", 40)
    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(engine, "BLOCK_BYTES", 1024)
    merge(req(), tmp_path / "blocked", dtype="float32")
    a, b = open_checkpoint(tmp_path / "whole"), open_checkpoint(tmp_path / "blocked")
    assert a.names == b.names
    for n in a.names:
        assert torch.equal(a.get_raw(n), b.get_raw(n)), n


def test_passthrough_at_scale_one_copies_the_stored_tensors(tmp_path):
    from surgery.merge.methods import passthrough

    method = passthrough.METHODS[0]
    real, calls = method.merge, []
    # at scale 1 nothing is decoded or computed: the stored bytes, or a row-block cast
    object.__setattr__(method, "merge", lambda ctx: calls.append(ctx.name) or real(ctx))
    try:
        merge(_req("passthrough", None, [LLAMA / "ft-a"]), tmp_path / "same")
        assert calls == []
        merge(_req("passthrough", None, [LLAMA / "ft-a"], scale=0.5), tmp_path / "scaled")
        assert calls
    finally:
        object.__setattr__(method, "merge", real)
    src = open_checkpoint(LLAMA / "ft-a")
    out = open_checkpoint(tmp_path / "same")
    assert out.names == src.names
    for n in src.names:
        assert out.info(n).dtype == src.info(n).dtype and torch.equal(out.get_raw(n), src.get_raw(n)), n
    other = torch.float16 if src.info(src.names[0]).dtype != torch.float16 else torch.float32
    merge(_req("passthrough", None, [LLAMA / "ft-a"]), tmp_path / "cast", dtype=str(other).removeprefix("torch."))
    cast = open_checkpoint(tmp_path / "cast")
    merge(_req("passthrough", None, [LLAMA / "ft-a"], scale=0.5), tmp_path / "half", dtype="float32")
    half = open_checkpoint(tmp_path / "half")
    for n in src.names:
        if src.info(n).dtype.is_floating_point:
            assert torch.equal(cast.get_raw(n), src.get(n, dtype=torch.float32).to(other)), n
            assert torch.equal(half.get(n), src.get(n, dtype=torch.float32) * 0.5), n


def test_dare_is_reproducible_bit_for_bit(tmp_path):
    req = _req("dare_ties", LLAMA / "base", [LLAMA / "ft-a", LLAMA / "ft-b"], )
    req.models[0].parameters["density"] = 0.4
    for i in range(2):
        merge(req, tmp_path / f"d{i}", options=MergeOptions(seed=3))
    merge(req, tmp_path / "other", options=MergeOptions(seed=4))
    a, b, c = (open_checkpoint(tmp_path / x) for x in ("d0", "d1", "other"))
    assert all(torch.equal(a.get_raw(n), b.get_raw(n)) for n in a.names)
    assert not all(torch.equal(a.get_raw(n), c.get_raw(n)) for n in a.names)


def test_gpt2_fixture_ties_and_slerp(tmp_path):
    base = _load64(GPT2 / "base")
    a, b = _load64(GPT2 / "ft-a"), _load64(GPT2 / "ft-b")
    merge(_req("slerp", GPT2 / "base", [GPT2 / "ft-a"], t=0.4), tmp_path / "s")
    out = open_checkpoint(tmp_path / "s")
    for n in base:
        v0, v1 = base[n].reshape(-1), a[n].reshape(-1)
        n0, n1 = (float(v.norm()) if float(v.norm()) > 1e-8 else 1.0 for v in (v0, v1))   # zero biases: norm 1
        cos = float(v0 @ v1) / (n0 * n1)
        if abs(cos) > 0.9995:
            want = 0.6 * v0 + 0.4 * v1
        else:
            th = math.acos(cos)
            want = (math.sin(0.6 * th) * v0 + math.sin(0.4 * th) * v1) / math.sin(th)
        assert torch.allclose(out.get(n, dtype=torch.float64).reshape(-1), want, atol=1e-5), n
    merge(_req("ties", GPT2 / "base", [GPT2 / "ft-a", GPT2 / "ft-b"]), tmp_path / "t")
    assert len(open_checkpoint(tmp_path / "t").names) == len(base)


# ---- input checks ---------------------------------------------------------------------------

def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_incompatible_inputs_name_the_tensor(tmp_path):
    w = torch.ones(4, 3)
    base = _write(tmp_path / "base", {"a.weight": w, "embed_tokens.weight": torch.ones(10, 3)})
    bad_shape = _write(tmp_path / "shape", {"a.weight": torch.ones(4, 2), "embed_tokens.weight": torch.ones(10, 3)})
    bad_vocab = _write(tmp_path / "vocab", {"a.weight": w, "embed_tokens.weight": torch.ones(12, 3)})
    bad_dtype = _write(tmp_path / "dtype", {"a.weight": w.half(), "embed_tokens.weight": torch.ones(10, 3)})
    missing = _write(tmp_path / "missing", {"embed_tokens.weight": torch.ones(10, 3) * 2})
    for m, pattern in [(bad_shape, "tensor 'a.weight': shapes differ"),
                       (bad_vocab, "tensor 'embed_tokens.weight': vocabulary sizes differ.*tokenizer_source"),
                       (missing, "lacks tensor 'a.weight'.*`allow_missing`")]:
        with pytest.raises(IncompatibleCheckpointsError, match=pattern) as e:
            merge(_req("task_arithmetic", base, [m]), tmp_path / "out")
        assert e.value.exit_code == 3
    # float dtypes may differ, as in mergekit: every input is read in float32
    res = merge(_req("task_arithmetic", base, [bad_dtype], weight=0.5), tmp_path / "mixed")
    out = open_checkpoint(res.written.output)
    assert out.info("a.weight").dtype == torch.float32 and torch.equal(out.get("a.weight"), w)
    res = merge(_req("task_arithmetic", base, [missing]), tmp_path / "ok", options=MergeOptions(allow_missing=True))
    out = open_checkpoint(res.written.output)
    assert torch.equal(out.get("a.weight"), w) and torch.equal(out.get("embed_tokens.weight"), torch.ones(10, 3) * 2)


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown merge method 'nope'; choose one of linear"):
        merge(_req("nope", LLAMA / "base", [LLAMA / "ft-a"]), tmp_path / "o")
    with pytest.raises(UsageError, match="does not take `alpha`; it takes: weight, density, lambda"):
        merge(_req("ties", LLAMA / "base", [LLAMA / "ft-a"], alpha=0.5), tmp_path / "o")
    req = _req("ties", LLAMA / "base", [LLAMA / "ft-a"])
    req.models[0].parameters["density"] = [{"filter": "mlp", "value": "high"}]
    with pytest.raises(UsageError, match="`density` must be a number, got 'high'"):
        merge(req, tmp_path / "o")
    with pytest.raises(UsageError, match="`normalize` must be true or false"):
        merge(_req("ties", LLAMA / "base", [LLAMA / "ft-a"], normalize=1.5), tmp_path / "o")
    with pytest.raises(UsageError, match="needs a base model"):
        merge(_req("ties", None, [LLAMA / "ft-a"]), tmp_path / "o")
    with pytest.raises(UsageError, match="takes exactly 1 model"):
        merge(_req("slerp", LLAMA / "base", [LLAMA / "ft-a", LLAMA / "ft-b"]), tmp_path / "o")
    with pytest.raises(UsageError, match="`state`/`resume` need a continual method"):
        merge(_req("ties", LLAMA / "base", [LLAMA / "ft-a"]), tmp_path / "o", options=MergeOptions(state_dir=tmp_path / "s"))
    (tmp_path / "notstate").mkdir()
    (tmp_path / "notstate" / "x").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a continual-merge state folder"):
        merge(_req("opcm", LLAMA / "base", [LLAMA / "ft-a"]), tmp_path / "o2",
              options=MergeOptions(state_dir=tmp_path / "notstate"))
    assert (tmp_path / "notstate" / "x").exists()


# ---- recipes --------------------------------------------------------------------------------

def test_parameter_evaluation_rules():
    assert evaluate(0.3, "x", 0.7) == 0.3
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    filt = [{"filter": "mlp", "value": 0.2}, {"value": [0.0, 1.0]}]
    assert evaluate(filt, "layers.0.mlp.up_proj.weight", 1.0) == 0.2
    assert evaluate(filt, "layers.1.self_attn.q_proj.weight", 1.0) == 1.0


def test_recipe_keys_as_mergekit_reads_them(tmp_path):
    p = tmp_path / "r.yml"
    p.write_text("merge_method: ties\nbase_model: b\nmodules: {x: {}}\nmodels: [{model: a}]\n")
    with pytest.raises(UsageError, match="'modules' is not supported"):
        load_recipe(p)
    p.write_text("merge_method: ties\nbase_model: b\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n"
                 "models: [{model: a}]\n")
    with pytest.raises(UsageError, match="exactly one of 'models'.*or 'slices'"):
        load_recipe(p)
    p.write_text("merge_method: ties\nmodels: [{model: a, layer_range: [0, 2]}]\nparamters: {x: 1}\n")
    req = load_recipe(p)       # keys mergekit ignores are ignored, with a warning naming them
    assert any("unknown key 'paramters'" in w for w in req.warnings)
    assert any("models[0]: unknown key 'layer_range'" in w for w in req.warnings)
    p.write_text("merge_method: ties\nmodels: [{model: a, parameters: {weight: {value: 1, when: 2}}}]\n")
    with pytest.raises(UsageError, match="weight"):
        load_recipe(p)
    p.write_text("merge_method: ties\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]\n")
    with pytest.raises(UsageError, match=r"slices\[0\].sources\[0\]: 'layer_range' \[3, 1\] is empty"):
        load_recipe(p)
    p.write_text("merge_method: ties\nmodels: [{model: a}]\ntokenizer_source: base\ntokenizer: {source: union}\n")
    with pytest.raises(UsageError, match="either 'tokenizer_source' or 'tokenizer'"):
        load_recipe(p)
    p.write_text("merge_method: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("merge_method: nope\nbase_model: b\nmodels: [{model: a}]\n")
    req = load_recipe(p)
    with pytest.raises(UsageError, match="unknown merge method 'nope'"):
        merge(req, tmp_path / "o")


def test_model_references():
    from surgery.merge import ModelRef

    r = ModelRef.parse("org/name@v1+adapters/lora@main")
    assert (r.path, r.revision, r.lora, r.lora_revision) == ("org/name", "v1", "adapters/lora", "main")
    assert str(r) == "org/name@v1+adapters/lora@main" and r.location == "org/name@v1"
    rel = os.path.relpath(LLAMA / "base")
    assert ModelRef.parse(rel).key == ModelRef.parse(str(LLAMA / "base")).key        # one model, however written
    assert ModelRef.parse(rel).key != ModelRef.parse(str(LLAMA / "ft-a")).key
    for bad in ["a+b+c", "a@b@c", "+x", ""]:
        with pytest.raises(UsageError):
            ModelRef.parse(bad)


def test_opcm_is_deterministic_with_worker_threads(tmp_path):
    """Projections run on worker threads; results are consumed in order, so two runs write the
    same bytes (λ_t included)."""
    fts = [LLAMA / f"ft-{c}" for c in "abc"]
    previous = torch.get_num_threads()
    torch.set_num_threads(3)      # three workers (each on one intra-op thread), whatever the machine
    try:
        outs = [merge(_req("opcm", LLAMA / "base", fts), tmp_path / f"o{i}", dtype="float32") for i in range(2)]
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    assert outs[0].report["steps"] == outs[1].report["steps"]
    a, b = open_checkpoint(tmp_path / "o0"), open_checkpoint(tmp_path / "o1")
    assert all(torch.equal(a.get_raw(n), b.get_raw(n)) for n in a.names)


def test_opcm_tight_memory_budget_gives_the_same_bytes(tmp_path, monkeypatch):
    """With room for one projection in flight at a time, the merge is byte-identical to the
    default scheduling."""
    from surgery.merge import stepwise

    fts = [LLAMA / f"ft-{c}" for c in "abc"]
    merge(_req("opcm", LLAMA / "base", fts), tmp_path / "pool", dtype="float32")
    budget = stepwise._Pool.footprint(64 * 64)
    real_init = stepwise._Pool.__init__

    def tight(self, device, enabled):
        real_init(self, device, enabled)
        self.budget = budget        # one 64x64 step in flight at a time

    monkeypatch.setattr(stepwise._Pool, "__init__", tight)
    merge(_req("opcm", LLAMA / "base", fts), tmp_path / "tight", dtype="float32")
    a, b = open_checkpoint(tmp_path / "pool"), open_checkpoint(tmp_path / "tight")
    for n in a.names:       # same bytes: the order of results never depends on the scheduling
        assert torch.equal(a.get_raw(n), b.get_raw(n)), n


def test_state_output_and_inputs_never_overlap(tmp_path):
    """The state is an output and, resumed, an input: -o may not be it, and it may not be -o."""
    fts = [LLAMA / "ft-a", LLAMA / "ft-b"]
    x = tmp_path / "X"
    with pytest.raises(UsageError, match="output .*X is the input .*X"):
        merge(_req("opcm", LLAMA / "base", fts), x, options=MergeOptions(state_dir=x))
    assert not x.exists()
    merge(_req("opcm", LLAMA / "base", fts[:1]), tmp_path / "a", options=MergeOptions(state_dir=tmp_path / "S"))
    before = (tmp_path / "S" / "state.json").read_bytes()
    with pytest.raises(UsageError, match="is the input"):
        merge(_req("", None, fts[1:]), tmp_path / "S", force=True, options=MergeOptions(resume_dir=tmp_path / "S"))
    with pytest.raises(UsageError, match="lies inside the input"):
        merge(_req("", None, fts[1:]), tmp_path / "S" / "out", options=MergeOptions(resume_dir=tmp_path / "S"))
    with pytest.raises(UsageError, match="contains the input"):
        merge(_req("opcm", LLAMA / "base", fts), tmp_path / "o", options=MergeOptions(state_dir=tmp_path / "o" / "s"))
    with pytest.raises(UsageError, match="is not a continual-merge state"):   # the state may not replace a model
        merge(_req("opcm", LLAMA / "base", fts), tmp_path / "o", options=MergeOptions(state_dir=LLAMA / "ft-a"))
    with pytest.raises(UsageError, match="lies inside the input"):
        merge(_req("opcm", LLAMA / "base", fts), tmp_path / "o", options=MergeOptions(state_dir=LLAMA / "ft-a" / "s"))
    assert (tmp_path / "S" / "state.json").read_bytes() == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("decomposition", ["svd", "gram"])
def test_opcm_bytes_do_not_depend_on_the_thread_count(tmp_path, decomposition):
    fts = [LLAMA / f"ft-{c}" for c in "abc"]
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            merge(_req("opcm", LLAMA / "base", fts), tmp_path / f"t{threads}",
                  options=MergeOptions(decomposition=decomposition))
    finally:
        torch.set_num_threads(previous)
    a, b = open_checkpoint(tmp_path / "t1"), open_checkpoint(tmp_path / "t2")
    assert all(torch.equal(a.get_raw(n), b.get_raw(n)) for n in a.names)
    assert (tmp_path / "t1" / "README.md").read_text() == (tmp_path / "t2" / "README.md").read_text().replace("t2", "t1")
