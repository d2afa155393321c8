#!/usr/bin/env python
"""A billion-token corpus, preprocessed and trained from, beside one a hundredth its size.

    python tools/benchmark_data.py --tokens 1000000000 --fraction 100 --workers 2 --world_size 2 \
        --output_dir bench_data

1. Writes two corpora of .jsonl shards, documents cut from the shipped Shakespeare text
   (random runs of its paragraphs, seeded): the small one of about --tokens / --fraction
   tokens first, then, sized by the small one's measured bytes per token, the large one of
   at least --tokens.
2. Preprocesses each with `tools/preprocess_data.py --workers N` (the command a user runs)
   and records its documents, tokens and tokens/s.
3. Trains the shipped model (models/shakespeare-llama) from each prefix for --steps steps on
   --world_size ranks (torchrun, shuffled windows), every rank under `/usr/bin/time`, whose
   "maximum resident set size" is the rank's whole-life peak: loading the data, its sample
   order and the model included (the trainer's own peak_memory_bytes starts after the data).
   Twice: run 1 builds the prefix's sample order (one rank per node), run 2 reads it.
4. Writes OUT/results.json and OUT/results.md: per corpus the figures above and the largest
   rank's peak RSS of each run, and the large corpus's largest peak as a ratio to the small one's. The dense
   in-memory path (int64 input_ids, labels and attention_mask) would need 24 bytes a token.

Corpora and prefixes already in OUT are reused (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owlore_ds.cli import run_main  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402
from owlore_ds.metrics import device_description  # noqa: E402
from tools.benchmark import child_env  # noqa: E402

MODEL = ROOT / "models" / "shakespeare-llama"
SOURCE = ROOT / "data" / "pretrain" / "train.txt"
SHARD_BYTES = 256 * 2**20


def write_corpus(folder: Path, target_bytes: int, seed: int) -> dict[str, int]:
    """Shards of .jsonl documents, each 5-60 consecutive paragraphs of the source from a seeded start,
    until target_bytes of text are written; returns documents and bytes (kept in folder/done.json)."""
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for p in SOURCE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    documents = written = shard_written = shard = 0
    out = open(folder / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
    while written < target_bytes:
        start = rng.randrange(len(paragraphs))
        text = "\n\n".join(paragraphs[start : start + rng.randint(5, 60)])
        line = json.dumps({"text": text}) + "\n"
        out.write(line)
        documents += 1
        written += len(text)
        shard_written += len(line)
        if shard_written >= SHARD_BYTES:
            out.close()
            shard, shard_written = shard + 1, 0
            out = open(folder / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
    out.close()
    summary = {"documents": documents, "text_bytes": written}
    done.write_text(json.dumps(summary))
    return summary


def preprocess(corpus: Path, prefix: Path, workers: int, log: Path) -> dict[str, Any]:
    """Runs tools/preprocess_data.py; returns its documents, tokens, seconds and tokens/s."""
    result = prefix.with_suffix(".preprocess.json")
    if result.is_file() and Path(f"{prefix}.idx").is_file():
        return json.loads(result.read_text())
    command = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus), "--tokenizer",
               str(MODEL), "--output_prefix", str(prefix), "--workers", str(workers)]
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"preprocess_data.py failed ({code}); see {log}")
    found = re.search(r"(\d+) documents, (\d+) tokens \((\w+)\) in ([\d.]+) s, ([\d,]+) tokens/s", text)
    if not found:
        raise RuntimeError(f"no summary line in {log}")
    summary = {"documents": int(found[1]), "tokens": int(found[2]), "dtype": found[3], "seconds": float(found[4]),
               "tokens_per_s": float(found[5].replace(",", "")), "wall_s": wall, "workers": workers,
               "bin_bytes": os.path.getsize(f"{prefix}.bin"), "command": command}
    result.write_text(json.dumps(summary, indent=1))
    print(f"  {summary['tokens']:,} tokens in {summary['seconds']:.0f} s: {summary['tokens_per_s']:,.0f} tokens/s",
          flush=True)
    return summary


def train(prefix: Path, out: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Trains from the prefix on --world_size ranks, each under /usr/bin/time; returns every rank's peak RSS."""
    from owlore_ds.distributed import free_port

    env = child_env(args.world_size)  # glibc's mmap threshold pinned, so that freed blocks do not stay resident
    # Each rank's GNU time writes its own file: on the shared log, ranks finishing together
    # interleaved their reports mid-line (GNU time writes a report in pieces).
    peak_files = log.with_suffix(".peak_rss_kb")
    for stale in log.parent.glob(f"{peak_files.name}.rank*"):
        stale.unlink()
    command = ["torchrun", "--nproc_per_node", str(args.world_size), "--master_port", str(free_port()), "--no-python",
               "sh", "-c", 'exec /usr/bin/time -o "$0.rank$RANK" -f %M "$@"', str(peak_files),
               sys.executable, str(ROOT / "launch" / "train.py"),
               "--model_name_or_path", str(MODEL), "--dataset_path", str(prefix), "--output_dir", str(out),
               "--overwrite_output_dir", "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
               "--max_steps", str(args.steps), "--block_size", str(args.block_size),
               "--per_device_train_batch_size", str(args.micro_batch_size), "--learning_rate", "1e-4",
               "--warmup_steps", "0", "--logging_steps", "5", "--seed", str(args.seed),
               "--cache_dir", str(out / "cache")]
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call([sys.executable, "-m", "torch.distributed.run"] + command[1:], stdout=fh,
                               stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"training from {prefix} failed ({code}); see {log}")
    peaks = []
    for rank in range(args.world_size):
        report = Path(f"{peak_files}.rank{rank}")
        if not report.is_file() or not report.read_text().strip().isdigit():
            raise RuntimeError(f"rank {rank}'s peak RSS is missing from {report}; see {log}")
        peaks.append(int(report.read_text()) * 1024)
    from owlore_ds.metrics import read_metrics

    records = read_metrics(out)
    return {"rank_peak_rss_bytes": peaks, "wall_s": wall, "steps": len(records),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "windows_per_step": args.micro_batch_size * args.world_size, "command": command}


