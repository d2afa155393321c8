"""lisa, owlore and galore under ZeRO-3: world sizes, galore-torch, kill and resume, resharding, memory.

Tolerances: fp32 runs that differ only in how gradients are summed (ranks, micro-batches,
DeepSpeed's ZeRO-3 backward) differ by rounding, which Adam amplifies on elements whose
gradient nearly cancels; they are compared by `relative_distance` against the bounds of
that analysis (conftest.py: ADAM_WEIGHT_TOLERANCE, ADAM_LOSS_RTOL). Measured here the
distances are ~1e-5; a real defect (a wrong owner, a missing micro-batch, a stale
partition) puts them above 1e-2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import (ADAM_LOSS_RTOL, ADAM_WEIGHT_TOLERANCE, ROOT, assert_same_weights, base_env, common_args,
                      final_weights, initial_weights, relative_distance, run_training, straight_and_killed_runs)
from owlore_ds.metrics import read_metrics

ZERO2 = ROOT / "ds_configs" / "zero2.json"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
GALORE = dict(galore_rank=8, galore_update_proj_gap=3, galore_scale=0.5)
SAMPLING = dict(lisa_activated_layers=2, lisa_interval_steps=2, owl_nsamples=4)


@pytest.fixture(scope="module")
def four_layers(make_tiny_model):
    return make_tiny_model("llama", num_layers=4)


@pytest.mark.parametrize("method", ["owlore", "lisa", "galore"])
def test_zero3_on_one_two_and_four_ranks_trains_as_zero2(tmp_path, four_layers, task_data, method):
    """Global batch 4 as 1 rank x 4, 2 ranks x 2 and 4 ranks x 1, ZeRO-3, against 1 rank under ZeRO-2."""
    args = dict(method=method, max_steps=6, max_grad_norm=0.5, **SAMPLING, **(GALORE if method != "lisa" else {}))
    runs = {"zero2-1": (ZERO2, 1), "zero3-1": (ZERO3, 1), "zero3-2": (ZERO3, 2), "zero3-4": (ZERO3, 4)}
    for name, (config, nproc) in runs.items():
        run_training(common_args(four_layers, task_data, tmp_path / name, deepspeed=config,
                                 per_device_train_batch_size=4 // nproc, **args), nproc=nproc)
    reference = read_metrics(tmp_path / "zero2-1")
    reference_weights, start = final_weights(tmp_path / "zero2-1"), initial_weights(four_layers)
    if method != "galore":
        assert len({tuple(m["active_layers"]) for m in reference}) > 1, "the test needs layers to change"
    assert any(m["grad_norm"] > 0.5 for m in reference)  # clipping was active
    for name in list(runs)[1:]:
        metrics = read_metrics(tmp_path / name)
        assert [m["active_layers"] for m in metrics] == [m["active_layers"] for m in reference], name
        assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in reference], rel=ADAM_LOSS_RTOL), name
        assert [m["grad_norm"] for m in metrics] == pytest.approx([m["grad_norm"] for m in reference], rel=1e-4), name
        assert relative_distance(final_weights(tmp_path / name), reference_weights, start) < ADAM_WEIGHT_TOLERANCE, name
    # Layers never sampled keep their initial weights exactly, in every partition.
    visited = {layer for m in reference for layer in m["active_layers"]}
    four = final_weights(tmp_path / "zero3-4")
    for key, tensor in start.items():
        if key.startswith("model.layers.") and int(key.split(".")[2]) not in visited:
            assert torch.equal(four[key], tensor), key


@pytest.mark.parametrize("signs,nproc", [("lapack", 1), ("canonical", 2)])
def test_zero3_owlore_with_every_layer_active_equals_galore_torch(tmp_path, make_tiny_model, task_data, signs, nproc):
    """owlore sampling both of two layers under ZeRO-3 against galore_torch.GaLoreAdamW, 8 steps.
    Under ZeRO-3 the gradients differ from a plain loop's by rounding (1e-8 of their norm,
    DeepSpeed's backward), and LAPACK's singular-vector signs can flip with rounding (README),
    which changes GaLore's next updates (its moments are not rotated). So with `lapack` signs,
    galore-torch as it is, the projector is computed once (step 0, from the same weights);
    with `canonical` signs, given to galore-torch's projector too, 8 steps cross two refreshes
    on two ranks."""
    from test_galore_training import _oracle_weights

    model = make_tiny_model("llama", num_layers=2)
    out = tmp_path / "out"
    run_training(common_args(model, task_data, out, method="owlore", lisa_activated_layers=2, lisa_prob_mode="uniform",
                             per_device_train_batch_size=4 // nproc, max_steps=8, max_grad_norm=0, learning_rate=3e-3,
                             weight_decay=0.01, deepspeed=ZERO3, galore_svd_signs=signs, galore_svd="exact",
                             **{**GALORE, "galore_update_proj_gap": 3 if signs == "canonical" else 8}), nproc=nproc)
    expected = _oracle_weights(model, task_data, steps=8, batch=4, lr=3e-3, max_grad_norm=0, weight_decay=0.01,
                               canonical_signs=signs == "canonical", update_proj_gap=3 if signs == "canonical" else 8)
    trained = final_weights(out)
    assert relative_distance(trained, {k: expected[k] for k in trained}, initial_weights(model)) < ADAM_WEIGHT_TOLERANCE


def test_zero3_killed_and_resumed_owlore_equals_straight_run(tmp_path, four_layers, task_data):
    straight, resumed = straight_and_killed_runs(
        four_layers, task_data, tmp_path, method="owlore", deepspeed=ZERO3, bf16=True, inactive_state="offload",
        per_device_train_batch_size=2, max_steps=16, save_steps=4, resume_from_checkpoint="auto",
        learning_rate=1e-3, kill_after=8, lisa_activated_layers=2, lisa_interval_steps=3, owl_nsamples=4, **GALORE)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["active_layers"] for m in b] == [m["active_layers"] for m in a]
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)


def _convert(checkpoint, destination, *flags: str) -> dict[str, torch.Tensor]:
    """tools/convert_to_hf.py, then the weights as from_pretrained loads them."""
    from transformers import AutoModelForCausalLM

    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(checkpoint), str(destination),
                    *flags], check=True, env=base_env(), cwd=ROOT, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(destination, local_files_only=True)
    return {name: t.detach() for name, t in model.named_parameters()}


@pytest.mark.parametrize("before,after,global_batch", [(2, 3, 6), (4, 2, 4)])
def test_zero3_checkpoint_resumes_on_another_world_size(tmp_path, four_layers, task_data, before, after, global_batch):
    """Growing 2 -> 3 ranks (uneven chunks) and shrinking 4 -> 2, with offloaded inactive state."""
    args = dict(method="owlore", deepspeed=ZERO3, max_steps=6, save_steps=3, inactive_state="offload",
                per_device_train_batch_size=1, **SAMPLING, **GALORE)
    straight = tmp_path / "straight"
    run_training(common_args(four_layers, task_data, straight, gradient_accumulation_steps=global_batch // before,
                             **args), nproc=before)
    moved = tmp_path / "moved"
    run_training(common_args(four_layers, task_data, moved, gradient_accumulation_steps=global_batch // after,
                             resume_from_checkpoint=straight / "checkpoint-3", **args), nproc=after)
    a, b = read_metrics(straight), read_metrics(moved)
    assert [m["step"] for m in b] == [4, 5, 6]
    assert [m["active_layers"] for m in b] == [m["active_layers"] for m in a[3:]]
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a[3:]], rel=ADAM_LOSS_RTOL)
    start = initial_weights(four_layers)
    assert relative_distance(final_weights(moved), final_weights(straight), start) < ADAM_WEIGHT_TOLERANCE
    # convert_to_hf on the ZeRO-3 checkpoints gives the weights of final/, also in shards.
    for out in (straight, moved):
        assert_same_weights(_convert(out / "checkpoint-6", tmp_path / f"hf-{out.name}"), final_weights(out), atol=0)
    sharded = tmp_path / "hf-sharded"
    assert_same_weights(_convert(moved / "checkpoint-6", sharded, "--max_shard_size", "100KB"), final_weights(moved),
                        atol=0)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3 and (sharded / "model.safetensors.index.json").exists()


def test_zero3_memory_per_rank_follows_the_model(tmp_path, four_layers, task_data):
    """4 ranks, ZeRO-3: each holds 1/4 of the weights; gradients held between backward and step
    are the owned share plus at most one reduce_bucket_size of gradients in flight (not every
    active tensor); optimizer bytes flat over a run that visits every layer. Figures against
    owlore_ds/memory_model.py."""
    from transformers import AutoConfig

    from owlore_ds.memory_model import layerwise_gradient_bytes, layerwise_weight_bytes

    bucket = 4096  # elements: several buckets per backward in this tiny model
    config = tmp_path / "zero3.json"
    import json

    ds = json.loads(ZERO3.read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = bucket
    config.write_text(json.dumps(ds))
    out = tmp_path / "out"
    run_training(common_args(four_layers, task_data, out, method="lisa", deepspeed=config, lisa_activated_layers=1,
                             lisa_interval_steps=1, max_steps=8, per_device_train_batch_size=1, seed=3), nproc=4)
    metrics = read_metrics(out)
    assert {layer for m in metrics for layer in m["active_layers"]} == {0, 1, 2, 3}
    assert len({m["optimizer_state_bytes"] for m in metrics}) == 1  # flat while the layers change
    model_config = AutoConfig.from_pretrained(four_layers)
    expected_weights = layerwise_weight_bytes(model_config, world_size=4, zero_stage=3, dtype_bytes=4)
    assert {m["weight_bytes"] for m in metrics} == {expected_weights}
    replicated = layerwise_weight_bytes(model_config, world_size=4, zero_stage=0, dtype_bytes=4)
    assert expected_weights < replicated / 3
    owned, in_flight, every_active = layerwise_gradient_bytes(model_config, world_size=4, active_layers=1,
                                                              bucket_elements=bucket)
    print(f"weight bytes per rank {expected_weights} (replicated {replicated}); gradient bytes per step "
          f"{[m['peak_gradient_bytes'] for m in metrics]}: owned share {owned} + one bucket budget <= {in_flight}, "
          f"every active tensor {every_active}")
    for m in metrics:
        assert owned <= m["peak_gradient_bytes"] <= owned + in_flight, m
    assert owned + in_flight < every_active


def test_zero3_offload_config_trains_as_zero3(tmp_path, four_layers, task_data):
    """ds_configs/zero3_offload.json: partitions kept on the CPU (offload_param); offload_optimizer
    does not apply to these methods and is dropped with a warning. Same losses and weights."""
    args = dict(method="owlore", max_steps=4, per_device_train_batch_size=2, **SAMPLING, **GALORE)
    run_training(common_args(four_layers, task_data, tmp_path / "zero3", deepspeed=ZERO3, **args), nproc=2)
    result = run_training(common_args(four_layers, task_data, tmp_path / "offload",
                                      deepspeed=ROOT / "ds_configs" / "zero3_offload.json", **args), nproc=2)
    assert "offload_optimizer does not apply" in result.stdout + result.stderr
    a, b = read_metrics(tmp_path / "zero3"), read_metrics(tmp_path / "offload")
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=ADAM_LOSS_RTOL)
    start = initial_weights(four_layers)
    assert relative_distance(final_weights(tmp_path / "offload"), final_weights(tmp_path / "zero3"), start) < ADAM_WEIGHT_TOLERANCE
