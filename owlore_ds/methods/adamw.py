"""full and lora: DeepSpeed's own ZeRO optimizer around torch AdamW (or its CPU Adam)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from owlore_ds import checkpoint, ds_config
from owlore_ds.lora import add_adapters, lora_settings
from owlore_ds.methods.base import Method
from owlore_ds.optim import build_optimizer, build_scheduler, held_state_bytes, model_storages


class DeepSpeedAdamW(Method):
    @staticmethod
    def engine_config(config: dict[str, Any], cfg, source: str, resume_state: Optional[dict[str, Any]]) -> dict[str, Any]:
        from owlore_ds import distributed as dist

        if resume_state and checkpoint.needs_universal(resume_state, dist.world_size()):
            config.setdefault("checkpoint", {})["load_universal"] = True
        return config

    def build(self, model: torch.nn.Module, config: dict[str, Any], total_steps: int,
              ratios: Optional[list[float]]) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if self.cfg.method == "lora":
            model = add_adapters(model, lora_settings(self.cfg))
        optimizer = build_optimizer(model, self.cfg, offload=ds_config.offloads_optimizer(config))
        scheduler = build_scheduler(optimizer, self.cfg, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.weight_storages = model_storages(self.engine.module)  # excluded from the state bytes
        self.device_type = get_accelerator().device_name()

    def micro_step(self, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
        loss = self.loss_sum(self.engine, batch)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
        self.engine.backward(loss * (self.world * self.cfg.gradient_accumulation_steps / targets))
        self.engine.step()
        return loss.detach()

    def grad_norm(self) -> Optional[float]:
        return self.engine.get_global_grad_norm()

    def state_bytes(self) -> tuple[int, int]:
        return held_state_bytes(self.optimizer, self.weight_storages, self.device_type)

    def trainer_state(self) -> dict[str, Any]:
        return {"lora": lora_settings(self.cfg)} if self.cfg.method == "lora" else {}

    def save(self, directory: str, step: int, errors: checkpoint.WriteErrors) -> None:
        checkpoint.save_engine(self.engine, directory, step, errors)

    def load(self, path: str, state: dict[str, Any]) -> None:
        checkpoint.load(self.engine, path, state, self.world)
