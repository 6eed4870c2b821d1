"""WUDI merging (2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", https://arxiv.org/abs/2503.08099; reference:
FusionBench ``fusion_bench/method/wudi/wudi.py``, ``WUDIMerging``).

The rows of a linear layer's task vector span the inputs its fine-tuning saw, so the
interference of a merged task matrix W on task i is measured without data by
‖(W − τ_i) τ_iᵀ‖²_F. Per 2-D projection weight, W starts at Σ τ_i and takes ``iter_num``
Adam steps (learning rate ``lr``, no weight decay, torch's defaults otherwise) on

    L(W) = Σ_i ‖(W − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F

Every other tensor is the mean of the task vectors. The merged model is θ0 + W. Defaults are
FusionBench's (``config/method/wudi/wudi.yaml``: 400 steps; lr 1e-5 as in its code), except
that embeddings are averaged like the other non-projection tensors unless
``project_embeddings`` is set (FusionBench optimises every 2-D tensor; an embedding's
vocabulary-sized Gram matrices make that the dominant cost, see docs/merge.md).

Same arithmetic as the reference, with less work: ∇L = 2 (W K − C) with K = Σ τ_iᵀτ_i/‖τ_i‖²
(n × n) and C = Σ τ_i τ_iᵀτ_i/‖τ_i‖² computed once, one product per step instead of the
reference's m × m interference matrices and their gradients through autograd. A task vector
of norm 0 contributes nothing (the reference divides 0 by 0). The steps run on one thread so
the bytes do not depend on the machine's thread count; ``surgery merge`` runs one matrix per
core on worker threads (:mod:`surgery.merge.ahead`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..method import MAX_STEPS, WEIGHT, Batch, Param, TensorContext, flag
from .opcm import projected
from .subspace import single_thread
from .tsv import mean_task_vector, weighted_taus


def wudi_matrix(taus: Sequence[torch.Tensor], *, lr: float = 1e-5, iter_num: int = 400) -> torch.Tensor:
    """WUDI's merged task matrix for the task matrices ``taus`` (2-D, float32)."""
    with single_thread():
        cols = taus[0].shape[1]
        k = torch.zeros(cols, cols, dtype=taus[0].dtype)
        c = torch.zeros_like(taus[0])
        w = torch.zeros_like(taus[0])
        for t in taus:
            w.add_(t)
            norm_sq = float(torch.dot(t.reshape(-1), t.reshape(-1)))
            if norm_sq == 0:
                continue
            k_i = (t.mT @ t).div_(norm_sq)
            k.add_(k_i)
            c.add_(t @ k_i)
        param = torch.nn.Parameter(w)
        opt = torch.optim.Adam([param], lr=lr, weight_decay=0)
        for _ in range(iter_num):
            param.grad = (param.data @ k).sub_(c).mul_(2.0)
            opt.step()
        return param.data


def _merge(ctx: TensorContext) -> torch.Tensor:
    taus = weighted_taus(ctx)
    p = ctx.params
    if projected(ctx.name, ctx.shape, p):
        delta = wudi_matrix(taus, lr=float(p["lr"]), iter_num=int(p["iter_num"]))
    else:
        delta = mean_task_vector(taus)
    del taus
    return delta.add_(ctx.base())


METHODS = (
    Batch("wudi", "https://arxiv.org/abs/2503.08099",
          "WUDI: each projection optimised, without data, against the interference its task vectors span",
          (WEIGHT, Param("iter_num", 400, type="int", low=0, high=MAX_STEPS, help="Adam steps per matrix"),
           Param("lr", 1e-5, low=0.0, low_open=True, help="Adam learning rate"),
           flag("project_embeddings", False, "optimise embeddings too (default: averaged like biases)")), _merge,
          threaded=True),
)
