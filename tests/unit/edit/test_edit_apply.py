"""edit apply: pre-checks in closed form, stop / skip / ignore, base verification, the written
tensors against W + Σ ΔW computed here, and a real collapse on SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.edit.apply import apply_edits
from surgery.core.errors import IncompatibleCheckpointsError, OutputExistsError, UsageError

EMB = "model.embed_tokens.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def llama(fixtures_dir):
    return open_checkpoint(fixtures_dir / "llama-tiny" / "base")


@pytest.fixture
def three_edits(llama, tmp_path, make_rank1):
    """small (embeddings), big (embeddings, collapses the tiny model), small (down_proj)."""
    return [make_rank1(llama, EMB, 1e-3, tmp_path / "e0.safetensors", seed=1),
            make_rank1(llama, EMB, 100.0, tmp_path / "e1.safetensors", seed=2),
            make_rank1(llama, DOWN, 1e-3, tmp_path / "e2.safetensors", seed=3)]


def _rank1(ckpt, name, scale, seed):
    """The same ΔW as conftest.rank1_edit, in float64."""
    rows, cols = ckpt.info(name).shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, 1, generator=g, dtype=torch.float64)
    v = torch.randn(cols, 1, generator=g, dtype=torch.float64)
    return scale * (u / u.norm()) @ (v / v.norm()).T


def _expect(out_dir, ckpt, deltas: dict[str, list[torch.Tensor]]):
    out = open_checkpoint(out_dir)
    for name in ckpt.names:
        if name in deltas:
            ref = ckpt.get(name, dtype=torch.float64) + sum(deltas[name])
            got = out.get(name, dtype=torch.float64)
            # one bf16 rounding of W + ΔW
            assert torch.all((got - ref).abs() <= ref.abs() * 2 ** -8 + 1e-12), name
        else:
            assert torch.equal(out.get_raw(name), ckpt.get_raw(name)), name  # copied untouched


@pytest.mark.slow
def test_prechecks_closed_form(llama, tmp_path, make_rank1, probe6):
    scale = 0.37
    p = make_rank1(llama, DOWN, scale, tmp_path / "e.safetensors")
    res = apply_edits(llama, [p], tmp_path / "out", text=probe6)
    row = res.report["edits"][0]["tensors"][0]
    w = llama.get(DOWN, dtype=torch.float64)
    assert row["delta_norm"] == pytest.approx(scale, rel=1e-5)  # ‖s·û v̂ᵀ‖_F = s
    assert row["rel_norm"] == pytest.approx(scale / w.norm().item(), rel=1e-5)
    assert row["sigma_ratio"] == pytest.approx(scale / torch.linalg.svdvals(w)[0].item(), rel=1e-4)
    assert row["over"] is (row["rel_norm"] > 0.1 or row["sigma_ratio"] > 0.5)
    assert row["base_check"] == "base"
    _expect(tmp_path / "out", llama, {DOWN: [_rank1(llama, DOWN, scale, 0)]})


def test_stop_writes_last_good_state(llama, tmp_path, three_edits, probe6):
    res = apply_edits(llama, three_edits, tmp_path / "out", text=probe6, on_collapse="stop")
    rep = res.report
    assert (not res.passed) and rep["collapsed_at"] == 1
    assert [e["verdict"] for e in rep["edits"]] == ["ok", "collapsed (rolled back)", "not reached"]
    assert rep["edits"][1]["ratio"] > 1e3 and rep["edits"][1]["precheck"] == "over"
    assert rep["final_perplexity"] == rep["edits"][0]["perplexity"]
    _expect(tmp_path / "out", llama, {EMB: [_rank1(llama, EMB, 1e-3, 1)]})


@pytest.mark.slow
def test_skip_drops_only_the_offender(llama, tmp_path, three_edits, probe6):
    res = apply_edits(llama, three_edits, tmp_path / "out", text=probe6, on_collapse="skip")
    rep = res.report
    assert res.passed
    assert [e["verdict"] for e in rep["edits"]] == ["ok", "collapsed (skipped)", "ok"]
    # the big edit was rolled back by subtraction: the next check is back near the baseline
    assert rep["edits"][2]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert rep["accepted"] == 2 and rep["rejected"] == 1
    _expect(tmp_path / "out", llama, {EMB: [_rank1(llama, EMB, 1e-3, 1)], DOWN: [_rank1(llama, DOWN, 1e-3, 3)]})


@pytest.mark.slow
def test_ignore_keeps_everything(llama, tmp_path, three_edits, probe6):
    res = apply_edits(llama, three_edits, tmp_path / "out", text=probe6, on_collapse="ignore")
    assert [e["verdict"] for e in res.report["edits"]] == ["ok", "collapsed (ignored)", "collapsed (ignored)"]
    from surgery.edit.plot import plot_perplexity

    assert plot_perplexity(res.report, tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _expect(tmp_path / "out", llama, {EMB: [_rank1(llama, EMB, 1e-3, 1), _rank1(llama, EMB, 100.0, 2)],
                                      DOWN: [_rank1(llama, DOWN, 1e-3, 3)]})


@pytest.mark.slow
def test_check_every_isolates_offender_in_group(llama, tmp_path, three_edits, probe6):
    # thresholds off, so only the group check after the third edit runs; skip then re-checks one by one
    res = apply_edits(llama, three_edits, tmp_path / "out", text=probe6, on_collapse="skip", check_every=3,
                      max_rel_norm=1e9, max_sigma_ratio=1e9)
    rep = res.report
    assert [c["after_edit"] for c in rep["checks"]] == [None, 2, 0, 1, 2]
    assert [e["verdict"] for e in rep["edits"]] == ["ok", "collapsed (skipped)", "ok"]
    # with default thresholds the big edit's pre-check forces a check right after it
    res2 = apply_edits(llama, three_edits, tmp_path / "out2", text=probe6, on_collapse="stop", check_every=3)
    assert [c["after_edit"] for c in res2.report["checks"]] == [None, 1]
    assert (not res2.passed) and [e["verdict"] for e in res2.report["edits"]][:2] == ["collapsed (rolled back)"] * 2


@pytest.mark.slow
def test_base_verification(llama, fixtures_dir, tmp_path, make_rank1, probe6):
    other = open_checkpoint(fixtures_dir / "llama-tiny" / "ft-a")
    wrong = make_rank1(other, DOWN, 1e-3, tmp_path / "wrong.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match="was made against a different 'model.layers.0.mlp.down_proj.weight'.*`force_base=True`") as exc:
        apply_edits(llama, [wrong], tmp_path / "out", text=probe6)
    assert exc.value.exit_code == 3
    unrec = make_rank1(llama, DOWN, 1e-3, tmp_path / "unrec.safetensors", record_sha=False)
    res = apply_edits(llama, [wrong, unrec], tmp_path / "out", text=probe6, force_base=True)
    assert [e["tensors"][0]["base_check"] for e in res.report["edits"]] == ["mismatch (forced)", "unrecorded"]
    # an edit made on top of another edit's output verifies against the chained state
    first = make_rank1(llama, DOWN, 0.05, tmp_path / "first.safetensors", seed=5)
    apply_edits(llama, [first], tmp_path / "after-first", text=probe6)
    second = make_rank1(open_checkpoint(tmp_path / "after-first"), DOWN, 0.05, tmp_path / "second.safetensors", seed=6)
    with pytest.raises(IncompatibleCheckpointsError):
        apply_edits(llama, [second], tmp_path / "o2", text=probe6)
    res = apply_edits(llama, [first, second], tmp_path / "o3", text=probe6)
    assert [e["tensors"][0]["base_check"] for e in res.report["edits"]] == ["base", "chained"]


def test_usage_and_input_errors(llama, fixtures_dir, tmp_path, make_rank1, probe6):
    e = make_rank1(llama, DOWN, 1e-3, tmp_path / "e.safetensors")
    for kw, msg in [({"on_collapse": "panic"}, "`on_collapse` must be one of stop, skip, ignore"),
                    ({"max_ppl_ratio": 1.0}, "`max_ppl_ratio` must be above 1"),
                    ({"check_every": 0}, "`check_every` must be at least 1"),
                    ({"max_ppl": -1.0}, "`max_ppl` must be positive")]:
        with pytest.raises(UsageError, match=msg):
            apply_edits(llama, [e], tmp_path / "out", text=probe6, **kw)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists; pass `force=True`"):
        apply_edits(llama, [e], tmp_path / "exists", text=probe6)
    gpt2 = open_checkpoint(fixtures_dir / "gpt2-tiny" / "base")
    foreign = make_rank1(gpt2, "transformer.h.0.mlp.c_proj.weight", 1.0, tmp_path / "g.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match="edits 'transformer.h.0.mlp.c_proj.weight', which .* does not have"):
        apply_edits(llama, [foreign, e], tmp_path / "out", text=probe6)
    with pytest.raises(UsageError, match="already above `max_ppl` 10"):
        apply_edits(llama, [e], tmp_path / "out", text=probe6, max_ppl=10.0)


@pytest.mark.realmodel
def test_smollm2_large_rank1_down_proj_collapses_tiny_passes(smollm2_dir, tmp_path, make_rank1):
    ckpt = open_checkpoint(smollm2_dir)
    name = "model.layers.10.mlp.down_proj.weight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a LAPACK call with 2 OpenMP threads on a busy 2-core machine is ~100x slower
    try:
        sigma = torch.linalg.svdvals(ckpt.get(name, dtype=torch.float64))[0].item()
    finally:
        torch.set_num_threads(threads)
    tiny = make_rank1(ckpt, name, 0.01 * sigma, tmp_path / "tiny.safetensors", seed=1)
    large = make_rank1(ckpt, name, 100 * sigma, tmp_path / "large.safetensors", seed=2)
    text = tmp_path / "probe.txt"
    from surgery.eval.perplexity import probe_text

    text.write_text("\n".join(probe_text().splitlines()[:4]))
    res = apply_edits(ckpt, [tiny, large], tmp_path / "out", text=text, on_collapse="skip", ctx=32)
    t, big = res.report["edits"]
    assert t["verdict"] == "ok" and t["ratio"] < 1.05
    assert big["verdict"] == "collapsed (skipped)" and big["ratio"] > 10 * res.report["thresholds"]["max_ppl_ratio"]
    assert big["tensors"][0]["sigma_ratio"] == pytest.approx(100, rel=1e-3) and big["precheck"] == "over"
    assert t["tensors"][0]["sigma_ratio"] == pytest.approx(0.01, rel=1e-3) and t["precheck"] == "ok"
