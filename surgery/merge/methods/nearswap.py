"""NearSwap (mergekit's ``nearswap``; reference model
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): move each base weight towards
the other model where the two are already close. Per entry, with d = |θ0 − θ1|,
w = clamp(t / max(d, 1e-6), 0, 1) and the output is w θ1 + (1 − w) θ0: entries closer than
``t`` take the model's value, entries far apart keep the base's."""

from __future__ import annotations

import torch

from ...core.errors import UsageError
from ..method import Batch, Param, TensorContext


def nearswap(t: float, base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """w θ1 + (1 − w) θ0 with w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), entry by entry."""
    weight = (t / (base - model).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return weight * model + (1 - weight) * base


def _check(ctx: TensorContext) -> None:
    if ctx.params["t"] is None:
        raise UsageError(f"merge method 'nearswap' needs `t` for tensor {ctx.name!r} (no filter of its `t` setting "
                         f"matches it); add an entry without a filter.")


def _merge(ctx: TensorContext) -> torch.Tensor:
    return nearswap(float(ctx.params["t"]), ctx.base(), ctx.model(0))


METHODS = (
    Batch("nearswap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
          "take the model's value where it is within about t of the base's",
          (Param("t", None, low=0.0, required=True, help="closeness scale: |θ0 − θ1| ≤ t takes the model's value"),),
          _merge, elementwise=True, min_models=1, max_models=1, check=_check),
)
