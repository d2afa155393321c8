#!/usr/bin/env python
"""Peak memory, optimizer state and speed of every method at real layer shapes, beside the OwLore peer.

    python tools/benchmark.py --model_config llama2-7b --num_layers 2 \
        --methods full,lora,lisa,galore,owlore,lomo,adalomo,peer,peer_lisa --steps 6 --micro_batch_size 1 \
        --block_size 256 --gradient_checkpointing --output_dir bench_out
    python tools/benchmark.py --model_config llama2-7b --methods owlore,lisa,peer,peer_lisa,full \
        --predict_only full --steps 12 --lisa_activated_layers 5 --lisa_interval_steps 1 \
        --gradient_checkpointing --output_dir bench_full_depth      # all 32 layers, full AdamW predicted

- The model is random-initialized once from a bundled architecture (owlore_ds/architectures.py)
  or a config.json / model folder, cut to --num_layers decoder layers (every layer keeps its
  real shape), and saved with the embedded tokenizer (models/shakespeare-llama) to OUT/model.
- Every method runs in its own process, so each peak is its own: the trainer
  (`launch/train.py --method M`, one process, or the deepspeed launcher for --world_size N)
  and the peers (tools/peer_owlore.py, the reference pipeline as it runs, always one process,
  pure bf16 with gradient checkpointing): `peer` (GaLoreAdamW, the OwLore reference; every
  method's "vs peer" but lisa's) and `peer_lisa` (LMFlow's LISA, plain AdamW; lisa's). All see
  the same data, batches, steps, layer-sampling and GaLore settings; owlore and the GaLore
  peer share one OWL ratio file computed here (lisa and peer_lisa sample uniformly, as run_lisa.sh).
- Per method, from its metrics.jsonl: peak memory (CPU: peak RSS during training above the RSS
  before the model was built; GPU: max allocated; largest over ranks), the largest optimizer_state_bytes
  of the run, and the median tokens/s and step time of the steps after the first
  --warmup_steps_excluded; each also as a ratio to the peer's. Beside them, the memory
  model's prediction (owlore_ds.memory_model.estimate) where it is available.
- Per method and step: peak memory, optimizer bytes, layers visited so far, tokens/s.
- A run that runs out of memory, is killed (on CPU the OOM killer's SIGKILL) or times out is
  a result: its row has the step it reached and the layers it had visited, from its
  metrics.jsonl so far. --predict_only M: M is not run, its row is the memory model's.
- Writes OUT/results.json and OUT/results.md (device, date, package versions, command).
  A method that fails is recorded with its error and the others go on. Runs' logs are in
  OUT/logs/, their metrics in OUT/runs/METHOD/ (checkpoints and final/ are deleted after each
  run unless --keep_checkpoints, since at 7B shapes they are gigabytes per method).

Runs unchanged on a GPU machine: the device comes from DeepSpeed's accelerator.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owlore_ds import ds_config  # noqa: E402
from owlore_ds.architectures import load_config  # noqa: E402
from owlore_ds.config import MASTER_POLICIES, TrainConfig  # noqa: E402
from owlore_ds.cli import run_main  # noqa: E402
from owlore_ds.distributed import free_port  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402
from owlore_ds.metrics import device_description, package_versions, read_metrics  # noqa: E402

PEER_RUN = "peer_run.json"  # tools/peer_owlore.py's PEER_RUN: what a peer ran, beside its metrics.jsonl

METHODS = ("full", "lora", "lisa", "galore", "owlore", "lomo", "adalomo", "peer", "peer_lisa")
# The reference pipeline's two paths (tools/peer_owlore.py --peer_optimizer): the GaLore peer
# (run_owlore_low_rank.sh) and LMFlow's LISA (run_lisa.sh: plain AdamW, state of visited layers kept).
PEERS = {"peer": "galore", "peer_lisa": "adamw"}
LAYER_SAMPLED = ("lisa", "owlore", "peer", "peer_lisa")
LOW_RANK = ("galore", "owlore", "peer")
# The peer each method's "vs peer" ratios divide by: lisa's own reference is LMFlow's LISA,
# every other method is held against the GaLore peer (the OwLore reference).
COMPARED_TO = {"lisa": "peer_lisa", "peer_lisa": "peer_lisa"}
TOKENIZER = ROOT / "models" / "shakespeare-llama"  # its 4096 ids fit every bundled vocabulary
DEFAULT_DATA = ROOT / "data" / "pretrain" / "train.txt"  # the Shakespeare pre-training split
VERSIONED_PACKAGES = ("torch", "deepspeed", "transformers", "galore-torch", "peft")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other entry point
        raise UserInputError(f"command line: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default="llama2-7b",
                   help="a bundled architecture (llama2-7b, llama2-13b, llama2-70b, llama3-8b, mistral-7b, qwen2-7b), "
                        "or a config.json / model folder (its weights are not used)")
    p.add_argument("--num_layers", type=int, help="decoder layers to keep (default: all)")
    p.add_argument("--methods", default="full,lisa,galore,owlore,peer", help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup_steps_excluded", type=int, default=2, help="first steps left out of the speed figures")
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--fp32", action="store_true", help="fp32 weights and compute (default bf16)")
    p.add_argument("--world_size", type=int, default=1, help="ranks per trainer run (the peer is always one process)")
    p.add_argument("--zero_stage", type=int, default=2, choices=(1, 2, 3), help="ds_configs/zeroN.json")
    p.add_argument("--deepspeed", help="a DeepSpeed config instead of ds_configs/zeroN.json (its stage must be "
                                       "--zero_stage; its stage3_max_live_parameters goes to the memory model)")
    p.add_argument("--master_weights", default="fp32", choices=MASTER_POLICIES,
                   help="lisa, galore, owlore in bf16: the trainer's --master_weights (the peer has none)")
    p.add_argument("--update_in_backward", action="store_true",
                   help="lisa, galore, owlore: the trainer's --update_in_backward, with --max_grad_norm 0 (which "
                        "it needs); the other methods and the peers still clip at 1.0")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lisa_activated_layers", type=int,
                   help="gamma for lisa, owlore and the peer (default: half the layers, at least 1, at most 5)")
    p.add_argument("--lisa_interval_steps", type=int, help="K for lisa, owlore and the peer (default: steps // 2)")
    p.add_argument("--galore_rank", type=int, default=256)
    p.add_argument("--galore_update_proj_gap", type=int, default=100)
    p.add_argument("--galore_scale", type=float, default=1.0)
    p.add_argument("--galore_svd", default=TrainConfig.galore_svd, choices=("exact", "randomized"),
                   help="galore, owlore: the trainer's projector refresh (the peer: always exact, as galore-torch)")
    p.add_argument("--inactive_state", default=TrainConfig.inactive_state, choices=("free", "offload", "projectors"),
                   help="lisa, galore, owlore: what the trainer keeps of a layer that leaves the active set (the "
                        "peers keep everything)")
    p.add_argument("--owl_nsamples", type=int, default=16, help="calibration windows for the shared OWL ratios")
    p.add_argument("--owl_threshold_m", type=float, default=5.0)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_target_modules", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--dataset_path", default=str(DEFAULT_DATA.relative_to(ROOT)))
    p.add_argument("--cache_dir", default="~/.cache/owlore_ds", help="tokenized-data cache")
    p.add_argument("--output_dir", default="bench_out")
    p.add_argument("--predict_only", default="",
                   help="comma-separated methods of --methods that are not run: their row is the memory model's "
                        "prediction (e.g. full, which cannot fit at full depth)")
    p.add_argument("--timeout_s", type=float, help="give up on a method after this many seconds (a result: the "
                                                   "steps it reached are recorded)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's checkpoint and final/ folders")
    return p


@dataclass
class Settings:
    """The resolved options every run of one invocation shares."""

    args: argparse.Namespace
    methods: list[str]
    predict_only: list[str]
    config: Any  # the Hugging Face config of the benchmarked model
    gamma: int
    interval: int
    interval_source: str  # where K comes from, for the report
    precision: str
    lora_target_modules: tuple[str, ...]
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.args.output_dir).resolve()


# ---------------------------------------------------------------- input


def _at_least(args: argparse.Namespace, name: str, low: float) -> None:
    value = getattr(args, name)
    if value is not None and value < low:
        raise UserInputError(f"--{name} must be at least {low}, got {value}")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UserInputError("--methods: give at least one method")
    for method in methods:
        if method not in METHODS:
            raise UserInputError(f"--methods: unknown method {method!r}; expected some of {','.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UserInputError(f"--methods: {text!r} names a method twice")
    return methods


def resolve(args: argparse.Namespace) -> Settings:
    """Checks every flag before anything is written; raises UserInputError naming the flag."""
    methods = parse_methods(args.methods)
    predict_only = [m.strip() for m in args.predict_only.split(",") if m.strip()]
    for method in predict_only:
        if method not in methods:
            raise UserInputError(f"--predict_only: {method!r} is not one of --methods {args.methods}")
        if method in PEERS:
            raise UserInputError(f"--predict_only: {method} cannot be predicted (the memory model does not cover "
                                 "the peers)")
    if args.fp32 and any(m in PEERS for m in methods):
        raise UserInputError("--fp32: the peers (peer, peer_lisa) train pure bf16 as the reference does; "
                             "drop --fp32 or the peer methods")
    for name, low in (("num_layers", 1), ("steps", 1), ("warmup_steps_excluded", 0), ("micro_batch_size", 1),
                      ("block_size", 2), ("world_size", 1), ("lisa_activated_layers", 1), ("lisa_interval_steps", 1),
                      ("galore_rank", 1), ("galore_update_proj_gap", 1), ("owl_nsamples", 1), ("lora_r", 1),
                      ("learning_rate", 0), ("galore_scale", 0), ("lora_dropout", 0), ("timeout_s", 1)):
        _at_least(args, name, low)
    if args.warmup_steps_excluded >= args.steps:
        raise UserInputError(f"--warmup_steps_excluded {args.warmup_steps_excluded} leaves no step of --steps "
                             f"{args.steps} to measure")
    if args.lora_dropout >= 1:
        raise UserInputError(f"--lora_dropout must be below 1, got {args.lora_dropout}")
    if not args.owl_threshold_m > 0:
        raise UserInputError(f"--owl_threshold_m must be > 0, got {args.owl_threshold_m}")
    if not os.path.exists(args.dataset_path):
        raise UserInputError(f"--dataset_path {args.dataset_path}: no such file or folder")
    if args.deepspeed:
        from owlore_ds.ds_config import read, zero_stage

        if zero_stage(read(args.deepspeed)) != args.zero_stage:
            raise UserInputError(f"--deepspeed {args.deepspeed}: its ZeRO stage is not --zero_stage {args.zero_stage}")
    targets = tuple(m.strip() for m in args.lora_target_modules.split(",") if m.strip())
    if not targets:
        raise UserInputError("--lora_target_modules: give at least one module name")
    config = load_config(args.model_config, args.num_layers)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and args.block_size > limit:
        raise UserInputError(f"--block_size {args.block_size} exceeds the max_position_embeddings {limit} "
                             f"of --model_config {args.model_config}")
    layers = config.num_hidden_layers
    gamma = args.lisa_activated_layers or min(5, max(1, layers // 2))  # the reference trains 5 of 32
    if gamma > layers:
        raise UserInputError(f"--lisa_activated_layers {gamma}: the model has only {layers} layers")
    # K: the reference's 50 would never resample in a short run; half the steps gives a second
    # interval (so the peer visits more layers) and at most one resampling among the measured steps.
    interval = args.lisa_interval_steps or max(1, args.steps // 2)
    source = "--lisa_interval_steps" if args.lisa_interval_steps else "the default, --steps // 2"
    return Settings(args, methods, predict_only, config, gamma, interval, source, "fp32" if args.fp32 else "bf16",
                    targets)


# ---------------------------------------------------------------- the model, its data and OWL ratios


def build_model(settings: Settings) -> tuple[Path, int, Optional[Path]]:
    """Saves the random-initialized model with the embedded tokenizer; returns (folder, parameters, ratio file).

    The OWL ratios (for owlore and the peer) are computed here once, on the same model and
    data, so that both sample layers with the same probabilities and neither run's peak
    memory includes the calibration pass. Loading the data here also fills the tokenized-data
    cache, so no measured run tokenizes.
    """
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    from owlore_ds.data import calibration_windows, load_training_data
    from owlore_ds.modeling import DTYPES, load_tokenizer
    from owlore_ds.outliers import compute_layer_outlier_ratios, model_fingerprint, save_ratios

    args, config = settings.args, settings.config
    tokenizer = load_tokenizer(str(TOKENIZER))
    if len(tokenizer) > config.vocab_size:
        raise UserInputError(f"--model_config {args.model_config}: vocabulary of {config.vocab_size} is smaller than "
                             f"the embedded tokenizer's {len(tokenizer)} ids")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    folder = settings.out / "model"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[settings.precision])
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"model: {parameters / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, saved to {folder}", flush=True)

    data = load_training_data(args.dataset_path, tokenizer, str(folder), args.block_size, args.cache_dir,
                              config.vocab_size)
    ratio_file = None
    if any(m in ("owlore", "peer") for m in settings.methods):
        windows = calibration_windows(data, args.owl_nsamples, args.block_size, args.seed, sequential=False)
        ratios = compute_layer_outlier_ratios(model, windows, args.owl_threshold_m,
                                              device=get_accelerator().current_device_name())
        ratio_file = settings.out / "outlier_ratios.json"
        save_ratios(ratio_file, ratios, model_fingerprint(model), args.owl_threshold_m, windows.shape[0],
                    args.block_size)
        print("OWL ratios (owlore and peer): " + " ".join(f"{r:.3f}" for r in ratios), flush=True)
    del model, data
    gc.collect()
    return folder, parameters, ratio_file


# ---------------------------------------------------------------- one run per method


def _flags(values: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return args


def method_flags(method: str, settings: Settings, model: Path, ratio_file: Optional[Path]) -> list[str]:
    """The command-line flags of one run: what every run shares, then what this method uses."""
    args = settings.args
    flags: dict[str, Any] = {
        "model_name_or_path": model, "dataset_path": os.path.abspath(args.dataset_path),
        "output_dir": settings.out / "runs" / method, "block_size": args.block_size,
        "per_device_train_batch_size": args.micro_batch_size, "max_steps": args.steps,
        "learning_rate": args.learning_rate, "lr_scheduler_type": "constant", "seed": args.seed,
        "logging_steps": 1, "save_steps": 0, "cache_dir": args.cache_dir, settings.precision: True,
    }
    if args.gradient_checkpointing or method in PEERS:  # the peers always checkpoint, as the reference
        flags["gradient_checkpointing"] = True
    if method not in PEERS:
        flags.update(method=method, overwrite_output_dir=True,
                     deepspeed=deepspeed_config(args))
    if method in ("lisa", "galore", "owlore") and settings.precision == "bf16":
        flags["master_weights"] = args.master_weights
    if method in ("lisa", "galore", "owlore") and args.update_in_backward:
        flags.update(update_in_backward=True, max_grad_norm=0)
    if method in ("lisa", "galore", "owlore"):
        flags["inactive_state"] = args.inactive_state
    if method in LAYER_SAMPLED:
        flags.update(lisa_activated_layers=settings.gamma, lisa_interval_steps=settings.interval)
    if method in LOW_RANK:
        flags.update(galore_rank=args.galore_rank, galore_update_proj_gap=args.galore_update_proj_gap,
                     galore_scale=args.galore_scale, galore_proj_type="std")
        if method not in PEERS:
            flags["galore_svd"] = args.galore_svd
    if method in ("owlore", "peer") and ratio_file is not None:
        flags["outlier_ratios"] = ratio_file
    if method == "lora":
        flags.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     lora_target_modules=",".join(settings.lora_target_modules))
    return _flags(flags)


def method_command(method: str, settings: Settings, flags: list[str]) -> list[str]:
    python = sys.executable
    if method in PEERS:
        return [python, str(ROOT / "tools" / "peer_owlore.py"), *flags, "--peer_optimizer", PEERS[method]]
    train = str(ROOT / "launch" / "train.py")
    if settings.args.world_size == 1:
        return [python, train, *flags]
    launcher = shutil.which("deepspeed", path=os.path.dirname(python)) or "deepspeed"
    return [launcher, "--num_gpus", str(settings.args.world_size), "--master_port", str(free_port()), train, *flags]


def child_env(world_size: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each run starts its own process group
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if env.get("DS_ACCELERATOR") == "cpu":
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores
        # glibc keeps freed blocks of a few MB resident (its mmap threshold grows with each
        # large free), so peak RSS would exceed the live tensors a GPU's max-allocated counts;
        # a pinned threshold returns them (see tests/test_memory_model.py).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


def _error_line(log_path: Path) -> str:
    """The one-line error of a failed run: its `error: ...` line, else the last line of its log."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return lines[-1] if lines else "no output"


