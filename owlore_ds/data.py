"""Training data: read any supported format, tokenize (cached), and cut the global batches.

Formats (detected from the file):
- LMFlow JSON: {"type": "text_only" | "text2text" | "conversation", "instances": [...]}
- rows in .jsonl / .json / .parquet (ROW_FORMATS): `text`; `input`+`output`;
  `messages` ({role, content}); Alpaca (`instruction`, `input`, `output`, optional
  `system`, `history`) and ShareGPT (`conversations` of {from, value}, optional
  `system`), both read as LLaMA-Factory documents them and rendered with the chat
  template, loss on the responses only; pre-tokenized `input_ids` (optional `labels`)
- a folder: every .json/.jsonl/.parquet/.txt file in it (a .txt file is one text)

Every example becomes a row of `block_size` token ids with labels (-100 where no loss
is taken) and an attention mask; with `packing`, examples are packed several to a row
(pack_examples) and the row carries `position_ids` that restart at 0 in each example,
from which the model call builds a mask that keeps examples apart
(modeling.document_attention_mask). The order of global batches depends only on the seed
and the data, never on the number of ranks or on the micro-batch/accumulation split.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch

from owlore_ds import distributed as dist
from owlore_ds.errors import UserInputError
from owlore_ds.indexed import IndexedDataset, is_prefix

IGNORE_INDEX = -100
CACHE_VERSION = "2"  # 2: Alpaca rows were text2text in 1
KINDS = ("text_only", "text2text", "conversation", "tokenized")
SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
log = logging.getLogger(__name__)


class TrainingData(Protocol):
    """What the trainer asks of a dataset: rows by index, never the whole dense tensors."""

    def __len__(self) -> int: ...

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """int64 `input_ids`, `attention_mask` and `labels` of these rows, [len(rows), block_size] each;
        with packed examples or per-document attention also `position_ids`, which restart at 0
        where a new example or document begins (no token attends across that boundary)."""

    def target_count(self, rows: torch.Tensor) -> int:
        """Loss-bearing tokens of these rows, after the causal shift."""

    def token_count(self, rows: torch.Tensor) -> int:
        """Real (not padding) tokens of these rows."""

    def num_tokens(self) -> int:
        """Length of the token stream (padding removed) that calibration windows are cut from."""

    def tokens(self, start: int, length: int) -> torch.Tensor:
        """int64 tokens start..start+length of that stream."""


@dataclass
class TokenizedData:
    input_ids: torch.Tensor  # [N, block_size] int64
    labels: torch.Tensor  # [N, block_size] int64, IGNORE_INDEX where no loss
    attention_mask: torch.Tensor  # [N, block_size] int64
    position_ids: Optional[torch.Tensor] = None  # [N, block_size] int64 when examples are packed

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows], "labels": self.labels[rows]}
        if self.position_ids is not None:
            batch["position_ids"] = self.position_ids[rows]
        return batch

    def target_count(self, rows: torch.Tensor) -> int:
        return int((self.labels[rows, 1:] != IGNORE_INDEX).sum())

    def token_count(self, rows: torch.Tensor) -> int:
        return int(self.attention_mask[rows].sum())

    @functools.cached_property
    def _stream(self) -> torch.Tensor:
        return self.input_ids[self.attention_mask.bool()]

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def tokens(self, start: int, length: int) -> torch.Tensor:
        return self._stream[start : start + length]


class _Windows:
    """Rows that are whole windows of token stream: no padding, every token with loss."""

    block_size: int
    document_attention: bool = False  # --packing_attention document: position_ids in every batch

    def __len__(self) -> int:
        raise NotImplementedError

    def window(self, row: int) -> torch.Tensor:
        raise NotImplementedError

    def window_positions(self, row: int) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.stack([self.window(row) for row in rows.tolist()])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if self.document_attention:
            batch["position_ids"] = torch.stack([self.window_positions(row) for row in rows.tolist()])
        return batch

    def target_count(self, rows: torch.Tensor) -> int:
        return len(rows) * (self.block_size - 1)

    def token_count(self, rows: torch.Tensor) -> int:
        return len(rows) * self.block_size

    def num_tokens(self) -> int:
        return len(self) * self.block_size

    def tokens(self, start: int, length: int) -> torch.Tensor:
        first, last = start // self.block_size, (start + length - 1) // self.block_size
        ids = torch.cat([self.window(row) for row in range(first, last + 1)])
        offset = start - first * self.block_size
        return ids[offset : offset + length]


class PackedWindows(_Windows):
    """An indexed dataset's sequences concatenated in index order and cut into windows of
    `block_size` tokens (the tail shorter than a window is dropped); window i is row i.

    Tokens are used as stored (the EOS between documents is the one the preprocessing
    wrote). Rows are read from the memory map on demand, and a stream position is found
    by a binary search of the index's memory-mapped byte pointers, which Megatron's writer
    (and ours) lays out back to back: nothing the size of the corpus is held in memory, so
    the sample index needs no building or caching. An index whose sequences are not back
    to back gets its stream offsets computed once instead (8 bytes a sequence).

    With `document_attention` (--packing_attention document) a window's position ids
    start at 0 and restart at 0 at every document that begins inside it (a document is
    the run of sequences between two entries of the index's document indices), as
    Megatron's reset_position_ids does at EOD tokens; the model call then lets no token
    attend across those restarts. Labels stay every token: the last token of a document
    (its EOS) still predicts the first token of the next, as in Megatron.
    """

    def __init__(self, dataset: IndexedDataset, block_size: int, vocab_size: int, document_attention: bool = False):
        self.dataset = dataset
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.document_attention = document_attention
        self._itemsize = dataset.dtype.itemsize
        # Byte offset of each sequence in the concatenated stream: the pointers themselves
        # when the sequences are stored back to back.
        if _back_to_back(dataset):
            self._offsets = dataset.pointers
        else:
            log.info("%s: sequences not stored back to back; computing their stream offsets", dataset.prefix)
            self._offsets = np.concatenate([[0], np.cumsum(dataset.lengths[:-1], dtype=np.int64)]) * self._itemsize
        last = len(dataset) - 1
        self._num_tokens = self._begin(last) + int(dataset.lengths[last]) if len(dataset) else 0

    def _begin(self, sequence: int | np.ndarray):
        """Stream position of the first token of `sequence` (or of each of an array of them)."""
        return self._offsets[sequence] // self._itemsize

    def _sequence_at(self, position: int) -> int:
        """The sequence that holds stream position `position` (empty ones are skipped)."""
        return int(np.searchsorted(self._offsets, position * self._itemsize, side="right")) - 1

    def __len__(self) -> int:
        return self._num_tokens // self.block_size

    def window(self, row: int) -> torch.Tensor:
        return self.tokens(row * self.block_size, self.block_size)

    def window_positions(self, row: int) -> torch.Tensor:
        """Position ids of window `row`: 0 at its first token and at each document start inside it."""
        start, size = row * self.block_size, self.block_size
        # Sequences first..last begin inside the window (after its first token).
        first = self._sequence_at(start) + 1
        last = self._sequence_at(start + size - 1)
        restarts = torch.zeros(size, dtype=torch.bool)
        restarts[0] = True
        if last >= first:
            sequences = np.arange(first, last + 1)
            documents = self.dataset.document_indices  # sorted sequence indices where documents begin
            found = np.searchsorted(documents, sequences)
            begins = sequences[(found < len(documents)) & (documents[np.minimum(found, len(documents) - 1)] == sequences)]
            restarts[torch.from_numpy(np.asarray(self._begin(begins), dtype=np.int64) - start)] = True
        index = torch.arange(size)
        return index - torch.cummax(torch.where(restarts, index, 0), dim=0).values

    def tokens(self, start: int, length: int) -> torch.Tensor:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        sequence = self._sequence_at(start)
        while filled < length:
            offset = start + filled - int(self._begin(sequence))
            piece = self.dataset.get(sequence, offset, min(length - filled, int(self.dataset.lengths[sequence]) - offset))
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            sequence += 1
        if length and int(out.max()) >= self.vocab_size:
            raise UserInputError(f"--dataset_path {self.dataset.prefix}: token id {int(out.max())} near stream position "
                                 f"{start} is outside the model's vocabulary of {self.vocab_size}")
        return torch.from_numpy(out)


def _back_to_back(dataset: IndexedDataset, chunk: int = 1 << 20) -> bool:
    """Whether sequence i + 1 starts in P.bin where sequence i ends, for every i (read a
    chunk of the index at a time, so the check holds no corpus-sized array)."""
    pointers, lengths = dataset.pointers, dataset.lengths
    if len(pointers) == 0:
        return True
    if int(pointers[0]) != 0:
        return False
    for lo in range(0, len(pointers) - 1, chunk):
        hi = min(lo + chunk, len(pointers) - 1)
        if not np.array_equal(pointers[lo + 1 : hi + 1],
                              pointers[lo:hi] + lengths[lo:hi].astype(np.int64) * dataset.dtype.itemsize):
            return False
    return True


class BlendedWindows(_Windows):
    """Windows of several indexed datasets, interleaved in proportion to their weights.

    The blend holds floor(w_d * N) windows of dataset d, N the largest size at which no
    dataset repeats a window; its k-th pick is window floor(k * len_d / picks_d), spread
    over the whole of d rather than its start. Picks are placed at times (k + 0.5) / w_d
    and merged in time order (ties to the earlier dataset), so every stretch of the blend
    holds the datasets in their weights, as Megatron's BlendedDataset interleaves them.
    The order is a function of the data and weights alone; GlobalBatches shuffles it
    with the seed like any dataset.
    """

    def __init__(self, parts: list[PackedWindows], weights: list[float]):
        self.parts = parts
        self.block_size = parts[0].block_size
        self.document_attention = parts[0].document_attention
        shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        size = min(len(part) / share for part, share in zip(parts, shares))
        picks = [int(share * size + 1e-9) for share in shares]
        times = np.concatenate([(np.arange(n) + 0.5) / share for n, share in zip(picks, shares)])
        order = np.argsort(times, kind="stable")
        self.which = np.concatenate([np.full(n, d, dtype=np.int16) for d, n in enumerate(picks)])[order]
        self.picked = np.concatenate([np.arange(n, dtype=np.int64) * len(part) // max(n, 1)
                                      for part, n in zip(parts, picks)])[order]

    def __len__(self) -> int:
        return len(self.which)

    def window(self, row: int) -> torch.Tensor:
        return self.parts[self.which[row]].window(int(self.picked[row]))

    def window_positions(self, row: int) -> torch.Tensor:
        return self.parts[self.which[row]].window_positions(int(self.picked[row]))


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """"P1:0.7,P2:0.3" -> [(P1, 0.7), (P2, 0.3)]; every P the prefix of an indexed dataset."""
    mix = []
    for entry in spec.split(","):
        prefix, _, weight = entry.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not prefix or not value > 0 or not np.isfinite(value):
            raise UserInputError(f"--data_mix {spec}: {entry.strip()!r} is not PREFIX:WEIGHT with a weight above 0")
        if not is_prefix(prefix):
            raise UserInputError(f"--data_mix {spec}: {prefix}.idx and {prefix}.bin do not both exist")
        mix.append((prefix, value))
    return mix


def is_mix(path: str) -> bool:
    """A --data_mix spec rather than one path: several entries, or one PREFIX:WEIGHT."""
    return not os.path.exists(path) and not is_prefix(path) and ":" in path


# ---------------------------------------------------------------- reading files


def data_files(path: str, flag: str = "--dataset_path", suffixes: tuple[str, ...] = SUFFIXES) -> list[str]:
    """`path` itself, or the files of the folder `path` with one of `suffixes`, sorted; a
    one-line error naming `flag` otherwise."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(suffixes))
        if not files:
            raise UserInputError(f"{flag} {path}: folder holds no {'/'.join(suffixes)} files")
        return files
    if not os.path.isfile(path):
        raise UserInputError(f"{flag} {path}: no such file or folder")
    if not path.endswith(suffixes):
        raise UserInputError(f"{flag} {path}: expected a {'/'.join(suffixes)} file or a folder")
    return [path]


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text") from None


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a one-line error at the first bad one."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserInputError(f"{path}: line {lineno} is not a JSON object")
            yield lineno, row


def _load_jsonl(path: str) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def _load_parquet(path: str) -> list[dict]:
    import datasets

    try:
        table = datasets.Dataset.from_parquet(path, keep_in_memory=True)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise UserInputError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    return table.to_list()


# Row formats, tried in this order on each row's columns: (name, required, optional).
# Alpaca and ShareGPT rows are read as LLaMA-Factory documents them and become `messages`.
ROW_FORMATS = (
    ("tokenized", {"input_ids"}, {"labels", "attention_mask"}),
    ("messages", {"messages"}, set()),
    ("sharegpt", {"conversations"}, {"system"}),
    ("alpaca", {"instruction", "output"}, {"input", "system", "history"}),
    ("text2text", {"input", "output"}, set()),
    ("text_only", {"text"}, set()),
)
_FORMAT_KIND = {"tokenized": "tokenized", "messages": "conversation", "sharegpt": "conversation",
                "alpaca": "conversation", "text2text": "text2text", "text_only": "text_only"}
_FORMAT_NAMES = "'text', 'input'+'output', Alpaca 'instruction'+'output', ShareGPT 'conversations', 'messages' or 'input_ids'"
# LLaMA-Factory's default ShareGPT role tags, and the OpenAI names some files use instead.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def row_format(columns: Iterable[str]) -> Optional[str]:
    """The first format of ROW_FORMATS whose required columns are all present, or None."""
    present = set(columns)
    return next((name for name, required, _ in ROW_FORMATS if required <= present), None)


def _alpaca_messages(where: str, row: dict) -> list[dict]:
    # LLaMA-Factory: history turns first, then the instruction and input joined by a newline.
    for key in ("instruction", "input", "output", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UserInputError(f"{where}: {key!r} must be a string")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    history = row.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        raise UserInputError(f"{where}: 'history' must be a list of [prompt, response] string pairs")
    for prompt, response in history:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    query = "\n".join(part for part in (row["instruction"], row.get("input")) if part)
    return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": row["output"]}]


def _sharegpt_messages(where: str, row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        raise UserInputError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise UserInputError(f"{where}: 'system' must be a string")
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise UserInputError(f"{where}: unknown role {turn['from']!r} in 'conversations'; "
                                 f"expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise UserInputError(f"{where}: every 'value' in 'conversations' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _rows_kind(path: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """Returns (kind, records) of a file of rows; Alpaca and ShareGPT rows become `messages` records.

    Every row must match the format of the first one; a row that matches none, or another
    one, is an error naming the row (1-based) and the columns it has.
    """
    if not rows:
        raise UserInputError(f"{path}: holds no examples")
    first = row_format(rows[0].keys()) if isinstance(rows[0], dict) else None
    records, ignored = [], set()
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserInputError(f"{path}: row {number} is not a JSON object")
        fmt = row_format(row.keys())
        if fmt is None or fmt != first:
            expected = f"the {first} format of row 1" if first else f"a known format ({_FORMAT_NAMES})"
            raise UserInputError(f"{path}: row {number} has columns {sorted(row.keys())}, which do not match {expected}")
        _, required, optional = next(f for f in ROW_FORMATS if f[0] == fmt)
        ignored |= set(row.keys()) - required - optional
        where = f"{path}: row {number}"
        if fmt == "alpaca":
            row = {"messages": _alpaca_messages(where, row)}
        elif fmt == "sharegpt":
            row = {"messages": _sharegpt_messages(where, row)}
        records.append(row)
    if ignored:
        log.warning("%s: %s rows; ignoring the columns %s", path, first, sorted(ignored))
    return _FORMAT_KIND[first], records


def _read_file(path: str) -> tuple[str, list[dict]]:
    """Returns (kind, records) of one file."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "text_only", [{"text": fh.read()}]
    if path.endswith(".parquet"):
        return _rows_kind(path, _load_parquet(path))
    if path.endswith(".jsonl"):
        return _rows_kind(path, _load_jsonl(path))
    data = _load_json(path)
    if isinstance(data, dict) and "instances" in data:
        kind = data.get("type")
        if kind not in KINDS[:3]:
            raise UserInputError(f"{path}: unknown dataset type {kind!r}; expected one of {', '.join(KINDS[:3])}")
        if not isinstance(data["instances"], list) or not data["instances"]:
            raise UserInputError(f"{path}: 'instances' is empty or not a list")
        return kind, data["instances"]
    if isinstance(data, list):
        return _rows_kind(path, data)
    raise UserInputError(f"{path}: expected an LMFlow object with 'type' and 'instances', or a list of rows")


_REQUIRED = {"text_only": ("text",), "text2text": ("input", "output"), "conversation": ("messages",), "tokenized": ("input_ids",)}


def _check_records(path: str, kind: str, records: list[dict]) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserInputError(f"{path}: instance {index} is not a JSON object")
        for key in _REQUIRED[kind]:
            if key not in record:
                raise UserInputError(f"{path}: instance {index} of a {kind} dataset lacks {key!r}")
        if kind == "conversation":
            messages = record["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise UserInputError(f"{path}: instance {index}: 'messages' must be a list of {{role, content}} objects")
        elif kind == "tokenized":
            ids = record["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise UserInputError(f"{path}: instance {index}: 'input_ids' must be a list of integers")
            labels = record.get("labels")
            if labels is not None and (not isinstance(labels, list) or len(labels) != len(ids)):
                raise UserInputError(f"{path}: instance {index}: 'labels' must be a list as long as 'input_ids'")
        else:
            for key in _REQUIRED[kind]:
                if not isinstance(record[key], str):
                    raise UserInputError(f"{path}: instance {index}: {key!r} must be a string")


def read_records(path: str) -> tuple[str, list[dict], list[str]]:
    """Reads and checks every file under `path`; returns (kind, records, files)."""
    files = data_files(path)
    kinds, records = set(), []
    for file in files:
        kind, file_records = _read_file(file)
        _check_records(file, kind, file_records)
        kinds.add(kind)
        records.extend(file_records)
    if len(kinds) > 1:
        raise UserInputError(f"--dataset_path {path}: files mix dataset kinds {sorted(kinds)}; use one kind")
    if not records:
        raise UserInputError(f"--dataset_path {path}: the dataset is empty")
    return kinds.pop(), records, files


# ---------------------------------------------------------------- tokenizing


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
    rows: list[list[int]] = []
    used = 0
    for i, ids in enumerate(ids_list):
        if not rows or used + len(ids) > block_size:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(ids)
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


# ---------------------------------------------------------------- cache and entry point


def _hash_files(paths: Iterable[str], digest) -> None:
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)


def _cache_key(files: list[str], tokenizer_dir: str, block_size: int, packing: bool = False) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{block_size}{'|packed' if packing else ''}".encode())
    _hash_files(files, digest)
    tokenizer_files = sorted(glob.glob(os.path.join(tokenizer_dir, "tokenizer*")) + glob.glob(os.path.join(tokenizer_dir, "*.model")))
    _hash_files(tokenizer_files, digest)
    return digest.hexdigest()[:24]


def _tokenize_once(path: str, cache_path: str, kind: str, records: list[dict], tokenizer, block_size: int,
                   packing: bool) -> None:
    """Fills the cache at `cache_path` unless it exists: the ranks that share that file (the
    same host and path: a node's ranks) each tokenize a contiguous share of the records and
    write it beside the cache; the first of them joins the shares into the rows and writes the
    cache once. So no rank tokenizes the whole dataset while the others wait. A collective."""
    where = (socket.gethostname(), os.path.realpath(cache_path))
    everyone = dist.all_gather_object((where, os.path.exists(cache_path)))
    peers = [r for r, (other, _) in enumerate(everyone) if other == where]
    needed = not all(exists for other, exists in everyone if other == where)
    share, shares = peers.index(dist.rank()), len(peers)
    part = lambda i: f"{cache_path}.part{i}-of-{shares}"  # noqa: E731
    error: Optional[UserInputError] = None
    if needed:
        lo, hi = len(records) * share // shares, len(records) * (share + 1) // shares
        log.info("tokenizing records %d-%d of %d (share %d of %d on this node)", lo, hi, len(records), share + 1, shares)
        try:
            _save_atomic(encode_records(kind, records[lo:hi], tokenizer, block_size, packing), part(share))
        except UserInputError as exc:
            error = exc
    if not dist.all_agree(error is None):
        raise error or UserInputError(f"--dataset_path {path}: tokenizing failed on another rank")
    failure: Optional[Exception] = None
    if needed and dist.rank() == peers[0]:
        try:
            encoded = [entry for i in range(shares) for entry in torch.load(part(i), weights_only=True)]
            data = assemble_rows(kind, encoded, block_size, _pad_id(tokenizer), packing)
            saved = {"input_ids": data.input_ids, "labels": data.labels, "attention_mask": data.attention_mask}
            if data.position_ids is not None:
                saved["position_ids"] = data.position_ids
            _save_atomic(saved, cache_path)
            for i in range(shares):
                os.remove(part(i))
        except Exception as exc:  # a full disk must fail every rank, not leave them waiting
            failure = exc
    if not dist.all_agree(failure is None):
        raise failure or UserInputError(f"--dataset_path {path}: writing the tokenized cache {cache_path} failed "
                                        "on another rank")


def _save_atomic(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_training_data(path: str, tokenizer, tokenizer_dir: str, block_size: int, cache_dir: str,
                       vocab_size: int, packing: bool = False, packing_attention: str = "causal") -> TrainingData:
    """Opens a Megatron indexed dataset (a prefix P of P.idx + P.bin) memory-mapped, or reads,
    checks and tokenizes a dataset of the small formats: one process per node tokenizes,
    the rest read its cache.

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
        parts, weights = [], []
        for prefix, weight in parse_mix(path):
            parts.append(PackedWindows(IndexedDataset(prefix), block_size, vocab_size, document_attention))
            weights.append(weight)
        blend = BlendedWindows(parts, weights)
        if len(blend) == 0:
            raise UserInputError(f"--data_mix {path}: a dataset holds fewer than one block of {block_size} tokens")
        log.info("data mix %s: %d windows of %d tokens", path, len(blend), block_size)
        return blend
    if is_prefix(prefix):
        windows = PackedWindows(IndexedDataset(prefix), block_size, vocab_size, document_attention)
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
    key = _cache_key(files, tokenizer_dir, block_size, packing)
    cache_path = os.path.join(os.path.expanduser(cache_dir), "tokenized", f"{key}.pt")
    _tokenize_once(path, cache_path, kind, records, tokenizer, block_size, packing)
    data = TokenizedData(**torch.load(cache_path, weights_only=True))
    if len(data) == 0:
        raise UserInputError(f"--dataset_path {path}: no training example fits (block_size {block_size}); the dataset is empty")
    top = int(data.input_ids.max())
    if top >= vocab_size:
        raise UserInputError(f"--dataset_path {path}: token id {top} is outside the model's vocabulary of {vocab_size}")
    log.info("dataset %s: %s, %d %s of %d tokens", path, kind, len(data), "packed rows" if packing else "examples",
             block_size)
    return data


# ---------------------------------------------------------------- inspecting


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


# ---------------------------------------------------------------- batches


class GlobalBatches:
    """Which rows every optimizer step trains on, and how they split over ranks and micro-batches.

    Step s of epoch e = s // steps_per_epoch trains on rows perm_e[j*B:(j+1)*B] with
    j = s % steps_per_epoch, where perm_e is a seeded permutation (identity with
    --no_shuffle) and B the global batch. The last partial batch of an epoch is dropped.
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int, shuffle: bool):
        if num_examples < global_batch:
            raise UserInputError(
                f"the dataset has {num_examples} examples, fewer than one global batch of {global_batch} "
                "(per_device_train_batch_size x gradient_accumulation_steps x ranks)"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch
        self._epoch, self._order = -1, torch.arange(num_examples)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def rows(self, step: int) -> torch.Tensor:
        epoch = self.epoch_of(step)
        if self.shuffle and epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator)
        self._epoch = epoch
        start = (step % self.steps_per_epoch) * self.global_batch
        return self._order[start : start + self.global_batch]

    @staticmethod
    def micro_rows(rows: torch.Tensor, micro_step: int, rank: int, world: int, micro_batch: int) -> torch.Tensor:
        start = (micro_step * world + rank) * micro_batch
        return rows[start : start + micro_batch]


def calibration_windows(data: TrainingData, nsamples: int, seqlen: int, seed: int, sequential: bool) -> torch.Tensor:
    """[nsamples, seqlen] token windows from the dataset's real tokens (padding removed).

    Random windows (seeded) as OWL draws them from C4, or with `sequential` the first
    `nsamples` consecutive windows in file order.
    """
    total = data.num_tokens()
    if total < seqlen:
        raise UserInputError(f"the calibration data has {total} tokens, fewer than one window of {seqlen}")
    if sequential:
        count = min(nsamples, total // seqlen)
        return data.tokens(0, count * seqlen).view(count, seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([data.tokens(s, seqlen) for s in starts.tolist()])
