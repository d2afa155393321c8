"""Loading a local Hugging Face causal LM and its tokenizer, offline, with clear errors."""

from __future__ import annotations

import json
import os

import torch

from owlore_ds.errors import UserInputError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def read_model_config(path: str):
    """The model's AutoConfig; raises UserInputError unless `path` holds a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config_file):
        raise UserInputError(f"--model_name_or_path {path}: not a local Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserInputError(f"{config_file}: not a usable model config ({str(exc).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserInputError(f"{config_file}: model_type {config.model_type!r} is not a causal language model")
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        raise UserInputError(f"--model_name_or_path {path}: no weights (*.safetensors or *.bin) in the folder")
    return config


def check_block_size(config, block_size: int, path: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise UserInputError(
            f"--block_size {block_size} exceeds the model's max_position_embeddings {limit} ({path}/config.json)"
        )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise UserInputError(f"--model_name_or_path {path}: no usable tokenizer ({str(exc).splitlines()[0]})") from None


def load_model(path: str, precision: str, gradient_checkpointing: bool) -> torch.nn.Module:
    """Loads weights onto CPU in the training dtype (under ZeRO-3, partitioned as they load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision], local_files_only=True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


# Tokens per chunk of the loss: one chunk's fp32 logits (1024 x 32000 x 4 B = 131 MB for
# LLaMA2) exist at a time instead of the whole micro-batch's (1 GB each at 16 x 512 tokens).
LOSS_CHUNK_TOKENS = 1024


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (fp32); the caller divides by the global target count.

    Computed a chunk of tokens at a time, each chunk checkpointed: its fp32 logits and
    log-softmax are recomputed in backward rather than kept, so the fp32 copies of the
    (tokens x vocab) logits, the largest tensors of a fine-tuning step, never exist whole.
    """
    from torch.utils.checkpoint import checkpoint

    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    chunks = zip(shifted_logits.split(LOSS_CHUNK_TOKENS), shifted_labels.split(LOSS_CHUNK_TOKENS))
    return sum(checkpoint(_cross_entropy_sum, chunk_logits, chunk_labels, use_reentrant=False)
               for chunk_logits, chunk_labels in chunks)