def _advance(bar, records: list[dict[str, Any]]) -> None:
    if len(records) > bar.n:  # redraw only on a new step: a log file gets one line per step, not per poll
        bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", step_s=f"{records[-1]['step_time_s']:.2f}", refresh=False)
        bar.update(len(records) - bar.n)


def run_method(method: str, command: list[str], env: dict[str, str], run_dir: Path, log_path: Path,
               steps: int, timeout_s: Optional[float]) -> tuple[list[dict[str, Any]], Optional[str]]:
    """Runs one method to the end with a progress bar fed by its metrics.jsonl; returns (records, error)."""
    from tqdm import tqdm

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh folder: no old metrics.jsonl to mistake for progress
    started = time.monotonic()
    error = None
    with open(log_path, "w") as log, tqdm(total=steps, desc=f"{method:>8}", unit="step", dynamic_ncols=True) as bar:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        # Its own session, so that a timeout ends the launcher and all its ranks together.
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                _advance(bar, read_metrics(run_dir))
                if timeout_s and time.monotonic() - started > timeout_s:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    error = f"timed out after {timeout_s:g} s"
        except BaseException:  # Ctrl-C: leave no orphaned training processes behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        records = read_metrics(run_dir)
        _advance(bar, records)
    if error is None and proc.returncode == -signal.SIGKILL:
        # Not sent by us: on CPU the kernel's OOM killer (or a memory limit) ends a run this way.
        error = "killed by SIGKILL (on CPU: the kernel's OOM killer)"
    elif error is None and proc.returncode != 0:
        error = f"exit {proc.returncode}: {_error_line(log_path)}"
    if error is None and len(records) < steps:
        error = f"only {len(records)} of {steps} steps recorded"
    return records, error


