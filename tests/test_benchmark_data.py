"""tools/benchmark_data.py at a small size: the corpora it writes, their preprocessed prefixes
(checked against the tokenizer run here directly), and a peak RSS for every rank of each run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import ROOT, base_env
from owlore_ds.data.indexed import IndexedDataset


def test_corpora_prefixes_and_rank_peaks(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "tools" / "benchmark_data.py"), "--tokens", "200000", "--fraction", "10",
               "--workers", "2", "--world_size", "2", "--steps", "2", "--block_size", "64", "--micro_batch_size", "2",
               "--output_dir", str(out)]
    result = subprocess.run(command, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "shakespeare-llama")
    sizes = {}
    for name in ("small", "large"):
        row = results["corpora"][name]
        texts = [json.loads(line)["text"] for path in sorted((out / f"corpus_{name}").glob("*.jsonl"))
                 for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(texts) == row["corpus"]["documents"] == row["preprocess"]["documents"]
        expected = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        dataset = IndexedDataset(str(out / name))
        assert [len(ids) for ids in expected] == dataset.lengths.tolist()
        assert np.array_equal(dataset[len(texts) - 1], np.array(expected[-1]))
        sizes[name] = sum(len(ids) for ids in expected)
        assert sizes[name] == row["preprocess"]["tokens"] and row["preprocess"]["tokens_per_s"] > 0
        for run in (1, 2):
            peaks = row[f"train_{run}"]["rank_peak_rss_bytes"]
            assert len(peaks) == 2 and all(p > 100 * 2**20 for p in peaks)  # a rank holds at least torch
            assert row[f"train_{run}"]["steps"] == 2
    assert sizes["large"] >= 200_000 and sizes["small"] < sizes["large"] / 5
    table = (out / "results.md").read_text()
    assert f"| large | {results['corpora']['large']['preprocess']['documents']:,} | {sizes['large']:,} |" in table
