"""A named .safetensors file whose folder also holds a pytorch_model.bin (and no
model.safetensors): the commands that build a transformers model score the named tensors,
never the sibling pickle transformers would find on its own."""

from __future__ import annotations

import shutil

import pytest
import torch
from hostile_helpers import LLAMA
from safetensors.torch import load_file


@pytest.mark.slow
def test_eval_scores_the_named_file_not_the_sibling_pickle(cli, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(LLAMA / "base", d)
    (d / "model.safetensors").rename(d / "named.safetensors")
    decoy = {k: torch.zeros_like(v) for k, v in load_file(str(d / "named.safetensors")).items()}
    torch.save(decoy, d / "pytorch_model.bin")
    ref = cli("eval", "ppl", LLAMA / "base", "--json")
    got = cli("eval", "ppl", d / "named.safetensors", "--json")
    assert ref.code == 0 and got.code == 0, got.stderr
    assert got.json()["perplexity"] == pytest.approx(ref.json()["perplexity"], rel=1e-6)
    # the decoy's all-zero weights would give the uniform model: perplexity = vocabulary size
    assert abs(got.json()["perplexity"] - 512) > 1e-3
