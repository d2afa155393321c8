#!/usr/bin/env python
"""Fine-tune the embedded model with every method and several seeds; write docs/results.md.

    python tools/quality_table.py [--methods full,lora,lisa,galore,owlore,lomo,adalomo] [--seeds 0,1]
        [--max_steps 50] [--test_limit N] [--runs_dir runs/quality] [--output docs/results.md] [--force]

Every run is our real trainer (``launch/train.py`` under the deepspeed launcher: 2 CPU
processes without a GPU, one per GPU with) fine-tuning ``models/shakespeare-llama`` on
``data/tasks/shakespeare_speaker/train.json``; its ``final/`` folder is then scored on the
held-out ``test.json`` with tools/score_task.py (ranked-choice accuracy among the 12
speakers, and exact match of greedy generation). The table gives, per method, mean, standard
deviation and range over seeds of both metrics, peak memory, optimizer state and tokens/s
from the run's ``metrics.jsonl``, the settings, device, date, package versions and command.

A run that fails is recorded with its error and the sweep goes on. The markdown is
rewritten after every run, and a run whose command and results are already in
``RUNS_DIR/results.json`` is not trained again (``--force`` retrains), so an interrupted
sweep resumes where it stopped. Checkpoints are deleted after scoring (``final/`` stays)
unless ``--keep_checkpoints``.

Default budget: 7 methods x 2 seeds in about 25 minutes on a 2-core CPU, hence 50 steps of
16 examples (0.4 epoch of the 2039 training passages) per run. Measured on the 2-core
machine while others shared it: 2 to 2.5 minutes a run (about 30 s of it launching, 30 s
scoring 240 passages in fp32, the rest 1 to 2.2 s a step), about 20 minutes idle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from owlore_ds.distributed import free_port, remove_shm_buffers  # noqa: E402
from owlore_ds.metrics import package_versions, read_metrics  # noqa: E402
from compare_policies import device_line  # noqa: E402
from demo import bf16_supported  # noqa: E402
from score_task import load_instances, load_model, score  # noqa: E402


@dataclass(frozen=True)
class MethodSettings:
    learning_rate: float
    flags: tuple[str, ...] = ()


# One learning rate for the AdamW-based methods (the embedded model was pre-trained at 2e-3),
# none tuned per method. LOMO is plain SGD fused into backward, its step clipped to norm 1:
# at 3e-2 its loss was still 4.6 after 60 steps (AdamW: 1.0), at 1e-1 it reached 1.3.
# AdaLomo's step is lr x RMS(weight) (a few 1e-2 here): at 1e-3 its loss was 6.7 after 50
# steps, so it gets 2e-2.
LAYERS = ("--lisa_activated_layers", "2", "--lisa_interval_steps", "10", "--owl_nsamples", "32")  # 2 of 6 layers
GALORE = ("--galore_rank", "64", "--galore_update_proj_gap", "50")  # hidden size is 256
METHODS: dict[str, MethodSettings] = {
    "full": MethodSettings(1e-3),
    "lora": MethodSettings(1e-3, ("--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
                                  "--lora_target_modules", "all-linear")),
    "lisa": MethodSettings(1e-3, LAYERS),
    "galore": MethodSettings(1e-3, GALORE),
    "owlore": MethodSettings(1e-3, LAYERS + GALORE),
    "lomo": MethodSettings(1e-1),
    "adalomo": MethodSettings(2e-2),
}
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "galore-torch", "lomo-optim", "datasets")
WARMUP_STEPS = 2  # excluded from tokens/s: the first steps carry one-off setup costs
LOSS_TAIL = 10  # final training loss = mean over the last steps


def _csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=_csv(str), default=list(METHODS), help="comma-separated, of: " + ",".join(METHODS))
    p.add_argument("--seeds", type=_csv(int), default=[0, 1], help="comma-separated")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare-llama")
    p.add_argument("--task_dir", type=Path, default=ROOT / "data" / "tasks" / "shakespeare_speaker")
    p.add_argument("--runs_dir", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--max_steps", type=int, default=50)
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--block_size", type=int, default=96, help="the longest task example is 89 tokens")
    p.add_argument("--warmup_ratio", type=float, default=0.05)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32",
                   help="auto: bf16 where the hardware runs it natively")
    p.add_argument("--cpu_procs", type=int, default=2, help="trainer processes when there is no GPU")
    p.add_argument("--test_limit", type=int, default=None,
                   help="score only the first N held-out passages (quick checks; default all)")
    p.add_argument("--extra_flags", default="", help="trainer flags added to every method's (a later flag wins), "
                   "e.g. \"--galore_svd randomized --lisa_interval_steps 1\" to compare a choice; give each "
                   "comparison its own --runs_dir and --output")
    p.add_argument("--force", action="store_true", help="retrain runs that already have results")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep OUT/checkpoint-* after scoring")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {','.join(unknown) or '(none given)'}; choose from {','.join(METHODS)}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    return args


def launcher(procs: int) -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    runner = [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return runner + ["--num_gpus", str(procs), "--master_port", str(free_port())]


def train_command(args: argparse.Namespace, method: str, seed: int, out: Path, procs: int, precision: str) -> list[str]:
    settings = METHODS[method]
    return [
        "launch/train.py", "--deepspeed", "ds_configs/zero2.json", "--method", method,
        "--model_name_or_path", rel(args.model), "--dataset_path", rel(args.task_dir / "train.json"),
        "--output_dir", rel(out), "--overwrite_output_dir",
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.global_batch // procs),
        "--max_steps", str(args.max_steps), "--learning_rate", f"{settings.learning_rate:g}",
        "--lr_scheduler_type", "cosine", "--warmup_ratio", str(args.warmup_ratio), "--weight_decay", "0",
        "--seed", str(seed), "--save_steps", "0", "--logging_steps", "10",
        "--bf16" if precision == "bf16" else "--fp32", *settings.flags, *shlex.split(args.extra_flags),
    ]


def rel(path: Path) -> str:
    path = Path(path).resolve()
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def summarize_run(rows: list[dict], score: dict) -> dict:
    """One run's figures: held-out metrics from score_task, the rest from metrics.jsonl."""
    timed = rows[WARMUP_STEPS:] or rows
    return {
        "choice_accuracy": score["choice_accuracy"],
        "accuracy": score["accuracy"],
        "steps": len(rows),
        "final_loss": statistics.fmean(r["loss"] for r in rows[-LOSS_TAIL:]),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rows),
        "optimizer_state_bytes": max(r["optimizer_state_bytes"] for r in rows),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
    }


