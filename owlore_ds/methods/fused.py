"""lomo and adalomo: the update fused into backward (owlore_ds/fused.py), no DeepSpeed optimizer."""

from __future__ import annotations

from typing import Any, Optional

import torch

from owlore_ds import ds_config
from owlore_ds.methods.own_weights import OwnWeightsMethod
from owlore_ds.optim import build_fused_optimizer, build_scheduler


class FusedMethod(OwnWeightsMethod):
    @staticmethod
    def engine_config(config: dict[str, Any], cfg, source: str, resume_state: Optional[dict[str, Any]]) -> dict[str, Any]:
        return ds_config.for_fused(config, source, cfg.method)

    def build(self, model: torch.nn.Module, config: dict[str, Any], total_steps: int,
              ratios: Optional[list[float]]) -> None:
        """DeepSpeed 0.19's engine.forward/backward/step assume an optimizer (its backward hooks
        call into one), so the module runs directly: the engine still partitions the weights
        under ZeRO-3 and fetches them in forward and backward."""
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=model, config=config)
        self.zero3 = ds_config.zero_stage(config) == 3
        self.optimizer = build_fused_optimizer(self.engine.module, self.cfg, self.zero3, self.device,
                                               after_backward=self._release_gathered if self.zero3 else None)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, total_steps)

    def micro_step(self, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
        """With clipping, LOMO's extra forward and backward that only measure the norm."""
        scale = self.world / targets  # the fused update averages over ranks
        if self.cfg.max_grad_norm > 0:
            self.optimizer.measure_norm(self.loss_sum(self.engine.module, batch) * scale)
        loss = self.loss_sum(self.engine.module, batch)
        self.optimizer.fused_backward(loss * scale)
        return loss.detach()

    def finish_step(self) -> None:
        self.optimizer.step()  # a no-op that keeps the scheduler's order check quiet
        self.scheduler.step()

    def trainer_state(self) -> dict[str, Any]:
        return {"fused": True, **super().trainer_state()}

    def optimizer_scalars(self) -> dict[str, Any]:
        return self.optimizer.checkpoint_state()

    def load_optimizer_scalars(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_checkpoint_state(saved)
