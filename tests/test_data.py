"""Every dataset format, tokenized with a real SentencePiece tokenizer, and the global batch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import common_args, run_training
from owlore_ds.metrics import read_metrics
from owlore_ds.data import IGNORE_INDEX, GlobalBatches, TokenizedData, load_training_data, read_records, tokenize_records
from owlore_ds.errors import UserInputError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def _load(path: Path, tokenizer, tokenizer_dir, block_size: int = 48) -> TokenizedData:
    """The dataset as training loads it (the memory-mapped cache), every row widened to dense tensors."""
    data = load_training_data(str(path), tokenizer, str(tokenizer_dir), block_size, str(path.parent / "cache"),
                              vocab_size=len(tokenizer))
    return TokenizedData(**data.batch(torch.arange(len(data))))


def _targets(data, row: int) -> list[int]:
    return [t for t in data.labels[row].tolist() if t != IGNORE_INDEX]


def test_text_only_is_packed_into_full_blocks(tmp_path, tokenizer, tokenizer_dir):
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"] * 20
    path = _write(tmp_path / "d.json", {"type": "text_only", "instances": [{"text": t} for t in texts]})
    data = _load(path, tokenizer, tokenizer_dir, block_size=32)
    stream = []
    for text in texts:
        stream += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(data) == len(stream) // 32
    assert data.input_ids.flatten().tolist() == stream[: len(data) * 32]
    assert torch.equal(data.labels, data.input_ids) and bool(data.attention_mask.all())


def test_text2text_takes_loss_on_output_only_and_keeps_the_target_of_long_prompts(tmp_path, tokenizer, tokenizer_dir):
    long_prompt = "Friends, Romans, countrymen, lend me your ears; " * 30
    instances = [{"input": "Who speaks?", "output": " HAMLET"}, {"input": long_prompt, "output": " ANTONY"}]
    data = _load(_write(tmp_path / "d.json", {"type": "text2text", "instances": instances}), tokenizer, tokenizer_dir)
    eos = tokenizer.eos_token_id
    for row, answer in enumerate([" HAMLET", " ANTONY"]):
        assert _targets(data, row) == tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
    long_ids = data.input_ids[1][data.attention_mask[1].bool()].tolist()
    assert len(long_ids) == 48 and long_ids[0] == tokenizer.bos_token_id  # cut from the prompt's start
    assert tokenizer.decode(long_ids[-4:-1]).strip().endswith("ANTONY")
    assert data.attention_mask[0].sum() < 48 and data.input_ids[0, -1] == tokenizer.pad_token_id


def test_conversation_takes_loss_on_assistant_turns(tmp_path, tokenizer, tokenizer_dir):
    messages = [{"role": "user", "content": "Who is the Prince of Denmark?"},
                {"role": "assistant", "content": "Hamlet."},
                {"role": "user", "content": "And his father?"},
                {"role": "assistant", "content": "The ghost."}]
    data = _load(_write(tmp_path / "c.json", {"type": "conversation", "instances": [{"messages": messages}]}),
                 tokenizer, tokenizer_dir, block_size=96)
    target_text = tokenizer.decode(_targets(data, 0))
    assert "Hamlet." in target_text and "The ghost." in target_text
    assert "Prince" not in target_text and "father" not in target_text and "Assistant" not in target_text
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(data.input_ids[0][data.attention_mask[0].bool()]) == tokenizer.decode(
        tokenizer(full, add_special_tokens=False)["input_ids"])


def test_rows_files_and_folders(tmp_path, tokenizer, tokenizer_dir):
    import datasets

    rows = [{"input": f"line {i}", "output": f" answer {i}"} for i in range(6)]
    (tmp_path / "jsonl").mkdir()
    _write(tmp_path / "jsonl" / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    _write(tmp_path / "rows.json", rows)
    loaded = [_load(p, tokenizer, tokenizer_dir) for p in (tmp_path / "jsonl", tmp_path / "rows.parquet", tmp_path / "rows.json")]
    for data in loaded[1:]:
        assert torch.equal(data.input_ids, loaded[0].input_ids) and torch.equal(data.labels, loaded[0].labels)
    assert read_records(str(tmp_path / "rows.parquet"))[0] == "text2text"
    _write(tmp_path / "m.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    assert read_records(str(tmp_path / "m.jsonl"))[0] == "conversation"
    (tmp_path / "txt").mkdir()
    _write(tmp_path / "txt" / "a.txt", "O Romeo, Romeo, wherefore art thou Romeo? " * 20)
    _write(tmp_path / "txt" / "b.txt", "Now is the winter of our discontent " * 20)
    kind, records, files = read_records(str(tmp_path / "txt"))
    assert kind == "text_only" and len(records) == 2 and len(files) == 2
    assert len(_load(tmp_path / "txt", tokenizer, tokenizer_dir, block_size=16)) > 10


def test_pretokenized_rows_are_one_example_each(tmp_path, tokenizer, tokenizer_dir):
    rows = [{"input_ids": list(range(10, 10 + n))} for n in (5, 60, 20)]
    rows[2]["labels"] = [IGNORE_INDEX] * 10 + list(range(20, 30))
    data = _load(_write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows)), tokenizer, tokenizer_dir)
    assert len(data) == 3
    assert data.input_ids[0, :5].tolist() == list(range(10, 15)) and data.attention_mask[0].sum() == 5
    assert data.input_ids[1].tolist() == list(range(10, 58))  # cut to block_size
    assert _targets(data, 2) == list(range(20, 30))


def test_example_without_target_is_dropped_not_nan(tmp_path, tokenizer, tokenizer_dir):
    instances = [{"input": "Speak.", "output": ""}, {"input": "Speak again.", "output": " I will."}]
    records = read_records(str(_write(tmp_path / "d.json", {"type": "text2text", "instances": instances})))[1]
    # Only EOS is left as the target of the empty output, which still teaches when to stop.
    assert len(tokenize_records("text2text", records, tokenizer, 48)) == 2
    data = tokenize_records("tokenized", [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3},
                                          {"input_ids": [5, 6, 7]}], tokenizer, 48)
    assert len(data) == 1


def test_global_batches_do_not_depend_on_the_rank_split():
    batches = GlobalBatches(num_examples=40, global_batch=8, seed=3, shuffle=False)
    assert batches.rows(0).tolist() == list(range(8)) and batches.rows(6).tolist() == list(range(8, 16))
    shuffled = GlobalBatches(40, 8, seed=3, shuffle=True)
    epoch = torch.cat([shuffled.rows(s) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40)) and epoch.tolist() != list(range(40))
    assert not torch.equal(torch.cat([shuffled.rows(s) for s in range(5, 10)]), epoch)  # reshuffled per epoch
    rows = shuffled.rows(2)
    for world, micro, accum in ((1, 8, 1), (2, 2, 2), (4, 1, 2), (8, 1, 1)):
        parts = [GlobalBatches.micro_rows(rows, m, r, world, micro) for m in range(accum) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == sorted(rows.tolist())


def test_no_shuffle_step_trains_on_rows_in_file_order(tmp_path, tiny_llama):
    """Each row is a different constant sequence; the step's loss identifies the rows trained on."""
    rows = [{"input_ids": [10 + i] * 16} for i in range(16)]
    path = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, path, out, block_size=16, per_device_train_batch_size=2,
                             max_steps=4, learning_rate=0.0, no_shuffle=True, warmup_steps=0), nproc=2)
    losses = [m["loss"] for m in read_metrics(out)]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True)
    for step, loss in enumerate(losses):
        ids = torch.tensor([r["input_ids"] for r in rows[step * 4 : (step + 1) * 4]])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=ids).loss.item()
        assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("content,message", [
    ('{"type": "text_only", "instances": [{"text": "a"},]}', "d.json: not valid JSON at line 1"),
    ('{"type": "poetry", "instances": [{"text": "a"}]}', "unknown dataset type 'poetry'"),
    ('{"type": "text2text", "instances": []}', "'instances' is empty"),
    ('{"type": "text2text", "instances": [{"input": "a"}]}', "instance 0 of a text2text dataset lacks 'output'"),
])
def test_bad_datasets_name_file_and_place(tmp_path, content, message):
    path = _write(tmp_path / "d.json", content)
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_records(str(path))