def outcome(error: Optional[str]) -> str:
    """A run's end in a word or two: completed, out of memory, killed, timed out, failed."""
    if error is None:
        return "completed"
    text = error.lower()
    if text.startswith("killed by sigkill"):
        return "killed (SIGKILL)"
    if "out of memory" in text or "outofmemoryerror" in text:  # torch's OutOfMemoryError, on any device
        return "out of memory"
    if text.startswith("timed out"):
        return "timed out"
    return "failed"


def per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step by step: peak memory, optimizer bytes, layers visited so far (None where the run
    trains every layer), tokens/s."""
    visited: set[int] = set()
    rows = []
    for record in records:
        sampled = "active_layers" in record
        visited |= set(record.get("active_layers", ()))
        rows.append({"step": record["step"], "peak_memory_bytes": record["peak_memory_bytes"],
                     "optimizer_state_bytes": record["optimizer_state_bytes"],
                     "layers_visited": len(visited) if sampled else None, "tokens_per_s": record["tokens_per_s"]})
    return rows


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """The figures of one run (records: at least one step): peak and optimizer state over every
    step, speed over the steps after the first `warmup` (None when the run stopped before any)."""
    measured = records[warmup:]
    visited = {layer for r in records for layer in r.get("active_layers", [])}
    return {
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records),
        "optimizer_state_bytes": max(r["optimizer_state_bytes"] for r in records),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured) if measured else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in measured) if measured else None,
        "mean_step_time_s": statistics.fmean(r["step_time_s"] for r in measured) if measured else None,
        "steps_measured": len(measured),
        "final_loss": records[-1]["loss"],
        "layers_visited": sorted(visited) if any("active_layers" in r for r in records) else None,
    }


def deepspeed_config(args: argparse.Namespace) -> Path:
    return Path(args.deepspeed).resolve() if args.deepspeed else ROOT / "ds_configs" / f"zero{args.zero_stage}.json"


def predict(method: str, settings: Settings) -> tuple[Optional[dict[str, int]], str]:
    """The memory model's figures for a run, or (None, why not)."""
    if method in PEERS:
        return None, "the peers are not modeled"
    try:  # another module, possibly absent: the benchmark works without it
        from owlore_ds.memory_model import estimate
    except ImportError as exc:
        return None, f"owlore_ds.memory_model unavailable ({exc})"
    import inspect

    from deepspeed.accelerator import get_accelerator

    args = settings.args
    kwargs: dict[str, Any] = dict(
        world_size=args.world_size, zero_stage=args.zero_stage, precision=settings.precision,
        micro_batch_size=args.micro_batch_size, block_size=args.block_size,
        gradient_checkpointing=args.gradient_checkpointing, lisa_activated_layers=settings.gamma,
        galore_rank=args.galore_rank, freeze_embeddings=False, lora_r=args.lora_r,
        master_weights=args.master_weights if method in ("lisa", "galore", "owlore") else "fp32",
        lora_target_modules=settings.lora_target_modules, offload=False)
    if args.update_in_backward and method in ("lisa", "galore", "owlore"):
        kwargs["update_in_backward"] = True
    if method in ("galore", "owlore"):
        kwargs["galore_svd"] = args.galore_svd
    if "device" in inspect.signature(estimate).parameters:  # CPU and GPU differ in temporaries and overhead
        kwargs["device"] = "cpu" if get_accelerator().device_name() == "cpu" else "cuda"
    live = ds_config.max_live_parameters(ds_config.read(str(deepspeed_config(args))))
    if live is not None:
        kwargs["zero3_max_live_parameters"] = live
    try:
        result = estimate(settings.config, method, **kwargs)
        return {"peak_memory_bytes": int(result.peak), "optimizer_state_bytes": int(result.optimizer_state_bytes)}, ""
    except Exception as exc:  # a method the model does not cover must not stop the benchmark
        return None, f"estimate failed: {type(exc).__name__}: {exc}"


