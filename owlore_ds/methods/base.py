"""The interface every method family gives the training loop.

A family builds its DeepSpeed engine, optimizer and scheduler, runs a micro-batch
(forward, backward, and whatever its optimizer does inside backward), finishes an
optimizer step, and saves and loads its own files in a checkpoint. The loop in
trainer.py calls only these, so it does not know which method or ZeRO stage runs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from owlore_ds import checkpoint
from owlore_ds.config import TrainConfig
from owlore_ds.modeling import HostOffload, causal_lm_loss_sum, model_inputs


class Method:
    engine: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def __init__(self, cfg: TrainConfig, world: int, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.host_offload = HostOffload() if cfg.offload_checkpoints else None

    # -- before the model exists
    @staticmethod
    def engine_config(ds_config: dict[str, Any], cfg: TrainConfig, source: str,
                      resume_state: Optional[dict[str, Any]]) -> dict[str, Any]:
        """The DeepSpeed config the engine is built with (it decides how the model loads)."""
        return ds_config

    # -- building and training
    def build(self, model: torch.nn.Module, ds_config: dict[str, Any], total_steps: int,
              ratios: Optional[list[float]]) -> None:
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        """Before the first micro-batch of optimizer step `step` (0-based)."""

    def loss_sum(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.host_offload.hooks() if self.host_offload else contextlib.nullcontext():
            logits = module(**model_inputs(module, batch)).logits
            return causal_lm_loss_sum(logits, batch["labels"])

    def micro_step(self, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed token loss (detached).
        The gradient made is that of (summed loss / `targets`), summed over ranks and micro-batches."""
        raise NotImplementedError

    def finish_step(self) -> None:
        """After the last micro-batch of a step: the optimizer and scheduler step."""

    # -- metrics
    def grad_norm(self) -> Optional[float]:
        return getattr(self.optimizer, "global_grad_norm", None)

    def state_bytes(self) -> tuple[int, int]:
        """(bytes on the training device, bytes elsewhere) the optimizer holds beyond the weights."""
        return self.optimizer.state_bytes()

    def step_metrics(self) -> dict[str, Any]:
        return {}

    # -- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        """What the checkpoint's trainer_state.json records about this family."""
        return {}

    def save(self, directory: str, step: int, errors: "checkpoint.WriteErrors") -> None:
        """Writes this rank's model and optimizer files of step `step` into `directory` (on every
        rank), each write through `errors.run`, so that a failed write fails every rank together."""
        raise NotImplementedError

    def load(self, path: str, state: dict[str, Any]) -> None:
        raise NotImplementedError
