"""Optimizer and learning-rate schedule for each --method, and what the optimizer holds in memory."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import get_scheduler

from owlore_ds.config import TrainConfig
from owlore_ds.fused import FusedUpdate
from owlore_ds.layer_sampling import split_parameters
from owlore_ds.layerwise import GaloreSettings, LayerwiseOptimizer


def _adam_kwargs(cfg: TrainConfig) -> dict:
    return dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                weight_decay=cfg.weight_decay)


def build_layerwise_optimizer(model: torch.nn.Module, cfg: TrainConfig, zero3: bool = False,
                              device: Optional[torch.device] = None, bucket_elements: int = 1 << 24) -> LayerwiseOptimizer:
    """The optimizer of lisa/owlore/galore; gradients reduced to owners in buckets of `bucket_elements`
    (DeepSpeed's reduce_bucket_size) in the --reduce_dtype."""
    layers, always = split_parameters(model, cfg.freeze_embeddings)
    settings = (GaloreSettings(cfg.galore_rank, cfg.galore_update_proj_gap, cfg.galore_scale, cfg.galore_proj_type,
                              cfg.galore_svd, cfg.galore_svd_signs == "canonical", cfg.galore_spread_refreshes)
                if cfg.low_rank else None)
    return LayerwiseOptimizer(layers, always, max_grad_norm=cfg.max_grad_norm, inactive_state=cfg.inactive_state,
                              galore_settings=settings, master_weights=cfg.master_weights, zero3=zero3,
                              device=device, reduce_dtype=cfg.reduce_dtype,
                              bucket_bytes=bucket_elements * (4 if cfg.reduce_dtype == "fp32" else 2),
                              update_in_backward=cfg.update_in_backward, **_adam_kwargs(cfg))


def build_fused_optimizer(model: torch.nn.Module, cfg: TrainConfig, zero3: bool, device: torch.device,
                          after_backward) -> FusedUpdate:
    """lomo/adalomo, built on the engine's module (its hooks must sit on the parameters DeepSpeed runs)."""
    return FusedUpdate(model, cfg.method, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       max_grad_norm=cfg.max_grad_norm, zero3=zero3, device=device, after_backward=after_backward)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, offload: bool) -> torch.optim.Optimizer:
    """The optimizer handed to deepspeed.initialize by full and lora."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = _adam_kwargs(cfg)
    if offload:
        # ZeRO-Offload steps on the host; DeepSpeed requires its vectorized CPU Adam there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_for(total_steps),
                         num_training_steps=total_steps)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def model_storages(model: torch.nn.Module) -> set[int]:
    """Storages of the model's weights (ZeRO-3 shards included), which the optimizer does not own."""
    storages = {_storage(p) for p in model.parameters() if p.numel() > 0}
    storages |= {_storage(p.ds_tensor) for p in model.parameters() if hasattr(p, "ds_tensor")}
    return storages


def held_state_bytes(optimizer, weights: set[int], device_type: str) -> tuple[int, int]:
    """(bytes on the training device, bytes elsewhere) that the optimizer holds beyond the model's weights.

    Counts moments and any master copies of the weights (the flat fp32 partitions of
    a ZeRO optimizer), each storage once. `optimizer` may be a DeepSpeed wrapper;
    `weights` comes from `model_storages`, computed once.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set[int] = set()
    on_device = elsewhere = 0

    def count(t: torch.Tensor) -> None:
        nonlocal on_device, elsewhere
        key = _storage(t)
        if t.numel() == 0 or key in seen or key in weights:
            return
        seen.add(key)
        size = t.untyped_storage().nbytes()
        if t.device.type == device_type:
            on_device += size
        else:
            elsewhere += size

    for group in inner.param_groups:
        for p in group["params"]:
            count(p)
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                count(value)
    return on_device, elsewhere
