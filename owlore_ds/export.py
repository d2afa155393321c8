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

from owlore_ds.checkpoint import TRAINER_STATE, WEIGHTS_FILE, read_trainer_state
from owlore_ds.errors import UserInputError
from owlore_ds.lora import add_adapters, merged
from owlore_ds.modeling import DTYPES


def consolidated_state_dict(checkpoint: str, state: dict) -> dict[str, torch.Tensor]:
    """fp32 weights from the full weights (lomo/adalomo), the fp32 master partitions (ZeRO)
    or the saved module (stage 0)."""
    tag = f"global_step{state['global_step']}"
    if state.get("fused"):
        from safetensors.torch import load_file

        weights = load_file(os.path.join(checkpoint, WEIGHTS_FILE))
    elif state.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of its work
            weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=tag)
    else:
        saved = torch.load(os.path.join(checkpoint, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)
        weights = saved["module"]
    return {name: tensor.float() for name, tensor in weights.items()}


def export_checkpoint(checkpoint: str, destination: str, dtype: Optional[str] = None, overwrite: bool = False) -> str:
    """Writes config, safetensors weights and tokenizer of `checkpoint` to `destination`.

    The folder is written under a temporary name and renamed at the end, so a failed
    export never leaves a half-written model behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = read_trainer_state(checkpoint, what="checkpoint")
    dtype = dtype or state.get("precision", "fp32")
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    check_destination(destination, overwrite)
    weights = consolidated_state_dict(checkpoint, state)
    # Inside a ZeRO-3 training process, from_config would partition the new model
    # across ranks with collectives that only this rank joins.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
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
    model.to(DTYPES[dtype])
    # A fresh name beside DEST (same filesystem, so the final rename is atomic): no folder
    # of the user's is ever cleared to make room for the temporary one.
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(destination))}.export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide DEST from the user's group
    try:
        model.save_pretrained(tmp, safe_serialization=True)
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