def render(results: dict[str, Any]) -> str:
    gib, mib = 2**30, 2**20
    lines = [f"- date: {results['date']}", f"- device: {results['device']}",
             f"- command: `{results['command']}`", "",
             "| corpus | documents | tokens | .bin | preprocess tokens/s (workers) | dense in-memory path would need "
             "| run 1 (builds the order): peak RSS per rank | run 2: peak RSS per rank | largest vs small |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def peaks(row: dict[str, Any], run: int) -> list[int]:
        return row[f"train_{run}"]["rank_peak_rss_bytes"]

    small = results["corpora"]["small"]
    for name, row in results["corpora"].items():
        pre = row["preprocess"]
        ratios = " / ".join(f"{max(peaks(row, run)) / max(peaks(small, run)):.3f}x" for run in (1, 2))
        lines.append(f"| {name} | {pre['documents']:,} | {pre['tokens']:,} | {pre['bin_bytes'] / gib:.2f} GiB | "
                     f"{pre['tokens_per_s']:,.0f} ({pre['workers']}) | {24 * pre['tokens'] / gib:.1f} GiB | "
                     + " | ".join(", ".join(f"{p / mib:,.1f}" for p in peaks(row, run)) + " MiB" for run in (1, 2))
                     + f" | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000_000, help="at least this many tokens in the large corpus")
    p.add_argument("--fraction", type=int, default=100, help="the small corpus is --tokens / FRACTION")
    p.add_argument("--workers", type=int, default=2, help="preprocess_data.py --workers")
    p.add_argument("--world_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default="bench_data")
    args = p.parse_args(argv)
    for name in ("tokens", "fraction", "workers", "world_size", "steps", "block_size", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not os.access("/usr/bin/time", os.X_OK):
        raise UserInputError("/usr/bin/time (GNU time) is needed to read each rank's peak RSS; install it")
    out = Path(args.output_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_description()["name"], "command": "python tools/benchmark_data.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "corpora": {}}
    # The small corpus first: its measured bytes per token size the large one.
    small_bytes = 3 * args.tokens // args.fraction  # about 3 bytes a token with the embedded tokenizer
    sizes = {"small": small_bytes}
    for name in ("small", "large"):
        corpus = write_corpus(out / f"corpus_{name}", sizes[name], args.seed)
        print(f"{name} corpus: {corpus['documents']:,} documents, {corpus['text_bytes'] / 2**30:.2f} GiB of text",
              flush=True)
        pre = preprocess(out / f"corpus_{name}", out / name, args.workers, out / "logs" / f"preprocess_{name}.log")
        if name == "small":
            sizes["large"] = int(1.02 * args.tokens * corpus["text_bytes"] / pre["tokens"])
        results["corpora"][name] = {"corpus": corpus, "preprocess": pre}
    if results["corpora"]["large"]["preprocess"]["tokens"] < args.tokens:
        raise RuntimeError(f"the large corpus has {results['corpora']['large']['preprocess']['tokens']:,} tokens, "
                           f"fewer than --tokens {args.tokens:,}; delete {out} and run again")
    # Run 1 on a prefix builds its sample order (one rank per node, beside the data); run 2 reads it.
    for run in (1, 2):
        for name in ("small", "large"):
            trained = train(out / name, out / f"run_{name}_{run}", args, out / "logs" / f"train_{name}_{run}.log")
            results["corpora"][name][f"train_{run}"] = trained
            print(f"{name}, run {run}: peak RSS per rank " + ", ".join(
                f"{b / 2**20:,.1f} MiB" for b in trained["rank_peak_rss_bytes"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results)
    (out / "results.md").write_text(table)
    print(table)

if __name__ == "__main__":
    run_main(main)
