"""--streaming: a datasets folder (or .jsonl) read, tokenized and packed while training.

The streamed windows are checked against the indexed path on the same corpus preprocessed by
tools/preprocess_data.py (an independent route to the same token stream), and training
against itself on 1 and 2 ranks and after a kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, assert_same_weights, base_env, common_args, final_weights, run_training,
                      straight_and_killed_runs)
from owlore_ds.data import StreamingBatches, load_training_data
from owlore_ds.errors import UserInputError
from owlore_ds.metrics import read_metrics
from test_bad_input import _expect_error


def _texts(count: int, lines_per_document: int = 3) -> list[str]:
    lines = [l for l in (ROOT / "data" / "pretrain" / "train.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    texts = [" ".join(lines[i * lines_per_document : (i + 1) * lines_per_document]) for i in range(count)]
    texts[3] = ""  # an empty document: no tokens, no EOS (Megatron skips it)
    return texts


def _save(folder: Path, texts: list[str], column: str = "text") -> Path:
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(texts))), column: texts}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path, Path]:
    """The same 120 documents as a datasets folder and as .jsonl, and the jsonl preprocessed into shards."""
    folder = tmp_path_factory.mktemp("streaming")
    texts = _texts(120)
    hf = _save(folder / "hf", texts)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
    prefix = folder / "shards" / "corpus"
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl), "--tokenizer",
                    str(tokenizer_dir), "--output_prefix", str(prefix)], env=base_env(), cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    return hf, jsonl, prefix


def _stream(path: Path, tokenizer, batch: int, shuffle: bool, chunk: int, block: int = 32,
            document_attention: bool = False) -> StreamingBatches:
    stream = StreamingBatches(str(path), "text", tokenizer, block, len(tokenizer), batch, seed=7, shuffle=shuffle,
                              chunk_windows=chunk, document_attention=document_attention)
    stream.start()
    return stream


def _batches(stream: StreamingBatches, first: int, count: int, key: str = "input_ids") -> list[torch.Tensor]:
    return [stream.data.batch(stream.rows(step))[key] for step in range(first, first + count)]


def test_streamed_windows_are_the_preprocessed_corpus_windows(corpus, tokenizer, tokenizer_dir, tmp_path):
    hf, jsonl, prefix = corpus
    indexed = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 32, str(tmp_path), len(tokenizer))
    windows = indexed.batch(torch.arange(len(indexed)))["input_ids"]
    n = len(windows)
    assert n > 40
    steps = n // 4 + 3  # into the second epoch
    for path in (hf, jsonl):
        got = torch.cat(_batches(_stream(path, tokenizer, 4, shuffle=False, chunk=7), 0, steps))
        # Epoch 1: the stream's windows in order; then the stream again from its first token
        # (the tail shorter than a window dropped), as the indexed path's epochs.
        assert torch.equal(got[:n], windows), path
        assert torch.equal(got[n:], windows[: len(got) - n]), path
    # Shuffled: each chunk of 7 windows of the stream, permuted; different seeds per chunk.
    shuffled = torch.cat(_batches(_stream(hf, tokenizer, 4, shuffle=True, chunk=7), 0, steps))
    for lo in range(0, n - n % 7, 7):
        chunk, plain = shuffled[lo : lo + 7], windows[lo : lo + 7]
        assert sorted(map(tuple, chunk.tolist())) == sorted(map(tuple, plain.tolist()))
    assert not torch.equal(shuffled[:n], windows)
    # Epoch 2 is shuffled differently from epoch 1 (chunk numbers go on counting).
    tail = n % 7
    assert sorted(map(tuple, shuffled[n - tail : n].tolist())) == sorted(map(tuple, windows[n - tail :].tolist()))
    assert not torch.equal(shuffled[n : n + 7], shuffled[:7])
    assert sorted(map(tuple, shuffled[n : n + 7].tolist())) == sorted(map(tuple, windows[:7].tolist()))
    # Calibration (OWL) reads the stream's first chunk of tokens, unshuffled.
    stream = _stream(hf, tokenizer, 4, shuffle=True, chunk=7)
    assert stream.data.num_tokens() == 7 * 32
    assert torch.equal(stream.data.tokens(40, 100), windows.flatten()[40:140])


def test_document_attention_positions_are_the_indexed_paths(corpus, tokenizer, tokenizer_dir, tmp_path):
    hf, _, prefix = corpus
    indexed = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 32, str(tmp_path), len(tokenizer),
                                 packing_attention="document")
    expected = indexed.batch(torch.arange(len(indexed)))
    n = len(indexed)
    plain = _stream(hf, tokenizer, 4, shuffle=False, chunk=7, document_attention=True)
    positions = torch.cat(_batches(plain, 0, n // 4 + 3, "position_ids"))
    assert torch.equal(positions[:n], expected["position_ids"])
    assert torch.equal(positions[n:], expected["position_ids"][: len(positions) - n])
    assert int((positions[:n] == 0).sum()) > n + 20  # documents do begin inside windows
    # Shuffled, each window keeps its own positions.
    by_window = {tuple(w): p for w, p in zip(expected["input_ids"].tolist(), expected["position_ids"])}
    shuffled = _stream(hf, tokenizer, 4, shuffle=True, chunk=7, document_attention=True)
    for _ in range(5):
        batch = shuffled.data.batch(shuffled.rows(shuffled.next_step))
        for window, position in zip(batch["input_ids"].tolist(), batch["position_ids"]):
            assert torch.equal(position, by_window[tuple(window)])


@pytest.mark.parametrize("resume_at", [3, 11, 13])
def test_a_stream_started_from_a_saved_position_goes_on_as_the_straight_one(corpus, tokenizer, resume_at):
    """The state after step k (mid-chunk, at an epoch's end, in the second epoch) starts a new reader
    that hands out the same batches as the straight one, with another global batch split too."""
    hf, _, _ = corpus
    straight = _stream(hf, tokenizer, 4, shuffle=True, chunk=5)
    _batches(straight, 0, resume_at)
    state = json.loads(json.dumps(straight.state()))  # as the checkpoint stores it
    expected = _batches(straight, resume_at, 8)
    resumed = StreamingBatches(str(hf), "text", tokenizer, 32, len(tokenizer), 4, seed=7, shuffle=True, chunk_windows=5)
    resumed.start(state, resume_at)
    assert all(torch.equal(a, b) for a, b in zip(_batches(resumed, resume_at, 8), expected))
    with pytest.raises(RuntimeError, match="in order"):
        resumed.rows(0)


@pytest.mark.parametrize("attention", ["causal", "document"])
def test_streamed_training_is_indexed_training_of_the_preprocessed_corpus(corpus, tiny_llama, tmp_path, attention):
    """With --no_shuffle the streamed run trains on the indexed run's windows: the same losses and weights."""
    hf, _, prefix = corpus
    streamed, indexed = tmp_path / "streamed", tmp_path / "indexed"
    args = dict(block_size=32, per_device_train_batch_size=4, max_steps=3, no_shuffle=True, packing_attention=attention)
    run_training(common_args(tiny_llama, hf, streamed, streaming=True, **args))
    run_training(common_args(tiny_llama, prefix, indexed, **args))
    assert [m["loss"] for m in read_metrics(streamed)] == [m["loss"] for m in read_metrics(indexed)]
    assert_same_weights(final_weights(streamed), final_weights(indexed), atol=0)


def test_streaming_trains_alike_on_one_and_two_ranks_and_after_a_kill(tmp_path_factory, tiny_llama, tmp_path):
    """A corpus of ~13 windows of 32, chunks of 5, global batch 4: batches span chunks and epochs."""
    hf = _save(tmp_path_factory.mktemp("small") / "hf", _texts(12))
    args = dict(block_size=32, max_steps=6, save_steps=2, streaming=True, streaming_shuffle_windows=5,
                resume_from_checkpoint="auto")
    straight, resumed = straight_and_killed_runs(tiny_llama, hf, tmp_path, nproc=2, kill_after=2,
                                                 per_device_train_batch_size=1, gradient_accumulation_steps=2, **args)
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)
    state = json.loads((straight / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stream"]["chunk"] >= 1  # the kill came after the first chunk was used up
    assert json.loads((straight / "checkpoint-6" / "trainer_state.json").read_text())["epoch"] >= 1
    one = tmp_path / "one"
    run_training(common_args(tiny_llama, hf, one, per_device_train_batch_size=4, **args))
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(straight)], rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(straight))
    # The 2-rank checkpoint resumed on 1 rank: the stream position is global.
    moved = tmp_path / "moved"
    result = run_training(common_args(tiny_llama, hf, moved, per_device_train_batch_size=4,
                                      **{**args, "resume_from_checkpoint": straight / "checkpoint-2"}))
    assert "resumed from" in result.stdout + result.stderr
    assert [m["loss"] for m in read_metrics(moved)] == pytest.approx([m["loss"] for m in read_metrics(straight)][2:],
                                                                     rel=1e-5)
    assert_same_weights(final_weights(moved), final_weights(straight))


