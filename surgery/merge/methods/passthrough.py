"""Passthrough (mergekit's ``passthrough``): the one input model's tensors, unchanged or
multiplied by a per-tensor ``scale`` (``scale: [{filter: o_proj, value: 0}, {value: 1}]``
zeroes the attention outputs). The building block of frankenmerges, where every slice takes
its layers from one model. A tensor at scale 1 is copied as stored (cast in row blocks when the
output dtype differs), so a frankenmerge costs what a file copy costs."""

from __future__ import annotations

import torch

from ..method import Batch, Param, TensorContext

SCALE = Param("scale", 1.0, per_model=True, help="multiply the tensor by this (per tensor with filters)")


def _unchanged(params: dict, model_params: list[dict]) -> int | None:
    """At scale 1 the output is the model's stored tensor: copied, never decoded."""
    return 0 if float(model_params[0]["scale"]) == 1.0 else None


def _merge(ctx: TensorContext) -> torch.Tensor:
    x = ctx.model(0)
    scale = float(ctx.model_params[0]["scale"])
    return x if scale == 1.0 else x.mul_(scale)


METHODS = (
    Batch("passthrough", "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
          "the one model's tensors as they are, or times a per-tensor scale", (SCALE,), _merge, elementwise=True,
          base="ignored", min_models=1, max_models=1, copies=_unchanged),
)
