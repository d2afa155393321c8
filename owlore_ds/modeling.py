"""Loading a local Hugging Face causal LM and its tokenizer, offline, with clear errors."""

from __future__ import annotations

import json
import os

import torch

from owlore_ds.errors import UserInputError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class HostOffload:
    """Saved-tensor hooks that keep what autograd saves in forward in host memory until backward.

    Under gradient checkpointing the layers save nothing (torch's checkpoint keeps holders),
    so what reaches these hooks is each checkpointed layer's input (saved by checkpoint's
    own input saver, outside its hooks) and the few tensors around the layers (the final
    norm's, the loss's): the checkpoints move to the host, and each comes back when its
    layer is recomputed. Parameters are never copied (autograd saves the tensor itself).
    torch.autograd.graph.save_on_cpu would copy every saved tensor, lm_head's weight
    included, and synchronously; here the copy to pinned memory is asynchronous (the
    stream orders the copy back), so forward makes no host sync. A tensor already on the
    host (a CPU run) stays where it is; `offloaded_bytes` counts what each forward handed
    over either way, so a CPU run shows what a GPU would move.
    """

    def __init__(self) -> None:
        from deepspeed.accelerator import get_accelerator

        # torch pins through the current accelerator's host allocator (CUDA, XPU, ...).
        self.pin = get_accelerator().device_name() != "cpu"
        self.offloaded_bytes = 0

    def pack(self, tensor: torch.Tensor):
        if isinstance(tensor, torch.nn.Parameter):
            return tensor
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, device="cpu", pin_memory=self.pin)
        host.copy_(tensor, non_blocking=self.pin)
        return tensor.device, host

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context to run forward in; resets the count."""
        self.offloaded_bytes = 0
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


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


def load_model(path: str, precision: str, gradient_checkpointing: bool,
               attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Loads weights onto CPU in the training dtype (under ZeRO-3, partitioned as they load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision], local_files_only=True,
                                                 attn_implementation=attn_implementation)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


# Attention implementations that take the 4-D mask of document_attention_mask: sdpa
# (a bool mask, True = attend) and eager (added to the scores, so a float mask).
DOCUMENT_MASK_ATTENTION = ("sdpa", "eager")


def check_document_attention(config, block_size: int, flag: str, implementation: str = "sdpa") -> None:
    """Packing passes a 4-D mask that replaces the one the model would build, so a sliding
    window shorter than the block would be lost, and attention kernels that take no
    dense mask cannot run it: both are refused here, before anything is written."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < block_size:
        raise UserInputError(f"{flag}: the model attends within a sliding window of {window} tokens, shorter than "
                             f"--block_size {block_size}, which the per-document mask does not keep; use --block_size "
                             f"{window} or less")
    if implementation not in DOCUMENT_MASK_ATTENTION:
        raise UserInputError(f"{flag}: needs sdpa or eager attention (a 4-D mask), not --attn_implementation "
                             f"{implementation}")


def document_attention_mask(position_ids: torch.Tensor, attn_implementation: str = "sdpa",
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, S, S] mask that is causal and block-diagonal over documents: a document (an
    example of a packed row, or a document of an indexed window) begins wherever
    position_ids is 0. Built on the ids' device, so it follows the batch to CPU or GPU.

    sdpa gets it as bool (True = attend; S*S bytes a row: 256 KiB at 512 tokens, 16 MiB at
    4096), eager as an additive float mask (0 or the dtype's minimum). Hugging Face returns
    a 4-D mask as given (masking_utils._preprocess_mask_arguments), so this is what every
    layer sees. No row is empty: every token attends at least to itself.
    Flash-attention kernels take no dense mask; their alternative is padding-free rows,
    the micro-batch flattened to one row with these position_ids and no mask, from which
    transformers derives the varlen sequence bounds (not wired here: the trainer loads
    models with sdpa).
    """
    documents = (position_ids == 0).cumsum(dim=-1)
    size = position_ids.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=position_ids.device).tril()
    mask = ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def model_inputs(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model call for a batch: with `position_ids` (packed
    examples or per-document attention), those and the per-document 4-D mask; otherwise
    the 2-D padding mask, from which the model builds its causal mask."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = getattr(module, "module", module)  # a DeepSpeed engine wraps the model
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    dtype = model.get_input_embeddings().weight.dtype
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": document_attention_mask(batch["position_ids"], implementation, dtype)}


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
