"""Bad input: one clear line naming the file, field or flag; non-zero exit; OUT left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, common_args, run_training


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _expect_error(args: list[str], out: Path, *fragments: str) -> None:
    before = _snapshot(out)
    result = run_training(args, check=False, timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert _snapshot(out) == before, "the output directory changed"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama, task_data) -> tuple[Path, list[str]]:
    """A completed 1-rank run with checkpoints at steps 1 and 2, and the flags that made it."""
    out = tmp_path_factory.mktemp("previous") / "out"
    args = common_args(tiny_llama, task_data, out, max_steps=2, save_steps=1, per_device_train_batch_size=2,
                       resume_from_checkpoint="auto")
    run_training(args)
    return out, args


def _copy_run(finished_run, tmp_path: Path) -> tuple[Path, list[str]]:
    source, args = finished_run
    out = tmp_path / "out"
    shutil.copytree(source, out)
    return out, [str(out) if a == str(source) else a for a in args]


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_missing_model_folder(tmp_path, task_data, tiny_llama):
    out = tmp_path / "out"
    _expect_error(common_args(tmp_path / "nowhere", task_data, out), out, "--model_name_or_path", "nowhere")
    (tmp_path / "empty").mkdir()
    _expect_error(common_args(tmp_path / "empty", task_data, out), out, "--model_name_or_path", "config.json")
    assert not out.exists()


def test_invalid_json_dataset_names_file_and_line(tmp_path, tiny_llama):
    data = tmp_path / "broken.json"
    data.write_text('{"type": "text2text",\n "instances": [\n {"input": "a", "output": "b"}\n oops]}')
    out = tmp_path / "out"
    _expect_error(common_args(tiny_llama, data, out), out, "broken.json", "line 4")


def test_unknown_type_and_empty_dataset(tmp_path, tiny_llama):
    out = tmp_path / "out"
    data = tmp_path / "d.json"
    data.write_text(json.dumps({"type": "essays", "instances": [{"text": "x"}]}))
    _expect_error(common_args(tiny_llama, data, out), out, "d.json", "unknown dataset type 'essays'")
    data.write_text(json.dumps({"type": "text_only", "instances": [{"text": "too short for a block"}]}))
    _expect_error(common_args(tiny_llama, data, out), out, "--dataset_path", "empty")


def test_rows_of_unknown_columns_name_file_row_and_columns(tmp_path, tiny_llama):
    out = tmp_path / "out"
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"question": "c", "reply": "d"}))
    _expect_error(common_args(tiny_llama, data, out), out, "qa.jsonl", "row 2", "['question', 'reply']")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_block_size_beyond_model_positions(tmp_path, tiny_llama, task_data):
    out = tmp_path / "out"
    _expect_error(common_args(tiny_llama, task_data, out, block_size=1024), out, "--block_size 1024",
                  "max_position_embeddings 256")


def test_deepspeed_config_contradicting_flags(tmp_path, tiny_llama, task_data):
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 8
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    _expect_error(common_args(tiny_llama, task_data, out, deepspeed=path, per_device_train_batch_size=2), out,
                  "ds.json", "train_micro_batch_size_per_gpu", "--per_device_train_batch_size")


def test_bad_flag_value(tmp_path, tiny_llama, task_data):
    out = tmp_path / "out"
    _expect_error(common_args(tiny_llama, task_data, out, lr_scheduler_type="exponential"), out,
                  "--lr_scheduler_type", "constant, linear, cosine")


def test_output_dir_of_another_run_is_refused(tmp_path, finished_run):
    out, args = _copy_run(finished_run, tmp_path)
    _expect_error(_replace(args, "--learning_rate", "0.1"), out, str(out), "learning_rate: 0.003 -> 0.1",
                  "--overwrite_output_dir")
    without_resume = [a for a in args if a not in ("--resume_from_checkpoint", "auto")]
    _expect_error(without_resume, out, str(out), "--resume_from_checkpoint auto")


def test_corrupt_or_partial_checkpoint_is_refused(tmp_path, finished_run):
    out, args = _copy_run(finished_run, tmp_path)
    checkpoint = out / "checkpoint-2"
    resume_args = _replace(args, "--resume_from_checkpoint", str(checkpoint))
    optim_file = next((checkpoint / "global_step2").glob("*optim_states.pt"))
    data = optim_file.read_bytes()
    optim_file.write_bytes(data[: len(data) // 2])
    _expect_error(resume_args, out, str(checkpoint), "corrupt checkpoint")
    optim_file.unlink()
    _expect_error(resume_args, out, str(checkpoint), "partial checkpoint")
    (checkpoint / "trainer_state.json").unlink()
    _expect_error(resume_args, out, str(checkpoint), "trainer_state.json is missing")


def test_overwrite_output_dir_starts_over(tmp_path, finished_run):
    out, args = _copy_run(finished_run, tmp_path)
    args = [a for a in _replace(args, "--learning_rate", "0.01") if a not in ("--resume_from_checkpoint", "auto")]
    run_training(args + ["--overwrite_output_dir", "--max_steps", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "final", "metrics.jsonl", "run_config.json"]
    assert json.loads((out / "run_config.json").read_text())["run_identity"]["learning_rate"] == 0.01


def test_fused_methods_refuse_what_they_cannot_do(tmp_path, tiny_llama, task_data):
    out = tmp_path / "out"
    _expect_error(common_args(tiny_llama, task_data, out, method="lomo", gradient_accumulation_steps=2), out,
                  "--gradient_accumulation_steps 2", "--method lomo")
    _expect_error(common_args(tiny_llama, task_data, out, method="adalomo",
                              deepspeed=ROOT / "ds_configs" / "zero3_offload.json"), out,
                  "zero3_offload.json", "offload_optimizer")
    _expect_error(common_args(tiny_llama, task_data, out, method="lora", lora_target_modules="qkv_fused"), out,
                  "--lora_target_modules", "qkv_fused")
