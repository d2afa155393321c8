#!/usr/bin/env python
"""Score a causal LM on an LMFlow text2text task with a small set of answers.

    python tools/score_task.py MODEL_DIR --data data/tasks/shakespeare_speaker/test.json \
        [--max_new_tokens N] [--limit K] [--batch_size B] [--output FILE]

Prints one JSON line, e.g.
``{"accuracy": 0.31, "choice_accuracy": 0.42, "n": 240, "correct": 74, ...}``:

* ``accuracy``: greedy generation, first line of the generated text compared
  (whitespace stripped) with the expected output.
* ``choice_accuracy``: the expected output has the highest log-likelihood
  among all distinct outputs of the data file (ranked classification).  It
  needs no learned answer format, so it moves earlier and more smoothly
  during fine-tuning than exact match does.
* ``chance``: 1 / number of classes, the expected choice accuracy of a model
  that knows nothing (the demo task's classes are balanced).

``score(model, tokenizer, instances)`` does the same from Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load_instances(path: Path) -> list[dict[str, str]]:
    """Read a text2text data file; raise ValueError naming the path if it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"{path} has no non-empty 'instances' list")
    for i, inst in enumerate(instances):
        if not (
            isinstance(inst, dict)
            and isinstance(inst.get("input"), str)
            and isinstance(inst.get("output"), str)
        ):
            raise ValueError(f"{path}: instance {i} needs string 'input' and 'output'")
    return instances


def is_exact_match(generated: str, expected: str) -> bool:
    """True if the first non-empty line of `generated` equals `expected`, whitespace aside."""
    lines = [line.strip() for line in generated.strip().splitlines()]
    return bool(lines) and lines[0] == expected.strip()


def _encode(tokenizer, prompt: str, answer: str = "") -> tuple[list[int], list[int]]:
    # Prompt and answer are tokenized separately, as LMFlow's text2text
    # does, so the answer's tokens are the same ones the fine-tune trained on.
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids if answer else []
    return prompt_ids, answer_ids


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-pad so every row ends at the last column (answers line up)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    # Positions must start at 0 on the first real token, not on the padding.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


@torch.inference_mode()
def answer_logprobs(
    model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 32
) -> torch.Tensor:
    """Return [len(prompts), len(answers)] summed log-probabilities of each answer.

    The sum (no length normalisation) is the probability greedy decoding works
    with, so a class the model would generate also ranks first here.
    """
    device = next(model.parameters()).device
    pairs = [_encode(tokenizer, p, a) for p in prompts for a in answers]
    scores = torch.empty(len(pairs))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        keep = max(len(a) for _, a in chunk) + 1
        ids, mask, positions = _left_pad([p + a for p, a in chunk], _pad_id(tokenizer), device)
        # Only the last `keep` positions predict answer tokens; skipping the
        # rest of the vocabulary projection matters for longer prompts.
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
        ).logits
        logprobs = torch.log_softmax(logits[:, -keep:-1].float(), dim=-1)
        for row, (_, answer_ids) in enumerate(chunk):
            n = len(answer_ids)
            targets = torch.tensor(answer_ids, device=device)
            steps = logprobs[row, keep - 1 - n :]
            scores[start + row] = steps.gather(-1, targets[:, None]).sum().item()
    return scores.view(len(prompts), len(answers))


@torch.inference_mode()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy-decode a continuation of each prompt; return the new text only."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [_encode(tokenizer, p)[0] for p in prompts[start : start + batch_size]]
        ids, mask, _ = _left_pad(rows, _pad_id(tokenizer), device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, ids.shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def score(
    model,
    tokenizer,
    instances: list[dict[str, str]],
    classes: list[str] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> dict:
    """Exact-match and ranked-choice accuracy of `model` on text2text `instances`.

    `classes` defaults to the distinct outputs of `instances`; pass the full
    class list when scoring a subset.  `max_new_tokens` defaults to the longest
    class in tokens plus room for a newline or end token.
    """
    model.eval()
    classes = sorted(set(classes or (inst["output"] for inst in instances)))
    prompts = [inst["input"] for inst in instances]
    expected = [inst["output"] for inst in instances]
    if max_new_tokens is None:
        max_new_tokens = max(len(_encode(tokenizer, "", c)[1]) for c in classes) + 2

    generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = sum(is_exact_match(g, e) for g, e in zip(generations, expected))

    best = answer_logprobs(model, tokenizer, prompts, classes, batch_size).argmax(dim=1)
    choice_correct = sum(classes[i] == e for i, e in zip(best.tolist(), expected))

    n = len(instances)
    return {
        "accuracy": correct / n,
        "choice_accuracy": choice_correct / n,
        "n": n,
        "correct": correct,
        "choice_correct": choice_correct,
        "num_classes": len(classes),
        "chance": 1 / len(classes),
    }


def load_model(model_dir: Path, device: str):
    """Load a causal LM and its tokenizer from a local folder only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}, not a saved model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FileNotFoundError(
            f"cannot load a model and tokenizer from {model_dir}: {type(err).__name__} {detail}"
        ) from None
    return model.to(device), tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score a causal LM on a text2text task.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="text2text JSON file")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="score the first K instances")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        sys.exit(f"error: data file not found: {args.data}")
    try:
        instances = load_instances(args.data)
        model, tokenizer = load_model(args.model_dir, args.device)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")

    # Classes come from the whole file so --limit does not shrink the choice set.
    classes = sorted({inst["output"] for inst in instances})
    subset = instances[: args.limit] if args.limit else instances
    result = score(model, tokenizer, subset, classes, args.max_new_tokens, args.batch_size)

    line = json.dumps(result)
    print(line)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