def test_bad_jsonl_line_is_named(tmp_path):
    path = _write(tmp_path / "rows.jsonl", '{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserInputError, match=r"rows.jsonl: line 2 is not valid JSON"):
        read_records(str(path))


# ---------------------------------------------------------------- Alpaca and ShareGPT (LLaMA-Factory's formats)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "\n".join(json.dumps(r) for r in rows))


def _prompt_and_targets(data, row: int, tokenizer) -> tuple[str, str]:
    """The whole example decoded, and only its loss-bearing tokens decoded."""
    return tokenizer.decode(data.input_ids[row][data.attention_mask[row].bool()]), tokenizer.decode(_targets(data, row))


def test_alpaca_renders_instruction_input_system_and_history_with_loss_on_responses(tmp_path, tokenizer, tokenizer_dir):
    rows = [{"instruction": "Name the speaker.", "input": "To be, or not to be", "output": "HAMLET"},
            {"instruction": "Name the speaker.", "input": "", "output": "ROMEO", "system": "Answer in capitals.",
             "history": [["Which play?", "Romeo and Juliet"]]}]
    path = _jsonl(tmp_path / "alpaca.jsonl", rows)
    kind, records, _ = read_records(str(path))
    assert kind == "conversation"
    assert records[0]["messages"] == [{"role": "user", "content": "Name the speaker.\nTo be, or not to be"},
                                      {"role": "assistant", "content": "HAMLET"}]
    assert [m["role"] for m in records[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    data = _load(path, tokenizer, tokenizer_dir, block_size=96)
    text, targets = _prompt_and_targets(data, 0, tokenizer)
    # The instruction is no longer dropped: it and the input form the user turn.
    assert "Name the speaker." in text and "To be, or not to be" in text
    assert targets.replace(tokenizer.eos_token, "").strip() == "HAMLET"  # the assistant header is prompt too
    text, targets = _prompt_and_targets(data, 1, tokenizer)
    assert "Answer in capitals." in text and "Which play?" in text
    assert "Romeo and Juliet" in targets and "ROMEO" in targets
    assert "Name the speaker" not in targets and "Which play" not in targets and "capitals" not in targets


def test_sharegpt_maps_roles_like_the_equivalent_messages(tmp_path, tokenizer, tokenizer_dir):
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Who is Yorick?"},
                                   {"from": "gpt", "value": "A jester."}, {"from": "user", "value": "Whose?"},
                                   {"from": "assistant", "value": "The king's."}]},
                {"system": "Be kind.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Yorick?"},
                              {"role": "assistant", "content": "A jester."}, {"role": "user", "content": "Whose?"},
                              {"role": "assistant", "content": "The king's."}]},
                {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}]}]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    got = _load(_jsonl(tmp_path / "a" / "sharegpt.jsonl", sharegpt), tokenizer, tokenizer_dir, block_size=96)
    want = _load(_jsonl(tmp_path / "b" / "messages.jsonl", messages), tokenizer, tokenizer_dir, block_size=96)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    text, targets = _prompt_and_targets(got, 0, tokenizer)
    assert "Who is Yorick?" in text and "A jester." in targets and "The king's." in targets and "Yorick" not in targets
    bad = _jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "narrator", "value": "Enter ghost"}]}])
    with pytest.raises(UserInputError, match=r"bad.jsonl: row 1: unknown role 'narrator'"):
        read_records(str(bad))


