"""tools/evaluate.py: lm-eval-harness on the embedded model and the local task, checked against
tools/score_task.py; bad input. CPU, offline, about a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tools import evaluate, score_task
from owlore_ds.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shakespeare-llama"
TEST_FILE = ROOT / "data" / "tasks" / "shakespeare_speaker" / "test.json"
TASK_YAML = ROOT / "data" / "lm_eval_tasks" / "shakespeare_speaker" / "shakespeare_speaker.yaml"
LIMIT = 48
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/evaluate.py", *map(str, args)], cwd=ROOT, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[dict, list[dict]]:
    """evaluate.py on the embedded model, first LIMIT test examples, fp32 (see test below for why)."""
    output = tmp_path_factory.mktemp("eval") / "results.json"
    result = run_evaluate(MODEL, "--tasks", "shakespeare_speaker", "--limit", LIMIT, "--dtype", "float32",
                          "--log_samples", "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shakespeare_speaker" in result.stdout  # the printed table
    samples = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]
    return json.loads(output.read_text()), sorted(samples, key=lambda row: row["doc_id"])


@pytest.fixture(scope="module")
def reference() -> tuple[dict, torch.Tensor, list[str]]:
    """score_task on the same examples: its metrics, per-choice log-likelihoods and classes."""
    # The embedded weights are bf16. fp32 on both sides: lm-eval takes log_softmax in the model's
    # dtype and score_task in fp32, and bf16 sums tie often enough to flip an argmax.
    model, tokenizer = score_task.load_model(MODEL, "cpu")
    model = model.float()
    instances = score_task.load_instances(TEST_FILE)
    classes = sorted({inst["output"] for inst in instances})
    subset = instances[:LIMIT]
    metrics = score_task.score(model, tokenizer, subset, classes)
    logprobs = score_task.answer_logprobs(model, tokenizer, [inst["input"] for inst in subset], classes)
    return metrics, logprobs, classes


def test_local_task_offers_the_score_task_classes(reference):
    _, _, classes = reference
    config = yaml.load(TASK_YAML.read_text(), Loader=yaml.BaseLoader)  # BaseLoader: skips the !function tag
    assert [" " + name for name in config["doc_to_choice"]] == classes
    assert config["target_delimiter"] == " "


def test_accuracy_matches_score_task(evaluated, reference):
    results, samples = evaluated
    metrics, logprobs, _ = reference
    task = results["results"]["shakespeare_speaker"]
    assert results["n-samples"]["shakespeare_speaker"]["effective"] == LIMIT == metrics["n"]
    assert [row["doc_id"] for row in samples] == list(range(LIMIT))  # --limit takes the first K, as score_task
    # Both rank the 12 names by summed log-likelihood of " NAME" after the prompt, with the same
    # tokens (BOS + prompt, then the name's own tokens), so lm-eval's `acc` is score_task's
    # choice_accuracy exactly. acc_norm divides by the name's length and is not compared.
    assert task["acc,none"] == metrics["choice_accuracy"]
    lm_eval_logprobs = torch.tensor([[ll for ll, _ in row["filtered_resps"]] for row in samples])
    torch.testing.assert_close(lm_eval_logprobs, logprobs, rtol=0, atol=1e-4)
    assert results["owlore_ds"]["device"] == "cpu"


def test_bad_model_folder_is_one_line_exit_2(tmp_path):
    output = tmp_path / "out" / "results.json"
    missing = run_evaluate(tmp_path / "nope", "--tasks", "shakespeare_speaker", "--output", output)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: HF_FOLDER: model folder not found: {tmp_path / 'nope'}"]
    (tmp_path / "empty").mkdir()
    no_config = run_evaluate(tmp_path / "empty", "--tasks", "shakespeare_speaker", "--output", output)
    assert no_config.returncode == 2
    assert no_config.stderr.strip().startswith("error: HF_FOLDER: no config.json in ")
    assert len(no_config.stderr.strip().splitlines()) == 1
    bad_flag = run_evaluate(MODEL, "--tasks", "shakespeare_speaker", "--limit", "0", "--output", output)
    assert bad_flag.returncode == 2 and bad_flag.stderr.strip() == "error: argument --limit: must be > 0, got 0"
    assert not output.parent.exists()


def test_hub_task_fails_cleanly_offline(tmp_path):
    # boolq's dataset lives on the Hub; offline it must fail at once, before the model loads.
    output = tmp_path / "results.json"
    result = run_evaluate(MODEL, "--tasks", "boolq", "--output", output)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --tasks boolq: its dataset is not in the local cache")
    assert "--allow_downloads" in errors[0]
    assert not output.exists()


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(evaluate.LOCAL_TASKS))


def test_unknown_task_is_refused_with_a_suggestion(task_manager):
    with pytest.raises(UserInputError, match=r"--tasks: unknown task 'shakespeare_speakr'.*did you mean shakespeare_speaker"):
        evaluate.load_tasks(task_manager, {"shakespeare_speakr": None})


def test_paper_preset_names_lm_eval_tasks(task_manager):
    tasks = evaluate.expand_tasks("paper", None)
    assert tasks["mmlu"] == 5 and tasks["hellaswag"] == 5 and len(tasks) == 10
    assert all(name in task_manager.task_index for name in tasks)  # no download: the index only
    assert evaluate.expand_tasks("paper,shakespeare_speaker", 0) == {**{name: 0 for name in tasks}, "shakespeare_speaker": 0}
