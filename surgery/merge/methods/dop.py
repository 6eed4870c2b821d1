"""Dual-projection continual merging, DOP ("Continual Model Merging without Data: Dual
Projections for Balancing Stability and Plasticity", NeurIPS 2025; reference: FusionBench
``fusion_bench/method/dop/dop_general.py``, ``DOPMerging``, the paper's published code).

Models are merged one at a time. The first is taken as is (S_1 = τ_1). At step t ≥ 2, each
2-D projection weight of the merged model is found by gradient descent, from the average of
the previous merge and the new model, on two data-free losses — one per model i ∈ {merged so
far, new} with target X_i (S_{t−1}, τ_t) and the top singular triplets (U_i, σ_i, V_i) of X_i:

    L_i(W) = ‖diag(σ_i) U_iᵀ (W − X_i)‖²_F + ‖(W − X_i) V_i diag(σ_i)‖²_F

(``svd_proj_space`` ``u`` or ``v`` keeps one term). U_i and V_i keep the first r singular
directions, r = the number of cumsum(σ)/Σσ below ``svd_epsilon``. W moves by ``num_steps``
Adam steps (learning rate ``lr``, torch's defaults otherwise) on Σ c_i L_i, where c = (α, 1−α)
or — with ``mgda`` — the minimum-norm convex combination of the two gradients each divided
by its loss (MGDA, Sener & Koltun 2018), smoothed by an exponential moving average started
at (α, 1−α) with decay ``ema_beta``. Every other tensor (embeddings, norms, biases) is the
average of the previous merge and the new model: S_t = (S_{t−1} + τ_t) / 2. The merged
model is θ0 + S_T.

Defaults are FusionBench's ``config/method/dop/dop.yaml``: α = 0.8, lr 1e-4, 200 steps, MGDA
with EMA β = 0.999, svd_epsilon 0.99999, space ``uv``. FusionBench shuffles the models by
default; here the order is the command line's (``--shuffle`` shuffles with ``--seed``).

Exactly the reference's arithmetic, computed with less work: the gradient of L_i is
2 U_i diag(σ_i²) U_iᵀ Δ + 2 Δ V_i diag(σ_i²) V_iᵀ (Δ = W − X_i), evaluated once per step and
task (the reference differentiates every loss twice per step through autograd), with the
m×m / n×n products U diag(σ²) Uᵀ precomputed where that is cheaper than the factored form,
and in task-vector coordinates (W − θ0), which the losses and Adam do not depend on. A loss
of exactly 0 (a target equal to the start) contributes a zero normalised gradient instead of
the reference's 0/0.
"""

from __future__ import annotations

import torch

from ..method import MAX_STEPS, Continual, Param, StepContext, flag, unit
from .opcm import projected
from .subspace import singular_values, top_svd

SPACES = ("u", "v", "uv")


def split_rank(s: torch.Tensor, epsilon: float) -> int:
    """Number of leading singular values whose cumsum(σ)/Σσ is below ``epsilon`` (the
    reference's ``searchsorted(cumsum_ratio, epsilon)``); 0 for a zero matrix."""
    total = float(s.double().sum())
    if not total > 0:
        return 0
    ratio = torch.cumsum(s.double(), 0) / total
    return int(torch.searchsorted(ratio, torch.tensor([min(epsilon, 1.0)], dtype=ratio.dtype)))


class _Target:
    """One model's loss L_i: its target X_i and projections, with the cheaper form of each
    projection product chosen once."""

    def __init__(self, x: torch.Tensor, epsilon: float, space: str):
        rows, cols = x.shape
        self.x = x
        r = split_rank(singular_values(x), epsilon)
        u, s, vt = top_svd(x, r)
        self.s2 = s * s
        self.u_side = space in ("u", "uv") and r > 0
        self.v_side = space in ("v", "uv") and r > 0
        # factored U diag(σ²) Uᵀ Δ costs 2·r·rows·cols, the dense rows×rows product rows²·cols
        self.dense_u = 2 * r >= rows
        self.dense_v = 2 * r >= cols
        self.u, self.vt = u, vt
        self.a = (u * self.s2) @ u.mT if self.u_side and self.dense_u else None
        self.b = (vt.mT * self.s2) @ vt if self.v_side and self.dense_v else None

    def grad(self, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(∇L_i(W), L_i(W))."""
        d = w - self.x
        g = torch.zeros_like(w)
        loss = 0.0
        if self.u_side:
            if self.a is not None:
                ad = self.a @ d
                loss += float(torch.dot(d.reshape(-1), ad.reshape(-1)))
                g.add_(ad)
            else:
                p = self.u.mT @ d                              # r × cols
                loss += float(((p * p).sum(1) * self.s2).sum())
                g.add_((self.u * self.s2) @ p)
        if self.v_side:
            if self.b is not None:
                db = d @ self.b
                loss += float(torch.dot(d.reshape(-1), db.reshape(-1)))
                g.add_(db)
            else:
                q = d @ self.vt.mT                             # rows × r
                loss += float(((q * q).sum(0) * self.s2).sum())
                g.add_((q * self.s2) @ self.vt)
        return g.mul_(2.0), loss


def min_norm_pair(g0: torch.Tensor, g1: torch.Tensor) -> float:
    """c in [0.001, 0.999] minimising ‖c g0 + (1 − c) g1‖ (MGDA for two tasks, with the
    reference solver's clamping of the end points)."""
    v11 = float(torch.dot(g0.reshape(-1), g0.reshape(-1)))
    v12 = float(torch.dot(g0.reshape(-1), g1.reshape(-1)))
    v22 = float(torch.dot(g1.reshape(-1), g1.reshape(-1)))
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))