def test_rows_of_no_known_format_are_named_with_their_columns(tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserInputError, match=r"pc.jsonl: row 1 has columns \['completion', 'prompt'\]"):
        read_records(str(path))
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"text": "b"}, {"question": "c", "answer": "d"}])
    with pytest.raises(UserInputError, match=r"mixed.jsonl: row 3 has columns \['answer', 'question'\], .*text_only"):
        read_records(str(mixed))


def test_inspect_data_shows_the_instruction_in_the_prompt_and_loss_on_the_response(tmp_path, tiny_llama):
    import re
    import subprocess
    import sys

    from conftest import ROOT, base_env

    rows = [{"instruction": "Name the speaker of this line.", "input": "To be, or not to be", "output": "HAMLET"},
            {"instruction": "Name the speaker.", "input": "O Romeo, Romeo", "output": "JULIET"}]
    path = _jsonl(tmp_path / "alpaca.jsonl", rows)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_data.py"), "--dataset_path", str(path),
                             "--model_name_or_path", str(tiny_llama), "--block_size", "64", "--num_examples", "1",
                             "--cache_dir", str(tmp_path / "cache")],
                            env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    example = result.stdout.split("----- example 0")[1].split("\n", 1)[1].split("\n-----")[0]  # below the header
    marked = re.findall(r"\[\[(.*?)\]\]", example, flags=re.S)
    assert len(marked) == 1 and marked[0].strip() == "HAMLET</s>"  # the response and EOS, nothing else
    prompt = example.split("[[")[0]
    assert "Name the speaker of this line.\nTo be, or not to be" in prompt and "### Assistant:" in prompt
    assert "JULIET" not in result.stdout  # one example asked for
    counts = result.stdout.strip().splitlines()[-1]
    assert re.match(r"----- 2 examples of 64 tokens: \d+ tokens, \d+ with loss, padding \d+\.\d% of the blocks", counts)


