"""The dataset a run trains on, from --dataset_path or --data_mix; and what inspect_data prints of it."""

from __future__ import annotations

import functools
import logging
import os

import torch

from owlore_ds.data.indexed import IndexedDataset, is_prefix
from owlore_ds.data.records import read_records
from owlore_ds.data.sample_index import SampleIndexCache
from owlore_ds.data.rows import IGNORE_INDEX, CompactRows, TrainingData
from owlore_ds.data.tokenize import cache_key, tokenize_once
from owlore_ds.data.windows import BlendedWindows, PackedWindows, is_mix, parse_mix
from owlore_ds.errors import UserInputError

log = logging.getLogger(__name__)


def load_training_data(path: str, tokenizer, tokenizer_dir: str, block_size: int, cache_dir: str,
                       vocab_size: int, packing: bool = False, packing_attention: str = "causal") -> TrainingData:
    """Opens a Megatron indexed dataset (a prefix P of P.idx + P.bin) memory-mapped, or reads,
    checks and tokenizes a dataset of the small formats: the ranks of a node share the
    tokenizing, one writes the compact cache, and every rank opens it memory-mapped.

    `packing` (SFT examples several to a block) applies to the small formats,
    `packing_attention` ("causal": one stream; "document": attention and positions kept
    within each document) to indexed data."""
    prefix = path[: -len(".idx")] if path.endswith((".idx", ".bin")) else path
    indexed = is_mix(path) or is_prefix(prefix)
    if packing and indexed:
        raise UserInputError(f"--packing packs SFT examples; {path} is indexed data, already cut into full windows "
                             "(use --packing_attention document to keep its documents apart)")
    document_attention = packing_attention == "document"
    if document_attention and not indexed:
        raise UserInputError(f"--packing_attention document applies to indexed data (--dataset_path PREFIX or "
                             f"--data_mix); for the examples of {path} use --packing")
    if is_mix(path):
        parts, weights, prefixes = [], [], []
        for prefix, weight in parse_mix(path):
            parts.append(PackedWindows(IndexedDataset(prefix), block_size, vocab_size, document_attention))
            weights.append(weight)
            prefixes.append(prefix)
        blend = BlendedWindows(parts, weights, SampleIndexCache(prefixes, cache_dir))
        if len(blend) == 0:
            raise UserInputError(f"--data_mix {path}: a dataset holds fewer than one block of {block_size} tokens")
        log.info("data mix %s: %d windows of %d tokens", path, len(blend), block_size)
        return blend
    if is_prefix(prefix):
        windows = PackedWindows(IndexedDataset(prefix), block_size, vocab_size, document_attention)
        windows.sample_index = SampleIndexCache([prefix], cache_dir)  # for GlobalBatches' shuffles
        if len(windows) == 0:
            raise UserInputError(f"--dataset_path {path}: {windows.num_tokens()} tokens, fewer than one block of {block_size}")
        log.info("dataset %s: indexed, %d documents, %d windows of %d tokens", prefix,
                 windows.dataset.num_documents, len(windows), block_size)
        return windows
    for have, lack in ((".idx", ".bin"), (".bin", ".idx")):
        if os.path.isfile(prefix + have) and not os.path.exists(path):
            raise UserInputError(f"--dataset_path {path}: {prefix}{have} exists but {prefix}{lack} does not; "
                                 "an indexed dataset needs both")
    kind, records, files = read_records(path)  # every rank checks, so every rank raises the same error
    key = cache_key(files, tokenizer_dir, block_size, packing)
    cache_path = os.path.join(os.path.expanduser(cache_dir), "tokenized", key)
    tokenize_once(path, cache_path, kind, records, tokenizer, block_size, packing)
    data = CompactRows.open(cache_path)
    if len(data) == 0:
        raise UserInputError(f"--dataset_path {path}: no training example fits (block_size {block_size}); the dataset is empty")
    for token in data.token_range:
        if not 0 <= token < vocab_size:
            raise UserInputError(f"--dataset_path {path}: token id {token} is outside the model's vocabulary of {vocab_size}")
    log.info("dataset %s: %s, %d %s of %d tokens", path, kind, len(data), "packed rows" if packing else "examples",
             block_size)
    return data


def render_example(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                   marks: tuple[str, str] = ("[[", "]]")) -> str:
    """One row decoded as the model reads it (padding left out), runs of loss-bearing tokens wrapped in `marks`.

    Token i bears loss when labels[i] is set and i > 0: the first token is never predicted.
    Runs are cut from the decoded prefixes, so that SentencePiece's word-initial spaces
    survive at a run's edge.
    """
    ids = input_ids[attention_mask.bool()].tolist()
    loss = [i > 0 and int(label) != IGNORE_INDEX for i, label in enumerate(labels[: len(ids)].tolist())]
    bounds = [0] + [i for i in range(1, len(ids)) if loss[i] != loss[i - 1]] + [len(ids)]
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    full, text, done = decode(ids), [], 0
    for lo, hi in zip(bounds, bounds[1:]):
        prefix = decode(ids[:hi]) if hi < len(ids) else full
        piece = prefix[done:] if full.startswith(prefix) and len(prefix) >= done else decode(ids[lo:hi])
        done = len(prefix)
        text.append(f"{marks[0]}{piece}{marks[1]}" if loss[lo] else piece)
    return "".join(text)


def dataset_counts(data: TrainingData, block_size: int) -> dict[str, float]:
    """examples, real tokens, loss-bearing tokens and the share of padding in the blocks."""
    rows = torch.arange(len(data))
    tokens = data.token_count(rows)
    return {"examples": len(data), "tokens": tokens, "loss_tokens": data.target_count(rows),
            "padding_share": 1.0 - tokens / max(len(data) * block_size, 1)}
