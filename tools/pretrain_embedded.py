#!/usr/bin/env python
"""Pre-train the embedded demo model: a small Llama on the public-domain Shakespeare texts.

    python tools/pretrain_embedded.py --output models/shakespeare-llama [--max_minutes M]

Four stages, all offline and all with this repository's own code:

1. a SentencePiece BPE tokenizer on ``data/pretrain/train.txt``
   (``tools/train_tokenizer.py``);
2. a seeded random ``LlamaForCausalLM`` (the "init" model) sized by the flags;
3. our trainer, ``deepspeed launch/train.py --method full``, on the same text
   packed into blocks (2 CPU processes without a GPU, one process per GPU with);
4. held-out perplexity on ``data/pretrain/valid.txt`` of the init and of the
   trained model: the validation text is tokenized as the trainer packs
   training text (``<s>`` text ``</s>``), cut into non-overlapping windows of
   ``--block_size`` tokens (the last one shorter), and the token-weighted mean
   next-token NLL over all windows is exponentiated.

The output folder gets the trained model (safetensors), its tokenizer, a model
card ``README.md`` with the recipe and the figures, and ``pretrain_report.json``.
Intermediate files go to ``--work_dir`` (default ``runs/pretrain_embedded``);
re-running resumes the trainer from its last checkpoint there.

The defaults are the recipe of the shipped ``models/shakespeare-llama``.
``--max_minutes M`` is for slower machines: it times a few steps first and, if
the recipe would not fit in M minutes, trains fewer steps (the card then says so,
and the perplexity will be higher than the shipped model's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from owlore_ds.metrics import package_versions, read_metrics  # noqa: E402

DEFAULT_OUTPUT = "models/shakespeare-llama"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


# ---------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[pretrain_embedded {time.strftime('%H:%M:%S')}] {message}", flush=True)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launcher_env(gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
        # Two processes on a small machine: one thread each avoids oversubscription.
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def deepspeed_command(python: str) -> list[str]:
    """The deepspeed launcher next to our interpreter (the venv's), else the module."""
    script = Path(python).parent / "deepspeed"
    if script.is_file():
        return [str(script)]
    return [python, "-m", "deepspeed.launcher.runner"]


def count_params(model) -> tuple[int, int]:
    """(unique parameters, non-embedding parameters)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embed = model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        embed += model.get_output_embeddings().weight.numel()
    return total, total - embed


# ---------------------------------------------------------------- stages


def build_tokenizer(train_file: Path, vocab_size: int, model_max_length: int, dest: Path) -> None:
    import train_tokenizer

    if dest.exists():
        shutil.rmtree(dest)
    train_tokenizer.train_sentencepiece([train_file], vocab_size, dest)
    train_tokenizer.save_hf_tokenizer(dest, model_max_length)
    train_tokenizer.check_round_trip(dest, "To be, or not to be, that is the question.")


def build_init_model(args, tokenizer_dir: Path, dest: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)  # _init_weights: normal(0, initializer_range), seeded above
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    return model


def trainer_command(args, init_dir: Path, run_dir: Path, gpus: int, max_steps: int, save_steps: int,
                    overwrite: bool) -> list[str]:
    python = sys.executable
    procs = gpus if gpus > 0 else args.cpu_procs
    per_device = args.global_batch // (procs * args.gradient_accumulation_steps)
    if per_device * procs * args.gradient_accumulation_steps != args.global_batch:
        raise SystemExit(
            f"error: --global_batch {args.global_batch} is not divisible by {procs} processes x "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
    cmd = deepspeed_command(python) + [
        "--num_gpus", str(procs), "--master_port", str(args.master_port),
        str(ROOT / "launch" / "train.py"),
        "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
        "--method", "full",
        "--model_name_or_path", str(init_dir),
        "--dataset_path", str(args.train_file),
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(per_device),
        "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
        "--max_steps", str(max_steps),
        "--learning_rate", str(args.learning_rate),
        "--weight_decay", str(args.weight_decay),
        "--adam_beta2", str(args.adam_beta2),
        "--lr_scheduler_type", "cosine",
        "--warmup_ratio", str(args.warmup_ratio),
        "--max_grad_norm", "1.0",
        "--seed", str(args.seed),
        "--bf16" if args.precision == "bf16" else "--fp32",
        "--output_dir", str(run_dir),
        "--save_steps", str(save_steps),
        "--save_total_limit", "1",
        "--logging_steps", str(args.logging_steps),
    ]
    cmd += ["--overwrite_output_dir"] if overwrite else ["--resume_from_checkpoint", "auto"]
    return cmd


def run_trainer(cmd: list[str], env: dict[str, str], log_file: Path) -> float:
    log("running: " + " ".join(cmd))
    start = time.perf_counter()
    with open(log_file, "a") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            # tqdm redraws are noise in a log; the trainer's own lines are not.
            # (universal newlines turn each \r redraw into a line of its own)
            if "%|" not in line and line.strip():
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"error: the trainer failed with exit status {code}; see {log_file}")
    return time.perf_counter() - start


def probe_step_time(args, init_dir: Path, work: Path, gpus: int) -> float:
    """Seconds per optimizer step, from a few steps after a warm-up."""
    probe_dir = work / "probe"
    steps = args.probe_steps
    cmd = trainer_command(args, init_dir, probe_dir, gpus, steps, 0, overwrite=True)
    run_trainer(cmd, launcher_env(gpus), work / "probe.log")
    records = read_metrics(probe_dir)
    times = [r["step_time_s"] for r in records[2:]] or [r["step_time_s"] for r in records]
    shutil.rmtree(probe_dir, ignore_errors=True)
    return sum(times) / len(times)


def held_out_perplexity(model_dir: Path, valid_file: Path, block_size: int, threads: int) -> dict:
    """exp(token-weighted mean NLL) over non-overlapping windows of `block_size` tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer.model_max_length = 10**9  # the whole file at once; windows are cut below
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.eval()
    text = valid_file.read_text(encoding="utf-8")
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    windows = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    windows = [w for w in windows if len(w) > 1]
    nll, count = 0.0, 0
    batch = 16
    with torch.inference_mode():
        full = [w for w in windows if len(w) == block_size]
        rest = [w for w in windows if len(w) != block_size]
        for group in [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in rest]:
            x = torch.tensor(group)
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": len(windows), "characters": len(text)}


# ---------------------------------------------------------------- output


SAMPLE_PROMPT = "ROMEO.\n"


def sample_text(model_dir: Path, prompt: str = SAMPLE_PROMPT, seed: int = 0, max_new_tokens: int = 80,
                temperature: float = 0.8, top_k: int = 40) -> dict:
    """A seeded sampled continuation of `prompt`, for the model card."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, do_sample=True, temperature=temperature, top_k=top_k,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"prompt": prompt, "text": text, "seed": seed, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "top_k": top_k}


def device_description(gpus: int, procs: int) -> str:
    if gpus:
        import torch

        return f"{gpus} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU only: {procs} processes x 1 thread on {os.cpu_count()} cores ({cpu})"


def _fmt(value, digits: int) -> str:
    return "not measured" if value is None or value != value else f"{value:.{digits}f}"


def _format_command(cmd: list[str]) -> str:
    """One flag (with its value) or script per line."""
    lines: list[list[str]] = []
    for part in cmd:
        if not lines or part.startswith("--") or part.endswith(".py"):
            lines.append([part])
        else:
            lines[-1].append(part)
    return " \\\n    ".join(" ".join(line) for line in lines)


def model_card(report: dict) -> str:
    r = report
    m = r["model"]
    t = r["training"]
    ppl = r["held_out"]
    cmd = r["command"]
    trainer_cmd = _format_command(r["trainer_command"])
    return f"""# shakespeare-llama

A {m['parameters'] / 1e6:.1f}M-parameter Llama-architecture causal language model
pre-trained from scratch on the public-domain Shakespeare texts in
`data/shakespeare/` (Project Gutenberg, see `data/shakespeare/NOTICE.md`).
It is the embedded default `--model_name_or_path` of owlore-ds, so that the
trainer, the demo (`make demo`) and the tests run on a fresh machine with no
model hub. It is a toy: it writes plausible-looking Early Modern English verse
and prose layout, not sense.

## Figures

| | value |
|---|---|
| held-out perplexity, random init | {_fmt(ppl['init'].get('perplexity'), 1)} |
| held-out perplexity, trained | **{ppl['trained']['perplexity']:.2f}** |
| held-out tokens | {ppl['trained']['tokens']:,} ({ppl['trained']['characters']:,} characters of `data/pretrain/valid.txt`) |
| optimizer steps | {t['steps']:,} |
| training tokens seen | {t['tokens_seen']:,} ({t['epochs']:.2f} epochs of {t['train_tokens']:,} tokens) |
| final training loss (mean of last 20 steps) | {t['final_loss']:.3f} |
| training wall time | {t['train_minutes']:.1f} min |
| device | {r['device']} |
| date | {r['date']} |

Perplexity: `data/pretrain/valid.txt` (the last ~5% of every work, never
trained on) is tokenized as the trainer packs text (`<s>` text `</s>`), cut
into non-overlapping windows of {r['eval_block_size']} tokens, and
exp(token-weighted mean next-token NLL) is reported. A uniform guess over the
vocabulary would score {m['vocab_size']:,}.

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM` |
| parameters | {m['parameters']:,} ({m['non_embedding_parameters']:,} non-embedding) |
| layers / hidden / heads / MLP | {m['num_hidden_layers']} / {m['hidden_size']} / {m['num_attention_heads']} (head dim {m['hidden_size'] // m['num_attention_heads']}) / {m['intermediate_size']} |
| vocabulary | {m['vocab_size']:,} SentencePiece BPE pieces, byte fallback; unk=0, bos=1, eos=2, pad=3 |
| context | {m['max_position_embeddings']} positions (RoPE), trained on {t['block_size']}-token blocks |
| tied input/output embeddings | {m['tie_word_embeddings']} |
| weights | `model.safetensors`, {m['dtype']} |

## Recipe

Reproduce (from the repository root, same defaults):

```
{cmd}
```

which trains the tokenizer (`tools/train_tokenizer.py`, vocabulary
{m['vocab_size']}, on `data/pretrain/train.txt`), builds the model above with
seed {t['seed']} (normal(0, 0.02) init), and runs our trainer:

```
{trainer_cmd}
```

AdamW (beta2 {t['adam_beta2']}, weight decay {t['weight_decay']}), peak
learning rate {t['learning_rate']}, linear warm-up over {t['warmup_ratio']:.0%}
of the steps then cosine decay to 0, global batch {t['global_batch']} blocks of
{t['block_size']} tokens ({t['global_batch'] * t['block_size']:,} tokens per
step), gradient clipping at 1.0, {t['precision']}{' with fp32 master weights' if t['precision'] == 'bf16' else ''},
ZeRO-2 over {t['processes']} processes.
A re-run on the same kind of machine reproduces the figures (a 30-step run
repeated gave the same perplexity to all printed digits); other CPUs, thread
counts or GPUs change the floating-point sums, so expect a perplexity within
noise of the one above, not bit-identical weights.

## Sample

Sampled continuation of `{r['sample']['prompt']!r}` (temperature
{r['sample']['temperature']}, top-k {r['sample']['top_k']}, seed {r['sample']['seed']},
{r['sample']['max_new_tokens']} tokens):

```
{(r['sample']['prompt'] + r['sample']['text']).rstrip()}
```

`make demo` (`tools/demo.py`) fine-tunes this model on the embedded
"who speaks these lines?" task (`data/tasks/shakespeare_speaker/`) and
prints the held-out accuracy before and after.

## Versions

{', '.join(f'{k} {v}' for k, v in r['versions'].items())}

## License

The training texts are in the public domain; so are these weights.
"""


def write_output(trained_dir: Path, output: Path, report: dict) -> None:
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in MODEL_FILES + TOKENIZER_FILES:
        if (trained_dir / name).is_file():
            shutil.copyfile(trained_dir / name, tmp / name)
    (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(report))
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT), help="folder to write the model to")
    p.add_argument("--work_dir", type=Path, default=Path("runs/pretrain_embedded"))
    p.add_argument("--train_file", type=Path, default=Path("data/pretrain/train.txt"))
    p.add_argument("--valid_file", type=Path, default=Path("data/pretrain/valid.txt"))
    p.add_argument("--max_minutes", type=float, default=None,
                   help="time budget for training; fewer steps than --max_steps when the recipe would not fit")
    # tokenizer and model
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=6)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--intermediate_size", type=int, default=688)
    p.add_argument("--max_position_embeddings", type=int, default=512)
    p.add_argument("--tie_word_embeddings", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    # training
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--global_batch", type=int, default=16, help="blocks per optimizer step")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=1200)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--warmup_ratio", type=float, default=0.03)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--adam_beta2", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="training precision (bf16: fp32 master weights); the model is saved in it")
    p.add_argument("--cpu_procs", type=int, default=2, help="trainer processes when there is no GPU")
    p.add_argument("--master_port", type=int, default=29533)
    p.add_argument("--save_steps", type=int, default=200, help="checkpoint interval (resume after a crash)")
    p.add_argument("--logging_steps", type=int, default=25)
    p.add_argument("--probe_steps", type=int, default=8, help="steps timed for --max_minutes")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --work_dir from its last checkpoint (same flags)")
    p.add_argument("--skip_init_eval", action="store_true", help="do not score the random init (saves a minute)")
    args = p.parse_args(argv)
    for name in ("output", "work_dir", "train_file", "valid_file"):
        path = getattr(args, name)
        setattr(args, name, path if path.is_absolute() else (Path.cwd() / path).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for f in (args.train_file, args.valid_file):
        if not f.is_file():
            raise SystemExit(f"error: data file not found: {f}")
    if args.hidden_size % args.num_heads:
        raise SystemExit("error: --hidden_size must be divisible by --num_heads")
    if args.block_size > args.max_position_embeddings:
        raise SystemExit("error: --block_size exceeds --max_position_embeddings")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    gpus = gpu_count()
    procs = gpus if gpus else args.cpu_procs
    threads = max(1, os.cpu_count() or 1)
    started = time.perf_counter()

    tok_dir, init_dir, run_dir = work / "tokenizer", work / "init", work / "run"
    log(f"training the tokenizer (vocabulary {args.vocab_size}) on {args.train_file}")
    build_tokenizer(args.train_file, args.vocab_size, args.max_position_embeddings, tok_dir)
    model = build_init_model(args, tok_dir, init_dir)
    params, non_embed = count_params(model)
    del model
    log(f"init model: {params:,} parameters ({non_embed:,} non-embedding) in {init_dir}")

    max_steps = args.max_steps
    if args.max_minutes:
        step_time = probe_step_time(args, init_dir, work, gpus)
        fits = int(args.max_minutes * 60 / step_time)
        log(f"probe: {step_time:.2f}s per step; {fits} steps fit in {args.max_minutes} min")
        if fits < max_steps:
            max_steps = max(fits, 10)
            log(f"training {max_steps} steps instead of the recipe's {args.max_steps}")

    init_ppl = None
    if not args.skip_init_eval:
        init_ppl = held_out_perplexity(init_dir, args.valid_file, args.block_size, threads)
        log(f"held-out perplexity of the random init: {init_ppl['perplexity']:.1f}")

    resume = args.resume and (run_dir / "run_config.json").is_file()
    cmd = trainer_command(args, init_dir, run_dir, gpus, max_steps, args.save_steps, overwrite=not resume)
    train_seconds = run_trainer(cmd, launcher_env(gpus), work / "train.log")
    records = read_metrics(run_dir)
    trained_dir = run_dir / "final"
    if not (trained_dir / "config.json").is_file():
        raise SystemExit(f"error: the trainer wrote no {trained_dir}")
    if resume:
        # Time of the steps run before the resume counts too.
        train_seconds = sum(r["step_time_s"] for r in records)

    trained_ppl = held_out_perplexity(trained_dir, args.valid_file, args.block_size, threads)
    log(f"held-out perplexity of the trained model: {trained_ppl['perplexity']:.2f}")

    import torch
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(trained_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(trained_dir), local_files_only=True)
    tokenizer.model_max_length = 10**9
    train_tokens = len(tokenizer(args.train_file.read_text(encoding="utf-8"), add_special_tokens=False).input_ids) + 2
    blocks = train_tokens // args.block_size
    steps = records[-1]["step"] if records else max_steps
    tokens_seen = sum(r["tokens"] for r in records)
    last = records[-20:]
    rel = lambda p: os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else str(p)  # noqa: E731
    shown_cmd = ["python", "tools/pretrain_embedded.py", "--output", rel(args.output)]
    if max_steps != args.max_steps:
        shown_cmd += ["--max_steps", str(max_steps)]
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shown_cmd),
        "trainer_command": [rel(c) if os.path.isabs(c) else c for c in cmd],
        "device": device_description(gpus, procs),
        "model": {
            "parameters": params, "non_embedding_parameters": non_embed,
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "dtype": str(config.dtype or torch.float32).replace("torch.", ""),
        },
        "training": {
            "steps": steps, "recipe_steps": args.max_steps, "tokens_seen": tokens_seen,
            "train_tokens": train_tokens, "train_blocks": blocks,
            "epochs": steps * args.global_batch / max(blocks, 1),
            "block_size": args.block_size, "global_batch": args.global_batch,
            "learning_rate": args.learning_rate, "warmup_ratio": args.warmup_ratio,
            "weight_decay": args.weight_decay, "adam_beta2": args.adam_beta2, "seed": args.seed,
            "precision": args.precision,
            "processes": procs,
            "final_loss": sum(r["loss"] for r in last) / max(len(last), 1),
            "train_minutes": train_seconds / 60,
            "mean_step_time_s": sum(r["step_time_s"] for r in records) / max(len(records), 1),
        },
        "eval_block_size": args.block_size,
        "held_out": {"init": init_ppl or {"perplexity": None}, "trained": trained_ppl},
        "sample": sample_text(trained_dir),
        "versions": {"python": platform.python_version(),
                     **package_versions(("torch", "transformers", "deepspeed", "sentencepiece", "safetensors"))},
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    # The trainer's export writes the fast tokenizer only; the SentencePiece model
    # lets the slow LlamaTokenizer (and sentencepiece itself) load the folder too.
    shutil.copyfile(tok_dir / "tokenizer.model", trained_dir / "tokenizer.model")
    write_output(trained_dir, args.output, report)
    size = sum(f.stat().st_size for f in args.output.iterdir()) / 2**20
    log(f"wrote {args.output} ({size:.1f} MiB): perplexity {_fmt(init_ppl and init_ppl['perplexity'], 1)} -> "
        f"{trained_ppl['perplexity']:.2f} after {steps} steps, {tokens_seen:,} tokens, "
        f"{train_seconds / 60:.1f} min of training")


if __name__ == "__main__":
    main()