def dop_matrix(prev: torch.Tensor, tau: torch.Tensor, *, alpha: float = 0.8, lr: float = 1e-4,
               num_steps: int = 200, mgda: bool = True, ema: bool = True, ema_beta: float = 0.999,
               svd_epsilon: float = 0.99999, space: str = "uv") -> torch.Tensor:
    """DOP's merged task matrix from the previous merge's S_{t−1} and the new τ_t (2-D, float32).

    See the module docstring; the arguments are the method's parameters.
    """
    targets = [_Target(prev, svd_epsilon, space), _Target(tau, svd_epsilon, space)]
    w = torch.nn.Parameter(prev.add(tau).mul_(0.5))
    opt = torch.optim.Adam([w], lr=lr)
    weights = [alpha, 1.0 - alpha]
    for _ in range(num_steps):
        grads = [t.grad(w.data) for t in targets]
        if mgda:
            normed = [g / loss if loss != 0 else torch.zeros_like(g) for g, loss in grads]
            c = min_norm_pair(*normed)
            del normed
            sol = [c, 1.0 - c]
            if ema:
                weights = [ema_beta * weights[i] + (1 - ema_beta) * sol[i] for i in range(2)]
                sol = weights
        else:
            sol = weights
        w.grad = grads[0][0].mul_(float(sol[0])).add_(grads[1][0], alpha=float(sol[1]))
        del grads
        opt.step()
    return w.data


# ---- the method ---------------------------------------------------------------------------

def _step(ctx: StepContext) -> torch.Tensor:
    if ctx.prev is None:
        return ctx.tau
    if ctx.whole and projected(ctx.name, ctx.shape, ctx.params):
        p = ctx.params
        return dop_matrix(ctx.prev, ctx.tau, alpha=float(p["alpha"]), lr=float(p["lr"]),
                          num_steps=int(p["num_steps"]), mgda=bool(p["mgda"]), ema=bool(p["ema"]),
                          ema_beta=float(p["ema_beta"]), svd_epsilon=float(p["svd_epsilon"]),
                          space=str(p["svd_proj_space"]))
    return ctx.prev.add(ctx.tau).mul_(0.5)


def _output(state: torch.Tensor, base: torch.Tensor, params: dict, scalars: dict[str, float]) -> torch.Tensor:
    return base + state


METHODS = (
    # uses_totals: no whole-model scalar is needed, but one pass per model runs the heavy
    # per-matrix optimisations on the worker pool (one matrix per core, one thread each):
    # parallel, and byte-identical whatever the thread count.
    Continual("dop", "https://github.com/tanganke/fusion_bench/tree/main/fusion_bench/method/dop",
              "dual orthogonal projections: each new model merged by data-free optimisation (continual)",
              (unit("alpha", 0.8, help="weight of the merged model's loss (MGDA: its starting weight)"),
               Param("lr", 1e-4, low=0.0, low_open=True, help="Adam learning rate"),
               Param("num_steps", 200, type="int", low=0, high=MAX_STEPS, help="Adam steps per matrix and model"),
               flag("mgda", True, "balance the two losses by MGDA (else fixed alpha)"),
               flag("ema", True, "smooth the MGDA weights by a moving average"),
               unit("ema_beta", 0.999, help="decay of the moving average"),
               unit("svd_epsilon", 0.99999, help="share of cumsum(σ) kept in the projections"),
               Param("svd_proj_space", "uv", type="str", choices=SPACES, help="project on U, V or both"),
               flag("project_embeddings", False, "optimise embeddings too (default: averaged like biases)")),
              _step, _output, whole=projected, uses_totals=True, threaded=True),
)
