"""The update rules of an owned item, on plain tensors: AdamW, and the clipping norm.
GaLore's rule is owlore_ds/galore.py."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

_NORM_ROW = 1 << 16
# Elements of a bf16 gradient upcast at once for its norm (4 MiB of fp32), into a slab the
# caller keeps: a fresh fp32 copy per slab is new memory on every call, which on CPU is
# page-faulted in each time (a 64 MiB slab is above glibc's largest mmap threshold, so it is
# mapped and unmapped per slab). Measured on this project's CPU at 11008 x 4096: 80 ms with
# fresh 64 MiB slabs against 7.6 ms through a kept 4 MiB one, whether or not
# MALLOC_MMAP_THRESHOLD_ is pinned.
NORM_SLAB = 1 << 20


def norm_workspace_numel(numel: int) -> int:
    """Elements of the fp32 slab squared_norm reuses for a bf16 gradient of `numel` elements."""
    return min(NORM_SLAB, numel - numel % _NORM_ROW)


def squared_norm(grad: torch.Tensor, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float64 sum of squares of `grad`, from fp32 norms of 64K-element rows: within ~1e-5
    of an exact sum, where one norm over a 131M-element bf16 or fp32 tensor is off by 1%. A
    bf16 gradient's rows are upcast a slab at a time (a bf16 result would round each norm to
    3 digits) into `workspace` (fp32, norm_workspace_numel elements; without it a new copy
    per slab), so no full-size fp32 or fp64 copy is made."""
    flat = grad.reshape(-1)
    whole = flat.numel() - flat.numel() % _NORM_ROW
    total = torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).double().pow(2)
    slab = NORM_SLAB if flat.dtype != torch.float32 else max(whole, 1)
    for start in range(0, whole, slab):
        rows = flat[start : min(start + slab, whole)]
        if rows.dtype != torch.float32:
            rows = (rows.float() if workspace is None or workspace.numel() < rows.numel()
                    else workspace[: rows.numel()].copy_(rows))
        total = total + torch.linalg.vector_norm(rows.view(-1, _NORM_ROW), dim=1).double().pow(2).sum()
    return total


# Elements AdamW updates per pass: its one full-size temporary (the denominator) is at most
# this many elements, 32 MiB in bf16 instead of 250 MiB for LLaMA2-7B's embeddings or lm_head.
# The update is elementwise, so passes give the same bits as one.
ADAMW_CHUNK = 1 << 24


def adamw_step(weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """torch.optim.AdamW's update (decay first, bias-corrected moments), on one tensor, in place."""
    beta1, beta2 = group["betas"]
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(weight)
        state["exp_avg_sq"] = torch.zeros_like(weight)
    state["step"] += 1
    step = state["step"]
    tensors = (weight, grad, state["exp_avg"], state["exp_avg_sq"])
    if weight.numel() > ADAMW_CHUNK and all(t.is_contiguous() for t in tensors):
        passes = zip(*(t.view(-1).split(ADAMW_CHUNK) for t in tensors))
    else:
        passes = [tensors]
    for weight_part, grad_part, exp_avg, exp_avg_sq in passes:
        if group["weight_decay"]:
            weight_part.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg.lerp_(grad_part, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad_part, grad_part, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
        weight_part.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))
