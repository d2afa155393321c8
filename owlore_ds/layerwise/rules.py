"""The update rules of an owned item, on plain tensors: AdamW, and the clipping norm.
GaLore's rule is owlore_ds/galore.py."""

from __future__ import annotations

import math
from typing import Any

import torch

_NORM_ROW = 1 << 16


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """The float64 sum of squares of `grad`, from norms of 64K-element rows (each accumulated
    in fp32 by torch, in the gradient's dtype): within ~1e-5 of an exact sum, where one
    norm over a 131M-element bf16 or fp32 tensor is off by 1%, and with no fp32/fp64 copy."""
    flat = grad.reshape(-1)
    whole = flat.numel() - flat.numel() % _NORM_ROW
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, _NORM_ROW), dim=1).double()
    rest = torch.linalg.vector_norm(flat[whole:]).double()
    return rows.pow(2).sum() + rest.pow(2)


def adamw_step(weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """torch.optim.AdamW's update (decay first, bias-corrected moments), on one tensor, in place."""
    beta1, beta2 = group["betas"]
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(weight)
        state["exp_avg_sq"] = torch.zeros_like(weight)
    state["step"] += 1
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if group["weight_decay"]:
        weight.mul_(1 - group["lr"] * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
    weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))
