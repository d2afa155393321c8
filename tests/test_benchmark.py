"""tools/benchmark.py and the reference peer (tools/peer_owlore.py) on a tiny Llama config.

The benchmark runs every method in its own process; these tests check the rows it writes
against the runs' own metrics.jsonl, that the peers reproduce the reference's defect
(the optimizer state of every layer ever visited is kept) while our lisa keeps only the
active layer's, that the peers run what the reference runs (GaLoreAdamW built with lr only,
pure bf16, gradient checkpointing) and record it, and that a run killed mid-way is a result.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CORPUS, ROOT, base_env, load_tool, processes_writing
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


METHODS = ["full", "lisa", "owlore", "peer", "peer_lisa", "galore"]
# Each method's "vs peer" divides by: lisa's by LMFlow's LISA, the rest by the GaLore peer.
PEER_OF = {"lisa": "peer_lisa", "peer_lisa": "peer_lisa"}


@pytest.fixture(scope="module")
def three_methods(tmp_path_factory, tiny_config, small_text) -> Path:
    """full, lisa, owlore and both peers run; galore predicted only."""
    out = tmp_path_factory.mktemp("bench") / "out"
    run_benchmark(tiny_args(tiny_config, small_text, out, num_layers=2, methods=",".join(METHODS),
                            predict_only="galore", steps=3, warmup_steps_excluded=1))
    return out


def test_rows_match_the_runs(three_methods):
    results = json.loads((three_methods / "results.json").read_text())
    settings = results["settings"]
    assert (settings["num_layers"], settings["full_depth"], settings["gamma"], settings["interval"]) == (2, 4, 1, 1)
    assert settings["interval_source"] == "the default, --steps // 2" and settings["predict_only"] == ["galore"]
    assert [row["method"] for row in results["rows"]] == METHODS
    rows = {row["method"]: row for row in results["rows"]}
    for method, row in rows.items():
        assert row["compared_to"] == PEER_OF.get(method, "peer")
        # The memory model may or may not be present; either way the row says so.
        assert row["predicted"] is None and row["prediction_note"] or set(row["predicted"]) == {
            "peak_memory_bytes", "optimizer_state_bytes"}
        if method == "galore":
            continue
        assert row["error"] is None and row["outcome"] == "completed" and row["steps_completed"] == 3, row
        records = read_metrics(three_methods / "runs" / method)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert row["steps_measured"] == 2
        assert row["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in records) > 0
        assert row["optimizer_state_bytes"] == max(r["optimizer_state_bytes"] for r in records) > 0
        assert row["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in records[1:]))
        assert row["step_time_s"] == pytest.approx(statistics.median(r["step_time_s"] for r in records[1:]))
        for key, ratio in row["vs_peer"].items():
            assert ratio == pytest.approx(row[key] / rows[row["compared_to"]][key])
        assert not list((three_methods / "runs" / method).glob("checkpoint-*")), "checkpoints were not removed"
    assert rows["peer"]["predicted"] is None and rows["peer_lisa"]["predicted"] is None
    # galore was not run: no run folder, no measured figure, its ratios from its prediction
    galore = rows["galore"]
    assert galore["predicted_only"] and galore["outcome"] == "predicted" and galore["per_step"] == []
    assert not (three_methods / "runs" / "galore").exists() and "peak_memory_bytes" not in galore
    if galore["predicted"] is not None:
        assert galore["vs_peer"]["peak_memory_bytes"] == pytest.approx(
            galore["predicted"]["peak_memory_bytes"] / rows["peer"]["peak_memory_bytes"])
    assert galore["vs_peer"]["tokens_per_s"] is None
    # The same weights and the same first batch in every run: the same first loss
    first_losses = {method: read_metrics(three_methods / "runs" / method)[0]["loss"] for method in rows
                    if method != "galore"}
    assert first_losses["owlore"] == pytest.approx(first_losses["full"], rel=1e-6)
    # The peers' loss is Hugging Face's over the full logits, reported as the global batch's per-token mean
    assert first_losses["peer"] == pytest.approx(first_losses["full"], rel=1e-6)
    assert first_losses["peer_lisa"] == pytest.approx(first_losses["full"], rel=1e-6)
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
    columns = [cell.strip() for cell in lines[header].split("|")]
    table = lines[header + 2 : header + 2 + len(METHODS)]
    assert [line.split("|")[1].strip() for line in table] == METHODS
    assert all(len(line.split("|")) == len(columns) for line in table)
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")] for line in table}
    ratio_columns = [i for i, name in enumerate(columns) if name == "vs peer"]
    assert len(ratio_columns) == 4
    for peer in ("peer", "peer_lisa"):
        assert all(cells[peer][i] == "1.00x" for i in ratio_columns)
    vs = columns.index("vs")
    assert {method: cells[method][vs] for method in METHODS} == {m: PEER_OF.get(m, "peer") for m in METHODS}
    assert cells["full"][columns.index("run")] == "3 steps"
    assert cells["galore"][columns.index("run")] == "predicted, not run"
    assert cells["galore"][columns.index("peak MiB")] == "n/a"
    assert "device: CPU: " in text and "cores" in text and "K = 1 steps (K from the default, --steps // 2)" in text
    for package in VERSIONED:
        assert f"{package} " in text
    assert f"--methods {','.join(METHODS)}" in text and "python tools/benchmark.py" in text


def _per_step_tables(text: str) -> dict[str, list[list[str]]]:
    """The per-step section of results.md: method -> its table's rows of cells."""
    section = text.split("## Per step", 1)[1]
    tables = {}
    for block in section.split("### ")[1:]:
        name, *rest = block.splitlines()
        tables[name.strip()] = [[c.strip() for c in line.split("|")[1:-1]] for line in rest
                                if line.startswith("| ") and not line.startswith("| step")]
    return tables