RATIO_KEYS = ("peak_memory_bytes", "optimizer_state_bytes", "tokens_per_s", "step_time_s")


def compared_to(method: str) -> str:
    return COMPARED_TO.get(method, "peer")


def add_peer_ratios(rows: list[dict[str, Any]]) -> None:
    """Each figure divided by that of the row's peer (compared_to), None where either is missing.
    A run that stopped early (out of memory, killed) is compared on what it reached; a
    predicted row (--predict_only) on its predicted memory."""
    by_method = {r["method"]: r for r in rows}
    for row in rows:
        row["compared_to"] = compared_to(row["method"])
        peer = by_method.get(row["compared_to"])
        row["vs_peer"] = {key: (_figure(row, key) / peer[key] if peer is not None and _figure(row, key) is not None
                                and peer.get(key) else None) for key in RATIO_KEYS}


def _figure(row: dict[str, Any], key: str) -> Optional[float]:
    """A row's measured figure, or for a --predict_only row the memory model's."""
    if row.get("predicted_only"):
        return (row["predicted"] or {}).get(key)
    return row.get(key)


# ---------------------------------------------------------------- the report


def _mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def _ratio(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"  # LOMO's state is 1000x below the peer's


def _cell(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    layers = s["gamma"], s["num_layers"], s["interval"], s["interval_source"]
    lines = [
        f"# Benchmark: {s['model_config']}, {s['num_layers']} of {s['full_depth']} layers "
        f"({s['parameters'] / 1e6:,.1f}M parameters)",
        "",
        f"- date: {results['date']}",
        f"- device: {results['device']['name']}; OMP_NUM_THREADS={results['device']['omp_num_threads'] or 'unset'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- setup: {s['precision']}, {s['world_size']} rank(s) per trainer run (the peers: 1 process), "
        f"ZeRO-{s['zero_stage']}, master weights {s['master_weights']} (lisa, galore, owlore), "
        + ("update in backward without clipping (lisa, galore, owlore; the rest clip at 1.0), "
           if s.get("update_in_backward") else "clipping 1.0, ") +
        f"micro-batch {s['micro_batch_size']}, block {s['block_size']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'} (the peers: always on), {s['steps']} steps, "
        f"lr {s['learning_rate']:g} constant",
        "- lisa, owlore, peer, peer_lisa: %d of %d layers, resampled every K = %d steps (K from %s)" % layers
        + f"; galore, owlore, peer: GaLore rank {s['galore_rank']}, gap {s['galore_update_proj_gap']}, "
        f"scale {s['galore_scale']:g}, std, SVD {s.get('galore_svd', 'exact')} (the peer: exact); lisa, galore, "
        f"owlore keep {s.get('inactive_state', 'free')} of a layer that leaves; lora: r {s['lora_r']}, alpha {s['lora_alpha']:g}, "
        f"{','.join(s['lora_target_modules'])}",
        "- peers (tools/peer_owlore.py, the reference as it runs: pure bf16, HF's loss over the full logits, "
        "clipping 1.0, the state of every visited layer kept): peer = GaLoreAdamW(lr only: eps 1e-6, no weight "
        "decay), the peer of every method but lisa; peer_lisa = LMFlow's LISA (torch AdamW, HF defaults), "
        "the peer of lisa",
        f"- data: `{s['dataset_path']}`, tokenizer of `models/shakespeare-llama`",
        f"- command: `{results['command']}`",
        "",
        "| method | run | vs | peak MiB | vs peer | predicted peak MiB | optimizer state MiB | vs peer "
        "| predicted optimizer MiB | tokens/s | vs peer | step s | vs peer | layers visited |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failed = []
    for row in results["rows"]:
        predicted = row["predicted"] or {}
        if row["error"] is not None:
            failed.append(row)
        ratio = row["vs_peer"]
        visited = row.get("layers_visited")
        if row.get("predicted_only"):
            run = "predicted, not run"
        elif row["outcome"] == "completed":
            run = f"{row['steps_completed']} steps"
        else:
            run = f"{row['outcome']} after step {row['steps_completed']}"
        lines.append(
            f"| {row['method']} | {run} | {row['compared_to']} | {_mib(row.get('peak_memory_bytes'))} "
            f"| {_ratio(ratio['peak_memory_bytes'])} | {_mib(predicted.get('peak_memory_bytes'))} "
            f"| {_mib(row.get('optimizer_state_bytes'))} | {_ratio(ratio['optimizer_state_bytes'])} "
            f"| {_mib(predicted.get('optimizer_state_bytes'))} | {_cell(row.get('tokens_per_s'), ',.1f')} "
            f"| {_ratio(ratio['tokens_per_s'])} | {_cell(row.get('step_time_s'), '.3f')} "
            f"| {_ratio(ratio['step_time_s'])} | {'all' if visited is None else len(visited)} |")
    lines += [
        "",
        "Peak: on CPU the process's peak resident set during training (from the end of setup, every weight "
        "page read) above its resident set before the model was built (on a GPU, max allocated), largest over "
        "ranks. Optimizer state: the largest `optimizer_state_bytes` of the run (moments, master weights, "
        "projectors). tokens/s and step time: median over the steps after the first "
        f"{s['warmup_steps_excluded']}, at K = {s['interval']}. \"vs\": the peer each row is divided by; "
        "\"vs peer\": the figure divided by that peer's (a run that stopped early: by what it reached; a "
        "predicted row: its prediction). Predicted: `owlore_ds.memory_model.estimate` (n/a where it is "
        "unavailable or does not cover the method).",
    ]
    if failed:
        lines += ["", "Runs that stopped early or failed (a result: the steps and layers they reached are above "
                  "and below):", ""]
        lines += [f"- {row['method']}: {row['error']}" for row in failed]
    lines += ["", "## Per step", "",
              "Peak and optimizer state at each step, the layers visited so far (\"all\": every layer trains), "
              "tokens/s of the step."]
    for row in results["rows"]:
        if not row.get("per_step"):
            continue
        lines += ["", f"### {row['method']}", "",
                  "| step | peak MiB | optimizer state MiB | layers visited | tokens/s |", "|---|---|---|---|---|"]
        for step in row["per_step"]:
            visited = step["layers_visited"]
            lines.append(f"| {step['step']} | {_mib(step['peak_memory_bytes'])} "
                         f"| {_mib(step['optimizer_state_bytes'])} | {'all' if visited is None else visited} "
                         f"| {step['tokens_per_s']:,.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point


def main() -> None:
    from owlore_ds.distributed import select_accelerator

    select_accelerator()  # before deepspeed is imported; the runs inherit DS_ACCELERATOR
    args = build_parser().parse_args()
    settings = resolve(args)
    command = shlex.join(["python", "tools/benchmark.py", *sys.argv[1:]])
    out = settings.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"methods {','.join(settings.methods)}; lisa/owlore/peers: gamma {settings.gamma} of "
          f"{settings.config.num_hidden_layers} layers, K {settings.interval} steps ({settings.interval_source}); "
          f"GaLore rank {args.galore_rank}, gap {args.galore_update_proj_gap}, scale {args.galore_scale:g}", flush=True)
    model, parameters, ratio_file = build_model(settings)

    env = child_env(args.world_size)
    rows = []
    for method in settings.methods:
        row: dict[str, Any] = {"method": method}
        row["predicted"], row["prediction_note"] = predict(method, settings)
        if method in settings.predict_only:
            row.update(predicted_only=True, error=None, outcome="predicted", steps_completed=0, per_step=[])
            print(f"{method}: not run; predicted peak {_mib((row['predicted'] or {}).get('peak_memory_bytes'))} MiB "
                  f"({row['prediction_note'] or 'memory model'})", flush=True)
            rows.append(row)
            continue
        cmd = method_command(method, settings, method_flags(method, settings, model, ratio_file))
        run_dir = out / "runs" / method
        records, error = run_method(method, cmd, env, run_dir, out / "logs" / f"{method}.log", args.steps,
                                    args.timeout_s)
        row.update(error=error, outcome=outcome(error), steps_completed=len(records), command=shlex.join(cmd),
                   log=str(out / "logs" / f"{method}.log"), per_step=per_step(records))
        if method in PEERS and (run_dir / PEER_RUN).exists():
            row["ran"] = json.loads((run_dir / PEER_RUN).read_text())
        if records:  # a run that stopped early (out of memory, killed) is a result: what it reached
            row.update(summarize(records, args.warmup_steps_excluded))
        if error is None:
            print(f"{method}: peak {_mib(row['peak_memory_bytes'])} MiB, optimizer state "
                  f"{_mib(row['optimizer_state_bytes'])} MiB, {row['tokens_per_s']:,.1f} tokens/s, "
                  f"step {row['step_time_s']:.3f} s", flush=True)
        else:
            print(f"{method}: {row['outcome'].upper()} after step {len(records)}: {error} (log: {row['log']})",
                  flush=True)
        rows.append(row)
        if not args.keep_checkpoints:
            for path in list(run_dir.glob("checkpoint-*")) + [run_dir / "final"]:
                shutil.rmtree(path, ignore_errors=True)
    add_peer_ratios(rows)

    full_depth = getattr(load_config(args.model_config, None), "num_hidden_layers")
    results = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_description(),
        "versions": package_versions(VERSIONED_PACKAGES),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("methods", "lora_target_modules", "predict_only")},
            "methods": settings.methods, "lora_target_modules": list(settings.lora_target_modules),
            "num_layers": settings.config.num_hidden_layers, "full_depth": full_depth, "parameters": parameters,
            "precision": settings.precision, "gamma": settings.gamma, "interval": settings.interval,
            "interval_source": settings.interval_source, "predict_only": settings.predict_only,
            "outlier_ratios": str(ratio_file) if ratio_file else None,
        },
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = render_markdown(results)
    (out / "results.md").write_text(text)
    print("\n" + text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    run_main(main)
