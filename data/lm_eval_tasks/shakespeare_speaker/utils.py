"""Data loading for the local lm-eval tasks in this folder (see shakespeare_speaker.yaml)."""

from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_splits(data_files: dict[str, str], field: str | None = None, **_metadata) -> datasets.DatasetDict:
    """datasets' `json` builder on `data_files`, with relative paths taken from this folder.

    lm-eval passes the task's `dataset_kwargs` and `metadata` as keyword arguments;
    metadata (version, model arguments) plays no part in loading.
    """
    files = {split: str((HERE / path).resolve()) for split, path in data_files.items()}
    for split, path in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{split} data file of the local task not found: {path}")
    return datasets.load_dataset("json", data_files=files, field=field)
