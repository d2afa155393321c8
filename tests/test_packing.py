"""--packing (SFT examples several to a block, kept apart) and --packing_attention document
(indexed windows with per-document attention): the mask, the labels, the positions, a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_weights, common_args, final_weights, run_training
from owlore_ds.data import IGNORE_INDEX, load_training_data, pack_examples, read_records, tokenize_records
from owlore_ds.errors import UserInputError
from owlore_ds.metrics import read_metrics
from owlore_ds.modeling import document_attention_mask, model_inputs
from test_indexed import write_megatron


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of a row that begins where its position id is 0."""
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    return list(zip(starts, starts[1:]))


def test_document_mask_is_causal_and_block_diagonal():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = document_attention_mask(positions)[0, 0]
    documents = [0, 0, 0, 1, 1, 2]
    for q in range(6):
        for k in range(6):
            assert bool(mask[q, k]) == (k <= q and documents[k] == documents[q]), (q, k)
    additive = document_attention_mask(positions, "eager", torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, mask)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_example_logits_do_not_depend_on_the_other_examples_of_its_block(tiny_llama, attention, device):
    """The logits of example A are the same whatever shares its block, wherever A sits in
    it, and equal to those of A run alone (fp32 rounding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attention)
    model.eval().to(device)
    assert model.config._attn_implementation == attention
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def example(length: int) -> list[int]:
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    a, b, other_b = example(11), example(7), example(15)
    rows = pack_examples([a, b, other_b, a], [a, b, other_b, a], block_size=32, pad_id=0)
    # next-fit in order: [a b] (18 tokens); other_b (15) would overflow 32, so it starts [other_b a] (26)
    assert len(rows) == 2
    packed_again = pack_examples([b, a], [b, a], block_size=32, pad_id=0)
    changed = pack_examples([a, other_b], [a, other_b], block_size=32, pad_id=0)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a], device=device)).logits[0]
        seen = []
        for data, row, start in ((rows, 0, 0), (rows, 1, 15), (packed_again, 0, 7), (changed, 0, 0)):
            batch = {k: v.to(device) for k, v in data.batch(torch.tensor([row])).items()}
            assert batch["input_ids"][0, start : start + len(a)].tolist() == a
            logits = model(**model_inputs(model, batch)).logits[0]
            seen.append(logits[start : start + len(a)])
        # Without the mask, B after A changes nothing for A (causal) but A after B does:
        leaky = model(input_ids=packed_again.batch(torch.tensor([0]))["input_ids"].to(device)).logits[0, 7 : 7 + len(a)]
    for logits in seen:  # TF32 off by default in torch for fp32 matmuls, so fp32 rounding on CUDA too
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0], seen[3], rtol=0, atol=0 if device == "cpu" else 1e-6)  # B changed behind A
    assert (leaky - alone).abs().max() > 1e-3


def _text2text(path: Path, count: int = 12) -> Path:
    instances = [{"input": f"Who speaks line {i}?" + " Friends, Romans, countrymen" * (i % 4), "output": f" SPEAKER{i % 5}"}
                 for i in range(count)]
    path.write_text(json.dumps({"type": "text2text", "instances": instances}), encoding="utf-8")
    return path


def test_packing_keeps_the_labels_of_each_example_and_masks_prompts_padding_and_first_tokens(tmp_path, tokenizer):
    for kind, path in (("text2text", _text2text(tmp_path / "t.json")), ("conversation", tmp_path / "c.jsonl")):
        if kind == "conversation":
            rows = [{"instruction": f"Name speaker {i}", "input": "To be or not to be" * (1 + i % 2), "output": f"HAMLET {i}"}
                    for i in range(9)]
            path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
        kind_read, records, _ = read_records(str(path))
        padded = tokenize_records(kind_read, records, tokenizer, 128)
        packed = tokenize_records(kind_read, records, tokenizer, 128, packing=True)
        assert packed.position_ids is not None and len(packed) < len(padded)
        example = 0
        for row in range(len(packed)):
            segments = _segments(packed.position_ids[row])
            real = int(packed.attention_mask[row].sum())
            assert packed.attention_mask[row, :real].all() and not packed.attention_mask[row, real:].any()
            assert (packed.labels[row, real:] == IGNORE_INDEX).all()  # padding: no loss
            for start, end in segments:
                if start >= real:  # the padding's own run
                    assert end == 128
                    continue
                length = int(padded.attention_mask[example].sum())
                assert end - start == length
                assert torch.equal(packed.input_ids[row, start:end], padded.input_ids[example, :length])
                assert packed.labels[row, start] == IGNORE_INDEX  # never predicted from the previous example
                # Loss on exactly the tokens the padded path takes it on: prompts stay masked, targets do not.
                assert torch.equal(packed.labels[row, start + 1 : end], padded.labels[example, 1:length])
                example += 1
        assert example == len(padded)  # every example, in the data's order
        every = torch.arange(len(packed))
        assert packed.target_count(every) == padded.target_count(torch.arange(len(padded)))
        assert packed.token_count(every) == padded.token_count(torch.arange(len(padded)))


def test_packing_errors_name_the_flag(tmp_path, tokenizer, tokenizer_dir):
    text = tmp_path / "texts.json"
    text.write_text(json.dumps({"type": "text_only", "instances": [{"text": "To be or not to be"}] * 20}))
    with pytest.raises(UserInputError, match="--packing"):
        load_training_data(str(text), tokenizer, str(tokenizer_dir), 16, str(tmp_path / "c"), len(tokenizer), packing=True)
    with pytest.raises(UserInputError, match="--packing_attention document applies to indexed data"):
        load_training_data(str(_text2text(tmp_path / "t.json")), tokenizer, str(tokenizer_dir), 16, str(tmp_path / "c"),
                           len(tokenizer), packing_attention="document")


def test_indexed_document_attention_restarts_positions_at_document_boundaries_only(tmp_path, tokenizer, tokenizer_dir):
    # Documents of 5, 9 (two sequences: 4 + 5, no restart between them), 3, 20 and 7 tokens.
    documents = [[[11] * 5], [[12] * 4, [13] * 5], [[14] * 3], [[15] * 20], [[16] * 7]]
    prefix = tmp_path / "docs_text_document"
    write_megatron(prefix, documents)
    data = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"), len(tokenizer),
                              packing_attention="document")
    stream_starts = {0, 5, 14, 17, 37}
    batch = data.batch(torch.arange(len(data)))
    assert len(data) == 44 // 8
    for row in range(len(data)):
        expected, position = [], 0
        for offset in range(8):
            token = row * 8 + offset
            position = 0 if offset == 0 or token in stream_starts else position + 1
            expected.append(position)
        assert batch["position_ids"][row].tolist() == expected, row
    assert batch["labels"].tolist() == batch["input_ids"].tolist()  # every token keeps its loss
    causal = load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"), len(tokenizer))
    assert "position_ids" not in causal.batch(torch.arange(2))  # the default: one stream
    mix = load_training_data(f"{prefix}:0.5,{prefix}:0.5", tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"),
                             len(tokenizer), packing_attention="document")
    assert "position_ids" in mix.batch(torch.arange(2))
    with pytest.raises(UserInputError, match="--packing packs SFT examples"):
        load_training_data(str(prefix), tokenizer, str(tokenizer_dir), 8, str(tmp_path / "c"), len(tokenizer), packing=True)


def _check_trains_and_logs(out: Path, steps: int) -> None:
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["run_identity"]["packing"] is True


def test_packed_runs_under_zero3_on_one_and_two_ranks_train_alike(tmp_path, tiny_llama):
    """--packing through the DeepSpeed engine under ZeRO-3 (weights partitioned): it trains,
    and 2 ranks train the same global batches of packed rows as 1."""
    data = _text2text(tmp_path / "t.json", count=64)
    one, two = tmp_path / "one", tmp_path / "two"
    zero3 = ROOT / "ds_configs" / "zero3.json"
    run_training(common_args(tiny_llama, data, one, packing=True, deepspeed=zero3, per_device_train_batch_size=2,
                             max_steps=6))
    run_training(common_args(tiny_llama, data, two, packing=True, deepspeed=zero3, per_device_train_batch_size=1,
                             max_steps=6), nproc=2)
    _check_trains_and_logs(one, 6)
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(two)], rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(two))


def test_packed_lisa_run_trains_and_logs(tmp_path, tiny_llama):
    """The layerwise methods call the bare module, not the engine."""
    data = _text2text(tmp_path / "t.json", count=64)
    run_training(common_args(tiny_llama, data, tmp_path / "out", packing=True, method="lisa",
                             per_device_train_batch_size=2, max_steps=6, lisa_activated_layers=1, lisa_interval_steps=3))
    _check_trains_and_logs(tmp_path / "out", 6)


def test_indexed_run_with_document_attention_trains_on_the_masked_loss(tmp_path, tiny_llama):
    """The first step's loss is the model's loss on the first windows with positions restarted
    at each document and no attention across documents, computed here independently."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 20, (40,), generator=generator).tolist()
    documents = [[torch.randint(3, 500, (n,), generator=generator).tolist()] for n in lengths]
    prefix = tmp_path / "docs_text_document"
    write_megatron(prefix, documents)
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, prefix, out, block_size=32, per_device_train_batch_size=4, max_steps=2,
                             no_shuffle=True, packing_attention="document"))
    first = read_metrics(out)[0]
    stream = [t for doc in documents for t in doc[0]]
    document_of = [d for d, n in enumerate(lengths) for _ in range(n)]
    ids = torch.tensor(stream[: 4 * 32]).view(4, 32)
    docs = torch.tensor(document_of[: 4 * 32]).view(4, 32)
    same = (docs[:, :, None] == docs[:, None, :]) & torch.ones(32, 32, dtype=torch.bool).tril()
    positions = torch.stack([torch.tensor([sum(1 for k in range(i) if docs[r, k] == docs[r, i]) for i in range(32)])
                             for r in range(4)])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, attention_mask=same[:, None], labels=ids).loss.item()
        causal = model(input_ids=ids, labels=ids).loss.item()
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert causal != pytest.approx(expected, rel=1e-5)  # one stream would not pass (random weights: a small gap)
