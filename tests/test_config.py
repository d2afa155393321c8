"""Flags, YAML config, DeepSpeed "auto" filling and launcher environment mapping."""

from __future__ import annotations

import importlib.util
import json

import pytest

from owlore_ds import ds_config
from owlore_ds.config import parse_args
from owlore_ds.distributed import map_launcher_env
from owlore_ds.errors import UserInputError

REQUIRED = ["--model_name_or_path", "m", "--dataset_path", "d", "--output_dir", "o"]


def test_yaml_values_are_overridden_by_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 2.0e-4\nbf16: true\nmax_steps: 7\nlr_scheduler_type: cosine\n")
    cfg = parse_args(REQUIRED + ["--config", str(path), "--max_steps", "9", "--local_rank=1"])
    assert (cfg.learning_rate, cfg.bf16, cfg.max_steps, cfg.lr_scheduler_type) == (2e-4, True, 9, "cosine")
    assert parse_args(REQUIRED + ["--bf16", "false"]).bf16 is False
    assert parse_args(REQUIRED + ["--no_shuffle"]).no_shuffle is True


def test_data_mix_is_the_dataset_and_excludes_dataset_path():
    cfg = parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--data_mix", "a:0.7,b:0.3"])
    assert cfg.dataset_path == "a:0.7,b:0.3"  # so that a resumed run must train on the same mix
    with pytest.raises(UserInputError, match="--data_mix and --dataset_path contradict"):
        parse_args(REQUIRED + ["--data_mix", "a:1"])


@pytest.mark.parametrize("text,message", [
    ("learning_rat: 1\n", "unknown key 'learning_rat'"),
    ("max_steps: many\n", "key 'max_steps' expects int"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_yaml_names_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError, match=message):
        parse_args(REQUIRED + ["--config", str(path)])


@pytest.mark.parametrize("argv,message", [
    (["--bf16", "--fp32"], "contradict"),
    (["--method", "sgd"], "--method must be one of"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
    (["--max_steps", "x"], "argument --max_steps: invalid int value"),
    (["--method", "owlore", "--update_in_backward"], "--update_in_backward with --max_grad_norm 1.0: clipping"),
    (["--method", "lomo", "--update_in_backward", "--max_grad_norm", "0"], "applies to lisa, owlore and galore"),
    (["--offload_checkpoints"], "--offload_checkpoints: offloads the layer checkpoints, so it needs --gradient_checkpointing"),
])
def test_bad_flags(argv, message):
    with pytest.raises(UserInputError, match=message):
        parse_args(REQUIRED + argv)


def test_auto_values_are_filled_from_flags():
    cfg = parse_args(REQUIRED + ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2",
                                 "--max_grad_norm", "0", "--bf16", "--deepspeed", "ds_configs/zero3.json"])
    filled = ds_config.fill(ds_config.read("ds_configs/zero3.json"), cfg, world_size=4, hidden_size=64)
    assert filled["train_batch_size"] == 24 and filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_clipping"] == 0 and filled["bf16"]["enabled"] is True
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert "auto" not in json.dumps(filled)


def test_explicit_values_must_agree_with_flags(tmp_path):
    cfg = parse_args(REQUIRED + ["--per_device_train_batch_size", "2"])
    agreeing = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "zero_optimization": {"stage": 1}}
    assert ds_config.fill(agreeing, cfg, world_size=2, hidden_size=8)["gradient_accumulation_steps"] == 1
    with pytest.raises(UserInputError, match=r"train_batch_size is 8 but .* gives 4"):
        ds_config.fill(dict(agreeing, train_batch_size=8), cfg, world_size=2, hidden_size=8)
    with pytest.raises(UserInputError, match="remove the 'optimizer' block"):
        ds_config.fill(dict(agreeing, optimizer={"type": "AdamW"}), cfg, world_size=2, hidden_size=8)
    with pytest.raises(UserInputError, match="zero_optimization.offload_param.buffer_size is \"auto\""):
        ds_config.fill(dict(agreeing, zero_optimization={"stage": 3, "offload_param": {"buffer_size": "auto"}}),
                       cfg, world_size=2, hidden_size=8)


@pytest.mark.parametrize("launcher_env,expected", [
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "node0"},
     {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"},
     {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}),
])
def test_launcher_environment_is_mapped(launcher_env, expected):
    env = dict(launcher_env)
    map_launcher_env(env)
    assert {k: env[k] for k in expected} == expected


def test_single_process_and_multinode_mpi_without_master():
    env: dict[str, str] = {}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    with pytest.raises(UserInputError, match="MASTER_ADDR"):
        map_launcher_env({"PMI_RANK": "0", "PMI_SIZE": "16", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "8"})


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_needs_its_package():
    with pytest.raises(UserInputError, match="flash_attention_2: the flash-attn package is not installed"):
        parse_args(REQUIRED + ["--attn_implementation", "flash_attention_2"])