def test_bad_streaming_input_is_one_line(tmp_path, tiny_llama, tokenizer):
    hf = _save(tmp_path / "hf", _texts(8), column="body")
    out = tmp_path / "out"
    _expect_error(common_args(tiny_llama, hf, out, streaming=True, max_steps=None), out, "--streaming", "--max_steps")
    _expect_error(common_args(tiny_llama, hf, out, streaming=True), out, "no column 'text' (--text_key)", "body")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.csv").write_text("a,b\n")
    _expect_error(common_args(tiny_llama, tmp_path / "other", out, streaming=True), out, "--dataset_path",
                  "datasets folder")
    _save(tmp_path / "tiny", ["To be."] + [""] * 3)
    with pytest.raises(UserInputError, match="fewer than one window of 32"):
        _stream(tmp_path / "tiny", tokenizer, 4, shuffle=True, chunk=5)
    _expect_error(common_args(tiny_llama, hf, out, streaming=True, text_key="body", packing=True), out,
                  "--streaming", "--packing")
    assert not out.exists()


def test_preprocess_reads_a_datasets_folder_as_its_jsonl(corpus, tokenizer_dir, tmp_path):
    """tools/preprocess_data.py --input on the datasets folder writes the shards its .jsonl twin gave."""
    hf, _, prefix = corpus
    out = tmp_path / "from_hf"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(hf),
                             "--tokenizer", str(tokenizer_dir), "--output_prefix", str(out), "--workers", "2"],
                            env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for suffix in (".bin", ".idx"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(hf),
                             "--tokenizer", str(tokenizer_dir), "--output_prefix", str(tmp_path / "bad"),
                             "--text_key", "body"], env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--input" in result.stderr and "no column 'body' (--text_key)" in result.stderr
    assert not list(tmp_path.glob("bad*"))


def test_inspect_data_shows_the_streams_first_windows(corpus, tiny_llama, tokenizer):
    hf, _, prefix = corpus
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_data.py"), "--dataset_path", str(hf),
                             "--model_name_or_path", str(tiny_llama), "--streaming", "--block_size", "32",
                             "--num_examples", "2"], env=base_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    from owlore_ds.data.indexed import IndexedDataset

    stream = [t for i in range(len(IndexedDataset(str(prefix)))) for t in IndexedDataset(str(prefix))[i].tolist()]
    first = tokenizer.decode(stream[1:32])  # the first token is never predicted, so it is outside the marks
    assert "----- example 0 (32 tokens, 31 with loss" in result.stdout and first.strip()[:20] in result.stdout
    assert "----- 2 examples of 32 tokens: 64 tokens, 62 with loss, padding 0.0%" in result.stdout
