"""Method families behind one interface (base.Method): the training loop does not know which runs."""

from __future__ import annotations

from owlore_ds.config import TrainConfig
from owlore_ds.methods.adamw import DeepSpeedAdamW
from owlore_ds.methods.base import Method
from owlore_ds.methods.fused import FusedMethod
from owlore_ds.methods.layerwise import LayerwiseMethod


def family(cfg: TrainConfig) -> type[Method]:
    if cfg.layerwise:
        return LayerwiseMethod
    if cfg.fused:
        return FusedMethod
    return DeepSpeedAdamW


__all__ = ["Method", "family"]