def test_per_step_table(three_methods):
    """Per method and step: peak, optimizer bytes, layers visited so far (from the runs'
    active_layers), tokens/s, in results.json and results.md."""
    results = json.loads((three_methods / "results.json").read_text())
    tables = _per_step_tables((three_methods / "results.md").read_text())
    assert set(tables) == set(METHODS) - {"galore"}
    for row in results["rows"]:
        if row["method"] == "galore":
            continue
        records = read_metrics(three_methods / "runs" / row["method"])
        seen, expected = set(), []
        for record in records:
            seen |= set(record.get("active_layers", ()))
            expected.append({"step": record["step"], "peak_memory_bytes": record["peak_memory_bytes"],
                             "optimizer_state_bytes": record["optimizer_state_bytes"],
                             "layers_visited": len(seen) if row["method"] != "full" else None,
                             "tokens_per_s": record["tokens_per_s"]})
        assert row["per_step"] == expected
        table = tables[row["method"]]
        assert [cells[0] for cells in table] == ["1", "2", "3"]
        assert [cells[3] for cells in table] == [str(e["layers_visited"] or "all") for e in expected]
        # Printed to 0.1 MiB: off by at most half of that, plus the float error of the
        # difference (15.25 printed as 15.2 differs by 0.05000000000000071).
        assert [float(cells[1].replace(",", "")) for cells in table] == pytest.approx(
            [e["peak_memory_bytes"] / 2**20 for e in expected], abs=0.05 + 1e-9)
    # gamma 1 of 2 layers, one draw per step: the sampled runs visit one layer at step 1, at most 2
    for method in ("lisa", "owlore", "peer", "peer_lisa"):
        visited = [step["layers_visited"] for step in next(r for r in results["rows"] if r["method"] == method)[
            "per_step"]]
        assert visited[0] == 1 and visited == sorted(visited) and visited[-1] <= 2


def test_peers_record_what_they_ran(three_methods):
    """peer_run.json (the run config the peer gives MetricsLog) records the reference's settings,
    not the trainer defaults in its flags (fp32 masters, state freed, canonical signs)."""
    rows = {row["method"]: row for row in json.loads((three_methods / "results.json").read_text())["rows"]}
    for method, optimizer, eps in (("peer", "galore_torch.GaLoreAdamW", 1e-6),
                                   ("peer_lisa", "torch.optim.AdamW", 1e-8)):
        ran = json.loads((three_methods / "runs" / method / "peer_run.json").read_text())
        assert rows[method]["ran"] == ran
        assert (ran["optimizer"], ran["eps"], ran["weight_decay"], ran["betas"]) == (optimizer, eps, 0.0, [0.9, 0.999])
        assert ran["precision"].startswith("pure bf16") and ran["master_weights"] == "none"
        assert ran["gradient_checkpointing"] is True and ran["max_grad_norm"] == 1.0
        assert ran["inactive_state"].startswith("kept") and ran["loss"].startswith("Hugging Face")
        assert f"--peer_optimizer {ran['peer_optimizer']}" in rows[method]["command"]
    assert json.loads((three_methods / "runs" / "peer" / "peer_run.json").read_text())["galore"]["rank"] == 16
    assert json.loads((three_methods / "runs" / "peer_lisa" / "peer_run.json").read_text())["foreach"] is False
    assert "galore" not in json.loads((three_methods / "runs" / "peer_lisa" / "peer_run.json").read_text())
    # what the flags would say (the benchmark gives no --bf16 master or inactive-state flags to the peers)
    assert "--master_weights" not in rows["peer"]["command"] and "--gradient_checkpointing" in rows["peer"]["command"]


