"""`surgery tune` on the tiny fixtures: a candidate scored in memory equals `surgery merge` +
the perplexity of the written checkpoint; the output folder (merge, recipe, report, log)
re-runs and resumes; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.eval.perplexity import load_causal_lm
from surgery.merge import MergeRequest, ModelEntry
from surgery.tune.evaluate import Evaluator

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "fixtures" / "llama-tiny"
MODELS = [LLAMA / n for n in ("ft-a", "ft-b", "ft-c")]
PROBE = (ROOT / "surgery" / "data" / "probe.txt").read_text().splitlines()


@pytest.fixture
def probes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(PROBE[:30]))
    b.write_text("\n".join(PROBE[30:60]))
    return [f"a={a}", f"b={b}"]


def _nll(model, ids, ctx):
    """Mean NLL over disjoint windows of ``ctx`` tokens, written out: each window predicts its
    tokens after the first from the ones before them inside the window."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids), ctx):
            w = ids[s:s + ctx]
            if len(w) < 2:
                continue
            lp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
            tgt = w[1:]
            total += float(-lp[torch.arange(len(tgt)), tgt].sum())
            count += len(tgt)
    return total / count


@pytest.mark.slow
def test_in_memory_candidate_equals_merge_and_eval(cli, tmp_path, probes, one_thread):
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=32)
    request = MergeRequest("ties", str(LLAMA / "base"), [ModelEntry(str(m), {"weight": w}) for m, w in
                                                          zip(MODELS, (1.0, 0.5, 1.5))], {"density": 0.4}, None)
    ev.load(request)
    got = ev.score("search")
    res = cli("merge", "-m", "ties", "--base", LLAMA / "base", *MODELS, "-p", "1:weight=1.0", "-p", "2:weight=0.5",
              "-p", "3:weight=1.5", "-p", "density=0.4", "-o", tmp_path / "merged", "--quiet")
    assert res.code == 0, res.stderr
    merged = open_checkpoint(tmp_path / "merged")
    for n in merged.names:        # the weights scored are exactly the bytes merge writes
        assert torch.equal(ev.targets[n].detach().to(merged.info(n).dtype), merged.get_raw(n)), n
    model, _ = load_causal_lm(merged)
    for p in ev.probes:
        ref = _nll(model, p.search.ids, 32)
        assert got[p.name] == pytest.approx(ref, rel=1e-5)
        assert p.search.ids.numel() + p.report.ids.numel() == p.tokens


@pytest.mark.slow
def test_tsv_trials_rescale_cached_factors_to_the_bytes_merge_writes(cli, tmp_path, probes, one_thread):
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=32)

    def request(ws, alpha):
        return MergeRequest("tsv", str(LLAMA / "base"), [ModelEntry(str(m), {"weight": w}) for m, w in zip(MODELS, ws)],
                            {"alpha": alpha}, None)

    ev.load(request((1.0, 1.0, 1.0), 1.0))          # computes the factors
    computed, held = ev.factor_cache.seconds, ev.factor_cache.nbytes
    assert computed > 0 and held > 0
    ev.load(request((0.5, 1.5, 2.0), 0.8))          # rescales them: nothing computed again
    assert ev.factor_cache.seconds == computed
    res = cli("merge", "-m", "tsv", "--base", LLAMA / "base", *MODELS, "-p", "1:weight=0.5", "-p", "2:weight=1.5",
              "-p", "3:weight=2.0", "-p", "alpha=0.8", "-o", tmp_path / "merged", "--quiet")
    assert res.code == 0, res.stderr
    merged = open_checkpoint(tmp_path / "merged")
    for n in merged.names:
        assert torch.equal(ev.targets[n].detach().to(merged.info(n).dtype), merged.get_raw(n)), n
    ev.load(request((0.0, 1.0, 1.0), 1.0))          # a zero weight drops that model's directions: new factors
    assert ev.factor_cache.seconds > computed


