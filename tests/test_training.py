"""End-to-end runs through the real launchers: equivalence across world sizes, resume, export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, assert_same_weights, base_env, common_args, final_weights, run_training,
                      straight_and_killed_runs)
from owlore_ds.metrics import read_metrics


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_rank_equals_two_ranks(tmp_path, tiny_llama, task_data, stage):
    """Same global batch of 4: 1 rank x 4 examples vs 2 ranks x 1 example x 2 accumulation steps.

    Tolerance: Adam divides by sqrt(v), so float rounding of a different reduction order
    moves weights by up to ~1e-6 per step at lr 3e-3; updates themselves are ~1e-2.
    """
    config = str(ROOT / "ds_configs" / f"zero{stage}.json")
    one = tmp_path / "one"
    two = tmp_path / "two"
    run_training(common_args(tiny_llama, task_data, one, deepspeed=config, per_device_train_batch_size=4))
    run_training(common_args(tiny_llama, task_data, two, deepspeed=config, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2), nproc=2)
    losses_one = [m["loss"] for m in read_metrics(one)]
    losses_two = [m["loss"] for m in read_metrics(two)]
    assert len(losses_one) == 4
    assert losses_one == pytest.approx(losses_two, rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(two))
    # Full AdamW holds two moments of every parameter, partitioned over ranks, and under ZeRO-1/2
    # an fp32 master copy too (ZeRO-3 in fp32 updates its own weight partition in place).
    from transformers import AutoModelForCausalLM

    num_params = AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters()
    state_one = read_metrics(one)[-1]["optimizer_state_bytes"]
    state_two = read_metrics(two)[-1]["optimizer_state_bytes"]
    copies = 2 if stage == 3 else 3
    assert state_one == pytest.approx(copies * 4 * num_params, rel=0.005)
    assert state_two == pytest.approx(state_one / 2, rel=0.01)
    # The update is real: the weights moved away from the initial model.
    from safetensors.torch import load_file

    initial = load_file(str(tiny_llama / "model.safetensors"))
    moved = final_weights(one)
    assert max((moved[k] - initial[k]).abs().max().item() for k in initial) > 1e-3


@pytest.mark.parametrize("launcher,stage", [("deepspeed", 2), ("torchrun", 3), ("mpirun", 1)])
def test_launchers_train_two_ranks(tmp_path, tiny_llama, text_corpus, launcher, stage):
    out = tmp_path / "out"
    result = run_training(common_args(tiny_llama, text_corpus, out, deepspeed=ROOT / "ds_configs" / f"zero{stage}.json",
                                      per_device_train_batch_size=4, max_steps=12, learning_rate=5e-3,
                                      lr_scheduler_type="constant", warmup_steps=0),
                          nproc=2, launcher=launcher)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = sum(m["loss"] for m in metrics[:3]) / 3, sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert (out / "final" / "model.safetensors").is_file()
    trainer_state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert trainer_state["world_size"] == 2, result.stderr[-2000:]
    for key in ("lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "optimizer_state_bytes", "peak_memory_bytes"):
        assert metrics[-1][key] is not None and metrics[-1][key] > 0, key


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_architectures_train_and_export(tmp_path, make_tiny_model, text_corpus, model_type):
    model = make_tiny_model(model_type)
    out = tmp_path / "out"
    run_training(common_args(model, text_corpus, out, per_device_train_batch_size=4, max_steps=10, learning_rate=5e-3,
                             lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=True))
    losses = [m["loss"] for m in read_metrics(out)]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.9
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    assert exported.config.model_type == model_type


@pytest.mark.parametrize("method,checkpointing", [("full", True), ("owlore", True), ("full", False)])
def test_gradient_checkpointing_recomputes_every_layer_in_backward(tmp_path, tiny_llama, task_data, method,
                                                                   checkpointing):
    """from_pretrained returns a model in eval mode, where HF's layers skip checkpointing: with
    --gradient_checkpointing each layer's MLP must run twice a micro-batch (forward and the
    backward's recompute), without it once, and the model trains in train mode."""
    out, counts = tmp_path / "out", tmp_path / "counts.json"
    steps, accumulation = 2, 2
    args = common_args(tiny_llama, task_data, out, per_device_train_batch_size=2, max_steps=steps,
                       gradient_accumulation_steps=accumulation, method=method,
                       gradient_checkpointing=checkpointing or None, save_steps=0)
    run_training(args, script=ROOT / "tests" / "scripts" / "count_layer_forwards.py",
                 extra_env={"OWLORE_TEST_COUNTS": str(counts)})
    seen = json.loads(counts.read_text())
    assert seen["training"] is True
    runs_per_micro_batch = 2 if checkpointing else 1
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert seen["mlp_forwards"] == [steps * accumulation * runs_per_micro_batch] * layers


