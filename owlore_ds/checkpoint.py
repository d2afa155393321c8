"""Checkpoints: `OUT/checkpoint-N/` = DeepSpeed's `global_stepN/` + `latest`, the trainer's
state, per-rank RNG states, and the model config and tokenizer (so that
tools/convert_to_hf.py needs nothing else).

A checkpoint is written under `checkpoint-N.tmp`, flushed to disk, and renamed when every
rank is done, so a crash or power loss mid-save leaves the previous checkpoint as the newest
complete one; a write that fails on any rank fails every rank together (see save()).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import random
import re
import shutil
import zipfile
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np
import torch

from owlore_ds import distributed as dist
from owlore_ds.config import RUN_IDENTITY_FIELDS, RUN_IDENTITY_OPTIONAL, TrainConfig
from owlore_ds.errors import CheckpointError, UserInputError

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
# lomo/adalomo and lisa/owlore/galore run without a DeepSpeed optimizer whose files would
# hold the weights, so their checkpoints hold the whole weights themselves, as safetensors
# shards written by every rank and listed in an index (loadable on any number of ranks).
WEIGHTS_FILE = "model.safetensors"  # one file: checkpoints of earlier versions
WEIGHTS_INDEX = "model.safetensors.index.json"
STEP_STATE = "step_state.pt"  # scheduler and optimizer scalars of the families that hold their weights
SHARD_BYTES = 1 << 30
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^checkpoint-\d+\.tmp$")
log = logging.getLogger("owlore_ds")


def run_identity(cfg: TrainConfig, global_batch: int) -> dict[str, Any]:
    identity = {name: getattr(cfg, name) for name in RUN_IDENTITY_FIELDS}
    identity.update({name: getattr(cfg, name) for name, default in RUN_IDENTITY_OPTIONAL.items()
                     if getattr(cfg, name) != default})
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
    if holds_weights(state):
        files = weight_files(path) + [os.path.join(path, STEP_STATE)]
        if "layerwise" in state:
            files += [_rank_state_file(path, r) for r in range(world)]
        if not all(os.path.isfile(f) for f in files):
            raise UserInputError(f"{path}: partial checkpoint, {os.path.relpath(next(f for f in files if not os.path.isfile(f)), path)} is missing")
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
    return model_files + optim_files


def holds_weights(state: dict[str, Any]) -> bool:
    """Whether a checkpoint holds our own weight files rather than DeepSpeed's."""
    return bool(state.get("fused")) or state.get("weights") == "safetensors"


