#!/usr/bin/env python
"""Peak memory of tools/convert_to_hf.py on a real-shaped checkpoint (issue 14, must-show 4).

    python tools/benchmark_export.py --model_config llama2-7b --num_layers 2 --methods full,owlore \
        --output_dir bench_export [--previous_tree /path/to/an/older/checkout]

- Builds the model once (random init, fp32, the embedded tokenizer), then per method trains
  2 ranks under ds_configs/zero3.json for one step (micro-batch 1, --block_size 16) with
  --save_steps 1, so OUT/METHOD/checkpoint-1 (for `full` DeepSpeed's files: fp32 masters
  and both Adam moments; for `owlore` the weights' safetensors shards and the layerwise
  state) and OUT/METHOD/final (the trainer's own end-of-run export) exist.
- Converts checkpoint-1 under `/usr/bin/time -v` and records the converter's peak resident
  memory ("Maximum resident set size", file-backed pages included) and wall time, against
  half the fp32 size of the weights.
- Checks the conversion: every tensor equal to final/'s (read one tensor at a time with
  safetensors' reader), and the folder loads with from_pretrained (in a subprocess).
- --previous_tree runs that checkout's tools/convert_to_hf.py on the same checkpoint too,
  for the figure before.
Writes OUT/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "models" / "shakespeare-llama"
DATA = ROOT / "data" / "tasks" / "shakespeare_speaker" / "train.json"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return e


def build_model(args, folder: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from owlore_ds.architectures import load_config
    from owlore_ds.modeling import load_tokenizer

    config = load_config(args.model_config, args.num_layers)
    tokenizer = load_tokenizer(str(TOKENIZER))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return parameters


def train(args, model: Path, out: Path, method: str, log: Path) -> float:
    from owlore_ds.distributed import free_port

    flags = ["--model_name_or_path", str(model), "--dataset_path", str(DATA), "--output_dir", str(out),
             "--deepspeed", str(ROOT / "ds_configs" / args.ds_config), "--method", method, "--max_steps", "1",
             "--save_steps", "1", "--block_size", "16", "--per_device_train_batch_size", "1",
             "--learning_rate", "1e-5", "--warmup_steps", "0", "--logging_steps", "1", "--overwrite_output_dir",
             "--cache_dir", str(out.parent / "cache")]
    if args.bf16:
        flags += ["--bf16"]
    if method == "owlore":
        flags += ["--lisa_activated_layers", "1", "--lisa_interval_steps", "1", "--owl_nsamples", "2",
                  "--galore_rank", "8", "--galore_svd", "randomized"]
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "launch" / "train.py"), *flags]
    start = time.time()
    with open(log, "w") as fh:
        subprocess.run(command, env=env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def timed_convert(tree: Path, checkpoint: Path, destination: Path, log: Path, *flags: str) -> dict:
    shutil.rmtree(destination, ignore_errors=True)
    command = ["/usr/bin/time", "-v", sys.executable, str(tree / "tools" / "convert_to_hf.py"), str(checkpoint),
               str(destination), *flags]
    with open(log, "w") as fh:
        result = subprocess.run(command, env=env(), cwd=tree, stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text()
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    return {"returncode": result.returncode, "peak_rss_bytes": peak, "wall": wall}


def compare(a: Path, b: Path) -> dict:
    """Every tensor of export `a` against export `b`, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                found.update({name: file for name in fh.keys()})
        return found

    ia, ib = index(a), index(b)
    differing, max_abs = [], 0.0
    for name in ia:
        with safe_open(str(ia[name]), framework="pt") as fa, safe_open(str(ib[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            differing.append(name)
            max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {"same_names": sorted(ia) == sorted(ib), "tensors": len(ia), "differing": differing, "max_abs": max_abs}


def loads(folder: Path) -> bool:
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM; "
             "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True); "
             "print(sum(p.numel() for p in m.parameters()), m.dtype)")
    result = subprocess.run([sys.executable, "-c", probe, str(folder)], env=env(), capture_output=True, text=True)
    return result.returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default="llama2-7b")
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--methods", default="full,owlore")
    p.add_argument("--output_dir", default="bench_export")
    p.add_argument("--ds_config", default="zero3.json",
                   help="in ds_configs/; zero3_offload.json steps AdamW in place (DeepSpeed's CPU Adam), without "
                        "torch AdamW's full-size temporaries, which is what lets 2 ranks train 667M parameters in 24 GB")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 masters in the optimizer files)")
    p.add_argument("--convert_dtype", default=None, help="also convert with --dtype this (e.g. fp32: the masters)")
    p.add_argument("--previous_tree", help="a checkout whose tools/convert_to_hf.py to measure too")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    args = p.parse_args()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    parameters = build_model(args, model)
    fp32_bytes = 4 * parameters
    print(f"model: {parameters / 1e6:.1f}M parameters, {fp32_bytes / 1e9:.2f} GB in fp32", flush=True)
    results = {"model_config": args.model_config, "num_layers": args.num_layers, "parameters": parameters,
               "fp32_bytes": fp32_bytes, "machine": f"{platform.node()} {os.cpu_count()} CPUs", "runs": {}}
    for method in args.methods.split(","):
        run = out / method
        record = {"train_s": train(args, model, run, method, out / f"train-{method}.log")}
        checkpoint = run / "checkpoint-1"
        record["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        record["convert"] = timed_convert(ROOT, checkpoint, run / "hf", out / f"convert-{method}.log")
        record["equal_to_final"] = compare(run / "hf", run / "final")
        record["loads"] = loads(run / "hf")
        extra = ["--dtype", args.convert_dtype] if args.convert_dtype else []
        if extra:
            record["convert_" + args.convert_dtype] = timed_convert(ROOT, checkpoint, run / "hf-dtype",
                                                                   out / f"convert-{method}-dtype.log", *extra)
        if args.previous_tree:
            record["previous"] = timed_convert(Path(args.previous_tree).resolve(), checkpoint, run / "hf-previous",
                                               out / f"convert-previous-{method}.log", *extra)
            if extra:  # the previous converter's output in that dtype (DeepSpeed's reconstruction for full)
                record["equal_to_previous"] = compare(run / "hf-dtype", run / "hf-previous")
            shutil.rmtree(run / "hf-previous", ignore_errors=True)
        results["runs"][method] = record
        (out / "results.json").write_text(json.dumps(results, indent=2))
        if not args.keep:
            for leftover in ("hf", "hf-dtype", "final", "checkpoint-1"):
                shutil.rmtree(run / leftover, ignore_errors=True)
    print("| method | checkpoint | converter peak RSS | bound (fp32 / 2) | wall | equal to final/ | loads |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results["runs"].items():
        c, eq = r["convert"], r["equal_to_final"]
        same = eq["same_names"] and not eq["differing"]
        print(f"| {method} | {r['checkpoint_bytes'] / 1e9:.2f} GB | {c['peak_rss_bytes'] / 1e9:.2f} GB | "
              f"{fp32_bytes / 2e9:.2f} GB | {c['wall']} | {'yes' if same else 'NO'} ({eq['tensors']} tensors) | "
              f"{'yes' if r['loads'] else 'NO'} |")
        if "convert_" + str(args.convert_dtype) in r:
            d = r["convert_" + args.convert_dtype]
            print(f"|   --dtype {args.convert_dtype} | | {d['peak_rss_bytes'] / 1e9:.2f} GB | | {d['wall']} | "
                  f"{r.get('equal_to_previous', {}).get('differing', 'n/a')} differing from the previous converter | |")
        if "previous" in r:
            print(f"|   previous converter | | {r['previous']['peak_rss_bytes'] / 1e9:.2f} GB | | "
                  f"{r['previous']['wall']} | | |")


if __name__ == "__main__":
    main()
