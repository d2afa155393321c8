"""Checks for the embedded demo data and its tools (tools/*.py); CPU only, ~10 s."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from conftest import ROOT, load_tool

TASK_DIR = ROOT / "data" / "tasks" / "shakespeare_speaker"
TEXTS = ROOT / "data" / "shakespeare"


make_task = load_tool("make_embedded_task")
score_task = load_tool("score_task")
train_tokenizer = load_tool("train_tokenizer")


def _lines(instance: dict) -> list[str]:
    # input is "question\n<passage lines>\nSpeaker:"
    return instance["input"].split("\n")[1:-1]


@pytest.fixture(scope="module")
def task() -> dict[str, list[dict]]:
    return {split: score_task.load_instances(TASK_DIR / f"{split}.json") for split in ("train", "test")}


def test_task_files_parse(task):
    for split in ("train", "test"):
        assert json.loads((TASK_DIR / f"{split}.json").read_text())["type"] == "text2text"
    assert 2000 <= len(task["train"]) <= 4000
    assert 200 <= len(task["test"]) <= 300
    for inst in task["train"] + task["test"]:
        assert inst["input"].endswith("\nSpeaker:")
        assert inst["output"].startswith(" ") and inst["output"].strip().isupper()
        assert 1 <= len(_lines(inst)) <= make_task.MAX_LINES


def test_train_and_test_are_disjoint(task):
    train_lines = {line for inst in task["train"] for line in _lines(inst)}
    test_lines = {line for inst in task["test"] for line in _lines(inst)}
    assert not train_lines & test_lines
    train_inputs = {inst["input"] for inst in task["train"]}
    assert len(train_inputs) == len(task["train"])  # no duplicates either


def test_classes_small_and_balanced(task):
    train_counts = collections.Counter(inst["output"] for inst in task["train"])
    test_counts = collections.Counter(inst["output"] for inst in task["test"])
    assert set(train_counts) == set(test_counts) == {" " + c for c in make_task.CLASSES}
    assert 8 <= len(train_counts) <= 16
    assert max(train_counts.values()) <= 1.1 * min(train_counts.values())
    assert max(test_counts.values()) == min(test_counts.values())


def test_files_match_builder():
    # Seeded builder: the committed files must be what the script writes now.
    train, test = make_task.build_task(TEXTS)
    assert train == json.loads((TASK_DIR / "train.json").read_text())["instances"]
    assert test == json.loads((TASK_DIR / "test.json").read_text())["instances"]


def test_parse_speeches_handles_abbreviated_headings():
    speeches = make_task.parse_speeches(TEXTS / "hamlet_gut.txt")
    hamlet = [s for s in speeches if s.speaker == "Ham"]
    assert len(hamlet) > 300
    assert any("To be, or not to be" in line for s in hamlet for line in s.lines)
    assert not any(line.startswith("[") for s in speeches for line in s.lines)


def test_pretrain_split_holds_out_the_end_of_each_work():
    train, valid = make_task.split_pretrain(TEXTS)
    total = sum(len(p.read_text()) for p in TEXTS.glob("*_gut.txt"))
    assert 0.03 < len(valid) / total < 0.08
    assert "Go, bid the soldiers shoot." in valid  # last line of Hamlet
    assert "Go, bid the soldiers shoot." not in train
    assert "To be, or not to be" in train


@pytest.mark.parametrize(
    "generated, expected, match",
    [
        (" HAMLET", " HAMLET", True),
        ("HAMLET\nHORATIO", " HAMLET", True),
        ("\n  HAMLET  \n", " HAMLET", True),
        (" HAMLET HORATIO", " HAMLET", False),
        (" Hamlet", " HAMLET", False),
        (" HAM", " HAMLET", False),
        ("", " HAMLET", False),
    ],
)
def test_exact_match(generated, expected, match):
    assert score_task.is_exact_match(generated, expected) is match


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "small.txt"
    # ~150 kB: enough text for 512 pieces, trains in well under a second.
    corpus.write_text((TEXTS / "hamlet_gut.txt").read_text())
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer.main(["--input", str(corpus), "--vocab_size", "512", "--output", str(out)])
    return out


def test_tokenizer_loads_and_round_trips(tokenizer_dir):
    from transformers import AutoTokenizer, LlamaTokenizer

    assert (tokenizer_dir / "tokenizer.model").is_file()
    for cls in (LlamaTokenizer, AutoTokenizer):
        tok = cls.from_pretrained(str(tokenizer_dir), local_files_only=True)
        assert len(tok) == 512
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
        line = "Whether 'tis nobler in the mind to suffer"
        ids = tok(line).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == line


def test_chat_template_prefixes(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    conversation = [
        {"role": "system", "content": "Answer with a name."},
        {"role": "user", "content": "Who says 'To be, or not to be'?"},
        {"role": "assistant", "content": "HAMLET"},
        {"role": "user", "content": "And 'I am a man more sinned against than sinning'?"},
        {"role": "assistant", "content": "LEAR"},
    ]
    full = tok.apply_chat_template(conversation, tokenize=False)
    assert full.startswith(tok.bos_token) and full.endswith("LEAR" + tok.eos_token)
    for k in range(1, len(conversation)):
        assert full.startswith(tok.apply_chat_template(conversation[:k], tokenize=False))
    prompt = tok.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Assistant:\n") and full.startswith(prompt)


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_score_random_model_is_bounded_and_deterministic(tiny_model_dir, task):
    model, tok = score_task.load_model(tiny_model_dir, "cpu")
    classes = sorted({inst["output"] for inst in task["test"]})
    subset = task["test"][:24]
    first = score_task.score(model, tok, subset, classes, batch_size=16)
    second = score_task.score(model, tok, subset, classes, batch_size=16)
    assert first == second
    assert first["n"] == 24 and first["num_classes"] == len(classes)
    assert 0.0 <= first["accuracy"] <= 1.0 and 0.0 <= first["choice_accuracy"] <= 1.0
    assert first["choice_correct"] == round(first["choice_accuracy"] * 24)


def test_answer_logprobs_match_unbatched(tiny_model_dir, task):
    import torch

    model, tok = score_task.load_model(tiny_model_dir, "cpu")
    prompt, answers = task["test"][0]["input"], [" HAMLET", " IAGO", " LEAR"]
    batched = score_task.answer_logprobs(model, tok, [prompt], answers, batch_size=3)[0]
    for j, answer in enumerate(answers):
        prompt_ids = tok(prompt).input_ids
        answer_ids = tok(answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
        expected = sum(logprobs[len(prompt_ids) - 1 + k, t] for k, t in enumerate(answer_ids))
        assert abs(batched[j].item() - float(expected)) < 1e-4


def test_score_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "score.json"
    score_task.main(
        [str(tiny_model_dir), "--data", str(TASK_DIR / "test.json"), "--limit", "6", "--output", str(out)]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["n"] == 6 and printed["num_classes"] == len(make_task.CLASSES)


def test_score_cli_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_model"
    with pytest.raises(SystemExit) as exc:
        score_task.main([str(missing), "--data", str(TASK_DIR / "test.json")])
    assert str(missing) in str(exc.value.code)

    bad = tmp_path / "bad.json"
    bad.write_text('{"instances": [')
    with pytest.raises(SystemExit) as exc:
        score_task.main([str(tmp_path), "--data", str(bad)])
    assert str(bad) in str(exc.value.code) and "JSON" in str(exc.value.code)