def error_line(log_file: Path) -> str:
    """The trainer's one-line error if it printed one, else the last line (a traceback's exception)."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower() and not line.startswith("[")]
    text = (errors or lines or ["no output"])[-1]
    return text[:300]


def score_folder(model_dir: Path, test_file: Path, limit: int | None = None) -> dict:
    """score_task's metrics on the held-out file (its first `limit` passages if given), in fp32.

    fp32 whatever the folder stores, so that the embedded model (saved in bf16) and the
    fine-tunes (exported in fp32) are scored alike. Torch's thread count is left to
    OMP_NUM_THREADS: forcing every core onto a busy machine made scoring 10x slower.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(model_dir, device)
    instances = load_instances(test_file)
    # Classes from the whole file, so that a limit does not shrink the choice set.
    classes = sorted({inst["output"] for inst in instances})
    return score(model.float(), tokenizer, instances[:limit], classes)


def train_and_score(cmd: list[str], env: dict[str, str], out: Path, args: argparse.Namespace) -> dict:
    """Runs one fine-tune and scores its final/; returns its summary, or {"error": ...}."""
    log_file = out.parent / f"{out.name}.train.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    remove_shm_buffers(cmd[cmd.index("--master_port") + 1])  # left behind by ranks that died
    train_s = time.perf_counter() - start
    if code != 0 or not (out / "final" / "config.json").is_file():
        return {"error": f"training exit {code}: {error_line(log_file)}", "log": rel(log_file)}
    score = score_folder(out / "final", args.task_dir / "test.json", args.test_limit)
    (out / "score.json").write_text(json.dumps(score) + "\n")
    if not args.keep_checkpoints:
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return {**summarize_run(read_metrics(out), score), "train_s": train_s,
            "score_s": time.perf_counter() - start - train_s, "log": rel(log_file)}


