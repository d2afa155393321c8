"""Checkpoints: `OUT/checkpoint-N/` = DeepSpeed's `global_stepN/` + `latest`, the trainer's
state, per-rank RNG states, and the model config and tokenizer (so that
tools/convert_to_hf.py needs nothing else).

A checkpoint is written under `checkpoint-N.tmp` and renamed when every rank is done,
so a crash mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from typing import Any, Callable, Optional

import numpy as np
import torch

from owlore_ds import distributed as dist
from owlore_ds.config import RUN_IDENTITY_FIELDS, TrainConfig
from owlore_ds.errors import UserInputError

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
# lomo/adalomo runs have no DeepSpeed optimizer whose files would hold the weights, so
# their checkpoints hold the full weights themselves (loadable on any number of ranks).
WEIGHTS_FILE = "model.safetensors"
FUSED_STATE = "fused_state.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def run_identity(cfg: TrainConfig, global_batch: int) -> dict[str, Any]:
    identity = {name: getattr(cfg, name) for name in RUN_IDENTITY_FIELDS}
    identity["global_batch"] = global_batch
    return identity


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        match = _CHECKPOINT_RE.match(os.path.basename(path))
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _has_previous_run(output_dir: str) -> bool:
    return any(os.path.exists(os.path.join(output_dir, name)) for name in (RUN_CONFIG, "final")) or bool(
        glob.glob(os.path.join(output_dir, "checkpoint-*"))
    )


def read_trainer_state(path: str, what: str = "--resume_from_checkpoint") -> dict[str, Any]:
    """Checks that `path` is a complete checkpoint and returns its trainer state."""
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.isdir(path):
        raise UserInputError(f"{what} {path}: no such folder")
    if not os.path.isfile(state_file):
        raise UserInputError(f"{path}: not a complete checkpoint ({TRAINER_STATE} is missing)")
    try:
        with open(state_file) as fh:
            state = json.load(fh)
        step, world = int(state["global_step"]), int(state["world_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserInputError(f"{state_file}: corrupt trainer state") from None
    if state.get("fused"):
        files = [os.path.join(path, WEIGHTS_FILE), os.path.join(path, FUSED_STATE)]
        if not all(os.path.isfile(f) for f in files):
            raise UserInputError(f"{path}: partial checkpoint, {WEIGHTS_FILE} or {FUSED_STATE} is missing")
    else:
        files = _deepspeed_files(path, step, world, state)
    for file in files:
        if os.path.getsize(file) == 0:
            raise UserInputError(f"{path}: partial checkpoint, {os.path.relpath(file, path)} is empty")
    return state


def _deepspeed_files(path: str, step: int, world: int, state: dict[str, Any]) -> list[str]:
    tag_dir = os.path.join(path, f"global_step{step}")
    # DeepSpeed names files by stage and precision (zero_pp_rank_R_..., bf16_zero_pp_rank_R_...).
    model_files = glob.glob(os.path.join(tag_dir, "*model_states.pt"))
    optim_files = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    expected_optim = world if state.get("zero_stage", 0) > 0 else 0
    if not os.path.isfile(os.path.join(path, "latest")) or not model_files or len(optim_files) < expected_optim:
        raise UserInputError(f"{path}: partial checkpoint, files of global_step{step} are missing")
    if "layerwise" in state:
        optim_files = [_rank_state_file(path, r) for r in range(world)]
        if not all(os.path.isfile(f) for f in optim_files):
            raise UserInputError(f"{path}: partial checkpoint, a layerwise_rank*.pt file is missing")
    return model_files + optim_files


def resolve_resume(cfg: TrainConfig, global_batch: int) -> Optional[str]:
    """The checkpoint to resume from, or None; refuses an output dir holding a different run."""
    out = cfg.output_dir
    if cfg.overwrite_output_dir:
        return None
    if cfg.resume_from_checkpoint not in (None, "auto"):
        read_trainer_state(cfg.resume_from_checkpoint)
        chosen: Optional[str] = cfg.resume_from_checkpoint
    elif _has_previous_run(out):
        if cfg.resume_from_checkpoint != "auto":
            raise UserInputError(
                f"--output_dir {out} holds an earlier run; pass --resume_from_checkpoint auto to continue it "
                "or --overwrite_output_dir to start over"
            )
        complete = list_checkpoints(out)
        chosen = complete[-1][1] if complete else None
    else:
        return None
    previous = _previous_identity(out, chosen)
    if previous is not None:
        current = run_identity(cfg, global_batch)
        differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if differing:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise UserInputError(
                f"--output_dir {out} holds a run with a different configuration ({details}); "
                "use another --output_dir or --overwrite_output_dir"
            )
    if chosen is not None:
        read_trainer_state(chosen)
    return chosen


def _previous_identity(out: str, checkpoint: Optional[str]) -> Optional[dict[str, Any]]:
    for path in ([os.path.join(checkpoint, TRAINER_STATE)] if checkpoint else []) + [os.path.join(out, RUN_CONFIG)]:
        if os.path.isfile(path):
            with open(path) as fh:
                data = json.load(fh)
            return data.get("run_identity", data)
    return None


def prepare_output_dir(cfg: TrainConfig, identity: dict[str, Any], resuming: bool) -> None:
    """Rank 0 clears a previous run (with --overwrite_output_dir) and records this run's identity."""
    out = cfg.output_dir
    if dist.is_main():
        if cfg.overwrite_output_dir:
            for path in glob.glob(os.path.join(out, "checkpoint-*")) + [os.path.join(out, "final")]:
                shutil.rmtree(path, ignore_errors=True)
            for name in ("metrics.jsonl", RUN_CONFIG):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        os.makedirs(out, exist_ok=True)
        if not resuming:
            _write_json(os.path.join(out, RUN_CONFIG), {"run_identity": identity, "config": cfg.to_dict()})
    dist.barrier()


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": get_accelerator().get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])


