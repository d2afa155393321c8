"""Records to rows: tokenizing (shared by a node's ranks), padding or packing, and the cache."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from typing import Iterable, Optional

import numpy as np
import torch

from owlore_ds import distributed as dist
from owlore_ds.checkpoint import torch_save
from owlore_ds.data.indexed import token_dtype, write_atomic
from owlore_ds.data.rows import IGNORE_INDEX, TokenizedData
from owlore_ds.errors import UserInputError

# 3: compact folders (CompactRows), every tokenizer file in the key; 2: Alpaca rows were text2text in 1
CACHE_VERSION = "3"
# What in a model folder decides how text is tokenized (and so the cache's content): the
# tokenizer's own files, special tokens and chat templates (tokenizer_config.json or a
# separate .jinja); never the weights, which would be slow to hash and change nothing.
TOKENIZER_FILES = ("tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*", os.path.join("additional_chat_templates", "*"))
log = logging.getLogger(__name__)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's tokens (no special tokens) followed by EOS, as Megatron's preprocess_data.py
    --append-eod writes a document; [] for a text with no tokens (which Megatron skips). The
    tokens of tools/preprocess_data.py and of --streaming, so a streamed corpus trains on the
    token stream of its preprocessed form."""
    return [ids + [tokenizer.eos_token_id] if ids else [] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _pack_texts(documents: list[list[int]], block_size: int) -> tuple[list[list[int]], list[list[int]]]:
    stream = [token for document in documents for token in document]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return blocks, [list(b) for b in blocks]


def _fit(prompt: list[int], target: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """Cuts a long prompt from its start (after BOS) so that the target survives."""
    if len(prompt) + len(target) <= block_size:
        return prompt, target
    keep = block_size - len(target)
    if keep < 1:  # the target alone is too long: keep its beginning
        return prompt[:1], target[: block_size - 1]
    head = prompt[:1] if keep > 1 else []
    return head + prompt[len(prompt) - (keep - len(head)) :], target


def _text2text(record: dict, tokenizer, block_size: int) -> tuple[list[int], list[int]]:
    prompt = _bos(tokenizer) + _encode(tokenizer, record["input"])
    target = _encode(tokenizer, record["output"]) + _eos(tokenizer)
    prompt, target = _fit(prompt, target, block_size)
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def _conversation(record: dict, tokenizer, block_size: int) -> tuple[list[int], list[int]]:
    # The whole conversation is tokenized once (tokenizing turn by turn would add
    # SentencePiece's dummy prefix space to every turn); a token is labelled when its
    # first character lies in the text that the chat template added for an assistant turn,
    # less the assistant header (the generation prompt), which is prompt, not response.
    messages = record["messages"]
    spans, rendered = [], ""
    for i, message in enumerate(messages):
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if message["role"] == "assistant":
            header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            spans.append((len(header) if header and text.startswith(header) else len(rendered), len(text)))
        rendered = text
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
              for token, (start, _) in zip(ids, encoded["offset_mapping"])]
    # Long conversations lose their earliest turns; the last reply survives.
    return ids[-block_size:], labels[-block_size:]


def _tokenized(record: dict, block_size: int) -> tuple[list[int], list[int]]:
    ids = record["input_ids"][:block_size]
    labels = record.get("labels") or ids
    return ids, labels[:block_size]


def encode_records(kind: str, records: list[dict], tokenizer, block_size: int, packing: bool = False) -> list:
    """The per-record work of tokenizing, which the ranks of a node share (load_training_data):
    text_only: each record's tokens (BOS, text, EOS); the others: each example's (ids, labels),
    examples with no loss-bearing token left out."""
    if kind == "text_only":
        if packing:
            raise UserInputError("--packing packs text2text, conversation and pre-tokenized examples; text_only data is "
                                 "already one stream cut into full blocks (for per-document attention, preprocess it "
                                 "into an indexed dataset and use --packing_attention document)")
        return [_bos(tokenizer) + _encode(tokenizer, record["text"]) + _eos(tokenizer) for record in records]
    if kind == "conversation" and not (tokenizer.chat_template and tokenizer.is_fast):
        raise UserInputError("conversation data needs a fast tokenizer with a chat_template; the model's has none")
    examples = []
    for record in records:
        if kind == "text2text":
            ids, labels = _text2text(record, tokenizer, block_size)
        elif kind == "conversation":
            ids, labels = _conversation(record, tokenizer, block_size)
        else:
            ids, labels = _tokenized(record, block_size)
        # An example with no loss-bearing token would give 0/0 = NaN: drop it.
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append((ids, labels))
    if len(examples) < len(records):
        log.warning("dropped %d examples with no target tokens", len(records) - len(examples))
    return examples


def assemble_rows(kind: str, encoded: list, block_size: int, pad_id: int, packing: bool = False) -> TokenizedData:
    """The rows from encode_records' output (of all the records, in order): one row per example
    (padded), with `packing` several examples per row (pack_examples), or text_only's stream
    cut into blocks."""
    if kind == "text_only":
        ids_list, labels_list = _pack_texts(encoded, block_size)
        return _to_tensors(ids_list, labels_list, block_size, pad_id)
    ids_list = [ids for ids, _ in encoded]
    labels_list = [labels for _, labels in encoded]
    if packing:
        return pack_examples(ids_list, labels_list, block_size, pad_id)
    return _to_tensors(ids_list, labels_list, block_size, pad_id)


def tokenize_records(kind: str, records: list[dict], tokenizer, block_size: int, packing: bool = False) -> TokenizedData:
    """One row per example (padded), or with `packing` several examples per row (pack_examples)."""
    return assemble_rows(kind, encode_records(kind, records, tokenizer, block_size, packing), block_size,
                         _pad_id(tokenizer), packing)


def pack_examples(ids_list: list[list[int]], labels_list: list[list[int]], block_size: int, pad_id: int) -> TokenizedData:
    """Examples (each at most `block_size` tokens, cut as the padded path cuts them) packed
    greedily in their order: an example joins the current row while it fits, else it
    starts the next one. The rows are a function of the data alone, so GlobalBatches
    shuffles them with the seed like any rows, and 1 and N ranks see the same batches.

    Labels are as in the padded path, and also -100 at each example's first token, which
    would otherwise be predicted from the end of the previous example. position_ids count
    from 0 in each example and again in the padding at a row's end (its own "document",
    without loss), so that the model call (modeling.document_attention_mask) can keep every
    example to itself: the logits of an example are those it has alone.
    """
    rows = _pack_rows([len(ids) for ids in ids_list], block_size)
    n = len(rows)
    input_ids = torch.full((n, block_size), pad_id, dtype=torch.long)
    labels = torch.full((n, block_size), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, block_size), dtype=torch.long)
    positions = torch.zeros((n, block_size), dtype=torch.long)
    for row, members in enumerate(rows):
        at = 0
        for i in members:
            length = len(ids_list[i])
            input_ids[row, at : at + length] = torch.tensor(ids_list[i], dtype=torch.long)
            labels[row, at + 1 : at + length] = torch.tensor(labels_list[i][1:], dtype=torch.long)
            mask[row, at : at + length] = 1
            positions[row, at : at + length] = torch.arange(length)
            at += length
        positions[row, at:] = torch.arange(block_size - at)
    return TokenizedData(input_ids, labels, mask, positions)


