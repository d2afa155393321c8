"""LoRA through peft: the base weights frozen, AdamW (through DeepSpeed, any ZeRO stage) on
the adapters; exports merge the adapters into the base weights."""

from __future__ import annotations

from typing import Any

import torch

from owlore_ds.config import TrainConfig
from owlore_ds.errors import UserInputError


def lora_settings(cfg: TrainConfig) -> dict[str, Any]:
    """peft LoraConfig arguments, JSON-friendly; stored in checkpoints so exports can rebuild the adapters."""
    targets = cfg.lora_target_modules.strip()
    modules: Any = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
    return {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": modules, "task_type": "CAUSAL_LM"}


def add_adapters(model: torch.nn.Module, settings: dict[str, Any]) -> torch.nn.Module:
    """`model` wrapped by peft with trainable adapters; every base weight frozen."""
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(**settings))
    except ValueError as exc:  # peft's message when no module matches the targets
        raise UserInputError(f"--lora_target_modules {settings['target_modules']}: {str(exc).splitlines()[0]}") from None


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The base model with W + (alpha / r) B A folded in, adapters removed."""
    return model.merge_and_unload()