@pytest.mark.slow
@pytest.mark.parametrize("method", ["breadcrumbs_ties", "ties"])
def test_trimming_trials_reuse_sorted_magnitudes_and_write_the_bytes_merge_writes(cli, tmp_path, probes, one_thread,
                                                                                  method):
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=32)

    def request(density):
        return MergeRequest(method, str(LLAMA / "base"), [ModelEntry(str(m), {"weight": w}) for m, w in
                                                          zip(MODELS, (1.0, 0.5, 1.5))], {"density": density}, None)

    ev.load(request(1.0))                             # nothing trimmed: nothing sorted
    assert ev.sorted_cache.seconds == 0
    ev.load(request(0.7))                             # sorts every model's |τ| once
    sorted_once, held = ev.sorted_cache.seconds, ev.sorted_cache.nbytes
    numel = sum(ev.base._data[n].numel() for n in ev.names)
    assert sorted_once > 0 and held == 4 * numel * len(MODELS)
    ev.load(request(0.35))                            # another density: binary searches only
    assert ev.sorted_cache.seconds == sorted_once
    _assert_loaded_equals_merge(cli, tmp_path, ev, method, "density=0.35")


@pytest.mark.slow
def test_a_trial_that_fills_the_caches_times_a_second_merge(cli, tmp_path, probes, monkeypatch):
    """The first tsv trial computes the factors: its whole first merge is reported as
    prepare_seconds, and it merges again with everything cached (nothing computed) for its own
    time; later trials compute nothing and report no preparation."""
    loads = []
    load = Evaluator.load

    def counting(self, request, *, seed=0):
        before = self.cache_state()
        load(self, request, seed=seed)
        loads.append((request.method, before, self.cache_state()))

    monkeypatch.setattr(Evaluator, "load", counting)
    res = cli("tune", "tsv", "--base", LLAMA / "base", *MODELS, *sum((["--probe", p] for p in probes), []),
              "-o", tmp_path / "tuned", "--trials", "3", "--ctx", "32", "--json", "--quiet")
    assert res.code == 0, res.stderr
    trials = res.json()["trials"]
    assert trials[0]["prepare_seconds"] > 0 and [t["prepare_seconds"] for t in trials[1:]] == [0.0, 0.0]
    first, again = loads[0], loads[1]
    assert first[2][0] > first[1][0]              # the first merge computed the factors
    assert again[1] == again[2] == first[2]        # the second found them all
    assert all(after == before for _, before, after in loads[2:5])


@pytest.mark.slow
def test_compiling_the_fused_ties_loop_counts_as_preparation_once(probes, one_thread, monkeypatch):
    """The first TIES merge of a process compiles (or loads from numba's disk cache) the fused
    loop for its dtype and model count: cache_state counts it, so tune reports it with the
    preparation instead of as that trial's merge; later merges compile nothing."""
    from surgery.merge.methods import fused
    if fused.kernel() is None:
        pytest.skip("numba is not installed: the torch path runs and nothing is compiled")
    monkeypatch.setattr(fused, "_kernel", None)       # a fresh process's state
    monkeypatch.setattr(fused, "_tried", False)
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=32)

    def request(*weights):
        return MergeRequest("ties", str(LLAMA / "base"), [ModelEntry(str(m), {"weight": w}) for m, w in
                                                          zip(MODELS, weights)], {"density": 1.0}, None)

    before = ev.cache_state()
    ev.load(request(1.0, 0.5, 1.5))
    after = ev.cache_state()
    assert fused.compiled() == 1                       # float32, three models: one specialization
    assert after == (before[0] + 1, before[1])
    ev.load(request(0.5, 1.0, 1.0))
    assert ev.cache_state() == after


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_trials_rescale_the_cached_task_matrix_to_the_bytes_merge_writes(cli, tmp_path, probes, one_thread, method):
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=32)

    def request(scale):
        return MergeRequest(method, str(LLAMA / "base"), [ModelEntry(str(m), {"weight": w}) for m, w in
                                                          zip(MODELS, (1.0, 0.5, 1.5))], {"scaling_factor": scale}, None)

    ev.load(request(1.0))
    computed = ev.factor_cache.seconds
    assert computed > 0
    ev.load(request(0.6))
    assert ev.factor_cache.seconds == computed        # rescaled, not decomposed again
    _assert_loaded_equals_merge(cli, tmp_path, ev, method, "scaling_factor=0.6")


@pytest.mark.slow
def test_race_is_the_full_score_or_stops_with_lower_bounds(probes, one_thread):
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=16)
    ev.load(MergeRequest("task_arithmetic", str(LLAMA / "base"), [ModelEntry(str(m)) for m in MODELS], {}, None))
    full = ev.score("search")
    nll, lower, share = ev.race(lambda lb: False)
    assert share == 1.0
    for p in ev.probes:
        assert nll[p.name] == pytest.approx(full[p.name], rel=1e-12)
        assert lower[p.name] == pytest.approx(full[p.name], rel=1e-12)
        assert p.search.score()["tokens_scored"] == p.search_scored
    nll, lower, share = ev.race(lambda lb: True)          # stops after the first round
    assert 0 < share < 1
    for p in ev.probes:    # the bound counts the unscored tokens as 0: below the full mean NLL
        assert 0 < lower[p.name] < full[p.name]
        scored = sum(min(w.scored, w.end - w.begin - 1) for w in p.chunks[0].windows)
        assert lower[p.name] == pytest.approx(nll[p.name] * scored / p.search_scored, rel=1e-12)