def test_killed_and_resumed_run_equals_straight_run(tmp_path, tiny_llama, task_data):
    straight, resumed = straight_and_killed_runs(
        tiny_llama, task_data, tmp_path, deepspeed=ROOT / "ds_configs" / "zero2.json", per_device_train_batch_size=2,
        max_steps=30, save_steps=5, resume_from_checkpoint="auto", learning_rate=1e-3)
    straight_metrics, resumed_metrics = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in resumed_metrics] == list(range(1, 31))
    assert [m["loss"] for m in resumed_metrics] == pytest.approx([m["loss"] for m in straight_metrics], rel=1e-6)
    assert [m["lr"] for m in resumed_metrics] == [m["lr"] for m in straight_metrics]
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)


def test_resume_on_another_world_size(tmp_path, tiny_llama, task_data):
    """A 2-rank ZeRO-3 checkpoint resumed on 1 rank continues exactly like the 2-rank run."""
    args = dict(deepspeed=ROOT / "ds_configs" / "zero3.json", max_steps=6, save_steps=3, resume_from_checkpoint="auto")
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, task_data, out, per_device_train_batch_size=2, **args), nproc=2)
    straight_losses = [m["loss"] for m in read_metrics(out)]
    straight_weights = final_weights(out)
    for leftover in ("checkpoint-6", "final"):
        subprocess.run(["rm", "-rf", str(out / leftover)], check=True)
    run_training(common_args(tiny_llama, task_data, out, per_device_train_batch_size=4, **args), nproc=1)
    assert [m["loss"] for m in read_metrics(out)] == pytest.approx(straight_losses, rel=1e-5)
    assert_same_weights(straight_weights, final_weights(out))


@pytest.mark.parametrize("stage,nproc,precision", [(3, 2, "fp32"), (2, 1, "bf16")])
def test_convert_to_hf_gives_the_trained_models_logits(tmp_path, tiny_llama, task_data, stage, nproc, precision):
    out = tmp_path / "out"
    probe = tmp_path / "logits.pt"
    args = common_args(tiny_llama, task_data, out, deepspeed=ROOT / "ds_configs" / f"zero{stage}.json",
                       per_device_train_batch_size=2, max_steps=3, **{precision: True})
    run_training(args, nproc=nproc, launcher="torchrun", script=ROOT / "tests" / "scripts" / "train_and_dump_logits.py",
                 extra_env={"OWLORE_TEST_LOGITS": str(probe)})

    destination = tmp_path / "hf"
    convert = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(out / "checkpoint-3"),
                              str(destination)], env=base_env(), cwd=ROOT, capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(destination, local_files_only=True)
    assert model.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    expected = torch.load(probe)
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits.float()
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(logits, expected["logits"].float(), rtol=0, atol=tolerance)


def test_zero3_offload_config_trains(tmp_path, tiny_llama, task_data):
    """ZeRO-3 with optimizer and parameters offloaded to the host (DeepSpeed's CPU Adam)."""
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, task_data, out, deepspeed=ROOT / "ds_configs" / "zero3_offload.json",
                             per_device_train_batch_size=4, max_steps=6, lr_scheduler_type="constant", warmup_steps=0),
                 timeout=600)
    losses = [m["loss"] for m in read_metrics(out)]
    assert losses[-1] < losses[0]
    assert (out / "final" / "model.safetensors").is_file()


def test_eager_attention_trains_as_sdpa(tmp_path, tiny_llama, task_data):
    """--attn_implementation reaches the model, and eager and sdpa compute the same attention
    (fp32, to rounding)."""
    from owlore_ds.modeling import load_model

    assert load_model(str(tiny_llama), "fp32", False, "eager").config._attn_implementation == "eager"
    for kernel in ("sdpa", "eager"):
        run_training(common_args(tiny_llama, task_data, tmp_path / kernel, method="owlore", max_steps=3,
                                 attn_implementation=kernel, owl_nsamples=4))
    sdpa, eager = ([m["loss"] for m in read_metrics(tmp_path / k)] for k in ("sdpa", "eager"))
    # Step 1 is one forward of the same weights; later steps carry Adam's amplified rounding.
    assert eager[0] == pytest.approx(sdpa[0], rel=1e-6) and eager == pytest.approx(sdpa, rel=2e-3)
