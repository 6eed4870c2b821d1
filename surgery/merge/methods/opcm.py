"""Sequential orthogonal merging, OPCM (Tang et al. 2025, "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
https://arxiv.org/abs/2501.09522; reference: FusionBench ``fusion_bench/method/opcm/``).

Per 2-D projection weight, the new task vector τ is projected away from the dominant
singular directions of the current merged task vector M = U Σ Vᵀ:

    τ̃ = τ − U_r (U_rᵀ τ V_r) V_rᵀ − Σ_{i ≥ r} (u_iᵀ τ v_i) u_i v_iᵀ

(the top-left r×r block and the diagonal of τ in the (U, V) basis), with the split rank r
the first index where cumsum(σ)/Σσ exceeds ``alpha``. Then S_t = λ_{t−1} M + τ̃ (every other
tensor: S_t = λ_{t−1} M + τ) and one global λ_t = ‖S_t‖ / mean_i ‖τ_i‖ rescales the model:
θ^(t) = θ0 + S_t / λ_t.

Diagonal entries are removed only for singular directions M actually has (σ_i above
σ_max·max(m, n)·eps_float32): when M is rank deficient, the singular vectors of its zero
singular values are arbitrary, and removing τ along them would make the result depend on
the SVD routine's choice. For a full-rank M (every real fine-tune) this is exactly the
reference's full-matrix rule.
"""

from __future__ import annotations

import math

import torch

from ...checkpoint.roles import EMBEDDING_TYPES, sublayer_of
from ..method import Continual, StepContext, flag, unit

DECOMPOSITIONS = ("gram", "svd")
def split_rank(s: torch.Tensor, alpha: float) -> int:
    """First index j with cumsum(σ)_j / Σσ > alpha (plain sum of σ); 0 when none (alpha ≥ 1) or Σσ = 0.

    The ratio is clamped to 1: rounding can make the last cumulative sum exceed the total,
    which would otherwise turn alpha = 1 into r = k − 1 instead of 0.
    """
    total = float(s.double().sum())
    if not total > 0:
        return 0
    above = torch.nonzero((torch.cumsum(s.double(), 0) / total).clamp(max=1.0) > alpha)
    return int(above[0, 0]) if above.numel() else 0


def _rank_floor(s: torch.Tensor, shape: tuple[int, int]) -> float:
    if s.numel() == 0:
        return 0.0
    return float(s.max()) * max(shape) * torch.finfo(torch.float32).eps


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh.mT