def test_peer_builds_the_reference_optimizer_and_model(three_methods, small_text, tmp_path):
    """In process: the GaLore peer's optimizer is GaLoreAdamW(groups, lr=lr) with galore-torch's own
    defaults, LISA's is torch AdamW with the HF TrainingArguments defaults, and the model is
    pure bf16 with gradient checkpointing though neither --bf16 nor --gradient_checkpointing is given."""
    import torch
    from galore_torch import GaLoreAdamW

    peer_tool = load_tool("peer_owlore")
    reference = GaLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))], lr=3e-4).defaults
    assert (reference["eps"], reference["weight_decay"], reference["betas"]) == (1e-6, 0.0, (0.9, 0.999))
    for kind, optimizer_type, defaults in (
            ("galore", GaLoreAdamW, reference),
            ("adamw", torch.optim.AdamW, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4, eps=1e-8,
                                                           weight_decay=0.0, foreach=False).defaults)):
        args = ["--model_name_or_path", str(three_methods / "model"), "--dataset_path", str(small_text),
                "--output_dir", str(tmp_path / kind), "--cache_dir", str(three_methods.parent / "cache"),
                "--block_size", "32", "--max_steps", "2", "--learning_rate", "3e-4", "--lisa_activated_layers", "1",
                "--galore_rank", "16", "--peer_optimizer", kind]
        cfg, parsed_kind = peer_tool.parse(args)
        assert parsed_kind == kind and not cfg.bf16 and not cfg.gradient_checkpointing
        peer = peer_tool.Peer(cfg, kind)
        assert type(peer.optimizer) is optimizer_type
        assert peer.optimizer.defaults == defaults
        for group in peer.optimizer.param_groups:
            assert {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
                k: defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        optimized = {id(p) for group in peer.optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for p in peer.model.parameters()}  # every parameter, as the reference
        low_rank = [group for group in peer.optimizer.param_groups if "rank" in group]
        if kind == "galore":  # the 7 matrices of each of the 2 decoder layers
            assert len(low_rank) == 1 and len(low_rank[0]["params"]) == 14 and low_rank[0]["rank"] == 16
        else:
            assert low_rank == []
        assert peer.model.is_gradient_checkpointing
        assert {p.dtype for p in peer.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("flag, value", [("--adam_epsilon", "1e-6"), ("--weight_decay", "0.1"),
                                         ("--max_grad_norm", "0"), ("--fp32", None),
                                         ("--update_in_backward", None), ("--peer_optimizer", "sgd")])
def test_peer_refuses_what_the_reference_does_not_take(tmp_path, flag, value):
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tmp_path / "none"), "--dataset_path", str(CORPUS), "--output_dir", str(out),
            flag] + ([value] if value is not None else [])
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "peer_owlore.py"), *args], env=base_env(),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and flag in errors[0], result.stderr[-2000:]
    assert not out.exists()


