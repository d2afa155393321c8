#!/usr/bin/env python
"""Peak memory, optimizer state and speed of every method at real layer shapes, beside the OwLore peer.

    python tools/benchmark.py --model_config llama2-7b --num_layers 2 \
        --methods full,lora,lisa,galore,owlore,lomo,adalomo,peer --steps 6 --micro_batch_size 1 \
        --block_size 256 --gradient_checkpointing --output_dir bench_out

- The model is random-initialized once from a bundled architecture (owlore_ds/architectures.py)
  or a config.json / model folder, cut to --num_layers decoder layers (every layer keeps its
  real shape), and saved with the embedded tokenizer (models/shakespeare-llama) to OUT/model.
- Every method runs in its own process, so each peak is its own: the trainer
  (`launch/train.py --method M`, one process, or the deepspeed launcher for --world_size N)
  and the peer (tools/peer_owlore.py, the reference pipeline, always one process). All see
  the same data, batches, steps, precision, layer-sampling and GaLore settings; owlore and
  the peer share one OWL ratio file computed here.
- Per method, from its metrics.jsonl: peak memory (CPU: peak RSS during training above the RSS
  before the model was built; GPU: max allocated; largest over ranks), the largest optimizer_state_bytes
  of the run, and the median tokens/s and step time of the steps after the first
  --warmup_steps_excluded; each also as a ratio to the peer's. Beside them, the memory
  model's prediction (owlore_ds.memory_model.estimate) where it is available.
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
from owlore_ds.config import MASTER_POLICIES  # noqa: E402
from owlore_ds.cli import run_main  # noqa: E402
from owlore_ds.distributed import free_port  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402
from owlore_ds.metrics import device_description, package_versions, read_metrics  # noqa: E402

METHODS = ("full", "lora", "lisa", "galore", "owlore", "lomo", "adalomo", "peer")
LAYER_SAMPLED = ("lisa", "owlore", "peer")
LOW_RANK = ("galore", "owlore", "peer")
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
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lisa_activated_layers", type=int,
                   help="gamma for lisa, owlore and the peer (default: half the layers, at least 1, at most 5)")
    p.add_argument("--lisa_interval_steps", type=int, help="K for lisa, owlore and the peer (default: steps // 2)")
    p.add_argument("--galore_rank", type=int, default=256)
    p.add_argument("--galore_update_proj_gap", type=int, default=100)
    p.add_argument("--galore_scale", type=float, default=1.0)
    p.add_argument("--owl_nsamples", type=int, default=16, help="calibration windows for the shared OWL ratios")
    p.add_argument("--owl_threshold_m", type=float, default=5.0)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_target_modules", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--dataset_path", default=str(DEFAULT_DATA.relative_to(ROOT)))
    p.add_argument("--cache_dir", default="~/.cache/owlore_ds", help="tokenized-data cache")
    p.add_argument("--output_dir", default="bench_out")
    p.add_argument("--timeout_s", type=float, help="give up on a method after this many seconds")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's checkpoint and final/ folders")
    return p


@dataclass
class Settings:
    """The resolved options every run of one invocation shares."""

    args: argparse.Namespace
    methods: list[str]
    config: Any  # the Hugging Face config of the benchmarked model
    gamma: int
    interval: int
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
    return Settings(args, methods, config, gamma, interval, "fp32" if args.fp32 else "bf16", targets)


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
    if args.gradient_checkpointing:
        flags["gradient_checkpointing"] = True
    if method != "peer":
        flags.update(method=method, overwrite_output_dir=True,
                     deepspeed=deepspeed_config(args))
    if method in ("lisa", "galore", "owlore") and settings.precision == "bf16":
        flags["master_weights"] = args.master_weights
    if method in LAYER_SAMPLED:
        flags.update(lisa_activated_layers=settings.gamma, lisa_interval_steps=settings.interval)
    if method in LOW_RANK:
        flags.update(galore_rank=args.galore_rank, galore_update_proj_gap=args.galore_update_proj_gap,
                     galore_scale=args.galore_scale, galore_proj_type="std")
    if method in ("owlore", "peer") and ratio_file is not None:
        flags["outlier_ratios"] = ratio_file
    if method == "lora":
        flags.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     lora_target_modules=",".join(settings.lora_target_modules))
    return _flags(flags)


def method_command(method: str, settings: Settings, flags: list[str]) -> list[str]:
    python = sys.executable
    if method == "peer":
        return [python, str(ROOT / "tools" / "peer_owlore.py"), *flags]
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
    if error is None and proc.returncode != 0:
        error = f"exit {proc.returncode}: {_error_line(log_path)}"
    if error is None and len(records) < steps:
        error = f"only {len(records)} of {steps} steps recorded"
    return records, error


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """The figures of one run: peak and optimizer state over every step, speed over the measured steps."""
    measured = records[warmup:]
    visited = {layer for r in records for layer in r.get("active_layers", [])}
    return {
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records),
        "optimizer_state_bytes": max(r["optimizer_state_bytes"] for r in records),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
        "step_time_s": statistics.median(r["step_time_s"] for r in measured),
        "mean_step_time_s": statistics.fmean(r["step_time_s"] for r in measured),
        "steps_measured": len(measured),
        "final_loss": records[-1]["loss"],
        "layers_visited": sorted(visited) if any("active_layers" in r for r in records) else None,
    }


def deepspeed_config(args: argparse.Namespace) -> Path:
    return Path(args.deepspeed).resolve() if args.deepspeed else ROOT / "ds_configs" / f"zero{args.zero_stage}.json"


def predict(method: str, settings: Settings) -> tuple[Optional[dict[str, int]], str]:
    """The memory model's figures for a run, or (None, why not)."""
    if method == "peer":
        return None, "the peer is not modeled"
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


