"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", https://arxiv.org/abs/2312.06795), with mergekit 0.1.5's
semantics: each task vector loses its ``gamma`` fraction of largest magnitudes (outliers) and
enough of its smallest to keep ``density`` of its entries, then the family's merge
(:mod:`.sparsify`): a weighted sum (``breadcrumbs``) or TIES' sign election
(``breadcrumbs_ties``).

With n entries, keep = int(density · n), top = int(gamma · n) and
bottom = max(0, n − keep − top): the kept entries are positions [bottom, bottom + keep) of
the ascending order of |τ| (so when density + gamma > 1 fewer than ``top`` outliers go).
Equal magnitudes are ordered by flat index — what a stable ascending sort gives; mergekit's
``torch.sort`` is not stable on CPU, so its choice among them is unspecified. At
``density`` 1 (the default) nothing is dropped, whatever ``gamma``, as in mergekit.
"""

from __future__ import annotations

from ..method import WEIGHT, Batch, Param, TensorContext
from .sparsify import INT8_MASK, LAMBDA, Sparsify, density_param, gta_rows, normalize_param, rescale_param

GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0, help="fraction of the largest magnitudes removed")


def _method(consensus: bool):
    def merge(ctx: TensorContext):
        rules = [Sparsify("outliers", float(p["density"]), gamma=float(p["gamma"])) for p in ctx.model_params]
        return gta_rows(ctx, rules, consensus=consensus)
    return merge


_PARAMS = (WEIGHT, density_param(), GAMMA, LAMBDA, normalize_param(False), rescale_param(False), INT8_MASK)

METHODS = (
    Batch("breadcrumbs", "https://arxiv.org/abs/2312.06795",
          "drop each task vector's largest (gamma) and smallest entries, then a weighted sum", _PARAMS, _method(False)),
    Batch("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795",
          "breadcrumbs' sparsification, then TIES' sign election", _PARAMS, _method(True)),
)