def test_a_killed_run_is_a_result(tmp_path, tiny_config, small_text):
    """A peer SIGKILLed mid-run (as the OOM killer ends a run on CPU) is recorded with the step
    it reached and the layers it had visited, from its metrics.jsonl so far; the other runs go on."""
    out = tmp_path / "out"
    run_dir = out / "runs" / "peer_lisa"
    killed: list[int] = []

    def kill_after_two_steps() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if len(read_metrics(run_dir)) >= 2:
                for pid in processes_writing(run_dir):  # the peer, found by its --output_dir
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_two_steps, daemon=True)
    watcher.start()
    run_benchmark(tiny_args(tiny_config, small_text, out, methods="peer_lisa,lisa", steps=100,
                            warmup_steps_excluded=1, lisa_activated_layers=1, lisa_interval_steps=1)
                  + ["--update_in_backward"])
    watcher.join()
    assert killed, "the peer was never seen running"
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    peer, lisa = rows["peer_lisa"], rows["lisa"]
    records = read_metrics(run_dir)
    assert 2 <= len(records) < 100
    assert peer["outcome"] == "killed (SIGKILL)" and peer["error"].startswith("killed by SIGKILL")
    assert peer["steps_completed"] == len(records) == len(peer["per_step"])
    assert peer["layers_visited"] == sorted({layer for r in records for layer in r["active_layers"]})
    assert peer["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in records)
    assert lisa["outcome"] == "completed" and lisa["steps_completed"] == 100
    # --update_in_backward reaches lisa (with the clipping it needs off), not the peer
    assert "--update_in_backward --max_grad_norm 0" in lisa["command"]
    assert "--update_in_backward" not in peer["command"] and "--max_grad_norm" not in peer["command"]
    # lisa is compared with what the killed peer reached
    assert lisa["vs_peer"]["peak_memory_bytes"] == pytest.approx(lisa["peak_memory_bytes"] / peer["peak_memory_bytes"])
    text = (out / "results.md").read_text()
    assert f"| peer_lisa | killed (SIGKILL) after step {len(records)} |" in text
    assert "- peer_lisa: killed by SIGKILL" in text
    assert "update in backward without clipping (lisa, galore, owlore; the rest clip at 1.0)" in text


def test_peer_keeps_the_state_of_every_visited_layer(tmp_path, tiny_config, small_text):
    """The reference defect: each peer's optimizer state (GaLore's and LMFlow's LISA's) grows by
    one layer's worth with every newly visited layer; our lisa, on the same settings, holds the
    active layer's only."""
    out = tmp_path / "out"
    run_benchmark(tiny_args(tiny_config, small_text, out, methods="lisa,peer,peer_lisa", steps=6,
                            lisa_activated_layers=1, lisa_interval_steps=1))
    for method in ("peer", "peer_lisa"):
        peer = read_metrics(out / "runs" / method)
        visited, counts = set(), []
        for record in peer:
            assert len(record["active_layers"]) == 1
            visited |= set(record["active_layers"])
            counts.append(len(visited))
        assert counts[-1] >= 3, f"{method} visited too few layers to show growth: {counts}"
        state = [r["optimizer_state_bytes"] for r in peer]
        per_layer = (state[-1] - state[0]) // (counts[-1] - 1)
        assert per_layer > 0
        assert state == [state[0] + (n - 1) * per_layer for n in counts], (method, state, counts)
        if method == "peer_lisa":
            # torch AdamW on the pure bf16 model: two bf16 moments of each of a layer's 9 tensors
            # (4 bytes a parameter) and each tensor's fp32 step counter
            c = json.loads((out / "model" / "config.json").read_text())
            head = c["hidden_size"] // c["num_attention_heads"]
            attention = 2 * c["hidden_size"] ** 2 + 2 * c["hidden_size"] * c["num_key_value_heads"] * head
            layer_parameters = attention + 3 * c["hidden_size"] * c["intermediate_size"] + 2 * c["hidden_size"]
            assert per_layer == 4 * layer_parameters + 9 * 4
    lisa = read_metrics(out / "runs" / "lisa")
    assert len({layer for r in lisa for layer in r["active_layers"]}) >= 3
    assert len({r["optimizer_state_bytes"] for r in lisa}) == 1, [r["optimizer_state_bytes"] for r in lisa]


@pytest.mark.parametrize("flags, fragment", [
    (["--methods", "full,sgd"], "--methods"),
    (["--model_config", "llama9-1b"], "--model_config"),
    (["--steps", "2", "--warmup_steps_excluded", "2"], "--warmup_steps_excluded"),
    (["--num_layers", "0"], "--num_layers"),
    (["--methods", "owlore,peer", "--predict_only", "peer"], "--predict_only"),
    (["--methods", "lisa", "--predict_only", "full"], "--predict_only"),
    (["--methods", "lisa,peer_lisa", "--fp32"], "--fp32"),
])
def test_bad_input(tmp_path, flags, fragment):
    out = tmp_path / "out"
    result = run_benchmark([*flags, "--output_dir", str(out)], check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_full_depth_settings_and_outcomes():
    """The full-depth invocation (Makefile benchmark_full_depth) resolves to gamma 5 of 32 layers
    at K 1 from its flag, full predicted only; and a run's end is named from its error line."""
    benchmark = load_tool("benchmark")
    args = benchmark.build_parser().parse_args(
        ["--model_config", "llama2-7b", "--methods", "owlore,lisa,peer,peer_lisa,full", "--predict_only", "full",
         "--steps", "12", "--lisa_activated_layers", "5", "--lisa_interval_steps", "1", "--gradient_checkpointing",
         "--master_weights", "pure_bf16"])
    settings = benchmark.resolve(args)
    assert (settings.config.num_hidden_layers, settings.gamma, settings.interval) == (32, 5, 1)
    assert settings.interval_source == "--lisa_interval_steps" and settings.predict_only == ["full"]
    assert {m: benchmark.compared_to(m) for m in settings.methods} == {
        "owlore": "peer", "lisa": "peer_lisa", "peer": "peer", "peer_lisa": "peer_lisa", "full": "peer"}
    assert benchmark.outcome(None) == "completed"
    assert benchmark.outcome("killed by SIGKILL (on CPU: the kernel's OOM killer)") == "killed (SIGKILL)"
    assert benchmark.outcome("exit 1: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.95 GiB") == \
        "out of memory"
    assert benchmark.outcome("timed out after 60 s") == "timed out"
    assert benchmark.outcome("exit 2: --block_size 9000 exceeds ...") == "failed"
