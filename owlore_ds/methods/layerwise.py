"""lisa, owlore and galore: the layerwise optimizer (owlore_ds/layerwise/) at ZeRO stage 0 or 3.

DeepSpeed builds no optimizer here: at stage 0 the engine is plain data parallel with
its all-reduce unused, under stage 3 it partitions the weights and fetches them for
forward and backward. Gradients go to their owners inside backward (the optimizer's
hooks), so the loss is only scaled to the global-batch mean and backpropagated.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from owlore_ds import checkpoint, ds_config
from owlore_ds.layer_sampling import ActiveLayers
from owlore_ds.methods.own_weights import OwnWeightsMethod
from owlore_ds.optim import build_layerwise_optimizer, build_scheduler


class LayerwiseMethod(OwnWeightsMethod):
    @staticmethod
    def engine_config(config: dict[str, Any], cfg, source: str, resume_state: Optional[dict[str, Any]]) -> dict[str, Any]:
        return ds_config.for_layerwise(config, source)

    def build(self, model: torch.nn.Module, config: dict[str, Any], total_steps: int,
              ratios: Optional[list[float]]) -> None:
        import deepspeed

        self.zero3 = ds_config.zero_stage(config) == 3
        bucket = config.get("zero_optimization", {}).get("reduce_bucket_size", 5e8)
        self.optimizer = build_layerwise_optimizer(model, self.cfg, zero3=self.zero3, device=self.device,
                                                   bucket_elements=int(bucket))
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=config)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, total_steps)
        self.active_layers = ActiveLayers(self.cfg, self.optimizer, ratios)
        self._weight_bytes: Optional[int] = None

    def begin_step(self, step: int) -> None:
        self.active_layers.before_step(step)
        self.optimizer.reducer.reset_peak()
        self._micro_batches = 0

    def micro_step(self, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
        self._micro_batches += 1
        self.optimizer.final_micro_batch = self._micro_batches == self.cfg.gradient_accumulation_steps
        loss = self.loss_sum(self.engine.module, batch)
        (loss / targets).backward()
        self.optimizer.finish_backward()
        self._release_gathered()
        return loss.detach()

    def finish_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()

    def step_metrics(self) -> dict[str, Any]:
        """Per rank (the trainer logs the largest): the weights this rank holds (its ZeRO-3
        partitions and whatever DeepSpeed keeps whole), and the most gradient bytes the
        reducer held during the step (owned share, buckets in flight), and the GaLore projectors
        this rank computed anew (SVDs, the cost of activating a layer)."""
        refreshes, self.optimizer.projector_refreshes = self.optimizer.projector_refreshes, 0
        return {"active_layers": list(self.optimizer.active), "weight_bytes": self.weight_bytes(),
                "peak_gradient_bytes": self.optimizer.reducer.peak_held_bytes, "projector_refreshes": refreshes}

    def weight_bytes(self) -> int:
        """Counted once: partition sizes do not change, and what DeepSpeed gathered for a
        step is released before the step ends (a walk over every parameter at each step
        is what this avoids)."""
        if self._weight_bytes is None:
            self._weight_bytes = self._count_weight_bytes()
        return self._weight_bytes

    def _count_weight_bytes(self) -> int:
        storages = {}  # on one rank ZeRO-3's p.data is a view of its partition: count it once
        for p in self.engine.module.parameters():
            for t in (p.data, getattr(p, "ds_tensor", None)):
                if t is not None and t.numel():
                    storages[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return sum(storages.values())

    def trainer_state(self) -> dict[str, Any]:
        return {"layerwise": self.active_layers.state(), **super().trainer_state()}

    def save(self, directory: str, step: int, errors: checkpoint.WriteErrors) -> None:
        super().save(directory, step, errors)
        checkpoint.save_rank_state(directory, self.optimizer.rank_state(), errors)

    def load(self, path: str, state: dict[str, Any]) -> None:
        super().load(path, state)
        self.active_layers.restore(state["layerwise"], checkpoint.load_rank_states(path, state))
