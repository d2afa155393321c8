"""Turning any checkpoint of ours (any ZeRO stage, any world size) into a Hugging Face folder,
streamed: no more than one tensor (and for most tensors one 64 MiB piece of one) is in memory.

Every output tensor is described first by where its elements lie in the checkpoint's files
(`_Span`s: file, byte offset, count, dtype), read with plain file reads, converted and
written piece by piece into safetensors files whose headers are written first. Nothing is
memory-mapped: pages of a mapped file count in the process's resident memory once touched
and stay until unmapped, so reading a 2.7 GB checkpoint through mmap shows 2.7 GB of RSS.

Where the elements lie:
- checkpoints that hold their own weights (lisa/owlore/galore, lomo/adalomo): the tensors of
  the ranks' safetensors shards (the header says where each one is);
- DeepSpeed ZeRO-1/2 (`--method full`, `lora`): each rank's `single_partition_of_fp32_groups`
  in its `*_optim_states.pt`; a parameter group's fp32 masters are the concatenation of the
  ranks' partitions, parameters back to back in the order of the model file's `param_shapes`,
  each followed by its alignment padding (`param_alignment_paddings`);
- DeepSpeed ZeRO-3: each rank's `fp32_flat_groups` holds, parameter after parameter in
  `param_shapes` order, ceil(numel / N) elements of every parameter (rank r's are elements
  [r * ceil(numel/N), ...) of the whole, the last rank's padded);
  both exactly as deepspeed/utils/zero_to_fp32.py reconstructs them, which the tests use as
  the oracle. Parameters outside the optimizer (LoRA's frozen base weights) come from the
  model files: `frozen_param_fragments` (ZeRO-2: whole; ZeRO-3: each rank's partition) or,
  under ZeRO-1 which saves no fragments, the saved module;
- no ZeRO: the saved module.
The torch files are zip archives whose tensor records are stored uncompressed; their pickle
is read with tensors replaced by (record, offset, shape) descriptions, so the Adam moments
beside the masters are never read at all.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from owlore_ds.checkpoint import TRAINER_STATE, holds_weights, read_trainer_state, weight_files
from owlore_ds.errors import UserInputError
from owlore_ds.modeling import DTYPES

PIECE_BYTES = 64 << 20  # the most bytes of one tensor read, converted and written at a time


# ---------------------------------------------------------------- where the elements lie

@dataclass(frozen=True)
class _Span:
    """`numel` consecutive elements of `dtype` at byte `offset` of file `path`."""

    path: str
    offset: int
    numel: int
    dtype: torch.dtype


def _read(span: _Span, start: int = 0, count: Optional[int] = None) -> torch.Tensor:
    """Elements [start, start + count) of `span`, read with plain file reads (no mmap)."""
    count = span.numel - start if count is None else count
    out = torch.empty(count, dtype=span.dtype)
    view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
    with open(span.path, "rb", buffering=0) as fh:
        fh.seek(span.offset + start * out.element_size())
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise UserInputError(f"{span.path}: truncated (a tensor's data ends past the end of the file)")
            done += got
    return out


@dataclass
class _Source:
    """One output tensor: its shape and either the spans whose concatenation is its flat
    elements, or a function that makes it whole (LoRA's merged matrices)."""

    shape: tuple[int, ...]
    spans: Optional[list[_Span]] = None
    make: Optional[Callable[[], torch.Tensor]] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def pieces(self, piece_bytes: int = PIECE_BYTES) -> Iterator[torch.Tensor]:
        """The flat elements in order, at most `piece_bytes` of them at a time (spans only)."""
        if self.make is not None:
            yield self.make().reshape(-1)
            return
        for span in self.spans:
            step = max(1, piece_bytes // torch.tensor([], dtype=span.dtype).element_size())
            for start in range(0, span.numel, step):
                yield _read(span, start, min(step, span.numel - start))

    def whole(self) -> torch.Tensor:
        """The tensor in fp32 (one copy: the pieces are copied into it as they are read)."""
        out = torch.empty(self.numel, dtype=torch.float32)
        done = 0
        for piece in self.pieces():
            out[done : done + piece.numel()] = piece
            done += piece.numel()
        return out.view(self.shape)


def _take(parts: list[_Span], lo: int, count: int) -> list[_Span]:
    """Elements [lo, lo + count) of the concatenation of `parts`, as spans."""
    spans, start = [], 0
    for span in parts:
        a, b = max(lo, start), min(lo + count, start + span.numel)
        if b > a:
            size = torch.tensor([], dtype=span.dtype).element_size()
            spans.append(_Span(span.path, span.offset + (a - start) * size, b - a, span.dtype))
        start += span.numel
    if sum(s.numel for s in spans) != count:
        raise UserInputError(f"{parts[0].path}: a tensor runs past the end of its flat partition")
    return spans


# ------------------------------------------------ torch zip files, read without their tensors

@dataclass(frozen=True)
class _LazyStorage:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _LazyTensor:
    storage: _LazyStorage
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _rebuild_lazy(storage, storage_offset, size, stride, *args, **kwargs) -> _LazyTensor:
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _LazyUnpickler(pickle.Unpickler):
    """torch.load's unpickling with every tensor replaced by a _LazyTensor (torch.serialization
    ._load's persistent_load and find_class, minus the loading). Like torch.load(weights_only=
    False) it imports the classes the pickle names (DeepSpeed's): checkpoints must be trusted."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_lazy
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *args: data
        if module in ("torch._tensor", "torch.tensor") and name == "_rebuild_from_type_v2":
            return lambda func, new_type, args, state: func(*args)  # a subclass (Parameter): the data
        if module == "torch._utils" and name.startswith("_rebuild"):
            raise UserInputError(f"a tensor saved as {name}, which the streaming export cannot read")
        if "Storage" in name:
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        return super().find_class({"torch.tensor": "torch._tensor"}.get(module, module), name)

    def persistent_load(self, saved_id: Any) -> _LazyStorage:
        typename, storage_type, key, _location, _numel = saved_id
        if typename != "storage":
            raise UserInputError(f"unknown record {typename!r} in a torch file")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return _LazyStorage(str(key), dtype)


class _TorchFile:
    """A torch.save file: its object with tensors as _LazyTensor, and where each tensor's
    elements are in the file. Only the pickle is read; tensor data is read later, by span."""

    def __init__(self, path: str):
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
                prefix = pkl[: -len("data.pkl")]
                order = f"{prefix}byteorder"
                if order in names and archive.read(order).decode() != "little":
                    raise UserInputError(f"{path}: saved on a big-endian machine; not supported")
                self.obj = _LazyUnpickler(archive.open(pkl)).load()
                self._records = {n[len(prefix) + len("data/"):]: archive.getinfo(n) for n in names
                                 if n.startswith(f"{prefix}data/")}
        except UserInputError:
            raise
        except (zipfile.BadZipFile, StopIteration):
            raise UserInputError(f"{path}: not a zip-format torch file (truncated, or saved with "
                                 "_use_new_zipfile_serialization=False)") from None
        except Exception as exc:
            raise UserInputError(f"{path}: corrupt checkpoint file ({type(exc).__name__}: {exc})") from None
        self._offsets: dict[str, int] = {}

    def _record_offset(self, key: str) -> int:
        if key not in self._offsets:
            info = self._records[key]
            if info.compress_type != zipfile.ZIP_STORED:
                raise UserInputError(f"{self.path}: tensor record {key} is compressed")
            with open(self.path, "rb") as fh:  # the local header's name and extra field lengths
                fh.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", fh.read(4))
            self._offsets[key] = info.header_offset + 30 + name_len + extra_len
        return self._offsets[key]

    def span(self, tensor: _LazyTensor) -> _Span:
        """The elements of a contiguous tensor of this file."""
        if not isinstance(tensor, _LazyTensor):
            raise UserInputError(f"{self.path}: expected a tensor, found {type(tensor).__name__}")
        expected_stride, acc = [], 1
        for dim in reversed(tensor.shape):
            expected_stride.insert(0, acc)
            acc *= dim
        if tensor.numel > 1 and tuple(s for s, d in zip(tensor.stride, tensor.shape) if d > 1) != \
                tuple(s for s, d in zip(expected_stride, tensor.shape) if d > 1):
            raise UserInputError(f"{self.path}: a non-contiguous tensor")
        size = torch.tensor([], dtype=tensor.storage.dtype).element_size()
        if tensor.storage.key not in self._records or \
                (tensor.offset + tensor.numel) * size > self._records[tensor.storage.key].file_size:
            raise UserInputError(f"{self.path}: a tensor runs past its record {tensor.storage.key}")
        return _Span(self.path, self._record_offset(tensor.storage.key) + tensor.offset * size, tensor.numel,
                     tensor.storage.dtype)


def _natural(text: str) -> list:
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def _zero_sources(folder: str) -> tuple[dict[str, _Source], dict[str, str]]:
    """fp32 masters of a ZeRO-1/2/3 checkpoint (and the frozen parameters), and its shared names."""
    optim_files = sorted(glob.glob(os.path.join(folder, "*_optim_states.pt")), key=_natural)
    model_files = sorted(glob.glob(os.path.join(folder, "*_model_states.pt")), key=_natural)
    if not optim_files or not model_files:
        raise UserInputError(f"{folder}: no DeepSpeed optimizer or model files")
    optims = [_TorchFile(f) for f in optim_files]
    states = [o.obj["optimizer_state_dict"] for o in optims]
    world = states[0].get("partition_count")
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if world != len(optims):
        raise UserInputError(f"{folder}: {len(optims)} optimizer files for {world} ranks (a partial checkpoint)")
    stage = states[0].get("zero_stage")
    # ZeRO-1 with bf16 weights and fp32 gradients runs DeepSpeed's BF16_Optimizer, which saves
    # no stage but the same single partitions as ZeRO-1/2.
    stage = int(stage) if stage is not None else (1 if "single_partition_of_fp32_groups" in states[0] else None)
    sources: dict[str, _Source] = {}
    if stage in (1, 2):
        model = _TorchFile(model_files[0])
        shapes = model.obj["param_shapes"]
        paddings = states[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            parts = [o.span(s["single_partition_of_fp32_groups"][g]) for o, s in zip(optims, states)]
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                shape = tuple(int(d) for d in shape)
                sources[name] = _Source(shape, _take(parts, offset, math.prod(shape)))
                offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
            align = 2 * world  # zero_to_fp32's check: both round up to 2 * world size
            available = sum(span.numel for span in parts)
            if -(-offset // align) * align != -(-available // align) * align:
                raise UserInputError(f"{folder}: group {g} holds {available} elements; its parameters take {offset}")
        shared = dict(model.obj.get("shared_params") or {})
        frozen = model.obj.get("frozen_param_fragments") or {}
        module = model.obj.get("module") or {}
        skip = set(sources) | set(shared) | set(model.obj.get("buffer_names") or [])
        for name in dict.fromkeys([*(model.obj.get("frozen_param_shapes") or {}), *module]):
            tensor = frozen.get(name, module.get(name))  # ZeRO-1 saves no fragments: the module's
            if name not in skip and isinstance(tensor, _LazyTensor):
                sources[name] = _Source(tensor.shape, [model.span(tensor)])
    elif stage == 3:
        models = [_TorchFile(f) for f in model_files]
        if len(models) != world:
            raise UserInputError(f"{folder}: {len(models)} model files for {world} ranks (a partial checkpoint)")
        flat = [[o.span(t) for t in s["fp32_flat_groups"]] for o, s in zip(optims, states)]  # per rank
        offset = 0
        for group in models[0].obj["param_shapes"]:
            for name, shape in group.items():
                shape = tuple(int(d) for d in shape)
                numel, per_rank = math.prod(shape), -(-math.prod(shape) // world)
                spans = []
                for r in range(world):
                    count = min(per_rank, numel - r * per_rank)
                    if count > 0:
                        spans += _take(flat[r], offset, count)
                sources[name] = _Source(shape, spans)
                offset += per_rank
        available = sum(span.numel for span in flat[0])
        if offset != available:
            raise UserInputError(f"{folder}: each rank holds {available} elements; the parameters take {offset}")
        for name, shape in (models[0].obj.get("frozen_param_shapes") or {}).items():
            shape = tuple(int(d) for d in shape)
            parts = [m.span(m.obj["frozen_param_fragments"][name]) for m in models]
            sources[name] = _Source(shape, _take(parts, 0, math.prod(shape)))
        shared = dict(models[0].obj.get("shared_params") or {})
    else:
        raise UserInputError(f"{folder}: not a ZeRO checkpoint (stage {stage!r})")
    return sources, shared


def _module_sources(path: str) -> tuple[dict[str, _Source], dict[str, str]]:
    """The saved module of a checkpoint without ZeRO."""
    model = _TorchFile(path)
    buffers = set(model.obj.get("buffer_names") or [])
    sources = {name: _Source(t.shape, [model.span(t)]) for name, t in model.obj["module"].items()
               if isinstance(t, _LazyTensor) and name not in buffers}
    return sources, dict(model.obj.get("shared_params") or {})


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _safetensors_sources(checkpoint: str) -> tuple[dict[str, _Source], dict[str, str]]:
    """The tensors of a checkpoint's own safetensors shards (their headers say where each is)."""
    sources = {}
    for path in weight_files(checkpoint):
        if not path.endswith(".safetensors"):
            continue
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
                span = _Span(path, 8 + length + begin, math.prod(shape), dtype)
                if (end - begin) != span.numel * torch.tensor([], dtype=dtype).element_size():
                    raise ValueError(name)
                sources[name] = _Source(shape, [span])
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            raise UserInputError(f"{path}: corrupt weights") from None
    return sources, {}


def checkpoint_sources(checkpoint: str, state: Optional[dict] = None) -> tuple[dict[str, _Source], dict[str, str]]:
    """Every weight of a checkpoint by the name the trained module gave it (fp32 masters where
    the checkpoint has them), as spans of its files, and the names DeepSpeed saved once for
    tied weights ({other name: saved name})."""
    state = state or read_trainer_state(checkpoint, what="checkpoint")
    tag = os.path.join(checkpoint, f"global_step{state['global_step']}")
    if holds_weights(state):
        return _safetensors_sources(checkpoint)
    if state.get("zero_stage", 0) > 0:
        return _zero_sources(tag)
    return _module_sources(os.path.join(tag, "mp_rank_00_model_states.pt"))


_PEFT_PREFIX = "base_model.model."


def _lora_merge(base: _Source, lora_a: _Source, lora_b: _Source, scaling: float) -> torch.Tensor:
    """W + (B A) * scaling in fp32, as peft's LoraLayer.merge computes it (get_delta_weight)."""
    return base.whole().float() + (lora_b.whole().float() @ lora_a.whole().float()) * scaling


def output_sources(checkpoint: str, state: dict) -> dict[str, _Source]:
    """The weights of the Hugging Face model, in its own order (tied ones once), with LoRA's
    adapters merged; refuses weights that do not match the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sources, shared = checkpoint_sources(checkpoint, state)
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    aliases = {**shared, **{saved: other for other, saved in shared.items()}}
    lora = state.get("lora")
    prefix = _PEFT_PREFIX if lora else ""
    if lora:
        r, alpha = lora["r"], lora["lora_alpha"]
        scaling = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
    found: dict[str, _Source] = {}
    for name in expected:
        key = prefix + name
        if key not in sources and aliases.get(key) in sources:
            key = aliases[key]
        if key in sources:
            found[name] = sources[key]
            continue
        module, _, leaf = (prefix + name).rpartition(".")
        base = sources.get(f"{module}.base_layer.{leaf}")
        if base is None or not lora:
            continue
        lora_a, lora_b = sources.get(f"{module}.lora_A.default.weight"), sources.get(f"{module}.lora_B.default.weight")
        if leaf == "weight" and lora_a is not None and lora_b is not None:
            found[name] = _Source(base.shape, make=lambda b=base, a=lora_a, bb=lora_b: _lora_merge(b, a, bb, scaling))
        else:
            found[name] = base
    odd = sorted(k for k in found if found[k].shape != expected[k])[:3]
    missing = sorted(set(expected) - set(found))[:3]
    if missing or odd:
        raise UserInputError(f"{checkpoint}: weights do not match the config (missing {missing}, misshapen {odd})")
    return found


# ---------------------------------------------------------------- writing


def _write_safetensors(path: str, tensors: list[tuple[str, _Source]], dtype: torch.dtype,
                       piece_bytes: int = PIECE_BYTES) -> None:
    """A safetensors file written as a stream: the header first (from the shapes and the dtype),
    then each tensor's bytes in header order, a piece at a time.

    Written by hand because safetensors' save_file (and save_pretrained) take a dict of whole
    tensors, so a shard of 5 GB is 5 GB in memory. The format is 8 bytes of little-endian
    header length, the JSON header ({name: {dtype, shape, data_offsets}}, "__metadata__";
    offsets relative to the end of the header, back to back), padded with spaces to a
    multiple of 8, then the data; the tests read the files back with safetensors' own reader.
    """
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, source in tensors:
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(source.shape),
                        "data_offsets": [offset, offset + source.numel * size]}
        offset += source.numel * size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, source in tensors:
            written = 0
            for piece in source.pieces(piece_bytes):
                piece = piece.to(dtype).contiguous()
                if piece.numel():
                    fh.write(memoryview(piece.view(torch.uint8).numpy()))
                written += piece.numel()
                del piece
            if written != source.numel:
                raise UserInputError(f"{name}: {written} elements read, {source.numel} expected")
        fh.flush()
        os.fsync(fh.fileno())


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards in order: a shard takes tensors until the next one would pass
    `max_shard_bytes`; a tensor larger than that gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, nbytes in sizes:
        if current and total + nbytes > max_shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(sources: dict[str, _Source], folder: str, dtype: torch.dtype, max_shard_bytes: int,
                  piece_bytes: int = PIECE_BYTES, share: tuple[int, int] = (0, 1)) -> list[str]:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards and
    `model.safetensors.index.json` (as save_pretrained names them); returns the files.

    `share` (i, n): this process writes shards k with k % n == i, share 0 the index too, so n
    ranks export together (the plan is a function of the sources alone, the same on each)."""
    size = torch.tensor([], dtype=dtype).element_size()
    shards = plan_shards([(name, s.numel * size) for name, s in sources.items()], max_shard_bytes)
    if len(shards) <= 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    mine, shares = share
    for k, (file, names) in enumerate(zip(files, shards or [[]])):
        if k % shares == mine:
            _write_safetensors(os.path.join(folder, file), [(n, sources[n]) for n in names], dtype, piece_bytes)
    if len(shards) > 1 and mine == 0:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        total = sum(s.numel * size for s in sources.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        files.append("model.safetensors.index.json")
    return files


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes, as save_pretrained's max_shard_size reads them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise UserInputError(f"{flag} {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def export_checkpoint(checkpoint: str, destination: str, dtype: Optional[str] = None, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Writes config, safetensors weights and tokenizer of `checkpoint` to `destination`.

    The folder is written under a temporary name and renamed at the end, so a failed
    export never leaves a half-written model behind. The weights are streamed from any
    checkpoint (any method, ZeRO stage and world size): a piece of one tensor at a time (a
    whole tensor for LoRA's merged matrices), into shards of at most `max_shard_bytes`.
    """
    state, dtype, sources = plan_export(checkpoint, dtype)  # refuses a mismatched checkpoint before writing
    tmp = begin_export(destination, overwrite)
    try:
        write_weights(sources, tmp, DTYPES[dtype], max_shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_export(checkpoint, state, dtype, tmp, destination, overwrite)


def plan_export(checkpoint: str, dtype: Optional[str] = None) -> tuple[dict, str, dict[str, _Source]]:
    """(trainer state, output dtype, where each output tensor comes from) of a checkpoint."""
    state = read_trainer_state(checkpoint, what="checkpoint")
    dtype = dtype or state.get("precision", "fp32")
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    # Inside a ZeRO-3 training process, from_config would partition the new model
    # across ranks with collectives that only this rank joins.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return state, dtype, output_sources(checkpoint, state)


def begin_export(destination: str, overwrite: bool) -> str:
    """Checks DEST and makes the temporary folder the export is written into; returns it."""
    check_destination(destination, overwrite)
    # A fresh name beside DEST (same filesystem, so the final rename is atomic): no folder
    # of the user's is ever cleared to make room for the temporary one.
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(destination))}.export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide DEST from the user's group
    return tmp


def finish_export(checkpoint: str, state: dict, dtype: str, tmp: str, destination: str, overwrite: bool) -> str:
    """Adds config, generation config and tokenizer to the weights in `tmp` and renames it to
    DEST; removes `tmp` if that fails."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        config.dtype = DTYPES[dtype]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)  # as save_pretrained of the model writes
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
