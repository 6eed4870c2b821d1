"""surgery.checkpoint.reader: lazy, validated tensor access (header validation: test_format.py)."""

from __future__ import annotations

import torch

from surgery.checkpoint import open_checkpoint


def test_get_rows_matches_slice(fixtures_dir):
    ck = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    name = "model.layers.0.mlp.up_proj.weight"
    full = ck.get(name)
    assert torch.equal(ck.get_rows(name, 10, 37, dtype=torch.float32), full[10:37])