def _measured(row: dict[str, Any]) -> bool:
    return "peak_memory_bytes" in row


RATIO_KEYS = ("peak_memory_bytes", "optimizer_state_bytes", "tokens_per_s", "step_time_s")


def add_peer_ratios(rows: list[dict[str, Any]]) -> None:
    """Each figure divided by the peer's (None without a successful peer run)."""
    peer = next((r for r in rows if r["method"] == "peer" and _measured(r)), None)
    for row in rows:
        row["vs_peer"] = {key: (row[key] / peer[key] if peer and _measured(row) and peer[key] else None)
                          for key in RATIO_KEYS}


# ---------------------------------------------------------------- the report


def _mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def _ratio(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"  # LOMO's state is 1000x below the peer's


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    layers = s["gamma"], s["num_layers"], s["interval"]
    lines = [
        f"# Benchmark: {s['model_config']}, {s['num_layers']} of {s['full_depth']} layers "
        f"({s['parameters'] / 1e6:,.1f}M parameters)",
        "",
        f"- date: {results['date']}",
        f"- device: {results['device']['name']}; OMP_NUM_THREADS={results['device']['omp_num_threads'] or 'unset'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- setup: {s['precision']}, {s['world_size']} rank(s) per trainer run (the peer: 1 process), "
        f"ZeRO-{s['zero_stage']}, master weights {s['master_weights']} (lisa, galore, owlore), "
        f"micro-batch {s['micro_batch_size']}, block {s['block_size']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['steps']} steps, lr {s['learning_rate']:g} constant",
        "- lisa, owlore, peer: %d of %d layers, resampled every %d steps" % layers
        + f"; galore, owlore, peer: GaLore rank {s['galore_rank']}, gap {s['galore_update_proj_gap']}, "
        f"scale {s['galore_scale']:g}, std; lora: r {s['lora_r']}, alpha {s['lora_alpha']:g}, "
        f"{','.join(s['lora_target_modules'])}",
        f"- data: `{s['dataset_path']}`, tokenizer of `models/shakespeare-llama`",
        f"- command: `{results['command']}`",
        "",
        "| method | peak MiB | vs peer | predicted peak MiB | optimizer state MiB | vs peer | predicted optimizer MiB "
        "| tokens/s | vs peer | step s | vs peer | layers visited |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failed = []
    for row in results["rows"]:
        predicted = row["predicted"] or {}
        name = row["method"]
        if row["error"] is not None:
            failed.append(row)
            if not _measured(row):
                lines.append(f"| {name} | failed (below) |" + " |" * 11)
                continue
            name += " (failed after its last step, below)"
        ratio = row["vs_peer"]
        visited = row["layers_visited"]
        lines.append(
            f"| {name} | {_mib(row['peak_memory_bytes'])} | {_ratio(ratio['peak_memory_bytes'])} "
            f"| {_mib(predicted.get('peak_memory_bytes'))} | {_mib(row['optimizer_state_bytes'])} "
            f"| {_ratio(ratio['optimizer_state_bytes'])} | {_mib(predicted.get('optimizer_state_bytes'))} "
            f"| {row['tokens_per_s']:,.1f} | {_ratio(ratio['tokens_per_s'])} | {row['step_time_s']:.3f} "
            f"| {_ratio(ratio['step_time_s'])} | {'all' if visited is None else len(visited)} |")
    lines += [
        "",
        "Peak: on CPU the process's peak resident set during training (from the end of setup, every weight "
        "page read) above its resident set before the model was built (on a GPU, max allocated), largest over ranks. Optimizer state: the largest `optimizer_state_bytes` "
        "of the run (moments, master weights, projectors). tokens/s and step time: median over the steps after "
        f"the first {s['warmup_steps_excluded']}. \"vs peer\": the figure divided by the peer's. Predicted: "
        "`owlore_ds.memory_model.estimate` (n/a where it is unavailable or does not cover the method).",
    ]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {row['method']}: {row['error']}" for row in failed]
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
    print(f"methods {','.join(settings.methods)}; lisa/owlore/peer: gamma {settings.gamma} of "
          f"{settings.config.num_hidden_layers} layers, K {settings.interval} steps; GaLore rank {args.galore_rank}, "
          f"gap {args.galore_update_proj_gap}, scale {args.galore_scale:g}", flush=True)
    model, parameters, ratio_file = build_model(settings)

    env = child_env(args.world_size)
    rows = []
    for method in settings.methods:
        cmd = method_command(method, settings, method_flags(method, settings, model, ratio_file))
        run_dir = out / "runs" / method
        records, error = run_method(method, cmd, env, run_dir, out / "logs" / f"{method}.log", args.steps,
                                    args.timeout_s)
        row: dict[str, Any] = {"method": method, "error": error, "command": shlex.join(cmd),
                               "log": str(out / "logs" / f"{method}.log")}
        if len(records) >= args.steps:  # figures of a run that failed after its last step still hold
            row.update(summarize(records, args.warmup_steps_excluded))
        if error is None:
            print(f"{method}: peak {_mib(row['peak_memory_bytes'])} MiB, optimizer state "
                  f"{_mib(row['optimizer_state_bytes'])} MiB, {row['tokens_per_s']:,.1f} tokens/s, "
                  f"step {row['step_time_s']:.3f} s", flush=True)
        else:
            print(f"{method}: FAILED: {error} (log: {row['log']})", flush=True)
        row["predicted"], row["prediction_note"] = predict(method, settings)
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
            **{k: v for k, v in vars(args).items() if k not in ("methods", "lora_target_modules")},
            "methods": settings.methods, "lora_target_modules": list(settings.lora_target_modules),
            "num_layers": settings.config.num_hidden_layers, "full_depth": full_depth, "parameters": parameters,
            "precision": settings.precision, "gamma": settings.gamma, "interval": settings.interval,
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
