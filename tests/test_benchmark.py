"""tools/benchmark.py and the reference peer (tools/peer_owlore.py) on a tiny Llama config.

The benchmark runs every method in its own process; these tests check the rows it writes
against the runs' own metrics.jsonl, and that the peer reproduces the reference's defect
(the optimizer state of every layer ever visited is kept) while our lisa keeps only the
active layer's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS, ROOT, base_env
from owlore_ds.metrics import read_metrics

BENCHMARK = str(ROOT / "tools" / "benchmark.py")
VERSIONED = ("torch", "deepspeed", "transformers", "galore-torch", "peft")


def run_benchmark(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, BENCHMARK, *args], env=base_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"benchmark failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """A 4-layer Llama config (no weights) whose vocabulary holds the embedded tokenizer's 4096 ids."""
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("tiny-config")
    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256,
                         tie_word_embeddings=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return path


def tiny_args(config: Path, data: Path, out: Path, **overrides) -> list[str]:
    flags = {"model_config": config, "dataset_path": data, "output_dir": out, "cache_dir": out.parent / "cache",
             "block_size": 32, "galore_rank": 16}
    flags.update(overrides)
    return [text for key, value in flags.items() for text in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def three_methods(tmp_path_factory, tiny_config, small_text) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    run_benchmark(tiny_args(tiny_config, small_text, out, num_layers=2, methods="full,owlore,peer", steps=3,
                            warmup_steps_excluded=1))
    return out


def test_rows_match_the_runs(three_methods):
    results = json.loads((three_methods / "results.json").read_text())
    settings = results["settings"]
    assert (settings["num_layers"], settings["full_depth"], settings["gamma"], settings["interval"]) == (2, 4, 1, 1)
    assert [row["method"] for row in results["rows"]] == ["full", "owlore", "peer"]
    rows = {row["method"]: row for row in results["rows"]}
    for method, row in rows.items():
        assert row["error"] is None, row
        records = read_metrics(three_methods / "runs" / method)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert row["steps_measured"] == 2
        assert row["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in records) > 0
        assert row["optimizer_state_bytes"] == max(r["optimizer_state_bytes"] for r in records) > 0
        assert row["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in records[1:]))
        assert row["step_time_s"] == pytest.approx(statistics.median(r["step_time_s"] for r in records[1:]))
        for key, ratio in row["vs_peer"].items():
            assert ratio == pytest.approx(row[key] / rows["peer"][key])
        # The memory model may or may not be present; either way the row says so.
        assert row["predicted"] is None and row["prediction_note"] or set(row["predicted"]) == {
            "peak_memory_bytes", "optimizer_state_bytes"}
        assert not list((three_methods / "runs" / method).glob("checkpoint-*")), "checkpoints were not removed"
    assert rows["peer"]["predicted"] is None
    # The same weights and the same first batch in every run: the same first loss
    first_losses = {method: read_metrics(three_methods / "runs" / method)[0]["loss"] for method in rows}
    assert first_losses["owlore"] == pytest.approx(first_losses["full"], rel=1e-6)
    assert first_losses["peer"] == pytest.approx(first_losses["full"], rel=1e-6)
    # full AdamW in bf16: fp32 master weights and two fp32 moments of every parameter, and step counters
    assert 0 <= rows["full"]["optimizer_state_bytes"] - 12 * settings["parameters"] < 1024
    # owlore and the peer sampled layers with the same OWL ratio file, computed once for the model
    ratio_file = str(three_methods / "outlier_ratios.json")
    assert len(json.loads(Path(ratio_file).read_text())["ratios"]) == 2
    for method in ("owlore", "peer"):
        assert f"--outlier_ratios {ratio_file}" in rows[method]["command"]
        assert "--galore_rank 16 --galore_update_proj_gap 100 --galore_scale 1.0" in rows[method]["command"]
    model = json.loads((three_methods / "model" / "config.json").read_text())
    assert model["num_hidden_layers"] == 2 and model["hidden_size"] == 64
    assert (three_methods / "model" / "tokenizer.json").exists()


def test_markdown_table(three_methods):
    text = (three_methods / "results.md").read_text()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    assert "peak MiB" in lines[header] and "tokens/s" in lines[header] and "predicted peak MiB" in lines[header]
    table = lines[header + 2 : header + 5]
    assert [line.split("|")[1].strip() for line in table] == ["full", "owlore", "peer"]
    assert all(len(line.split("|")) == len(lines[header].split("|")) for line in table)
    peer_cells = [cell.strip() for cell in table[2].split("|")]
    assert peer_cells[3] == peer_cells[6] == peer_cells[9] == "1.00x"
    assert "device: CPU: " in text and "cores" in text
    for package in VERSIONED:
        assert f"{package} " in text
    assert "--methods full,owlore,peer" in text and "python tools/benchmark.py" in text


def test_peer_keeps_the_state_of_every_visited_layer(tmp_path, tiny_config, small_text):
    """The reference defect: the peer's optimizer state grows by one layer's worth with every
    newly visited layer; our lisa, on the same settings, holds the active layer's only."""
    out = tmp_path / "out"
    run_benchmark(tiny_args(tiny_config, small_text, out, methods="lisa,peer", steps=6, lisa_activated_layers=1,
                            lisa_interval_steps=1))
    peer = read_metrics(out / "runs" / "peer")
    visited, counts = set(), []
    for record in peer:
        assert len(record["active_layers"]) == 1
        visited |= set(record["active_layers"])
        counts.append(len(visited))
    assert counts[-1] >= 3, f"the run visited too few layers to show growth: {counts}"
    state = [r["optimizer_state_bytes"] for r in peer]
    per_layer = (state[-1] - state[0]) // (counts[-1] - 1)
    assert per_layer > 0
    assert state == [state[0] + (n - 1) * per_layer for n in counts], (state, counts)

    lisa = read_metrics(out / "runs" / "lisa")
    assert len({layer for r in lisa for layer in r["active_layers"]}) >= 3
    assert len({r["optimizer_state_bytes"] for r in lisa}) == 1, [r["optimizer_state_bytes"] for r in lisa]


@pytest.mark.parametrize("flags, fragment", [
    (["--methods", "full,sgd"], "--methods"),
    (["--model_config", "llama9-1b"], "--model_config"),
    (["--steps", "2", "--warmup_steps_excluded", "2"], "--warmup_steps_excluded"),
    (["--num_layers", "0"], "--num_layers"),
])
def test_bad_input(tmp_path, flags, fragment):
    out = tmp_path / "out"
    result = run_benchmark([*flags, "--output_dir", str(out)], check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists()
