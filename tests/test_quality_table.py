"""tools/quality_table.py end to end on a tiny budget: two methods, one seed, 4 steps, 2 CPU ranks.
The markdown's numbers must be the runs' own (metrics.jsonl, score.json). About 2-3 minutes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "owlore")
STEPS = 4
TEST_LIMIT = 48


def table_rows(markdown: str, heading_cells: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose header starts with `heading_cells`, keyed by 'method/seed'."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_cells))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        rows[cells["method"] + ("/" + cells["seed"] if "seed" in cells else "")] = cells
    return rows


def test_quality_table_rows_match_the_runs(tmp_path):
    runs, output = tmp_path / "runs", tmp_path / "results.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "tools/quality_table.py", "--methods", ",".join(METHODS), "--seeds", "0",
         "--max_steps", str(STEPS), "--test_limit", str(TEST_LIMIT), "--runs_dir", str(runs), "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    markdown = output.read_text()
    per_run = table_rows(markdown, "| method | seed |")
    summary = table_rows(markdown, "| method | runs ok |")
    settings = table_rows(markdown, "| method | learning rate |")

    for method in METHODS:
        out = runs / method / "seed0"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        score = json.loads((out / "score.json").read_text())
        assert len(metrics) == STEPS and score["n"] == TEST_LIMIT
        assert (out / "final" / "config.json").is_file() and not list(out.glob("checkpoint-*"))

        row = per_run[f"{method}/0"]
        assert row["status"] == "ok" and int(row["steps"]) == STEPS
        # Recomputed here from the run's files, by the definitions the document states.
        expected = {
            "choice acc": f"{score['choice_accuracy']:.3f}",
            "exact match": f"{score['accuracy']:.3f}",
            "loss": f"{statistics.fmean(m['loss'] for m in metrics[-10:]):.3f}",
            "peak MiB": f"{max(m['peak_memory_bytes'] for m in metrics) / 2**20:.1f}",
            "opt. MiB": f"{max(m['optimizer_state_bytes'] for m in metrics) / 2**20:.2f}",
            "tokens/s": f"{statistics.median(m['tokens_per_s'] for m in metrics[2:]):.0f}",
        }
        assert {key: row[key] for key in expected} == expected
        # One seed: the summary is that run, with no spread.
        assert summary[method]["runs ok"] == "1/1"
        assert {key: summary[method][key] for key in expected} == expected
        assert summary[method]["choice acc range"] == "-"
        assert float(settings[method]["learning rate"]) > 0
        assert f"--method {method} " in markdown and f"--output_dir {out} " in markdown

    for text in ("device: ", "date: ", "packages: ", "torch ", "deepspeed ", "command: `python tools/quality_table.py"):
        assert text in markdown
