"""The pieces of a recipe merge, each against values written out by hand: where a checkpoint's
layers are (layout), parameter scopes and their precedence, the output vocabulary and how each
model's rows are aligned to it."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.core.errors import IncompatibleCheckpointsError, UsageError
from surgery.merge import METHODS, MergeRequest, ModelEntry, SliceSource, SliceSpec, TokenizerSpec, TokenSpec
from surgery.merge.layout import layout_of
from surgery.merge.params import Params
from surgery.merge.vocab import AlignedRows, Vocabulary, gather_rows, strip_unused, union_tokenizer


# ---- layout ---------------------------------------------------------------------------------

def test_layout_of_llama_gpt2_bert():
    llama = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{s}" for i in range(3) for s in ("mlp.up_proj.weight", "input_layernorm.weight")]
    lay = layout_of(llama, {"num_hidden_layers": 3}, "llama")
    assert lay.prefix == "model.layers." and lay.num_layers == 3 and lay.count_key == "num_hidden_layers"
    assert lay.pre == ["model.embed_tokens.weight"] and sorted(lay.post) == ["lm_head.weight", "model.norm.weight"]
    assert lay.layers[1] == ["input_layernorm.weight", "mlp.up_proj.weight"]
    assert lay.name(7, "mlp.up_proj.weight") == "model.layers.7.mlp.up_proj.weight"
    assert lay.depth("model.layers.2.mlp.up_proj.weight") == 2 and lay.depth("model.norm.weight") is None

    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    lay = layout_of(gpt2, {"n_layer": 2}, "gpt2")
    assert lay.prefix == "transformer.h." and lay.count_key == "n_layer"
    assert sorted(lay.pre) == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert sorted(lay.post) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]

    bert = ["embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "pooler.dense.weight",
            "encoder.layer.0.output.dense.weight"]
    lay = layout_of(bert, None, "bert")
    assert lay.prefix == "encoder.layer." and lay.num_layers == 1 and lay.count_key is None
    assert sorted(lay.pre) == ["embeddings.LayerNorm.weight", "embeddings.word_embeddings.weight"]
    assert lay.post == ["pooler.dense.weight"]


def test_two_layer_stacks_cannot_be_sliced():
    names = ["language_model.model.layers.0.mlp.weight", "language_model.model.layers.1.mlp.weight",
             "vision_tower.encoder.layers.0.fc.weight"]
    lay = layout_of(names, {"num_hidden_layers": 2}, "vlm")
    assert len(lay.prefixes) == 2
    with pytest.raises(IncompatibleCheckpointsError, match="several layer stacks"):
        lay.check_stackable("recipe r.yml: slices[0]")
    with pytest.raises(IncompatibleCheckpointsError, match="no numbered layers"):
        layout_of(["a.weight"], None, "flat").check_stackable("here")


# ---- parameter scopes ------------------------------------------------------------------------

def _slices_request(method: str = "ties") -> MergeRequest:
    slices = [SliceSpec([SliceSource("b", (0, 2)), SliceSource("a", (2, 4), {"density": 0.9}),
                         SliceSource("c", (0, 2), {"weight": [{"filter": "mlp", "value": 5.0}]})],
                        base_model="b", parameters={"weight": 2.0, "lambda": [0.0, 1.0]})]
    return MergeRequest(method, "b", [], {"weight": 1.0, "density": 0.5, "lambda": 3.0, "normalize": False},
                        origin="r.yml", slices=slices)


def test_scopes_source_then_slice_then_top_level():
    req = _slices_request()
    p = Params(METHODS["ties"], req)
    scopes = lambda j: [p.source_settings[0][j], p.slice_settings[0], p.global_settings]  # noqa: E731
    shared_scopes = [p.slice_settings[0], p.global_settings]
    shared, per = p.resolve("model.layers.1.mlp.up_proj.weight", 0.25, shared_scopes,
                            [("model.layers.3.mlp.up_proj.weight", scopes(1)),
                             ("model.layers.1.mlp.up_proj.weight", scopes(2))])
    # lambda: the slice's gradient at t = 0.25 beats the top level's 3.0; normalize from the top level
    assert shared == {"lambda": pytest.approx(0.25), "normalize": False, "rescale": False, "int8_mask": False}
    # model a: its own density, the slice's weight; model c: its filtered weight, the top level's density
    assert per == [{"weight": 2.0, "density": 0.9}, {"weight": 5.0, "density": 0.5}]
    # a filter list that matches nothing falls through to the next scope (the slice's weight)
    _, per = p.resolve("model.layers.1.self_attn.q_proj.weight", 0.0, shared_scopes,
                       [("model.layers.1.self_attn.q_proj.weight", scopes(2))])
    assert per == [{"weight": 2.0, "density": 0.5}]


def test_per_model_filters_see_the_input_tensor_name():
    req = MergeRequest("linear", None, [], {}, origin="r.yml", slices=[SliceSpec(
        [SliceSource("a", (3, 4), {"weight": [{"filter": "layers.3.", "value": 7.0}, {"value": 1.0}]})])])
    p = Params(METHODS["linear"], req)
    _, per = p.resolve("model.layers.0.mlp.weight", 1.0, [p.slice_settings[0]],
                       [("model.layers.3.mlp.weight", [p.source_settings[0][0], p.slice_settings[0]])])
    assert per == [{"weight": 7.0}]


def test_required_parameter_missing_names_tensor_and_model():
    from surgery.merge.method import Batch, Param

    if "required" not in Param.__dataclass_fields__:
        pytest.skip("this interface has no required parameters")
    m = Batch("needs_t", "https://x", "s", (Param("t", None, per_model=True, low=0, high=1, required=True),),
              lambda c: None)
    req = MergeRequest("needs_t", "b", [ModelEntry("a", {"t": 0.5}), ModelEntry("c")], {}, origin="r.yml")
    p = Params(m, req)
    with pytest.raises(UsageError, match="needs `t`.*tensor 'x.weight' of model c"):
        p.resolve("x.weight", 0.0, [p.global_settings], [("x.weight", [s, p.global_settings])
                                                         for s in p.model_settings], ["a", "c"])


# ---- vocabularies ------------------------------------------------------------------------------

def _vocab(tokens: list[str], perms: dict[tuple, list[int]], spec: TokenizerSpec, base: tuple = ("base",),
           size: int | None = None, original: dict | None = None) -> Vocabulary:
    vocab = {t: i for i, t in enumerate(tokens)}
    return Vocabulary(None, vocab, size or len(tokens), perms, original or {}, base, spec, key_of=lambda s: (s,))


def test_row_map_sources_as_mergekit_assigns_them():
    # output tokens:     a   b   c   d   e
    perms = {("base",): [0, 1, -1, -1, -1],      # base has a, b
             ("x",): [2, -1, 0, 1, -1],          # x has a, c, d
             ("y",): [1, 0, -1, 2, -1]}          # y has a, b, d
    v = _vocab(list("abcde"), perms, TokenizerSpec("union"))
    rm = v.row_map([("base",), ("x",), ("y",)], ["base", "x", "y"], [2, 3, 3], "t")
    assert rm.own == [[0, 1, -1, -1, -1], [2, -1, 0, 1, -1], [1, 0, -1, 2, -1]]
    # a: everyone has it (no default); b: x lacks it, the base has it -> the base's row;
    # c: only x -> x's row; d: two models, not the base -> their mean; e: nobody -> zeros
    assert set(rm.defaults) == {1, 2, 3, 4}
    assert (rm.defaults[1].kind, rm.defaults[1].rows) == ("row", [(0, 1)])
    assert (rm.defaults[2].kind, rm.defaults[2].rows) == ("row", [(1, 0)])
    assert (rm.defaults[3].kind, rm.defaults[3].rows) == ("avg", [(1, 1), (2, 2)])
    assert rm.defaults[4].kind == "zero"


def test_forced_and_configured_tokens():
    perms = {("base",): [0, 1, 2], ("x",): [1, 0, -1]}
    spec = TokenizerSpec("union", tokens={"a": TokenSpec("model", "x", force=True),
                                          "c": TokenSpec("model_token", "x", token="z")})
    v = _vocab(list("abc"), perms, spec, original={("x",): {"q": 0, "z": 1}})
    rm = v.row_map([("base",), ("x",)], ["base", "x"], [3, 2], "t")
    assert rm.own == [[-1, 1, 2], [-1, 0, -1]]             # a is forced: nobody keeps its own row
    assert (rm.defaults[0].kind, rm.defaults[0].rows) == ("row", [(1, 1)])   # x's row of a
    assert (rm.defaults[2].kind, rm.defaults[2].rows) == ("row", [(1, 1)])   # x's row of its token z
    bad = _vocab(list("abc"), perms, TokenizerSpec("union", tokens={"c": TokenSpec("model", "w")}))
    with pytest.raises(UsageError, match="takes its row from w, which is not an input"):
        bad.row_map([("base",), ("x",)], ["base", "x"], [3, 2], "t")


def test_aligned_rows_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    perms = {("base",): [0, 1, -1, -1, 2], ("x",): [2, -1, 0, 1, 3], ("y",): [1, 0, -1, 2, -1]}
    tensors = [torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g), torch.randn(3, 4, generator=g)]
    v = _vocab(list("abcde"), perms, TokenizerSpec("union"), size=8)
    rm = v.row_map([("base",), ("x",), ("y",)], ["base", "x", "y"], [3, 4, 3], "t")
    aligned = AlignedRows(rm, [lambda a, e, t=t: t[a:e].clone() for t in tensors], (4,))
    for m, (key, t) in enumerate(zip(perms, tensors)):
        expect = torch.zeros(8, 4)
        for tid in range(5):
            p = perms[key][tid]
            if p >= 0:
                expect[tid] = t[p]
            elif tid == 1:                          # b: the base's row
                expect[tid] = tensors[0][1]
            elif tid == 2:                          # c: only x has it
                expect[tid] = tensors[1][0]
            elif tid == 3:                          # d: mean of x and y
                expect[tid] = (tensors[1][1] + tensors[2][2]) / 2
            elif tid == 4:                          # e (y lacks it): the base has it
                expect[tid] = tensors[0][2]
        expect[5:] = expect[:5].mean(0)             # padding rows: the mean of the vocabulary rows
        got = torch.cat([aligned.rows(m, 0, 3), aligned.rows(m, 3, 8)])
        assert torch.allclose(got, expect, atol=1e-6), key


def test_gather_rows_reads_runs():
    t = torch.arange(20.0).reshape(10, 2)
    reads = []

    def read(a, e):
        reads.append((a, e))
        return t[a:e]

    assert torch.equal(gather_rows(read, [2, 3, 4, 7, 1]), t[[2, 3, 4, 7, 1]])
    assert reads == [(2, 5), (7, 8), (1, 2)]


def _tokenizer(tokens: list[str], added: list[str] = ()):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    data = {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
            "added_tokens": []}
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(data)))
    tok.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in added])
    return tok


def test_union_and_stripping():
    base = _tokenizer(["<s>", "a", "b"], ["<pad>"])             # <pad> at id 3, beyond vocab_size 3
    x = _tokenizer(["<s>", "b", "q", "r"], ["<im>"])           # q, r new; <im> added at 4
    y = _tokenizer(["<s>", "a", "z"], ["<u0>", "<u1>"])         # vocab_size 3: <u0>, <u1> have no rows
    stripped = strip_unused(base, 3, "base")
    assert stripped.get_vocab() == {"<s>": 0, "a": 1, "b": 2} and "<pad>" in base.get_vocab()
    out = union_tokenizer(stripped, [(stripped, 3), (x, 5), (y, 3)])
    assert out.get_vocab() == {"<s>": 0, "a": 1, "b": 2, "q": 3, "r": 4, "z": 5, "<im>": 6}
