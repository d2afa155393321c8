"""The compact tokenized cache of the small formats: memory-mapped, keyed by all it depends on,
and giving exactly the rows of the dense builder (assemble_rows / pack_examples)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from owlore_ds.data import CompactRows, load_training_data, read_records, tokenize_records
from owlore_ds.data.tokenize import cache_key
from owlore_ds.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _dataset(kind: str, folder: Path, tokenizer) -> Path:
    """A file of each kind, with examples of many lengths (some longer than a block)."""
    lines = [line for line in (ROOT / "data" / "pretrain" / "train.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()][:240]
    if kind == "text_only":
        instances = [{"text": line} for line in lines]
    elif kind == "text2text":
        instances = [{"input": a, "output": " " + b} for a, b in zip(lines[::2], lines[1::2])]
    elif kind == "conversation":
        instances = [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b},
                                   {"role": "user", "content": "Again?"}, {"role": "assistant", "content": a[:20]}]}
                     for a, b in zip(lines[::2], lines[1::2])]
    else:  # pre-tokenized, with labels that are not the tokens in some rows (a shifted copy), none in others
        generator = np.random.default_rng(0)
        instances = []
        for i in range(120):
            ids = generator.integers(3, len(tokenizer), size=int(generator.integers(2, 90))).tolist()
            if i % 3 == 0:
                instances.append({"input_ids": ids})
            else:
                instances.append({"input_ids": ids, "labels": ([-100] * (i % 5) + ids)[: len(ids)]})
    if kind == "tokenized":  # rows only (LMFlow's JSON has no such type)
        path = folder / "tokenized.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in instances), encoding="utf-8")
        return path
    path = folder / f"{kind}.json"
    path.write_text(json.dumps({"type": kind, "instances": instances}), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind, packing", [("text_only", False), ("text2text", False), ("text2text", True),
                                           ("conversation", False), ("conversation", True), ("tokenized", False),
                                           ("tokenized", True)])
def test_the_memory_mapped_cache_gives_the_rows_of_the_dense_builder(tmp_path, tokenizer, tokenizer_dir, kind,
                                                                      packing):
    path = _dataset(kind, tmp_path, tokenizer)
    block = 64
    data = load_training_data(str(path), tokenizer, str(tokenizer_dir), block, str(tmp_path / "cache"),
                              len(tokenizer), packing=packing)
    dense = tokenize_records(*read_records(str(path))[:2], tokenizer, block, packing=packing)
    assert isinstance(data, CompactRows) and len(data) == len(dense) > 10
    tokens = data._tokens
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16  # a 512-token vocabulary: 2 bytes a token
    assert ("labels" in [p.stem for p in Path(tokens.filename).parent.iterdir()]) == (kind == "tokenized")
    every = torch.arange(len(data))
    shuffled = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:17]
    for rows in (every, shuffled, shuffled[:1]):
        batch, expected = data.batch(rows), dense.batch(rows)
        assert batch.keys() == expected.keys() and ("position_ids" in batch) == packing
        for name, tensor in expected.items():
            assert batch[name].dtype == torch.long and torch.equal(batch[name], tensor), name
        assert data.target_count(rows) == dense.target_count(rows) > 0
        assert data.token_count(rows) == dense.token_count(rows)
    assert data.num_tokens() == dense.num_tokens()
    for start, length in ((0, 100), (37, 333), (dense.num_tokens() - 50, 50)):
        assert torch.equal(data.tokens(start, length), dense.tokens(start, length))


def test_changing_the_chat_template_or_any_key_part_changes_the_cache_key(tmp_path, tokenizer_dir, task_data):
    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, folder)
    files = [str(task_data)]
    key = cache_key(files, str(folder), 64)
    assert cache_key(files, str(folder), 64) == key
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8") + "{# another template #}", encoding="utf-8")
    changed = cache_key(files, str(folder), 64)
    assert changed != key
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert cache_key(files, str(folder), 64) not in (key, changed)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}), encoding="utf-8")
    assert len({cache_key(files, str(folder), 64), cache_key(files, str(folder), 64, packing=True),
                cache_key(files, str(folder), 32), cache_key(files, str(folder), 64), changed, key}) == 5
    (folder / "model.safetensors").write_bytes(b"weights change nothing of the tokens")
    assert cache_key(files, str(folder), 64) == cache_key(files, str(folder), 64)


def test_a_second_load_reads_the_cache_and_a_new_template_writes_another(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    path = _dataset("conversation", tmp_path, tokenizer)
    cache = tmp_path / "cache"
    first = load_training_data(str(path), tokenizer, str(folder), 64, str(cache), len(tokenizer))
    entries = list((cache / "tokenized").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == [
        "loss.npy", "meta.json", "offsets.npy", "targets.npy", "tokens.npy"]
    stamp = entries[0].stat().st_mtime_ns
    again = load_training_data(str(path), tokenizer, str(folder), 64, str(cache), len(tokenizer))
    assert entries[0].stat().st_mtime_ns == stamp and list((cache / "tokenized").iterdir()) == entries
    assert torch.equal(again.batch(torch.arange(len(again)))["labels"], first.batch(torch.arange(len(first)))["labels"])
    # A template that marks the assistant turn differently: a new cache, other rows.
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace("Assistant", "Answer"), encoding="utf-8")
    assert "Answer" in template.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    other = load_training_data(str(path), tokenizer, str(folder), 64, str(cache), len(tokenizer))
    assert len(list((cache / "tokenized").iterdir())) == 2
    assert not torch.equal(other.batch(torch.arange(4))["input_ids"], first.batch(torch.arange(4))["input_ids"])


def test_ids_outside_the_vocabulary_are_refused_and_wide_ids_kept_whole(tmp_path, tokenizer, tokenizer_dir):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"input_ids": [5, 70000, 7]}) + "\n" + json.dumps({"input_ids": [5, 6]}), encoding="utf-8")
    with pytest.raises(UserInputError, match="token id 70000 is outside the model's vocabulary of 512"):
        load_training_data(str(path), tokenizer, str(tokenizer_dir), 16, str(tmp_path / "c"), 512)
    wide = load_training_data(str(path), tokenizer, str(tokenizer_dir), 16, str(tmp_path / "c"), 100_000)
    assert wide._tokens.dtype == np.int32  # 70000 does not fit in uint16
    assert wide.batch(torch.arange(2))["input_ids"][:, :3].tolist() == [[5, 70000, 7], [5, 6, tokenizer.pad_token_id]]
    path.write_text(json.dumps({"input_ids": [5, -3, 7]}), encoding="utf-8")
    with pytest.raises(UserInputError, match="token id -3 is outside the model's vocabulary"):
        load_training_data(str(path), tokenizer, str(tokenizer_dir), 16, str(tmp_path / "c"), 512)
