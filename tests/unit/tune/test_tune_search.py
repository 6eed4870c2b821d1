"""surgery tune's pieces: durations and probes, the search space and its recipes, the pattern
search on a closed-form objective, objectives and the Pareto front."""

from __future__ import annotations

import random

import pytest

from surgery.core.errors import UsageError
from surgery.merge.params import Params
from surgery.merge.recipe import MergeRequest, ModelEntry, evaluate
from surgery.merge.registry import get_method
from surgery.tune import parse_duration, parse_probe
from surgery.tune.search import PatternSearch, Point, Stop, objective, pareto, search
from surgery.tune.space import Space, group_filters

LLAMA_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
               "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
               "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
               "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
               "model.layers.0.mlp.down_proj.weight"]
GPT2_NAMES = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
              "transformer.h.0.mlp.c_proj.bias", "transformer.h.0.ln_1.weight"]


@pytest.mark.parametrize("text,seconds", [("10m", 600), ("90s", 90), ("1h30m", 5400), ("45", 45), ("2.5m", 150),
                                          (None, None), (30, 30.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "", "m", "5x"])
def test_parse_duration_rejects_text(text):
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration(text)


def test_parse_probe():
    assert parse_probe("code=a/b.txt") == ("code", "a/b.txt", 1.0)
    assert parse_probe("legal=x@y.txt@2.5") == ("legal", "x@y.txt", 2.5)
    for bad in ("code", "=x.txt", "code=", "c=x.txt@0"):
        with pytest.raises(UsageError, match="probe"):
            parse_probe(bad)


def test_group_filters_select_each_group_and_nothing_else():
    for names, attention in ((LLAMA_NAMES, "self_attn.q_proj"), (GPT2_NAMES, "attn.c_attn")):
        f = group_filters(names)
        assert attention in f["attention"]
        for n in names:
            hits = {g for g, fs in f.items() if any(x in n for x in fs)}
            expected = {"attention"} if ("attn" in n and not n.endswith("ln_1.weight")) else (
                {"mlp"} if "mlp" in n else set())
            assert hits == expected, n
    with pytest.raises(UsageError, match="groups"):
        group_filters(["a.weight", "b.weight"])


def _template(n=3):
    return MergeRequest("task_arithmetic", "base", [ModelEntry(f"m{i}") for i in range(n)], {}, None)


def test_space_of_task_arithmetic_is_one_weight_per_model():
    s = Space(get_method("task_arithmetic"), _template())
    assert [d.label for d in s.dims] == ["weight[0]", "weight[1]", "weight[2]"]
    assert s.start == [1.0, 1.0, 1.0]
    req = s.request([0.5, 1.23456, 3.0])
    # weights stop at 1 (each fine-tune's own step) unless extrapolation is asked for
    assert [(d.low, d.high) for d in s.dims] == [(0.0, 1.0)] * 3
    assert [m.parameters["weight"] for m in req.models] == [0.5, 1.0, 1.0]
    wide = Space(get_method("task_arithmetic"), _template(), extrapolate=True)
    assert [(d.low, d.high) for d in wide.dims] == [(0.0, 2.0)] * 3          # the declared range
    req = wide.request([0.5, 1.23456, 3.0])
    assert [m.parameters["weight"] for m in req.models] == [0.5, 1.2346, 2.0]   # rounded, clipped to the range
    # a recipe's own larger value stays inside the range (the start is never clipped)
    t = _template()
    t.models[1].parameters["weight"] = 1.5
    s = Space(get_method("task_arithmetic"), t)
    assert s.start == [1.0, 1.5, 1.0] and [d.high for d in s.dims] == [1.5] * 3


def test_space_of_ties_searches_shared_density_and_lambda():
    template = MergeRequest("ties", "base", [ModelEntry("a", {"density": 0.3}), ModelEntry("b")], {"lambda": 0.8},
                            None)
    s = Space(get_method("ties"), template)
    assert [d.label for d in s.dims] == ["weight[0]", "weight[1]", "density", "lambda"]
    assert s.start == [1.0, 1.0, 1.0, 0.8]
    assert [(d.low, d.high) for d in s.dims] == [(0.0, 1.0), (0.0, 1.0), (0.1, 1.0), (0.5, 1.0)]
    req = s.request([1.0, 0.5, 0.4, 1.5])
    assert req.parameters == {"lambda": 1.0, "density": 0.4}
    req = Space(get_method("ties"), template, extrapolate=True).request([1.0, 0.5, 0.4, 1.5])
    assert req.parameters == {"lambda": 1.5, "density": 0.4}
    assert all("density" not in m.parameters for m in req.models)   # a model's own value would win


def test_grouped_space_writes_mergekit_filters_that_resolve_per_tensor():
    filters = group_filters(LLAMA_NAMES)
    flat = Space(get_method("task_arithmetic"), _template(2), extrapolate=True)
    grouped, x = flat.grouped(filters, [0.7, 1.3])
    assert grouped.extrapolate
    assert [d.label for d in grouped.dims][:3] == ["weight[0].attention", "weight[0].mlp", "weight[0].rest"]
    assert x == [0.7, 0.7, 0.7, 1.3, 1.3, 1.3]
    x = [0.1, 0.2, 0.3, 1.1, 1.2, 1.3]
    req = grouped.request(x)
    params = Params(get_method("task_arithmetic"), req, num_layers=1)
    expect = {"model.layers.0.self_attn.k_proj.weight": [0.1, 1.1], "model.layers.0.mlp.down_proj.weight": [0.2, 1.2],
              "model.embed_tokens.weight": [0.3, 1.3], "model.layers.0.input_layernorm.weight": [0.3, 1.3]}
    for name, w in expect.items():
        assert [p["weight"] for p in params.per_model(name)] == w
        assert [evaluate(m.parameters["weight"], name, 0.0) for m in req.models] == w


def test_space_keys_are_equal_for_equal_merges():
    s = Space(get_method("task_arithmetic"), _template())
    assert s.key([1.0, 0.5, 0.25]) == s.key([1.00001, 0.5, 0.25])
    assert s.key([1.0, 0.5, 0.25]) != s.key([1.0, 0.5, 0.3])


def test_unsearchable_method_is_refused():
    with pytest.raises(UsageError, match="nothing|no parameter"):
        Space(get_method("opcm"), _template())


# ---- the search on a closed form ------------------------------------------------------------------

def _quadratic(target):
    calls = []

    def evaluate(space, x, phase):
        calls.append((space.method.name, tuple(x), phase))
        return sum((a - b) ** 2 for a, b in zip(x, target[space.method.name]))
    return evaluate, calls


def test_pattern_search_finds_a_quadratic_minimum():
    s = Space(get_method("task_arithmetic"), _template(), extrapolate=True)
    evaluate, calls = _quadratic({"task_arithmetic": [0.4, 1.3, 0.9]})
    best = PatternSearch(evaluate, random.Random(0), "refine").run(Point(s, s.start, evaluate(s, s.start, "x")))
    assert best.value < 0.01 and len(calls) < 80
    assert all(0.0 <= v <= 2.0 for _, x, _ in calls for v in x)


def test_search_screens_methods_refines_the_best_and_is_deterministic():
    spaces = [Space(get_method(m), MergeRequest(m, "base", [ModelEntry("a"), ModelEntry("b")], {}, None))
              for m in ("task_arithmetic", "ties", "tsv")]
    target = {"task_arithmetic": [0.6, 0.8], "ties": [1.0, 1.0, 0.5, 1.0], "tsv": [0.2, 0.2]}
    offset = {"task_arithmetic": 0.0, "ties": 0.3, "tsv": 0.5}
    runs = []
    for _ in range(2):
        ev, calls = _quadratic(target)
        best = search(spaces, lambda s, x, p: ev(s, x, p) + offset[s.method.name], seed=7, group_space=None)
        runs.append(calls)
        assert best.space.method.name == "task_arithmetic" and best.value < 0.01
    assert runs[0] == runs[1]
    # screened: each method's defaults, then each at its weights halved (task arithmetic λ = 0.5)
    # but ties, which normalizes the weights (halving them all would merge the same model)
    assert [c[2] for c in runs[0][:5]] == ["screen"] * 5 and runs[0][5][2] == "refine"
    assert [(c[0], c[1]) for c in runs[0][:5]] == [
        ("task_arithmetic", (1.0, 1.0)), ("ties", (1.0, 1.0, 1.0, 1.0)), ("tsv", (1.0, 1.0)),
        ("task_arithmetic", (0.5, 0.5)), ("tsv", (0.5, 0.5))]


def test_search_stops_on_the_budget_with_the_best_so_far():
    s = Space(get_method("task_arithmetic"), _template())
    n = [0]

    def evaluate(space, x, phase):
        n[0] += 1
        if n[0] > 5:
            raise Stop
        return sum((v - 0.5) ** 2 for v in x)

    best = search([s], evaluate, seed=0, group_space=None)
    assert n[0] == 6 and best is not None and best.value <= 3 * 0.25


def test_objectives_and_pareto_front():
    nll = {"a": 1.0, "b": 3.0}
    assert objective(nll, "mean", {}) == 2.0
    assert objective(nll, "worst", {}) == 3.0
    assert objective(nll, "weighted", {"a": 3.0, "b": 1.0}) == pytest.approx(1.5)
    trials = [{"nll": {"a": 1, "b": 5}}, {"nll": {"a": 2, "b": 2}}, {"nll": {"a": 3, "b": 3}},
              {"nll": {"a": 5, "b": 1}}, {"nll": {"a": 2, "b": 2}}]
    assert pareto(trials) == [0, 1, 3, 4]


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe\x00 not text", "not UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "nests too deeply"),
    (b'{"format": "surgery-tune-log", "version": 1, "setup": {}}\n{"key": "k", "method": "ties", '
     b'"settings": {}, "nll": {"a": "x"}}\n', "damaged trial line"),
    (b'{"format": "surgery-tune-log", "version": 1, "setup": []}\n', "no setup object"),
    (b'{"format": "other"}\n', "not a surgery tune log"),
])
def test_a_damaged_resume_log_is_one_input_error(tmp_path, content, message):
    """--resume reads a file the user names: anything but a tune log is an input error naming
    the file (exit 3), never a traceback."""
    from surgery.core.errors import InputError
    from surgery.tune.log import read_log

    p = tmp_path / "log.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_log(p)
    with pytest.raises(InputError, match="does not exist"):
        read_log(tmp_path / "missing.jsonl")


def test_surrogate_windows_are_evenly_spaced_and_placed_by_the_seed():
    from surgery.tune.evaluate import surrogate_windows

    assert surrogate_windows(8, 0, 1) == surrogate_windows(8, None, 1) == surrogate_windows(8, 8, 1) == list(range(8))
    assert surrogate_windows(5, 9, 0) == list(range(5))
    for seed in range(20):
        got = surrogate_windows(30, 3, seed)
        assert got == surrogate_windows(30, 3, seed)
        assert len(got) == 3 and got == sorted(got) and 0 <= got[0] < 10
        assert [b - a for a, b in zip(got, got[1:])] in ([10, 10], [9, 10], [10, 9], [9, 11], [11, 9], [10, 11], [11, 10])
    assert len({tuple(surrogate_windows(30, 3, s)) for s in range(20)}) > 1


def test_parse_windows():
    from surgery.core.errors import UsageError
    from surgery.tune import parse_windows

    assert parse_windows("all") == parse_windows("0") == parse_windows(None) == 0
    assert parse_windows("4") == parse_windows(4) == 4
    for bad in ("-1", "x", "2.5"):
        with pytest.raises(UsageError, match="search_windows"):
            parse_windows(bad)