def _rank_state_file(path: str, rank: int) -> str:
    return os.path.join(path, f"layerwise_rank{rank}.pt")


def load_rank_states(path: str, state: dict[str, Any]) -> list[Optional[dict[str, Any]]]:
    """The layerwise optimizer's per-rank files of a checkpoint (plain tensors). On the same
    number of ranks each rank reads its own file only; otherwise every file, memory-mapped."""
    world = int(state["world_size"])
    wanted = [dist.rank()] if world == dist.world_size() else range(world)
    try:
        return [torch.load(_rank_state_file(path, r), map_location="cpu", weights_only=True, mmap=True)
                if r in wanted else None for r in range(world)]
    except Exception as exc:
        raise UserInputError(f"{path}: corrupt checkpoint ({type(exc).__name__} reading the optimizer state)") from None


def save(engine, step: int, cfg: TrainConfig, trainer_state: dict[str, Any], model_config, tokenizer,
         rank_state: Optional[dict[str, Any]] = None,
         write_model: Optional[Callable[[str], None]] = None) -> str:
    """Writes OUT/checkpoint-`step` on all ranks; returns its path.

    The model and optimizer go through engine.save_checkpoint, or through `write_model`
    (called with the folder on every rank) for engines without a DeepSpeed optimizer.
    """
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = f"{final}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    dist.barrier()
    if write_model is not None:
        os.makedirs(tmp, exist_ok=True)
        write_model(tmp)
    else:
        engine.save_checkpoint(tmp, tag=f"global_step{step}")
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{dist.rank()}.pth"))
    if rank_state is not None:
        torch.save(rank_state, _rank_state_file(tmp, dist.rank()))
    if dist.is_main():
        model_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_json(os.path.join(tmp, TRAINER_STATE), trainer_state)
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(cfg.output_dir, cfg.save_total_limit)
    dist.barrier()
    return final


def _prune(output_dir: str, limit: Optional[int]) -> None:
    if limit is None:
        return
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def universal_tag(path: str, step: int) -> str:
    """Converts a ZeRO checkpoint to DeepSpeed's universal format (rank 0) so a different
    number of ranks can load it; returns the tag to load."""
    tag = f"global_step{step}_universal"
    target = os.path.join(path, tag)
    if dist.is_main() and not os.path.isfile(os.path.join(target, "mp_rank_00_model_states.pt")):
        from types import SimpleNamespace

        from deepspeed.checkpoint import ds_to_universal

        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = SimpleNamespace(input_folder=os.path.join(path, f"global_step{step}"), output_folder=tmp,
                               num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                               strict=True, inject_missing_state=True)
        ds_to_universal.main(args)
        os.replace(tmp, target)
    dist.barrier()
    return tag


def needs_universal(state: dict[str, Any], world_size: int) -> bool:
    """ZeRO partitions optimizer state by rank count: another count loads the universal format,
    which must be switched on in the DeepSpeed config before the engine is built."""
    return state["world_size"] != world_size and state.get("zero_stage", 0) > 0 and not state.get("fused")


def load(engine, path: str, state: dict[str, Any], world_size: int) -> None:
    """Restores engine, optimizer, scheduler and RNG states from checkpoint `path`."""
    step = int(state["global_step"])
    tag = universal_tag(path, step) if needs_universal(state, world_size) else f"global_step{step}"
    try:
        loaded, _ = engine.load_checkpoint(path, tag=tag, load_module_strict=True)
    except Exception as exc:  # a truncated or foreign file surfaces as many exception types
        raise UserInputError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if loaded is None:
        raise UserInputError(f"{path}: DeepSpeed could not load tag {tag}")
    restore_rng(path)


def restore_rng(path: str) -> None:
    """This rank's RNG states, when the checkpoint has a file for this rank."""
    rng_file = os.path.join(path, f"rng_state_{dist.rank()}.pth")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))


def save_full_weights(module: torch.nn.Module, directory: str) -> None:
    """Rank 0 writes every weight, whole, to `directory`/model.safetensors; under ZeRO-3 each
    tensor is gathered in turn, so no rank ever holds more than one full tensor extra."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from safetensors.torch import save_file

    weights = {}
    for name, p in module.named_parameters():
        with GatheredParameters([p], modifier_rank=None):
            if dist.is_main():
                weights[name] = p.data.detach().to("cpu", copy=True)
    if dist.is_main():
        save_file(weights, os.path.join(directory, WEIGHTS_FILE))


def load_full_weights(module: torch.nn.Module, path: str) -> None:
    """Loads `path`/model.safetensors into `module`, one tensor at a time; under ZeRO-3 only
    rank 0 reads each tensor and DeepSpeed scatters it, so no rank reads the whole file."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from safetensors import safe_open

    file = os.path.join(path, WEIGHTS_FILE)
    try:
        weights = safe_open(file, framework="pt")
        names = set(weights.keys())
    except Exception as exc:
        raise UserInputError(f"{file}: corrupt weights ({type(exc).__name__})") from None
    for name, p in module.named_parameters():
        shape = tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        if name not in names or tuple(weights.get_slice(name).get_shape()) != shape:
            raise UserInputError(f"{file}: {name} is missing or has the wrong shape")
        with GatheredParameters([p], modifier_rank=0):
            if dist.is_main() or not hasattr(p, "ds_id"):
                p.data.copy_(weights.get_tensor(name))
