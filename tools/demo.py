#!/usr/bin/env python
"""The main job end to end on embedded data: fine-tune the embedded model, see it improve.

    python tools/demo.py [--method owlore] [--output_dir runs/demo] [--max_steps N] ...

1. scores the embedded model (``models/shakespeare-llama``) on the held-out
   split of the "who speaks these lines?" task
   (``data/tasks/shakespeare_speaker/test.json``, 12 balanced classes);
2. fine-tunes it on ``train.json`` with our trainer under the deepspeed
   launcher: 2 CPU processes without a GPU, one process per GPU with;
3. converts the last checkpoint to a Hugging Face folder with
   ``tools/convert_to_hf.py``;
4. scores the converted model and prints a before/after table and one sample.

Metrics (see ``tools/score_task.py``): exact-match ``accuracy`` of greedy
generation, and ``choice_accuracy``, the share of passages whose true speaker
gets the highest likelihood among the 12 names (chance 1/12).  Exits non-zero
if a step fails or, unless ``--allow_no_gain``, if fine-tuning does not raise
the choice accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from owlore_ds.distributed import free_port  # noqa: E402


def say(message: str = "") -> None:
    print(message, flush=True)


def step(title: str) -> None:
    say(f"\n=== {title} ===")


def bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # oneDNN runs bf16 natively only with AVX512-BF16 or AMX; emulated it is slower than fp32
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def score_model(model_dir: Path, test_file: Path, sample_index: int) -> tuple[dict, dict]:
    """(score_task metrics, one sample) of the model in `model_dir` on `test_file`."""
    import torch
    from score_task import generate, load_instances, load_model, score

    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    instances = load_instances(test_file)
    model, tokenizer = load_model(model_dir, device)
    result = score(model, tokenizer, instances)
    inst = instances[sample_index % len(instances)]
    generated = generate(model, tokenizer, [inst["input"]], max_new_tokens=8)[0]
    sample = {"prompt": inst["input"], "expected": inst["output"], "generated": generated}
    del model
    return result, sample


def run(cmd: list[str], env: dict[str, str], log_file: Path, quiet_progress: bool = True) -> float:
    """Runs `cmd`, echoing its output (without progress-bar redraws); fails the demo if it fails."""
    say("$ " + " ".join(cmd))
    start = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            # Progress bars arrive as one line per redraw (universal newlines turn \r into \n).
            if quiet_progress and ("%|" in line or not line.strip()):
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"error: step failed with exit status {code}: {' '.join(cmd)} (log: {log_file})")
    return time.perf_counter() - start


def last_checkpoint(output_dir: Path) -> Path:
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    )
    if not found:
        raise SystemExit(f"error: the trainer left no checkpoint in {output_dir}")
    return found[-1][1]


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shakespeare-llama"), help="model to fine-tune")
    p.add_argument("--task_dir", type=Path, default=Path("data/tasks/shakespeare_speaker"),
                   help="folder with train.json and test.json (LMFlow text2text)")
    p.add_argument("--output_dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--method", default="owlore", help="trainer --method (launch/train.py checks the name)")
    p.add_argument("--active_layers", type=int, default=2, help="lisa/owlore: layers trained at a time (of 6)")
    p.add_argument("--interval_steps", type=int, default=20, help="lisa/owlore: steps between resamplings")
    p.add_argument("--galore_rank", type=int, default=64, help="owlore/galore: rank of the gradient subspace")
    p.add_argument("--deepspeed", type=Path, default=Path("ds_configs/zero2.json"))
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--block_size", type=int, default=96, help="the longest example is 89 tokens")
    p.add_argument("--global_batch", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--max_steps", type=int, default=500)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--warmup_ratio", type=float, default=0.05)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu_procs", type=int, default=2, help="trainer processes when there is no GPU")
    p.add_argument("--sample_index", type=int, default=0, help="which test example to show")
    p.add_argument("--allow_no_gain", action="store_true", help="exit 0 even if accuracy does not improve")
    args = p.parse_args(argv)
    for name in ("model", "task_dir", "output_dir", "deepspeed"):
        path = getattr(args, name)
        setattr(args, name, path if path.is_absolute() else (Path.cwd() / path).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    train_file, test_file = args.task_dir / "train.json", args.task_dir / "test.json"
    for path in (train_file, test_file, args.deepspeed):
        if not path.is_file():
            raise SystemExit(f"error: file not found: {path}")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no model in {args.model} (expected config.json); "
                         "run `python tools/pretrain_embedded.py` to build it")

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = gpus or args.cpu_procs
    precision = args.precision if args.precision != "auto" else ("bf16" if bf16_supported() else "fp32")
    per_device = args.global_batch // procs
    if per_device * procs != args.global_batch:
        raise SystemExit(f"error: --global_batch {args.global_batch} is not divisible by {procs} processes")
    device = f"{gpus} GPU(s)" if gpus else f"CPU, {procs} processes"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    step(f"1/4 score {os.path.relpath(args.model, ROOT)} before fine-tuning")
    start = time.perf_counter()
    before, sample_before = score_model(args.model, test_file, args.sample_index)
    timings["score_before_s"] = time.perf_counter() - start
    say(json.dumps(before))

    step(f"2/4 fine-tune (--method {args.method}, {precision}, {device}, {args.max_steps} steps "
         f"of {args.global_batch} examples)")
    env = dict(os.environ)
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    script = Path(sys.executable).parent / "deepspeed"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731  (shorter command lines)
    train_cmd = launcher + [
        "--num_gpus", str(procs), "--master_port", str(free_port()),
        "launch/train.py",
        "--deepspeed", rel(args.deepspeed),
        "--method", args.method,
        "--model_name_or_path", rel(args.model),
        "--dataset_path", rel(train_file),
        "--output_dir", rel(args.output_dir),
        "--overwrite_output_dir",
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(per_device),
        "--max_steps", str(args.max_steps),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "cosine",
        "--warmup_ratio", str(args.warmup_ratio),
        "--weight_decay", str(args.weight_decay),
        "--seed", str(args.seed),
        "--save_steps", "0",
        "--logging_steps", "50",
        "--bf16" if precision == "bf16" else "--fp32",
    ]
    if args.method in ("lisa", "owlore"):
        train_cmd += ["--lisa_activated_layers", str(args.active_layers), "--lisa_interval_steps",
                      str(args.interval_steps), "--owl_nsamples", "32"]
    if args.method in ("owlore", "galore"):
        train_cmd += ["--galore_rank", str(args.galore_rank), "--galore_update_proj_gap", "100"]
    timings["fine_tune_s"] = run(train_cmd, env, args.output_dir / "demo_train.log")
    records = [json.loads(line) for line in (args.output_dir / "metrics.jsonl").read_text().splitlines() if line]

    step("3/4 convert the last checkpoint to a Hugging Face folder")
    checkpoint = last_checkpoint(args.output_dir)
    hf_dir = args.output_dir / "hf"
    start = time.perf_counter()
    run([sys.executable, "tools/convert_to_hf.py", rel(checkpoint), rel(hf_dir), "--dtype", "fp32", "--overwrite"],
        env, args.output_dir / "demo_convert.log")
    timings["convert_s"] = time.perf_counter() - start

    step(f"4/4 score {rel(hf_dir)} after fine-tuning")
    start = time.perf_counter()
    after, sample_after = score_model(hf_dir, test_file, args.sample_index)
    timings["score_after_s"] = time.perf_counter() - start
    say(json.dumps(after))
    timings["total_s"] = time.perf_counter() - t0

    first = sum(r["loss"] for r in records[:10]) / max(1, len(records[:10]))
    final = sum(r["loss"] for r in records[-10:]) / max(1, len(records[-10:]))
    say("\n" + "=" * 64)
    say(f"Who speaks these lines? {after['n']} held-out passages, {after['num_classes']} speakers "
        f"(chance {pct(after['chance']).strip()})")
    say(f"fine-tuned {os.path.relpath(args.model, ROOT)} with --method {args.method}: "
        f"{len(records)} steps in {timings['fine_tune_s'] / 60:.1f} min on {device} ({precision}); "
        f"mean train loss, first 10 steps {first:.2f} -> last 10 steps {final:.2f}")
    say("")
    say(f"  {'metric':<34}{'before':>8}{'after':>8}")
    say(f"  {'exact-match accuracy (generation)':<34}{pct(before['accuracy']):>8}{pct(after['accuracy']):>8}")
    say(f"  {'choice accuracy (ranked names)':<34}{pct(before['choice_accuracy']):>8}"
        f"{pct(after['choice_accuracy']):>8}")
    say("")
    say(f"sample (test example {args.sample_index % after['n']}):")
    for line in sample_after["prompt"].split("\n"):
        say(f"  | {line}")
    mark = lambda s: "correct" if s["generated"].strip().split("\n")[0].strip() == s["expected"].strip() else "wrong"  # noqa: E731
    say(f"  expected:           {sample_after['expected'].strip()}")
    say(f"  generated, before:  {sample_before['generated'].strip()!r} ({mark(sample_before)})")
    say(f"  generated, after:   {sample_after['generated'].strip()!r} ({mark(sample_after)})")
    say(f"\ntotal {timings['total_s'] / 60:.1f} min; model in {rel(hf_dir)}")
    say("=" * 64)

    summary = {"before": before, "after": after, "sample": {**sample_after, "generated_before": sample_before["generated"]},
               "timings": timings, "method": args.method, "precision": precision, "device": device,
               "steps": len(records), "train_loss_first10": first, "train_loss_last10": final}
    (args.output_dir / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if after["choice_accuracy"] <= before["choice_accuracy"] and not args.allow_no_gain:
        raise SystemExit("error: fine-tuning did not raise the choice accuracy")


if __name__ == "__main__":
    main()
