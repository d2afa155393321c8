"""lomo, adalomo (update fused into backward) and lora (peft adapters) under the same trainer.

The update rules are checked against independent code: torch.optim.SGD on the same
gradients for LOMO, the authors' lomo-optim AdaLomo for AdaLomo. The trainer runs are
checked as the other methods are: 1 rank against 2, killed-and-resumed against straight,
and the optimizer state against what the shapes predict.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import (ADAM_LOSS_RTOL, ADAM_WEIGHT_TOLERANCE, ROOT, assert_same_weights, common_args, final_weights,
                      initial_weights, relative_distance, run_training, straight_and_killed_runs)
from owlore_ds.metrics import read_metrics
from owlore_ds.fused import FusedUpdate

ZERO = {stage: ROOT / "ds_configs" / f"zero{stage}.json" for stage in (2, 3)}
LEARNING_RATES = {"lomo": 0.3, "adalomo": 5e-2, "lora": 3e-2}


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(count)]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_lomo_step_equals_sgd_on_the_same_gradients(max_grad_norm):
    """LOMO = SGD (with decoupled-looking but equivalent weight decay), clipped by the global norm."""
    ours, reference = _tiny_model(), _tiny_model()
    fused = FusedUpdate(ours, "lomo", lr=0.05, weight_decay=0.1, max_grad_norm=max_grad_norm)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, weight_decay=0.1)
    for ids in _batches(3):
        if max_grad_norm:
            fused.measure_norm(_loss(ours, ids))
        fused.fused_backward(_loss(ours, ids))
        assert all(p.grad is None for p in ours.parameters()), "gradients must be freed in backward"
        sgd.zero_grad()
        _loss(reference, ids).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm or float("inf"))
        assert fused.global_grad_norm == pytest.approx(norm.item(), rel=1e-5)
        sgd.step()
    moved = 0.0
    for (name, a), b, initial in zip(ours.named_parameters(), reference.parameters(), _tiny_model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (a - initial).abs().max().item())
    assert moved > 1e-3


def test_adalomo_steps_equal_lomo_optim(monkeypatch):
    """Three AdaLomo steps against the authors' package (lomo-optim), run on the CPU."""
    from lomo_optim import AdaLomo

    # The package puts its state on the GPU with .cuda(); on this CPU-only oracle run it stays put.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    ours, reference = _tiny_model(), _tiny_model()
    fused = FusedUpdate(ours, "adalomo", lr=1e-2, weight_decay=0.01)
    oracle = AdaLomo(reference, lr=1e-2, loss_scale=0, weight_decay=0.01)
    for ids in _batches(3):
        fused.fused_backward(_loss(ours, ids))
        oracle.fused_backward(_loss(reference, ids), lr=1e-2)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for p, q in zip(ours.parameters(), reference.parameters()):
        name = fused.names[p]
        if p.dim() > 1:
            torch.testing.assert_close(fused.state[p]["row"], oracle.exp_avg_sq_row[name])
            torch.testing.assert_close(fused.state[p]["col"], oracle.exp_avg_sq_col[name])
        else:
            torch.testing.assert_close(fused.state[p]["sq"], oracle.exp_avg_sq[name])


