"""The update rules of an owned item, on plain tensors: AdamW, and the clipping norm.
GaLore's rule is owlore_ds/galore.py."""

from __future__ import annotations

import math
from typing import Any

import torch

_NORM_ROW = 1 << 16


_NORM_SLAB = 1 << 24  # elements upcast at once for a bf16 gradient's norm (64 MiB of fp32)


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """The float64 sum of squares of `grad`, from fp32 norms of 64K-element rows: within ~1e-5
    of an exact sum, where one norm over a 131M-element bf16 or fp32 tensor is off by 1%. A
    bf16 gradient's rows are upcast a slab at a time (a bf16 result would round each norm to
    3 digits), so no full-size fp32 or fp64 copy is made."""
    flat = grad.reshape(-1)
    whole = flat.numel() - flat.numel() % _NORM_ROW
    total = torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).double().pow(2)
    slab = _NORM_SLAB if flat.dtype != torch.float32 else max(whole, 1)
    for start in range(0, whole, slab):
        rows = flat[start : min(start + slab, whole)].view(-1, _NORM_ROW)
        total = total + torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).double().pow(2).sum()
    return total


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