def _tokenize_on_rank(rank: int, world: int, init_file: str, dataset: str, tokenizer_dir: str, cache: str,
                      results) -> None:
    """One rank of a real gloo group loading the dataset; records how many records it encoded."""
    import torch.distributed as torch_dist
    from transformers import AutoTokenizer

    import owlore_ds.data.tokenize as tokenize_module

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    encoded = []
    original = tokenize_module.encode_records

    def counting(kind, records, *args, **kwargs):
        encoded.append(len(records))
        return original(kind, records, *args, **kwargs)

    tokenize_module.encode_records = counting
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    data = load_training_data(dataset, tokenizer, tokenizer_dir, 64, cache, vocab_size=len(tokenizer))
    rows = data.batch(torch.arange(len(data)))
    results[rank] = (encoded, rows["input_ids"], rows["labels"])
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["text2text", "text_only"])
def test_the_ranks_of_a_node_share_the_tokenizing_and_write_one_cache(tmp_path, tokenizer, tokenizer_dir, task_data,
                                                                        kind):
    """3 ranks, one host, one cache folder: each encodes a third of the records, the cache is
    written once (no share files left) and holds what one process alone tokenizes."""
    import torch.multiprocessing as mp

    if kind == "text2text":
        dataset = task_data
    else:
        texts = [line for line in (Path(__file__).resolve().parents[1] / "data" / "pretrain" / "train.txt")
                 .read_text(encoding="utf-8").splitlines() if line.strip()][:300]
        dataset = _write(tmp_path / "texts.json", {"type": "text_only", "instances": [{"text": t} for t in texts]})
    records = len(read_records(str(dataset))[1])
    alone = load_training_data(str(dataset), tokenizer, str(tokenizer_dir), 64, str(tmp_path / "alone"),
                               vocab_size=len(tokenizer))
    alone = alone.batch(torch.arange(len(alone)))
    results = mp.Manager().dict()
    cache = tmp_path / "shared"
    mp.spawn(_tokenize_on_rank, args=(3, str(tmp_path / "init"), str(dataset), str(tokenizer_dir), str(cache), results),
             nprocs=3)
    shares = [results[rank][0] for rank in range(3)]
    assert shares == [[records * (r + 1) // 3 - records * r // 3] for r in range(3)]
    for rank in range(3):
        assert torch.equal(results[rank][1], alone["input_ids"]) and torch.equal(results[rank][2], alone["labels"])
    written = list((cache / "tokenized").iterdir())
    assert len(written) == 1 and (written[0] / "meta.json").is_file()  # the cache alone, no shares left
