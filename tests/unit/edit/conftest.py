"""Edit files for the edit tests: seeded rank-1 updates of chosen size on fixture tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def rank1_edit(ckpt, name: str, scale: float, path: Path, seed: int = 0, record_sha: bool = True,
               description: str = "") -> Path:
    """Write an edit ΔW = scale · û v̂ᵀ (unit vectors) for ``name`` of ``ckpt``."""
    from surgery.edit.format import Edit, TensorEdit, save_edit

    rows, cols = ckpt.info(name).shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, 1, generator=g, dtype=torch.float64)
    v = torch.randn(cols, 1, generator=g, dtype=torch.float64)
    te = TensorEdit(name, u=(u / u.norm()).float(), v=(v / v.norm()).float(), s=torch.tensor([float(scale)]))
    sha = {name: ckpt.tensor_sha256(name)} if record_sha else {}
    save_edit(Edit({name: te}, base_sha256=sha, info={"description": description or f"rank-1 x{scale:g}"}), path)
    return path


@pytest.fixture
def make_rank1():
    return rank1_edit


@pytest.fixture(scope="session")
def probe6(tmp_path_factory) -> Path:
    """The first six probe sentences: enough to judge collapse, fast to score."""
    from surgery.eval.perplexity import probe_text

    p = tmp_path_factory.mktemp("probe") / "probe6.txt"
    p.write_text("\n".join(probe_text().splitlines()[:6]) + "\n")
    return p