def stats(values: list[float], fmt: str) -> tuple[str, str]:
    """('mean ± std', 'min–max') over seeds; std is the sample standard deviation."""
    if not values:
        return "-", "-"
    mean = format(statistics.fmean(values), fmt)
    if len(values) == 1:
        return mean, "-"
    return (f"{mean} ± {format(statistics.stdev(values), fmt)}",
            f"{format(min(values), fmt)}–{format(max(values), fmt)}")


def mib(value: float) -> float:
    return value / 2**20


def versions() -> str:
    found = [f"{name} {version}" for name, version in package_versions(PACKAGES).items()]
    return ", ".join(found) + f", Python {sys.version.split()[0]}"


def render(args: argparse.Namespace, results: dict, baseline: dict, header: dict) -> str:
    lines = [
        "# Fine-tuning quality per method",
        "",
        "Produced by `tools/quality_table.py`: each method fine-tunes the embedded model on the embedded "
        "\"who speaks these lines?\" task through the real trainer, and the result is scored on the "
        "held-out split with tools/score_task.py (in fp32). A small model on a small task on CPU: these figures "
        "compare the methods' wiring and memory behaviour at equal budget, not their quality at 7B scale.",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}",
        f"- device: {header['device']}; trainer: {header['launch']}",
        f"- packages: {header['versions']}",
        f"- model: `{rel(args.model)}`; task: `{rel(args.task_dir)}` (train {header['train_size']} / test {baseline['n']} "
        f"passages, {baseline['num_classes']} speakers, chance {baseline['chance']:.3f})",
        f"- every run: {args.max_steps} steps x global batch {args.global_batch} (block {args.block_size}), "
        f"cosine schedule with {args.warmup_ratio:g} warm-up, weight decay 0, {header['precision']}, "
        f"ZeRO-2 config, seeds {','.join(map(str, args.seeds))}; learning rates and method flags below "
        "(one rate for the AdamW-based methods, not tuned per method)",
        f"- before fine-tuning: choice accuracy {baseline['choice_accuracy']:.3f}, "
        f"exact match {baseline['accuracy']:.3f}",
        "",
        "`choice acc`: the true speaker has the highest summed log-likelihood among the 12 names; "
        f"`exact match`: greedy generation's first line is the name. Both on {baseline['n']} held-out passages; "
        "mean ± sample standard deviation over seeds, then the range. `loss`: mean training loss over the "
        f"last {LOSS_TAIL} steps. `peak MiB`: largest `peak_memory_bytes` in metrics.jsonl (on CPU the peak "
        "resident set during training above the process's pre-model baseline, largest rank; at this "
        "model's size, 22 MiB of fp32 weights, it is mostly the process's own runtime: library pages first "
        "touched by training, allocator arenas, gloo buffers); `opt. MiB`: largest "
        "`optimizer_state_bytes`; `tokens/s`: median over steps after the first "
        f"{WARMUP_STEPS} (whole global batch, all ranks).",
        "",
        "| method | runs ok | choice acc | choice acc range | exact match | exact match range | loss | peak MiB "
        "| opt. MiB | tokens/s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        runs = [results.get(f"{method}/seed{seed}", {}) for seed in args.seeds]
        done = [r for r in runs if "error" not in r and r]
        column = lambda key: [r[key] for r in done]  # noqa: E731
        choice, choice_range = stats(column("choice_accuracy"), ".3f")
        exact, exact_range = stats(column("accuracy"), ".3f")
        cells = [method, f"{len(done)}/{len(args.seeds)}", choice, choice_range, exact, exact_range,
                 stats(column("final_loss"), ".3f")[0],
                 stats([mib(v) for v in column("peak_memory_bytes")], ".1f")[0],
                 stats([mib(v) for v in column("optimizer_state_bytes")], ".2f")[0],
                 stats(column("tokens_per_s"), ".0f")[0],
                 "; ".join(sorted({"failed: " + r["error"].replace("|", "/") for r in runs if "error" in r}))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Settings per method", "", "| method | learning rate | method flags |", "|---|---|---|"]
    for method in args.methods:
        settings = METHODS[method]
        flags = " ".join([*settings.flags, *shlex.split(args.extra_flags)])
        lines.append(f"| {method} | {settings.learning_rate:g} | `{flags or '(none)'}` |")
    lines += ["", "## Runs", "",
              "| method | seed | choice acc | exact match | loss | peak MiB | opt. MiB | tokens/s | steps "
              "| train s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        for seed in args.seeds:
            r = results.get(f"{method}/seed{seed}")
            if not r:
                lines.append(f"| {method} | {seed} | | | | | | | | | not run |")
            elif "error" in r:
                lines.append(f"| {method} | {seed} | | | | | | | | | failed: {r['error'].replace('|', '/')} |")
            else:
                lines.append(
                    f"| {method} | {seed} | {r['choice_accuracy']:.3f} | {r['accuracy']:.3f} | {r['final_loss']:.3f} | "
                    f"{mib(r['peak_memory_bytes']):.1f} | {mib(r['optimizer_state_bytes']):.2f} | "
                    f"{r['tokens_per_s']:.0f} | {r['steps']} | {r['train_s']:.0f} | ok |")
    lines += ["", "## Commands", "", "Run from the repository root; each run's log is "
              f"`{rel(args.runs_dir)}/METHOD/seedN.train.log`.", "", "```bash"]
    for method in args.methods:
        for seed in args.seeds:
            r = results.get(f"{method}/seed{seed}")
            if r:
                lines.append(r["command"])
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    test_file = args.task_dir / "test.json"
    for path in (args.task_dir / "train.json", test_file, args.model / "config.json"):
        if not path.is_file():
            raise SystemExit(f"error: file not found: {path}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = gpus or args.cpu_procs
    if args.global_batch % procs:
        raise SystemExit(f"error: --global_batch {args.global_batch} is not divisible by {procs} processes")
    precision = args.precision if args.precision != "auto" else ("bf16" if bf16_supported() else "fp32")
    env = dict(os.environ)
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    env_prefix = "" if gpus else f"DS_ACCELERATOR=cpu OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
    header = {
        "command": shlex.join(["python", "tools/quality_table.py"] + (sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_line(),
        "launch": f"deepspeed launcher, {procs} {'GPUs' if gpus else 'CPU processes'}",
        "versions": versions(),
        "precision": precision,
        "train_size": len(load_instances(args.task_dir / "train.json")),
    }

    args.runs_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.runs_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    baseline = results.get("baseline", {})
    wanted = {"model": rel(args.model), "test_limit": args.test_limit}
    if args.force or any(baseline.get(k) != v for k, v in wanted.items()):
        baseline = {**score_folder(args.model, test_file, args.test_limit), **wanted}
        results["baseline"] = baseline
    args.output.parent.mkdir(parents=True, exist_ok=True)

    for seed in args.seeds:  # seed-major: a sweep cut short still has every method once
        for method in args.methods:
            key = f"{method}/seed{seed}"
            out = args.runs_dir / method / f"seed{seed}"
            cmd = launcher(procs) + train_command(args, method, seed, out, procs, precision)
            # The port changes per run; compare commands without it to decide whether a run is done.
            shown = env_prefix + shlex.join([rel(Path(cmd[0])) if os.sep in cmd[0] else cmd[0]] + cmd[1:])
            identity = shlex.join(train_command(args, method, seed, out, procs, precision)) + f" # test_limit={args.test_limit}"
            previous = results.get(key, {})
            if not args.force and previous.get("identity") == identity and "error" not in previous:
                print(f"[skip] {key}: already done", flush=True)
                continue
            print(f"[run]  {key}: {shown}", flush=True)
            result = train_and_score(cmd, env, out, args)
            results[key] = {**result, "command": shown, "identity": identity}
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            args.output.write_text(render(args, results, baseline, header))
            if "error" in result:
                print(f"[fail] {key}: {result['error']}", flush=True)
            else:
                print(f"[done] {key}: choice acc {result['choice_accuracy']:.3f}, exact match {result['accuracy']:.3f}, "
                      f"train {result['train_s']:.0f}s + score {result['score_s']:.0f}s", flush=True)

    text = render(args, results, baseline, header)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