def _num_params(model_dir) -> tuple[int, int, int]:
    """(all parameters, AdaLomo's factored state in floats, LoRA adapter parameters at r=8 on all-linear)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    factored = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in model.parameters())
    adapters = sum(8 * (module.in_features + module.out_features) for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name != "lm_head")  # peft's all-linear
    return model.num_parameters(), factored, adapters


@pytest.mark.parametrize("method,stage", [("lomo", 2), ("lomo", 3), ("adalomo", 2), ("adalomo", 3), ("lora", 2),
                                          ("lora", 3)])
def test_one_rank_equals_two_ranks(tmp_path, tiny_llama, task_data, method, stage):
    """Global batch 4: 1 rank x 4 examples vs 2 ranks x 2; the loss falls on the task data in both."""
    flags = dict(method=method, deepspeed=ZERO[stage], max_steps=8, learning_rate=LEARNING_RATES[method],
                 lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                 lora_target_modules="all-linear" if method == "lora" else None)
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(common_args(tiny_llama, task_data, one, per_device_train_batch_size=4, **flags))
    run_training(common_args(tiny_llama, task_data, two, per_device_train_batch_size=2, **flags), nproc=2)
    metrics_one, metrics_two = read_metrics(one), read_metrics(two)
    losses_one, losses_two = [m["loss"] for m in metrics_one], [m["loss"] for m in metrics_two]
    # lora steps with AdamW, which turns the rounding of another reduction order into up to ~lr on
    # the elements whose gradient nearly cancels: compare in norm (conftest.relative_distance).
    # lomo (SGD) and adalomo (factored second moment, no per-element 1/|g|) keep the rounding's size.
    assert losses_one == pytest.approx(losses_two, rel=ADAM_LOSS_RTOL if method == "lora" else 1e-5)
    # An untrained random model scores about ln(vocab) = 6.24 on every batch, so a 2% fall is learning.
    assert sum(losses_one[-3:]) < 0.98 * sum(losses_one[:3]), losses_one
    if method == "lora":
        distance = relative_distance(final_weights(one), final_weights(two), initial_weights(tiny_llama))
        assert distance < ADAM_WEIGHT_TOLERANCE, distance
    else:
        assert_same_weights(final_weights(one), final_weights(two), atol=1e-5)

    num_params, factored, adapters = _num_params(tiny_llama)
    state_one, state_two = metrics_one[-1]["optimizer_state_bytes"], metrics_two[-1]["optimizer_state_bytes"]
    if method == "lomo":
        assert state_one == state_two == 0
    elif method == "adalomo":  # fp32 row and column factors per matrix, a vector per norm weight, on every rank
        assert state_one == state_two == 4 * factored
    else:  # AdamW's two moments (and under ZeRO-1/2 an fp32 master copy) of the adapters only, split over
        # ranks, plus AdamW's scalar step counter per parameter group (4 bytes each)
        copies = 2 if stage == 3 else 3
        assert 0 <= state_one - copies * 4 * adapters < 64
        assert state_two == pytest.approx(state_one / 2, abs=64)


@pytest.mark.parametrize("method,stage,bf16", [("lomo", 3, True), ("adalomo", 2, False), ("lora", 2, True)])
def test_killed_and_resumed_equals_straight(tmp_path, tiny_llama, task_data, method, stage, bf16):
    straight, resumed = straight_and_killed_runs(
        tiny_llama, task_data, tmp_path, deepspeed=ZERO[stage], method=method, bf16=bf16 or None,
        per_device_train_batch_size=2, max_steps=16, save_steps=4, kill_after=8, resume_from_checkpoint="auto",
        learning_rate=LEARNING_RATES[method] / 3)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 17))
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)


def test_lora_export_merges_adapters_into_base(tmp_path, tiny_llama, task_data):
    """OUT/final is a plain model: adapters folded into q/v, every other weight the base's, bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_training(common_args(tiny_llama, task_data, out, method="lora", lora_r=4, lora_alpha=8,
                             lora_target_modules="q_proj,v_proj,down_proj", learning_rate=1e-2,
                             deepspeed=ZERO[2]), nproc=2)
    base, trained = load_file(str(tiny_llama / "model.safetensors")), final_weights(out)
    assert trained.keys() == base.keys()
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for name in changed)
    AutoModelForCausalLM.from_pretrained(out / "final")  # loads as a plain transformers model


def test_fused_update_frees_every_gradient_under_two_passes():
    """With clipping, the norm pass must leave the weights untouched; the update pass moves them."""
    model = _tiny_model()
    before = copy.deepcopy(model.state_dict())
    fused = FusedUpdate(model, "lomo", lr=0.05, max_grad_norm=1.0)
    ids = _batches(1)[0]
    fused.measure_norm(_loss(model, ids))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fused.fused_backward(_loss(model, ids))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