def _pack_rows(lengths: list[int], block_size: int) -> list[list[int]]:
    """The examples of each packed row: an example joins the current row while it fits, else it
    starts the next one (pack_examples and compact_arrays share this)."""
    rows: list[list[int]] = []
    used = 0
    for i, length in enumerate(lengths):
        if not rows or used + length > block_size:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


def compact_arrays(kind: str, encoded: list, block_size: int, packing: bool = False) -> dict[str, np.ndarray]:
    """The rows assemble_rows builds from encode_records' output, in CompactRows' form: the real
    tokens back to back (padding is only ever at a row's end, so a row is a run of them), a
    loss flag per token, where each row (and with `packing` each example) begins, and each
    row's loss-bearing tokens after the shift. Memory: a few bytes a token, not 24 a block slot."""
    if kind == "text_only":
        stream = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)
        count = len(stream) // block_size
        tokens = stream[: count * block_size]
        labels, loss = tokens, np.ones(len(tokens), dtype=bool)
        offsets, examples = np.arange(count + 1, dtype=np.int64) * block_size, None
    else:
        starts = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids, _ in encoded], out=starts[1:])
        total = int(starts[-1])
        tokens = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in encoded), dtype=np.int64, count=total)
        labels = np.fromiter(itertools.chain.from_iterable(lab for _, lab in encoded), dtype=np.int64, count=total)
        loss = labels != IGNORE_INDEX
        offsets, examples = starts, None
        if packing:
            loss[starts[:-1]] = False  # an example's first token would be predicted from the previous example
            rows = _pack_rows(np.diff(starts).tolist(), block_size)
            offsets, examples = starts[[members[0] for members in rows] + [len(encoded)]], starts
    done = np.concatenate([[0], np.cumsum(loss, dtype=np.int64)])
    lowest, highest = (int(tokens.min()), int(tokens.max())) if len(tokens) else (0, 0)
    dtype = token_dtype(highest + 1) if lowest >= 0 and highest < np.iinfo(np.int32).max else np.int64
    arrays = {"tokens": tokens.astype(dtype), "loss": loss.astype(np.uint8), "offsets": offsets,
              "targets": (done[offsets[1:]] - done[offsets[:-1] + 1]).astype(np.int32)}
    if examples is not None:
        arrays["examples"] = examples
    if bool(np.any(loss & (labels != tokens))):  # pre-tokenized labels that are not the tokens
        arrays["labels"] = labels
    return arrays


