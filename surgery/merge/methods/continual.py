"""Continual baselines from the OPCM paper's comparison (FusionBench ``method/opcm/`` and
``method/magmax/``): continual task arithmetic, continual weight average and MagMax
(Marczak et al. 2024, https://arxiv.org/abs/2407.06322). Each is a fold over the task
vectors τ_1, τ_2, ... of a running state tensor; the merged weights are θ0 + output(state).
"""

from __future__ import annotations

import torch

from ..method import Continual, Param, StepContext


def continual_task_arithmetic_step(state: torch.Tensor | None, tau: torch.Tensor, count: int,
                                   scaling: float = 0.3) -> torch.Tensor:
    """M_t = M_{t−1} + c τ_t (M_0 = 0); θ^(t) = θ0 + M_t."""
    return scaling * tau if state is None else state + scaling * tau


def continual_weight_average_step(state: torch.Tensor | None, tau: torch.Tensor, count: int) -> torch.Tensor:
    """Running mean of the task vectors: M_t = (M_{t−1}·(t−1) + τ_t) / t, with ``count`` = t."""
    if state is None:
        return tau.clone()
    return (state * (count - 1) + tau) / count


def magmax_step(state: torch.Tensor | None, tau: torch.Tensor, count: int) -> torch.Tensor:
    """Per element keep the task-vector entry of largest magnitude (a later one wins ties)."""
    if state is None:
        return tau.clone()
    return torch.where(tau.abs() >= state.abs(), tau, state)


# ---- the methods --------------------------------------------------------------------------

def _plus(state: torch.Tensor, base: torch.Tensor, params: dict, scalars: dict) -> torch.Tensor:
    return base + state


def _scaled(state: torch.Tensor, base: torch.Tensor, params: dict, scalars: dict) -> torch.Tensor:
    return base + float(params["scaling"]) * state


_PAPER = "https://arxiv.org/abs/2501.09522"

METHODS = (
    Continual("continual_task_arithmetic", _PAPER, "θ ← θ + c τ_t, one model at a time",
              (Param("scaling", 0.3, low=0.0, help="c, the scale of each task vector"),),
              lambda c: continual_task_arithmetic_step(c.prev, c.tau, c.t, float(c.params["scaling"])), _plus),
    Continual("continual_weight_average", _PAPER, "running mean of the task vectors", (),
              lambda c: continual_weight_average_step(c.prev, c.tau, c.t), _plus),
    Continual("magmax", "https://arxiv.org/abs/2407.06322", "per entry the task-vector value of largest magnitude",
              (Param("scaling", 0.5, low=0.0, help="scale of the selected task vector"),),
              lambda c: magmax_step(c.prev, c.tau, c.t), _scaled),
)
