"""Layer-sampled training (lisa, owlore's sampling) under the layerwise ZeRO optimizer, real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, assert_same_weights, base_env, common_args, final_weights, run_training,
                      straight_and_killed_runs)
from owlore_ds.metrics import read_metrics
from owlore_ds.sampler import LayerSampler, layer_probabilities

ZERO2 = ROOT / "ds_configs" / "zero2.json"


@pytest.fixture(scope="module")
def four_layers(make_tiny_model):
    return make_tiny_model("llama", num_layers=4)


def _layer_params(model_dir) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters always trained) of a tiny model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return layer, model.num_parameters() - layer * len(model.model.layers)


def test_lisa_with_every_layer_active_equals_full_adamw(tmp_path, four_layers, task_data):
    """The layerwise optimizer's AdamW and clipping against DeepSpeed ZeRO-2 with torch.optim.AdamW."""
    args = dict(deepspeed=ZERO2, per_device_train_batch_size=4, max_steps=5, max_grad_norm=0.5)
    run_training(common_args(four_layers, task_data, tmp_path / "full", method="full", **args))
    run_training(common_args(four_layers, task_data, tmp_path / "lisa", method="lisa", lisa_activated_layers=4, **args))
    full, lisa = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "lisa")
    assert [m["loss"] for m in lisa] == pytest.approx([m["loss"] for m in full], rel=1e-5)
    assert [m["grad_norm"] for m in lisa] == pytest.approx([m["grad_norm"] for m in full], rel=1e-5)
    assert all(m["grad_norm"] > 0.5 for m in full)  # clipping was active
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "lisa"))


def test_two_ranks_sample_and_train_like_one_rank(tmp_path, four_layers, task_data):
    args = dict(deepspeed=ZERO2, method="lisa", lisa_activated_layers=1, lisa_interval_steps=2, max_steps=8, seed=11)
    run_training(common_args(four_layers, task_data, tmp_path / "one", per_device_train_batch_size=4, **args))
    run_training(common_args(four_layers, task_data, tmp_path / "two", per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, **args), nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    sampler = LayerSampler(4, 1, 2, layer_probabilities("uniform", 4), seed=11)
    expected = [sampler.layers_for_interval(step // 2) for step in range(8)]
    assert [m["active_layers"] for m in one] == expected == [m["active_layers"] for m in two]
    assert len({tuple(layers) for layers in expected}) > 1, "the test needs layers to change"
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    # Layers never trained keep their initial weights exactly.
    from safetensors.torch import load_file

    initial, trained = load_file(str(four_layers / "model.safetensors")), final_weights(tmp_path / "one")
    visited = {layer for layers in expected for layer in layers}
    for name, tensor in initial.items():
        if name.startswith("model.layers."):
            changed = not torch.equal(tensor, trained[name])
            assert changed == (int(name.split(".")[2]) in visited), name


def test_optimizer_state_is_for_active_layers_only(tmp_path, four_layers, task_data):
    """bf16: fp32 master + two fp32 moments = 12 bytes per trained parameter, only where trained."""
    layer, always = _layer_params(four_layers)
    args = dict(deepspeed=ZERO2, bf16=True, per_device_train_batch_size=2, max_steps=10, lisa_interval_steps=1, seed=1)
    run_training(common_args(four_layers, task_data, tmp_path / "full", method="full", **args))
    run_training(common_args(four_layers, task_data, tmp_path / "one", method="lisa", lisa_activated_layers=1, **args))
    run_training(common_args(four_layers, task_data, tmp_path / "two", method="lisa", lisa_activated_layers=1,
                             **{**args, "per_device_train_batch_size": 1}), nproc=2)
    full, one, two = (read_metrics(tmp_path / name) for name in ("full", "one", "two"))
    assert {layer for m in one for layer in m["active_layers"]} == {0, 1, 2, 3}  # every layer visited
    assert full[-1]["optimizer_state_bytes"] == pytest.approx(12 * (4 * layer + always), rel=0.005)
    assert {m["optimizer_state_bytes"] for m in one} == {12 * (layer + always)}  # flat while layers change
    # gamma/L of full AdamW's state for the layer matrices
    assert (one[0]["optimizer_state_bytes"] - 12 * always) / (full[-1]["optimizer_state_bytes"] - 12 * always) == \
        pytest.approx(1 / 4, rel=0.01)
    two_bytes = {m["optimizer_state_bytes"] for m in two}
    assert len(two_bytes) == 1 and two_bytes.pop() == pytest.approx(one[0]["optimizer_state_bytes"] / 2, rel=0.1)


def test_offload_keeps_inactive_state_on_cpu(tmp_path, four_layers, task_data):
    layer, always = _layer_params(four_layers)
    run_training(common_args(four_layers, task_data, tmp_path / "out", deepspeed=ZERO2, method="lisa",
                             lisa_activated_layers=1, lisa_interval_steps=1, max_steps=10, seed=5,
                             per_device_train_batch_size=2, inactive_state="offload"))
    metrics = read_metrics(tmp_path / "out")
    assert {m["optimizer_state_bytes"] for m in metrics} == {8 * (layer + always)}  # fp32: no master copy
    seen: set[int] = set()
    for m in metrics:
        offloaded = seen - set(m["active_layers"])
        assert m.get("offloaded_state_bytes", 0) == 8 * layer * len(offloaded)
        seen |= set(m["active_layers"])


def test_killed_and_resumed_lisa_equals_straight_run(tmp_path, four_layers, task_data):
    straight, resumed = straight_and_killed_runs(
        four_layers, task_data, tmp_path, deepspeed=ZERO2, method="lisa", lisa_activated_layers=2,
        lisa_interval_steps=3, bf16=True, inactive_state="offload", per_device_train_batch_size=2, max_steps=30,
        save_steps=5, resume_from_checkpoint="auto", learning_rate=1e-3)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 31))
    assert [m["active_layers"] for m in b] == [m["active_layers"] for m in a]
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)
    state = torch.load(resumed / "checkpoint-30" / "layerwise_rank0.pt", weights_only=True)
    assert state["items"] and all(torch.is_tensor(v) or isinstance(v, int) for s in state["items"].values() for v in s.values())


