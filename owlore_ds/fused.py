"""LOMO and AdaLomo: the optimizer step fused into backward (Lv et al., 2023 and 2024).

Each parameter is updated as soon as autograd has finished its gradient (a
post-accumulate-grad hook) and the gradient is dropped at once, so a full set of
gradients never exists. LOMO is plain SGD and holds no state; AdaLomo keeps
Adafactor's factored second moment (a row and a column vector per matrix) and
normalizes each update by its RMS.

Written here rather than taken from the authors' `lomo-optim` package (which the tests
use as the oracle for the update rules, line for line), because that package:
- averages gradients over ranks only under ZeRO-3: at stage 0-2 with several ranks each
  rank would step on its own gradient and the replicas would drift apart;
- reduces with ReduceOp.AVG, which gloo (CPU) lacks;
- allocates AdaLomo's state with `.cuda()`, so it cannot run off NVIDIA GPUs;
- runs its hook over every parameter of the model at each gradient.

Under ZeRO-3 a parameter is gathered while its gradient is made, so the hook updates
the full gathered copy (which persistent small parameters keep using) and writes this
rank's slice into the partition DeepSpeed keeps (`ds_tensor`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist

RULES = ("lomo", "adalomo")


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


class FusedUpdate(torch.optim.Optimizer):
    """The update of `rule` applied inside backward to every trainable parameter of `model`.

    The caller scales the loss as for DeepSpeed (whose data-parallel mean divides by the
    number of ranks); gradients are summed over ranks in fp32 here and divided likewise.
    """

    def __init__(self, model: torch.nn.Module, rule: str, lr: float, weight_decay: float = 0.0,
                 max_grad_norm: float = 0.0, zero3: bool = False, device: Optional[torch.device] = None,
                 after_backward: Optional[Callable[[], None]] = None,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], dict(lr=lr, weight_decay=weight_decay))
        self.rule, self.max_grad_norm, self.zero3 = rule, max_grad_norm, zero3
        self.eps, self.clip_threshold, self.decay_rate = eps, clip_threshold, decay_rate
        self.names = {p: n for n, p in named}
        self.after_backward = after_backward
        self.world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        self.rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
        self.updates = 0  # AdaLomo's t, counted in update passes
        self.global_grad_norm: Optional[float] = None
        self._measuring = False
        self._clip_coef = 1.0
        self._squares: Any = 0.0
        device = device or next(iter(self.names)).device
        for p in self.names:
            if rule == "adalomo":
                shape = _full_shape(p)
                if len(shape) > 1:  # Adafactor's factors: mean of squares over columns and over rows
                    self.state[p] = {"row": torch.zeros(shape[:-1], dtype=torch.float32, device=device),
                                     "col": torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=device)}
                else:
                    self.state[p] = {"sq": torch.zeros(shape, dtype=torch.float32, device=device)}
            p.register_post_accumulate_grad_hook(self._on_gradient)
        # Fixed for the whole run (loading a checkpoint copies into these tensors).
        self._held_bytes = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())

    # ------------------------------------------------------------------ passes

    def measure_norm(self, loss: torch.Tensor) -> float:
        """LOMO's first backward when clipping: only the global gradient norm, no update."""
        norm = self._backward(loss, measuring=True)
        self._clip_coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        return norm

    def fused_backward(self, loss: torch.Tensor) -> None:
        """Backward that updates every parameter on the way, clipped by the norm measure_norm found."""
        self.updates += 1
        norm = self._backward(loss, measuring=False)
        if self.max_grad_norm <= 0:
            self.global_grad_norm = norm  # else measure_norm's value, the norm before clipping
        self._clip_coef = 1.0

    def _backward(self, loss: torch.Tensor, measuring: bool) -> float:
        self._measuring, self._squares = measuring, 0.0
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        norm = math.sqrt(float(self._squares))
        if measuring:
            self.global_grad_norm = norm
        return norm

    def step(self, closure=None):  # the update already happened in backward
        return None

    # ------------------------------------------------------------------ per parameter

    @torch.no_grad()
    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        grad = p.grad.to(torch.float32)  # a copy for bf16; the same tensor for fp32, released below
        p.grad = None
        if self.world > 1:
            torch_dist.all_reduce(grad)
            grad.div_(self.world)
        self._squares = self._squares + grad.pow(2).sum()
        if self._measuring:
            return
        if self._clip_coef < 1.0:
            grad.mul_(self._clip_coef)
        group = self.param_groups[0]
        weights = p.data.to(torch.float32)
        if weights.numel() != grad.numel():
            raise RuntimeError(f"{self.names[p]}: weights not gathered when their gradient was made")
        if self.rule == "lomo":
            update, lr = grad, group["lr"]
        else:
            update, lr = self._adalomo(p, grad, weights, group["lr"])
        if group["weight_decay"]:
            weights.mul_(1.0 - lr * group["weight_decay"])
        weights.add_(update, alpha=-lr)
        p.data.copy_(weights)
        if self.zero3:
            part = p.ds_tensor
            start = part.numel() * self.rank
            end = min(start + part.numel(), weights.numel())
            if end > start:
                part.narrow(0, 0, end - start).copy_(weights.view(-1)[start:end])

    def _adalomo(self, p: torch.nn.Parameter, grad: torch.Tensor, weights: torch.Tensor,
                 lr: float) -> tuple[torch.Tensor, float]:
        """AdaLomo's update and its step size (lomo_optim.AdaLomo.fuse_update); `weights` is p in fp32."""
        beta = 1.0 - math.pow(self.updates, self.decay_rate)
        squares = grad.pow(2).add_(self.eps[0])
        state = self.state[p]
        if grad.dim() > 1:
            row, col = state["row"], state["col"]
            row.mul_(beta).add_(squares.mean(dim=-1), alpha=1.0 - beta)
            col.mul_(beta).add_(squares.mean(dim=-2), alpha=1.0 - beta)
            update = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
        else:
            state["sq"].mul_(beta).add_(squares, alpha=1.0 - beta)
            update = state["sq"].rsqrt()
        update.mul_(grad)
        update.div_((_rms(update) / self.clip_threshold).clamp_(min=1.0))
        scale = max(self.eps[1], float(_rms(weights)))
        return update, lr * scale

    # ------------------------------------------------------------------ state

    def state_bytes(self) -> tuple[int, int]:
        """(bytes on the training device, bytes elsewhere) of the state held: AdaLomo's factors."""
        return self._held_bytes, 0

    def checkpoint_state(self) -> dict[str, Any]:
        """Keyed by parameter name, so a run on another number of ranks can load it."""
        # The groups' lr as torch's Optimizer.state_dict keeps it: a scheduler's load_state_dict
        # restores only its own record, and the first step after a resume would use the initial lr.
        return {"updates": self.updates, "lr": [group["lr"] for group in self.param_groups],
                "state": {self.names[p]: {k: t.cpu() for k, t in s.items()} for p, s in self.state.items()}}

    def load_checkpoint_state(self, saved: dict[str, Any]) -> None:
        self.updates = int(saved["updates"])
        for group, lr in zip(self.param_groups, saved["lr"]):
            group["lr"] = lr
        for p, state in self.state.items():
            for key, tensor in state.items():
                tensor.copy_(saved["state"][self.names[p]][key])