@pytest.mark.slow
def test_tune_writes_a_rerunnable_merge_recipe_and_report(cli, tmp_path, probes):
    out = tmp_path / "tuned"
    res = cli("tune", "task_arithmetic,tsv", "--base", LLAMA / "base", *MODELS, *sum((["--probe", p] for p in probes), []),
              "-o", out, "--trials", "8", "--budget", "10m", "--ctx", "64", "--json", "--quiet")
    assert res.code == 0, res.stderr
    doc = res.json()
    assert doc["output"] == str(out / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model", "pareto.png", "recipe.yml", "report.json", "report.md",
                                                    "trials.jsonl"]
    assert not (tmp_path / "tuned.tune.jsonl").exists()       # the running log moved into the output
    assert doc["trials_evaluated"] == 8 and len(doc["trials"]) == 8
    assert doc["stopped"] == "the trial limit (8) was reached"
    # screened: each method's defaults, then each with its weights halved
    assert [t["phase"] for t in doc["trials"][:5]] == ["screen"] * 4 + ["refine"]
    assert [(t["method"], t["settings"]) for t in doc["trials"][:4]] == [
        (m, {f"weight[{i}]": w for i in range(len(MODELS))}) for w in (1.0, 0.5) for m in ("task_arithmetic", "tsv")]
    # ranked on a surrogate (3 windows of each search part); the best 3 by it and the best
    # starting point re-scored on the whole search parts, the winner the best of those
    trials = doc["trials"]
    assert all(t["fidelity"] == "surrogate" for t in trials)
    complete = sorted((i for i, t in enumerate(trials) if not t["pruned"]), key=lambda i: trials[i]["objective"])
    top = sorted(set(complete[:3]) | {next(i for i in complete if trials[i]["phase"] == "screen")})
    assert doc["rescored"] == top
    assert [i for i, t in enumerate(trials) if "full_objective" in t] == sorted(top)
    best = trials[doc["best"]["trial"]]
    assert best["full_objective"] == min(trials[i]["full_objective"] for i in top) == doc["best"]["objective"]
    assert doc["best"]["search_nll"] == best["full_nll"] and doc["best"]["surrogate_nll"] == best["nll"]
    kinds = [h["kind"] for h in doc["held_out"]]
    assert kinds[0] == "best" and kinds.count("reference") == 4
    assert set(doc["best"]["held_out_nll"]) == {"a", "b"}
    # the recipe re-runs to the same bytes
    again = cli("merge", "--config", out / "recipe.yml", "-o", tmp_path / "again", "--quiet")
    assert again.code == 0, again.stderr
    a, b = open_checkpoint(out / "model"), open_checkpoint(tmp_path / "again")
    assert all(torch.equal(a.get_raw(n), b.get_raw(n)) for n in a.names)
    assert "Held-out perplexity" in (out / "report.md").read_text()
    # resuming from the log with more trials replays the first 8 and continues like a longer run
    res2 = cli("tune", "task_arithmetic,tsv", "--base", LLAMA / "base", *MODELS, *sum((["--probe", p] for p in probes), []),
               "-o", tmp_path / "more", "--trials", "3", "--budget", "10m", "--ctx", "64", "--json", "--quiet",
               "--resume", out / "trials.jsonl")
    assert res2.code == 0, res2.stderr
    doc2 = res2.json()
    assert doc2["trials_replayed"] == 8 and doc2["trials_evaluated"] == 3
    assert [t["settings"] for t in doc2["trials"][:8]] == [t["settings"] for t in doc["trials"]]
    assert [t["nll"] for t in doc2["trials"][:8]] == [t["nll"] for t in doc["trials"]]
    # the full scores of the earlier run are replayed, not recomputed
    for t, t2 in zip(doc["trials"], doc2["trials"][:8]):
        if "full_nll" in t:
            assert t2["full_nll"] == t["full_nll"]


