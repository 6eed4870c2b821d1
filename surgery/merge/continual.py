"""Continual baselines from the OPCM paper's comparison (FusionBench ``method/opcm/`` and
``method/magmax/``): continual task arithmetic, continual weight average and MagMax
(Marczak et al. 2024, https://arxiv.org/abs/2407.06322). Each is a fold over the task
vectors τ_1, τ_2, ... of a running state tensor; the merged weights are θ0 + output(state).
"""

from __future__ import annotations

import torch


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
