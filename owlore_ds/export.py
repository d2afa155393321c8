"""Turning any checkpoint of ours (any ZeRO stage, any world size) into a Hugging Face folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from owlore_ds.checkpoint import TRAINER_STATE, WeightReader, holds_weights, read_full_weights, read_trainer_state
from owlore_ds.errors import UserInputError
from owlore_ds.lora import add_adapters, merged
from owlore_ds.modeling import DTYPES


def consolidated_state_dict(checkpoint: str, state: dict) -> dict[str, torch.Tensor]:
    """fp32 weights from the checkpoint's own weight files (lomo/adalomo, lisa/owlore/galore),
    the fp32 master partitions (ZeRO) or the saved module (stage 0)."""
    tag = f"global_step{state['global_step']}"
    if holds_weights(state):
        weights = read_full_weights(checkpoint)
    elif state.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of its work
            weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=tag)
    else:
        saved = torch.load(os.path.join(checkpoint, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)
        weights = saved["module"]
    return {name: tensor.float() for name, tensor in weights.items()}


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes, as save_pretrained's max_shard_size reads them."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise UserInputError(f"{flag} {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def export_checkpoint(checkpoint: str, destination: str, dtype: Optional[str] = None, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Writes config, safetensors weights and tokenizer of `checkpoint` to `destination`.

    The folder is written under a temporary name and renamed at the end, so a failed
    export never leaves a half-written model behind. Checkpoints that hold their own
    weight files (lisa/owlore/galore, lomo/adalomo) are streamed: one tensor at a time into
    shards of at most `max_shard_bytes`, so no more than one shard and one tensor are in
    memory, whatever the model's size.
    """
    from transformers import AutoConfig, AutoTokenizer

    state = read_trainer_state(checkpoint, what="checkpoint")
    dtype = dtype or state.get("precision", "fp32")
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    check_destination(destination, overwrite)
    # Inside a ZeRO-3 training process, from_config would partition the new model
    # across ranks with collectives that only this rank joins.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    # A fresh name beside DEST (same filesystem, so the final rename is atomic): no folder
    # of the user's is ever cleared to make room for the temporary one.
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(destination))}.export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide DEST from the user's group
    try:
        if holds_weights(state) and "lora" not in state:
            _stream_weights(checkpoint, tmp, dtype, max_shard_bytes)
            config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
            config.dtype = DTYPES[dtype]
            config.save_pretrained(tmp)
        else:
            _materialized_model(checkpoint, state, dtype).save_pretrained(tmp, safe_serialization=True,
                                                                          max_shard_size=max_shard_bytes)
        AutoTokenizer.from_pretrained(checkpoint, local_files_only=True).save_pretrained(tmp)
        with open(os.path.join(tmp, "owlore_ds_source.json"), "w") as fh:
            json.dump({"checkpoint": os.path.abspath(checkpoint), "global_step": state["global_step"], "dtype": dtype}, fh)
        check_destination(destination, overwrite)  # again: it may have changed while we wrote
        if os.path.isdir(destination):
            shutil.rmtree(destination)
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def _expected_shapes(checkpoint: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights a Hugging Face folder of this config holds (tied ones once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _stream_weights(checkpoint: str, folder: str, dtype: str, max_shard_bytes: int) -> None:
    """The checkpoint's weight files rewritten as `model.safetensors`, or as
    `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    reader = WeightReader(checkpoint)
    expected = _expected_shapes(checkpoint)
    found = {name: reader.shape(name) for name in reader.files}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        odd = sorted(k for k in found if expected.get(k) != found[k])[:3]
        raise UserInputError(f"{checkpoint}: weights do not match the config (missing {missing}, unexpected or "
                             f"misshapen {odd})")
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    total = 0

    def flush() -> None:
        nonlocal shard
        if shard:
            save_file(shard, os.path.join(folder, f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(shard))
            shard = {}

    for name in expected:  # the model's own order
        tensor = reader.tensor(name).to(DTYPES[dtype])
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        total += tensor.nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(folder, "part-00000.safetensors"), os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, f"part-{k:05d}.safetensors"), os.path.join(folder, file))
        weight_map.update({name: file for name in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)


def _materialized_model(checkpoint: str, state: dict, dtype: str) -> torch.nn.Module:
    """The whole model in memory (DeepSpeed-format checkpoints, and LoRA's merge)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = consolidated_state_dict(checkpoint, state)
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if "lora" in state:  # rebuild the adapters, load them with the base, then fold them in
            model = add_adapters(model, state["lora"])
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if k.removeprefix("base_model.model.") not in tied]
    if missing or unexpected:
        raise UserInputError(f"{checkpoint}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if "lora" in state:
        model.get_base_model().tie_weights()  # before merging, or peft unties the config
        model = merged(model)
    model.tie_weights()
    return model.to(DTYPES[dtype])


def is_export(path: str) -> bool:
    """A folder written by an export: a config and safetensors weights, and nothing that is not a file."""
    names = os.listdir(path)
    return ("config.json" in names and any(n.endswith(".safetensors") for n in names)
            and all(os.path.isfile(os.path.join(path, n)) for n in names))


def check_destination(destination: str, overwrite: bool) -> None:
    """Refuses (before anything is written or deleted) a DEST that is not new, empty or,
    with `overwrite`, an earlier export."""
    if not os.path.exists(destination):
        return
    if not os.path.isdir(destination):
        raise UserInputError(f"{destination}: exists and is not a folder")
    if not os.listdir(destination):
        return
    if not overwrite:
        raise UserInputError(f"{destination}: exists and is not empty; choose a new folder or pass --overwrite")
    if not is_export(destination):
        raise UserInputError(f"{destination}: --overwrite replaces only an earlier export (config.json and "
                             "*.safetensors files); this folder holds something else, nothing was deleted")


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE))
