"""What the families that run without a DeepSpeed optimizer share: their checkpoints hold
the whole weights as safetensors shards (checkpoint.save_full_weights), the scheduler
and the optimizer groups' lr, so they load on any number of ranks."""

from __future__ import annotations

import os
from typing import Any

import torch

from owlore_ds import checkpoint, distributed as dist
from owlore_ds.methods.base import Method


class OwnWeightsMethod(Method):
    def _release_gathered(self) -> None:
        """Under ZeRO-3 with no DeepSpeed optimizer, parameters its hooks left gathered after
        backward are released here, as its own optimizer would do."""
        if self.zero3:
            self.engine.optimizer.get_param_coordinator().release_and_reset_all(self.engine.module)

    def optimizer_scalars(self) -> dict[str, Any]:
        return {"lr": [group["lr"] for group in self.optimizer.param_groups]}

    def load_optimizer_scalars(self, saved: dict[str, Any]) -> None:
        # A scheduler's load_state_dict restores only its own record: without the groups'
        # lr the first step after a resume would use the initial lr.
        for group, lr in zip(self.optimizer.param_groups, saved["lr"]):
            group["lr"] = lr

    def trainer_state(self) -> dict[str, Any]:
        return {"weights": "safetensors"}

    def save(self, directory: str, step: int, errors: checkpoint.WriteErrors) -> None:
        checkpoint.save_full_weights(self.engine.module, directory, errors)
        if dist.is_main():
            path = os.path.join(directory, checkpoint.STEP_STATE)
            state = {"optimizer": self.optimizer_scalars(), "scheduler": self.scheduler.state_dict()}
            errors.run(path, checkpoint.torch_save, state, path)

    def load(self, path: str, state: dict[str, Any]) -> None:
        checkpoint.check_files_readable(path, int(state["global_step"]))
        checkpoint.load_full_weights(self.engine.module, path)
        saved = torch.load(os.path.join(path, checkpoint.STEP_STATE), map_location="cpu", weights_only=True)
        self.load_optimizer_scalars(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.restore_rng(path)