@pytest.mark.slow
def test_surrogate_scores_the_chosen_windows_and_all_is_the_exact_search(cli, tmp_path, probes):
    args = ["task_arithmetic", "--base", LLAMA / "base", *MODELS, *sum((["--probe", p] for p in probes), []),
            "--trials", "5", "--budget", "10m", "--ctx", "16", "--json", "--quiet", "--no-references"]
    res = cli("tune", *args, "-o", tmp_path / "s", "--search-windows", "2", "--seed", "3")
    assert res.code == 0, res.stderr
    doc = res.json()
    texts = [(p.split("=")[0], p.split("=")[1], Path(p.split("=")[1]).read_text(), 1.0) for p in probes]
    ev = Evaluator(str(LLAMA / "base"), [str(m) for m in MODELS], texts, holdout=0.5, ctx=16)
    model, _ = load_causal_lm(open_checkpoint(tmp_path / "s" / "model"))
    best = doc["trials"][doc["best"]["trial"]]
    for p in ev.probes:
        chosen = doc["search_windows"][p.name]
        n = chosen["of"]
        assert chosen["scored"] == 2 and len(set(chosen["indices"])) == 2 and n == len(p.search.windows)
        # evenly spaced: the two picks are n/2 apart (rounded down)
        assert chosen["indices"][1] - chosen["indices"][0] in (n // 2, (n + 1) // 2)
        ids = p.search.ids
        total, count = 0.0, 0
        for k in chosen["indices"]:           # the written winner on its surrogate windows, by hand
            w = ids[k * 16:(k + 1) * 16]
            nll = _nll(model, w, 16)
            total += nll * (len(w) - 1)
            count += len(w) - 1
        assert best["nll"][p.name] == pytest.approx(total / count, rel=1e-5)
        assert best["full_nll"][p.name] == pytest.approx(_nll(model, ids, 16), rel=1e-5)
    # the same seed places the same windows; `all` is the exact search (every trial full)
    again = cli("tune", *args, "-o", tmp_path / "s2", "--search-windows", "2", "--seed", "3").json()
    assert again["search_windows"] == doc["search_windows"]
    assert [t["nll"] for t in again["trials"]] == [t["nll"] for t in doc["trials"]]
    exact = cli("tune", *args, "-o", tmp_path / "e", "--search-windows", "all").json()
    assert exact["search_windows"] is None and exact["rescored"] == []
    assert all(t["fidelity"] == "full" and "full_nll" not in t for t in exact["trials"])
    assert exact["best"]["search_nll"] == exact["trials"][exact["best"]["trial"]]["nll"]


def test_tune_errors_are_one_line(cli, tmp_path, probes):
    base = ["--base", LLAMA / "base", *MODELS]
    cases = [
        (["opcm", *base, "--probe", probes[0]], "cannot search 'opcm'"),
        (["nosuch", *base, "--probe", probes[0]], "unknown merge method"),
        (["ties", *base], "at least one probe"),
        (["ties", *base, "--probe", "a"], "NAME=FILE"),
        (["ties", *base, "--probe", probes[0], "--probe", probes[0]], "unique"),
        (["ties", *base, "--probe", probes[0], "--budget", "soon"], "not a duration"),
        (["ties", *base, "--probe", probes[0], "--search-windows", "some"], "--search-windows"),
        (["ties", *base, "--probe", f"x={tmp_path / 'missing.txt'}"], "missing.txt"),
    ]
    for args, message in cases:
        res = cli("tune", *args, "-o", tmp_path / "o")
        assert res.code in (2, 3), (args, res.stderr)
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # a choice is refused by the parser, before the library runs, naming the valid ones
    res = cli("tune", "ties", *base, "--probe", probes[0], "--objective", "best", "-o", tmp_path / "o")
    assert res.code == 2 and "'mean', 'worst', 'weighted'" in res.stderr and not (tmp_path / "o").exists()


def _assert_loaded_equals_merge(cli, tmp_path, ev, method, param):
    """The tensors tune loaded for weights 1.0 / 0.5 / 1.5 and ``param`` are the bytes
    ``surgery merge`` writes for the same request."""
    res = cli("merge", "-m", method, "--base", LLAMA / "base", *MODELS, "-p", "1:weight=1.0", "-p", "2:weight=0.5",
              "-p", "3:weight=1.5", "-p", param, "-o", tmp_path / "merged", "--quiet")
    assert res.code == 0, res.stderr
    merged = open_checkpoint(tmp_path / "merged")
    for n in merged.names:
        assert torch.equal(ev.targets[n].detach().to(merged.info(n).dtype), merged.get_raw(n)), n