def _gram(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD of ``m`` from the eigendecomposition of its smaller Gram matrix.

    The Gram matrix and its eigendecomposition are float64 (squaring the singular values
    must not lose the small ones); the other factor is then ``m`` times the eigenvectors
    divided by σ, in ``m``'s dtype. Only the directions with σ above the rank floor are
    returned (the others are not determined by ``m``), in descending order of σ.
    """
    rows, cols = m.shape
    tall = rows >= cols
    m64 = m.double()
    gram = m64.mT @ m64 if tall else m64 @ m64.mT
    del m64
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    keep = s > _rank_floor(s, (rows, cols))
    s, evecs = s[keep].to(m.dtype), evecs[:, keep].to(m.dtype)
    if tall:
        return (m @ evecs) / s, s, evecs
    return evecs, s, (m.mT @ evecs) / s


def decompose(m: torch.Tensor, method: str = "gram") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, V) of a 2-D tensor: ``svd`` (LAPACK reduced SVD) or ``gram`` (eigh of the smaller Gram matrix)."""
    if method == "svd":
        return _svd(m)
    if method == "gram":
        return _gram(m)
    raise ValueError(f"unknown decomposition {method!r}; choose one of {', '.join(DECOMPOSITIONS)}")


def project_task_vector(merged: torch.Tensor, tau: torch.Tensor, alpha: float, keep_diagonal: bool = False,
                        decomposition: str = "gram") -> tuple[torch.Tensor, int]:
    """OPCM's projection of a new task vector against the current merged task vector.

    Args:
        merged: M, the current merged task vector θ^(t−1) − θ0 (2-D).
        tau: τ_t, the new task vector (same shape).
        alpha: Split-rank threshold on the cumulative sum of singular values.
        keep_diagonal: Do not remove the diagonal of τ in the (U, V) basis (early releases
            of the reference did not).
        decomposition: ``gram`` (fast) or ``svd`` (exact LAPACK).

    Returns:
        (τ̃, r): the projected task vector and the split rank used.
    """
    return _project(merged, tau, alpha, keep_diagonal, decomposition)


def _project(merged, tau, alpha, keep_diagonal, decomposition):
    u, s, v = decompose(merged, decomposition)
    floor = _rank_floor(s, tuple(merged.shape))
    rank = int((s > floor).sum()) if s.numel() else 0
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    r = min(split_rank(s, alpha), rank)
    out = tau.clone()
    if r > 0:
        block = u[:, :r].mT @ tau @ v[:, :r]                 # r×r coordinates in the top subspace
        out -= u[:, :r] @ block @ v[:, :r].mT
    if not keep_diagonal and rank > r:
        tail_u, tail_v = u[:, r:], v[:, r:]
        diag = ((tau @ tail_v) * tail_u).sum(0)              # u_iᵀ τ v_i for i ≥ r
        out -= (tail_u * diag) @ tail_v.mT
    return out, r


def opcm_tensor(merged: torch.Tensor | None, tau: torch.Tensor, prev_lambda: float, *, alpha: float,
                project: bool, keep_diagonal: bool = False, decomposition: str = "gram") -> tuple[torch.Tensor, int | None]:
    """S_t for one tensor: λ_{t−1} M + τ̃ (projected weights) or λ_{t−1} M + τ (others).

    ``merged=None`` is the first step (S_1 = τ_1). Returns (S_t, split rank or None).
    """
    if merged is None:
        return tau, None
    if project:
        projected, r = project_task_vector(merged, tau, alpha, keep_diagonal, decomposition)
        return prev_lambda * merged + projected, r
    return prev_lambda * merged + tau, None


# ---- the method ---------------------------------------------------------------------------

def projected(name: str, shape: tuple[int, ...], params: dict) -> bool:
    """OPCM projects 2-D weight matrices and the output head; embeddings only when asked."""
    if len(shape) != 2 or min(shape) == 0:
        return False
    sub = sublayer_of(name)
    if not (sub in EMBEDDING_TYPES or "embed" in name) or sub == "lm_head":
        return True
    return bool(params["project_embeddings"])


def _step(ctx: StepContext) -> torch.Tensor:
    # S_{t−1} = λ_{t−1} M, so S_t = λ_{t−1} M + τ̃ = S_{t−1} + τ̃ (τ̃ projected against M's, i.e.
    # S_{t−1}'s, singular directions).
    if ctx.prev is None:
        return ctx.tau
    if ctx.whole and projected(ctx.name, ctx.shape, ctx.params):
        out, r = opcm_tensor(ctx.prev, ctx.tau, 1.0, alpha=float(ctx.params["alpha"]), project=True,
                             keep_diagonal=bool(ctx.params["keep_diagonal"]),
                             decomposition=ctx.options.get("decomposition", "gram"))
        ctx.info["split_rank"] = r
        return out
    return ctx.prev + ctx.tau


def _end_step(scalars: dict[str, float], totals: dict[str, float], t: int) -> dict[str, float]:
    """λ_t = ‖S_t‖ / mean_{i≤t} ‖τ_i‖ (1 when either is 0)."""
    mean = totals["sum_norms"] / t
    s_norm = math.sqrt(totals["state_sq"])
    return {"lambda": s_norm / mean if mean > 0 and s_norm > 0 else 1.0}


def _output(state: torch.Tensor, base: torch.Tensor, params: dict, scalars: dict[str, float]) -> torch.Tensor:
    return base + state / scalars["lambda"]


METHODS = (
    Continual("opcm", "https://arxiv.org/abs/2501.09522",
              "orthogonal projection of each new task vector, adaptive global rescale (continual)",
              (unit("alpha", 0.5, help="split-rank threshold on cumsum(σ)/Σσ"),
               flag("keep_diagonal", False, "keep τ's diagonal in the (U, V) basis"),
               flag("project_embeddings", False, "project embeddings too (default: summed like biases)")),
              _step, _output, whole=projected, uses_totals=True, end_step=_end_step, initial={"lambda": 1.0},
              threaded=True),
)
