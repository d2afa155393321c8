#!/usr/bin/env python
"""Compare optimizer-state policies of the layer-sampled methods on a short fine-tune.

    python tools/compare_policies.py [--seeds 1 2] [--max_steps 100] [--variants NAME ...]
        [--output docs/policies.md] [--runs_dir runs/policies] [--launcher deepspeed|python]

Questions measured (every run identical except the policy flags):

  (A) --inactive_state free vs offload vs projectors  (fp32, --method owlore; lisa variants available)
  (B) --master_weights fp32 vs none      (--bf16 --method owlore)

Each variant x seed is trained with launch/train.py on the embedded model
models/shakespeare-llama and the task data/tasks/shakespeare_speaker, its OUT/final
is scored with tools/score_task.py, and a markdown table (mean +- half range over
seeds) is written to --output together with device, date and the exact commands.
Results are re-written after every run, so an interrupted sweep keeps what it has;
per-run results are also kept in RUNS_DIR/results.json and a finished run
(final/ and score.json present) is not trained again unless --force is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"

# name -> (question, extra trainer flags)
VARIANTS = {
    "owlore-fp32-free": ("A", ["--method", "owlore", "--inactive_state", "free"]),
    "owlore-fp32-offload": ("A", ["--method", "owlore", "--inactive_state", "offload"]),
    "owlore-fp32-projectors": ("A", ["--method", "owlore", "--inactive_state", "projectors"]),
    "lisa-fp32-free": ("A", ["--method", "lisa", "--inactive_state", "free"]),
    "lisa-fp32-offload": ("A", ["--method", "lisa", "--inactive_state", "offload"]),
    "owlore-bf16-master-fp32": ("B", ["--method", "owlore", "--bf16", "--master_weights", "fp32"]),
    "owlore-bf16-master-none": ("B", ["--method", "owlore", "--bf16", "--master_weights", "none"]),
}
DEFAULT_VARIANTS = ["owlore-fp32-free", "owlore-fp32-offload",
                    "owlore-bf16-master-fp32", "owlore-bf16-master-none"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--model", default="models/shakespeare-llama")
    p.add_argument("--task", default="data/tasks/shakespeare_speaker")
    p.add_argument("--runs_dir", default="runs/policies")
    p.add_argument("--output", default="docs/policies.md")
    p.add_argument("--launcher", choices=("deepspeed", "python"), default="deepspeed",
                   help="deepspeed: 2 CPU ranks (DS_ACCELERATOR=cpu); python: one process")
    p.add_argument("--procs", type=int, default=2, help="ranks with --launcher deepspeed")
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--block_size", type=int, default=96, help="the longest task example is 89 tokens")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lisa_activated_layers", type=int, default=2)
    p.add_argument("--lisa_interval_steps", type=int, default=10)
    p.add_argument("--galore_rank", type=int, default=64)
    p.add_argument("--galore_update_proj_gap", type=int, default=50)
    p.add_argument("--owl_nsamples", type=int, default=32)
    p.add_argument("--last_k", type=int, default=20, help="mean training loss over the last K steps")
    p.add_argument("--force", action="store_true", help="re-train runs that already have results")
    return p.parse_args()


def train_command(args: argparse.Namespace, variant: str, seed: int, out: Path) -> tuple[list[str], dict]:
    procs = args.procs if args.launcher == "deepspeed" else 1
    per_device = args.global_batch // procs
    if per_device * procs != args.global_batch:
        raise SystemExit(f"--global_batch {args.global_batch} is not divisible by {procs} ranks")
    if args.launcher == "deepspeed":
        port = 29600 + (zlib.crc32(f"{variant}/{seed}".encode()) % 300)
        launch = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(port),
                  "launch/train.py", "--deepspeed", "ds_configs/zero2.json"]
    else:
        launch = [str(VENV_BIN / "python"), "launch/train.py", "--deepspeed", "ds_configs/zero2.json"]
    cmd = launch + [
        "--model_name_or_path", args.model,
        "--dataset_path", f"{args.task}/train.json",
        "--output_dir", str(out),
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(per_device),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
        "--max_steps", str(args.max_steps),
        "--lisa_activated_layers", str(args.lisa_activated_layers),
        "--lisa_interval_steps", str(args.lisa_interval_steps),
        "--owl_nsamples", str(args.owl_nsamples),
        "--galore_rank", str(args.galore_rank),
        "--galore_update_proj_gap", str(args.galore_update_proj_gap),
        "--save_steps", "0", "--overwrite_output_dir",
        "--seed", str(seed),
    ] + VARIANTS[variant][1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    return cmd, env


def score_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [str(VENV_BIN / "python"), "tools/score_task.py", str(out / "final"),
            "--data", f"{args.task}/test.json", "--output", str(out / "score.json")]


def rel(cmd: list[str]) -> str:
    return shlex.join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd)


def summarize_run(out: Path, last_k: int) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    score = json.loads((out / "score.json").read_text())
    tail = rows[-last_k:]
    return {
        "steps": len(rows),
        "loss_last": statistics.fmean(r["loss"] for r in tail),
        "accuracy": score["accuracy"],
        "choice_accuracy": score["choice_accuracy"],
        "optimizer_state_bytes": max(r.get("optimizer_state_bytes", 0) or 0 for r in rows),
        "offloaded_state_bytes": max(r.get("offloaded_state_bytes", 0) or 0 for r in rows),
        "peak_memory_bytes": max(r.get("peak_memory_bytes", 0) or 0 for r in rows),
        "step_time_s": statistics.median(r["step_time_s"] for r in rows),
        "svds": sum(r.get("projector_refreshes", 0) or 0 for r in rows),  # largest rank's, per step
    }


def mean_spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) == 1:
        return format(m, fmt)
    return f"{format(m, fmt)} ± {format((max(values) - min(values)) / 2, fmt)}"


def mib(values: list[float]) -> str:
    return mean_spread([v / 2**20 for v in values], ".2f")


def device_line() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"
    except Exception:  # pragma: no cover - torch missing
        return f"CPU ({platform.machine()})"


def render(args, results: dict, commands: dict, device: str, started: str, argv: str) -> str:
    lines = [
        "# Policy comparison: inactive-layer optimizer state and bf16 master weights",
        "",
        f"- date: {started} (UTC)",
        f"- device: {device}; launcher: {args.launcher}"
        + (f" ({args.procs} ranks, DS_ACCELERATOR=cpu)" if args.launcher == "deepspeed" else "")
        + f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
        f"- model: `{args.model}`; task: `{args.task}` (train 2039 / test 240 examples, 12 classes, chance 0.083)",
        f"- setup: {args.max_steps} steps x global batch {args.global_batch}, block {args.block_size}, "
        f"lr {args.learning_rate:g} cosine (5% warmup), {args.lisa_activated_layers} active layers "
        f"resampled every {args.lisa_interval_steps} steps, GaLore rank {args.galore_rank} / gap "
        f"{args.galore_update_proj_gap}, seeds {' '.join(map(str, args.seeds))}",
        f"- driver: `{argv}`",
        "",
        "Values are mean ± half the range over seeds. `loss` is the mean training loss over the last "
        f"{args.last_k} steps; `acc` is greedy exact match, `choice acc` ranked-choice accuracy "
        "(tools/score_task.py). Memory figures are the largest per-step values in metrics.jsonl "
        "(optimizer state on the training device, state parked on CPU, peak RSS of the largest rank).",
        "",
        "| question | variant | runs | loss (last steps) | acc | choice acc | opt. state MiB | offloaded MiB | peak mem MiB | step s | SVDs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in args.variants:
        runs = [results[f"{variant}/seed{s}"] for s in args.seeds if f"{variant}/seed{s}" in results]
        col = lambda k: [r[k] for r in runs]  # noqa: E731
        lines.append(
            f"| {VARIANTS[variant][0]} | {variant} | {len(runs)} | {mean_spread(col('loss_last'), '.3f')} | "
            f"{mean_spread(col('accuracy'), '.3f')} | {mean_spread(col('choice_accuracy'), '.3f')} | "
            f"{mib(col('optimizer_state_bytes'))} | {mib(col('offloaded_state_bytes'))} | "
            f"{mib(col('peak_memory_bytes'))} | {mean_spread(col('step_time_s'), '.2f')} | "
            f"{mean_spread([r.get('svds', 0) for r in runs], '.0f')} |")
    lines += ["", "## Per run", "",
              "| run | loss (last steps) | acc | choice acc |", "|---|---|---|---|"]
    for key in sorted(results):
        r = results[key]
        lines.append(f"| {key} | {r['loss_last']:.3f} | {r['accuracy']:.3f} | {r['choice_accuracy']:.3f} |")
    lines += ["", "## Commands", "", "Run from the repository root with the environment shown.", "", "```bash"]
    for key in sorted(commands):
        lines.append(f"# {key}")
        lines += commands[key]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    os.chdir(ROOT)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results_path = runs_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    device = device_line()
    argv = shlex.join(["python", "tools/compare_policies.py"] + sys.argv[1:])
    commands: dict[str, list[str]] = {}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    for seed in args.seeds:  # seed-major: a cut-short sweep still covers every variant
        for variant in args.variants:
            key = f"{variant}/seed{seed}"
            out = runs_dir / variant / f"seed{seed}"
            cmd, env = train_command(args, variant, seed, out)
            scmd = score_command(args, out)
            prefix = f"DS_ACCELERATOR={env['DS_ACCELERATOR']} OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
            commands[key] = [prefix + rel(cmd), f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + rel(scmd)]
            if not args.force and key in results and (out / "score.json").exists():
                print(f"[skip] {key}: have results", flush=True)
                continue
            t0 = time.time()
            out.mkdir(parents=True, exist_ok=True)
            with open(out.parent / f"seed{seed}.train.log", "w") as log:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"[fail] {key}: training exited {rc}; see {out.parent}/seed{seed}.train.log", flush=True)
                continue
            with open(out.parent / f"seed{seed}.score.log", "w") as log:
                rc = subprocess.run(scmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"[fail] {key}: scoring exited {rc}", flush=True)
                continue
            results[key] = summarize_run(out, args.last_k)
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
            r = results[key]
            print(f"[done] {key} in {time.time() - t0:.0f}s: loss {r['loss_last']:.3f} acc {r['accuracy']:.3f} "
                  f"choice {r['choice_accuracy']:.3f}", flush=True)
            output.write_text(render(args, results, commands, device, started, argv))

    wanted = {f"{v}/seed{s}" for v in args.variants for s in args.seeds}
    text = render(args, {k: v for k, v in results.items() if k in wanted}, commands, device, started, argv)
    output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