def write_compact(arrays: dict[str, np.ndarray], block_size: int, pad_id: int, folder: str) -> None:
    """Writes the arrays (.npy) and meta.json into a folder of a name no other process can have,
    then renames it to `folder`: a reader sees the whole cache or none. Where another writer
    (another node sharing the folder) was first, its cache, the same bytes, is kept."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.", suffix=".tmp")
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array)
        tokens = arrays["tokens"]
        meta = {"version": CACHE_VERSION, "block_size": block_size, "pad_id": pad_id, "arrays": sorted(arrays),
                "min_token": int(tokens.min()) if len(tokens) else 0, "max_token": int(tokens.max()) if len(tokens) else 0}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would keep the other users of a shared cache out
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_tensors(ids_list: list[list[int]], labels_list: list[list[int]], block_size: int, pad_id: int) -> TokenizedData:
    n = len(ids_list)
    input_ids = torch.full((n, block_size), pad_id, dtype=torch.long)
    labels = torch.full((n, block_size), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, block_size), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_list, labels_list)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return TokenizedData(input_ids, labels, mask)


def _hash_files(paths: Iterable[str], digest, root: Optional[str] = None) -> None:
    for path in paths:
        digest.update((os.path.relpath(path, root) if root else os.path.basename(path)).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)


def cache_key(files: list[str], tokenizer_dir: str, block_size: int, packing: bool = False) -> str:
    """What the tokenized cache of `files` depends on: their bytes, every tokenizer file of
    `tokenizer_dir` (TOKENIZER_FILES, the chat template included), the block size, packing
    and the cache's format (CACHE_VERSION)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{block_size}{'|packed' if packing else ''}".encode())
    _hash_files(files, digest)
    tokenizer_files = {path for pattern in TOKENIZER_FILES for path in glob.glob(os.path.join(tokenizer_dir, pattern))}
    digest.update(b"|tokenizer|")
    _hash_files(sorted(path for path in tokenizer_files if os.path.isfile(path)), digest, root=tokenizer_dir)
    return digest.hexdigest()[:24]


def tokenize_once(path: str, cache_path: str, kind: str, records: list[dict], tokenizer, block_size: int,
                   packing: bool) -> None:
    """Fills the cache folder `cache_path` (write_compact) unless it exists: the ranks that share
    it (the same host and path: a node's ranks) each tokenize a contiguous share of the records
    and write it beside the cache; the first of them joins the shares into the rows and writes
    the cache once. So no rank tokenizes the whole dataset while the others wait. A collective."""
    where = (socket.gethostname(), os.path.realpath(cache_path))
    everyone = dist.all_gather_object((where, os.path.exists(cache_path)))
    peers = [r for r, (other, _) in enumerate(everyone) if other == where]
    needed = not all(exists for other, exists in everyone if other == where)
    share, shares = peers.index(dist.rank()), len(peers)
    # Names of this run and host only: another node sharing the folder, or another job on the
    # same data, writes and removes its own.
    run = dist.broadcast_object(uuid.uuid4().hex[:12])
    part = lambda i: f"{cache_path}.{run}.{where[0]}.part{i}-of-{shares}"  # noqa: E731
    error: Optional[Exception] = None
    if needed:
        lo, hi = len(records) * share // shares, len(records) * (share + 1) // shares
        log.info("tokenizing records %d-%d of %d (share %d of %d on this node)", lo, hi, len(records), share + 1, shares)
        try:
            encoded = encode_records(kind, records[lo:hi], tokenizer, block_size, packing)
            write_atomic(part(share), lambda fh: torch_save(encoded, fh))
        except Exception as exc:  # a bad record or a full disk must fail every rank, not leave them waiting
            error = exc
    if not dist.all_agree(error is None):
        raise error or UserInputError(f"--dataset_path {path}: tokenizing failed on another rank")
    failure: Optional[Exception] = None
    if needed and dist.rank() == peers[0]:
        try:
            encoded = [entry for i in range(shares) for entry in torch.load(part(i), weights_only=True)]
            write_compact(compact_arrays(kind, encoded, block_size, packing), block_size, _pad_id(tokenizer), cache_path)
            for i in range(shares):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(part(i))
        except Exception as exc:  # a full disk must fail every rank, not leave them waiting
            failure = exc
    if not dist.all_agree(failure is None):
        raise failure or UserInputError(f"--dataset_path {path}: writing the tokenized cache {cache_path} failed "
                                        "on another rank")
