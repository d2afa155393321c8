"""DeepSpeed config: read the JSON, fill "auto" values from the flags, refuse contradictions.

As in the Hugging Face integration, a value may be "auto" (filled from the flags) or
explicit; an explicit value that disagrees with a flag is an error, not a silent pick.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional

from owlore_ds.config import TrainConfig
from owlore_ds.errors import UserInputError

DEFAULT_CONFIG: dict[str, Any] = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
}


def read(path: Optional[str]) -> dict[str, Any]:
    if path is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    if not os.path.isfile(path):
        raise UserInputError(f"--deepspeed {path}: file not found")
    try:
        with open(path) as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: expected a JSON object")
    return config


def _resolve(config: dict, dotted: str, value: Any, flag: str, source: str) -> None:
    """Sets config[dotted] to `value` if absent or "auto"; errors if it is set otherwise."""
    *parents, key = dotted.split(".")
    node = config
    for parent in parents:
        node = node.setdefault(parent, {})
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value and not (isinstance(current, (int, float)) and isinstance(value, (int, float)) and float(current) == float(value)):
        raise UserInputError(
            f"{source}: {dotted} is {current!r} but {flag} gives {value!r}; set it to \"auto\" or make them agree"
        )


def _find_auto(node: Any, prefix: str = "") -> Optional[str]:
    if node == "auto":
        return prefix
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}.{key}" if prefix else key)
            if found:
                return found
    return None


def fill(raw: dict[str, Any], cfg: TrainConfig, world_size: int, hidden_size: int) -> dict[str, Any]:
    """A complete DeepSpeed config for this run."""
    source = cfg.deepspeed or "the default DeepSpeed config"
    config = copy.deepcopy(raw)
    for block in ("optimizer", "scheduler"):
        if block in config:
            raise UserInputError(
                f"{source}: remove the {block!r} block; the trainer builds it from --method and the --learning_rate/"
                "--lr_scheduler_type flags"
            )
    if config.get("fp16", {}).get("enabled") is True:
        raise UserInputError(f"{source}: fp16.enabled is true; fp16 is not supported, use --bf16")
    config.pop("fp16", None)
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    _resolve(config, "train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size", source)
    _resolve(config, "gradient_accumulation_steps", accum, "--gradient_accumulation_steps", source)
    _resolve(config, "train_batch_size", micro * accum * world_size,
             f"--per_device_train_batch_size x --gradient_accumulation_steps x {world_size} ranks", source)
    _resolve(config, "gradient_clipping", cfg.max_grad_norm, "--max_grad_norm", source)
    _resolve(config, "bf16.enabled", cfg.bf16, "--bf16", source)
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero.get("stage", 0), int) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserInputError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3")
    # The sizes the Hugging Face integration derives from the hidden size.
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    config.setdefault("steps_per_print", 10**9)  # our own logger reports progress
    config.setdefault("wall_clock_breakdown", False)
    leftover = _find_auto(config)
    if leftover:
        raise UserInputError(f"{source}: {leftover} is \"auto\" but the trainer has no value for it; set it explicitly")
    return config


def for_layerwise(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The engine config under the layerwise optimizer, which does ZeRO's optimizer work itself.

    DeepSpeed builds no optimizer: ZeRO-1/2 become stage 0 (plain data parallel, weights
    already in their training dtype, no clipping of its own); ZeRO-3 stays and partitions
    the weights, fetching them for forward and backward (ds_configs/zero3_offload.json keeps
    them on the CPU). Gradients go to their owners inside backward (layerwise/comm.py).
    """
    config = copy.deepcopy(config)
    if offloads_optimizer(config):
        # The state of inactive layers is what grows; --inactive_state offload moves it to the CPU.
        logging.getLogger("owlore_ds").warning(
            "%s: offload_optimizer does not apply to the layer-sampled methods (they keep only the active "
            "layers' state); use --inactive_state offload to keep inactive layers' state on the CPU", source)
        del config["zero_optimization"]["offload_optimizer"]
    config["gradient_clipping"] = 0.0
    if zero_stage(config) < 3:
        bucket = config.get("zero_optimization", {}).get("reduce_bucket_size")
        config["zero_optimization"] = {"stage": 0}
        if bucket is not None:
            config["zero_optimization"]["reduce_bucket_size"] = bucket
        config["bf16"] = {"enabled": False}
    return config


def for_fused(config: dict[str, Any], source: str, method: str) -> dict[str, Any]:
    """The engine config for lomo/adalomo, which run without a DeepSpeed optimizer.

    ZeRO-1/2 partition optimizer state and gradients, neither of which a fused update
    keeps, so they become stage 0; ZeRO-3 stays and partitions the weights, as the LOMO
    authors run it. At stage 0 DeepSpeed's bf16 wrapper would want an optimizer, so it is
    off there (the weights are loaded in bf16 already). Clipping is the fused update's.
    """
    if offloads_optimizer(config):
        raise UserInputError(f"{source}: zero_optimization.offload_optimizer is set but --method {method} holds no "
                             "optimizer state to offload; remove it (offload_param works under ZeRO-3)")
    config = copy.deepcopy(config)
    config["gradient_clipping"] = 0.0
    if zero_stage(config) < 3:
        config["zero_optimization"] = {"stage": 0}
        config["bf16"] = {"enabled": False}
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def max_live_parameters(config: dict[str, Any]) -> Optional[int]:
    """stage3_max_live_parameters if the config sets a number (None: DeepSpeed's default)."""
    live = config.get("zero_optimization", {}).get("stage3_max_live_parameters")
    return int(float(live)) if isinstance(live, (int, float)) and not isinstance(live, bool) else None


def offloads_optimizer(config: dict[str, Any]) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
