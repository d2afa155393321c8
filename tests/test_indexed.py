"""Megatron-LM indexed datasets: the preprocessing tool, the memory-mapped reader, and training from shards.

The shards the trainer reads are written here by an independent implementation of the
documented layout (struct + numpy), not by owlore_ds's writer, and the tool's output is
read back the same independent way.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (ROOT, assert_same_weights, base_env, common_args, final_weights, run_training,
                      straight_and_killed_runs)
from owlore_ds.data import GlobalBatches, calibration_windows, load_training_data
from owlore_ds.errors import UserInputError
from owlore_ds.data.indexed import IndexedDataset
from owlore_ds.metrics import read_metrics

CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def write_megatron(prefix: Path, documents: list[list[list[int]]], dtype=np.uint16) -> None:
    """Megatron's layout from its documentation: each document a list of sequences."""
    lengths = [len(seq) for doc in documents for seq in doc]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<i8") * np.dtype(dtype).itemsize
    doc_index = np.cumsum([0] + [len(doc) for doc in documents]).astype("<i8")
    with open(f"{prefix}.bin", "wb") as fh:
        for doc in documents:
            for seq in doc:
                fh.write(np.asarray(seq, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00")
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", CODES[np.dtype(dtype)]))
        fh.write(struct.pack("<Q", len(lengths)))
        fh.write(struct.pack("<Q", len(doc_index)))
        fh.write(np.asarray(lengths, dtype="<i4").tobytes())
        fh.write(pointers.tobytes())
        fh.write(doc_index.tobytes())


def read_megatron(prefix: Path) -> tuple[np.dtype, list[np.ndarray], np.ndarray]:
    """(token dtype, sequences, document indices), parsed from the documented layout."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", raw[9:17])[0] == 1
    dtype = {8: np.dtype("<u2"), 4: np.dtype("<i4")}[raw[17]]
    sequences, documents = struct.unpack("<QQ", raw[18:34])
    lengths = np.frombuffer(raw, "<i4", sequences, 34)
    pointers = np.frombuffer(raw, "<i8", sequences, 34 + 4 * sequences)
    doc_index = np.frombuffer(raw, "<i8", documents, 34 + 12 * sequences)
    assert len(raw) == 34 + 12 * sequences + 8 * documents
    data = Path(f"{prefix}.bin").read_bytes()
    seqs = [np.frombuffer(data, dtype, n, p) for n, p in zip(lengths, pointers)]
    return dtype, seqs, doc_index


def _corpus_documents(tokenizer, count: int = 40) -> list[list[list[int]]]:
    """Real text tokenized, ending in EOS, some documents split into two sequences."""
    lines = [l for l in (ROOT / "data" / "pretrain" / "train.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    documents = []
    for i in range(count):
        ids = tokenizer(" ".join(lines[i * 3 : i * 3 + 3]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        documents.append([ids[:5], ids[5:]] if i % 3 == 0 and len(ids) > 6 else [ids])
    return documents


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer) -> tuple[Path, list[int]]:
    """An independently written prefix, and its token stream."""
    documents = _corpus_documents(tokenizer)
    prefix = tmp_path_factory.mktemp("shards") / "corpus_text_document"
    write_megatron(prefix, documents)
    return prefix, [t for doc in documents for seq in doc for t in seq]


def test_reader_cuts_the_stream_of_sequences_into_windows(shards, tokenizer, tokenizer_dir, tmp_path):
    prefix, stream = shards
    data = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 32, str(tmp_path / "cache"), len(tokenizer))
    assert len(data) == len(stream) // 32 and not (tmp_path / "cache").exists()
    rows = torch.tensor([3, 0, len(data) - 1])
    batch = data.batch(rows)
    for i, row in enumerate(rows.tolist()):
        assert batch["input_ids"][i].tolist() == stream[row * 32 : (row + 1) * 32]
    assert batch["input_ids"].dtype == torch.int64 and torch.equal(batch["labels"], batch["input_ids"])
    assert bool(batch["attention_mask"].all()) and data.target_count(rows) == 3 * 31 and data.token_count(rows) == 96
    assert data.tokens(5, 100).tolist() == stream[5:105]
    # Nothing is copied: the sequences are views of the memory map.
    assert not data.dataset.get(0).flags.owndata


@pytest.mark.parametrize("layout", ["back to back", "with gaps and empty sequences"])
def test_windows_follow_the_sequences_in_index_order_whatever_their_place_in_the_bin(tmp_path, layout):
    """Windows are found by searching the index's byte pointers (Megatron's back-to-back layout)
    or, for an index whose sequences are not back to back, offsets computed from the lengths."""
    from owlore_ds.data import PackedWindows

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 1000, size=n).tolist() for n in (7, 0, 13, 1, 30, 0, 0, 9, 25)]
    stream = [t for seq in sequences for t in seq]
    prefix = tmp_path / "corpus"
    if layout == "back to back":
        write_megatron(prefix, [[seq] for seq in sequences])
    else:  # each sequence after a gap of 3 tokens, written out of the index's order
        pointers, data = [], bytearray()
        for seq in reversed(sequences):
            data += np.zeros(3, "<u2").tobytes()
            pointers.append(len(data))
            data += np.asarray(seq, "<u2").tobytes()
        pointers.reverse()
        Path(f"{prefix}.bin").write_bytes(bytes(data))
        with open(f"{prefix}.idx", "wb") as fh:
            fh.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sequences), len(sequences) + 1))
            fh.write(np.asarray([len(seq) for seq in sequences], "<i4").tobytes())
            fh.write(np.asarray(pointers, "<i8").tobytes())
            fh.write(np.arange(len(sequences) + 1, dtype="<i8").tobytes())
    windows = PackedWindows(IndexedDataset(str(prefix)), 8, 1000, document_attention=True)
    assert len(windows) == len(stream) // 8
    for row in range(len(windows)):
        assert windows.window(row).tolist() == stream[row * 8 : (row + 1) * 8]
    starts = np.cumsum([0] + [len(seq) for seq in sequences])[:-1]
    for row in range(len(windows)):
        restarts = {0} | {int(p) - row * 8 for p in starts if row * 8 < p < (row + 1) * 8}
        positions = windows.window_positions(row).tolist()
        assert {i for i, p in enumerate(positions) if p == 0} == restarts, row
    assert windows.tokens(3, 60).tolist() == stream[3:63]


def test_calibration_windows_come_from_the_packed_stream(shards, tokenizer, tokenizer_dir, tmp_path):
    prefix, stream = shards
    data = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 32, str(tmp_path / "cache"), len(tokenizer))
    assert calibration_windows(data, 3, 40, seed=0, sequential=True).tolist() == [stream[i * 40 : (i + 1) * 40] for i in range(3)]
    drawn = calibration_windows(data, 5, 40, seed=1, sequential=False)
    starts = [next(s for s in range(len(stream)) if stream[s : s + 40] == row) for row in drawn.tolist()]
    assert len(set(starts)) > 1


def test_int32_shards_and_bad_files(tmp_path, tokenizer, tokenizer_dir):
    prefix = tmp_path / "wide"
    write_megatron(prefix, [[[70000, 1, 2]], [[3, 4]]], dtype=np.int32)
    dataset = IndexedDataset(str(prefix))
    assert dataset.dtype == np.int32 and dataset[0].tolist() == [70000, 1, 2] and dataset.num_documents == 2
    data = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 2, str(tmp_path / "cache"), len(tokenizer))
    with pytest.raises(UserInputError, match="token id 70000 .* outside the model's vocabulary"):
        data.batch(torch.tensor([0]))
    Path(f"{prefix}.bin").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(UserInputError, match=r"wide.idx exists but .*wide.bin does not"):
        load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 2, str(tmp_path / "cache"), len(tokenizer))
    (tmp_path / "elsewhere.bin").rename(f"{prefix}.bin")
    Path(f"{prefix}.idx").write_bytes(b"NOTMEGATRON" + bytes(40))
    with pytest.raises(UserInputError, match=r"wide.idx: not a Megatron indexed dataset"):
        IndexedDataset(str(prefix))
    write_megatron(prefix, [[[1, 2, 3, 4]]])
    Path(f"{prefix}.bin").write_bytes(b"\x01\x00")
    with pytest.raises(UserInputError, match=r"wide.bin: 2 bytes, but .* up to byte 8"):
        IndexedDataset(str(prefix))


def test_preprocess_tool_writes_megatrons_layout_with_eod(tmp_path, tokenizer, tokenizer_dir):
    texts = ["To be, or not to be, that is the question:", "", "Whether 'tis nobler in the mind to suffer"] * 30
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    (corpus / "b.txt").write_text("The slings and arrows of outrageous fortune,\nOr to take arms", encoding="utf-8")
    prefix = tmp_path / "out" / "corpus"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
                             "--tokenizer", str(tokenizer_dir), "--output_prefix", str(prefix), "--workers", "2",
                             "--text_key", "body"], env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s" in result.stdout and "61 documents" in result.stdout  # the empty ones skipped
    dtype, sequences, doc_index = read_megatron(prefix)
    expected = [t for t in texts if t] + [(corpus / "b.txt").read_text(encoding="utf-8")]
    assert dtype == np.dtype("<u2") and doc_index.tolist() == list(range(len(expected) + 1))
    eos = tokenizer.eos_token_id
    assert [s.tolist() for s in sequences] == [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in expected]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.bin", "corpus.idx"]  # no temporary files left
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text"}\n')
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(bad),
                             "--tokenizer", str(tokenizer_dir), "--output_prefix", str(tmp_path / "bad"), "--workers", "1"],
                            env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "bad.jsonl: line 2 has no string 'text'" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("bad.*")) == ["bad.jsonl"]  # nothing partial left


def test_a_killed_preprocessing_continues_where_it_stopped_and_writes_what_a_straight_run_writes(tmp_path,
                                                                                                tokenizer_dir):
    import signal
    import time

    lines = [line for line in (ROOT / "data" / "pretrain" / "train.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"{i}: {lines[i % len(lines)]}"}) for i in range(40000)))

    def command(prefix):
        return [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus), "--tokenizer",
                str(tokenizer_dir), "--output_prefix", str(prefix), "--workers", "2", "--checkpoint_seconds", "0"]

    straight = tmp_path / "straight" / "corpus"
    subprocess.run(command(straight), env=base_env(), cwd=ROOT, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed" / "corpus"
    process = subprocess.Popen(command(killed), env=base_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    progress = Path(f"{killed}.progress.json")
    while not (progress.exists() and json.loads(progress.read_text())["documents_read"] >= 1024):
        assert process.poll() is None, "finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not Path(f"{killed}.idx").exists()
    result = subprocess.run(command(killed), env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "input documents already done" in result.stdout
    for suffix in (".bin", ".idx"):
        assert Path(f"{killed}{suffix}").read_bytes() == Path(f"{straight}{suffix}").read_bytes(), suffix
    assert sorted(p.name for p in killed.parent.iterdir()) == ["corpus.bin", "corpus.idx"]


def test_first_step_loss_is_the_models_loss_on_the_first_windows(shards, tiny_llama, tmp_path):
    prefix, stream = shards
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, prefix, out, block_size=32, per_device_train_batch_size=4, max_steps=2,
                             no_shuffle=True))
    first = read_metrics(out)[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True)
    ids = torch.tensor(stream[: 4 * 32]).view(4, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert first["loss"] == pytest.approx(expected, rel=1e-5) and first["tokens"] == 4 * 32


def test_one_rank_equals_two_ranks_on_shards(shards, tiny_llama, tmp_path):
    prefix, _ = shards
    one, two = tmp_path / "one", tmp_path / "two"
    for order in prefix.parent.glob(f"{prefix.name}.order.*.npy"):
        order.unlink()  # so that the 2-rank run builds it: one rank writes while the other waits
    run_training(common_args(tiny_llama, prefix, two, block_size=32, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=3), nproc=2)
    run_training(common_args(tiny_llama, prefix, one, block_size=32, per_device_train_batch_size=4, max_steps=3))
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(two)], rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(two))
    # Both runs shuffled with the epoch's permutation kept beside the shards (one file: seed 7, epoch 0).
    assert len(list(prefix.parent.glob(f"{prefix.name}.order.*.npy"))) == 1


def _blend_shards(folder: Path) -> tuple[Path, Path]:
    """Two prefixes whose windows of 8 tokens are told apart by their token values."""
    first, second = folder / "first", folder / "second"
    write_megatron(first, [[[10 + (i % 50)] * 8] for i in range(70)])  # window i of `first` is 8 x (10 + i%50)
    write_megatron(second, [[[100 + i % 100] * 4, [100 + i % 100] * 4] for i in range(60)])
    return first, second


def test_data_mix_interleaves_in_the_weights_without_repeating(tmp_path, tokenizer, tokenizer_dir):
    first, second = _blend_shards(tmp_path)
    data = load_training_data(f"{first}:0.7,{second}:0.3", tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"),
                              vocab_size=1000)
    assert len(data) == 100  # all 70 windows of `first`, 30 of the 60 of `second`
    heads = data.batch(torch.arange(100))["input_ids"][:, 0].tolist()
    from_first = [h < 100 for h in heads]
    for end in range(10, 101, 10):  # every stretch of ten holds seven of `first`
        assert sum(from_first[:end]) == 7 * end // 10
    assert [h for h in heads if h < 100] == [10 + i % 50 for i in range(70)]
    assert [h for h in heads if h >= 100] == [100 + i for i in range(0, 60, 2)]  # spread over all of `second`
    assert data.tokens(4, 8).tolist() == [heads[0]] * 4 + [heads[1]] * 4
    for spec, message in ((f"{first}:0.7,{second}:x", "is not PREFIX:WEIGHT"), (f"{first}:0,{second}:1", "above 0"),
                          (f"{first}:1,{tmp_path / 'nowhere'}:1", "nowhere.idx and .*nowhere.bin do not both exist")):
        with pytest.raises(UserInputError, match=message):
            load_training_data(spec, tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"), vocab_size=1000)


def test_sample_indices_are_built_once_beside_the_data_and_memory_mapped(tmp_path, tokenizer, tokenizer_dir):
    """The blend's order and each epoch's shuffle: files beside the first prefix, opened
    memory-mapped, equal to the order built in memory, reused by the next load, and new
    ones for another seed or changed data."""
    from owlore_ds.data import BlendedWindows, GlobalBatches

    first, second = _blend_shards(tmp_path)
    mix = f"{first}:0.7,{second}:0.3"

    def load():
        return load_training_data(mix, tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"), vocab_size=1000)

    def order(data, seed: int, cached: bool = True) -> torch.Tensor:  # 25 steps of 10 rows: 3 epochs
        batches = GlobalBatches(len(data), 10, seed, shuffle=True, sample_index=data.sample_index if cached else None)
        return torch.cat([batches.rows(step) for step in range(25)])

    data = load()
    cached = order(data, 3)
    assert isinstance(data.picks, np.memmap)
    assert np.array_equal(data.picks, BlendedWindows(data.parts, [0.7, 0.3]).picks)  # built in memory, no cache
    assert torch.equal(cached, order(data, 3, cached=False))
    files = {path: path.stat().st_mtime_ns for path in tmp_path.glob("first.*.npy")}
    assert sorted(path.name.split(".")[1] for path in files) == ["blend", "order", "order", "order"]
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "c").exists()
    again = load()
    assert torch.equal(order(again, 3), cached) and torch.equal(again.batch(cached)["input_ids"],
                                                                 data.batch(cached)["input_ids"])
    assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("first.*.npy")} == files  # read, not rebuilt
    other_seed = order(again, 4)
    new = sorted(set(tmp_path.glob("first.*.npy")) - set(files))
    assert len(new) == 3 and not torch.equal(other_seed, cached)
    assert all(not np.array_equal(np.load(path), np.load(old)) for path in new for old in files if "order" in old.name)
    second_idx = Path(f"{second}.idx")
    stamp = second_idx.stat().st_mtime_ns
    os.utime(second_idx, ns=(stamp + 10**9, stamp + 10**9))  # the data changed: the blend is rebuilt
    load()
    assert len([path for path in tmp_path.glob("first.blend.*.npy")]) == 2


def test_sample_indices_of_data_in_a_read_only_folder_go_under_cache_dir(tmp_path, tokenizer, tokenizer_dir, caplog):
    import logging

    from owlore_ds.data import GlobalBatches

    data_folder = tmp_path / "data"
    data_folder.mkdir()
    first, second = _blend_shards(data_folder)
    if os.geteuid() == 0:  # root writes through permissions; an immutable folder stops it too
        if subprocess.run(["chattr", "+i", str(data_folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here to make a folder read-only for root")
        undo = ["chattr", "-i", str(data_folder)]
    else:
        data_folder.chmod(0o555)
        undo = ["chmod", "755", str(data_folder)]
    try:
        with caplog.at_level(logging.INFO, logger="owlore_ds.data.sample_index"):
            data = load_training_data(f"{first}:0.7,{second}:0.3", tokenizer, str(tokenizer_dir), 8,
                                      str(tmp_path / "c"), vocab_size=1000)
            rows = GlobalBatches(len(data), 10, 5, shuffle=True, sample_index=data.sample_index).rows(3)
    finally:
        subprocess.run(undo, check=True)
    assert torch.equal(rows, GlobalBatches(len(data), 10, 5, shuffle=True).rows(3))
    assert sorted(p.name.split(".")[1] for p in (tmp_path / "c" / "sample_index").iterdir()) == ["blend", "order"]
    assert not list(data_folder.glob("*.npy"))
    assert any("is not writable, kept under --cache_dir" in record.getMessage() for record in caplog.records)


def test_data_mix_trains_alike_on_one_and_two_ranks_and_after_a_kill(shards, tiny_llama, tmp_path):
    prefix, _ = shards
    second = tmp_path / "second"
    write_megatron(second, [[list(range(5, 200))]] * 4)
    mix = f"{prefix}:0.6,{second}:0.4"
    args = dict(block_size=32, max_steps=4, save_steps=2, dataset_path=None, data_mix=mix, resume_from_checkpoint="auto")
    straight, resumed = straight_and_killed_runs(tiny_llama, prefix, tmp_path, nproc=2, kill_after=2,
                                                 per_device_train_batch_size=1, gradient_accumulation_steps=2, **args)
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)
    one = tmp_path / "one"
    run_training(common_args(tiny_llama, prefix, one, per_device_train_batch_size=4, **args))
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(straight)], rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(straight))


def test_a_billion_token_corpus_is_read_without_a_copy(tmp_path, tokenizer, tokenizer_dir):
    """2 GB of tokens (a sparse file: nothing is written) in four documents; opening it and
    reading batches raises the resident memory by the pages read, not by the corpus."""
    prefix = tmp_path / "huge"
    per_document = 250_000_000
    write_megatron(prefix, [[[1]], [[1]], [[1]], [[1]]])  # the index of four 1-token documents...
    raw = bytearray(Path(f"{prefix}.idx").read_bytes())
    raw[34 : 34 + 16] = np.full(4, per_document, dtype="<i4").tobytes()  # ...grown to 250M tokens each
    raw[34 + 16 : 34 + 48] = (np.arange(4, dtype="<i8") * per_document * 2).tobytes()
    Path(f"{prefix}.idx").write_bytes(bytes(raw))
    with open(f"{prefix}.bin", "wb") as fh:
        fh.truncate(4 * per_document * 2)

    def resident() -> int:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024

    before = resident()
    data = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 2048, str(tmp_path / "c"), len(tokenizer))
    assert len(data) == 4 * per_document // 2048
    for start in (0, 122_069, len(data) - 8):  # the second batch crosses a document boundary
        batch = data.batch(torch.arange(start, start + 8))
        assert batch["input_ids"].shape == (8, 2048) and int(batch["input_ids"].sum()) == 0
    assert resident() - before < 64 * 2**20
    # Training reads shuffled windows all over the corpus; the pages it read are unmapped after
    # each batch (they stay in the page cache), so the resident set does not grow with the
    # corpus. Without that, every window would leave at least a page of P.bin, the index and
    # the sample order mapped: 400 batches of 8 windows, over 50 MiB.
    batches = GlobalBatches(len(data), 8, seed=3, shuffle=True, sample_index=data.sample_index)
    batches.rows(0)  # builds the epoch's order file (4 bytes a window) beside the data
    settled = resident()
    for step in range(400):
        data.batch(batches.rows(step))
    assert resident() - settled < 4 * 2**20
