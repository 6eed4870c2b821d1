"""surgery.inspect: a checkpoint summarised from its headers, against safetensors' own reader."""

from __future__ import annotations

import json
import shutil

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.inspect import inspect, tied_duplicates


def test_counts_and_rows_match_safetensors(fixtures_dir):
    folder = fixtures_dir / "gpt2-tiny" / "base"
    rep = inspect(folder).report
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata()
    numel = {k: 1 for k in shapes}
    for k, s in shapes.items():
        for d in s:
            numel[k] *= d
    assert [r["name"] for r in rep["tensors"]] == sorted(shapes)
    assert {r["name"]: r["shape"] for r in rep["tensors"]} == shapes
    assert rep["num_tensors"] == len(shapes) and rep["num_parameters"] == sum(numel.values())
    assert rep["total_bytes"] == sum(r["bytes"] for r in rep["tensors"]) == sum(rep["dtypes"].values())
    assert rep["shards"] == [{"file": "model.safetensors", "bytes": (folder / "model.safetensors").stat().st_size}]
    assert rep["config"]["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
    assert {k: v for k, v in rep["metadata"].items() if k != "surgery"} == {k: v for k, v in (meta or {}).items()
                                                                            if k != "surgery"}


def test_tied_head_counted_once(fixtures_dir, tmp_path):
    folder = tmp_path / "tied"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", folder)
    sd = load_file(str(folder / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = emb.clone()
    save_file(sd, str(folder / "model.safetensors"))
    ck = open_checkpoint(folder)
    assert tied_duplicates(ck) == ["lm_head.weight"]
    rep = inspect(ck).report
    assert rep["num_parameters"] == sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    assert inspect(folder).report["num_parameters"] == sum(t.numel() for t in sd.values())
