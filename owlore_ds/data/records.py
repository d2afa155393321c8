"""Reading the small formats: LMFlow JSON, rows in .json/.jsonl/.parquet (text, input+output,
messages, Alpaca, ShareGPT, pre-tokenized), .txt files and folders of them."""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
from typing import Any, Iterable, Iterator, Optional

from owlore_ds.errors import UserInputError

KINDS = ("text_only", "text2text", "conversation", "tokenized")
SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
log = logging.getLogger(__name__)


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


def documents(files: list[str], text_key: str) -> Iterator[str]:
    """Every document's text of .jsonl (its `text_key`), .parquet (its `text_key` column) and .txt
    (one document) files, streamed: a file is never read whole, except a .txt. The reader of
    tools/preprocess_data.py and of --streaming."""
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as fh:
                yield fh.read()
        elif path.endswith(".jsonl"):
            for lineno, row in iter_jsonl(path):
                if not isinstance(row.get(text_key), str):
                    raise UserInputError(f"{path}: line {lineno} has no string {text_key!r} (--text_key); "
                                         f"found {sorted(row)}")
                yield row[text_key]
        else:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if text_key not in table.schema_arrow.names:
                raise UserInputError(f"{path}: no column {text_key!r} (--text_key); found {table.schema_arrow.names}")
            for batch in table.iter_batches(columns=[text_key], batch_size=1024):
                yield from (text or "" for text in batch.column(0).to_pylist())


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


CORPUS_SUFFIXES = (".jsonl", ".parquet", ".txt")
READ_BATCH = 1024  # rows of a datasets folder read at a time


class DocumentSource:
    """A corpus's documents in order, from any document on: a Hugging Face datasets folder
    (Dataset.save_to_disk's output) or .jsonl/.parquet/.txt files. What --streaming and
    tools/preprocess_data.py read; `flag` names the option in errors."""

    def __init__(self, path: str, text_key: str, flag: str = "--dataset_path"):
        self.path = path
        self.text_key = text_key
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json")) as fh:
                splits = json.load(fh).get("splits", [])
            raise UserInputError(f"{flag} {path}: a DatasetDict of splits {splits}; give one split's folder, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
        self._dataset = None
        self._files: list[str] = []
        if os.path.isfile(os.path.join(path, "state.json")):
            self._dataset = _open_datasets_folder(path, text_key, flag)
        elif os.path.isfile(path) or (os.path.isdir(path) and any(
                name.endswith(CORPUS_SUFFIXES) for name in os.listdir(path))):
            self._files = data_files(path, flag, CORPUS_SUFFIXES)
        else:
            raise UserInputError(
                f"{flag} {path}: expected a Hugging Face datasets folder (Dataset.save_to_disk: "
                f"state.json, dataset_info.json and .arrow files) or .jsonl/.parquet/.txt files; "
                f"{'the folder holds neither' if os.path.isdir(path) else 'no such file or folder'}")

    def files(self) -> list[str]:
        """The files the documents are read from, in order (a datasets folder's arrow files and state)."""
        if self._dataset is None:
            return list(self._files)
        return sorted(glob.glob(os.path.join(self.path, "*.arrow"))) + [os.path.join(self.path, "state.json")]

    def kind(self) -> str:
        return "datasets folder" if self._dataset is not None else f"{len(self._files)} file(s)"

    def texts(self, start: int) -> Iterator[str]:
        """The texts of documents start, start + 1, ...: a datasets folder is read from `start`
        on; files are read from their beginning and the first `start` documents passed over
        (parsed, not tokenized)."""
        if self._dataset is None:
            yield from itertools.islice(documents(self._files, self.text_key), start, None)
            return
        for lo in range(start, len(self._dataset), READ_BATCH):
            yield from (text or "" for text in self._dataset[lo : lo + READ_BATCH][self.text_key])


def _open_datasets_folder(path: str, text_key: str, flag: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(path)  # memory-maps the arrow files: nothing is read yet
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise UserInputError(f"{flag} {path}: not a readable datasets folder ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    if text_key not in dataset.column_names:
        raise UserInputError(f"{flag} {path}: no column {text_key!r} (--text_key); found {dataset.column_names}")
    feature = dataset.features[text_key]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserInputError(f"{flag} {path}: column {text_key!r} (--text_key) holds {feature}, not text")
    return dataset.select_columns([text_key])