def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint that holds its weights (the index's shards)."""
    index = os.path.join(path, WEIGHTS_INDEX)
    if not os.path.isfile(index):
        return [os.path.join(path, WEIGHTS_FILE)]
    try:
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserInputError(f"{index}: corrupt weight index") from None
    return [index] + [os.path.join(path, shard) for shard in shards]


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
        remove_stale_tmp(out)
        if not resuming:
            _write_json(os.path.join(out, RUN_CONFIG), {"run_identity": identity, "config": cfg.to_dict()})
    dist.barrier()


def remove_stale_tmp(output_dir: str) -> list[str]:
    """Removes the `checkpoint-N.tmp` folders that saves cut short by a crash left in
    `output_dir` (that exact pattern only); returns them."""
    stale = [os.path.join(output_dir, name) for name in os.listdir(output_dir)
             if _TMP_RE.match(name) and os.path.isdir(os.path.join(output_dir, name))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by an interrupted save", path)
    return stale


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    """This rank's generator states as plain tensors and numbers, so the file loads with
    torch.load(weights_only=True) (numpy's state holds an ndarray, which would need pickle)."""
    from deepspeed.accelerator import get_accelerator

    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
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


class WriteErrors:
    """This rank's first write error of a save, kept instead of raised.

    A rank that raised in the middle of a save would leave the others waiting in the save's
    next collective (DeepSpeed's own barriers included) until --ddp_timeout. Kept errors let
    every rank take part in every collective of the save; the ranks then agree on the
    outcome and all fail together, each naming the file and the reason.
    """

    def __init__(self, what: str) -> None:
        self.what = what  # "saving PATH", the start of the error every rank raises
        self.error: Optional[str] = None

    def run(self, path: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None  # after a failure on this rank, skip the remaining writes
        try:
            return write(*args, **kwargs)
        except Exception as exc:  # ENOSPC and EIO surface as OSError or torch's RuntimeError
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            self.error = f"{path}: {reason}{_free_space_note(path)}"
            return None

    def agree(self) -> None:
        """Raises CheckpointError on every rank when any rank failed (a collective: every rank calls it)."""
        if dist.all_agree(self.error is None):
            return
        errors = dist.all_gather_object(self.error)
        failed = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
        raise CheckpointError(f"{self.what} failed on {failed}")


class _HeldErrorWriter:
    """A binary file whose first write error is held instead of raised, for torch.save."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.fh.write(data)
            except OSError as exc:
                self.error = exc
        return len(memoryview(data))

    def flush(self) -> None:
        if self.error is None:
            try:
                self.fh.flush()
            except OSError as exc:
                self.error = exc


def torch_save(obj: Any, destination: str | BinaryIO, **save_options: Any) -> None:
    """torch.save to a path or an open binary file, a failed write raising OSError.

    Written by hand because torch's zip writer does not survive a failed write: to a path its
    C++ stream throws through the zip library's C frames, which can end the process with
    std::terminate (SIGABRT, pytorch issues 156955 and PR 175248) instead of an exception, and
    a Python file's OSError takes the same way back. Here the writer never sees a failure: the
    first error is held, the rest of the file is dropped, and the error is raised in Python."""
    if isinstance(destination, str):
        with open(destination, "wb") as fh:
            torch_save(obj, fh, **save_options)
        return
    sink = _HeldErrorWriter(destination)
    torch.save(obj, sink, **save_options)
    if sink.error is not None:
        raise sink.error


def _free_space_note(path: str) -> str:
    """Some writers report a full disk without the errno (DeepSpeed's other checkpoint
    engines, torch's zip writer: "unexpected pos A vs B"): say how much room is left."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        stats = os.statvfs(folder or ".")
    except OSError:
        return ""
    return f" ({stats.f_bavail * stats.f_frsize} bytes free on its filesystem)"


@contextlib.contextmanager
def _guarded_engine(engine, errors: WriteErrors) -> Iterator[None]:
    """Routes DeepSpeed's file writes of a save through `errors`: its checkpoint engine's
    save (every state file) and the copy of its recovery scripts (rank 0's zero_to_fp32.py),
    the only writes of save_checkpoint(save_latest=False) between its collectives."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    writer = engine.checkpoint_engine
    save, copy_scripts = writer.save, engine._copy_recovery_script
    if isinstance(writer, TorchCheckpointEngine):  # its save is a plain torch.save of a path
        options = {"_use_new_zipfile_serialization": writer.zipfile_serialization}
        save = lambda state_dict, path: torch_save(state_dict, path, **options)  # noqa: E731
    writer.save = lambda state_dict, path: errors.run(path, save, state_dict, path)
    engine._copy_recovery_script = lambda path: errors.run(path, copy_scripts, path)
    try:
        yield
    finally:
        del writer.save, engine._copy_recovery_script  # the classes' methods again


def _fsync_tree(root: str) -> None:
    """Flushes every file and folder under `root` (and `root`) to stable storage."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """A rename or a new entry is durable only once its folder is flushed."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(step: int, cfg: TrainConfig, trainer_state: dict[str, Any], model_config, tokenizer,
         write: Callable[[str, int, WriteErrors], None]) -> str:
    """Writes OUT/checkpoint-`step` on all ranks; returns its path.

    `write(folder, step, errors)` is called on every rank and writes the method's model and
    optimizer files, each write through `errors.run`. Everything is written to
    `checkpoint-N.tmp`, flushed to disk (files and folders), and only then renamed; older
    checkpoints are pruned after the rename is flushed too. A write that fails on any rank
    raises CheckpointError on every rank, leaving the partial folder as `.tmp` and the
    previous checkpoint as the newest complete one.
    """
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = f"{final}.tmp"
    errors = WriteErrors(f"saving {final}")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        errors.run(tmp, os.makedirs, tmp)
    errors.agree()
    write(tmp, step, errors)
    rng_file = os.path.join(tmp, f"rng_state_{dist.rank()}.pth")
    errors.run(rng_file, torch_save, _rng_state(), rng_file)
    if dist.is_main():
        errors.run(tmp, model_config.save_pretrained, tmp)
        errors.run(tmp, tokenizer.save_pretrained, tmp)
        errors.run(os.path.join(tmp, TRAINER_STATE), _write_json, os.path.join(tmp, TRAINER_STATE), trainer_state)
    errors.agree()
    # Every file of every rank is written. Dirty pages live in the page cache of the node that
    # wrote them, so one process per node flushes the whole tree (on a shared filesystem each
    # node's flush covers what its ranks wrote).
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        errors.run(tmp, _fsync_tree, tmp)
    errors.agree()
    if dist.is_main():
        errors.run(final, _publish, tmp, final)
    errors.agree()
    if dist.is_main():
        _prune(cfg.output_dir, cfg.save_total_limit)  # only now is the new checkpoint durable
    dist.barrier()
    return final


def save_rank_state(directory: str, rank_state: dict[str, Any], errors: WriteErrors) -> None:
    path = _rank_state_file(directory, dist.rank())
    errors.run(path, torch_save, rank_state, path)


def save_engine(engine, directory: str, step: int, errors: WriteErrors) -> None:
    """DeepSpeed's engine.save_checkpoint into `directory`, its writes through `errors`."""
    tag = f"global_step{step}"
    # The folder first, so that DeepSpeed's own makedirs (which raises) finds it.
    errors.run(directory, os.makedirs, os.path.join(directory, tag), exist_ok=True)
    errors.agree()
    with _guarded_engine(engine, errors):
        # `latest` is ours to write: DeepSpeed writes it with a bare open() that would raise.
        engine.save_checkpoint(directory, tag=tag, save_latest=False)
    if dist.is_main():
        errors.run(os.path.join(directory, "latest"), _write_text, os.path.join(directory, "latest"), tag)


def _publish(tmp: str, final: str) -> None:
    """Renames the flushed `tmp` to `final` and flushes the rename."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final) or ".")


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


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

    def convert() -> None:
        if os.path.isfile(os.path.join(target, "mp_rank_00_model_states.pt")):
            return
        from types import SimpleNamespace

        from deepspeed.checkpoint import ds_to_universal

        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = SimpleNamespace(input_folder=os.path.join(path, f"global_step{step}"), output_folder=tmp,
                               num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                               strict=True, inject_missing_state=True)
        ds_to_universal.main(args)
        os.replace(tmp, target)

    # A failed conversion (a full disk) fails every rank at once, not at --ddp_timeout.
    dist.on_main(convert, f"converting {path} to DeepSpeed's universal format")
    return tag


def needs_universal(state: dict[str, Any], world_size: int) -> bool:
    """ZeRO partitions optimizer state by rank count: another count loads the universal format,
    which must be switched on in the DeepSpeed config before the engine is built."""
    return state["world_size"] != world_size and state.get("zero_stage", 0) > 0 and not holds_weights(state)


def check_files_readable(path: str, step: int) -> None:
    """Every rank checks a share of the checkpoint's torch files for a zip directory (a
    truncated file has none) and all agree before any rank loads: a corrupt file would
    otherwise fail only the rank reading it, in the middle of DeepSpeed's collectives."""
    files = sorted(glob.glob(os.path.join(path, f"global_step{step}", "*.pt")) + glob.glob(os.path.join(path, "*.pt"))
                   + glob.glob(os.path.join(path, "*.pth")))
    error = None
    for file in files[dist.rank()::dist.world_size()]:
        if not zipfile.is_zipfile(file):  # reads only the end of the file
            error = f"{os.path.relpath(file, path)} is truncated or not a torch file"
            break
    if not dist.all_agree(error is None):
        found = "; ".join(e for e in dist.all_gather_object(error) if e is not None)
        raise UserInputError(f"{path}: corrupt checkpoint ({found})")


def load(engine, path: str, state: dict[str, Any], world_size: int) -> None:
    """Restores engine, optimizer, scheduler and RNG states from checkpoint `path`."""
    step = int(state["global_step"])
    check_files_readable(path, step)
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
        _set_rng_state(torch.load(rng_file, weights_only=True))


def save_full_weights(module: torch.nn.Module, directory: str, errors: WriteErrors,
                      shard_bytes: int = SHARD_BYTES) -> None:
    """Every rank writes a share of the whole weights: tensor i goes to rank i % N, into
    safetensors shards of at most `shard_bytes` (one tensor larger than that gets its own);
    rank 0 writes the index. Under ZeRO-3 each tensor's partitions are gathered to its writer
    only (not to every rank), so a rank receives about 1/N of the model and holds no more than
    one full tensor beyond its shard buffer, and the writing is spread over ranks.
    Each write goes through `errors`, so a rank whose disk is full still joins the gathers."""
    from deepspeed.accelerator import get_accelerator
    from safetensors.torch import save_file

    from owlore_ds.layerwise.comm import gather_whole, is_partitioned

    rank, world = dist.rank(), dist.world_size()
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    count = 0

    def flush() -> None:
        nonlocal shard, count
        if shard:
            name = f"model-rank{rank:05d}-{count:05d}.safetensors"
            path = os.path.join(directory, name)
            errors.run(path, save_file, shard, path, metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
            shard, count = {}, count + 1

    device = torch.device(get_accelerator().current_device_name())
    for i, (name, p) in enumerate(module.named_parameters()):
        writer = i % world
        if is_partitioned(p):
            whole = gather_whole(p, writer, device)
            tensor = None if whole is None else whole.view(p.ds_shape).to("cpu", copy=True)
        else:
            tensor = p.data.detach().to("cpu", copy=True) if rank == writer else None
        if tensor is not None:
            if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > shard_bytes:
                flush()
            shard[name] = tensor
    flush()
    maps = dist.all_gather_object(weight_map)
    if dist.is_main():
        merged = {key: file for part in maps for key, file in part.items()}
        index = os.path.join(directory, WEIGHTS_INDEX)
        errors.run(index, _write_json, index, {"metadata": {}, "weight_map": dict(sorted(merged.items()))})


class WeightReader:
    """Reads tensors (or flat element ranges of them) by name from a checkpoint's weight files."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.files = {}
        files = [f for f in weight_files(path) if f.endswith(".safetensors")]
        try:
            for file in files:
                handle = safe_open(file, framework="pt")
                self.files.update({key: (file, handle) for key in handle.keys()})
        except Exception as exc:
            raise UserInputError(f"{file}: corrupt weights ({type(exc).__name__})") from None

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        return tuple(self.files[name][1].get_slice(name).get_shape()) if name in self.files else None

    def tensor(self, name: str) -> torch.Tensor:
        return self.files[name][1].get_tensor(name)

    def flat_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, reading only the rows that hold them."""
        shape = self.shape(name)
        if len(shape) < 2:
            return self.tensor(name).view(-1)[lo:hi]
        row = math.prod(shape[1:])
        first, last = lo // row, -(-hi // row)
        rows = self.files[name][1].get_slice(name)[first:last]
        return rows.reshape(-1)[lo - first * row : hi - first * row]


def load_full_weights(module: torch.nn.Module, path: str) -> None:
    """Loads a checkpoint's weight files into `module`. Under ZeRO-3 each rank reads only its
    own partition of every tensor (and the whole of those DeepSpeed keeps whole), so no rank
    reads the whole model and none waits for another."""
    reader = WeightReader(path)
    rank = dist.rank()
    for name, p in module.named_parameters():
        shape = tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        if reader.shape(name) != shape:
            raise UserInputError(f"{path}: {name} is missing from the weights or has the wrong shape")
        if not hasattr(p, "ds_tensor"):
            p.data.copy_(reader.tensor(name))
            continue
        part = p.ds_tensor.view(-1)
        lo = rank * part.numel()
        hi = min(lo + part.numel(), p.ds_numel)
        if hi > lo:
            part[: hi - lo].copy_(reader.flat_range(name, lo, hi))
        if p.data.numel() == p.ds_numel:  # also held whole now (1 rank, or gathered)
            p.data.copy_(reader.tensor(name))