def test_resume_on_another_world_size_moves_state_by_name(tmp_path, four_layers, task_data):
    args = dict(deepspeed=ZERO2, method="lisa", lisa_activated_layers=2, lisa_interval_steps=2,
                inactive_state="offload", max_steps=8, save_steps=4, resume_from_checkpoint="auto")
    out = tmp_path / "out"
    run_training(common_args(four_layers, task_data, out, per_device_train_batch_size=2, **args), nproc=2)
    straight, straight_weights = read_metrics(out), final_weights(out)
    for leftover in ("checkpoint-8", "final"):
        subprocess.run(["rm", "-rf", str(out / leftover)], check=True)
    run_training(common_args(four_layers, task_data, out, per_device_train_batch_size=4, **args), nproc=1)
    resumed = read_metrics(out)
    assert [m["active_layers"] for m in resumed] == [m["active_layers"] for m in straight]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-5)
    assert_same_weights(straight_weights, final_weights(out))


def test_owl_sampling_uses_ratios_of_this_model_only(tmp_path, four_layers, make_tiny_model, task_data):
    ratios = tmp_path / "ratios.json"
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_outliers.py"), "--model_name_or_path",
                           str(four_layers), "--dataset_path", str(task_data), "--nsamples", "4", "--seqlen", "32",
                           "--output", str(ratios), "--cache_dir", str(tmp_path / "cache")],
                          env=base_env(), cwd=ROOT, capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr[-2000:]
    saved = json.loads(ratios.read_text())
    assert len(saved["ratios"]) == 4 and saved["nsamples"] == 4 and saved["seqlen"] == 32
    out = tmp_path / "owl"
    run_training(common_args(four_layers, task_data, out, method="lisa", lisa_prob_mode="owl", outlier_ratios=ratios,
                             lisa_activated_layers=2, lisa_interval_steps=1, max_steps=3, per_device_train_batch_size=2))
    sampler = LayerSampler(4, 2, 1, layer_probabilities("owl", 4, saved["ratios"]), seed=7)
    assert [m["active_layers"] for m in read_metrics(out)] == [sampler.layers_for_interval(k) for k in range(3)]

    other = make_tiny_model("llama", num_layers=4)  # same shape, other weights
    from safetensors.torch import load_file, save_file

    weights = {k: v + 0.01 for k, v in load_file(str(other / "model.safetensors")).items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused = run_training(common_args(other, task_data, tmp_path / "refused", method="lisa", lisa_prob_mode="owl",
                                       outlier_ratios=ratios), check=False)
    assert refused.returncode == 2
    assert "ratios.json" in refused.stderr and "fingerprint" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_owlore_without_ratio_file_computes_and_caches_them(tmp_path, four_layers, task_data):
    out = tmp_path / "out"
    run_training(common_args(four_layers, task_data, out, method="lisa", lisa_prob_mode="owl", owl_nsamples=4,
                             lisa_activated_layers=2, max_steps=2, per_device_train_batch_size=2), nproc=2)
    cached = json.loads((out / "outlier_ratios.json").read_text())
    assert len(cached["ratios"]) == 4 and cached["seqlen"] == 64 and cached["threshold_m"] == 5.0


def test_outlier_ratios_of_the_embedded_pretrained_model(tmp_path):
    """On a trained model the layers differ in outlier share (a random init is nearly flat);
    the tool's sequential calibration equals the library on the first windows in file order."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from owlore_ds.config import EMBEDDED_MODEL
    from owlore_ds.outliers import compute_layer_outlier_ratios

    text = (ROOT / "data" / "pretrain" / "valid.txt").read_text(encoding="utf-8")[:20_000]
    ids = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(text)["input_ids"]
    rows = [{"input_ids": ids[i * 64 : (i + 1) * 64]} for i in range(10)]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    output = tmp_path / "ratios.json"
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_outliers.py"), "--model_name_or_path",
                           EMBEDDED_MODEL, "--dataset_path", str(data), "--nsamples", "4", "--seqlen", "64",
                           "--calibration_order", "sequential", "--output", str(output),
                           "--cache_dir", str(tmp_path / "cache")], env=base_env(), cwd=ROOT, capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr[-2000:]
    ratios = json.loads(output.read_text())["ratios"]
    windows = torch.tensor([r["input_ids"] for r in rows[:4]])
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32, local_files_only=True)
    assert ratios == pytest.approx(compute_layer_outlier_ratios(model, windows, 5.0), rel=1e-6)
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_MODEL), dtype=torch.float32)
    flat = compute_layer_outlier_ratios(untrained, windows, 5.0)
    assert max(ratios) / min(ratios) > max(flat) / min(flat) + 0.5
    probabilities = layer_probabilities("owl", len(ratios), ratios)
    assert probabilities.max() > 1.3 / len(ratios)
