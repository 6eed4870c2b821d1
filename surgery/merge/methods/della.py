"""DELLA (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", https://arxiv.org/abs/2406.11617), with mergekit 0.1.5's
semantics: in every row of a task vector (a 1-D tensor is one row) entries are ranked by
magnitude and kept at random with probability from density − epsilon (smallest) to
density + epsilon (largest), linearly in the rank; with ``rescale`` (on) the survivors keep
the task vector's L1 norm; then TIES' sign election (``della``) or a weighted sum
(``della_linear``) — :mod:`.sparsify` has the shared computation and the draw rule.

As in mergekit, density ± epsilon must lie inside (0, 1) for every model whose density is
below 1 (checked for every tensor before any is read); equal magnitudes in a row are ranked
by index (mergekit's ``torch.argsort`` order is unspecified there), and a row of one entry is
kept with probability ``density`` (mergekit fails on it).
"""

from __future__ import annotations

from ...core.errors import UsageError
from ..method import WEIGHT, Batch, Param, TensorContext
from .sparsify import INT8_MASK, LAMBDA, Sparsify, density_param, gta_rows, normalize_param, rescale_param

EPSILON = Param("epsilon", 0.15, per_model=True,
                help="half-width of the keep probabilities around the density (density ± epsilon inside (0, 1))")


def check_epsilon(ctx: TensorContext) -> None:
    """density ± epsilon inside (0, 1) for every model with density < 1 (mergekit checks
    density − epsilon > 0 and density + epsilon < 1, which a negative epsilon passes while its
    probabilities leave [0, 1] and torch.bernoulli fails: here |epsilon| counts)."""
    for i, p in enumerate(ctx.model_params):
        d, eps = float(p["density"]), abs(float(p["epsilon"]))
        if d < 1 and not (d - eps > 0 and d + eps < 1):
            raise UsageError(f"tensor {ctx.name!r}, model {i + 1}: `epsilon` = {p['epsilon']!r} with `density` = "
                             f"{p['density']!r} puts the keep probabilities outside (0, 1); density ± epsilon must "
                             f"lie inside (0, 1), so |epsilon| < {min(d, 1 - d):g} here.")


def _method(consensus: bool):
    def merge(ctx: TensorContext):
        rules = [Sparsify("della", float(p["density"]), epsilon=float(p["epsilon"])) for p in ctx.model_params]
        return gta_rows(ctx, rules, consensus=consensus)
    return merge


def _params(normalize: bool):
    return (WEIGHT, density_param(), EPSILON, LAMBDA, normalize_param(normalize), rescale_param(True), INT8_MASK)


METHODS = (
    Batch("della", "https://arxiv.org/abs/2406.11617",
          "magnitude-ranked random drop per row + L1 rescale, then TIES' sign election", _params(True),
          _method(True), check=check_epsilon),
    Batch("della_linear", "https://arxiv.org/abs/2406.11617",
          "magnitude-ranked random drop per row + L1 rescale, then a weighted sum", _params(False),
          _method(False), check=check_epsilon),
)
